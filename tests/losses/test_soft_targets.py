"""Distillation, SoftCLIP and SigLIP against independent float64 numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clusjax.losses import distillation_loss, itc_loss, itc_logits, siglip_loss, softclip_loss
from clusjax.losses.itc import SIGLIP_BIAS_INIT, SIGLIP_LOG_TEMPERATURE_INIT


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _kl(t, p):
  """Row-wise KL(t || p) in float64; 0 log 0 = 0."""
  t, p = np.asarray(t, np.float64), np.asarray(p, np.float64)
  out = np.zeros(t.shape[0])
  for i in range(t.shape[0]):
    nz = t[i] > 0
    out[i] = np.sum(t[i, nz] * (np.log(t[i, nz]) - np.log(p[i, nz])))
  return out


def distillation_numpy(student, teacher, labels, alpha, t):
  s, te = student.astype(np.float64), teacher.astype(np.float64)
  kl = _kl(_softmax(te / t), _softmax(s / t))
  ce = -np.log(_softmax(s)[np.arange(len(labels)), labels])
  return alpha * t * t * kl.mean() + (1 - alpha) * ce.mean()


def softclip_numpy(logits, img_self, txt_self, beta, relation_weight, symmetric_kl, clip_weight):
  logits = logits.astype(np.float64)
  b = len(logits)
  eye = np.eye(b)

  def d(t, p):
    return (0.5 * (_kl(t, p) + _kl(p, t)) if symmetric_kl else _kl(t, p)).mean()

  def drop_diagonal(x):   # [B, B] -> [B, B - 1], each row renormalised
    off = np.stack([np.delete(x[i], i) for i in range(b)])
    return off / off.sum(axis=1, keepdims=True)

  total = 0.0
  for pred_logits, self_logits in ((logits, img_self), (logits.T, txt_self)):
    target = (1 - beta) * eye + beta * _softmax(self_logits.astype(np.float64))
    pred = _softmax(pred_logits)
    total += 0.5 * d(target, pred)
    if relation_weight and beta > 0:
      total += 0.5 * relation_weight * d(drop_diagonal(target), drop_diagonal(pred))
  if clip_weight:
    total += clip_weight * 0.5 * (-np.mean(np.log(np.diag(_softmax(logits))))
                                  - np.mean(np.log(np.diag(_softmax(logits.T)))))
  return total


def siglip_numpy(img, txt, log_t, bias):
  z = np.exp(log_t) * img.astype(np.float64) @ txt.astype(np.float64).T + bias
  signs = 2 * np.eye(len(z)) - 1
  return -np.sum(-np.logaddexp(0.0, -signs * z)) / len(z)


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("batch,classes,alpha,t", [(4, 3, 0.45, 1.0), (16, 10, 0.2, 2.0),
                                                   (8, 8, 1.0, 0.5), (5, 7, 0.0, 4.0)])
def test_distillation_matches_numpy(batch, classes, alpha, t):
  rng = np.random.default_rng(batch * classes)
  student = (3 * rng.normal(size=(batch, classes))).astype(np.float32)
  teacher = (3 * rng.normal(size=(batch, classes))).astype(np.float32)
  labels = rng.integers(0, classes, batch)
  got = distillation_loss(student, teacher, labels, alpha=alpha, temperature=t)
  np.testing.assert_allclose(got, distillation_numpy(student, teacher, labels, alpha, t),
                             rtol=1e-5, atol=1e-6)
  g_s, g_t = jax.grad(lambda s, te: distillation_loss(s, te, labels, alpha=alpha, temperature=t),
                      argnums=(0, 1))(student, teacher)
  assert np.isfinite(g_s).all() and not np.any(g_t)   # the teacher is frozen


def test_distillation_from_itself_is_the_cross_entropy_part():
  logits = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32)
  labels = np.arange(6)
  full = distillation_loss(logits, logits, labels, alpha=0.45)
  ce_only = distillation_loss(logits, logits, labels, alpha=0.0)
  np.testing.assert_allclose(full, 0.55 * ce_only, rtol=1e-6)


@pytest.mark.parametrize("batch", [5, 16])
@pytest.mark.parametrize("beta,relation_weight,symmetric_kl,clip_weight", [
    (0.3, 1.0, True, 0.0), (0.3, 0.0, False, 0.0), (0.5, 2.0, False, 0.5),
    (0.1, 1.0, True, 1.0), (0.0, 0.0, False, 0.0), (0.0, 1.0, False, 0.3), (1.0, 1.0, True, 0.0)])
def test_softclip_matches_numpy(batch, beta, relation_weight, symmetric_kl, clip_weight):
  rng = np.random.default_rng(batch)
  img, txt = _unit(rng, batch, 8), _unit(rng, batch, 8)
  logits = np.asarray(itc_logits(img, txt, 0.1))
  img_self, txt_self = img @ img.T / 0.1, txt @ txt.T / 0.1
  kw = dict(beta=beta, relation_weight=relation_weight, symmetric_kl=symmetric_kl,
            clip_weight=clip_weight)
  got = softclip_loss(logits, img_self, txt_self, **kw)
  np.testing.assert_allclose(got, softclip_numpy(logits, img_self, txt_self, **kw),
                             rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda l: softclip_loss(l, img_self, txt_self, **kw))(logits)
  assert np.isfinite(grads).all() and np.any(grads)


def test_softclip_without_softening_is_itc():
  rng = np.random.default_rng(3)
  img, txt = _unit(rng, 12, 16), _unit(rng, 12, 16)
  logits = itc_logits(img, txt, 0.06)
  noise = rng.normal(size=(12, 12)).astype(np.float32)
  got = softclip_loss(logits, noise, noise.T, beta=0.0, relation_weight=0.0, symmetric_kl=False)
  assert got == pytest.approx(float(itc_loss(img, txt, 0.06)), rel=1e-6)


def test_softclip_relation_term_ignores_the_diagonal_logits():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(8, 8)).astype(np.float32)
  img_self, txt_self = rng.normal(size=(2, 8, 8)).astype(np.float32)
  shifted = logits + np.diag(rng.normal(size=8) * 5).astype(np.float32)

  def relation(l):
    with_relation = softclip_loss(l, img_self, txt_self, relation_weight=1.0)
    return float(with_relation - softclip_loss(l, img_self, txt_self, relation_weight=0.0))

  assert relation(shifted) == pytest.approx(relation(logits), rel=1e-5)
  # The main term does see the diagonal.
  assert float(softclip_loss(shifted, img_self, txt_self)) != pytest.approx(
      float(softclip_loss(logits, img_self, txt_self)), rel=1e-3)


def test_softclip_rejects_bad_input():
  x = np.zeros((4, 4), np.float32)
  with pytest.raises(ValueError, match=r"text_self_logits has shape \(4, 3\)"):
    softclip_loss(x, x, x[:, :3])
  with pytest.raises(ValueError, match="symmetric_kl needs beta > 0"):
    softclip_loss(x, x, x, beta=0.0, symmetric_kl=True)


@pytest.mark.parametrize("batch,dim,log_t,bias", [
    (4, 8, SIGLIP_LOG_TEMPERATURE_INIT, SIGLIP_BIAS_INIT), (16, 32, 1.0, -2.0), (7, 4, 3.0, 0.5)])
def test_siglip_matches_numpy(batch, dim, log_t, bias):
  rng = np.random.default_rng(dim)
  img, txt = _unit(rng, batch, dim), _unit(rng, batch, dim)
  got = siglip_loss(img, txt, jnp.float32(log_t), jnp.float32(bias))
  np.testing.assert_allclose(got, siglip_numpy(img, txt, log_t, bias), rtol=1e-5)
  grads = jax.grad(siglip_loss, argnums=(0, 1, 2, 3))(img, txt, jnp.float32(log_t),
                                                      jnp.float32(bias))
  assert all(np.isfinite(g).all() for g in grads)


def _mesh_sharding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, P("data"))


def test_siglip_sharded_equals_single_device():
  rng = np.random.default_rng(5)
  img, txt = _unit(rng, 16, 8), _unit(rng, 16, 8)
  fn = jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3))
  sharding = _mesh_sharding()
  loss8, grads8 = jax.jit(fn)(jax.device_put(img, sharding), jax.device_put(txt, sharding),
                              jnp.float32(2.0), jnp.float32(-3.0))
  loss1, grads1 = jax.jit(fn)(img, txt, jnp.float32(2.0), jnp.float32(-3.0))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  for a, b in zip(grads8, grads1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_soft_target_losses_sharded_equal_single_device():
  rng = np.random.default_rng(6)
  img, txt = _unit(rng, 16, 8), _unit(rng, 16, 8)
  teacher = rng.normal(size=(16, 16)).astype(np.float32)
  labels = np.arange(16)

  def losses(img, txt, teacher, labels):
    logits = itc_logits(img, txt, 0.1)
    return (softclip_loss(logits, img @ img.T / 0.1, txt @ txt.T / 0.1, clip_weight=0.5),
            distillation_loss(logits, teacher, labels))

  sharding = _mesh_sharding()
  got8 = jax.jit(losses)(*(jax.device_put(x, sharding) for x in (img, txt, teacher, labels)))
  got1 = jax.jit(losses)(img, txt, teacher, labels)
  np.testing.assert_allclose(got8, got1, rtol=1e-6)
