"""Soak test of resume: SIGKILL a training run at random moments, rerun, compare.

    nice -n 10 python benchmarks/soak.py --kills=20            # ~25 min on 2 busy cores

A `configs/clus_base.py:tiny` run shrunk to seconds per step (tests/conftest.py's
MICRO sizes, 60 steps, a checkpoint every 5, clustering every 10, 1 CPU device)
is trained once without interruption: the reference. Then the same command runs
on another workdir and is SIGKILLed after a random delay, rerun on the same
workdir, killed again, ... `--kills` times, and finally left to finish. Half of
the kills come at a uniform moment after the workdir first holds a checkpoint,
half at a uniform moment from launch (start-up, tokenizer training, compilation,
steps and checkpoint writes alike). A run that ends before its kill starts a new
workdir, so every kill lands.

Every loss a rerun logs (metrics.jsonl, one line per step) is compared with the
reference's at the same step. A kill counts as an exact resume when the next run
that logs anything logs only losses within 1e-5 (relative) of the reference, and
every workdir's final metrics.jsonl holds each step once, equal to the reference.
The table: kills, exact resumes, the worst relative difference of any logged
loss, and the reruns that found no checkpoint (those start over, legitimately).
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = [sys.executable, os.path.join(ROOT, "launch", "main.py"),
        "--config=" + os.path.join(ROOT, "configs", "clus_base.py:tiny")]
TOLERANCE = 1e-5

# The tiny config shrunk as tests/conftest.py's MICRO does (kept in step with it by hand).
SIZES = {
    "data.image_size": 32, "data.shapes_num_train": 256, "data.shapes_num_val": 16,
    "data.shapes_num_test": 64, "data.max_text_len": 24, "data.vocab_size": 128,
    "model.vision.patch_size": 8, "model.embed_dim": 16, "train.batch_size": 16,
    "longnet.width": 16, "longnet.num_heads": 2, "longnet.mlp_dim": 32,
    **{f"model.{t}.{k}": v for t in ("vision", "text")
       for k, v in (("width", 32), ("depth", 1), ("num_heads", 2), ("mlp_dim", 64))},
}
RUN = {"train.num_steps": 60, "train.log_every": 1, "train.checkpoint_every": 5,
       "train.keep_checkpoints": 2, "clustering.cluster_every": 10, "train.eval_at_end": False}


def _flags(data_dir):
  items = {**SIZES, **RUN, "data.data_dir": data_dir}
  return [f"--config.{k}={v}" for k, v in items.items()]


def _env(cache_dir):
  """One CPU device (as a user runs it), a shared compile cache so that reruns skip
  compilation, and no YNN fusions (see tests/conftest.py)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append("--xla_cpu_experimental_ynn_fusion_type=")
  return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _metrics(workdir):
  """{step: loss} of metrics.jsonl (a line cut by a kill is skipped, as resume does)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if "loss" in record:
          out[record["step"]] = record["loss"]
  return out


def _launch(workdir, flags, env, log):
  out = open(log, "w")
  return subprocess.Popen(MAIN + [f"--workdir={workdir}"] + flags, stdout=out,
                          stderr=subprocess.STDOUT, env=env), out


def _start_step(log):
  """The step a run started from: None if it died before saying (it logged nothing)."""
  text = open(log).read()
  resumed = re.search(r"Resumed from step (\d+)", text)
  if resumed:
    return int(resumed.group(1))
  return 0 if "GFLOP per step" in text else None


def reference_run(root, flags, env):
  """Trains once without interruption; returns ({step: loss}, seconds, seconds to the
  first checkpoint)."""
  workdir = os.path.join(root, "reference")
  start = time.time()
  proc, out = _launch(workdir, flags, env, os.path.join(root, "reference.log"))
  first = None
  while proc.poll() is None:
    if first is None and _checkpoints(workdir):
      first = time.time() - start
    time.sleep(0.05)
  out.close()
  if proc.returncode != 0:
    sys.exit(f"the reference run failed; see {os.path.join(root, 'reference.log')}")
  return _metrics(workdir), time.time() - start, first


def _run(workdir, flags, env, log, kill_at=None, wait_for_checkpoint=False):
  """Runs training on `workdir`; SIGKILLs it `kill_at` seconds after launch (or after
  the workdir first holds a checkpoint) unless it ends first. Returns its record."""
  found = bool(_checkpoints(workdir))
  proc, out = _launch(workdir, flags, env, log)
  launched = time.time()
  if kill_at is not None:
    if wait_for_checkpoint:
      while not _checkpoints(workdir) and proc.poll() is None:
        time.sleep(0.02)
    deadline = time.time() + kill_at
    while time.time() < deadline and proc.poll() is None:
      time.sleep(0.01)
  else:
    proc.wait()
  killed = proc.poll() is None
  if killed:
    proc.send_signal(signal.SIGKILL)
  proc.wait()
  out.close()
  if not killed and proc.returncode != 0:
    sys.exit(f"a run failed (exit {proc.returncode}); see {log}")
  start = _start_step(log)
  logged = {s: v for s, v in _metrics(workdir).items() if start is not None and s > start}
  return dict(workdir=workdir, log=log, found_checkpoint=found, start=start, logged=logged,
              killed=killed, at=time.time() - launched)


def soak(root, flags, env, kills, seconds, first_checkpoint, rng):
  """Kills and reruns until `kills` kills have landed, then runs every workdir to its
  end; returns every run's record, in order."""
  after_checkpoint = [i % 2 == 0 for i in range(kills)]
  rng.shuffle(after_checkpoint)
  runs, campaign = [], 0
  while sum(r["killed"] for r in runs) < kills:
    workdir = os.path.join(root, f"killed_{campaign}")
    wait = after_checkpoint[sum(r["killed"] for r in runs)]
    kill_at = rng.uniform(0, seconds - first_checkpoint if wait else seconds)
    run = _run(workdir, flags, env, os.path.join(root, f"run_{len(runs)}.log"), kill_at, wait)
    run.update(kind="after a checkpoint" if wait else "anywhere",
               after_kill=bool(runs) and runs[-1]["workdir"] == workdir and runs[-1]["killed"])
    runs.append(run)
    if not run["killed"]:   # ended before its kill: the next kills go to a new workdir
      campaign += 1
  if runs[-1]["killed"]:
    workdir = runs[-1]["workdir"]
    run = _run(workdir, flags, env, os.path.join(root, f"run_{len(runs)}.log"))
    run.update(kind="to the end", after_kill=True)
    runs.append(run)
  return runs


