"""The training loop, top to bottom (big_vision style).

    mesh -> data + tokenizer -> model + optimizer -> state (init or resume)
    -> compiled step -> loop (log, checkpoint) -> final checkpoint

Everything stateful (checkpoints, logging, the data iterator) lives here; the
step itself is the pure function in `clusjax/train/step.py`.
"""
import math
import os
import shutil
import time

import jax
from jax.experimental import multihost_utils
from tqdm import tqdm

from clusjax import workdir as wd
from clusjax.clustering import next_k_max, write_cluster_plots
from clusjax.config import ConfigError, caption_negative_groups, validate
from clusjax.data import Tokenizer, make_source, make_train_iterator
from clusjax.data.prompts import labeler_from_config, tagger_from_config
from clusjax.models.clus import build_model
from clusjax.parallel.mesh import (batch_sharding, create_mesh, mesh_context,
                                   per_device_bytes, rules_from_config)
from clusjax.train.checkpoint import Checkpointer
from clusjax.train.metrics_writer import MetricWriter
from clusjax.train.optimizer import make_optimizer
from clusjax.train.restore import load_tokenizer, restore_model, tokenizer_fingerprint
from clusjax.train.state import abstract_state, dummy_batch, init_state
from clusjax.train.state import grow_state
from clusjax.train.step import TextIds, make_cluster_step, make_train_step

# Captions read to train a tokenizer when the config names none.
TOKENIZER_TRAIN_CAPTIONS = 50_000


