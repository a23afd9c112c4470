"""The training loop, top to bottom (big_vision style).

    mesh -> data + tokenizer -> model + optimizer -> state (init or resume)
    -> compiled step -> loop (log, checkpoint) -> final checkpoint

Everything stateful (checkpoints, logging, the data iterator) lives here; the
step itself is the pure function in `clusjax/train/step.py`.
"""
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from clusjax import workdir as wd
from clusjax.api import Pretrained
from clusjax.clustering import next_k_max, write_cluster_plots
from clusjax.config import (ConfigError, negative_groups, task_of, train_stages,
                            twin_ids_read, validate)
from clusjax.data import make_sampled_iterator, make_source, make_train_iterator
from clusjax.data.pipeline import skip_metrics
from clusjax.data.sampler import ClusteredSampler
from clusjax.data.prompts import labeler_from_config, tagger_from_config
from clusjax.data.tasks import answer_vocab, task_targets
from clusjax.data.twins import TwinBatches, with_twins
from clusjax.models.clus import build_model
from clusjax.parallel.cpu import keep_freed_memory, runs_inline
from clusjax.parallel.hardware import chip_of
from clusjax.parallel.mesh import (batch_sharding, create_mesh, mesh_context,
                                   per_device_bytes, rules_from_config)
from clusjax.train.checkpoint import Checkpointer
from clusjax.train.errors import NonFiniteError
from clusjax.train.metrics_writer import MetricWriter
from clusjax.train.optimizer import make_optimizer
from clusjax.train.restore import load_init_from, restore_model, tokenizer_fingerprint
from clusjax.train.state import abstract_state, dummy_batch, init_state
from clusjax.train.state import grow_state
from clusjax.train.stages import (cluster_assignment, describe_assignment, stage_at,
                                  stage_config)
from clusjax.train.objective import TextIds
from clusjax.train.run_tokenizer import distill_teacher, get_tokenizer
from clusjax.train.step import make_cluster_step, make_train_step

def _global_batch(local_batch, sharding, ready=False):
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axes.

  `ready`: wait until they are made. Where steps run inline on the CPU
  (clusjax/parallel/cpu.py) a step runs inline only if its inputs are ready; one that
  waits for its batch runs on a worker thread, and so does the next (its state is not
  ready yet), each mapping its temporaries anew.
  """
  batch = {k: jax.make_array_from_process_local_data(sharding, v)
           for k, v in local_batch.items()}
  return jax.block_until_ready(batch) if ready else batch


def compile_train_step(model, tx, schedule, config, tokenizer, mesh, rules, state_shapes,
                       state_shardings, teacher=None, batch_transform=None):
  """Lowers and compiles the step ahead of time; returns the executable.

  teacher: (model, params) of the distillation teacher; the executable then
  takes its params as a third argument. batch_transform: a test hook
  (`make_train_step`).
  """
  sharding = batch_sharding(mesh, rules)
  batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                  for k, v in dummy_batch(config, config.train.batch_size).items()}
  args, in_shardings = (state_shapes, batch_shapes), (state_shardings, sharding)
  if teacher is not None:
    args += (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          teacher[1]),)
    in_shardings += (jax.tree.map(lambda x: x.sharding, teacher[1]),)
  step = jax.jit(make_train_step(model, tx, schedule, config, TextIds.of(tokenizer),
                                 None if teacher is None else teacher[0], batch_transform),
                 in_shardings=in_shardings, out_shardings=(state_shardings, None),
                 donate_argnums=(0,))
  with mesh_context(mesh, rules):
    return step.lower(*args).compile()


def compiled_flops(compiled):
  """FLOPs per device of one call of a compiled executable (XLA's cost analysis; 0 if none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def throughput(flops_per_step, steps, seconds, batch_size, device_kind, dtype):
  """examples/s, TFLOP/s per device and, where the device's peak is known
  (`clusjax.parallel.hardware`), MFU = achieved / peak FLOP/s for `dtype`."""
  out = {"examples_per_sec": steps * batch_size / seconds,
         "tflops_per_device": flops_per_step * steps / seconds / 1e12}
  chip = chip_of(device_kind)
  if chip is not None:
    out["mfu"] = out["tflops_per_device"] * 1e12 / chip.peak_flops(dtype)
  return out


def load_teacher(config, workdir, mesh, rules):
  """(model, params) of config.distill.teacher, frozen, in this run's mesh.

  `validate` has checked that it reads the student's image size and text
  length; here, that it reads the same token ids.
  """
  teacher = distill_teacher(config)
  if tokenizer_fingerprint(teacher) != tokenizer_fingerprint(workdir):
    raise ConfigError(f"config.distill.teacher={teacher!r} has another tokenizer than {workdir!r}; "
                      "the teacher reads the student's token ids, so the student must use its "
                      "tokenizer (leave config.data.tokenizer empty in a fresh workdir).")
  model, params, _, _, _ = restore_model(teacher, mesh, rules)
  return model, params


def _describe(mesh, state, flops):
  params = sum(x.size for x in jax.tree.leaves(state.params))
  mib = 2.0 ** 20
  return (f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} devices; "
          f"{params / 1e6:.2f}M params; per device: params "
          f"{per_device_bytes(state.params) / mib:.1f} MiB, optimizer state "
          f"{per_device_bytes(state.opt_state) / mib:.1f} MiB, "
          f"{flops / 1e9:.3g} GFLOP per step (compiled)")


