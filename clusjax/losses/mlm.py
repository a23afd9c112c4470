"""Masked language modelling from the fused text stream (BERT masking)."""
import jax
import jax.numpy as jnp


def mask_tokens(rng, ids, maskable, *, mask_id, num_tokens, probability=0.15,
                first_random_id=0):
  """BERT masking: pick `probability` of the maskable tokens; of those 80% ->
  [MASK], 10% -> a random token, 10% unchanged.

  Args:
    rng: PRNG key.
    ids: int32 [B, L].
    maskable: bool [B, L], True for ordinary tokens (not padding, [CLS], [SEP]).
    mask_id: the [MASK] id.
    num_tokens: random replacements are drawn from [first_random_id, num_tokens).
    probability: fraction of maskable tokens that are predicted.
  Returns:
    (masked ids int32 [B, L], targets bool [B, L]: the positions to predict).
  """
  r_pick, r_kind, r_tok = jax.random.split(rng, 3)
  targets = maskable & jax.random.bernoulli(r_pick, probability, ids.shape)
  u = jax.random.uniform(r_kind, ids.shape)
  random_ids = jax.random.randint(r_tok, ids.shape, first_random_id, num_tokens, jnp.int32)
  masked = jnp.where(targets & (u < 0.8), mask_id, ids)
  masked = jnp.where(targets & (u >= 0.8) & (u < 0.9), random_ids, masked)
  return masked.astype(jnp.int32), targets


def mlm_loss(logits, ids, targets):
  """Cross-entropy of logits [B, L, V] at the target positions (global mean).

  Returns (loss, accuracy); both 0 when no position is a target.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, ids[..., None], axis=-1)[..., 0]
  weight = targets.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32)
  return jnp.sum(nll * weight) / count, jnp.sum(correct * weight) / count
