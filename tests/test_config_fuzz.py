"""Bad --config overrides, generated from the configs' own keys, are refused in one line.

`bad_overrides` walks configs/clus_base.py:tiny and configs/vqa.py:tiny: unknown keys
at every depth, a key under a value, index syntax, a flag without its value, wrong
types, NaN / inf / huge / negative / zero numbers, unknown choices and paths, empty
strings, malformed syntax, missing files and variants. Each must exit non-zero with
one line naming the key (or flag, file, variant), no traceback, no workdir, in < 5 s.

The bulk runs in-process through launch/main.py's own `load` (what main() runs before
jax, SystemExit and stderr captured); a few run as real subprocesses to prove the same
end to end. benchmarks/bad_overrides.py runs them all as subprocesses, with timings.
"""
import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import time

import ml_collections
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
MAIN = os.path.join(ROOT, "launch", "main.py")
CONFIGS = ("configs/clus_base.py:tiny", "configs/vqa.py:tiny")
SECONDS = 5.0

# Keys where 0 cannot work (a size, a count, a rate that divides or a temperature);
# elsewhere 0 means off / none / the default.
ZERO_IS_BAD = {
    "grad_accum_steps", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.dcn.data",
    "mesh.dcn.fsdp", "mesh.dcn.tensor", "data.image_size", "data.shapes_num_train",
    "data.shapes_num_val", "data.shapes_num_test", "data.shapes_version",
    "data.captions_per_image", "data.max_text_len", "data.vocab_size",
    "data.questions_per_image", "model.embed_dim", "model.temperature_init",
    "model.fusion_depth", "model.vision.patch_size", "longnet.width", "longnet.num_heads",
    "longnet.mlp_dim", "loss.mlm_probability", "loss.unimodal.mask_probability",
    "prompt_labels.num_nouns", "prompt_labels.max_nouns", "prompt_labels.max_text_len",
    "clustering.num_prototypes", "clustering.max_prototypes", "clustering.temperature",
    "clustering.sinkhorn_epsilon", "clustering.sinkhorn_iters", "clustering.cluster_every",
    "clustering.queue_size", "clustering.dim", "optim.learning_rate", "train.batch_size",
    "train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_skipped_steps", "eval.batch_size", "eval.num_examples",
    "eval.transfer_examples", "finetune.supcon_temperature", "finetune.clce_temperature",
    "finetune.num_answers",
} | {f"model.{t}.{k}" for t in ("vision", "text") for k in ("width", "depth", "num_heads",
                                                            "mlp_dim")}
# String keys where any text can be right (a feature name, a directory made on demand, a
# TFDS name the shapes source does not read): no "unknown value" for them.
FREE_TEXT = {"data.image_key", "data.caption_key", "data.data_dir", "data.tfds_name"}


def _leaves(node, prefix=""):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def _sections(node, prefix=""):
  yield prefix
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _sections(value, f"{prefix}{key}.")


def _read_keys(config):
  """The keys validate reads for this config (a loss kind's settings only while it is on:
  the others may hold any finite value)."""
  from clusjax.config import RULES
  from clusjax.config_tasks import TASK_RULES
  return {rule[0] for rule in RULES + TASK_RULES if len(rule) < 4 or rule[3](config)}


