"""Multi-host: launch/local_cluster.py runs launch/main.py as 2 processes x 4 CPU devices.

The job trains like one process with 8 devices and resumes from its
checkpoint; killing one process stops the other within --peer_timeout.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from clusjax import workdir as wd
from clusjax.parallel import distributed
from clusjax.train.loop import train
from tests.conftest import ROOT, micro_config, micro_flags, subprocess_env

CLUSTER = [sys.executable, os.path.join(ROOT, "launch", "local_cluster.py")]
CONFIG = "--config=" + os.path.join(ROOT, "configs", "clus_base.py:tiny")
GRACE_S = 15   # launch/local_cluster.py's margin beyond --peer_timeout


def _losses(workdir):
  with open(wd.path(workdir, wd.METRICS_FILE)) as f:
    return {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}


def _run_cluster(workdir, flags):
  proc = subprocess.run(CLUSTER + ["2", "--", CONFIG, f"--workdir={workdir}"] + flags,
                        capture_output=True, text=True, env=subprocess_env(), timeout=1200)
  assert proc.returncode == 0, proc.stdout[-5000:]
  return proc.stdout


@pytest.mark.slow
def test_two_processes_train_as_one_with_8_devices_and_resume(shapes_data_dir, tmp_path):
  two = tmp_path / "two"
  out = _run_cluster(two, micro_flags(shapes_data_dir, train__eval_at_end=False))
  assert "[p0] Joined 2 processes: 8 devices, 4 per process." in out
  steps = sorted(int(p.name) for p in (two / wd.CHECKPOINT_DIR).iterdir() if p.name.isdigit())
  assert steps == [3, 6]
  # Process 0 alone logs: one line per step.
  assert sorted(_losses(two)) == [1, 2, 3, 4, 5, 6]

  one = tmp_path / "one"   # this process: 8 devices (tests/conftest.py)
  train(micro_config(shapes_data_dir), str(one))
  two_losses, one_losses = _losses(two), _losses(one)
  for step in range(1, 7):
    np.testing.assert_allclose(two_losses[step], one_losses[step], rtol=1e-5)

  # A job that died after its step-3 checkpoint, run again: it resumes there
  # and ends where the uninterrupted job did; then every process evaluates.
  shutil.rmtree(two / wd.CHECKPOINT_DIR / "6")
  out = _run_cluster(two, micro_flags(shapes_data_dir))
  assert "[p0] Resumed from step 3" in out
  resumed = _losses(two)
  assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    np.testing.assert_allclose(resumed[step], two_losses[step], rtol=1e-6)
  results = json.loads((two / wd.EVAL_RESULTS_FILE).read_text())
  assert results["retrieval/num_examples"] == 64
  assert "[p0]   retrieval/i2t_r1" in out and "[p1]   retrieval" not in out


@pytest.mark.parametrize("when", ["joined", pytest.param("training", marks=pytest.mark.slow)])
def test_killing_one_process_stops_the_other_within_the_timeout(shapes_data_dir, tmp_path, when):
  """SIGKILL to process 1 once the job is joined (process 0 then prepares data
  and compiles) or while it trains (process 0 waits for it in the step's
  collectives): jax aborts process 0 once --peer_timeout passes (the launcher
  need not kill it), and local_cluster.py exits non-zero naming process 1."""
  timeout = 10
  workdir = tmp_path / "run"
  # ITC alone compiles fastest; the run would take hours.
  flags = micro_flags(shapes_data_dir, train__num_steps=100_000, train__checkpoint_every=100_000,
                      train__eval_at_end=False, loss__itm_weight=0.0, loss__mlm_weight=0.0,
                      loss__swap_weight=0.0, loss__prompt_weight=0.0,
                      loss__noun_code_weight=0.0, loss__noun_code_text_weight=0.0,
                      clustering__enabled=False)
  proc = subprocess.Popen(
      CLUSTER + ["2", f"--peer_timeout={timeout}", "--", CONFIG, f"--workdir={workdir}"] + flags,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()
  metrics = workdir / wd.METRICS_FILE
  ready = {"joined": lambda: any(line.startswith("[p0] Joined") for line in lines),
           "training": lambda: metrics.exists() and metrics.read_text()}[when]
  try:
    deadline = time.monotonic() + 600
    while not ready():
      assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-5000:]
      time.sleep(0.1)
    pid = int(re.search(r"process 1: pid (\d+)", "".join(lines)).group(1))
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code = proc.wait(timeout=timeout + GRACE_S + 60)
    elapsed = time.monotonic() - killed
  finally:
    if proc.poll() is None:
      proc.kill()
  reader.join()
  out = "".join(lines)
  assert code != 0
  assert "[local_cluster] process 1 failed (killed by SIGKILL)" in out
  assert "killing it" not in out, out[-5000:]   # jax stopped process 0 by itself
  assert "Terminating process because the JAX distributed service detected fatal errors" in out
  assert elapsed < timeout + GRACE_S, elapsed
  print(f"local_cluster.py exited {elapsed:.1f} s after process 1 was killed ({when})")


def test_launcher_prefixes_output_and_fails_when_a_process_fails():
  proc = subprocess.run(CLUSTER + ["2", "--", "--no_such_flag"], capture_output=True, text=True,
                        env=subprocess_env(), timeout=120)
  assert proc.returncode == 1
  for i in (0, 1):
    assert f"[p{i}] error: Unknown command line flag 'no_such_flag'" in proc.stdout
  assert re.search(r"\[local_cluster\] failed: process [01] failed first", proc.stdout)
  bad = subprocess.run(CLUSTER + ["0"], capture_output=True, text=True, env=subprocess_env(),
                       timeout=60)
  assert bad.returncode == 2 and "N=0 must be >= 1" in bad.stderr


def test_distributed_modes_and_bad_flags(monkeypatch):
  for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.detected_process_count() == 0
  assert not distributed.initialize("auto")   # no cluster here: runs alone
  assert not distributed.initialize("off")
  # jax's detection of a SLURM job (a private jax API: this pins it).
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  for var, value in slurm.items():
    monkeypatch.setenv(var, value)
  assert distributed.detected_process_count() == 1
  assert not distributed.initialize("auto")   # a one-task job runs alone
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.detected_process_count() == 4
  for kwargs, message in [
      (dict(mode="sometimes"), "--distributed='sometimes' is not one of auto, on, off"),
      (dict(mode="off", num_processes=2), "--distributed=off .* --num_processes=2"),
      (dict(coordinator_address="10.0.0.1"), "--coordinator_address='10.0.0.1' must be HOST:PORT"),
      (dict(num_processes=0), "--num_processes=0 must be >= 1"),
      (dict(num_processes=2, process_id=2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
      (dict(timeout=0), "--peer_timeout=0 must be >= 1")]:
    with pytest.raises(ValueError, match=message):
      distributed.initialize(**kwargs)
