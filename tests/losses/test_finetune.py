import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clusjax.losses import classification_loss, clce_loss, supcon_loss, vqa_loss

TOL = dict(rtol=1e-5, atol=1e-5)


# Independent float64 references, one anchor at a time, straight from the formulas.

def _sims(features, temperature):
  z = features.astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  return z @ z.T / temperature


def _valid(valid, batch):
  return np.ones(batch, bool) if valid is None else np.asarray(valid, bool)


def supcon_numpy(features, labels, temperature, valid=None):
  s = _sims(features, temperature)
  valid = _valid(valid, len(labels))
  losses = []
  for i in range(len(labels)):
    if not valid[i]:
      continue
    others = [j for j in range(len(labels)) if j != i and valid[j]]
    pos = [j for j in others if labels[j] == labels[i]]
    if not pos:
      continue
    denom = sum(np.exp(s[i, a]) for a in others)
    losses.append(-sum(np.log(np.exp(s[i, p]) / denom) for p in pos) / len(pos))
  return float(np.mean(losses)) if losses else 0.0


def ce_numpy(logits, labels, valid=None):
  valid = _valid(valid, len(labels))
  losses = []
  for i in range(len(labels)):
    if valid[i]:
      z = logits[i].astype(np.float64)
      losses.append(-(z[labels[i]] - np.log(np.sum(np.exp(z)))))
  return float(np.mean(losses)) if losses else 0.0


def lacln_numpy(features, labels, temperature, valid=None):
  s = _sims(features, temperature)
  valid = _valid(valid, len(labels))
  losses = []
  for i in range(len(labels)):
    if not valid[i]:
      continue
    others = [j for j in range(len(labels)) if j != i and valid[j]]
    pos = [j for j in others if labels[j] == labels[i]]
    neg = [j for j in others if labels[j] != labels[i]]
    if not pos:
      continue
    neg_sum = sum(np.exp(s[i, k]) for k in neg)
    weighted = sum(len(neg) * np.exp(s[i, k]) / neg_sum * np.exp(s[i, k]) for k in neg)
    pos_exp = [np.exp(s[i, p]) for p in pos]
    losses.append(-np.log(np.mean(pos_exp) / (sum(pos_exp) + weighted)))
  return float(np.mean(losses)) if losses else 0.0


def clce_numpy(logits, features, labels, lam, temperature, valid=None):
  return ((1 - lam) * ce_numpy(logits, labels, valid)
          + lam * lacln_numpy(features, labels, temperature, valid))


def vqa_numpy(logits, targets, valid=None):
  valid = _valid(valid, len(logits))
  losses = []
  for i in range(len(logits)):
    if valid[i]:
      x, t = logits[i].astype(np.float64), targets[i].astype(np.float64)
      sig = 1 / (1 + np.exp(-x))
      losses.append(np.sum(-(t * np.log(sig) + (1 - t) * np.log(1 - sig))))
  return float(np.mean(losses)) if losses else 0.0


def _inputs(batch, layout, seed=0, dim=8, classes=5):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(batch, dim)).astype(np.float32)
  logits = rng.normal(size=(batch, classes)).astype(np.float32)
  labels = {"random": rng.integers(0, 3, batch), "distinct": np.arange(batch),
            "same": np.zeros(batch, int)}[layout].astype(np.int32)
  return logits, features, labels


BATCHES = (2, 7, 16, 32)
LAYOUTS = ("random", "distinct", "same")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature", (0.1, 0.5))
def test_supcon_matches_numpy(batch, layout, temperature):
  _, features, labels = _inputs(batch, layout, seed=batch)
  got = supcon_loss(features, labels, temperature=temperature)
  np.testing.assert_allclose(got, supcon_numpy(features, labels, temperature), **TOL)
  if layout == "distinct":
    assert float(got) == 0.0


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lam,temperature", [(0.9, 0.5), (0.5, 0.1), (1.0, 0.3)])
def test_clce_matches_numpy(batch, layout, lam, temperature):
  # 40 classes: the "distinct" labels (up to 31) are all valid CE targets.
  logits, features, labels = _inputs(batch, layout, seed=batch + 1, classes=40)
  got = clce_loss(logits, features, labels, lam=lam, temperature=temperature)
  want = clce_numpy(logits, features, labels, lam, temperature)
  np.testing.assert_allclose(got, want, **TOL)


