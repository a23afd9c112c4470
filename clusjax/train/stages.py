"""Training stages: each with its steps, loss weights and batch sampler.

`config.train.stages` is a tuple of dicts, run in order; their steps add up
to `config.train.num_steps`. () is one stage of random batches.

    dict(steps=200)                                            # random batches
    dict(steps=200, sampler="clustered", mix=0.5,
         loss={"unimodal.image_weight": 1.0})                  # + its loss weights

A `clustered` stage starts by embedding the first `config.train.cluster_pool`
training examples with the current model (image and text features, joined),
clusters them with the project's clustering (DBSCAN in the clustering space,
`clusjax.clustering.cluster_points`) and samples its batches from that
assignment (`clusjax.data.sampler.ClusteredSampler`): every clustered stage
refreshes it. The assignment is saved in <workdir>/stages before the stage's
first checkpoint, so a run resumed anywhere in the stage reads the batches it
would have read.
"""
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from clusjax import workdir as wd
from clusjax.clustering import cluster_points
from clusjax.config import set_key
from clusjax.data import iterate_eval

STAGES_DIR = "stages"


def stage_at(stages, step):
  """The stage that runs step `step` (0-based); the last one from its end on."""
  return next((s for s in stages if step < s.end), stages[-1])


def stage_config(config, stage):
  """A copy of `config` with the stage's loss weights."""
  c = config.copy_and_resolve_references()
  for key, weight in stage.loss:
    set_key(c.loss, key, weight)
  return c


def _assignment_file(workdir, stage):
  return wd.path(workdir, os.path.join(STAGES_DIR, f"stage{stage.index}_clusters.npz"))


def embed_training_set(pretrained, source, num_examples):
  """Joined, unit-norm image + text features [N, 2E] of the first examples of `source`."""
  config = pretrained.config
  feats = []
  for batch in iterate_eval(source, batch_size=config.eval.batch_size,
                            image_size=config.data.image_size, tokenizer=pretrained.tokenizer,
                            max_text_len=config.data.max_text_len, num_examples=num_examples):
    n = int(batch["valid"].sum())
    image = pretrained.encode_image(batch["image"][:n])
    text = pretrained.encode_text(batch["caption"][:n])
    feats.append(np.concatenate([image, text], axis=1) / np.sqrt(2.0))
  return np.concatenate(feats)


# Rounds of re-clustering clusters larger than config.train.cluster_split.
SPLIT_ROUNDS = 3


def bisect(feats, max_size):
  """Rows of `feats` [N, D] in parts of at most `max_size` (index arrays): the
  rows cut at the median of their projection on their first principal direction,
  each half cut again while it is larger."""
  parts, todo = [], [np.arange(len(feats))]
  while todo:
    rows = todo.pop()
    if len(rows) <= max_size:
      parts.append(rows)
      continue
    x = feats[rows] - feats[rows].mean(axis=0)
    direction = np.linalg.svd(x, full_matrices=False)[2][0]
    order = np.argsort(x @ direction, kind="stable")
    todo += [rows[order[len(rows) // 2:]], rows[order[:len(rows) // 2]]]
  return parts


def split_clusters(feats, clustering_config, max_size):
  """DBSCAN of the features (`cluster_points`), then each cluster larger than
  `max_size` clustered again on its own (its own principal plane and elbow
  eps), for up to SPLIT_ROUNDS rounds: density alone tends to leave one
  cluster with most of the data, whose batches would be random ones. A cluster
  still larger (one whose own density finds no structure) is cut in halves at the
  median of its features along their first principal direction, and the halves
  again, until none is larger than `max_size` (`bisect`).

  Returns labels int32 [N], 0..k-1 by first appearance, -1 for noise.
  """
  cc = clustering_config
  kw = dict(dim=cc.dim, min_samples=cc.min_samples or None, eps=cc.eps or None)
  labels = np.array(cluster_points(feats, **kw)[0])
  whole = set()   # clusters whose own density finds no structure
  for _ in range(SPLIT_ROUNDS):
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    big = [c for c in ids[sizes > max_size] if c not in whole]
    if not big:
      break
    for c in big:
      member = labels == c
      sub = np.asarray(cluster_points(feats, member, **kw)[0])
      if len(np.unique(sub[member & (sub >= 0)])) < 2:
        whole.add(c)
        continue
      labels = np.where(member, np.where(sub >= 0, labels.max() + 1 + sub, -1), labels)
  for c in np.unique(labels[labels >= 0]):
    member = np.flatnonzero(labels == c)
    for part in bisect(feats[member], max_size)[1:]:
      labels[member[part]] = labels.max() + 1
  # Renumber 0..k-1 in order of first appearance.
  found = labels >= 0
  ids, first = np.unique(labels[found], return_index=True)
  lookup = np.full(labels.max(initial=-1) + 1, -1, np.int32)
  lookup[ids[np.argsort(first)]] = np.arange(len(ids), dtype=np.int32)
  return np.where(found, lookup[np.maximum(labels, 0)], -1).astype(np.int32)


def cluster_assignment(stage, workdir, source, pretrained):
  """The clustered stage's assignment: read from the workdir, or made from the
  model now (embed, cluster, save) at the stage's start.

  Args:
    pretrained: () -> `clusjax.api.Pretrained` of the model at the stage's
      start, or None (a resumed run: the assignment must be in the workdir).
  Returns (labels int32 [P], the first P records' clusters, -1 noise; stats dict).
  """
  file = _assignment_file(workdir, stage)
  if os.path.exists(file):
    with np.load(file) as f:
      return f["labels"], json.loads(str(f["stats"]))
  if pretrained is None:
    raise FileNotFoundError(f"{file} is missing: the checkpoint is inside clustered stage "
                            f"{stage.index}, whose batches come from that assignment.")
  pretrained = pretrained()
  config = pretrained.config
  pool = min(config.train.cluster_pool, len(source))
  feats = embed_training_set(pretrained, source, pool)
  if len(feats) < pool:
    raise RuntimeError(f"stage {stage.index}: only {len(feats)} of the first {pool} training "
                       "records could be read for clustering.")
  labels = split_clusters(feats, config.clustering, config.train.cluster_split)
  sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, int)
  stats = {"num_clusters": int(len(sizes)), "noise_fraction": float(np.mean(labels < 0)),
           "largest_cluster": int(sizes.max(initial=0)), "pool": int(pool)}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(file), exist_ok=True)
    tmp = file + ".partial.npz"
    np.savez(tmp, labels=labels, stats=json.dumps(stats))
    os.replace(tmp, file)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"stage{stage.index}_clusters")
  return labels, stats


def describe_assignment(stage, stats):
  return (f"stage {stage.index}: clustered {stats['pool']} training examples: "
          f"{stats['num_clusters']} clusters (largest {stats['largest_cluster']}), "
          f"noise {stats['noise_fraction']:.3f}")
