import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from clusjax.losses import noun_codes, prompt_label_loss


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def prompt_numpy(img, lab, label_noun, caption_nouns, temperature):
  """Independent reference, loops and float64: the mean over images (with a
  positive) and over valid labels of -mean log p(positive)."""
  logits = img.astype(np.float64) @ lab.astype(np.float64).T / np.clip(temperature, 0.001, 0.5)
  valid = [n for n in range(len(label_noun)) if label_noun[n] != 0]
  pos = lambda i, n: label_noun[n] in set(caption_nouns[i]) - {0}   # noqa: E731
  rows = []
  for i in range(len(img)):
    p = [n for n in valid if pos(i, n)]
    if p:
      z = logits[i, valid]
      lse = np.log(np.exp(z - z.max()).sum()) + z.max()
      rows.append(-np.mean([logits[i, n] - lse for n in p]))
  cols = []
  for n in valid:
    p = [i for i in range(len(img)) if pos(i, n)]
    z = logits[:, n]
    lse = np.log(np.exp(z - z.max()).sum()) + z.max()
    cols.append(-np.mean([logits[i, n] - lse for i in p]))
  return 0.5 * (np.mean(rows) + np.mean(cols))


def _inputs(seed, batch=8, k=2, dim=16, nouns=4):
  rng = np.random.default_rng(seed)
  img = _normalize(rng.normal(size=(batch, dim))).astype(np.float32)
  lab = _normalize(rng.normal(size=(batch * k, dim))).astype(np.float32)
  caption_nouns = rng.integers(1, nouns + 1, size=(batch, 3)).astype(np.int32)
  caption_nouns[::3, 1:] = 0          # one-noun captions
  caption_nouns[1] = 0                # an image with no noun at all
  label_noun = np.zeros((batch, k), np.int32)
  for i in range(batch):               # each label is a noun of its own caption
    have = caption_nouns[i][caption_nouns[i] > 0]
    label_noun[i, :len(have)] = rng.permutation(have)[:k]
  return img, lab, label_noun.reshape(-1), caption_nouns


def test_prompt_label_loss_matches_numpy():
  for seed, t in [(0, 0.06), (1, 0.2), (2, 0.9)]:
    img, lab, label_noun, caption_nouns = _inputs(seed)
    assert (label_noun == 0).any()
    got = prompt_label_loss(img, lab, label_noun, caption_nouns, jnp.float32(t))
    np.testing.assert_allclose(got, prompt_numpy(img, lab, label_noun, caption_nouns, t),
                               rtol=1e-5)


def test_masked_labels_have_no_effect_and_no_labels_is_finite():
  img, lab, label_noun, caption_nouns = _inputs(3)
  moved = lab.copy()
  moved[label_noun == 0] = -moved[label_noun == 0]
  a = prompt_label_loss(img, lab, label_noun, caption_nouns, 0.1)
  b = prompt_label_loss(img, moved, label_noun, caption_nouns, 0.1)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  loss, grads = jax.value_and_grad(prompt_label_loss, argnums=(0, 1))(
      img, lab, np.zeros_like(label_noun), caption_nouns, 0.1)
  assert loss == 0 and all(np.isfinite(g).all() for g in grads)


def test_prompt_label_loss_is_lower_when_images_match_their_nouns():
  img, lab, label_noun, caption_nouns = _inputs(4, nouns=3)
  # Labels that sit on the images with their noun vs. the same labels shuffled.
  centre = {n: _normalize(np.random.default_rng(n).normal(size=16)) for n in range(1, 4)}
  good_lab = np.stack([centre.get(n, lab[j]) for j, n in enumerate(label_noun)]).astype(np.float32)
  good_img = _normalize(np.stack([sum(centre[n] for n in set(c) - {0}) if c.any() else img[i]
                                  for i, c in enumerate(caption_nouns)])).astype(np.float32)
  assert (prompt_label_loss(good_img, good_lab, label_noun, caption_nouns, 0.1)
          < prompt_label_loss(good_img, good_lab[::-1], label_noun, caption_nouns, 0.1))


def test_prompt_label_loss_sharded_equals_single_device():
  img, lab, label_noun, caption_nouns = _inputs(5, batch=16)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  s = NamedSharding(mesh, P("data"))
  fn = jax.jit(jax.value_and_grad(prompt_label_loss, argnums=(0, 1)))
  loss8, grads8 = fn(*(jax.device_put(x, s) for x in (img, lab, label_noun, caption_nouns)), 0.06)
  loss1, grads1 = fn(img, lab, label_noun, caption_nouns, 0.06)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  for a, b in zip(grads8, grads1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_noun_codes_are_fixed_unit_vectors_per_noun():
  ids = jnp.asarray([7, 3, 7, 0, 123456789], jnp.int32)
  codes = np.asarray(noun_codes(ids, 32))
  np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(codes[0], codes[2])          # same noun, same code
  np.testing.assert_array_equal(codes, noun_codes(ids, 32))  # every call
  assert abs(codes[0] @ codes[1]) < 0.7 and abs(codes[1] @ codes[4]) < 0.7
  assert not np.allclose(noun_codes(ids, 32, seed=1), codes)