def _rel(a, b):
  return abs(a - b) / max(abs(b), 1e-12)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default="", help="working directory (default: a temporary one)")
  parser.add_argument("--keep", action="store_true", help="keep the workdirs and logs")
  args = parser.parse_args()
  root = args.root or tempfile.mkdtemp(prefix="clusjax_soak_")
  os.makedirs(root, exist_ok=True)
  data_dir, cache = os.path.join(root, "tfds"), os.path.join(root, "jax_cache")
  flags, env, rng = _flags(data_dir), _env(cache), random.Random(args.seed)
  began = time.time()

  steps = RUN["train.num_steps"]
  reference = _metrics(os.path.join(root, "reference"))   # kept from an earlier --root run
  if sorted(reference) != list(range(1, steps + 1)):
    reference, _, _ = reference_run(root, flags, env)
  assert sorted(reference) == list(range(1, steps + 1)), sorted(reference)
  # The reference's first run also built the data set and filled the compile cache:
  # time a warm run, as the reruns are.
  shutil.move(os.path.join(root, "reference"), os.path.join(root, "reference_first"))
  reference2, seconds, first = reference_run(root, flags, env)
  worst = max(_rel(reference2[s], reference[s]) for s in reference)
  shutil.rmtree(os.path.join(root, "reference_first"))
  print(f"reference: {steps} steps in {seconds:.0f} s warm (first checkpoint at {first:.0f} s); "
        f"a second uninterrupted run differs by {worst:.1e} at most", flush=True)

  runs = soak(root, flags, env, args.kills, seconds, first, rng)
  kills = [i for i, r in enumerate(runs) if r["killed"]]
  exact = 0
  for i in kills:   # judged by the next run on that workdir that logs anything
    nxt = next((r for r in runs[i + 1:] if r["workdir"] == runs[i]["workdir"] and r["logged"]),
               None)
    exact += bool(nxt) and all(_rel(v, reference[s]) <= TOLERANCE
                               for s, v in nxt["logged"].items())
  worst = max((_rel(v, reference[s]) for r in runs for s, v in r["logged"].items()),
              default=0.0)
  workdirs = sorted({r["workdir"] for r in runs})
  complete = all(sorted(_metrics(w)) == list(range(1, steps + 1))
                 and all(_rel(v, reference[s]) <= TOLERANCE for s, v in _metrics(w).items())
                 for w in workdirs)
  no_checkpoint = sum(r["after_kill"] and not r["found_checkpoint"] for r in runs)
  after = sum(runs[i]["kind"] == "after a checkpoint" for i in kills)
  print(f"\n{len(kills)} kills, {len(runs)} runs over {len(workdirs)} workdir(s) in "
        f"{time.time() - began:.0f} s; kill moments (s after launch, c: after a checkpoint): "
        + ", ".join(f"{runs[i]['at']:.1f}{'c' if runs[i]['kind'] == 'after a checkpoint' else ''}"
                    for i in kills), flush=True)
  print("\n| kills (after a checkpoint / anywhere) | exact resumes (1e-5) | worst relative "
        "difference | reruns that found no checkpoint | final metrics complete and equal |")
  print("|---|---|---|---|---|")
  print(f"| {len(kills)} ({after} / {len(kills) - after}) | {exact} / {len(kills)} | "
        f"{worst:.1e} | {no_checkpoint} | {'yes' if complete else 'NO'} |")
  if not args.keep and not args.root:
    shutil.rmtree(root, ignore_errors=True)
  sys.exit(0 if exact == len(kills) and complete else 1)


if __name__ == "__main__":
  main()
