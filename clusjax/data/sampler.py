"""Batch samplers beyond uniform shuffling: clustered hard negatives.

A `ClusteredSampler` builds each global batch from examples that share a
cluster of the current assignment (their in-batch negatives are hard: the
same kinds of picture and caption) mixed with uniformly drawn examples:

    mix * B   from one cluster (drawn with probability ~ its size; when it is
              smaller than that, from the next cluster drawn, and so on)
    rest      uniform over the whole training set, no repeats in the batch

Batch s is a pure function of (seed, stage, s, assignment), so a resumed run
sees the batches it would have seen; every process computes the same global
batch and reads its own slice of it.
"""
import threading

import numpy as np


class ClusteredSampler:
  """step -> global batch of record indices (int64 [batch_size])."""

  def __init__(self, labels, num_records, batch_size, *, mix, seed, stage):
    """
    Args:
      labels: int [P], the cluster of each of the first P records (-1 = noise).
      num_records: records in the training set (P <= num_records).
      batch_size: the global batch.
      mix: fraction of each batch drawn from clusters, in [0, 1].
      seed, stage: with the step, the seed of each batch's draw.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) > num_records:
      raise ValueError(f"labels of shape {labels.shape} for {num_records} records")
    if batch_size > num_records:
      raise ValueError(f"batch size {batch_size} exceeds the {num_records} training records")
    if not 0.0 <= mix <= 1.0:
      raise ValueError(f"mix={mix} must be in [0, 1]")
    clusters = [np.flatnonzero(labels == c) for c in range(int(labels.max(initial=-1)) + 1)]
    # A cluster of one gives no negative within the cluster.
    self.clusters = [m for m in clusters if len(m) > 1]
    sizes = np.array([len(m) for m in self.clusters], np.float64)
    self.probs = sizes / sizes.sum() if len(sizes) else sizes
    self.num_records, self.batch_size = num_records, batch_size
    self.from_clusters = int(round(mix * batch_size)) if self.clusters else 0
    self.seed, self.stage = seed, stage

  def __call__(self, step):
    rng = np.random.default_rng([self.seed, self.stage, step])
    chosen = []
    if self.from_clusters:
      order = rng.choice(len(self.clusters), len(self.clusters), replace=False, p=self.probs)
      need = self.from_clusters
      for c in order:
        take = rng.permutation(self.clusters[c])[:need]
        chosen.append(take)
        need -= len(take)
        if not need:
          break
    chosen = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    rest = self.batch_size - len(chosen)
    # Draw a few extra so that dropping the cluster's examples still leaves enough.
    extra = rng.choice(self.num_records, min(self.num_records, rest + len(chosen)), replace=False)
    extra = extra[~np.isin(extra, chosen)][:rest]
    return rng.permutation(np.concatenate([chosen, extra]).astype(np.int64))


class SampledIndex:
  """Grain map: position j of this process's stream -> record index.

  Position j is row `process_index * local_batch + j % local_batch` of the
  global batch `sampler(j // local_batch)`. Keeps the last few batches
  (Grain maps positions in threads, a batch's rows close together).
  """

  def __init__(self, sampler, local_batch, process_index):
    self.sampler, self.local_batch, self.process_index = sampler, local_batch, process_index
    self._cache, self._lock = {}, threading.Lock()

  def __getstate__(self):   # picklable for Grain worker processes
    return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state, _cache={}, _lock=threading.Lock())

  def __call__(self, position):
    step, row = divmod(int(position), self.local_batch)
    with self._lock:
      batch = self._cache.get(step)
      if batch is None:
        batch = self.sampler(step)
        if len(self._cache) >= 8:
          self._cache.pop(min(self._cache))
        self._cache[step] = batch
    return int(batch[self.process_index * self.local_batch + row])
