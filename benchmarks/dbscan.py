"""On-device DBSCAN vs scikit-learn: time, agreement, compiled memory.

    nice -n 19 python benchmarks/dbscan.py [--sizes 10000,50000,200000]
        [--dims 2,256] [--max-seconds 120] [--min-samples 2d]

For each N x D: `make_blobs(N, D, centers=10)` in float32; minPts = 2 D
(Schubert et al. 2017, as DESIGN §3) unless --min-samples is a number; eps =
`kdistance_eps(points, minPts)` (the same eps for both). Then
  * jax: `jax.jit(dbscan, ...).lower(points, eps, minPts).compile()` --
    its `memory_analysis()` (temp / argument / output bytes) -- and the best
    of up to 3 timed calls after one warm-up call (compile time printed);
  * sklearn: `DBSCAN(eps, min_samples, algorithm="auto")` on the same points
    (as float64), n_jobs=1 and n_jobs=-1;
  * ARI between the two label sets, and whether they are identical.
A configuration is skipped (and the reason printed) when the time estimated
for sklearn or jax exceeds --max-seconds: estimates scale the last measured
time at the same D by (N / N_prev)^p -- p = 2 for sklearn brute force (D > 15)
and for jax, 1.5 for sklearn's trees -- or, for sklearn's first size, a
2000-point probe.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.cluster import DBSCAN  # noqa: E402
from sklearn.datasets import make_blobs  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from clusjax.clustering import dbscan, kdistance_curve, kdistance_eps  # noqa: E402
from clusjax.clustering.dbscan import elbow  # noqa: E402

STATIC = ("min_samples", "block_size", "return_core", "return_rounds")


def timed(fn, repeats=3, budget=10.0):
  """Best wall time of fn() over up to `repeats` calls (fewer past `budget` s)."""
  best, spent, out = float("inf"), 0.0, None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    best, spent = min(best, dt), spent + dt
    if spent > budget:
      break
  return best, out


def sklearn_seconds(x, eps, min_samples, n_jobs):
  model = DBSCAN(eps=eps, min_samples=min_samples, algorithm="auto", n_jobs=n_jobs)
  return timed(lambda: model.fit(x).labels_, repeats=2)


def mib(b):
  return f"{b / 2**20:.1f}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="10000,50000,200000")
  ap.add_argument("--dims", default="2,256")
  ap.add_argument("--max-seconds", type=float, default=120.0,
                  help="skip a configuration whose estimated sklearn or jax time exceeds this")
  ap.add_argument("--min-samples", default="2d", help="'2d' (= 2 x D) or a number")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  dims = [int(s) for s in args.dims.split(",")]

  dev = jax.devices()[0]
  print(f"# {datetime.date.today()}  jax {jax.__version__}  device: {dev.platform} "
        f"({dev.device_kind}), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
  print("# times in seconds (best of up to 3 after warm-up); memory in MiB from memory_analysis()")
  head = ("|      N |   D | minPts |     eps | clusters | jax s | compile s | kdist s | "
          "sklearn s (n_jobs=1) | sklearn s (n_jobs=-1) | ratio skl/jax | ARI | same labels "
          "| temp MiB | arg MiB | out MiB |")
  print(head)
  print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
  sys.stdout.flush()

  jitted = jax.jit(dbscan, static_argnames=STATIC)
  last_skl, last_jax = {}, {}
  for d in dims:
    min_samples = 2 * d if args.min_samples == "2d" else int(args.min_samples)
    for n in sizes:
      x, _ = make_blobs(n, n_features=d, centers=10, random_state=args.seed)
      x = x.astype(np.float32)
      x64 = x.astype(np.float64)
      # Estimates (before spending anything big).
      p_skl = 2.0 if d > 15 else 1.5
      if d in last_skl:
        n0, t0 = last_skl[d]
      else:
        n0 = min(n, 2000)
        sub = x64[np.random.RandomState(0).choice(n, n0, replace=False)]
        eps0 = float(kdistance_eps(sub, min_samples))
        t0, _ = sklearn_seconds(sub, eps0, min_samples, 1)
      est_skl = t0 * (n / n0) ** p_skl
      est_jax = last_jax[d][1] * (n / last_jax[d][0]) ** 2 if d in last_jax else 0.0
      if max(est_skl, est_jax) > args.max_seconds:
        print(f"| {n:6d} | {d:3d} | skipped: estimated sklearn {est_skl:.0f} s, jax {est_jax:.0f} s "
              f"> --max-seconds={args.max_seconds:g} |")
        sys.stdout.flush()
        continue

      curve = kdistance_curve.lower(x, min_samples).compile()   # kdistance_eps, timed
      float(elbow(np.zeros(n, np.float32)))                      # without compiles
      t_kd, eps = timed(lambda: float(elbow(curve(x))), repeats=1)
      t = time.perf_counter()
      compiled = jitted.lower(x, eps, min_samples=min_samples).compile()
      t_compile = time.perf_counter() - t
      mem = compiled.memory_analysis()
      compiled(x, eps).block_until_ready()                       # warm-up
      t_jax, labels = timed(lambda: compiled(x, eps).block_until_ready())
      labels = np.asarray(labels)
      t_skl1, ref = sklearn_seconds(x64, eps, min_samples, 1)
      t_skl_all, _ = sklearn_seconds(x64, eps, min_samples, -1)
      last_skl[d], last_jax[d] = (n, t_skl1), (n, t_jax)
      print(f"| {n:6d} | {d:3d} | {min_samples:6d} | {eps:7.4g} | {labels.max() + 1:8d} "
            f"| {t_jax:5.2f} | {t_compile:9.1f} | {t_kd:7.2f} | {t_skl1:20.2f} "
            f"| {t_skl_all:21.2f} | {t_skl1 / t_jax:13.2f} | {adjusted_rand_score(ref, labels):.4f} "
            f"| {str(np.array_equal(ref, labels)):11s} | {mib(mem.temp_size_in_bytes):>8s} "
            f"| {mib(mem.argument_size_in_bytes):>7s} | {mib(mem.output_size_in_bytes):>7s} |")
      sys.stdout.flush()


if __name__ == "__main__":
  main()
