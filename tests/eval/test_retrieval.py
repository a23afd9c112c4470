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
    calls.append(set(zip(img.tolist(), txt.tolist())))
    assert len(calls[-1]) == len(img)   # each pair scored once
    return (np.asarray(img) == np.asarray(txt)).astype(np.float64)

  i2t, t2i = rerank_scores(sim, k, oracle)
  # One call, on the union of both directions' top-k pairs.
  i2t_pairs = {(i, int(j)) for i in range(n) for j in np.argsort(-sim[i])[:k]}
  t2i_pairs = {(int(i), j) for j in range(n) for i in np.argsort(-sim[:, j])[:k]}
  assert calls == [i2t_pairs | t2i_pairs] and len(i2t_pairs | t2i_pairs) < 2 * n * k
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


def _multi_caption_loops(sim, text_image, k):
  """Independent reference for several captions per image, one query at a time.

  i2t: sort the captions of image i (stable, best first); the hit position is the
  first own caption's, moved up past the captions tied with it (ties count for
  the query). Images without captions are skipped. t2i: the same for the image
  of each caption among all images.
  """
  i2t = []
  for i in range(sim.shape[0]):
    own = [j for j in range(sim.shape[1]) if text_image[j] == i]
    if not own:
      continue
    order = list(np.argsort(-sim[i], kind="stable"))
    first = min(order.index(j) for j in own)
    while first > 0 and sim[i, order[first - 1]] == sim[i, order[first]]:
      first -= 1
    i2t.append(first < k)
  t2i = []
  for j in range(sim.shape[1]):
    order = list(np.argsort(-sim[:, j], kind="stable"))
    pos = order.index(text_image[j])
    while pos > 0 and sim[order[pos - 1], j] == sim[order[pos], j]:
      pos -= 1
    t2i.append(pos < k)
  return float(np.mean(i2t)), float(np.mean(t2i))


