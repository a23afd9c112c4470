"""AdamW with linear warm-up then cosine decay (optax), as in the paper."""
import jax
import optax


def learning_rate_schedule(optim_config, num_steps):
  """Warm-up from 0 to the peak over `warmup_frac` of the steps, then cosine."""
  peak = optim_config.learning_rate
  warmup = int(round(optim_config.warmup_frac * num_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=peak * optim_config.end_lr_frac)


def _decay_mask(params):
  # Weight decay on matrices only: biases, LayerNorm, the temperature and
  # other vectors/scalars are left alone (BERT / ViT practice).
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_config, num_steps):
  """Returns (optax transformation, schedule)."""
  schedule = learning_rate_schedule(optim_config, num_steps)
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(optax.adamw(
      schedule, b1=optim_config.b1, b2=optim_config.b2,
      weight_decay=optim_config.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule
