"""Compile the real train step for a TPU slice you do not have, on this CPU.

    pip install -e .[tpu]     # libtpu: compile-only TPU devices, no TPU needed
    python launch/compile.py --config=configs/clus_base.py --topology=v5e:16x16
    python launch/compile.py --config=configs/clus_base.py --topology=v5p:4x4x4 --num_slices=2

Builds the run's mesh over the topology's devices (`jax.experimental.
topologies`), lowers and compiles the same sharded train step that
`launch/main.py` runs, and prints per-device memory (arguments, outputs,
temporaries, total against the chip's HBM), FLOPs per step from the compiled
cost analysis, and the step time at the chip's peak (a lower bound). Exits 1
naming the overflow when the step does not fit in HBM (by the compiled
sizes, or when the TPU compiler itself runs out of HBM), 2 on bad flags.

The dilated-attention Pallas kernel is tried on the topology first; the
output says whether it lowers there or the step uses the XLA path, and why.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

# Make `clusjax` importable from a plain checkout too (no `pip install -e .`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clusjax.cli import fail, parse_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None,
                                "A TPU topology jax knows: v5e:16x16, v5p:4x4x4, v4:2x2x4, ...")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined by DCN.")


def topology_devices(topology, num_slices):
  """The compile-only TPU devices of `topology` (jax itself runs on the CPU)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  jax.config.update("jax_platforms", "cpu")
  from jax.experimental import topologies
  try:
    import libtpu  # noqa: F401
  except ImportError:
    fail("libtpu is not installed: `pip install -e .[tpu]` (an optional extra).")
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        num_slices=num_slices)
  except Exception as e:  # noqa: BLE001 - libtpu names the problem
    fail(f"--topology={topology!r} --num_slices={num_slices}: {str(e).splitlines()[0]}")
  return list(topo.devices)


def main(argv):
  parse_flags(argv, {"config": "configs/clus_base.py", "topology": "v5e:16x16"})
  config = _CONFIG.value
  from clusjax.config import ConfigError, validate
  try:
    validate(config)
  except ConfigError as e:
    fail(str(e))
  devices = topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
  if _NUM_SLICES.value > 1 and all(v == 1 for v in config.mesh.dcn.values()):
    config.mesh.dcn.data = _NUM_SLICES.value   # data parallel over DCN, as MaxText by default
  try:
    validate(config, len(devices))
  except ConfigError as e:
    fail(str(e))

  import jax
  from clusjax.parallel.hardware import chip_of
  from clusjax.train.aot import compile_step, fits, format_bytes, pallas_kernel_compiles
  kind = devices[0].device_kind
  print(f"topology {_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s): {len(devices)} devices "
        f"({kind})", flush=True)
  if config.longnet.depth:
    # implementation auto / pallas picks the kernel on GPU only: the step
    # compiled here runs the jnp (XLA) path whatever the kernel does on TPU.
    ok, why = pallas_kernel_compiles(devices[0], config)
    print("dilated attention: XLA (jnp) in this step (the Pallas kernel is used on GPU); "
          + ("the kernel also compiles for this TPU" if ok else
             f"the kernel does not compile for this TPU: {why}"), flush=True)
    config.longnet.implementation = "xla"

  try:
    cost = compile_step(config, devices)
  except jax.errors.JaxRuntimeError as e:   # XLA's allocator says what overflowed
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    fail(f"the step does not fit on {kind} ({_TOPOLOGY.value}): the compiler ran out of "
         f"memory: {str(e).strip().splitlines()[0]} Shard more (config.mesh, "
         "config.sharding.rules), lower config.train.batch_size or set config.remat=full.",
         code=1)
  print(f"mesh {cost.mesh_shape}; {cost.num_params / 1e6:.1f}M params; per device: params "
        f"{format_bytes(cost.params_bytes)}, optimizer state "
        f"{format_bytes(cost.opt_state_bytes)}; global batch {config.train.batch_size}, "
        f"dtype {config.dtype}; compiled in {cost.compile_seconds:.0f} s", flush=True)
  print(f"per-device memory: arguments {format_bytes(cost.argument_bytes)}, outputs "
        f"{format_bytes(cost.output_bytes)} ({format_bytes(cost.alias_bytes)} aliased with "
        f"arguments), temporaries {format_bytes(cost.temp_bytes)}, code "
        f"{format_bytes(cost.code_bytes)}; total {format_bytes(cost.total_bytes)}", flush=True)
  print(f"FLOPs per step: {cost.flops:.4g} per device, {cost.flops * len(devices):.4g} in all "
        "(compiled cost analysis)", flush=True)
  chip = chip_of(kind)
  if chip is None:
    print(f"no peak figures for device kind {kind!r} (clusjax/parallel/hardware.py): "
          "no HBM check or time bound", flush=True)
    return
  peak = chip.peak_flops(config.dtype)
  print(f"step time >= {cost.flops / peak * 1e3:.1f} ms at {chip.name}'s {config.dtype} peak "
        f"({peak / 1e12:.0f} TFLOP/s per chip)", flush=True)
  overflow = fits(cost, chip)
  if overflow:
    fail(overflow, code=1)
  print(f"fits: {format_bytes(cost.total_bytes)} of {format_bytes(chip.hbm_bytes)} HBM "
        f"({100 * cost.total_bytes / chip.hbm_bytes:.0f}%)", flush=True)


if __name__ == "__main__":
  main(sys.argv)