def compile_cluster_step(config, mesh, rules, state_shapes, state_shardings):
  """Lowers and compiles the clustering update (between steps) ahead of time."""
  fn = jax.jit(make_cluster_step(config), in_shardings=(state_shardings,),
               out_shardings=(state_shardings, None), donate_argnums=(0,))
  with mesh_context(mesh, rules):
    return fn.lower(state_shapes).compile()


class _Compiled:
  """The model, state layout and compiled functions for one K_max."""

  def __init__(self, config, tokenizer, tx, schedule, mesh, rules, teacher=None,
               batch_transform=None):
    self.model = build_model(config, tokenizer.vocab_size)
    self.shapes, self.shardings = abstract_state(self.model, tx, config, mesh, rules)
    step_fn = compile_train_step(self.model, tx, schedule, config, tokenizer, mesh, rules,
                                 self.shapes, self.shardings, teacher, batch_transform)
    self.flops = compiled_flops(step_fn)
    # The teacher's params (frozen) go in with every batch.
    self.step_fn = step_fn if teacher is None else (
        lambda state, batch: step_fn(state, batch, teacher[1]))
    self.cluster_fn = None
    if clustering_on(config):
      self.cluster_fn = compile_cluster_step(config, mesh, rules, self.shapes, self.shardings)


def stage_batches(stage, config, workdir, train_source, tokenizer, pretrained, targets=None):
  """The train iterator of `stage`, from its start.

  Random stages shuffle as `make_train_iterator` does (stage 0 with
  config.data.seed, stage i with a seed drawn from (seed, i)); clustered ones
  sample from the stage's assignment (`cluster_assignment`: read from the
  workdir, or made now from `pretrained()`, the model at the stage's start;
  None when resuming, which must find it in the workdir). `targets`: the
  downstream task's (`clusjax.data.tasks.task_targets`).
  """
  c = stage_config(config, stage)
  seed = config.data.seed
  kwargs = dict(
      global_batch_size=config.train.batch_size, image_size=config.data.image_size,
      tokenizer=tokenizer, max_text_len=config.data.max_text_len,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.num_workers,
      negative_groups=negative_groups(config),
      prompt_labeler=labeler_from_config(c), tagger=tagger_from_config(c), targets=targets)
  # Place twins (config.data.shapes_twins): pairs of each batch's first rows.
  source, pairs = with_twins(train_source, config.data, config.train.batch_size,
                             pair_ids=twin_ids_read(config))
  if stage.sampler == "random":
    if stage.index:
      seed = int(np.random.SeedSequence([seed, stage.index]).generate_state(1)[0])
    return make_train_iterator(source, seed=seed, twin_pairs=pairs, **kwargs)
  labels, stats = cluster_assignment(stage, workdir, train_source, pretrained)
  if jax.process_index() == 0:
    tqdm.write(describe_assignment(stage, stats))
  sampler = ClusteredSampler(labels, len(train_source), config.train.batch_size - pairs,
                             mix=stage.mix, seed=seed, stage=stage.index)
  if pairs:
    sampler = TwinBatches(sampler, len(train_source), pairs)
  return make_sampled_iterator(source, sampler, seed=seed, **kwargs)


def clustering_on(config):
  return config.clustering.enabled and config.loss.swap_prediction


