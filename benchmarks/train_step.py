"""The train step in float32 / bfloat16 and with / without remat: time, memory, FLOPs.

    nice -n 10 python benchmarks/train_step.py [--config=configs/clus_base.py:tiny]
        [--variants=float32:none,bfloat16:none,float32:full,bfloat16:full]
        [--steps=10] [--warmup=2] [--config.train.batch_size=96 ...]

Each variant (config.dtype:config.remat, remat any value `config.remat` takes)
compiles the real train step (`clusjax.train.aot.build_step`, the run's mesh
over the devices at hand) and reports:
  * step time: median of --steps calls on one fixed batch after --warmup calls
    (the step's cost does not depend on the batch's values: zeros, full-length
    captions);
  * per-device memory of the compiled step (`memory_analysis`): arguments,
    outputs, temporaries;
  * FLOPs per step from the compiled cost analysis, and from them examples/s,
    TFLOP/s per device and MFU (against the dtype's peak where
    `clusjax.parallel.hardware` knows the device; "-" elsewhere);
and ratios against float32:none, which is always measured first in the same run.
Prints a Markdown table for benchmarks/RESULTS.md.
"""
import datetime
import os
import platform
import statistics
import sys
import time

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from clusjax.cli import fail, parse_flags  # noqa: E402

BASELINE = "float32:none"
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "clus_base.py") + ":tiny",
    "Config file (path[:variant]).", lock_config=False)
_VARIANTS = flags.DEFINE_list("variants", "float32:none,bfloat16:none,float32:full,bfloat16:full",
                              "config.dtype:config.remat pairs; float32:none is added first.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant (median).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant before timing.")


def parse_variants(values):
  """["dtype:remat", ...] -> [(dtype, remat)] with the baseline first; exits naming a bad one."""
  from clusjax.config import DTYPES, REMAT_POLICIES
  variants = [tuple(BASELINE.split(":"))]
  for value in values:
    dtype, _, remat = value.partition(":")
    if dtype not in DTYPES or remat not in REMAT_POLICIES:
      fail(f"--variants: {value!r} must be dtype:remat with dtype in {', '.join(DTYPES)} and "
           f"remat in {', '.join(REMAT_POLICIES)}.")
    if (dtype, remat) not in variants:
      variants.append((dtype, remat))
  return variants


def measure(config, steps, warmup):
  """(StepCost, median seconds per step) of the config's train step."""
  import jax
  from clusjax.parallel.mesh import batch_sharding
  from clusjax.train.aot import build_step, step_cost
  from clusjax.train.state import dummy_batch, init_state
  step = build_step(config, jax.devices())
  state = init_state(step.model, step.tx, config, step.state_shardings)
  sharding = batch_sharding(step.mesh, step.rules)
  batch = {k: jax.device_put(v, sharding)
           for k, v in dummy_batch(config, config.train.batch_size).items()}
  seconds = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step.executable(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      seconds.append(time.perf_counter() - start)
  return step_cost(step), statistics.median(seconds)


def main(argv):
  parse_flags(argv, {})
  if _STEPS.value < 1 or _WARMUP.value < 0:
    fail(f"--steps={_STEPS.value} must be >= 1 and --warmup={_WARMUP.value} >= 0.")
  variants = parse_variants(_VARIANTS.value)
  config = _CONFIG.value
  from clusjax.config import ConfigError, validate
  try:
    validate(config)
  except ConfigError as e:
    fail(str(e))

  import jax
  from clusjax.train.loop import throughput
  mib = 2.0 ** 20
  print(f"{datetime.date.today()}: jax {jax.__version__}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} CPUs); "
        f"batch {config.train.batch_size}, image {config.data.image_size}, median of "
        f"{_STEPS.value} steps after {_WARMUP.value}", flush=True)
  kind = jax.devices()[0].device_kind
  rows = []
  for dtype, remat in variants:
    c = config.copy_and_resolve_references()
    c.dtype, c.remat = dtype, remat
    cost, seconds = measure(c, _STEPS.value, _WARMUP.value)
    rate = throughput(cost.flops, 1, seconds, config.train.batch_size, kind, dtype)
    rows.append((dtype, remat, cost, seconds, rate))
    # Each variant's figures as soon as it is measured (a long run cut short keeps them).
    print(f"  {dtype}:{remat}: {seconds:.3f} s/step, compiled in {cost.compile_seconds:.0f} s, "
          f"{cost.flops / 1e9:.1f} GFLOP, {rate['tflops_per_device']:.2f} TFLOP/s"
          + (f", MFU {rate['mfu']:.1%}" if "mfu" in rate else ""), flush=True)

  _, _, base, base_seconds, _ = rows[0]
  print("\n| dtype | remat | step s | x time | compile s | args MiB | outputs MiB | temps MiB "
        "| x temps | GFLOP | x FLOPs | examples/s | TFLOP/s | MFU |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for dtype, remat, cost, seconds, rate in rows:
    mfu = f"{rate['mfu']:.1%}" if "mfu" in rate else "-"
    print(f"| {dtype} | {remat} | {seconds:.3f} | {seconds / base_seconds:.2f} | "
          f"{cost.compile_seconds:.0f} | {cost.argument_bytes / mib:.1f} | "
          f"{cost.output_bytes / mib:.1f} | {cost.temp_bytes / mib:.1f} | "
          f"{cost.temp_bytes / base.temp_bytes:.2f} | {cost.flops / 1e9:.1f} | "
          f"{cost.flops / base.flops:.2f} | {rate['examples_per_sec']:.1f} | "
          f"{rate['tflops_per_device']:.2f} | {mfu} |")


if __name__ == "__main__":
  main(sys.argv)
