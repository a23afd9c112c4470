"""The pure train step: (state, batch) -> (state, metrics)."""
import jax
import optax

from clusjax.losses import clip_temperature, itc_loss


def compute_losses(model, params, batch, rng, loss_config):
  """Forward pass and the weighted objective.

  Returns (total loss, dict of per-term scalars for logging).
  """
  out = model.apply({"params": params}, batch["image"], batch["text_ids"],
                    batch["text_mask"], deterministic=False, rngs={"dropout": rng})
  itc = itc_loss(out["image_feats"], out["text_feats"], out["temperature"])
  total = loss_config.itc_weight * itc
  return total, dict(itc=itc, temperature=clip_temperature(out["temperature"]))


def make_train_step(model, tx, schedule, config):
  """Builds `train_step(state, batch) -> (state, metrics)`, to be jitted."""
  loss_config = config.loss

  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(
        lambda p: compute_losses(model, p, batch, rng, loss_config), has_aux=True)
    (loss, terms), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, **terms, learning_rate=schedule(state.step),
                   grad_norm=optax.global_norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step
