"""Damaged checkpoints: resume falls back to the newest readable one with a warning;
a save that fails (disk full) stops the run and keeps the previous checkpoint."""
import errno
import os
import shutil

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax import workdir as wd
from clusjax.parallel.mesh import create_mesh
from clusjax.train.checkpoint import Checkpointer, integrity
from clusjax.train.errors import CheckpointError, NonFiniteError
from clusjax.train.loop import train
from tests.train.conftest import poison


@flax.struct.dataclass
class _State:
  w: jax.Array
  active: jax.Array


def _state(step):
  w = np.random.default_rng(step).normal(size=(128, 128)).astype(np.float32)
  return _State(w=jnp.asarray(w), active=jnp.ones(4, bool))


_TARGET = _State(w=jax.ShapeDtypeStruct((128, 128), jnp.float32),
                 active=jax.ShapeDtypeStruct((4,), bool))


def _iterator():
  return iter(grain.MapDataset.source(list(range(100))).to_iter_dataset())


@pytest.fixture
def three_checkpoints(tmp_path):
  """Checkpoints 1, 2, 3 of `_state(step)`, the iterator `step` items on."""
  directory = tmp_path / "ckpt"
  ckpt = Checkpointer(str(directory), keep=5)
  it = _iterator()
  for step in (1, 2, 3):
    next(it)
    ckpt.maybe_save(step, _state(step), it)
  ckpt.close()
  return directory


def _largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_bit(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


def _damage(step_dir, how):
  if how == "truncated":
    path = _largest_file(step_dir / "state")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif how == "missing_file":
    os.remove(step_dir / "data" / "process_0-of-1.json")
  elif how == "flipped_bit":   # read back without error by Orbax: only the checksum sees it
    _flip_bit(_largest_file(step_dir / "state"))
  elif how == "flipped_bits":   # one bit in every array data file (not all of them are read)
    for root, _, files in os.walk(step_dir / "state"):
      for f in files if os.path.basename(root) == "d" else ():
        _flip_bit(os.path.join(root, f))
  elif how == "metadata_not_json":
    (step_dir / "meta" / "metadata").write_text('{"k_max": 4, "checks')
  elif how == "state_metadata_not_json":
    (step_dir / "state" / "_METADATA").write_text("not json")


def _restore_at(ckpt, it):
  return lambda step: ckpt.restore(_TARGET, it, step=step)


@pytest.mark.parametrize("how", ["truncated", "missing_file", "flipped_bit", "metadata_not_json",
                                 "state_metadata_not_json"])
def test_damaged_latest_falls_back_to_the_previous_checkpoint(three_checkpoints, how):
  _damage(three_checkpoints / "3", how)
  ckpt = Checkpointer(str(three_checkpoints), keep=5)
  it, messages = _iterator(), []
  step, state = ckpt.restore_newest(_restore_at(ckpt, it), move_damaged=True,
                                    log=messages.append)
  assert step == 2
  np.testing.assert_array_equal(state.w, _state(2).w)
  assert next(it) == 2   # the data position of checkpoint 2
  assert len(messages) == 1, messages
  assert "checkpoint step 3" in messages[0] and "using step 2 instead" in messages[0]
  assert str(three_checkpoints) in messages[0]
  if how == "flipped_bit":
    assert "does not match the checksum saved with it" in messages[0]
  # Moved aside, so that the run can write step 3 again.
  moved = str(three_checkpoints) + ".damaged"
  assert os.listdir(moved) == ["3"] and f"moved to {moved}/3" in messages[0]
  assert ckpt.latest_step() == 2
  assert ckpt.maybe_save(3, _state(3), it)
  ckpt.close()


def test_read_only_fallback_moves_nothing(three_checkpoints):
  _damage(three_checkpoints / "3", "truncated")
  ckpt = Checkpointer(str(three_checkpoints), read_only=True)
  messages = []
  step, _ = ckpt.restore_newest(_restore_at(ckpt, None), log=messages.append)
  assert step == 2 and "moved" not in messages[0]
  assert sorted(os.listdir(three_checkpoints)) == ["1", "2", "3"]


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(three_checkpoints):
  for step in (1, 2, 3):
    _damage(three_checkpoints / str(step), "metadata_not_json")
  ckpt = Checkpointer(str(three_checkpoints), keep=5)
  with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*step 3: .*step 1: "):
    ckpt.restore_newest(lambda s: (ckpt.meta(s), ckpt.restore(_TARGET, step=s)),
                        move_damaged=True)
  assert sorted(os.listdir(three_checkpoints)) == ["1", "2", "3"]   # nothing moved


def test_disk_full_while_saving_stops_and_keeps_the_previous_checkpoint(three_checkpoints,
                                                                         monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  async def disk_full(self, item, directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))

  ckpt = Checkpointer(str(three_checkpoints), keep=1)
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  with pytest.raises(CheckpointError) as e:
    ckpt.maybe_save(4, _state(4), None)
    ckpt.wait()
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"saving checkpoint step 4 in {three_checkpoints} failed (OSError:")
  assert "No space left on device" in message and "step 3, is intact" in message
  ckpt.close_quietly()
  monkeypatch.undo()
  again = Checkpointer(str(three_checkpoints), read_only=True)
  assert again.latest_step() == 3
  np.testing.assert_array_equal(again.restore(_TARGET).w, _state(3).w)