def test_lacln_edge_cases():
  """All-distinct labels: no anchor has a positive, LACLN = 0. All one label: no
  negatives, so L_i = -log(mean_P exp / sum_P exp) = log|P(i)| = log(B - 1)."""
  logits, features, _ = _inputs(9, "random", seed=3, classes=9)
  distinct = np.arange(9, dtype=np.int32)
  np.testing.assert_allclose(clce_loss(logits, features, distinct, lam=1.0), 0.0, atol=1e-7)
  same = np.zeros(9, np.int32)
  np.testing.assert_allclose(clce_loss(logits, features, same, lam=1.0), np.log(8.0), **TOL)
  # Valid rows only: 5 valid rows of one label -> log 4.
  valid = np.arange(9) < 5
  got = clce_loss(logits, features, same, lam=1.0, valid=valid)
  np.testing.assert_allclose(got, np.log(4.0), **TOL)


def test_lacln_tied_negatives_is_supcon_style_denominator():
  """Equal negative similarities make every w_ik 1: the plain sum of exp(s_ik)."""
  features = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
  labels = np.array([0, 0, 1, 1], np.int32)
  logits = np.zeros((4, 2), np.float32)
  t = 0.5
  # Every anchor: one positive (s = 1 / t = 2), two negatives (s = 0) of weight 1 each.
  want = -np.log(np.exp(2.0) / (np.exp(2.0) + 2.0))
  got = clce_loss(logits, features, labels, lam=1.0, temperature=t)
  np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("batch", (7, 16))
def test_valid_mask(batch):
  logits, features, labels = _inputs(batch, "random", seed=11, classes=3)
  valid = np.random.default_rng(5).random(batch) < 0.6
  valid[:2] = True
  labels[0] = labels[1]        # at least one anchor with a positive
  np.testing.assert_allclose(supcon_loss(features, labels, temperature=0.2, valid=valid),
                             supcon_numpy(features, labels, 0.2, valid), **TOL)
  np.testing.assert_allclose(clce_loss(logits, features, labels, lam=0.7, temperature=0.2,
                                       valid=valid),
                             clce_numpy(logits, features, labels, 0.7, 0.2, valid), **TOL)
  np.testing.assert_allclose(classification_loss(logits, labels, valid),
                             ce_numpy(logits, labels, valid), **TOL)
  # Invalid rows may hold anything (padding): the loss does not read them.
  features2, logits2 = features.copy(), logits.copy()
  features2[~valid] = 1e3
  logits2[~valid] = -1e3
  np.testing.assert_allclose(supcon_loss(features2, labels, temperature=0.2, valid=valid),
                             supcon_loss(features, labels, temperature=0.2, valid=valid), **TOL)
  np.testing.assert_allclose(clce_loss(logits2, features2, labels, valid=valid),
                             clce_loss(logits, features, labels, valid=valid), **TOL)
  none = np.zeros(batch, bool)
  assert float(supcon_loss(features, labels, valid=none)) == 0.0
  assert float(clce_loss(logits, features, labels, valid=none)) == 0.0