def _cluster(state, compiled, config, workdir, done, writer, build):
  """One clustering step; grows K_max (and recompiles) when k outgrows it."""
  state, stats = compiled.cluster_fn(state)
  stats = jax.device_get(stats)
  k, k_max = int(stats["num_clusters"]), int(state.active.shape[0])
  if k > k_max:
    new_k_max = next_k_max(k, k_max)
    config.clustering.max_prototypes = new_k_max
    compiled = build()
    state = jax.device_put(grow_state(state, new_k_max), compiled.shardings)
    if jax.process_index() == 0:
      # Checkpoints record the new K_max; resume and load_pretrained read it there.
      tqdm.write(f"clustering: k={k} > K_max={k_max}; K_max -> {new_k_max}")
    state, stats = compiled.cluster_fn(state)
    stats = jax.device_get(stats)
  summary = {"clustering/num_clusters": int(stats["num_clusters"]),
             "clustering/active": int(state.active.sum()),
             "clustering/eps": float(stats["eps"]),
             "clustering/noise_fraction": float(stats["noise_fraction"]),
             "clustering/skipped": int(stats["skipped"])}
  writer.write(done, summary)
  if jax.process_index() == 0:
    if summary["clustering/skipped"]:
      tqdm.write(f"step {done}: clustering skipped: the feature queue or the prototypes are "
                 "not finite; prototypes kept as they were.")
    tqdm.write(f"step {done}: clustering k={summary['clustering/num_clusters']} "
               f"eps={summary['clustering/eps']:.4g} "
               f"noise={summary['clustering/noise_fraction']:.3f}")
    if config.clustering.plots:
      write_cluster_plots(workdir, done, stats)
  return state, compiled


class _Skips:
  """Steps the train step did not apply (non-finite loss or gradient norm): in all
  (checkpointed, logged as `skipped_steps`) and in a row (the run stops at
  config.train.max_skipped_steps)."""

  def __init__(self, limit, total=0):
    self.limit, self.total, self.in_a_row = limit, total, 0

  def record(self, step, skipped):
    """Counts step `step` (its `skipped` flag from the step's metrics); True when
    the run must stop."""
    if not int(jax.device_get(skipped)):
      self.in_a_row = 0
      return False
    self.total += 1
    self.in_a_row += 1
    if jax.process_index() == 0:
      tqdm.write(f"step {step}: non-finite loss or gradient norm; update not applied "
                 f"({self.in_a_row} in a row, {self.total} in all).")
    return self.in_a_row >= self.limit

  def error(self, step, ckpt):
    n = self.in_a_row
    steps = f"step {step}" if n == 1 else f"steps {step - n + 1}-{step}"
    newest = ckpt.latest_step()
    where = (f"The newest checkpoint, step {newest}, has the last finite parameters"
             if newest is not None else "No checkpoint was written before them")
    return NonFiniteError(
        f"step {step}: non-finite loss or gradient norm in {n} step{'s' * (n > 1)} in a row "
        f"({steps}), not applied; config.train.max_skipped_steps={self.limit} stops the run "
        f"here. {where}. Lower config.optim.learning_rate or look at the data near step "
        f"{step}, then run again to resume.")


