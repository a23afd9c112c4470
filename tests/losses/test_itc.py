import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clusjax.losses import infonce_from_logits, itc_logits, itc_loss


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def itc_numpy(img, txt, temperature):
  """Independent reference: CE over rows and over columns, in float64."""
  t = np.clip(temperature, 0.001, 0.5)
  logits = img.astype(np.float64) @ txt.astype(np.float64).T / t

  def ce_rows(z):
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(logp))

  return 0.5 * (ce_rows(logits) + ce_rows(logits.T))


@pytest.mark.parametrize("batch,dim,temperature", [(4, 8, 0.06), (16, 32, 0.2), (8, 16, 0.9)])
def test_itc_matches_numpy(batch, dim, temperature):
  rng = np.random.default_rng(batch)
  img = _normalize(rng.normal(size=(batch, dim))).astype(np.float32)
  txt = _normalize(rng.normal(size=(batch, dim))).astype(np.float32)
  got = itc_loss(img, txt, jnp.float32(temperature))
  np.testing.assert_allclose(got, itc_numpy(img, txt, temperature), rtol=1e-5)


def test_itc_is_lower_for_matched_pairs():
  rng = np.random.default_rng(0)
  img = _normalize(rng.normal(size=(8, 16))).astype(np.float32)
  assert itc_loss(img, img, 0.06) < itc_loss(img, img[::-1], 0.06)


def test_itc_sharded_equals_single_device():
  rng = np.random.default_rng(1)
  img = _normalize(rng.normal(size=(16, 8))).astype(np.float32)
  txt = _normalize(rng.normal(size=(16, 8))).astype(np.float32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  fn = jax.jit(jax.value_and_grad(itc_loss, argnums=(0, 1, 2)))
  (loss8, grads8) = fn(jax.device_put(img, sharding), jax.device_put(txt, sharding), 0.06)
  (loss1, grads1) = jax.jit(jax.value_and_grad(itc_loss, argnums=(0, 1, 2)))(img, txt, 0.06)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  for a, b in zip(grads8, grads1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_hard_negative_captions_join_image_to_text_only():
  rng = np.random.default_rng(2)
  img, txt, neg = (_normalize(rng.normal(size=(6, 8))).astype(np.float32) for _ in range(3))
  t = 0.1
  logits = itc_logits(img, txt, t)
  neg_logits = np.asarray(itc_logits(img, neg, t)).copy()
  neg_logits[:, 2] = -np.inf    # example 2 has no negative caption
  got = infonce_from_logits(logits, jnp.asarray(neg_logits))
  # Reference: image->text over [texts | valid negatives]; text->image as plain ITC.
  full = np.concatenate([img @ txt.T, np.delete(img @ neg.T, 2, axis=1)], axis=1) / t
  full = full - full.max(axis=1, keepdims=True)
  i2t = -np.mean(np.diag(full - np.log(np.exp(full).sum(axis=1, keepdims=True))))
  z = (txt @ img.T) / t
  z = z - z.max(axis=1, keepdims=True)
  t2i = -np.mean(np.diag(z - np.log(np.exp(z).sum(axis=1, keepdims=True))))
  np.testing.assert_allclose(got, 0.5 * (i2t + t2i), rtol=1e-5)
  # All negatives masked = plain ITC; real negatives only add to the loss.
  none = infonce_from_logits(logits, jnp.full((6, 6), -jnp.inf))
  np.testing.assert_allclose(none, itc_loss(img, txt, t), rtol=1e-6)
  assert got > none
  grads = jax.grad(lambda n: infonce_from_logits(logits, itc_logits(img, n, t)))(neg)
  assert np.isfinite(grads).all() and np.abs(grads).sum() > 0

