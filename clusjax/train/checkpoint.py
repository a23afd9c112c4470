"""Orbax checkpoints of the train state and the data iterator's position.

All processes call `save`/`restore` (Orbax coordinates the multi-host write);
saves are asynchronous, and an interrupted save never becomes "latest"
(Orbax finalises a step directory only once it is complete).

What Orbax does not do, done here:
- a checksum of every state array, saved in the checkpoint's metadata and
  checked on restore: Orbax reads a flipped bit in an array file back as a
  wrong value without complaint (measured with orbax-checkpoint 0.12.8);
- `restore_newest`: a newest checkpoint that cannot be read (truncated,
  missing or corrupted file, metadata that does not parse) falls back to the
  newest one that can, with a warning naming both;
- a save that fails in the background (disk full) stops the run at the next
  `check`, naming the step; the previous checkpoint stays as it was;
- a state that is not finite is never saved.
"""
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

from clusjax.train.errors import CheckpointError, NonFiniteError

_MIX = 0x9E3779B1   # odd (the golden ratio in 32 bits): a different weight per element


def _as_u32(x):
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x):
  """uint32 []: sum of each element's bits times (1 + its flat index * _MIX), mod 2**32.

  Integer sums wrap exactly in any order, so the value does not depend on the
  sharding (1 or 8 devices, any mesh); any change of one element changes it.
  """
  u = _as_u32(x)
  index, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for axis in reversed(range(x.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= x.shape[axis]
  return jnp.sum(u * (index * jnp.uint32(_MIX) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _integrity(tree):
  """(uint32 [leaves] checksums, bool []: every floating leaf finite)."""
  leaves = jax.tree.leaves(tree)
  finite = jnp.array(True)
  for x in leaves:
    if jnp.issubdtype(x.dtype, jnp.floating):
      finite &= jnp.all(jnp.isfinite(x))
  return jnp.stack([_checksum(x) for x in leaves]), finite


def _to_host(x):
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(x, tiled=True)


def integrity(tree):
  """(list of int checksums, one per leaf of `tree`, all floating leaves finite)."""
  sums, finite = _integrity(tree)
  return [int(s) for s in _to_host(sums)], bool(_to_host(finite))


def _reason(e):
  """One line on why a checkpoint could not be read."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text if len(text) <= 200 else text[:200] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _agree(ok):
  """True when `ok` on every process (all must restore the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
  """Saves `state` + the Grain iterator every N steps; restores the newest readable one."""

  def __init__(self, directory, *, keep=1, every=1, read_only=False):
    self.every = every
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=not read_only,
            create=not read_only, read_only=read_only))
    self._pending = None                      # step of a save not yet known to have finished
    self._complete = self.manager.latest_step()   # the newest step known to be complete

  def latest_step(self):
    """The newest step directory (None if none); `restore_newest` says whether it reads."""
    return self.manager.latest_step()

  def maybe_save(self, step, state, data_iter, *, force=False, meta=None):
    """Saves at multiples of `every` (or when forced); returns True if it saved.

    Beside the state it records the shapes that can change during a run
    ({"k_max": prototype columns}), a checksum per state array, and `meta`
    (JSON values). Raises NonFiniteError (nothing saved) when a floating
    array of `state` is not finite, CheckpointError when the save (or the one
    before it) fails.
    """
    if not force and step % self.every:
      return False
    if self.manager.latest_step() == step:
      return False
    self._finish_pending()
    checksums, finite = integrity(state)
    if not finite:
      raise NonFiniteError(
          f"step {step}: the train state is not finite, so it was not saved; the newest "
          f"checkpoint is step {self._complete} in {self.directory}. Lower "
          "config.optim.learning_rate (or look at the data near this step) and run again.")
    record = {**(meta or {}), "k_max": int(state.active.shape[0]), "checksums": checksums}
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(record)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:   # noqa: BLE001 - any failure to write (OSError ENOSPC, ...)
      raise self._save_error(step, e) from e
    if saved:
      self._pending = step
    return saved

  def _save_error(self, step, e):
    previous = (f"the previous checkpoint, step {self._complete}, is intact"
                if self._complete is not None else "there is no earlier checkpoint")
    return CheckpointError(
        f"saving checkpoint step {step} in {self.directory} failed ({_reason(e)}); {previous}. "
        "Free space on that disk (or point --workdir elsewhere) and run again to resume.")

  def _finish_pending(self):
    """Waits for the save in flight; raises CheckpointError if it failed."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:   # noqa: BLE001 - the background save's own error
      raise self._save_error(step, e) from e
    self._complete = step

  def check(self):
    """Raises CheckpointError if a background save has failed (does not wait for one
    still writing): the loop calls it every step, so a full disk stops the run at
    once rather than at the next checkpoint."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish_pending()

  def meta(self, step):
    """The metadata saved with checkpoint `step` (dict)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def k_max(self, step=None):
    """K_max (prototype columns) of checkpoint `step` (default latest); None if none."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    return int(self.meta(step)["k_max"])

  def restore(self, abstract_state, data_iter=None, step=None):
    """Restores checkpoint `step` (default the latest) into `abstract_state`'s
    shardings and checks it against its checksums; rewinds data_iter in place.
    Raises (FileNotFoundError, ValueError, ...) when it cannot be read."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    state, meta = restored["state"], restored["meta"]
    expected = meta.get("checksums")   # absent in checkpoints written before them
    if expected is not None:
      got, _ = integrity(state)
      paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
      if len(expected) != len(got):
        raise ValueError(f"{len(got)} arrays, but {len(expected)} checksums in its metadata")
      for path, want, have in zip(paths, expected, got):
        if want != have:
          raise ValueError(f"state{path} does not match the checksum saved with it")
    return state

  def restore_newest(self, restore_at, *, move_damaged=False, log=print):
    """`restore_at(step)` of the newest checkpoint it succeeds on: (step, its result).

    A checkpoint that fails (any exception: a truncated, missing or corrupted
    file, metadata that does not parse) is skipped with a warning naming it and
    the step used instead. `move_damaged` (training): the unreadable newer ones
    are moved to `<directory>.damaged/` so that the run can save those steps
    again. Raises CheckpointError when none can be read (never starts over).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failed = []
    for step in steps:
      try:
        result, ok = restore_at(step), True
      except Exception as e:   # noqa: BLE001 - every way a checkpoint can be unreadable
        result, ok = e, False
      if not _agree(ok):
        failed.append((step, result if not ok else RuntimeError("unreadable on another process")))
        continue
      if failed:
        moved = self._move(s for s, _ in failed) if move_damaged else {}
        for bad, e in failed:
          where = f" (moved to {moved[bad]})" if bad in moved else ""
          log(f"WARNING: checkpoint step {bad} in {self.directory} is unreadable ({_reason(e)})"
              f"{where}; using step {step} instead.")
      return step, result
    details = "; ".join(f"step {s}: {_reason(e)}" for s, e in failed)
    raise CheckpointError(
        f"no readable checkpoint in {self.directory} ({details}). Move that directory away "
        "to start from scratch, or restore it from a copy.")

  def _move(self, steps):
    """Moves step directories to <directory>.damaged/ (process 0); returns {step: new path}."""
    dest_root, moved = self.directory + ".damaged", {}
    for step in steps:
      src, dest = os.path.join(self.directory, str(step)), os.path.join(dest_root, str(step))
      n = 1
      while os.path.exists(dest):
        dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
      if jax.process_index() == 0 and os.path.exists(src):
        os.makedirs(dest_root, exist_ok=True)
        shutil.move(src, dest)
      moved[step] = dest
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpoint_move_damaged")
    self.manager.reload()
    self._complete = self.manager.latest_step()
    return moved

  def wait(self):
    self._finish_pending()

  def close(self):
    try:
      self._finish_pending()
    finally:
      self.manager.close()

  def close_quietly(self):
    """close() on a run that is already stopping for another error."""
    try:
      self.close()
    except Exception:   # noqa: BLE001 - the error being raised says more
      pass