def train(config, workdir, *, batch_transform=None):
  """Trains (or resumes) in `workdir`; returns (model, final state, tokenizer).

  Resumes from the newest readable checkpoint (an unreadable newer one is moved
  to `checkpoints.damaged/` with a warning). batch_transform: a test hook
  (`make_train_step`).
  """
  validate(config, jax.device_count())
  is_main = jax.process_index() == 0
  log = (lambda m: print(m, flush=True)) if is_main else (lambda _: None)
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = create_mesh(config.mesh), rules_from_config(config)
  ckpt = Checkpointer(wd.path(workdir, wd.CHECKPOINT_DIR),
                      keep=config.train.keep_checkpoints, every=config.train.checkpoint_every)
  resuming = ckpt.latest_step() is not None
  init_from = "" if resuming else config.get("init_from")
  if init_from:   # K_max may have grown during the run it starts from
    source = Checkpointer(wd.path(init_from, wd.CHECKPOINT_DIR), read_only=True)
    config.clustering.max_prototypes = source.k_max()
    source.close()

  train_source = make_source(config.data, config.data.train_split, task_of(config))
  tokenizer = get_tokenizer(config, workdir, train_source)
  vocab = (answer_vocab(config, workdir, train_source, write=is_main)
           if task_of(config) == "vqa" else None)
  targets = task_targets(config, vocab)
  num_steps = config.train.num_steps
  tx, schedule = make_optimizer(config.optim, num_steps)
  teacher = load_teacher(config, workdir, mesh, rules) if distill_teacher(config) else None
  stages = train_stages(config)

  def build():   # the current stage's step (its loss weights) at the current K_max
    return _Compiled(stage_config(config, stage), tokenizer, tx, schedule, mesh, rules, teacher,
                     batch_transform)

  def batches(state):   # the current stage's batches, from its start
    model = None if state is None else (
        lambda: Pretrained(compiled.model, state.params, tokenizer, config, state.active))
    return stage_batches(stage, config, workdir, train_source, tokenizer, model, targets)

  skipped_before = 0
  if resuming:
    def restore_at(step):   # K_max and stage as of that checkpoint
      meta = ckpt.meta(step)
      config.clustering.max_prototypes = int(meta["k_max"])
      at = stage_at(stages, step)
      c = stage_config(config, at)   # as `build` makes it
      shapes, _ = abstract_state(build_model(c, tokenizer.vocab_size), tx, c, mesh, rules)
      # A clustered stage's assignment is in the workdir.
      data = stage_batches(at, config, workdir, train_source, tokenizer, None, targets)
      return at, data, ckpt.restore(shapes, data, step=step), meta

    resumed, (stage, data_iter, state, meta) = ckpt.restore_newest(restore_at, move_damaged=True,
                                                                   log=log)
    skipped_before = int(meta.get("skipped_steps", 0))
    log(f"Resumed from step {resumed} in {workdir}")
    compiled = build()
  else:
    stage = stage_at(stages, 0)
    compiled = build()
    state = init_state(compiled.model, tx, config, compiled.shardings)
    if init_from:
      state = load_init_from(state, init_from, mesh, rules, log=log)
    data_iter = batches(state)
  if is_main:   # with the K_max of the checkpoint it resumed from
    wd.save_config(config, workdir)
    print(_describe(mesh, state, compiled.flops), flush=True)

  sharding = batch_sharding(mesh, rules)
  # Where steps run inline on the CPU (launch/main.py), each reuses the last one's
  # temporaries (clusjax/parallel/cpu.py); set after the compiles, which it slows. Other
  # backends keep their batches' transfers asynchronous.
  inline = runs_inline()
  keep_freed_memory()
  start = int(state.step)
  writer = MetricWriter(workdir, enabled=is_main, start_step=start)
  bar = tqdm(total=num_steps, initial=start, disable=not is_main, unit="step",
             dynamic_ncols=True)
  log_every = config.train.log_every
  window_start, window_steps = time.perf_counter(), 0
  skips = _Skips(config.train.get("max_skipped_steps", 20), skipped_before)
  # (step, its `skipped` flag on device), read one step late: reading it waits for
  # that step, so one step stays in flight (the next batch loads while it computes)
  # but no more, and the progress bar and examples/s show real progress.
  pending = None

  def count_skips():
    nonlocal pending
    if pending is not None:
      step, flag = pending
      pending = None
      if skips.record(step, flag):
        ckpt.wait()   # the newest checkpoint complete before the error names it
        raise skips.error(step, ckpt)

  def save(done, state, data_iter, force=False):
    if force or done % ckpt.every == 0:
      count_skips()   # the checkpoint records skipped_steps up to its step
    ckpt.maybe_save(done, state, data_iter, force=force, meta={"skipped_steps": skips.total})

  try:
    for step in range(start, num_steps):
      state, metrics = compiled.step_fn(state, _global_batch(next(data_iter), sharding,
                                                              ready=inline))
      count_skips()
      done = step + 1
      pending = (done, metrics["skipped"])
      ckpt.check()   # a background save that failed (disk full) stops the run now
      window_steps += 1
      if done % log_every == 0 or done == num_steps:
        metrics = jax.device_get(metrics)
        count_skips()
        metrics.pop("skipped")
        metrics["skipped_steps"] = skips.total
        metrics.update(skip_metrics(train_source))   # data/skipped/<reason>: bad records
        loss = float(metrics["loss"])
        elapsed = time.perf_counter() - window_start
        metrics.update(throughput(compiled.flops, window_steps, elapsed, config.train.batch_size,
                                  jax.devices()[0].device_kind, config.dtype))
        writer.write(done, metrics)
        bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{metrics['examples_per_sec']:.0f}",
                        **({"mfu": f"{metrics['mfu']:.1%}"} if "mfu" in metrics else {}))
        window_start, window_steps = time.perf_counter(), 0
      if compiled.cluster_fn is not None and done % config.clustering.cluster_every == 0:
        count_skips()
        state, compiled = _cluster(state, compiled, config, workdir, done, writer, build)
      bar.update(1)
      if done == stage.end and done < num_steps:
        # The next stage: its step, its batches; its first checkpoint holds its
        # iterator, so a resume from here reads the new stage's batches.
        count_skips()
        previous, stage = stage, stage_at(stages, done)
        if stage.loss != previous.loss:
          compiled = build()
        data_iter = batches(state)
        save(done, state, data_iter, force=True)
      else:
        save(done, state, data_iter)
    count_skips()
    save(num_steps, state, data_iter, force=True)
    ckpt.close()
  except BaseException:
    ckpt.close_quietly()   # a save in flight finishes: the newest checkpoint is whole
    raise
  finally:
    bar.close()
    writer.close()
  return compiled.model, state, tokenizer
