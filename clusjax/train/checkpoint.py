"""Orbax checkpoints of the train state and the data iterator's position.

All processes call `save`/`restore` (Orbax coordinates the multi-host write);
saves are asynchronous, and an interrupted save never becomes "latest"
(Orbax finalises a step directory only once it is complete).
"""
import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves `state` + the Grain iterator every N steps; restores the latest."""

  def __init__(self, directory, *, keep=1, every=1, read_only=False):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=not read_only,
            create=not read_only, read_only=read_only))

  def latest_step(self):
    return self.manager.latest_step()

  def maybe_save(self, step, state, data_iter, *, force=False):
    """Saves at multiples of `every` (or when forced); returns True if it saved.

    Beside the state it records the shapes that can change during a run
    ({"k_max": prototype columns}), so a restore builds the right target.
    """
    if not force and step % self.every:
      return False
    if self.manager.latest_step() == step:
      return False
    args = {"state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({"k_max": int(state.active.shape[0])})}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, abstract_state, data_iter=None, step=None):
    """Restores into `abstract_state`'s shardings; rewinds data_iter in place."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]

  def k_max(self, step=None):
    """K_max (prototype columns) of checkpoint `step` (default latest); None if none."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return int(meta["meta"]["k_max"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

