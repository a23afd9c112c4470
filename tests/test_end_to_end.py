"""launch/main.py end to end: train + eval, load_pretrained, SIGKILL + resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import clusjax
from clusjax import workdir as wd
from clusjax.data.shapes import make_split
from tests.conftest import ROOT, micro_flags, subprocess_env

MAIN = [sys.executable, os.path.join(ROOT, "launch", "main.py"),
        "--config=" + os.path.join(ROOT, "configs", "clus_base.py:tiny")]


def test_train_eval_and_load_pretrained(shapes_data_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(MAIN + [f"--workdir={workdir}"] + micro_flags(shapes_data_dir),
                        capture_output=True, text=True, env=subprocess_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "retrieval/i2t_r1" in proc.stdout
  results = json.loads((workdir / wd.EVAL_RESULTS_FILE).read_text())
  for key in ("retrieval/i2t_r1", "retrieval/i2t_r5", "retrieval/i2t_r10",
              "retrieval/t2i_r1", "retrieval/t2i_r5", "retrieval/t2i_r10", "zeroshot/accuracy"):
    assert 0.0 <= results[key] <= 1.0
  assert results["retrieval/num_examples"] == 64
  assert (workdir / wd.TOKENIZER_FILE).exists()
  assert os.listdir(workdir / "tensorboard")
  lines = (workdir / wd.METRICS_FILE).read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]

  model = clusjax.load_pretrained(str(workdir))
  images = make_split("test", 8, 32)["images"]
  img = model.encode_image(images)
  txt = model.encode_text(["a small red circle on the left."] * 3)
  assert img.shape == (8, 16) and txt.shape == (3, 16)
  assert img.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
  # Eval mode on the saved workdir reproduces the numbers written at the end of training.
  proc = subprocess.run(MAIN + [f"--workdir={workdir}", "--mode=eval"] + micro_flags(shapes_data_dir),
                        capture_output=True, text=True, env=subprocess_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Loaded step 6 of {workdir}" in proc.stdout
  again = json.loads((workdir / wd.EVAL_RESULTS_FILE).read_text())
  for key, value in results.items():
    np.testing.assert_allclose(again[key], value, atol=1e-6)


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / wd.METRICS_FILE).read_text().splitlines()]


def _final_loss(workdir):
  last = [m for m in _metrics(workdir) if "loss" in m][-1]
  return last["step"], last["loss"]


def test_sigkill_then_rerun_resumes_exactly(shapes_data_dir, tmp_path):
  # Killed after its first checkpoint (step 10); the rerun goes through DBSCAN
  # clustering between steps (at 20 and 40, over a queue of 10 steps) to step 40.
  flags = micro_flags(shapes_data_dir, train__num_steps=40, train__checkpoint_every=10,
                      train__log_every=10, train__eval_at_end=False,
                      clustering__cluster_every=20, clustering__queue_size=320)
  full = tmp_path / "full"
  proc = subprocess.run(MAIN + [f"--workdir={full}"] + flags, capture_output=True, text=True,
                        env=subprocess_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  killed = tmp_path / "killed"
  run = subprocess.Popen(MAIN + [f"--workdir={killed}"] + flags, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=subprocess_env())
  first = killed / wd.CHECKPOINT_DIR / "10"
  deadline = time.time() + 300
  while not first.exists() and time.time() < deadline and run.poll() is None:
    time.sleep(0.02)
  assert run.poll() is None, "the run ended before it could be killed"
  run.send_signal(signal.SIGKILL)
  run.wait()
  step_at_kill, _ = _final_loss(killed)
  assert step_at_kill < 40

  proc = subprocess.run(MAIN + [f"--workdir={killed}"] + flags, capture_output=True, text=True,
                        env=subprocess_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step_full, loss_full = _final_loss(full)
  step_resumed, loss_resumed = _final_loss(killed)
  assert step_full == step_resumed == 40
  np.testing.assert_allclose(loss_resumed, loss_full, rtol=1e-5)
  # The clustering between steps was redone the same way after the kill.
  clustered = [[m for m in _metrics(w) if "clustering/num_clusters" in m] for w in (full, killed)]
  assert [m["step"] for m in clustered[0]] == [20, 40]
  assert clustered[1][-2:] == clustered[0]
