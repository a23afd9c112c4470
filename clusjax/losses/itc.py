"""Image-text contrastive losses: ALBEF / CLIP InfoNCE, and SigLIP's sigmoid loss."""
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


# SigLIP's initial log temperature and bias (Zhai et al. 2023).
SIGLIP_LOG_TEMPERATURE_INIT = 2.302585092994046   # log(10)
SIGLIP_BIAS_INIT = -10.0


def siglip_loss(image_feats, text_feats, log_temperature, bias):
  """SigLIP: `-(1/B) sum_ij log_sigmoid(z_ij * (exp(log_temperature) <x_i, y_j> + bias))`.

  z = +1 on the diagonal (the pairs), -1 elsewhere, over the global batch
  (the contraction all-gathers as in `itc_logits`).
  Args:
    image_feats, text_feats: [B, d] L2-normalised features; row i pairs with row i.
    log_temperature, bias: learnable scalars (init log 10 and -10).
  Returns:
    scalar float32.
  """
  if image_feats.shape != text_feats.shape or image_feats.ndim != 2:
    raise ValueError(f"siglip_loss: image_feats {image_feats.shape} and text_feats "
                     f"{text_feats.shape} must both be [B, d].")
  logits = jnp.einsum("id,jd->ij", image_feats.astype(jnp.float32),
                      text_feats.astype(jnp.float32))
  logits = jnp.exp(jnp.asarray(log_temperature, jnp.float32)) * logits + bias
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
