import numpy as np

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
