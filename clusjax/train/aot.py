"""The train step compiled ahead of time for any devices: its memory and FLOPs.

`launch/compile.py` uses it with libtpu's compile-only TPU devices to check a
pod-slice config on a CPU machine before the slice is booked; on the devices
at hand it gives the same figures for the real run.
"""
import dataclasses
import os
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clusjax.models.clus import build_model
from clusjax.parallel.mesh import create_mesh, per_device_bytes, rules_from_config
from clusjax.train.loop import compile_train_step, compiled_flops
from clusjax.train.optimizer import make_optimizer
from clusjax.train.state import abstract_state


class _Vocab:
  """Stands in for the trained tokenizer: the step needs only the special ids
  and the vocabulary size (config.data.vocab_size, its upper bound)."""
  pad_id, cls_id, sep_id, mask_id = 0, 1, 2, 3

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Per-device figures of one compiled train step."""
  mesh_shape: dict
  num_params: int
  params_bytes: int          # this device's shard of the parameters
  opt_state_bytes: int       # ... and of the optimizer state
  argument_bytes: int
  output_bytes: int
  alias_bytes: int           # outputs that reuse argument buffers (the donated state)
  temp_bytes: int
  code_bytes: int
  flops: float               # per device, from the compiled cost analysis
  compile_seconds: float

  @property
  def total_bytes(self):
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The run's train step compiled over a mesh, and what running it needs."""
  model: Any
  tx: Any
  mesh: Mesh
  rules: Any
  state_shapes: Any          # ShapeDtypeStructs of the TrainState, with their shardings
  state_shardings: Any
  executable: Any            # (state, batch) -> (state, metrics); donates the state
  compile_seconds: float


def build_step(config, devices):
  """Compiles the run's train step over `devices` (config.mesh) -> CompiledStep."""
  mesh, rules = create_mesh(config.mesh, devices), rules_from_config(config)
  model = build_model(config, config.data.vocab_size)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  shapes, shardings = abstract_state(model, tx, config, mesh, rules)
  start = time.perf_counter()
  executable = compile_train_step(model, tx, schedule, config, _Vocab(config.data.vocab_size),
                                  mesh, rules, shapes, shardings)
  return CompiledStep(model, tx, mesh, rules, shapes, shardings, executable,
                      time.perf_counter() - start)


def step_cost(step):
  """A CompiledStep's per-device memory and FLOPs -> StepCost."""
  mem, shapes = step.executable.memory_analysis(), step.state_shapes
  return StepCost(
      mesh_shape=dict(step.mesh.shape),
      num_params=sum(x.size for x in jax.tree.leaves(shapes.params)),
      params_bytes=per_device_bytes(shapes.params),
      opt_state_bytes=per_device_bytes(shapes.opt_state),
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes, flops=compiled_flops(step.executable),
      compile_seconds=step.compile_seconds)


def compile_step(config, devices):
  """Compiles the run's train step over `devices` (config.mesh) -> StepCost."""
  return step_cost(build_step(config, devices))


def pallas_kernel_compiles(device, config):
  """(True, "") when the dilated-attention Pallas kernel (forward and backward,
  not interpret mode) compiles on `device` for one LongNet segment, else
  (False, why)."""
  from clusjax.kernels.dilated_attention_pallas import segment_attention_pallas
  ln = config.longnet
  m = min(config.clustering.max_prototypes, max(ln.segment_lengths))
  qkv = jax.ShapeDtypeStruct((ln.num_heads, m, ln.width // ln.num_heads),
                             jnp.dtype(config.dtype))
  valid = jax.ShapeDtypeStruct((ln.num_heads, m), jnp.bool_)
  sharding = NamedSharding(Mesh([device], ("d",)), P())

  def loss(q, k, v, valid):
    o, lse = segment_attention_pallas(q, k, v, valid, causal=False, interpret=False)
    return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(sharding,) * 4,
            out_shardings=(sharding,) * 3).lower(qkv, qkv, qkv, valid).compile()
  except Exception as e:  # noqa: BLE001 - the caller reports why
    lines = str(e).strip().splitlines()
    if lines:
      return False, f"{type(e).__name__}: {lines[0][:300]}"
    where = traceback.extract_tb(e.__traceback__)[-1]   # a bare assert: say where
    return False, (f"{type(e).__name__} in {where.name} "
                   f"({os.path.basename(where.filename)}:{where.lineno})")
  return True, ""


def fits(cost, chip):
  """None when `cost` fits `chip`'s HBM, else a message naming the overflow."""
  if cost.total_bytes <= chip.hbm_bytes:
    return None
  return (f"the step does not fit: {format_bytes(cost.total_bytes)} per device > {chip.name}'s "
          f"HBM {format_bytes(chip.hbm_bytes)} (over by "
          f"{format_bytes(cost.total_bytes - chip.hbm_bytes)}: arguments "
          f"{format_bytes(cost.argument_bytes)}, temporaries {format_bytes(cost.temp_bytes)}); "
          "shard more (config.mesh, config.sharding.rules) or lower config.train.batch_size.")


def format_bytes(n):
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
