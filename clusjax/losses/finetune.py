"""Fine-tuning losses: VQA soft-target BCE, classification CE, SupCon and CLCE.

SupCon is Khosla et al. 2020 (L^sup_out); CLCE (Contrastive Learning with
Cross-Entropy) mixes CE with the label-aware contrastive loss with negative
weights (LACLN), whose negatives are weighted by a softmax over each row's
negatives. All math is float32 and in log space; the [B, B] similarities span
the global batch, so with the batch sharded XLA all-gathers the features.
"""
import jax
import jax.numpy as jnp


def _check_valid(valid, batch, fn):
  """valid: [B] bool or None (= all rows) -> [B] bool."""
  if valid is None:
    return jnp.ones((batch,), bool)
  if valid.shape != (batch,):
    raise ValueError(f"{fn}: valid {valid.shape} must be [B] = [{batch}].")
  return valid.astype(bool)


def _check_temperature(temperature, fn):
  # Traced temperatures (learnable) cannot be checked here.
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"{fn}: temperature={temperature} must be > 0.")


def _masked_mean(values, keep):
  """Mean of values [B] over keep [B] bool; 0.0 when nothing is kept."""
  total = jnp.sum(jnp.where(keep, values, 0.0))
  return total / jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)


def _masked_logsumexp(x, mask):
  """logsumexp of x [B, M] over the entries where mask [B, M] is True, per row -> [B].

  A row with no entry gives 0.0, not -inf: its gradient would be NaN (0 / 0),
  and it poisons the others' through jnp.where. Callers drop those rows.
  """
  has_any = jnp.any(mask, axis=1, keepdims=True)
  # Rows with no entry sum over all of theirs instead (finite), then read 0.
  lse = jax.nn.logsumexp(jnp.where(mask | ~has_any, x, -jnp.inf), axis=1)
  return jnp.where(has_any[:, 0], lse, 0.0)


def _similarities(features, labels, temperature, valid, fn):
  """Scaled cosine similarities s [B, B] and the masks of each anchor's pairs.

  Returns:
    s: [B, B] float32, z z^T / temperature with z the L2-normalised features.
    others: [B, B] bool, j != i, both rows valid (A(i)).
    pos: [B, B] bool, others with labels[j] == labels[i] (P(i)).
    neg: [B, B] bool, others with another label (N(i)).
  """
  if features.ndim != 2:
    raise ValueError(f"{fn}: features {features.shape} must be [B, D].")
  batch = features.shape[0]
  if labels.shape != (batch,):
    raise ValueError(f"{fn}: labels {labels.shape} must be [B] = [{batch}].")
  _check_temperature(temperature, fn)
  valid = _check_valid(valid, batch, fn)
  z = features.astype(jnp.float32)
  # eps keeps an all-zero row (padding) finite.
  z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=1, keepdims=True), 1e-12))
  s = jnp.einsum("id,jd->ij", z, z) / jnp.asarray(temperature, jnp.float32)
  others = valid[:, None] & valid[None, :] & ~jnp.eye(batch, dtype=bool)
  same = labels[:, None] == labels[None, :]
  return s, others, others & same, others & ~same


def vqa_loss(logits, target_scores, valid=None):
  """VQA as multi-label answer classification with soft scores.

  Args:
    logits: [B, A] float, one per candidate answer.
    target_scores: [B, A] float in [0, 1] (VQA's min(#humans / 3, 1)).
    valid: optional [B] bool; None = all rows.
  Returns:
    scalar float32: mean over valid rows of the sum over answers of the
    binary cross-entropy; 0.0 with no valid row.
  """
  if logits.ndim != 2 or logits.shape != target_scores.shape:
    raise ValueError(f"vqa_loss: logits {logits.shape} and target_scores "
                     f"{target_scores.shape} must both be [B, A].")
  x = logits.astype(jnp.float32)
  t = target_scores.astype(jnp.float32)
  # log(1 - sigmoid(x)) = log_sigmoid(-x): stable for large |x|.
  bce = -(t * jax.nn.log_sigmoid(x) + (1.0 - t) * jax.nn.log_sigmoid(-x))
  return _masked_mean(jnp.sum(bce, axis=1), _check_valid(valid, x.shape[0], "vqa_loss"))


