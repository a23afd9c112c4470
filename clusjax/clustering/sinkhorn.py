"""Sinkhorn-Knopp codes for swapped prediction (SwAV, Caron et al. 2020)."""
import jax
import jax.numpy as jnp


def sinkhorn(scores, *, epsilon=0.05, num_iters=3, mask=None):
  """Soft, equipartitioned cluster assignments of a batch.

  SwAV's Sinkhorn-Knopp: Q = exp(scores / eps), then alternately make every
  active prototype receive 1/K of the mass and every example give 1/B, and
  finally scale rows to sum to 1. The batch is the *global* batch: when
  `scores` is sharded over the data axis, the column sums over the batch are
  cross-shard reductions that XLA turns into all-reduces (SwAV does the same
  with dist.all_reduce).

  Args:
    scores: [B, K] similarities of features to prototypes.
    epsilon: entropic regularisation (SwAV: 0.05).
    num_iters: Sinkhorn iterations (SwAV: 3).
    mask: optional [K] bool, True for active prototypes; inactive columns get
      exactly 0 and do not count in K.
  Returns:
    codes [B, K] float32, each row summing to 1. No gradient flows through
    (the codes are targets).
  """
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  batch, k = scores.shape
  if mask is None:
    mask = jnp.ones((k,), bool)
  num_active = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
  logits = jnp.where(mask[None, :], scores / epsilon, -jnp.inf)
  # Subtracting the global max keeps exp() finite; it cancels in the scaling.
  q = jnp.exp(logits - jnp.max(logits))
  q = q / jnp.sum(q)
  for _ in range(num_iters):
    col = jnp.sum(q, axis=0, keepdims=True)                  # mass per prototype
    q = jnp.where(mask[None, :], q / jnp.where(col > 0, col, 1.0) / num_active, 0.0)
    row = jnp.sum(q, axis=1, keepdims=True)                  # mass per example
    q = q / jnp.where(row > 0, row, 1.0) / batch
  return q * batch
