"""The train step compiled ahead of time: memory and FLOPs (launch/compile.py's core)."""
import jax

from clusjax.parallel.hardware import CHIPS, Chip, chip_of
from clusjax.train.aot import compile_step, fits
from tests.conftest import micro_config


def test_compiled_step_reports_sharded_memory_and_flops(shapes_data_dir):
  config = micro_config(shapes_data_dir, mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  cost = compile_step(config, jax.devices())
  assert cost.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
  # The parameters are split over fsdp x tensor: a device holds well under all of them.
  assert cost.params_bytes < 0.6 * 4 * cost.num_params
  # Adam keeps two moments per parameter, sharded like it (plus a step count).
  assert 1.9 * cost.params_bytes <= cost.opt_state_bytes <= 2.1 * cost.params_bytes + 1024
  # The state is donated: its outputs reuse the argument buffers.
  assert 0 < cost.alias_bytes <= cost.output_bytes
  assert cost.argument_bytes >= cost.params_bytes + cost.opt_state_bytes
  assert cost.flops > 0 and cost.temp_bytes > 0
  assert cost.total_bytes > cost.argument_bytes

  assert fits(cost, Chip("roomy", 1e12, 1e12, cost.total_bytes)) is None
  message = fits(cost, Chip("small", 1e12, 1e12, cost.total_bytes - 2**20))
  assert "does not fit" in message and "over by 1.0 MiB" in message and "small" in message


def test_peak_table_covers_the_chips_of_the_spec():
  for kind, bf16 in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                     ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12)):
    assert chip_of(kind).peak_flops("bfloat16") == bf16
  assert chip_of("NVIDIA H100 80GB HBM3").peak_flops("float32") < 989e12
  assert chip_of("cpu") is None and all(c.hbm_bytes > 0 for c in CHIPS.values())
