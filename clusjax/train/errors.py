"""Why a run stopped, when the reason is one the user can act on.

launch/main.py prints a `RunStopped` as its one-line message (no traceback) and
exits 1; the message names the step, what went wrong and what to do.
"""


class RunStopped(RuntimeError):
  """The run cannot go on (a checkpoint that cannot be written, too many
  non-finite steps in a row); what has been saved is consistent."""


class CheckpointError(RunStopped):
  """A checkpoint could not be written, or none could be read."""


class NonFiniteError(RunStopped, FloatingPointError):
  """config.train.max_skipped_steps consecutive steps had a non-finite loss or
  gradient norm, or the state about to be saved is not finite."""
