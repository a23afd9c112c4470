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


def check_frozen(frozen, params, config_key="optim.frozen"):
  """Raises ConfigError naming a path of config.`config_key` that `params` does not have."""
  from clusjax.config import ConfigError
  for path in frozen:
    tree, seen = params, []
    for key in path.split("/"):
      if not hasattr(tree, "keys") or key not in tree:
        where = "/".join(seen) or "the model"
        have = ", ".join(sorted(tree)) if hasattr(tree, "keys") else "no sub-modules"
        raise ConfigError(f"config.{config_key}: {path!r} is not in this model's parameters "
                          f"({where} has {have}).")
      tree, seen = tree[key], seen + [key]


def _map_frozen(params, frozen, leaf, prefix=""):
  """`params` as a prefix tree in which each frozen subtree is `leaf(subtree, True)`
  and each subtree with nothing frozen under it `leaf(subtree, False)`."""
  return _map_paths(params, {path: True for path in frozen},
                    lambda value, found: leaf(value, bool(found)), prefix)


def _map_paths(params, tags, leaf, prefix=""):
  """`params` as a prefix tree in which the subtree at each path of `tags` is
  `leaf(subtree, tags[path])` and each subtree with no such path under it
  `leaf(subtree, None)`."""
  out = {}
  for key, value in params.items():
    path = f"{prefix}{key}"
    if path in tags:
      out[key] = leaf(value, tags[path])
    elif any(t.startswith(path + "/") for t in tags):
      out[key] = _map_paths(value, tags, leaf, path + "/")
    else:
      out[key] = leaf(value, None)
  return type(params)(out)


def lr_multipliers(optim_config):
  """{path: multiplier} of `optim.lr_multipliers` ((path, multiplier) pairs; paths as
  in optim.frozen): those subtrees train at the multiplier x the schedule's rate."""
  return {path: float(m) for path, m in optim_config.get("lr_multipliers", ())}


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

  def adamw(rate):
    return optax.adamw(rate, b1=optim_config.b1, b2=optim_config.b2,
                       weight_decay=optim_config.weight_decay, mask=_decay_mask)

  clip = ([optax.clip_by_global_norm(optim_config.grad_clip_norm)]
          if optim_config.grad_clip_norm > 0 else [])
  frozen, multipliers = frozen_paths(optim_config), lr_multipliers(optim_config)
  if multipliers:
    # One clipping over all gradients, then each group's AdamW at its own rate.
    groups = {"train": adamw(schedule), "frozen": optax.set_to_zero()}
    groups.update({f"x{m:g}": adamw(lambda step, m=m: m * schedule(step))
                   for m in multipliers.values()})
    tags = {**{path: f"x{m:g}" for path, m in multipliers.items()},
            **{path: "frozen" for path in frozen}}

    def group_labels(params):   # a prefix tree of the params
      check_frozen(frozen, params)
      check_frozen(tuple(multipliers), params, "optim.lr_multipliers")
      return _map_paths(params, tags, lambda _, tag: tag or "train")
    return optax.chain(*clip, optax.multi_transform(groups, group_labels)), schedule
  tx = optax.chain(*clip, adamw(schedule))
  if frozen:
    def labels(params):   # a prefix tree of the params
      check_frozen(frozen, params)
      return _map_frozen(params, frozen, lambda _, f: "frozen" if f else "train")
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
