"""Clustering swap prediction, L_z of the paper (Eq. 5-7, 9)."""
import jax
import jax.numpy as jnp

from clusjax.clustering.sinkhorn import sinkhorn


def swap_prediction_loss(image_feats, text_feats, prototypes, *, temperature=0.1,
                         epsilon=0.05, num_iters=3, active=None):
  """L_z = CE(softmax(V_T), G_T) + CE(softmax(V_I), G_I).

  Each modality predicts the cluster code of the other: V_T = F_I Z / tau is
  the image's prediction of the text's code G_T = sinkhorn(F_T Z), and
  V_I = F_T Z / tau the text's prediction of G_I = sinkhorn(F_I Z).

  Args:
    image_feats: [B, d] L2-normalised image features F_I (global batch).
    text_feats: [B, d] L2-normalised text features F_T.
    prototypes: [d, K] prototype columns Z (L2-normalised).
    temperature: tau_z.
    epsilon, num_iters: Sinkhorn parameters.
    active: optional [K] bool; inactive prototypes are masked out of the
      softmaxes and of Sinkhorn.
  Returns:
    scalar float32, the sum of both cross-entropies averaged over the batch.
  """
  k = prototypes.shape[1]
  if active is None:
    active = jnp.ones((k,), bool)
  z = prototypes.astype(jnp.float32)
  scores_i = image_feats.astype(jnp.float32) @ z           # F_I Z, [B, K]
  scores_t = text_feats.astype(jnp.float32) @ z            # F_T Z, [B, K]
  codes_t = sinkhorn(scores_t, epsilon=epsilon, num_iters=num_iters, mask=active)  # G_T
  codes_i = sinkhorn(scores_i, epsilon=epsilon, num_iters=num_iters, mask=active)  # G_I

  def cross_entropy(scores, codes):
    logits = jnp.where(active[None, :], scores / temperature, -jnp.inf)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    # Inactive columns have code 0; keep 0 * -inf out of the sum.
    return -jnp.mean(jnp.sum(jnp.where(active[None, :], codes * log_p, 0.0), axis=-1))

  return cross_entropy(scores_i, codes_t) + cross_entropy(scores_t, codes_i)  # Eq. 5
