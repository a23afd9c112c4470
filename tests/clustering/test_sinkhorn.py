import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clusjax.clustering.sinkhorn import sinkhorn
from clusjax.losses.swap import swap_prediction_loss


def sinkhorn_numpy(scores, epsilon=0.05, num_iters=3, mask=None):
  """SwAV's distributed_sinkhorn, transcribed to numpy (float64), plus a mask."""
  b, k = scores.shape
  mask = np.ones(k, bool) if mask is None else mask
  s = scores[:, mask].astype(np.float64)
  q = np.exp((s - s.max()) / epsilon).T          # [K_active, B]
  q /= q.sum()
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= mask.sum()
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  q *= b
  out = np.zeros((b, k))
  out[:, mask] = q.T
  return out


def swap_numpy(fi, ft, z, temperature=0.1, epsilon=0.05, num_iters=3, active=None):
  k = z.shape[1]
  active = np.ones(k, bool) if active is None else active
  si, st = fi.astype(np.float64) @ z, ft.astype(np.float64) @ z
  gt, gi = sinkhorn_numpy(st, epsilon, num_iters, active), sinkhorn_numpy(si, epsilon, num_iters, active)

  def ce(scores, codes):
    x = scores[:, active] / temperature
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return -np.mean(np.sum(codes[:, active] * logp, axis=1))

  return ce(si, gt) + ce(st, gi)


def _unit(x, axis):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _inputs(b, d, k, seed):
  rng = np.random.default_rng(seed)
  fi = _unit(rng.normal(size=(b, d)), 1).astype(np.float32)
  ft = _unit(rng.normal(size=(b, d)), 1).astype(np.float32)
  z = _unit(rng.normal(size=(d, k)), 0).astype(np.float32)
  active = rng.random(k) < 0.6
  active[0] = True
  return fi, ft, z, active


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("b,k,seed", [(8, 5, 0), (32, 16, 1), (16, 40, 2)])
def test_sinkhorn_matches_numpy(use_mask, b, k, seed):
  rng = np.random.default_rng(seed)
  scores = rng.uniform(-1, 1, size=(b, k)).astype(np.float32)
  mask = (rng.random(k) < 0.6) | (np.arange(k) == 0) if use_mask else None
  got = np.asarray(sinkhorn(scores, mask=None if mask is None else jnp.asarray(mask)))
  want = sinkhorn_numpy(scores, mask=mask)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
  if mask is not None:
    assert np.all(got[:, ~mask] == 0)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("b,d,k,temperature", [(8, 4, 6, 0.1), (32, 16, 24, 0.2)])
def test_swap_prediction_matches_numpy(use_mask, b, d, k, temperature):
  fi, ft, z, active = _inputs(b, d, k, seed=b + k)
  active = active if use_mask else None
  got = swap_prediction_loss(fi, ft, z, temperature=temperature,
                             active=None if active is None else jnp.asarray(active))
  want = swap_numpy(fi, ft, z, temperature=temperature, active=active)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_swap_prediction_gradients_are_finite_and_skip_the_codes():
  fi, ft, z, active = _inputs(16, 8, 12, seed=3)
  grads = jax.grad(lambda a, b, c: swap_prediction_loss(a, b, c, active=jnp.asarray(active)),
                   argnums=(0, 1, 2))(fi, ft, z)
  for g in grads:
    assert np.all(np.isfinite(g)) and np.any(g != 0)
  # Sinkhorn codes are targets: no gradient flows through them.
  g = jax.grad(lambda s: jnp.sum(sinkhorn(s) * jnp.arange(12.0)))(fi @ z)
  assert np.all(g == 0)


def test_sharded_over_8_devices_equals_1_device():
  fi, ft, z, active = _inputs(32, 8, 12, seed=4)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("data"))
  act = jnp.asarray(active)

  def f(a, b, c):
    return swap_prediction_loss(a, b, c, active=act), sinkhorn(a @ c, mask=act)

  (l8, q8) = jax.jit(f)(jax.device_put(fi, rows), jax.device_put(ft, rows), z)
  (l1, q1) = jax.jit(f)(fi, ft, z)
  assert q8.sharding.spec[0] == "data" or len(q8.sharding.device_set) == 8
  np.testing.assert_allclose(l8, l1, rtol=1e-6)
  np.testing.assert_allclose(q8, q1, atol=1e-6)
