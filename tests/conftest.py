"""Test set-up: 8 fake CPU devices and a persistent compile cache.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""
import hashlib
import os
import sys

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# 8 fake CPU devices, and no YNN fusions: XLA:CPU in jaxlib 0.10.2 turns them on
# by default, and they crash or hang on some CPUs (jax-ml/jax#39257) in a worker
# thread, which kills the whole pytest process. Flags already set are kept.
TEST_XLA_FLAGS = (f"{DEVICE_COUNT_FLAG}=8", "--xla_cpu_experimental_ynn_fusion_type=")
_flags = os.environ.get("XLA_FLAGS", "").split()
_flags += [f for f in TEST_XLA_FLAGS
           if not any(g.split("=")[0] == f.split("=")[0] for g in _flags)]
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jaxlib  # noqa: E402


def _host_key():
  """jaxlib version + this CPU's model and feature flags: XLA:CPU executables are
  compiled for the host, so a cache copied to another machine is not read."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
  except OSError:
    lines = []
  return f"{jaxlib.__version__}-{hashlib.sha256(''.join(lines).encode()).hexdigest()[:12]}"


jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("CLUSJAX_TEST_CACHE", os.path.join(
        os.path.expanduser("~/.cache/clusjax/jax_test_cache"), _host_key())))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from clusjax.config import set_key  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # for `from configs import clus_base`


# The tiny config shrunk further (seconds per run), as --config overrides.
MICRO = {
    "data.image_size": 32,
    "data.shapes_num_train": 256,
    "data.shapes_num_val": 16,
    "data.shapes_num_test": 64,
    "data.max_text_len": 24,
    "data.vocab_size": 128,
    "model.vision.patch_size": 8,
    # The patch stem (:tiny ships the CNN stem, tests/models/test_vit.py covers it): the
    # export tests need it, and it keeps each micro step cheap.
    "model.vision.stem": "patch",
    "model.vision.stem_max_cls": False,
    "model.vision.stem_width": 0,
    "model.embed_dim": 16,
    "train.batch_size": 16,
    "train.num_steps": 6,
    "train.log_every": 1,
    "train.checkpoint_every": 3,
    "eval.batch_size": 32,
    "eval.num_examples": 64,
    "longnet.width": 16,
    "longnet.num_heads": 2,
    "longnet.mlp_dim": 32,
    # The uni-modal views (on in :tiny) add a pass of each tower to every micro step;
    # the tests of them turn them on. Place twins stay on (cheap: drawn on the fly).
    "loss.unimodal.image_weight": 0.0,
    "loss.unimodal.text_weight": 0.0,
    # Twins as ITM negatives throughout (:tiny stops at 55%), so the batches that tests
    # build without twins fit the step; the tests of the switch set it.
    "loss.itm_twin_negatives": 1.0,
}
for _tower in ("vision", "text"):
  MICRO.update({f"model.{_tower}.width": 32, f"model.{_tower}.depth": 1,
                f"model.{_tower}.num_heads": 2, f"model.{_tower}.mlp_dim": 64})


def subprocess_env(**extra):
  """The environment for a command run as a user runs it: one CPU device (the
  device-count flag dropped, the other test XLA flags kept), plus `extra`."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(DEVICE_COUNT_FLAG)]
  return dict(os.environ, XLA_FLAGS=" ".join(flags), **extra)


def micro_config(data_dir, **overrides):
  """configs/clus_base.py:tiny with MICRO (and `overrides`, keys with '__' for '.')."""
  from configs import clus_base
  c = clus_base.get_config("tiny")
  c.data.data_dir = str(data_dir)
  items = dict(MICRO, **{k.replace("__", "."): v for k, v in overrides.items()})
  for key, value in items.items():
    set_key(c, key, value)
  return c


def micro_flags(data_dir, **overrides):
  """The same config as command-line flags for launch/main.py."""
  items = dict(MICRO, **{k.replace("__", "."): v for k, v in overrides.items()})
  return [f"--config.data.data_dir={data_dir}"] + [f"--config.{k}={v}" for k, v in items.items()]


class CaptionSource:
  """A data source of `captions`, record i with an 8 x 8 image filled with i
  (so a batch row tells which record it came from)."""

  def __init__(self, captions):
    self.captions = captions

  def __len__(self):
    return len(self.captions)

  def __getitem__(self, i):
    return {"image": np.full((8, 8, 3), i, np.uint8), "caption": self.captions[i]}


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """One TFDS data dir for the whole session (the set is built once)."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def trained_workdir(shapes_data_dir, tmp_path_factory):
  """Two training steps of the micro config, shared by the tests that need a trained
  workdir (export, fine-tuning's init_from): enough for an exactness test."""
  from clusjax.train.loop import train
  workdir = tmp_path_factory.mktemp("trained_run")
  config = micro_config(shapes_data_dir, train__num_steps=2, train__checkpoint_every=2)
  train(config, str(workdir))
  return workdir


def task_micro_config(task, data_dir, **overrides):
  """configs/<task>.py:tiny shrunk like MICRO (same towers, so a MICRO workdir is its
  init_from), plus `overrides` ('__' for '.')."""
  import importlib
  c = importlib.import_module(f"configs.{task}").get_config("tiny")
  c.data.data_dir = str(data_dir)
  # MICRO's towers have the patch stem: a held-fixed CNN stem (vqa.py:tiny) becomes the
  # patch embedding, so the micro fine-tunes still run with a frozen module.
  c.optim.frozen = tuple("vision/patch_embed" if p == "vision/cnn_stem" else p
                         for p in c.optim.frozen)
  items = dict(MICRO, **{k.replace("__", "."): v for k, v in overrides.items()})
  for key, value in items.items():
    set_key(c, key, value)
  return c
