"""Train, evaluate or export a Clus model.

    python launch/main.py --config=configs/clus_base.py:tiny --workdir=workdirs/tiny
    python launch/main.py --config=configs/clus_base.py:tiny --workdir=workdirs/tiny --mode=eval
    python launch/main.py --config=configs/clus_base.py:tiny --workdir=workdirs/tiny --mode=export
    python launch/main.py --config=configs/clus_base.py --config.train.batch_size=512 --workdir=...
    python launch/main.py --config=configs/vqa.py:tiny --config.init_from=workdirs/tiny \
        --workdir=workdirs/vqa_tiny         # fine-tune: configs/retrieval.py, vqa.py, nlvr2.py

Any config key can be overridden with --config.a.b=value. Bad flags and
impossible values fail before jax compiles anything, naming the key.

Multi-host: run the same command in every process. On a Cloud TPU VM pod
slice or under SLURM the processes find each other by themselves
(--distributed=auto); elsewhere give each --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (clusjax/parallel/distributed.py;
launch/local_cluster.py runs N processes on this machine).
"""
import os
import sys
import time
import types

from absl import flags, logging
from ml_collections import config_flags

# Make `clusjax` importable from a plain checkout too (no `pip install -e .`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clusjax.cli import fail, parse_flags  # noqa: E402
from clusjax.parallel import cpu, distributed  # noqa: E402

REQUIRED = {"config": "configs/clus_base.py:tiny", "workdir": "workdirs/tiny"}


def define_flags(flag_values, argv):
  """Defines this script's flags on `flag_values` (--config.a.b overrides are read from
  `argv`); returns their holders by name."""
  def define(kind, name, *args, **kwargs):
    return getattr(flags, f"DEFINE_{kind}")(name, *args, flag_values=flag_values, **kwargs)
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                             flag_values=flag_values, lock_config=True,
                                             sys_argv=argv),
      workdir=define("string", "workdir", None, "Where checkpoints, logs and results go."),
      mode=define("enum", "mode", "train", ["train", "eval", "export"],
                  "train: train (or resume) then evaluate; eval: evaluate the latest "
                  "checkpoint; export: write it for PyTorch / transformers to <workdir>/export."),
      overwrite=define("bool", "overwrite", False,
                       "--mode=export: replace an existing <workdir>/export."),
      distributed=define(
          "enum", "distributed", "auto", distributed.MODES,
          "Train / eval as one of several processes: auto (join when the flags below are given "
          "or jax detects a TPU pod slice / SLURM job), on, off. Export always runs alone."),
      coordinator_address=define("string", "coordinator_address", None,
                                 "HOST:PORT of process 0, the same in every process."),
      num_processes=define("integer", "num_processes", None, "Processes in the job."),
      process_id=define("integer", "process_id", None, "This process's index, 0..N-1."),
      peer_timeout=define(
          "integer", "peer_timeout", distributed.DEFAULT_TIMEOUT_S,
          "Seconds after which a dead or silent process makes the others exit (non-zero)."))


def load(argv, flag_values=flags.FLAGS):
  """argv -> (config, flag holders), parsed and validated in milliseconds, before jax.

  A missing config file, an unknown variant, malformed flag syntax, an unknown key or a
  value that cannot work prints one line naming it and exits 2 (1: a config.init_from
  workdir that does not fit). tests/test_config_fuzz.py calls this in-process, each
  time with a fresh FlagValues.
  """
  args = define_flags(flag_values, argv)
  parse_flags(argv, REQUIRED, flag_values)
  config = args.config.value
  from clusjax.config import ConfigError, check_init_from, validate
  try:
    validate(config)  # no jax needed: types and values, in milliseconds
  except ConfigError as e:
    fail(str(e))
  if args.mode.value == "train":
    try:
      check_init_from(config)   # the workdir it starts from fits the towers (reads its config)
    except ConfigError as e:
      fail(str(e), code=1)
  return config, args


def main(argv):
  config, args = load(argv)
  workdir = args.workdir.value
  from clusjax.config import ConfigError, validate

  # Orbax and TFDS log every save and read at INFO; keep the console for
  # the progress bar and the run's own messages.
  logging.set_verbosity(logging.WARNING)
  if args.mode.value == "export":
    # Reads the workdir's own config; the mesh of --config plays no part.
    # Orbax warns that a read-only checkpoint directory is read-only.
    logging.set_verbosity(logging.ERROR)
    from clusjax.export import export_pytorch
    try:
      out = export_pytorch(workdir, overwrite=args.overwrite.value)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
      fail(str(e))
    print(f"Exported {workdir} to {out} (see {os.path.join(out, 'README.md')}).", flush=True)
    return
  cpu.run_inline()   # before JAX's backends start (clusjax/parallel/cpu.py)
  try:
    joined = distributed.initialize(
        args.distributed.value, coordinator_address=args.coordinator_address.value,
        num_processes=args.num_processes.value, process_id=args.process_id.value,
        timeout=args.peer_timeout.value)
  except ValueError as e:
    fail(str(e))
  import jax
  is_main = jax.process_index() == 0
  if joined and is_main:
    print(f"Joined {jax.process_count()} processes: {jax.device_count()} devices, "
          f"{jax.local_device_count()} per process.", flush=True)
  try:
    validate(config, jax.device_count())  # mesh and batch divisibility
  except ConfigError as e:
    fail(str(e))
  from clusjax.api import Pretrained, load_pretrained
  from clusjax.data.tasks import answer_vocab
  from clusjax.eval import evaluate
  from clusjax.parallel.mesh import create_mesh

  if args.mode.value == "train":
    from clusjax.train.errors import RunStopped
    from clusjax.train.loop import train
    start = time.perf_counter()
    try:
      model, state, tokenizer = train(config, workdir)
    except ConfigError as e:   # found only once the workdir is read (a teacher's tokenizer)
      fail(str(e))
    except RunStopped as e:   # disk full, unreadable checkpoints, non-finite steps in a row
      fail(str(e), code=1)
    if is_main:
      print(f"Trained to step {int(state.step)} in {time.perf_counter() - start:.0f} s.",
            flush=True)
    if not config.train.eval_at_end:
      return
    answers = answer_vocab(config, workdir) if config.task == "vqa" else None
    pretrained = Pretrained(model, state.params, tokenizer, config, state.active,
                            answers=answers)
  else:
    from clusjax.train.errors import RunStopped
    try:   # says which step it loaded (the newest readable checkpoint)
      pretrained = load_pretrained(workdir, mesh=create_mesh(config.mesh))
    except (FileNotFoundError, RunStopped) as e:
      fail(str(e), code=1)
  if is_main:
    print("Evaluation:", flush=True)
  # Every process evaluates (the params span all devices); process 0 writes.
  evaluate(pretrained.config, pretrained, workdir)


if __name__ == "__main__":
  main(sys.argv)
