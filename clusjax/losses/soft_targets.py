"""Losses against soft targets: distillation (paper Eq. 1) and SoftCLIP.

Both compare a target distribution with a predicted one row by row through
the KL divergence of `kl_rows`, which lets a target put zero mass on an
entry (SoftCLIP's relation term drops each row's positive).
"""
import jax
import jax.numpy as jnp

from clusjax.losses.itc import infonce_from_logits


def kl_rows(target, log_target, log_pred, valid=None):
  """KL(target || pred) of each row: [..., C] -> [...], float32.

  `valid` (bool, broadcastable) marks the entries in both distributions;
  the others (zero mass in both) add nothing, nor do entries where the target
  is 0 (0 log 0 = 0).
  """
  keep = target > 0
  if valid is not None:
    keep = keep & valid
  terms = target * (jnp.where(keep, log_target, 0.0) - jnp.where(keep, log_pred, 0.0))
  return jnp.sum(jnp.where(keep, terms, 0.0), axis=-1)


def distillation_loss(student_logits, teacher_logits, labels, *, alpha=0.45, temperature=1.0):
  """`alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)`.

  Args:
    student_logits, teacher_logits: [B, C]; the teacher is not differentiated.
    labels: int [B], the hard targets of the cross-entropy.
    alpha: weight of the teacher's term; temperature: T.
  Returns:
    scalar float32; both terms averaged over the rows.
  """
  if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
    raise ValueError(f"student_logits {student_logits.shape} and teacher_logits "
                     f"{teacher_logits.shape} must both be [B, C].")
  if labels.shape != student_logits.shape[:1]:
    raise ValueError(f"labels {labels.shape} must be [B] = [{student_logits.shape[0]}].")
  t = float(temperature)
  student = student_logits.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  log_teacher = jax.nn.log_softmax(teacher / t, axis=-1)
  kl = kl_rows(jnp.exp(log_teacher), log_teacher, jax.nn.log_softmax(student / t, axis=-1))
  log_p = jax.nn.log_softmax(student, axis=-1)
  ce = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return alpha * t * t * jnp.mean(kl) + (1.0 - alpha) * jnp.mean(ce)


def softclip_loss(logits, image_self_logits, text_self_logits, *, beta=0.3, relation_weight=1.0,
                  symmetric_kl=True, clip_weight=0.0):
  """SoftCLIP (Gao et al. 2023): contrast against targets softened by each modality's self-similarity.

  Args:
    logits: [B, B], image i against text j, already divided by the temperature.
    image_self_logits, text_self_logits: [B, B] image-image and text-text
      logits (scaled); their row softmaxes soften the targets. Targets are
      not differentiated.
    beta: the softening: image->text target rows are
      `(1 - beta) * I + beta * softmax(image_self_logits)`, text->image rows
      the same with `text_self_logits`.
    relation_weight: weight of the same divergence over the negatives alone
      (each row's diagonal dropped from target and prediction, both
      renormalised); it does not depend on the positive logits. With
      beta = 0 the target has no mass off the diagonal and the term is 0.
    symmetric_kl: D = (KL(t||p) + KL(p||t)) / 2 instead of KL(t||p).
    clip_weight: weight of the plain symmetric InfoNCE added on top.
  Returns:
    scalar float32: the mean of the two directions of the mean row divergence,
    plus the weighted relation and InfoNCE terms. With beta = 0,
    relation_weight = 0 and symmetric_kl False it is the ITC loss.
  """
  b = logits.shape[0]
  for name, x in (("logits", logits), ("image_self_logits", image_self_logits),
                  ("text_self_logits", text_self_logits)):
    if x.shape != (b, b):
      raise ValueError(f"softclip_loss: {name} has shape {x.shape}; expected [B, B] = {(b, b)}.")
  if symmetric_kl and beta <= 0:
    raise ValueError(f"softclip_loss: symmetric_kl needs beta > 0 (got beta={beta}): KL(p || t) "
                     "is infinite against a one-hot target.")
  eye = jnp.eye(b, dtype=bool)
  logits = logits.astype(jnp.float32)

  def divergence(target, pred_logits, valid):
    log_p = jax.nn.log_softmax(jnp.where(valid, pred_logits, -jnp.inf), axis=-1)
    log_t = jnp.log(jnp.where(target > 0, target, 1.0))
    d = kl_rows(target, log_t, log_p, valid)
    if symmetric_kl:
      d = 0.5 * (d + kl_rows(jnp.exp(jnp.where(valid, log_p, -jnp.inf)), log_p, log_t, valid))
    return jnp.mean(d)

  total = 0.0
  for pred_logits, self_logits in ((logits, image_self_logits), (logits.T, text_self_logits)):
    soft = jax.nn.softmax(jax.lax.stop_gradient(self_logits).astype(jnp.float32), axis=-1)
    target = (1.0 - beta) * eye + beta * soft
    total += 0.5 * divergence(target, pred_logits, jnp.ones_like(eye))
    if relation_weight:
      off = jnp.where(eye, 0.0, target)
      off = off / jnp.maximum(jnp.sum(off, axis=-1, keepdims=True), 1e-30)
      total += 0.5 * relation_weight * divergence(off, pred_logits, ~eye)
  if clip_weight:
    total += clip_weight * infonce_from_logits(logits)
  return total
