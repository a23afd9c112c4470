"""Metrics to `metrics.jsonl` and TensorBoard event files (process 0 only)."""
import json
import os

from clusjax import workdir as wd


class MetricWriter:
  """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir, enabled=True, start_step=0):
    """`start_step`: the step training resumes from; lines logged after it by
    a run that died before its next checkpoint are dropped, as those steps
    are trained again."""
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # light: no TensorFlow needed
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      file = wd.path(workdir, wd.METRICS_FILE)
      if os.path.exists(file):
        kept = []
        with open(file) as f:
          for line in f:
            try:
              record = json.loads(line)
            except ValueError:   # the last line of a run killed while writing it
              continue
            if record["step"] <= start_step:
              kept.append(line if line.endswith("\n") else line + "\n")
        with open(file + ".partial", "w") as f:   # replaced whole: a kill here loses nothing
          f.writelines(kept)
        os.replace(file + ".partial", file)
      self._jsonl = open(file, "a")

  def write(self, step, scalars):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
