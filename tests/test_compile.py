"""launch/compile.py on a small TPU topology (libtpu's compile-only devices, no TPU):
the step fits and is reported; a batch too large for HBM exits 1 naming the overflow.

Needs libtpu (`pip install -e .[tpu]`, an optional extra); without it these tests are
skipped with that reason (`pytest -rs` prints it). Clus-Base on v5e:16x16 is a manual
run (README, "Compile for a TPU slice you do not have").
"""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, micro_flags, subprocess_env

pytest.importorskip("libtpu", reason="libtpu is not installed: `pip install -e .[tpu]`")


def _compile(tmp_path, *flags):
  env = subprocess_env(TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "compile.py"),
         "--config=" + os.path.join(ROOT, "configs", "clus_base.py") + ":tiny",
         "--topology=v5e:2x2", *micro_flags(tmp_path), *flags]
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_compile_reports_memory_flops_and_fit(tmp_path):
  run = _compile(tmp_path, "--config.scan_layers=True")
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  out = run.stdout
  assert "topology v5e:2x2 x 1 slice(s): 4 devices" in out
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in out
  assert "per-device memory: arguments" in out and "FLOPs per step:" in out
  assert "dilated attention: XLA (jnp) in this step" in out
  assert "fits: " in out and "of 16.00 GiB HBM" in out


def test_compile_exits_1_naming_the_overflow(tmp_path):
  # 256 px images in 8 px patches: each block's attention weights alone are
  # [1024, 2, 1025, 1025] float32 = 8 GiB per device at this batch.
  run = _compile(tmp_path, "--config.train.batch_size=4096", "--config.data.image_size=256",
                 "--config.clustering.queue_size=8192")
  assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
  assert "error: the step does not fit" in run.stderr, run.stderr[-2000:]
  assert "16.00 GiB" in run.stderr or "HBM" in run.stderr