def test_a_state_that_is_not_finite_is_never_saved(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.maybe_save(1, _state(1), None)
  bad = _state(2).replace(w=_state(2).w.at[5, 7].set(jnp.inf))
  with pytest.raises(NonFiniteError, match="step 2: the train state is not finite.*step 1"):
    ckpt.maybe_save(2, bad, None)
  ckpt.close()
  assert os.listdir(tmp_path / "ckpt") == ["1"]


def test_checksums_do_not_depend_on_the_sharding():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32))
  mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")))
  tree = {"x": x, "b": jnp.arange(6) < 3, "h": x.astype(jnp.bfloat16), "i": jnp.int32(7)}
  sums, finite = integrity(tree)
  assert finite and integrity({**tree, "x": sharded})[0] == sums
  assert integrity({**tree, "x": x.at[3, 4].add(1e-6)})[0] != sums
  assert integrity({**tree, "x": x.T.T.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])})[0] != sums
  assert not integrity({**tree, "h": tree["h"].at[0, 0].set(jnp.nan)})[1]


def test_training_resumes_from_the_newest_readable_checkpoint(poisoned_run, tmp_path, capsys):
  """The step-8 checkpoint of the poisoned run corrupted: training resumes from step 6
  with a warning naming both and ends bit-identical; load_pretrained says which step."""
  import clusjax
  config, source, state = poisoned_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  _damage(workdir / wd.CHECKPOINT_DIR / "8", "flipped_bits")

  model = clusjax.load_pretrained(str(workdir))
  out = capsys.readouterr().out
  assert "checkpoint step 8" in out and "using step 6 instead" in out, out
  assert f"Loaded step 6 of {workdir}" in out
  assert os.path.isdir(workdir / wd.CHECKPOINT_DIR / "8")   # read-only: left where it is
  assert model.params["prototypes"].shape == state.params["prototypes"].shape

  _, resumed, _ = train(config.copy_and_resolve_references(), str(workdir),
                        batch_transform=poison)
  out = capsys.readouterr().out
  assert "checkpoint step 8" in out and "using step 6 instead" in out, out
  assert "Resumed from step 6" in out
  assert os.listdir(str(workdir / wd.CHECKPOINT_DIR) + ".damaged") == ["8"]
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)),
                  jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)


def test_disk_full_stops_training_with_one_line(poisoned_run, tmp_path, monkeypatch):
  """Resumed at step 4, the step-6 save fails (injected ENOSPC): the run stops naming
  step 6, and step 4 is still the newest checkpoint, whole."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  config, source, _ = poisoned_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  for step in (6, 8):
    shutil.rmtree(workdir / wd.CHECKPOINT_DIR / str(step))

  async def disk_full(self, item, directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  with pytest.raises(CheckpointError) as e:
    train(config.copy_and_resolve_references(), str(workdir), batch_transform=poison)
  message = str(e.value)
  assert "\n" not in message and message.startswith("saving checkpoint step 6 in ")
  assert "No space left on device" in message and "step 4, is intact" in message
  monkeypatch.undo()
  ckpt = Checkpointer(str(workdir / wd.CHECKPOINT_DIR), read_only=True)
  assert ckpt.latest_step() == 4 and ckpt.meta(4)["k_max"] > 0
  ckpt.close()
