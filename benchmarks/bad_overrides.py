"""Bad --config overrides as a new user types them: each refused clearly, and how fast.

    python benchmarks/bad_overrides.py [--n 100] [--seed 0] [--jobs 1]

Draws `n` of the overrides tests/test_config_fuzz.py generates from the keys of
configs/clus_base.py:tiny and configs/vqa.py:tiny (unknown keys at every depth,
index syntax, missing values, wrong types, NaN / inf / huge / negative / zero,
unknown choices and paths, empty strings, malformed syntax, missing files and
variants) and runs each as a real `python launch/main.py ... --workdir=<tmp>`.
Prints one row per override (exit code, seconds, first line of stderr) and a
summary. Clear = exit != 0, one line naming the key / flag / file, no traceback,
no workdir left, under 5 s. Exits 1 when one is accepted or gives a traceback
(2 when one is refused, but not clearly).
"""
import argparse
import concurrent.futures
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.test_config_fuzz import CONFIGS, MAIN, _problems, bad_overrides  # noqa: E402


def run_one(spec, extra, names):
  """(exit code, seconds, stderr, problems) of one override as a subprocess."""
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "workdir")
    start = time.perf_counter()
    try:
      proc = subprocess.run([sys.executable, MAIN, f"--config={spec}", *extra,
                             f"--workdir={workdir}"], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
      code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:   # accepted: it went on to train
      code, stderr = "timeout", (e.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    return code, seconds, stderr, _problems(code, stderr, seconds, names, workdir)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=100, help="overrides to run")
  parser.add_argument("--seed", type=int, default=0, help="which ones")
  parser.add_argument("--jobs", type=int, default=1, help="subprocesses at a time")
  args = parser.parse_args()
  pool = [(spec, extra, names) for spec in CONFIGS for extra, names in bad_overrides(spec)]
  cases = random.Random(args.seed).sample(pool, min(args.n, len(pool)))
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as executor:
    results = list(executor.map(lambda case: run_one(*case), cases))
  print(f"{'override':58s} {'exit':>7s} {'s':>5s}  first line of stderr")
  for (spec, extra, _), (code, seconds, stderr, problems) in zip(cases, results):
    first = (stderr.strip().splitlines() or [""])[0]
    mark = "  <- " + ", ".join(problems) if problems else ""
    print(f"{spec.split('/')[-1].replace('.py', '') + ' ' + ' '.join(extra):58.58s} {code!s:>7s} "
          f"{seconds:5.2f}  {first[:110]}{mark}")
  clear = sum(not problems for *_, problems in results)
  accepted = sum(code in (0, "timeout") for code, *_ in results)
  tracebacks = sum("Traceback" in stderr for _, _, stderr, _ in results)
  print(f"\nrefused clearly: {clear} / {len(cases)} (of {len(pool)} generated); accepted: "
        f"{accepted}; tracebacks: {tracebacks}; max {max(r[1] for r in results):.2f} s, "
        f"median {sorted(r[1] for r in results)[len(results) // 2]:.2f} s per override.")
  sys.exit(1 if accepted or tracebacks else 0 if clear == len(cases) else 2)


if __name__ == "__main__":
  main()