def _check_multi(sim, text_image, ks=(1, 5, 10)):
  got = recall_at_k(sim, ks=ks, text_image=text_image)
  for k in ks:
    i2t, t2i = _multi_caption_loops(sim, text_image, k)
    assert got[f"i2t_r{k}"] == pytest.approx(i2t, abs=1e-12)
    assert got[f"t2i_r{k}"] == pytest.approx(t2i, abs=1e-12)
  rsum = sum(got[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
  assert got["rsum"] == pytest.approx(rsum)
  return got


def test_multi_caption_five_per_image():
  rng = np.random.default_rng(3)
  n_img = 40
  text_image = np.repeat(np.arange(n_img), 5)
  rng.shuffle(text_image)                       # captions need not be grouped
  sim = rng.normal(size=(n_img, len(text_image)))
  sim[text_image, np.arange(len(text_image))] += 1.0
  got = _check_multi(sim, text_image)
  assert 0 < got["i2t_r1"] < got["i2t_r10"] < 1 and 0 < got["t2i_r1"] < got["t2i_r10"] < 1
  # Any one of 5 captions in the top k is easier than one given caption's image.
  assert got["i2t_r1"] > got["t2i_r1"]


def test_multi_caption_uneven_and_missing_images():
  rng = np.random.default_rng(4)
  n_img = 30
  counts = rng.integers(1, 5, n_img)
  counts[[3, 17]] = 0                           # images without captions: skipped
  text_image = np.repeat(np.arange(n_img), counts)
  rng.shuffle(text_image)
  sim = rng.normal(size=(n_img, len(text_image)))
  sim[text_image, np.arange(len(text_image))] += 0.8
  _check_multi(sim, text_image, ks=(1, 3, 5, 10))
  # Skipped, not counted as misses: the i2t mean is over the 28 captioned images.
  sim_perfect = np.full(sim.shape, -1.0)
  sim_perfect[text_image, np.arange(len(text_image))] = 1.0
  got = recall_at_k(sim_perfect, text_image=text_image)
  assert got["i2t_r1"] == 1.0 and got["t2i_r1"] == 1.0 and got["rsum"] == 6.0


def test_multi_caption_ties_count_for_the_query():
  # Scores in {0, 1, 2}: many ties between own and other captions / images.
  rng = np.random.default_rng(5)
  text_image = np.repeat(np.arange(12), 3)
  sim = rng.integers(0, 3, size=(12, 36)).astype(np.float64)
  _check_multi(sim, text_image, ks=(1, 2, 5))
  # All scores equal: every match ranks first.
  got = recall_at_k(np.zeros((4, 8)), text_image=np.repeat(np.arange(4), 2))
  assert got["i2t_r1"] == 1.0 and got["t2i_r1"] == 1.0


def test_multi_caption_best_caption_counts():
  """Image 0's captions 0 and 1: caption 1 is its top text, so i2t_r1 = 1 for it
  even though caption 0 ranks last."""
  sim = np.array([[0.0, 0.9, 0.5, 0.4],
                  [0.1, 0.2, 0.8, 0.7]])
  got = recall_at_k(sim, ks=(1,), text_image=np.array([0, 0, 1, 1]))
  assert got["i2t_r1"] == 1.0
  # t2i: caption 0's image (0) scores 0.0 < 0.1, a miss; the others hit.
  assert got["t2i_r1"] == 0.75


def test_paired_is_unchanged():
  rng = np.random.default_rng(6)
  sim = rng.normal(size=(25, 25))
  sim[np.arange(25), np.arange(25)] += 1.0
  t2i = sim + rng.normal(scale=0.3, size=sim.shape)
  paired = recall_at_k(sim, t2i_similarity=t2i)
  assert paired == recall_at_k(sim, t2i_similarity=t2i, text_image=np.arange(25))
  for k in (1, 5, 10):
    assert paired[f"i2t_r{k}"] == _recall_loops(sim, k)
    assert paired[f"t2i_r{k}"] == _recall_loops(t2i.T, k)
  assert set(paired) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"rsum"}
  assert paired["rsum"] == pytest.approx(sum(v for key, v in paired.items() if key != "rsum"))


def test_bad_text_image_raises():
  sim = np.zeros((3, 6))
  with pytest.raises(ValueError, match="text_image"):
    recall_at_k(sim, text_image=np.array([0, 0, 1, 1, 2]))          # 5 != N_txt
  with pytest.raises(ValueError, match="text_image"):
    recall_at_k(sim, text_image=np.array([0, 0, 1, 1, 2, 3]))       # image 3 of 3
  with pytest.raises(ValueError, match="text_image"):
    recall_at_k(sim, text_image=np.array([0, 0, 1, 1, 2, -1]))
  with pytest.raises(ValueError, match="text_image"):
    recall_at_k(sim, text_image=np.array([0.0, 0, 1, 1, 2, 2]))     # not int
  with pytest.raises(ValueError, match="similarity"):
    recall_at_k(sim)                                                 # paired, not square
  with pytest.raises(ValueError, match="t2i_similarity"):
    recall_at_k(sim, t2i_similarity=np.zeros((6, 3)), text_image=np.repeat(np.arange(3), 2))


def test_negative_type_names_what_differs():
  from clusjax.eval.retrieval import negative_type

  def scene(kind, colour, size, position):
    pad = lambda v: np.array(list(v) + [-1] * (3 - len(v)), np.int32)  # noqa: E731
    return {"num_shapes": len(kind), "kind": pad(kind), "colour": pad(colour),
            "size": pad(size), "position": pad(position)}
  q = scene([0, 1], [2, 3], [0, 1], [4, 0])
  assert negative_type(q, scene([0], [2], [0], [4])) == "count"
  assert negative_type(q, scene([0, 1], [2, 3], [0, 1], [4, 1])) == "position"
  # The same shapes listed in another order are the same scene.
  assert negative_type(q, scene([1, 0], [3, 2], [1, 0], [0, 4])) == "same_scene"
  assert negative_type(q, scene([0, 2], [2, 3], [0, 1], [4, 0])) == "kind"
  assert negative_type(q, scene([0, 1], [5, 3], [0, 1], [4, 0])) == "colour"
  assert negative_type(q, scene([0, 1], [2, 3], [1, 1], [4, 0])) == "size"
  assert negative_type(q, scene([0, 2], [5, 3], [0, 1], [4, 0])) == "several"


def test_rerank_pair_scores():
  from clusjax.eval.retrieval import RERANK_SCORES, rerank_pair_scores
  from clusjax.config import RERANK_SCORES as CONFIG_RERANK_SCORES
  assert RERANK_SCORES == CONFIG_RERANK_SCORES
  cos, odds = np.array([0.5, 0.1]), np.array([-1.0, 2.0])
  np.testing.assert_allclose(rerank_pair_scores("itm", cos, odds, 10.0), odds)
  np.testing.assert_allclose(rerank_pair_scores("itm+itc", cos, odds, 10.0), [4.0, 3.0])
  np.testing.assert_allclose(rerank_pair_scores("itm+itc", cos, odds, 10.0, itm_weight=0.5),
                             [4.5, 2.0])
  with pytest.raises(ValueError, match="'itc'"):
    rerank_pair_scores("itc", cos, odds, 10.0)


def test_match_ranks_are_what_recall_counts():
  from clusjax.eval.retrieval import match_ranks
  sim = np.random.default_rng(3).normal(size=(30, 30))
  t2i = sim + np.random.default_rng(4).normal(size=(30, 30))
  ranks = match_ranks(sim, t2i)
  # Independent: the number of candidates scored strictly above the match.
  np.testing.assert_array_equal(ranks["i2t"], [(sim[i] > sim[i, i]).sum() for i in range(30)])
  np.testing.assert_array_equal(ranks["t2i"], [(t2i[:, j] > t2i[j, j]).sum() for j in range(30)])
  r = recall_at_k(sim, t2i_similarity=t2i)
  assert r["i2t_r1"] == np.mean(ranks["i2t"] == 0) and r["t2i_r5"] == np.mean(ranks["t2i"] < 5)


def test_paired_bootstrap_interval_of_a_change():
  """1,000 queries, 30 fixed and 10 broken: change 0.02, standard error
  sqrt((0.04 - 0.02^2) / 1000) = 0.0063, so the 95% interval is about 0.02 +- 0.0123."""
  from clusjax.eval.retrieval import paired_bootstrap
  before = np.zeros(1000, bool)
  after = np.zeros(1000, bool)
  before[:10] = True                  # broken
  after[10:40] = True                 # fixed
  before[40:900] = after[40:900] = True
  change, low, high = paired_bootstrap(before, after)
  assert change == pytest.approx(0.02)
  assert low == pytest.approx(0.02 - 0.0123, abs=0.002)
  assert high == pytest.approx(0.02 + 0.0123, abs=0.002)
  # Unchanged queries add nothing to the interval; the same seed, the same interval.
  assert paired_bootstrap(before, before) == (0.0, 0.0, 0.0)
  assert paired_bootstrap(before, after) == (change, low, high)
  with pytest.raises(ValueError, match=r"before \(1000,\) and after \(999,\)"):
    paired_bootstrap(before, after[:999])
  with pytest.raises(ValueError, match="level=1.5"):
    paired_bootstrap(before, after, level=1.5)
