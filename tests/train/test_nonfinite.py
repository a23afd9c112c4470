"""Non-finite steps are never applied: the compiled step keeps the state, the loop
counts and stops, the clustering step checks its inputs the same way."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax import workdir as wd
from clusjax.config import train_stages
from clusjax.data import Tokenizer, make_source, make_train_iterator
from clusjax.data.prompts import labeler_from_config
from clusjax.models.clus import build_model
from clusjax.parallel.mesh import batch_sharding, create_mesh, rules_from_config
from clusjax.train.checkpoint import Checkpointer
from clusjax.train.errors import NonFiniteError
from clusjax.train.loop import _Skips, compile_train_step, stage_batches, train
from clusjax.train.optimizer import make_optimizer
from clusjax.train.restore import load_tokenizer, restore_checkpoint
from clusjax.train.state import TrainState, abstract_state, init_state
from clusjax.train.step import make_cluster_step
from tests.conftest import micro_config
from tests.train.conftest import POISONED_STEP, poison, poisoned_config


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_identical(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def batch_and_tokenizer(shapes_data_dir, tmp_path_factory):
  config = micro_config(shapes_data_dir)
  source = make_source(config.data, "train")
  tokenizer = Tokenizer.train([source[i]["caption"] for i in range(len(source))],
                              str(tmp_path_factory.mktemp("tok") / "t.model"),
                              config.data.vocab_size)
  it = make_train_iterator(source, global_batch_size=config.train.batch_size, seed=0,
                           image_size=config.data.image_size, tokenizer=tokenizer,
                           max_text_len=config.data.max_text_len,
                           prompt_labeler=labeler_from_config(config))
  return next(it), tokenizer


def _poison_second(batch, step):   # step 2 (state.step 1): images all inf
  images = batch["image"].astype(jnp.float32)
  return {**batch, "image": jnp.where(step == 1, jnp.inf, images)}


@pytest.mark.parametrize("devices,accum", [
    (1, 1), pytest.param(8, 1, marks=pytest.mark.slow), (8, 2)])
def test_nonfinite_step_leaves_the_state_bit_identical(shapes_data_dir, batch_and_tokenizer,
                                                        devices, accum):
  """Step 2 sees inf images: its loss is NaN, and params, optimizer state,
  prototypes and queue come out bit-identical; step 3 trains again."""
  batch, tokenizer = batch_and_tokenizer
  config = micro_config(shapes_data_dir, grad_accum_steps=accum)
  mesh = (create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]) if devices == 1
          else create_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  rules = rules_from_config(config)
  model = build_model(config, tokenizer.vocab_size)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  shapes, shardings = abstract_state(model, tx, config, mesh, rules)
  step = compile_train_step(model, tx, schedule, config, tokenizer, mesh, rules, shapes,
                            shardings, batch_transform=_poison_second)
  batch = {k: jax.device_put(v, batch_sharding(mesh, rules)) for k, v in batch.items()}

  state, m1 = step(init_state(model, tx, config, shardings), batch)
  before = _host(state)   # the step donates its input
  state, m2 = step(state, batch)
  after = _host(state)
  m1, m2 = jax.device_get((m1, m2))
  assert int(m1["skipped"]) == 0 and np.isfinite(m1["loss"])
  assert int(m2["skipped"]) == 1 and not np.isfinite(m2["loss"])
  assert int(after.step) == int(before.step) + 1 == 2
  for field in ("params", "opt_state", "queue", "active", "rng"):
    _assert_identical(getattr(after, field), getattr(before, field))
  assert jax.tree.leaves(state.params)[0].sharding == jax.tree.leaves(shardings.params)[0]

  state, m3 = step(state, batch)
  assert int(jax.device_get(m3["skipped"])) == 0
  third = _host(state.params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(third))
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(third),
                                                       jax.tree.leaves(after.params)))


def _metrics(workdir):
  """{step: its metrics} (a clustering step's line merged with the step's)."""
  out = {}
  with open(wd.path(workdir, wd.METRICS_FILE)) as f:
    for m in map(json.loads, f):
      out.setdefault(m["step"], {}).update(m)
  return out


def _skip_batch_at(workdir, config, step):
  """Checkpoint `step` of `workdir` made from checkpoint `step - 1`: the step counter
  and the data iterator one step on, the rest as it was (a run that skipped
  that step's batch), written with Checkpointer itself rather than the loop."""
  tokenizer = load_tokenizer(str(workdir))
  data = stage_batches(train_stages(config)[0], config, str(workdir),
                       make_source(config.data, config.data.train_split), tokenizer, None)
  model = build_model(config, tokenizer.vocab_size)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  shapes, _ = abstract_state(model, tx, config, create_mesh(config.mesh), rules_from_config(config))
  ckpt = Checkpointer(str(workdir / wd.CHECKPOINT_DIR), keep=10)
  state = ckpt.restore(shapes, data, step=step - 1)
  next(data)
  ckpt.maybe_save(step, state.replace(step=state.step + 1), data, force=True)
  ckpt.close()


def test_skipped_step_checkpoint_equals_a_run_without_that_batch(poisoned_run, tmp_path):
  """Step 7 non-finite, checkpoints every 2 steps: the step-8 checkpoint is finite and
  bit-identical to that of a run that skipped step 7's batch; skipped_steps is 1."""
  config, workdir, state = poisoned_run
  metrics = _metrics(workdir)
  assert [metrics[s]["skipped_steps"] for s in range(1, 9)] == [0] * 6 + [1, 1]
  assert not np.isfinite(metrics[POISONED_STEP]["loss"])
  assert all(np.isfinite(metrics[s]["loss"]) for s in range(1, 9) if s != POISONED_STEP)
  assert "clustering/skipped" in metrics[8] and metrics[8]["clustering/skipped"] == 0
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  step, _, params, _, _, _ = restore_checkpoint(str(workdir), mesh)
  assert step == 8
  params = _host(params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  meta = Checkpointer(str(workdir / wd.CHECKPOINT_DIR), read_only=True).meta(8)
  assert meta["skipped_steps"] == 1

  reference = tmp_path / "skipped_batch"
  shutil.copytree(workdir, reference)
  shutil.rmtree(reference / wd.CHECKPOINT_DIR / "8")
  _skip_batch_at(reference, config, POISONED_STEP)
  # Same executable as the poisoned run (the hook only acts at step 7, before the resume).
  _, ref_state, _ = train(config.copy_and_resolve_references(), str(reference),
                          batch_transform=poison)
  _assert_identical(_host(ref_state.params), params)
  _assert_identical(_host(ref_state.params), _host(state.params))
  _assert_identical(_host(ref_state.opt_state), _host(state.opt_state))


def test_too_many_skips_in_a_row_stop_the_run(poisoned_run, tmp_path):
  """max_skipped_steps=1: the non-finite step 7 stops the run with a one-line error
  naming it; the newest checkpoint (step 6) is whole and finite."""
  source_config, source, _ = poisoned_run
  config = poisoned_config(source_config.data.data_dir, train__max_skipped_steps=1)
  workdir = tmp_path / "run"
  workdir.mkdir()
  shutil.copytree(source / wd.CHECKPOINT_DIR, workdir / wd.CHECKPOINT_DIR)
  shutil.copyfile(source / wd.TOKENIZER_FILE, workdir / wd.TOKENIZER_FILE)
  for step in (6, 8):   # resume at step 4: steps 5, 6 train again, then 7
    shutil.rmtree(workdir / wd.CHECKPOINT_DIR / str(step))
  with pytest.raises(NonFiniteError) as e:
    train(config, str(workdir), batch_transform=poison)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("step 7: non-finite loss or gradient norm in 1 step in a row "
                            "(step 7), not applied"), message
  assert "config.train.max_skipped_steps=1" in message and "step 6" in message
  ckpt = Checkpointer(str(workdir / wd.CHECKPOINT_DIR), read_only=True)
  assert ckpt.latest_step() == 6
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  _, _, params, _, _, _ = restore_checkpoint(str(workdir), mesh)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_skips_count_in_a_row_and_in_all():
  skips = _Skips(limit=2, total=3)
  flags = [0, 1, 0, 1, 1]
  stops = [skips.record(i + 1, np.int32(f)) for i, f in enumerate(flags)]
  assert stops == [False, False, False, False, True]
  assert skips.total == 6 and skips.in_a_row == 2


def test_cluster_step_keeps_the_state_when_its_inputs_are_not_finite(shapes_data_dir):
  config = micro_config(shapes_data_dir, clustering__queue_size=64,
                        clustering__num_prototypes=4, clustering__max_prototypes=8,
                        clustering__min_samples=2, train__batch_size=16)
  d = config.model.embed_dim
  rng = np.random.default_rng(0)
  queue = rng.normal(size=(64, d)).astype(np.float32)
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  z = rng.normal(size=(d, 8)).astype(np.float32)
  z /= np.linalg.norm(z, axis=0, keepdims=True)
  state = TrainState(step=jnp.int32(2), params={"prototypes": jnp.asarray(z)},
                     opt_state={"mu": {"prototypes": jnp.ones((d, 8))}},
                     rng=jnp.zeros(2, jnp.uint32), active=jnp.arange(8) < 4,
                     queue=jnp.asarray(queue))
  cluster = jax.jit(make_cluster_step(config))
  new, stats = jax.device_get(cluster(state))
  assert not stats["skipped"] and not np.array_equal(new.params["prototypes"], z)
  assert np.all(new.opt_state["mu"]["prototypes"] == 0)

  bad = state.replace(queue=state.queue.at[3, 0].set(jnp.nan))
  kept, stats = jax.device_get(cluster(bad))
  assert stats["skipped"] and int(stats["num_clusters"]) == 4
  _assert_identical(kept, jax.device_get(bad))
  # Rows past the filled part (step 2 wrote 64 rows) may hold anything: not read.
  ok = state.replace(step=jnp.int32(1), queue=state.queue.at[40].set(jnp.nan))
  assert not jax.device_get(cluster(ok)[1]["skipped"])
