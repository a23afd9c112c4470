"""Dilated vs dense attention: compiled memory and time of forward+backward.

    nice -n 19 python benchmarks/dilated_attention.py [--max-n 1048576]
        [--max-run-n 65536] [--dense-max-n 65536] [--dense-max-run-n 8192]
        [--check] [--sweep-blocks]

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
included), the comparison with cuDNN flash attention at the same N, and the
time of the "xla" (jnp) dilated path at the same N (the kernel's speed-up).
--check first compares the kernel (compiled, not interpreted) with the jnp
path computed at float32 "highest" matmul precision: output and q/k/v
gradients, float32 and bfloat16, causal and not, with padded keys.
--sweep-blocks times the kernel's fwd+bwd over `BlockSizes` on the rows one
N=--sweep-n call gathers (all three branches have m = w / r = 2048).
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
from clusjax.kernels import dilated_attention_pallas  # noqa: E402

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


def check(n=4099, h=4, seed=0):
  """Max |kernel - reference| / max |reference| for the output and dq, dk, dv.

  n is not a multiple of any segment (padding), a quarter of the keys of the
  second sequence are masked; the reference is the jnp path at "highest"
  precision in float32. Returns True when every error is within tolerance.
  """
  tol = {"float32": 1e-2, "bfloat16": 5e-2}  # TF32 / bf16 matmul inputs
  keys = jax.random.split(jax.random.key(seed), 4)
  mask = jnp.stack([jnp.ones((n,), bool), jax.random.uniform(keys[3], (n,)) > 0.25])
  ok = True
  for dtype in ("float32", "bfloat16"):
    q, k, v = (jax.random.normal(key, (2, n, h, D), jnp.float32) for key in keys[:3])
    for causal in (False, True):
      def grads(impl, dt, q=q, k=k, v=v, causal=causal):
        def loss(q, k, v):
          o = dilated_attention(q, k, v, segment_lengths=SEGMENTS, dilation_rates=RATES,
                                kv_mask=mask, causal=causal, implementation=impl)
          return jnp.sum(o.astype(jnp.float32) * w), o
        w = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
        cast = lambda x: x.astype(dt)  # noqa: E731
        (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            cast(q), cast(k), cast(v))
        return [x.astype(jnp.float32) for x in (o, *g)]
      with jax.default_matmul_precision("highest"):
        ref = grads("xla", jnp.float32)
      got = grads("pallas", jnp.dtype(dtype))
      errs = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, ref)]
      good = max(errs) <= tol[dtype] and all(math.isfinite(e) for e in errs)
      ok &= good
      print(f"check {dtype:8s} causal={causal!s:5s} N={n}: relative max error out "
            f"{errs[0]:.2e}  dq {errs[1]:.2e}  dk {errs[2]:.2e}  dv {errs[3]:.2e}  "
            f"(tol {tol[dtype]:.0e}) {'ok' if good else 'FAIL'}", flush=True)
  return ok


def sweep_blocks(n, dtype, reps, budget_s=120.0):
  """Kernel fwd+bwd time per BlockSizes on the [G, 2048, D] rows of one call."""
  g = sum(B * H * -(-n // w) for w in SEGMENTS)
  m = SEGMENTS[0] // RATES[0]
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (g, m, D), dtype) for key in keys)
  valid = jnp.ones((g, m), bool)
  configs = [dilated_attention_pallas.BlockSizes(bq, bk, bb, warps, stages)
             for bq, bk in ((64, 64), (128, 64), (128, 128)) for bb in (32, 64, 128)
             for warps in (4, 8) for stages in (2, 3)]
  print(f"# sweep: G={g} rows x m={m} x D={D}, {dtype.name}, fwd+bwd, mean of {reps}")
  results, start = [], time.perf_counter()
  for bs in configs:
    if time.perf_counter() - start > budget_s:
      print(f"# sweep stopped after {budget_s:.0f} s ({len(results)} configs)")
      break
    def loss(q, k, v, bs=bs):
      o, lse = dilated_attention_pallas.segment_attention_pallas(
          q, k, v, valid, causal=False, interpret=False, block_sizes=bs)
      return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
    try:
      f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      jax.block_until_ready(f(q, k, v))
      t0 = time.perf_counter()
      for _ in range(reps):
        jax.block_until_ready(f(q, k, v))
      t = (time.perf_counter() - t0) / reps
    except Exception as e:  # a tile that does not fit shared memory fails to compile
      print(f"  {bs}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
      continue
    results.append((t, bs))
    print(f"  {bs}: {t * 1e3:.3f} ms", flush=True)
  if results:
    base = dict((bs, t) for t, bs in results).get(dilated_attention_pallas.BlockSizes())
    best_t, best = min(results, key=lambda r: r[0])
    print(f"# fastest {best}: {best_t * 1e3:.3f} ms"
          + (f"; default {base * 1e3:.3f} ms ({base / best_t:.2f}x)" if base else ""))


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
  p.add_argument("--check", action="store_true",
                 help="first compare the compiled kernel with the jnp path (GPU)")
  p.add_argument("--sweep-blocks", action="store_true",
                 help="only time the kernel over BlockSizes at --sweep-n (GPU)")
  p.add_argument("--sweep-n", type=int, default=1 << 16)
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
  if (args.check or args.sweep_blocks) and not on_gpu:
    sys.exit("--check and --sweep-blocks compile the kernel for a GPU; none is here.")
  if args.check and not check():
    sys.exit("the kernel does not match the jnp path (above)")
  if args.sweep_blocks:
    sweep_blocks(args.sweep_n, dtype, max(args.reps, 10))
    return

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
      if impl != "xla":
        xla_mem, xla_t = measure("dilated", "xla", n, dtype, True, args.reps)
        line += f"  jnp path {fmt_s(xla_t)} {fmt_bytes(xla_mem)} ({xla_t / dil_t:.1f}x kernel)"
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