def _copy_hf_tokenizer(init_from, dest):
  src = init_from if os.path.isdir(init_from) else os.path.dirname(init_from)
  files = [f for f in wd.HF_TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  if not any(f in files for f in ("tokenizer.json", "vocab.txt")):
    raise FileNotFoundError(
        f"config.model.text.init_from={init_from!r}: no tokenizer.json or vocab.txt in {src!r}; "
        "the text tower needs the vocabulary it was trained with.")
  tmp = dest + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for f in files:
    shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
  os.replace(tmp, dest)


def _copy_workdir_tokenizer(src_workdir, workdir):
  hf_dir = wd.path(src_workdir, wd.HF_TOKENIZER_DIR)
  if os.path.isdir(hf_dir):
    _copy_hf_tokenizer(hf_dir, wd.path(workdir, wd.HF_TOKENIZER_DIR))
  else:
    shutil.copyfile(wd.path(src_workdir, wd.TOKENIZER_FILE), wd.path(workdir, wd.TOKENIZER_FILE))


def _distill_teacher(config):
  return config.get("distill", {}).get("teacher", "")


def get_tokenizer(config, workdir, train_source):
  """The workdir's tokenizer: copied from model.text.init_from's checkpoint,
  config.data.tokenizer or the distillation teacher's workdir, or trained on
  the training captions.

  Once in the workdir it is reused as is (resume, eval, export).
  """
  file = wd.path(workdir, wd.TOKENIZER_FILE)
  hf_dir = wd.path(workdir, wd.HF_TOKENIZER_DIR)
  init_from = config.model.text.init_from
  if jax.process_index() == 0 and not (os.path.exists(file) or os.path.isdir(hf_dir)):
    if init_from:
      _copy_hf_tokenizer(init_from, hf_dir)
    elif config.data.tokenizer:
      if not os.path.exists(config.data.tokenizer):
        raise FileNotFoundError(f"config.data.tokenizer={config.data.tokenizer!r} does not exist.")
      shutil.copyfile(config.data.tokenizer, file)
    elif _distill_teacher(config):   # the teacher reads the batch's token ids
      _copy_workdir_tokenizer(_distill_teacher(config), workdir)
    else:
      n = min(len(train_source), TOKENIZER_TRAIN_CAPTIONS)
      captions = [train_source[i]["caption"] for i in range(n)]
      Tokenizer.train(captions, file, config.data.vocab_size)
      print(f"Trained a SentencePiece tokenizer on {n} captions -> {file}", flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer")
  return load_tokenizer(workdir)


def _global_batch(local_batch, sharding):
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def compile_train_step(model, tx, schedule, config, tokenizer, mesh, rules, state_shapes,
                       state_shardings, teacher=None):
  """Lowers and compiles the step ahead of time; returns the executable.

  teacher: (model, params) of the distillation teacher; the executable then
  takes its params as a third argument.
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
                                 None if teacher is None else teacher[0]),
                 in_shardings=in_shardings, out_shardings=(state_shardings, None),
                 donate_argnums=(0,))
  with mesh_context(mesh, rules):
    return step.lower(*args).compile()


def load_teacher(config, workdir, mesh, rules):
  """(model, params) of config.distill.teacher, frozen, in this run's mesh.

  `validate` has checked that it reads the student's image size and text
  length; here, that it reads the same token ids.
  """
  teacher = _distill_teacher(config)
  if tokenizer_fingerprint(teacher) != tokenizer_fingerprint(workdir):
    raise ConfigError(f"config.distill.teacher={teacher!r} has another tokenizer than {workdir!r}; "
                      "the teacher reads the student's token ids, so the student must use its "
                      "tokenizer (leave config.data.tokenizer empty in a fresh workdir).")
  model, params, _, _, _ = restore_model(teacher, mesh, rules)
  return model, params


def _describe(mesh, state):
  params = sum(x.size for x in jax.tree.leaves(state.params))
  mib = 2.0 ** 20
  return (f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} devices; "
          f"{params / 1e6:.2f}M params; per device: params "
          f"{per_device_bytes(state.params) / mib:.1f} MiB, optimizer state "
          f"{per_device_bytes(state.opt_state) / mib:.1f} MiB")


def compile_cluster_step(config, mesh, rules, state_shapes, state_shardings):
  """Lowers and compiles the clustering update (between steps) ahead of time."""
  fn = jax.jit(make_cluster_step(config), in_shardings=(state_shardings,),
               out_shardings=(state_shardings, None), donate_argnums=(0,))
  with mesh_context(mesh, rules):
    return fn.lower(state_shapes).compile()


class _Compiled:
  """The model, state layout and compiled functions for one K_max."""

  def __init__(self, config, tokenizer, tx, schedule, mesh, rules, teacher=None):
    self.model = build_model(config, tokenizer.vocab_size)
    self.shapes, self.shardings = abstract_state(self.model, tx, config, mesh, rules)
    step_fn = compile_train_step(self.model, tx, schedule, config, tokenizer, mesh, rules,
                                 self.shapes, self.shardings, teacher)
    # The teacher's params (frozen) go in with every batch.
    self.step_fn = step_fn if teacher is None else (
        lambda state, batch: step_fn(state, batch, teacher[1]))
    self.cluster_fn = None
    if clustering_on(config):
      self.cluster_fn = compile_cluster_step(config, mesh, rules, self.shapes, self.shardings)


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
             "clustering/noise_fraction": float(stats["noise_fraction"])}
  writer.write(done, summary)
  if jax.process_index() == 0:
    tqdm.write(f"step {done}: clustering k={summary['clustering/num_clusters']} "
               f"eps={summary['clustering/eps']:.4g} "
               f"noise={summary['clustering/noise_fraction']:.3f}")
    if config.clustering.plots:
      write_cluster_plots(workdir, done, stats)
  return state, compiled


def train(config, workdir):
  """Trains (or resumes) in `workdir`; returns (model, final state, tokenizer)."""
  validate(config, jax.device_count())
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = create_mesh(config.mesh), rules_from_config(config)
  ckpt = Checkpointer(wd.path(workdir, wd.CHECKPOINT_DIR),
                      keep=config.train.keep_checkpoints, every=config.train.checkpoint_every)
  if ckpt.latest_step() is not None:
    # K_max may have grown during the run: build what the checkpoint holds.
    config.clustering.max_prototypes = ckpt.k_max()
  if is_main:
    wd.save_config(config, workdir)

  train_source = make_source(config.data, config.data.train_split)
  tokenizer = get_tokenizer(config, workdir, train_source)
  num_steps = config.train.num_steps
  tx, schedule = make_optimizer(config.optim, num_steps)
  teacher = load_teacher(config, workdir, mesh, rules) if _distill_teacher(config) else None
  build = lambda: _Compiled(config, tokenizer, tx, schedule, mesh, rules, teacher)   # noqa: E731
  compiled = build()

  data_iter = make_train_iterator(
      train_source, global_batch_size=config.train.batch_size, seed=config.data.seed,
      image_size=config.data.image_size, tokenizer=tokenizer,
      max_text_len=config.data.max_text_len, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.data.num_workers,
      negative_groups=caption_negative_groups(config.data.caption_negatives),
      prompt_labeler=labeler_from_config(config), tagger=tagger_from_config(config))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(compiled.shapes, data_iter)
    if is_main:
      print(f"Resumed from step {int(state.step)} in {workdir}", flush=True)
  else:
    state = init_state(compiled.model, tx, config, compiled.shardings)
  if is_main:
    print(_describe(mesh, state), flush=True)

  sharding = batch_sharding(mesh, rules)
  start = int(state.step)
  writer = MetricWriter(workdir, enabled=is_main, start_step=start)
  bar = tqdm(total=num_steps, initial=start, disable=not is_main, unit="step",
             dynamic_ncols=True)
  log_every = config.train.log_every
  window_start, window_steps = time.perf_counter(), 0
  in_flight = None
  for step in range(start, num_steps):
    state, metrics = compiled.step_fn(state, _global_batch(next(data_iter), sharding))
    # Keep one step in flight (the next batch loads while it computes) but
    # no more, so the progress bar and examples/s show real progress.
    if in_flight is not None:
      jax.block_until_ready(in_flight)
    in_flight = metrics["loss"]
    window_steps += 1
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      metrics = jax.device_get(metrics)
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {done}; lower config.optim.learning_rate.")
      elapsed = time.perf_counter() - window_start
      metrics["examples_per_sec"] = window_steps * config.train.batch_size / elapsed
      writer.write(done, metrics)
      bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{metrics['examples_per_sec']:.0f}")
      window_start, window_steps = time.perf_counter(), 0
    if compiled.cluster_fn is not None and done % config.clustering.cluster_every == 0:
      state, compiled = _cluster(state, compiled, config, workdir, done, writer, build)
      in_flight = None
    bar.update(1)
    ckpt.maybe_save(done, state, data_iter)
  bar.close()
  ckpt.maybe_save(num_steps, state, data_iter, force=True)
  ckpt.close()
  writer.close()
  return compiled.model, state, tokenizer