@pytest.mark.parametrize("batch", BATCHES)
def test_clce_lam0_is_classification_loss(batch):
  logits, features, labels = _inputs(batch, "random", seed=batch, classes=3)
  got = clce_loss(logits, features, labels, lam=0.0, temperature=0.05)
  np.testing.assert_allclose(got, classification_loss(logits, labels), rtol=1e-7)
  np.testing.assert_allclose(got, ce_numpy(logits, labels), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_finite_at_low_temperature(layout):
  logits, features, labels = _inputs(16, layout, seed=4, classes=20)
  valid = np.arange(16) < 12
  features[13] = 0.0           # a zero padding row must not give NaN
  for v in (None, valid):
    g = jax.grad(lambda f: supcon_loss(f, labels, temperature=0.05, valid=v))(features)
    assert np.isfinite(g).all()
    gl, gf = jax.grad(lambda l, f: clce_loss(l, f, labels, temperature=0.05, valid=v),
                      argnums=(0, 1))(logits, features)
    assert np.isfinite(gl).all() and np.isfinite(gf).all()
  if layout == "random":
    assert np.abs(g).sum() > 0 and np.abs(gf).sum() > 0


def test_large_inverse_temperature_does_not_overflow():
  """1/temperature = 200: exp(s) (and exp(2 s) of the weights) would overflow float32;
  the log-space losses do not. The float64 reference still fits (exp(400))."""
  logits, features, labels = _inputs(16, "random", seed=6, classes=3)
  t = 0.005
  np.testing.assert_allclose(clce_loss(logits, features, labels, lam=1.0, temperature=t),
                             lacln_numpy(features, labels, t), rtol=1e-4)
  np.testing.assert_allclose(supcon_loss(features, labels, temperature=t),
                             supcon_numpy(features, labels, t), rtol=1e-4)


@pytest.mark.parametrize("batch", (16, 32))
def test_sharded_jit_matches_numpy(batch):
  logits, features, labels = _inputs(batch, "random", seed=batch + 7, classes=4)
  valid = np.random.default_rng(batch).random(batch) < 0.8
  targets = np.random.default_rng(batch).uniform(size=(batch, 6)).astype(np.float32)
  answers = np.random.default_rng(batch + 1).normal(size=(batch, 6)).astype(np.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  assert mesh.size == 8
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  f, lg, lb, v, tg, an = map(shard, (features, logits, labels, valid, targets, answers))
  assert len(f.sharding.device_set) == 8
  got = jax.jit(lambda f, lb, v: supcon_loss(f, lb, temperature=0.1, valid=v))(f, lb, v)
  np.testing.assert_allclose(got, supcon_numpy(features, labels, 0.1, valid), **TOL)
  got = jax.jit(lambda lg, f, lb, v: clce_loss(lg, f, lb, lam=0.6, temperature=0.2,
                                               valid=v))(lg, f, lb, v)
  np.testing.assert_allclose(got, clce_numpy(logits, features, labels, 0.6, 0.2, valid), **TOL)
  got = jax.jit(classification_loss)(lg, lb, v)
  np.testing.assert_allclose(got, ce_numpy(logits, labels, valid), **TOL)
  got = jax.jit(vqa_loss)(an, tg, v)
  np.testing.assert_allclose(got, vqa_numpy(answers, targets, valid), **TOL)


@pytest.mark.parametrize("batch,answers", [(2, 3), (7, 10), (32, 129)])
def test_vqa_matches_numpy(batch, answers):
  rng = np.random.default_rng(batch)
  logits = (3 * rng.normal(size=(batch, answers))).astype(np.float32)
  # VQA scores: mostly 0, some in {0.3, 0.6, 0.9, 1}.
  targets = np.where(rng.random((batch, answers)) < 0.2,
                     rng.choice([0.3, 0.6, 0.9, 1.0], (batch, answers)), 0.0).astype(np.float32)
  np.testing.assert_allclose(vqa_loss(logits, targets), vqa_numpy(logits, targets), **TOL)
  valid = np.arange(batch) % 2 == 0
  np.testing.assert_allclose(vqa_loss(logits, targets, valid),
                             vqa_numpy(logits, targets, valid), **TOL)
  assert float(vqa_loss(logits, targets, np.zeros(batch, bool))) == 0.0


def test_vqa_all_zero_and_all_one_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 8)).astype(np.float32)
  zeros, ones = np.zeros_like(logits), np.ones_like(logits)
  # t = 0 -> sum softplus(x); t = 1 -> sum softplus(-x), per row, then the mean.
  np.testing.assert_allclose(vqa_loss(logits, zeros),
                             np.mean(np.sum(np.logaddexp(0, logits), axis=1)), **TOL)
  np.testing.assert_allclose(vqa_loss(logits, ones),
                             np.mean(np.sum(np.logaddexp(0, -logits), axis=1)), **TOL)
  # Confident, right logits cost ~0 and stay finite (no log(0)) when very wrong.
  big = np.full((2, 4), 100.0, np.float32)
  zeros, ones = np.zeros_like(big), np.ones_like(big)
  assert float(vqa_loss(big, ones)) < 1e-30
  assert float(vqa_loss(-big, zeros)) < 1e-30
  np.testing.assert_allclose(vqa_loss(big, zeros), 400.0, rtol=1e-6)
  g = jax.grad(vqa_loss)(jnp.asarray(big), jnp.asarray(zeros))
  assert np.isfinite(g).all()


def test_bad_shapes_name_the_argument():
  logits, features, labels = _inputs(4, "random")
  with pytest.raises(ValueError, match="labels"):
    supcon_loss(features, labels[:3])
  with pytest.raises(ValueError, match="valid"):
    supcon_loss(features, labels, valid=np.ones(5, bool))
  with pytest.raises(ValueError, match="temperature"):
    supcon_loss(features, labels, temperature=0.0)
  with pytest.raises(ValueError, match="features"):
    clce_loss(logits, features[:3], labels)
  with pytest.raises(ValueError, match="target_scores"):
    vqa_loss(logits, logits[:, :2])
  with pytest.raises(ValueError, match="labels"):
    classification_loss(logits, labels[:2])
