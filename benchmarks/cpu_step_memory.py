"""The CPU train step with JAX's defaults and with clusjax's CPU settings: time, page faults.

    python benchmarks/cpu_step_memory.py [--config=configs/clus_base.py:tiny] [--steps=10]
        [--warmup=2] [--config.train.batch_size=96 ...]

`launch/main.py` runs CPU steps inline and keeps freed memory in the process
(`clusjax.parallel.cpu`), so a step reuses the last one's temporaries instead of
page-faulting them back in. The two settings are per process (async dispatch is
fixed when the backend starts), so each runs in a child process of this script
on one fixed batch: the median step time after --warmup steps, the minor page
faults per step, and the ratios against the defaults, measured in the same run.
Both children compile the same executable and must end in the same state: the
script checks the state's checksums and stops if they differ.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from clusjax.cli import fail, parse_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "clus_base.py") + ":tiny",
    "Config file (path[:variant]).", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per setting.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per setting before timing.")
_CHILD = flags.DEFINE_enum("child", "", ["", "defaults", "clusjax"],
                           "Internal: run one setting in this process and print JSON.")
SETTINGS = ("defaults", "clusjax")


def measure(config, steps, warmup, setting):
  """{"seconds": [per timed step], "faults": [minor page faults per timed step],
  "checksums": the final state's} of the config's train step under `setting`."""
  import resource
  from clusjax.parallel import cpu
  if setting == "clusjax":
    cpu.run_inline()
  import jax
  from clusjax.parallel.mesh import batch_sharding
  from clusjax.train.aot import build_step
  from clusjax.train.checkpoint import integrity
  from clusjax.train.state import dummy_batch, init_state
  step = build_step(config, jax.devices())
  if setting == "clusjax" and not cpu.keep_freed_memory():   # after compiling, as train()
    fail("clusjax's CPU settings do not apply here (not a CPU backend on glibc).")
  state = init_state(step.model, step.tx, config, step.state_shardings)
  sharding = batch_sharding(step.mesh, step.rules)
  batch = {k: jax.device_put(v, sharding)
           for k, v in dummy_batch(config, config.train.batch_size).items()}
  seconds, faults = [], []
  for i in range(warmup + steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    state, metrics = step.executable(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      seconds.append(time.perf_counter() - start)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return {"seconds": seconds, "faults": faults, "checksums": integrity(state)[0]}


def main(argv):
  parse_flags(argv, {})
  if _STEPS.value < 1 or _WARMUP.value < 0:
    fail(f"--steps={_STEPS.value} must be >= 1 and --warmup={_WARMUP.value} >= 0.")
  if _CHILD.value:
    print("RESULT " + json.dumps(measure(_CONFIG.value, _STEPS.value, _WARMUP.value,
                                         _CHILD.value)), flush=True)
    return
  import jax
  results = {}
  for setting in SETTINGS:
    print(f"{setting}: compiling and running {_WARMUP.value} + {_STEPS.value} steps ...",
          flush=True)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={setting}"]
                         + argv[1:], capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
      fail(f"the {setting} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    results[setting] = json.loads(lines[-1][len("RESULT "):])
  if results["defaults"]["checksums"] != results["clusjax"]["checksums"]:
    fail("the two settings ended in different states: the checksums differ.")
  base = statistics.median(results["defaults"]["seconds"])
  print(f"\njax {jax.__version__}, {os.cpu_count()} CPUs; "
        f"batch {_CONFIG.value.train.batch_size}; the same final state (checksums equal)")
  print("\n| setting | step s | x time | page faults / step |")
  print("| --- | --- | --- | --- |")
  for setting in SETTINGS:
    r = results[setting]
    median = statistics.median(r["seconds"])
    print(f"| {setting} | {median:.3f} | {median / base:.2f} | "
          f"{statistics.median(r['faults']):,.0f} |")


if __name__ == "__main__":
  main(sys.argv)
