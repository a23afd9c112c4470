"""Prompt-template label loss (paper Fig. 4b; labels from `clusjax.data.prompts`).

`prompt_label_loss` contrasts images with their label texts. With
`noun_codes` in place of the text features it is a fixed-classifier loss on
the nouns (one frozen random unit vector per noun, as in "Fix your
classifier", Hoffer et al. 2018). From scratch both towers start blind to
content (the [CLS] features of any two captions have cosine 0.9999 at init);
the image tower then has no target that tells nouns apart, and the
label-text term alone stays at its uniform value while the features
collapse. The codes differ from step 0, so the image tower learns the nouns
and the text tower follows (benchmarks/RESULTS.md, "Prompt labels").
"""
import jax
import jax.numpy as jnp

from clusjax.losses.itc import itc_logits


def _soft_cross_entropy(logits, targets, axis):
  """-sum(targets * log_softmax(logits)) along `axis`."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=axis), axis=axis)


def prompt_label_loss(image_feats, label_feats, label_noun, caption_nouns, temperature):
  """Contrast of images with the batch's label texts, many positives each.

  A label text ("a photo of a circle.") is positive for every image whose
  caption has its noun. Image -> labels: cross-entropy against the uniform
  distribution over the image's positive labels (images with none are left
  out); labels -> image: the same over each label's positive images. The
  loss is the mean of the two directions.

  Args:
    image_feats: [B, d] L2-normalised image features (global batch).
    label_feats: [N, d] L2-normalised features of the label texts.
    label_noun: int [N], the noun id of each label text; 0 = no label (masked).
    caption_nouns: int [B, M], the noun ids of each caption, 0-padded.
    temperature: scalar, ITC's (clipped like it).
  Returns:
    scalar float32 loss.
  """
  valid = label_noun != 0
  positive = jnp.any(caption_nouns[:, None, :] == label_noun[None, :, None], axis=-1) & valid
  positive = positive.astype(jnp.float32)
  # Masked columns: a large negative finite logit, so that they take no probability and
  # a batch without any label stays finite (and so do its gradients).
  logits = jnp.where(valid[None, :], itc_logits(image_feats, label_feats, temperature), -1e9)

  has_label = positive.sum(1) > 0
  i2l = _soft_cross_entropy(logits, positive / jnp.maximum(positive.sum(1, keepdims=True), 1), 1)
  i2l = jnp.sum(jnp.where(has_label, i2l, 0.0)) / jnp.maximum(has_label.sum(), 1)
  l2i = _soft_cross_entropy(logits, positive / jnp.maximum(positive.sum(0, keepdims=True), 1), 0)
  l2i = jnp.sum(jnp.where(valid, l2i, 0.0)) / jnp.maximum(valid.sum(), 1)
  return 0.5 * (i2l + l2i)


def noun_codes(label_noun, dim, seed=0):
  """A fixed random unit vector [dim] per noun id: label_noun int [N] -> [N, dim].

  The code of a noun is a function of its id (and `seed`) alone: no
  parameters, no vocabulary, the same on every step, device and host.
  """
  base = jax.random.key(seed)
  codes = jax.vmap(lambda n: jax.random.normal(jax.random.fold_in(base, n), (dim,)))(label_noun)
  return codes / jnp.linalg.norm(codes, axis=-1, keepdims=True)

