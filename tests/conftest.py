"""Test set-up: 8 fake CPU devices and a persistent compile cache.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("CLUSJAX_TEST_CACHE", os.path.expanduser("~/.cache/clusjax/jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import sys  # noqa: E402

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
}
for _tower in ("vision", "text"):
  MICRO.update({f"model.{_tower}.width": 32, f"model.{_tower}.depth": 1,
                f"model.{_tower}.num_heads": 2, f"model.{_tower}.mlp_dim": 64})


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
