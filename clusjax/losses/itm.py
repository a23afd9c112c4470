"""Image-text matching with hard negatives from the global batch (ALBEF)."""
import jax
import jax.numpy as jnp


def sample_hard_negatives(rng, similarity, uniform_fraction=0.0, excluded=None):
  """One hard negative text per image and one hard negative image per text.

  Negatives are drawn from the *global* batch with probability
  softmax(similarity) over the other examples (the positive excluded), as
  ALBEF does: the more an unmatched pair looks like a match to ITC, the more
  likely it is picked. With `similarity` sharded over its rows, the softmax
  runs over the full (global) row, so negatives come from every data shard.

  With `uniform_fraction` u > 0 each negative is drawn from the mixture
  (1 - u) softmax + u uniform (over the other examples): while ITC still
  confuses a pair that only a detail tells apart (a place twin), its hard
  negatives are nearly all such pairs, and ITM, which cannot tell them apart
  either yet, learns nothing; the uniform share gives it the easy ones first.

  `excluded` (bool [B, B], image row by text column) marks pairs never drawn,
  by either share: e.g. an example's place twin once ITM has learned place
  (`twin_pairs`), so that its negatives are the other kinds of near miss.
  A row needs at least one pair left to draw.

  Args:
    rng: PRNG key.
    similarity: [B, B] image-by-text ITC logits (a gradient is not taken).
    uniform_fraction: u in [0, 1].
    excluded: None, or bool [B, B] (may be traced).
  Returns:
    (negative text index per image [B], negative image index per text [B]), int32.
  """
  sim = jax.lax.stop_gradient(similarity).astype(jnp.float32)
  b = sim.shape[0]
  if b < 2:
    raise ValueError(f"hard negatives need a batch of at least 2; got {b}.")
  if not 0.0 <= uniform_fraction <= 1.0:
    raise ValueError(f"uniform_fraction={uniform_fraction} must be in [0, 1].")
  if excluded is not None and excluded.shape != (b, b):
    raise ValueError(f"excluded has shape {excluded.shape}; the similarity is {(b, b)}.")
  eye = jnp.eye(b, dtype=bool)
  blocked = eye if excluded is None else eye | excluded

  def log_probs(rows, blocked):
    logits = jnp.where(blocked, -jnp.inf, rows)
    if not uniform_fraction:
      return logits
    share = (1.0 / (b - 1) if excluded is None    # uniform over the pairs left
             else 1.0 / jnp.maximum(jnp.sum(~blocked, axis=1, keepdims=True), 1))
    p = ((1.0 - uniform_fraction) * jax.nn.softmax(logits, axis=1)
         + uniform_fraction * jnp.where(blocked, 0.0, share))
    return jnp.where(blocked, -jnp.inf, jnp.log(p))

  rng_text, rng_image = jax.random.split(rng)
  neg_text = jax.random.categorical(rng_text, log_probs(sim, blocked), axis=1)
  neg_image = jax.random.categorical(rng_image, log_probs(sim.T, blocked.T), axis=1)
  return neg_text.astype(jnp.int32), neg_image.astype(jnp.int32)


def twin_pairs(pair_id):
  """bool [B, B]: rows r != c of one pair (the same `pair_id`, e.g. an example and
  its place twin, `clusjax.data.twins`)."""
  same = pair_id[:, None] == pair_id[None, :]
  return same & ~jnp.eye(pair_id.shape[0], dtype=bool)


def itm_pairs(images, texts, neg_text, neg_image):
  """The 3B ITM pairs: B positives, then (image, hard text), then (hard image, text).

  Args:
    images: a pytree of per-image arrays [B, ...] (tokens, features, ...).
    texts: a pytree of per-text arrays [B, ...] (tokens, mask, features, ...).
    neg_text, neg_image: int [B], from `sample_hard_negatives`.
  Returns:
    (images of the pairs, texts of the pairs: the same pytrees with [3B, ...]
    leaves; labels int32 [3B], 1 = match).
  """
  b = neg_text.shape[0]
  pair_images = jax.tree.map(lambda x: jnp.concatenate([x, x, x[neg_image]]), images)
  pair_texts = jax.tree.map(lambda x: jnp.concatenate([x, x[neg_text], x]), texts)
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  return pair_images, pair_texts, labels


def itm_loss(logits, labels, weights=None):
  """Mean binary cross-entropy of match logits [N, 2] against labels [N]; with
  weights [N] (e.g. 0 for a pair that does not exist) the weighted mean.

  Returns (loss, accuracy).
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  if weights is None:
    return jnp.mean(nll), jnp.mean(correct)
  w = weights.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(w), 1.0)
  return jnp.sum(w * nll) / total, jnp.sum(w * correct) / total
