"""Training stages: config checks, the clustered sampler's hard negatives, and
exact resume at and inside a clustered stage."""
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from clusjax import workdir as wd
from clusjax.config import ConfigError, train_stages, validate
from clusjax.data.sampler import ClusteredSampler
from clusjax.train.loop import train
from clusjax.train.stages import bisect, split_clusters
from clusjax.train.objective import mean_negative_similarity
from tests.conftest import micro_config
from tests.train.test_train import _metrics


def test_stages_config_errors(shapes_data_dir):
  def check(stages, match, **kw):
    config = micro_config(shapes_data_dir, train__stages=stages, **kw)
    with pytest.raises(ConfigError, match=match):
      validate(config)

  check(({"steps": 4}, {"steps": 3}), r"7 steps in all; config.train.num_steps=6")
  check(({"steps": 6, "sampler": "hard"},), r"stages\[0\].sampler='hard'")
  check(({"steps": 3}, {"steps": 3, "mix": 2}), r"stages\[1\].mix=2")
  check(({"steps": 6, "loss": {"itc.kind": 1.0}},), r"sets 'itc.kind'; a stage sets loss weights")
  check(({"steps": 6, "epochs": 1},), r"unknown key\(s\) \['epochs'\]")
  check(({"steps": 0}, {"steps": 6}), r"stages\[0\].steps=0")
  check(({"fraction": 0.5}, {"fraction": 0.3}), r"4.8 steps in all; config.train.num_steps=6")
  check(({"steps": 3, "fraction": 0.5}, {"steps": 3}), r"stages\[0\] must give one of steps")
  check(({"fraction": 1.5},), r"stages\[0\].fraction=1.5 must be a number in \(0, 1\]")
  check(({"fraction": 0.9}, {"fraction": 0.1}), r"stages\[1\] has 0 steps at",
        train__num_steps=2)
  config = micro_config(shapes_data_dir, train__stages=(
      {"steps": 2}, {"steps": 4, "sampler": "clustered", "loss": {"unimodal.image_weight": 1}}))
  validate(config)
  stages = train_stages(config)
  assert [(s.start, s.end, s.sampler) for s in stages] == [(0, 2, "random"), (2, 6, "clustered")]
  assert stages[1].loss == (("unimodal.image_weight", 1),) and stages[1].mix == 0.5


def test_fraction_stages_follow_num_steps(shapes_data_dir):
  """Stages given as fractions of num_steps follow an override of it;
  rounding never changes the total: the last fraction stage takes the rest."""
  stages = ({"fraction": 220 / 340}, {"fraction": 120 / 340, "sampler": "clustered", "mix": 0.75})
  for num_steps, ends in ((340, (220, 340)), (100, (65, 100)), (7, (5, 7)), (3, (2, 3))):
    config = micro_config(shapes_data_dir, train__stages=stages, train__num_steps=num_steps)
    validate(config)
    got = train_stages(config)
    assert tuple(s.end for s in got) == ends and got[0].start == 0, (num_steps, got)
    assert got[1].sampler == "clustered" and got[1].mix == 0.75
  thirds = ({"fraction": 1 / 3}, {"fraction": 1 / 3}, {"fraction": 1 / 3})
  config = micro_config(shapes_data_dir, train__stages=thirds, train__num_steps=10)
  assert [s.end - s.start for s in train_stages(config)] == [3, 3, 4]
  mixed = ({"steps": 2}, {"fraction": 0.5})
  config = micro_config(shapes_data_dir, train__stages=mixed, train__num_steps=4)
  assert [s.end for s in train_stages(config)] == [2, 4]


