"""AdamW with linear warm-up then cosine decay (optax), as in the paper; parameter
groups named in `optim.frozen` are held fixed."""
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


def frozen_groups(optim_config):
  """The top-level parameter groups `optim.frozen` holds fixed (a tuple; () = none)."""
  return tuple(optim_config.get("frozen", ()))


def check_frozen(frozen, params):
  """Raises ConfigError naming a frozen group that `params` does not have."""
  from clusjax.config import ConfigError
  for name in frozen:
    if name not in params:
      raise ConfigError(f"config.optim.frozen: {name!r} is not a parameter group of this "
                       f"model; its groups: {', '.join(sorted(params))}.")


def stop_frozen(params, frozen):
  """`params` with the groups in `frozen` behind stop_gradient: their gradient is
  zero and the backward pass through them is never built (a frozen image tower
  costs its forward only)."""
  if not frozen:
    return params
  return {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}


def make_optimizer(optim_config, num_steps):
  """Returns (optax transformation, schedule). Groups in `optim.frozen` get no update
  (no weight decay either) and no Adam moments."""
  schedule = learning_rate_schedule(optim_config, num_steps)
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(optax.adamw(
      schedule, b1=optim_config.b1, b2=optim_config.b2,
      weight_decay=optim_config.weight_decay, mask=_decay_mask))
  tx = optax.chain(*parts)
  frozen = frozen_groups(optim_config)
  if frozen:
    def labels(params):   # a prefix of the params: one label per top-level group
      check_frozen(frozen, params)
      return type(params)({k: "frozen" if k in frozen else "train" for k in params})
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
