"""Captioning's masked fine-tuning (paper Fig. 6e; UniLM / VLMo): masked-token
prediction under the seq2seq mask, plus the next-token LM loss, label-smoothed.

Both read one forward pass of `ClusModel.caption_logits` over the masked caption:
each text position sees the image and the positions up to itself, so its output
predicts "the first word it cannot read": its own word where its input is [MASK]
(masked-token loss), the next word where its input is the real word (LM loss).
"""
import jax
import jax.numpy as jnp


def caption_masking(rng, ids, mask, *, mask_id, ratio):
  """Masked fine-tuning's input: each caption token after [CLS] (its words and
  [SEP], which decoding must learn to emit) becomes [MASK] with probability
  `ratio`. All of them become [MASK] (no BERT 80/10/10): every other input is the
  real word, which the LM loss reads.

  Args:
    rng: PRNG key; ids int32 [B, L]; mask bool [B, L] (real tokens).
  Returns:
    (masked ids int32 [B, L], targets bool [B, L]: the masked positions).
  """
  maskable = mask.astype(bool) & (jnp.arange(ids.shape[1]) > 0)[None, :]
  targets = maskable & jax.random.bernoulli(rng, ratio, ids.shape)
  return jnp.where(targets, mask_id, ids).astype(jnp.int32), targets


def smoothed_nll(logits, labels, *, vocab_size, label_smoothing=0.0):
  """Cross-entropy [..] of logits [.., V'] (V' >= vocab_size: the padded table's
  extra rows are left out) against labels [..], with the target
  (1 - eps) one-hot + eps / vocab_size (eps = label_smoothing). Float32."""
  log_p = jax.nn.log_softmax(logits[..., :vocab_size].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  if not label_smoothing:
    return nll
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)


def caption_loss(logits, ids, mask, targets, *, vocab_size, label_smoothing=0.0, lm_weight=0.0):
  """masked-token loss + lm_weight x next-token loss, each a mean over its positions.

  Args:
    logits: [B, L, V'] of `caption_logits` on the masked ids.
    ids: int32 [B, L], the caption (unmasked); mask: bool [B, L] real tokens;
    targets: bool [B, L], the masked positions (`caption_masking`).
  Returns:
    (loss, {"mask_loss", "lm_loss", "accuracy" (argmax = word at the masked
    positions)}); a term with no position is 0.
  """
  mask = mask.astype(bool)
  nll = smoothed_nll(logits, ids, vocab_size=vocab_size, label_smoothing=label_smoothing)
  w = targets.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w), 1.0)
  mask_loss = jnp.sum(nll * w) / count
  correct = (jnp.argmax(logits[..., :vocab_size], axis=-1) == ids).astype(jnp.float32)
  terms = {"mask_loss": mask_loss, "accuracy": jnp.sum(correct * w) / count}
  loss = mask_loss
  # Next word from a position that reads its own word: input real at i, a word at i + 1.
  lm_w = (mask[:, :-1] & ~targets[:, :-1] & mask[:, 1:]).astype(jnp.float32)
  lm_nll = smoothed_nll(logits[:, :-1], ids[:, 1:], vocab_size=vocab_size,
                        label_smoothing=label_smoothing)
  terms["lm_loss"] = jnp.sum(lm_nll * lm_w) / jnp.maximum(jnp.sum(lm_w), 1.0)
  if lm_weight:
    loss = loss + lm_weight * terms["lm_loss"]
  return loss, terms
