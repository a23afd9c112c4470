"""Dilated vs dense attention: compiled memory and time of forward+backward.

    nice -n 19 python benchmarks/dilated_attention.py [--max-n 1048576]
        [--max-run-n 65536] [--dense-max-n 65536] [--dense-max-run-n 8192]

For N = 4k .. --max-n (powers of two), B=1, H=4, D=32, w=(2048, 4096, 8192),
r=(1, 2, 4), non-causal, no mask, loss = sum(attention(q, k, v)):
  * memory: `jax.jit(jax.grad(loss)).lower(...).compile().memory_analysis()`,
    temp + argument + output bytes (compiling allocates nothing, so this works
    far beyond what could run);
  * time per call after one warm-up call (mean of --reps), up to --max-run-n;
  * the same for dense attention (`jax.nn.dot_product_attention`), up to
    --dense-max-n (memory) / --dense-max-run-n (time).
Dilated attention uses the Pallas kernel on a GPU and "xla" (jnp) elsewhere.
On a GPU it also prints TFLOP/s of the matmul work actually done (padding
included) and the comparison with cuDNN flash attention at the same N.
Writes the log-log memory plot (the paper's Fig. 13) next to this file.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from clusjax.kernels import dilated_attention  # noqa: E402

B, H, D = 1, 4, 32
SEGMENTS, RATES = (2048, 4096, 8192), (1, 2, 4)
HERE = os.path.dirname(os.path.abspath(__file__))


def dilated_flops(n: int) -> float:
  """Matmul FLOPs of fwd+bwd actually executed by the kernel (with its padding).

  Per row of m tokens: forward q.k^T and p.v (2 matmuls), backward recomputes
  q.k^T and does p^T.dO, dO.v^T, ds.k, ds^T.q (5): 7 * 2 * m^2 * D.
  """
  total = 0
  for w, r in zip(SEGMENTS, RATES):
    w = min(w, -(-n // r) * r)  # the clamp in dilated_attention._branch
    rows = B * H * -(-n // w)
    m = w // r
    blk = min(128, max(16, pl.next_power_of_2(m)))
    m_pad = -(-m // blk) * blk
    total += 14 * rows * m_pad ** 2 * D
  return float(total)


def dense_flops(n: int) -> float:
  return 14.0 * B * H * n * n * D


def make_loss(kind: str, impl: str):
  if kind == "dilated":
    def attn(q, k, v):
      return dilated_attention(q, k, v, segment_lengths=SEGMENTS, dilation_rates=RATES,
                               implementation=impl)
  else:
    def attn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  return lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32))


def measure(kind, impl, n, dtype, run, reps):
  """Returns (bytes, seconds or None) of jit(grad(loss)) at sequence length n."""
  grad = jax.jit(jax.grad(make_loss(kind, impl), argnums=(0, 1, 2)))
  sd = jax.ShapeDtypeStruct((B, n, H, D), dtype)
  compiled = grad.lower(sd, sd, sd).compile()
  ma = compiled.memory_analysis()
  nbytes = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
  if not run:
    return nbytes, None
  q, k, v = (jax.random.normal(key, (B, n, H, D), dtype)
             for key in jax.random.split(jax.random.key(0), 3))
  jax.block_until_ready(compiled(q, k, v))  # warm-up
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(compiled(q, k, v))
  return nbytes, (time.perf_counter() - t0) / reps


def fmt_bytes(x):
  return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def fmt_s(x):
  return "-" if x is None else f"{x:.3g} s"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--min-n", type=int, default=4096)
  p.add_argument("--max-n", type=int, default=1 << 20)
  p.add_argument("--max-run-n", type=int, default=1 << 16,
                 help="time calls only up to this N (memory is measured for all)")
  p.add_argument("--dense-max-n", type=int, default=1 << 16)
  p.add_argument("--dense-max-run-n", type=int, default=8192)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--impl", default=None, help="dilated implementation (default: "
                 "pallas on GPU/TPU, xla on CPU)")
  p.add_argument("--dtype", default=None, help="default float32 (bfloat16 on GPU: cuDNN)")
  p.add_argument("--plot", default=os.path.join(HERE, "dilated_attention_memory.png"))
  args = p.parse_args(argv)

  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  impl = args.impl or ("xla" if backend == "cpu" else "pallas")
  dense_impl = "cudnn" if on_gpu else None
  dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
  dev = jax.devices()[0]
  device = (f"{os.cpu_count()}-core CPU ({platform.machine()}), no accelerator"
            if backend == "cpu" else f"{dev.device_kind} ({backend})")
  print(f"# {datetime.date.today()}  device: {device}  jax {jax.__version__}  "
        f"dtype {dtype.name}")
  print(f"# B={B} H={H} D={D} w={SEGMENTS} r={RATES}; dilated={impl!r}, "
        f"dense=jax.nn.dot_product_attention(implementation={dense_impl!r})")

  ns = [1 << e for e in range(int(math.log2(args.min_n)), int(math.log2(args.max_n)) + 1)]
  rows = []
  for n in ns:
    dil_mem, dil_t = measure("dilated", impl, n, dtype, n <= args.max_run_n, args.reps)
    den_mem = den_t = None
    if n <= args.dense_max_n:
      den_mem, den_t = measure("dense", dense_impl, n, dtype, n <= args.dense_max_run_n,
                               args.reps)
    elif n == args.dense_max_n * 2:
      print(f"# dense skipped for N > {args.dense_max_n}: its [H, N, N] scores alone "
            f"are {H * n * n * 4 / 2**30:,.0f} GiB at N={n} (--dense-max-n)")
    rows.append((n, dil_mem, dil_t, den_mem, den_t))
    line = (f"N={n:>8}  dilated {fmt_bytes(dil_mem):>12} {fmt_s(dil_t):>9}   "
            f"dense {fmt_bytes(den_mem):>12} {fmt_s(den_t):>9}")
    if on_gpu and dil_t:
      tf = dilated_flops(n) / dil_t / 1e12
      line += f"   dilated {tf:.1f} TFLOP/s"
      if den_t:
        tfd = dense_flops(n) / den_t / 1e12
        line += (f"  cuDNN {tfd:.1f} TFLOP/s  TFLOP/s ratio {tf / tfd:.2f}"
                 f"  speed-up {den_t / dil_t:.1f}x")
    print(line, flush=True)

  print("\n| N | dilated fwd+bwd memory | dilated time/call | dense memory | dense time/call |")
  print("|---:|---:|---:|---:|---:|")
  for n, dm, dt, em, et in rows:
    print(f"| {n:,} | {fmt_bytes(dm)} | {fmt_s(dt)} | {fmt_bytes(em)} | {fmt_s(et)} |")
  if len(rows) > 1:
    print(f"\nmemory ratio N={rows[-1][0]} / N={rows[0][0]}: {rows[-1][1] / rows[0][1]:.2f} "
          f"(tokens x{rows[-1][0] // rows[0][0]})")

  import matplotlib  # noqa: E402  (only needed for the plot)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: E402
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.loglog([r[0] for r in rows], [r[1] / 2**20 for r in rows], "o-",
            label=f"dilated ({impl})")
  dense = [(r[0], r[3]) for r in rows if r[3] is not None]
  if dense:
    ax.loglog(*zip(*[(n, m / 2**20) for n, m in dense]), "s--", label="dense")
  ax.set_xlabel("sequence length N")
  ax.set_ylabel("fwd+bwd compiled memory (MiB)")
  ax.set_title(f"B={B}, H={H}, D={D}, w={SEGMENTS}, r={RATES}\n{device}",
               fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f"wrote {args.plot}")


if __name__ == "__main__":
  main()
