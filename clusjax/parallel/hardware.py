"""Accelerator peaks, by `jax.Device.device_kind`: dense FLOP/s and memory per chip.

For MFU and step-time lower bounds (launch/compile.py). Peaks are the
vendors' dense (no sparsity) figures. TPUs run float32 matmuls at XLA's
default precision as one bf16 pass, so their float32 row is the bf16 peak.
"""
import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float      # dense peak FLOP/s, bfloat16
  f32_flops: float       # dense peak FLOP/s, float32 (non-tensor-core on GPUs)
  hbm_bytes: int

  def peak_flops(self, dtype):
    return self.bf16_flops if dtype == "bfloat16" else self.f32_flops


CHIPS = {
    "TPU v4": Chip("TPU v4", 275e12, 275e12, 32 * GIB),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 197e12, 16 * GIB),
    "TPU v5": Chip("TPU v5p", 459e12, 459e12, 95 * GIB),
    "TPU v6 lite": Chip("TPU v6e", 918e12, 918e12, 32 * GIB),
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 989e12, 67e12, 80 * GIB),
    "NVIDIA H200": Chip("H200 SXM", 989e12, 67e12, 141 * GIB),
    "NVIDIA A100-SXM4-80GB": Chip("A100 SXM 80GB", 312e12, 19.5e12, 80 * GIB),
    "NVIDIA A100-SXM4-40GB": Chip("A100 SXM 40GB", 312e12, 19.5e12, 40 * GIB),
}


def chip_of(device_kind):
  """The Chip of a device kind, or None when its peaks are not in the table."""
  return CHIPS.get(device_kind)
