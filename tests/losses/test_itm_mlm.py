"""ITM hard negatives (global batch) and MLM masking / loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clusjax.losses import (itm_loss, itm_pairs, mask_tokens, mlm_loss, sample_hard_negatives,
                            twin_pairs)


def test_hard_negatives_follow_softmax_and_skip_the_positive():
  b = 6
  sim = np.random.default_rng(0).normal(size=(b, b)).astype(np.float32)
  draws = jax.jit(jax.vmap(lambda r: sample_hard_negatives(r, sim)))(
      jax.random.split(jax.random.key(0), 20_000))
  for idx, s in ((np.asarray(draws[0]), sim), (np.asarray(draws[1]), sim.T)):
    assert not np.any(idx == np.arange(b)[None, :])
    for i in range(b):
      logits = np.where(np.arange(b) == i, -np.inf, s[i])
      p = np.exp(logits - logits.max())
      p /= p.sum()
      freq = np.bincount(idx[:, i], minlength=b) / len(idx)
      np.testing.assert_allclose(freq, p, atol=0.015)


@pytest.mark.parametrize("u", [0.3, 1.0])
def test_uniform_fraction_mixes_uniform_negatives_into_the_softmax(u):
  """loss.itm_uniform_negatives: each negative from (1 - u) softmax + u uniform over
  the other examples; with one pair far above the rest the softmax alone always
  picks it, the mixture picks each other example u / (b - 1) of the time."""
  b = 5
  sim = np.zeros((b, b), np.float32)
  partner = (np.arange(b) + 1) % b
  sim[np.arange(b), partner] = 40.0
  draws = jax.jit(jax.vmap(lambda r: sample_hard_negatives(r, sim, u)))(
      jax.random.split(jax.random.key(2), 20_000))
  for idx, part in ((np.asarray(draws[0]), partner), (np.asarray(draws[1]), np.argsort(partner))):
    assert not np.any(idx == np.arange(b)[None, :])
    for i in range(b):
      freq = np.bincount(idx[:, i], minlength=b) / len(idx)
      want = np.full(b, u / (b - 1))
      want[i] = 0.0
      want[part[i]] += 1.0 - u
      np.testing.assert_allclose(freq, want, atol=0.015)
  with pytest.raises(ValueError, match="uniform_fraction=1.5 must be in"):
    sample_hard_negatives(jax.random.key(0), sim, 1.5)


@pytest.mark.parametrize("u", [0.0, 0.5])
def test_excluded_pairs_are_never_drawn_and_the_rest_keep_their_odds(u):
  """An example's twin (far above the rest in ITC) excluded: neither share draws it;
  the softmax share renormalises over the rest, the uniform share spreads over the
  b - 2 pairs left."""
  b = 6
  rng = np.random.default_rng(1)
  sim = rng.normal(size=(b, b)).astype(np.float32)
  pair_id = np.array([0, 0, 1, 1, 2, 3])
  twin = np.asarray(twin_pairs(jnp.asarray(pair_id)))
  same = pair_id[:, None] == pair_id[None, :]
  np.testing.assert_array_equal(twin, same & ~np.eye(b, dtype=bool))
  sim[twin] = 40.0
  draws = jax.jit(jax.vmap(lambda r: sample_hard_negatives(r, sim, u, excluded=twin)))(
      jax.random.split(jax.random.key(3), 20_000))
  for idx, s, ex in ((np.asarray(draws[0]), sim, twin), (np.asarray(draws[1]), sim.T, twin.T)):
    for i in range(b):
      blocked = ex[i] | (np.arange(b) == i)
      logits = np.where(blocked, -np.inf, s[i])
      p = np.exp(logits - logits.max())
      want = (1 - u) * p / p.sum() + u * np.where(blocked, 0.0, 1.0 / (~blocked).sum())
      freq = np.bincount(idx[:, i], minlength=b) / len(idx)
      assert freq[blocked].sum() == 0.0
      np.testing.assert_allclose(freq, want, atol=0.015)
  with pytest.raises(ValueError, match=r"excluded has shape \(5, 5\)"):
    sample_hard_negatives(jax.random.key(0), sim, u, excluded=np.zeros((5, 5), bool))


def test_hard_negatives_come_from_other_shards():
  """With the batch on 8 devices, each example's only likely negative lives on
  another device: sampling over the global batch must find it."""
  b, shards = 32, 8
  per = b // shards
  partner = (np.arange(b) + b // 2) % b          # 4 shards away
  sim = np.zeros((b, b), np.float32)
  sim[np.arange(b), partner] = 30.0               # image i looks like text partner[i]
  sim[np.arange(b), np.arange(b)] = 50.0          # (the positive, excluded)
  mesh = jax.make_mesh((shards,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(sim, NamedSharding(mesh, P("data")))
  fn = jax.jit(sample_hard_negatives)
  neg_text, neg_image = fn(jax.random.key(1), sharded)
  assert len(sharded.sharding.device_set) == shards
  np.testing.assert_array_equal(neg_text, partner)
  np.testing.assert_array_equal(neg_image, np.argsort(partner))   # text j's partner image
  assert np.all(np.asarray(neg_text) // per != np.arange(b) // per)
  # Same draws as on one device.
  one_text, one_image = fn(jax.random.key(1), sim)
  np.testing.assert_array_equal(one_text, neg_text)
  np.testing.assert_array_equal(one_image, neg_image)


def test_itm_pairs_and_loss():
  b, li, lt, e = 4, 3, 5, 2
  img = np.arange(b * li * e, dtype=np.float32).reshape(b, li, e)
  txt = -np.arange(b * lt * e, dtype=np.float32).reshape(b, lt, e)
  mask = np.ones((b, lt), bool)
  mask[1, 3:] = False
  neg_text, neg_image = np.array([1, 0, 3, 2]), np.array([2, 3, 0, 1])
  (images, feats), (texts, masks), labels = itm_pairs((img, img[:, 0]), (txt, mask),
                                                       neg_text, neg_image)
  np.testing.assert_array_equal(feats, images[:, 0])
  assert images.shape == (3 * b, li, e) and texts.shape == (3 * b, lt, e)
  np.testing.assert_array_equal(labels, [1] * b + [0] * (2 * b))
  np.testing.assert_array_equal(texts[b:2 * b], txt[neg_text])
  np.testing.assert_array_equal(masks[b:2 * b], mask[neg_text])
  np.testing.assert_array_equal(images[2 * b:], img[neg_image])
  logits = np.random.default_rng(0).normal(size=(3 * b, 2)).astype(np.float32)
  loss, acc = itm_loss(logits, labels)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(loss, -logp[np.arange(3 * b), labels].mean(), rtol=1e-6)
  np.testing.assert_allclose(acc, np.mean(logits.argmax(1) == labels))


def test_itm_loss_weights_leave_out_pairs():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(10, 2)).astype(np.float32)
  labels = rng.integers(0, 2, 10).astype(np.int32)
  weights = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], np.float32)
  keep = weights > 0
  loss, acc = itm_loss(logits, labels, weights)
  ref_loss, ref_acc = itm_loss(logits[keep], labels[keep])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)
  # No pair at all: 0, not NaN.
  assert float(itm_loss(logits, labels, np.zeros(10, np.float32))[0]) == 0.0


def test_mask_tokens_bert_proportions():
  b, l, vocab, mask_id = 256, 64, 100, 4
  rng = np.random.default_rng(0)
  ids = rng.integers(5, vocab, size=(b, l)).astype(np.int32)
  maskable = np.ones((b, l), bool)
  maskable[:, 0] = False
  maskable[:, 50:] = False                       # padding / [SEP]
  masked, targets = mask_tokens(jax.random.key(0), ids, maskable, mask_id=mask_id,
                                num_tokens=vocab, probability=0.15, first_random_id=5)
  masked, targets = np.asarray(masked), np.asarray(targets)
  assert not np.any(targets & ~maskable)
  np.testing.assert_array_equal(masked[~targets], ids[~targets])   # untouched elsewhere
  assert abs(targets.sum() / maskable.sum() - 0.15) < 0.01
  t = targets.sum()
  to_mask = np.sum(masked[targets] == mask_id) / t
  kept = np.sum(masked[targets] == ids[targets]) / t
  assert abs(to_mask - 0.8) < 0.03
  # Kept 10% plus random draws that hit the same id (1 in 95).
  assert abs(kept - (0.1 + 0.1 / 95)) < 0.02
  assert masked.min() >= 0 and masked.max() < vocab
  assert np.all(masked[targets & (masked != mask_id)] >= 5)


@pytest.mark.parametrize("with_targets", [True, False])
def test_mlm_loss_matches_numpy(with_targets):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
  ids = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
  targets = (rng.random((3, 7)) < 0.4) & with_targets
  loss, acc = mlm_loss(jnp.asarray(logits), ids, targets)
  if not with_targets:
    assert float(loss) == 0.0 and float(acc) == 0.0
    return
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, nll[targets].mean(), rtol=1e-5)
  np.testing.assert_allclose(acc, np.mean(logits.argmax(-1)[targets] == ids[targets]), rtol=1e-6)