def test_a_cluster_without_structure_is_bisected_to_the_size_limit():
  """Points with no density structure (one Gaussian blob): DBSCAN finds one cluster
  (or noise), and the halving along the principal direction leaves parts of at most
  max_size, each a slab of nearby points."""
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2000, 8)) * np.array([8, 4, 1, 1, 1, 1, 1, 1])
  parts = bisect(feats, 300)
  assert sorted(np.concatenate(parts).tolist()) == list(range(2000))
  assert max(map(len, parts)) <= 300 and len(parts) == 8   # 2000 -> 1000 -> 500 -> 250
  # The first cut is across the widest axis, at its median: 1,000 rows each side of 0.
  low, high = sorted((feats[np.concatenate(parts[:4]), 0], feats[np.concatenate(parts[4:]), 0]),
                     key=np.mean)
  assert np.mean(high) - np.mean(low) > 10 and np.mean(low > 0) < 0.05 < 0.95 < np.mean(high > 0)
  spread = np.mean([feats[p].std(axis=0).sum() for p in parts])
  assert spread < 0.7 * feats.std(axis=0).sum()
  cc = ml_collections.ConfigDict(dict(dim=2, min_samples=0, eps=0.0))
  labels = split_clusters(feats, cc, max_size=300)
  sizes = np.bincount(labels[labels >= 0])
  assert sizes.max() <= 300 and len(sizes) >= 5, sizes
  np.testing.assert_array_equal(labels, split_clusters(feats, cc, max_size=300))


def test_clustered_batches_have_harder_negatives():
  """On features with cluster structure, the clustered batches' mean negative
  similarity (the step's logged metric) is above random batches'."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(8, 16))
  which = rng.integers(0, 8, 1024)
  def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  image = unit(centres[which] + 0.4 * rng.normal(size=(1024, 16)))
  text = unit(centres[which] + 0.4 * rng.normal(size=(1024, 16)))
  feats = np.concatenate([image, text], 1) / np.sqrt(2)
  cc = ml_collections.ConfigDict(dict(dim=2, min_samples=0, eps=0.0))
  labels = split_clusters(feats, cc, max_size=256)
  sizes = np.bincount(labels[labels >= 0])
  assert len(sizes) >= 4 and sizes.max() <= 256, sizes
  def mean_sim(batches):
    return np.mean([float(mean_negative_similarity(image[b], text[b])) for b in batches])
  clustered = ClusteredSampler(labels, 1024, 32, mix=0.5, seed=0, stage=1)
  uniform = ClusteredSampler(labels, 1024, 32, mix=0.0, seed=0, stage=1)
  hard, easy = mean_sim(map(clustered, range(30))), mean_sim(map(uniform, range(30)))
  assert hard > easy + 0.1, (hard, easy)


def test_clustered_stage_resumes_exactly(shapes_data_dir, tmp_path):
  """Stage 0 random, stage 1 clustered with the uni-modal terms on: the stage
  switch recompiles the step and clusters the training set; a run killed at
  the boundary or inside stage 1 resumes to the uninterrupted losses."""
  config = micro_config(
      shapes_data_dir, train__num_steps=9, train__cluster_pool=128, train__cluster_split=32,
      train__stages=({"steps": 3}, {"steps": 6, "sampler": "clustered", "mix": 1.0, "loss": {
          "unimodal.image_weight": 1.0, "unimodal.text_weight": 1.0}}))
  full = tmp_path / "full"
  _, state_full, _ = train(config, str(full))
  assert (full / "stages" / "stage1_clusters.npz").exists()
  steps = sorted(int(p.name) for p in (full / wd.CHECKPOINT_DIR).iterdir() if p.name.isdigit())
  assert steps == [3, 6, 9]
  logs = {m["step"]: m for m in _metrics(full) if "loss" in m}
  assert all("uni_image" not in logs[s] for s in (1, 2, 3))
  assert all(logs[s]["uni_image"] > 0 and logs[s]["uni_text"] > 0 for s in range(4, 10))
  assert all(-1 <= logs[s]["negative_similarity"] <= 1 for s in logs)

  for killed_after in (6, 3):   # inside stage 1, and at the boundary
    resumed = tmp_path / f"resumed{killed_after}"
    shutil.copytree(full, resumed)
    for step in steps:
      if step > killed_after:
        shutil.rmtree(resumed / wd.CHECKPOINT_DIR / str(step))
    (resumed / wd.METRICS_FILE).unlink()
    _, state_resumed, _ = train(config, str(resumed))
    again = {m["step"]: m["loss"] for m in _metrics(resumed) if "loss" in m}
    assert sorted(again) == list(range(killed_after + 1, 10))
    for step in again:
      np.testing.assert_allclose(again[step], logs[step]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.device_get(state_full.params)),
                    jax.tree.leaves(jax.device_get(state_resumed.params))):
      np.testing.assert_array_equal(a, b)