def bad_overrides(spec):
  """[(extra argv, the text the one-line error must contain)] for config file `spec`."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_fuzzed_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant)
  read = _read_keys(config)
  cases = []

  def add(value_or_flag, key, names=None):
    flag = value_or_flag if key is None else f"--config.{key}={value_or_flag}"
    cases.append(([flag], names or f"config.{key}"))

  for section in _sections(config):   # unknown keys at every depth
    add(1, f"{section}no_such_key")
    if section:
      first = sorted(config if not section else _get(config, section[:-1]))[0]
      add(1, f"{section}{first}x")          # a misspelt key
  for key, value in _leaves(config):
    cases.append(([f"--config.{key}.no_such_key=1"], f"config.{key}"))   # under a value
    cases.append(([f"--config.{key}[0]=1"], f"config.{key}"))            # index syntax
    if not isinstance(value, bool):   # no value: absl would take the next flag as it
      cases.append(([f"--config.{key}"], f"--config.{key}"))
    if isinstance(value, bool):
      add("maybe", key, f"--config.{key}")
      add(2, key, f"--config.{key}")
    elif isinstance(value, int):
      add("abc", key, f"--config.{key}")
      add(1.5, key, f"--config.{key}")
      add(10**12, key)
    elif isinstance(value, float):
      add("abc", key, f"--config.{key}")
      for bad in ("nan", "inf", "-inf", "1e300"):
        add(bad, key)
    elif isinstance(value, str) and key not in FREE_TEXT and key in read:
      add("no_such_value", key)
      if value:
        add("", key)
    elif isinstance(value, tuple) and key in read:
      add("no_such_value", key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in read:
      add(-7, key)
      if key in ZERO_IS_BAD:
        add(0, key)
  for flag, names in (   # malformed syntax; a missing file and variant
      ("--config.", "--config."), ("--config..seed=1", "--config..seed=1"),
      ("--config.data..name=x", "--config.data..name=x"), ("--config.seed=", "--config.seed"),
      ("--config.train.batch_size==3", "--config.train.batch_size"),
      ("--config.data[0]=1", "config.data"), ("--noconfig.seed", "--noconfig.seed"),
      ("--config.eval.evaluators=(retrieval", "config.eval.evaluators"),
      ("--config=", "--config"), ("--config=configs/no_such_file.py", "no_such_file.py"),
      ("--config=README.md", "README.md"), (f"--config={path}:nonexistent", "nonexistent")):
    cases.append(([flag], names))
  return cases


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def _load_main():
  spec = importlib.util.spec_from_file_location("clusjax_launch_main", MAIN)
  main = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(main)
  return main


def _problems(code, stderr, seconds, names, workdir):
  """What is wrong with a refusal (empty: a clear one)."""
  lines = stderr.splitlines()
  out = []
  if code in (0, None):
    out.append(f"accepted (exit {code})")
  if "Traceback" in stderr or len(lines) != 1:
    out.append(f"{len(lines)} lines of stderr")
  elif names not in lines[0]:
    out.append(f"does not name {names!r}")
  if os.path.exists(workdir):
    out.append("left files in the workdir")
  if seconds >= SECONDS:
    out.append(f"took {seconds:.1f} s")
  return out


@pytest.mark.parametrize("spec", CONFIGS)
def test_generated_bad_overrides_are_refused_in_one_line(spec, tmp_path, monkeypatch):
  from absl import flags
  main = _load_main()
  monkeypatch.chdir(ROOT)    # the configs import `configs.downstream`; paths as a user types
  workdir = str(tmp_path / "workdir")
  cases = bad_overrides(spec)
  failures = []
  for extra, names in cases:
    argv = [MAIN, f"--config={spec}", *extra, f"--workdir={workdir}"]
    stderr, code, start = io.StringIO(), None, time.perf_counter()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
      try:
        main.load(argv, flags.FlagValues())
      except SystemExit as e:
        code = e.code
      except Exception as e:  # noqa: BLE001 (a traceback in a real run)
        code, stderr = "raised", io.StringIO(f"Traceback\n{type(e).__name__}: {e}")
    problems = _problems(code, stderr.getvalue(), time.perf_counter() - start, names, workdir)
    if problems:
      failures.append(f"{' '.join(extra)}: {', '.join(problems)}: {stderr.getvalue()[:300]!r}")
  assert len(cases) > 500
  assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:40])


# A few end to end: the exit code, one line, no traceback and no files of a real process.
END_TO_END = [
    (["--config.optim.learning_rate=nan"], "config.optim.learning_rate"),
    (["--config.data.eval_split="], "config.data.eval_split"),
    (["--config.clustering.dim[0]=1"], "config.clustering.dim"),
    (["--config.data.image_size=1000000000000"], "config.data.image_size"),
    (["--config=configs/no_such_file.py"], "no_such_file.py"),
    (["--config=configs/clus_base.py:nonexistent"], "nonexistent"),
]


@pytest.mark.parametrize("extra,names", END_TO_END)
def test_bad_overrides_end_to_end(extra, names, tmp_path):
  workdir = str(tmp_path / "workdir")
  argv = [sys.executable, MAIN, "--config=configs/clus_base.py:tiny", *extra,
          f"--workdir={workdir}"]
  start = time.perf_counter()
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
  seconds = time.perf_counter() - start
  assert proc.returncode == 2, proc.stderr
  assert not _problems(proc.returncode, proc.stderr, seconds, names, workdir), proc.stderr
  assert not proc.stdout
