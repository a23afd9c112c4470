"""Captioning's losses (clusjax/losses/caption.py) against numpy, and the seq2seq mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax.losses import caption_loss, caption_masking, smoothed_nll
from clusjax.models.clus import seq2seq_mask


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_ce(logits, label, vocab, eps):
  log_p = _np_log_softmax(logits[:vocab].astype(np.float64))
  target = np.full(vocab, eps / vocab)
  target[label] += 1 - eps
  return -(target * log_p).sum()


@pytest.mark.parametrize("eps,lm_weight", [(0.0, 0.0), (0.1, 1.0), (0.2, 0.5)])
def test_caption_loss_against_numpy(eps, lm_weight):
  rng = np.random.default_rng(0)
  b, length, vocab, padded = 3, 7, 11, 16
  logits = rng.normal(size=(b, length, padded)).astype(np.float32)
  ids = rng.integers(5, vocab, (b, length)).astype(np.int32)
  lengths = [7, 5, 3]
  mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
  targets = mask & (rng.random((b, length)) < 0.5)
  targets[:, 0] = False
  loss, terms = caption_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask),
                             jnp.asarray(targets), vocab_size=vocab, label_smoothing=eps,
                             lm_weight=lm_weight)
  masked = [_np_ce(logits[r, i], ids[r, i], vocab, eps)
            for r in range(b) for i in range(length) if targets[r, i]]
  lm = [_np_ce(logits[r, i], ids[r, i + 1], vocab, eps) for r in range(b)
        for i in range(length - 1) if mask[r, i] and not targets[r, i] and mask[r, i + 1]]
  np.testing.assert_allclose(terms["mask_loss"], np.mean(masked), rtol=1e-5)
  np.testing.assert_allclose(terms["lm_loss"], np.mean(lm), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(masked) + lm_weight * np.mean(lm), rtol=1e-5)
  hits = [np.argmax(logits[r, i, :vocab]) == ids[r, i]
          for r in range(b) for i in range(length) if targets[r, i]]
  np.testing.assert_allclose(terms["accuracy"], np.mean(hits), rtol=1e-6)


def test_smoothed_nll_is_optax_smoothed_cross_entropy():
  import optax
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 9)).astype(np.float32)
  labels = rng.integers(0, 9, 5)
  ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 9), 0.1))
  np.testing.assert_allclose(smoothed_nll(jnp.asarray(logits), jnp.asarray(labels), vocab_size=9,
                                          label_smoothing=0.1), ref, rtol=1e-5)


def test_caption_masking_keeps_cls_and_padding():
  ids = jnp.asarray(np.random.default_rng(2).integers(5, 50, (64, 12)), jnp.int32)
  mask = jnp.arange(12)[None] < jnp.arange(64)[:, None] % 12 + 1
  masked, targets = caption_masking(jax.random.key(0), ids, mask, mask_id=4, ratio=0.6)
  masked, targets, mask = (np.asarray(x) for x in (masked, targets, mask))
  assert not targets[:, 0].any() and not (targets & ~mask).any()
  np.testing.assert_array_equal(masked[targets], 4)
  np.testing.assert_array_equal(masked[~targets], np.asarray(ids)[~targets])
  maskable = mask.copy()
  maskable[:, 0] = False
  assert abs(targets.sum() / maskable.sum() - 0.6) < 0.08


def test_seq2seq_mask():
  mask = jnp.asarray([[1, 1, 1, 0]], bool)
  expected = np.tril(np.ones((4, 4), bool)) & np.asarray([1, 1, 1, 0], bool)[None]
  np.testing.assert_array_equal(seq2seq_mask(mask)[0], expected)