def classification_loss(logits, labels, valid=None):
  """Softmax cross-entropy: logits [B, C] float, labels int [B] -> scalar float32.

  Mean over the valid rows (valid: optional [B] bool; None = all), 0.0 if none.
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"classification_loss: logits {logits.shape} must be [B, C] and "
                     f"labels {labels.shape} [B].")
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=1)
  ce = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
  return _masked_mean(ce, _check_valid(valid, logits.shape[0], "classification_loss"))


def supcon_loss(features, labels, *, temperature=0.1, valid=None):
  """Supervised contrastive loss (Khosla et al. 2020, L^sup_out).

  Args:
    features: [B, D] float, L2-normalised here.
    labels: int [B]; rows with the same label are positives of each other.
    temperature: scalar > 0.
    valid: optional [B] bool; invalid rows are neither anchors nor pairs.
  Returns:
    scalar float32: mean over the anchors with a positive of
    -1/|P(i)| sum_p log(exp(s_ip) / sum_{a != i} exp(s_ia)); 0.0 if none.
  """
  s, others, pos, _ = _similarities(features, labels, temperature, valid, "supcon_loss")
  log_prob = s - _masked_logsumexp(s, others)[:, None]
  num_pos = jnp.sum(pos, axis=1)
  per_anchor = -jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / jnp.maximum(num_pos, 1)
  return _masked_mean(per_anchor, num_pos > 0)


def clce_loss(logits, features, labels, *, lam=0.9, temperature=0.5, valid=None):
  """CLCE: `(1 - lam) * CE(logits, labels) + lam * L_LACLN`.

  L_LACLN of anchor i is -log(mean_P exp(s_ip) / (sum_P exp(s_ip) +
  sum_N w_ik exp(s_ik))), with w_ik = |N(i)| softmax_{k in N(i)}(s_ik): hard
  negatives weigh more, and the weights sum to |N(i)| (all 1 when the negatives
  tie). With no negative the w terms vanish and L_i = log|P(i)|.

  Args:
    logits: [B, C] classifier logits.
    features: [B, D] float, L2-normalised here.
    labels: int [B].
    lam: weight of the contrastive term in [0, 1]; 0 = plain CE.
    temperature: scalar > 0.
    valid: optional [B] bool; invalid rows drop out of both terms.
  Returns:
    scalar float32; L_LACLN averages over the anchors with a positive (0.0 if none).
  """
  if logits.shape[:1] != features.shape[:1]:
    raise ValueError(f"clce_loss: logits {logits.shape} and features {features.shape} "
                     "must have the same batch size.")
  ce = classification_loss(logits, labels, valid)
  s, _, pos, neg = _similarities(features, labels, temperature, valid, "clce_loss")
  num_pos = jnp.sum(pos, axis=1)
  num_neg = jnp.sum(neg, axis=1)
  log_pos = _masked_logsumexp(s, pos)                       # log sum_P exp(s_ip)
  # log(w_ik exp(s_ik)) = log|N(i)| + 2 s_ik - logsumexp_N(s_i): the denominator is
  # one masked logsumexp over P and N (disjoint), never leaving log space.
  log_w = jnp.log(jnp.maximum(num_neg, 1).astype(jnp.float32)) - _masked_logsumexp(s, neg)
  terms = jnp.where(pos, s, log_w[:, None] + 2.0 * s)
  log_denominator = _masked_logsumexp(terms, pos | neg)
  log_mean_pos = log_pos - jnp.log(jnp.maximum(num_pos, 1).astype(jnp.float32))
  lacln = _masked_mean(log_denominator - log_mean_pos, num_pos > 0)
  return (1.0 - lam) * ce + lam * lacln
