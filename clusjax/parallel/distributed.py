"""Joining the processes of a multi-host job: `jax.distributed.initialize`.

Every process of a job runs the same `launch/main.py` command; `initialize`
connects them into one cluster before jax touches a device. Afterwards
`jax.devices()` lists the devices of all processes, each process reads its
own rows of every global batch and feeds its own devices
(`clusjax/train/loop.py`), process 0 alone writes logs and results, and all
processes write the Orbax checkpoint. The mode (`--distributed`):

    auto  join when --coordinator_address / --num_processes / --process_id
          are given, or when jax detects a cluster of more than one process
          (Cloud TPU VM pod slice, SLURM, Open MPI, Kubernetes); else run alone.
    on    always join (the flags, and jax's detection for what they leave out).
    off   run alone.

A process that dies or hangs does not leave the others waiting in a
collective: jax's coordination service (in process 0) misses its heartbeats
for `timeout` seconds and aborts every other process (SIGABRT, exit code 134,
"Terminating process because the JAX distributed service detected fatal
errors"); when process 0 dies the others abort at once. The same bound
applies to the barrier every process waits at when it exits. Running the job
again resumes from the last checkpoint.
"""
# jax is imported inside the functions: launch/main.py reads MODES for its
# flags before it imports jax, so that bad flags fail fast.
MODES = ("auto", "on", "off")
# jax's default heartbeat timeout (its shutdown barrier waits 300 s by default).
DEFAULT_TIMEOUT_S = 100


def detected_process_count():
  """Processes in the cluster that `jax.distributed.initialize()` would detect
  by itself (Cloud TPU VM, SLURM, Open MPI, Kubernetes); 0 where none is."""
  # jax's registry of cluster environments is not public API; a jax upgrade
  # that moves it fails here, loudly (tests/test_multihost.py).
  from jax._src import clusters
  for env in clusters.ClusterEnv._cluster_types:   # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.get_process_count()
  return 0


def _check_args(mode, coordinator_address, num_processes, process_id, timeout):
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} is not one of {', '.join(MODES)}.")
  if coordinator_address is not None and not coordinator_address.rpartition(":")[2].isdigit():
    raise ValueError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT "
                     "(process 0's address), e.g. 10.0.0.1:8476.")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
  if timeout < 1:
    raise ValueError(f"--peer_timeout={timeout} must be >= 1 (seconds).")


def initialize(mode="auto", *, coordinator_address=None, num_processes=None, process_id=None,
               timeout=DEFAULT_TIMEOUT_S):
  """Joins this job's other processes as `mode` says (module docstring).

  Must run before anything touches a jax device.

  Args:
    mode: "auto", "on" or "off".
    coordinator_address: "host:port" of process 0 (None: detected).
    num_processes, process_id: the job's size and this process's index
      (None: detected).
    timeout: seconds after which a silent process counts as dead and the
      others abort (jax's heartbeat timeout), and the longest a finished
      process waits at exit for the others (jax's shutdown timeout).
  Returns:
    True if this process joined a job, False if it runs alone.
  Raises:
    ValueError: a bad argument, naming its flag; or mode "on" where neither
      the flags nor jax's detection give a coordinator.
  """
  _check_args(mode, coordinator_address, num_processes, process_id, timeout)
  given = {name: value for name, value in (("coordinator_address", coordinator_address),
                                           ("num_processes", num_processes),
                                           ("process_id", process_id)) if value is not None}
  if mode == "off":
    if given:
      flags = " ".join(f"--{name}={value}" for name, value in given.items())
      raise ValueError(f"--distributed=off runs one process alone, but {flags} was given: "
                       "drop it or use --distributed=auto.")
    return False
  if mode == "auto" and not given and detected_process_count() <= 1:
    return False
  import jax
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=timeout,
                               shutdown_timeout_seconds=timeout)
  except ValueError as e:   # what jax could neither read from the flags nor detect
    raise ValueError(
        f"--distributed={mode}: {e} Give --coordinator_address=HOST:PORT --num_processes=N "
        "--process_id=I, or run under a cluster that jax detects (Cloud TPU VM, SLURM, "
        "Open MPI).") from None
  return True
