"""The clustered sampler: batches from one cluster + random, deterministic by step."""
import numpy as np
import pytest

from clusjax import data
from clusjax.data.sampler import ClusteredSampler
from tests.data.test_pipeline import IndexSource, _ids, tok  # noqa: F401 - fixture

# 60 records: clusters 0 (records 0-9), 1 (10-29), 2 (30-31); 32-39 noise;
# 40-59 not in the clustered pool.
LABELS = np.array([0] * 10 + [1] * 20 + [2] * 2 + [-1] * 8)


def _cluster_of(index):
  return LABELS[index] if index < len(LABELS) else -2


def test_batches_take_mix_from_clusters_and_the_rest_at_random():
  sampler = ClusteredSampler(LABELS, 60, 16, mix=0.5, seed=0, stage=1)
  seen = set()
  for step in range(50):
    batch = sampler(step)
    assert len(batch) == len(set(batch.tolist())) == 16 and batch.max() < 60
    assert sum(_cluster_of(i) >= 0 for i in batch) >= 8
    seen.update(batch.tolist())
  assert seen == set(range(60))        # the random part reaches every record
  np.testing.assert_array_equal(sampler(7), ClusteredSampler(LABELS, 60, 16, mix=0.5, seed=0,
                                                             stage=1)(7))
  assert not np.array_equal(sampler(7), sampler(8))
  assert not np.array_equal(sampler(7), ClusteredSampler(LABELS, 60, 16, mix=0.5, seed=0,
                                                         stage=2)(7))


def test_mix_one_is_all_cluster_and_zero_is_random():
  full = ClusteredSampler(LABELS, 60, 8, mix=1.0, seed=0, stage=0)
  for step in range(20):
    # One cluster, and the next one drawn when it is smaller than the batch.
    clusters = {_cluster_of(i) for i in full(step)}
    assert -1 not in clusters and -2 not in clusters and len(clusters) <= 2
    assert len(clusters) == 1 or 2 in clusters
  none = ClusteredSampler(LABELS, 60, 8, mix=0.0, seed=0, stage=0)
  assert {_cluster_of(i) for s in range(20) for i in none(s)} >= {-1, -2}


def test_sampler_rejects_bad_input():
  with pytest.raises(ValueError, match="mix=1.5"):
    ClusteredSampler(LABELS, 60, 8, mix=1.5, seed=0, stage=0)
  with pytest.raises(ValueError, match="batch size 80"):
    ClusteredSampler(LABELS, 60, 80, mix=0.5, seed=0, stage=0)
  with pytest.raises(ValueError, match="for 30 records"):
    ClusteredSampler(LABELS, 30, 8, mix=0.5, seed=0, stage=0)


def test_sampled_iterator_reads_the_sampler_batches_per_process_and_restores(tok):  # noqa: F811
  sampler = ClusteredSampler(LABELS, 60, 8, mix=0.5, seed=0, stage=1)
  args = dict(global_batch_size=8, seed=0, image_size=8, tokenizer=tok, max_text_len=24)
  halves = [data.make_sampled_iterator(IndexSource(60), sampler, process_index=p, process_count=2,
                                       **args) for p in range(2)]
  for step in range(3):
    assert _ids(next(halves[0])) + _ids(next(halves[1])) == sampler(step).tolist()
  it = data.make_sampled_iterator(IndexSource(60), sampler, **args)
  next(it)
  state = it.get_state()
  expected = [_ids(next(it)) for _ in range(2)]
  again = data.make_sampled_iterator(IndexSource(60), sampler, **args)
  again.set_state(state)
  assert [_ids(next(again)) for _ in range(2)] == expected == [sampler(1).tolist(),
                                                               sampler(2).tolist()]
