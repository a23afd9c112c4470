"""Image-text contrastive loss (ALBEF / CLIP InfoNCE)."""
import jax
import jax.numpy as jnp

# ALBEF clamps its learnable temperature to this range.
TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5


def clip_temperature(temperature):
  return jnp.clip(temperature, TEMPERATURE_MIN, TEMPERATURE_MAX)


def itc_logits(image_feats, text_feats, temperature):
  """Similarities over the global batch: [B, d] x [B, d] -> [B, B] float32.

  The features are sharded over the batch axes; contracting over the global
  batch is where XLA all-gathers the text features across the data axis, so
  every example is contrasted with the negatives of all shards.
  """
  logits = jnp.einsum("id,jd->ij", image_feats.astype(jnp.float32),
                      text_feats.astype(jnp.float32))
  return logits / clip_temperature(temperature)


def itc_loss(image_feats, text_feats, temperature):
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropy.

  Args:
    image_feats: [B, d] L2-normalised image features (global batch).
    text_feats: [B, d] L2-normalised text features; row i pairs with image i.
    temperature: scalar, clipped to [0.001, 0.5] as in ALBEF.
  Returns:
    scalar float32 loss.
  """
  return infonce_from_logits(itc_logits(image_feats, text_feats, temperature))


def infonce_from_logits(logits, negative_logits=None):
  """The symmetric InfoNCE of `itc_loss` from its [B, B] logits (row i pairs column i).

  negative_logits: optional [B, N] logits of each image against N extra
  negative texts (hard negative captions; -inf where there is none). They join
  the image->text softmax only, as in NegCLIP: text->image is unchanged.
  """
  i2t_logits = logits
  if negative_logits is not None:
    i2t_logits = jnp.concatenate([logits, negative_logits.astype(logits.dtype)], axis=1)
  i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(i2t_logits, axis=1)))
  t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return 0.5 * (i2t + t2i)
