import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clusjax.losses import itc_loss


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
