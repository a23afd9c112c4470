"""AdamW with linear warm-up then cosine decay (optax), as in the paper; the parameter
subtrees named in `optim.frozen` are held fixed."""
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


def frozen_paths(optim_config):
  """The parameter subtrees `optim.frozen` holds fixed, as paths: "vision" (a top-level
  group) or "vision/cnn_stem" (a module inside one); () = none."""
  return tuple(optim_config.get("frozen", ()))


def check_frozen(frozen, params):
  """Raises ConfigError naming a frozen path that `params` does not have."""
  from clusjax.config import ConfigError
  for path in frozen:
    tree, seen = params, []
    for key in path.split("/"):
      if not hasattr(tree, "keys") or key not in tree:
        where = "/".join(seen) or "the model"
        have = ", ".join(sorted(tree)) if hasattr(tree, "keys") else "no sub-modules"
        raise ConfigError(f"config.optim.frozen: {path!r} is not in this model's parameters "
                          f"({where} has {have}).")
      tree, seen = tree[key], seen + [key]


def _map_frozen(params, frozen, leaf, prefix=""):
  """`params` as a prefix tree in which each frozen subtree is `leaf(subtree, True)`
  and each subtree with nothing frozen under it `leaf(subtree, False)`."""
  out = {}
  for key, value in params.items():
    path = f"{prefix}{key}"
    if path in frozen:
      out[key] = leaf(value, True)
    elif any(f.startswith(path + "/") for f in frozen):
      out[key] = _map_frozen(value, frozen, leaf, path + "/")
    else:
      out[key] = leaf(value, False)
  return type(params)(out)


def stop_frozen(params, frozen):
  """`params` with the subtrees in `frozen` behind stop_gradient: their gradient is
  zero and the backward pass through them is never built (a frozen image tower
  costs its forward only)."""
  if not frozen:
    return params
  return _map_frozen(params, frozen, lambda v, f: jax.lax.stop_gradient(v) if f else v)


def make_optimizer(optim_config, num_steps):
  """Returns (optax transformation, schedule). Subtrees in `optim.frozen` get no update
  (no weight decay either) and no Adam moments."""
  schedule = learning_rate_schedule(optim_config, num_steps)
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(optax.adamw(
      schedule, b1=optim_config.b1, b2=optim_config.b2,
      weight_decay=optim_config.weight_decay, mask=_decay_mask))
  tx = optax.chain(*parts)
  frozen = frozen_paths(optim_config)
  if frozen:
    def labels(params):   # a prefix tree of the params
      check_frozen(frozen, params)
      return _map_frozen(params, frozen, lambda _, f: "frozen" if f else "train")
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
