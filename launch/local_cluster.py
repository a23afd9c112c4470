"""Runs N processes of launch/main.py on this machine as one multi-host job.

    python launch/local_cluster.py 2 -- --config=configs/clus_base.py:tiny --workdir=workdirs/x2

Everything after `--` goes to every process of launch/main.py, which also
gets --coordinator_address=127.0.0.1:<a free port>, --num_processes=N,
--process_id=i and --peer_timeout, and fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=<--devices_per_process>).
Each output line is prefixed with its process, `[p1] ...`; launcher lines
with `[local_cluster]`.

Exits 0 when every process does, else 1, naming the process that failed
first. A failed process makes jax abort the others within --peer_timeout
seconds (clusjax/parallel/distributed.py); any still running GRACE_S later
(one that died before the job was joined leaves the others waiting for it)
are killed. Running the same command again resumes from the last checkpoint.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # a plain checkout, as launch/main.py
from clusjax.parallel.distributed import DEFAULT_TIMEOUT_S  # noqa: E402

MAIN = os.path.join(ROOT, "launch", "main.py")
# Beyond --peer_timeout: time for jax's abort to reach the survivors.
GRACE_S = 15
POLL_S = 0.2


def _parse(argv):
  """argv -> (launcher args, launch/main.py args)."""
  own, main_args = argv, []
  if "--" in argv:
    cut = argv.index("--")
    own, main_args = argv[:cut], argv[cut + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   usage="%(prog)s N [options] -- <launch/main.py flags>")
  parser.add_argument("num_processes", type=int, help="processes to run (N >= 1)")
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="fake CPU devices per process (default: 8 // N, at least 1)")
  parser.add_argument("--peer_timeout", type=int, default=DEFAULT_TIMEOUT_S,
                      help="seconds after which a dead process makes the others exit")
  parser.add_argument("--port", type=int, default=0,
                      help="coordinator port on 127.0.0.1 (default: a free one)")
  args = parser.parse_args(own)
  if args.num_processes < 1:
    parser.error(f"N={args.num_processes} must be >= 1")
  if args.devices_per_process is None:
    args.devices_per_process = max(1, 8 // args.num_processes)
  if args.devices_per_process < 1:
    parser.error(f"--devices_per_process={args.devices_per_process} must be >= 1")
  if args.peer_timeout < 1:
    parser.error(f"--peer_timeout={args.peer_timeout} must be >= 1 (seconds)")
  return args, main_args


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  """This environment with `devices` fake CPU devices (other XLA_FLAGS kept)."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  # No persistent compilation cache: on CPU each process has its own cache
  # key and only process 0 writes, so process 0 would load while the others
  # compile, and a gap of 30 s fails gloo's rendezvous at the next collective.
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
              JAX_ENABLE_COMPILATION_CACHE="false",
              XLA_FLAGS=" ".join(kept + [f"--xla_force_host_platform_device_count={devices}"]))


def _describe(code):
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  if code == 128 + signal.SIGABRT:
    return f"exit code {code} (SIGABRT: jax aborts a process whose peer died)"
  return f"exit code {code}"


class _Printer:
  """Prefixes and prints the lines of several processes, a line at a time."""

  def __init__(self):
    self._lock = threading.Lock()

  def say(self, prefix, line):
    with self._lock:
      sys.stdout.write(f"[{prefix}] {line.rstrip()}\n")
      sys.stdout.flush()

  def follow(self, prefix, stream):
    """Starts a thread that prints `stream`'s lines (tqdm's '\\r' updates too)."""
    def run():
      for line in stream:
        self.say(prefix, line)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run(num_processes, main_args, *, devices_per_process, peer_timeout, port=0):
  """Runs the job; returns 0 if every process exited 0, else 1."""
  printer = _Printer()
  address = f"127.0.0.1:{port or _free_port()}"
  env = _env(devices_per_process)
  procs, threads = [], []
  for i in range(num_processes):
    cmd = [sys.executable, MAIN, *main_args, f"--coordinator_address={address}",
           f"--num_processes={num_processes}", f"--process_id={i}",
           f"--peer_timeout={peer_timeout}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    procs.append(proc)
    threads.append(printer.follow(f"p{i}", proc.stdout))
    printer.say("local_cluster", f"process {i}: pid {proc.pid}, {devices_per_process} CPU "
                f"devices, coordinator {address}")
  first, deadline = None, None
  try:
    while any(p.poll() is None for p in procs):
      if first is None:
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
          first, deadline = failed[0], time.monotonic() + peer_timeout + GRACE_S
          printer.say("local_cluster",
                      f"process {first} failed ({_describe(procs[first].returncode)}); the "
                      f"others must exit within {peer_timeout + GRACE_S} s.")
      elif time.monotonic() > deadline:
        for i, p in enumerate(procs):
          if p.poll() is None:
            printer.say("local_cluster", f"process {i} still runs {peer_timeout + GRACE_S} s "
                        f"after process {first} failed: killing it.")
            p.kill()
      time.sleep(POLL_S)
  finally:
    for p in procs:   # Ctrl-C, or an error here: leave no process behind
      if p.poll() is None:
        p.kill()
      p.wait()
    for t in threads:
      t.join()
  codes = [p.returncode for p in procs]
  if not any(codes):
    return 0
  if first is None:   # all exited within one poll
    first = next(i for i, c in enumerate(codes) if c)
  summary = ", ".join(f"process {i}: {_describe(c) if c else 'exit code 0'}"
                      for i, c in enumerate(codes))
  printer.say("local_cluster", f"failed: process {first} failed first ({summary}).")
  return 1


def main(argv):
  args, main_args = _parse(argv)
  return run(args.num_processes, main_args, devices_per_process=args.devices_per_process,
             peer_timeout=args.peer_timeout, port=args.port)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
