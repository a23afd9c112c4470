import numpy as np
import pytest

from clusjax.eval import recall_at_k


def _recall_loops(sim, k):
  """Independent reference: sort each row and look for the match in the top k."""
  hits = [i in np.argsort(-sim[i], kind="stable")[:k] for i in range(len(sim))]
  return float(np.mean(hits))


def test_recall_matches_sorting_reference():
  rng = np.random.default_rng(0)
  sim = rng.normal(size=(50, 50))
  sim[np.arange(50), np.arange(50)] += 1.5
  got = recall_at_k(sim)
  for k in (1, 5, 10):
    assert got[f"i2t_r{k}"] == _recall_loops(sim, k)
    assert got[f"t2i_r{k}"] == _recall_loops(sim.T, k)
  assert 0 < got["i2t_r1"] < got["i2t_r5"] <= got["i2t_r10"] < 1


def test_perfect_and_reversed():
  eye = np.eye(20)
  assert recall_at_k(eye)["i2t_r1"] == 1.0 and recall_at_k(eye)["t2i_r1"] == 1.0
  anti = -np.eye(20)
  assert recall_at_k(anti)["i2t_r10"] == 0.0


def test_rerank_reorders_only_the_top_k():
  """An oracle ITM (1 for the true pair, 0 otherwise) lifts every match that ITC
  put in its top k to rank 1, and leaves the order below the top k to ITC."""
  from clusjax.eval.retrieval import rerank_scores
  rng = np.random.default_rng(1)
  n, k = 40, 5
  sim = rng.normal(size=(n, n))
  sim[np.arange(n), np.arange(n)] += 1.0
  calls = []

  def oracle(img, txt):
    calls.append(len(img))
    return (np.asarray(img) == np.asarray(txt)).astype(np.float64)

  i2t, t2i = rerank_scores(sim, k, oracle)
  assert calls == [n * k, n * k]
  itc = recall_at_k(sim, ks=(1, k, 10))
  got = recall_at_k(i2t, ks=(1, k, 10), t2i_similarity=t2i)
  for d in ("i2t", "t2i"):
    assert got[f"{d}_r1"] == itc[f"{d}_r{k}"]        # in the top k -> now first
    assert got[f"{d}_r{k}"] == itc[f"{d}_r{k}"]
    assert got[f"{d}_r10"] == itc[f"{d}_r10"]        # beyond k: ITC order kept
  # Each query's top k stay its top k, now above everything else.
  for i in range(n):
    top = set(np.argsort(-sim[i])[:k])
    assert set(np.argsort(-i2t[i])[:k]) == top


def test_mean_top1_probability():
  from clusjax.eval.retrieval import mean_top1_probability
  sim = np.array([[1.0, 0.0], [0.5, 0.5]])
  p0 = np.exp(10.0) / (np.exp(10.0) + 1.0)
  assert mean_top1_probability(sim, 10.0) == pytest.approx((p0 + 0.5) / 2)
  rng = np.random.default_rng(0)
  sim = rng.uniform(-1, 1, (20, 30))
  # A larger scale (a lower temperature) makes the softmax more peaked.
  assert mean_top1_probability(sim, 50.0) > mean_top1_probability(sim, 5.0) > 1 / 30
