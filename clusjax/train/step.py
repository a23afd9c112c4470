"""The pure train step: (state, batch) -> (state, metrics).

The objective and its terms are clusjax/train/objective.py; here: gradient
accumulation over microbatches, the feature queue, the clustering step between
train steps, and the update (skipped when the loss or gradients are not finite).
"""
import jax
import jax.numpy as jnp
import optax

from clusjax.clustering import cluster_prototypes
from clusjax.train.objective import (BATCH_TERMS, FEATURES, batch_terms, compute_losses,
                                     loss_weights, micro_terms, step_rngs, tower_outputs,
                                     weighted_sum)
from clusjax.train.optimizer import frozen_paths, stop_frozen
from clusjax.train.state import is_prototype_leaf


def _split(x, m):
  """[B, ...] -> [m, B / m, ...]; microbatch i is rows i, i + m, ... (strided,
  so each one spreads over all the devices the batch is split over)."""
  return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def _merge(x):
  """The inverse of `_split`: [m, b, ...] -> [m * b, ...] in the batch's order."""
  return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def accumulated_losses(model, params, batch, rng, config, text_ids, active, m, step=None):
  """The objective and its gradient over `m` microbatches (open_clip's
  accum-freq): the BATCH_TERMS still see the whole batch.

  1. The towers run on every microbatch without gradient: the whole batch's
     features.
  2. The batch terms on those features, and their gradients with respect to
     the features (and to the parameters the towers pass through, such as the
     temperature and prototypes).
  3. Each microbatch runs again with gradient: its own terms (`micro_terms`,
     weighted by 1 / m) plus the features' dot product with their gradients
     from step 2, so that the summed parameter gradients are the whole batch's.

  Returns (total loss, (terms, the batch's tower features), gradients).
  """
  weights = loss_weights(config.loss)
  coupled = {k: w for k, w in weights.items() if k in BATCH_TERMS}
  local = {k: w for k, w in weights.items() if k not in BATCH_TERMS}
  micro = jax.tree.map(lambda x: _split(x, m), batch)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(m))

  def towers(p, microbatch, key):
    return tower_outputs(model, p, microbatch, step_rngs(key), config, weights)

  def features(args):
    out = towers(params, *args)
    return {k: v for k, v in out.items() if not k.endswith("_tokens")}
  stacked = jax.lax.map(features, (micro, keys))
  out = {k: _merge(v) if k in FEATURES else v[0] for k, v in stacked.items()}

  def batch_total(o):
    terms = batch_terms(model, params, o, batch, step_rngs(rng), config, active, coupled)
    return weighted_sum(terms, coupled), terms
  (batch_loss, terms), cotangents = jax.value_and_grad(batch_total, has_aux=True)(out)
  # Per microbatch: its rows of the feature gradients; a parameter's gradient
  # (the same output in every microbatch) in m equal parts.
  cotangents = {k: _split(v, m) if k in FEATURES else jnp.broadcast_to(v / m, (m, *v.shape))
                for k, v in cotangents.items()}

  def microbatch(grads, args):
    mb, key, cot = args

    def surrogate(p):
      p = stop_frozen(p, frozen_paths(config.optim))
      o = towers(p, mb, key)
      t = micro_terms(model, p, o, mb, step_rngs(key), config, text_ids, active, local, step)
      own = weighted_sum(t, local)
      link = sum(jnp.vdot(cot[k], o[k].astype(cot[k].dtype)) for k in cot)
      return own / m + link, (own, t)
    g, aux = jax.grad(surrogate, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads, g), aux
  grads, (own, micro) = jax.lax.scan(microbatch, jax.tree.map(jnp.zeros_like, params),
                                     (micro, keys, cotangents))
  terms.update({k: jnp.mean(v) for k, v in micro.items()})
  return batch_loss + jnp.mean(own), (terms, out), grads


def normalize_prototypes(params):
  """Projects the prototype columns back onto the unit sphere (SwAV)."""
  z = params["prototypes"]
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=0, keepdims=True), 1e-12)
  return {**params, "prototypes": z}


def push_queue(queue, step, out):
  """Writes this step's image and text features into the ring buffer `queue`.

  Step s fills rows [(s * 2B) mod Q, ... + 2B): the queue's fill is a
  function of the step alone (`queue_valid`), so resume needs no pointer.
  """
  feats = jax.lax.stop_gradient(
      jnp.concatenate([out["image_feats"], out["text_feats"]]).astype(queue.dtype))
  start = (step * feats.shape[0]) % queue.shape[0]
  return jax.lax.dynamic_update_slice(queue, feats, (start, 0))


def queue_valid(queue, step, batch_size):
  """bool [Q]: the rows written by the first `step` steps."""
  q = queue.shape[0]
  return jnp.arange(q) < jnp.minimum(step * 2 * batch_size, q)


def reset_prototype_moments(opt_state):
  """Zeros the optimizer's per-parameter state of the prototypes (Adam's
  moments): after a clustering step column c is a different cluster."""
  def reset(path, leaf):
    return jnp.zeros_like(leaf) if is_prototype_leaf(path) else leaf
  return jax.tree_util.tree_map_with_path(reset, opt_state)


def make_cluster_step(config):
  """Builds `cluster_step(state) -> (state, stats)`: DBSCAN over the queue and
  the active prototypes sets new prototypes and `active` (DESIGN §3)."""
  cc = config.clustering

  def cluster_step(state):
    # Rows a skipped train step left unwritten are zeros on the queue's first lap:
    # not features (those are unit vectors), so not clustered.
    valid = (queue_valid(state.queue, state.step, config.train.batch_size)
             & jnp.any(state.queue != 0, axis=1))
    # As in the train step: non-finite inputs (valid queue rows, active prototypes)
    # or results leave the state as it was, and the stats say so. Rows not read
    # are zeroed (the projection's centring multiplies them by 0: NaN * 0 = NaN).
    queue = jnp.where(valid[:, None], state.queue, 0.0)
    z, active, stats = cluster_prototypes(
        queue, valid, state.params["prototypes"], state.active, dim=cc.dim,
        min_samples=cc.min_samples or None, eps=cc.eps or None)
    finite = (jnp.all(jnp.isfinite(queue))
              & jnp.all(jnp.isfinite(state.params["prototypes"]) | ~state.active[None, :])
              & jnp.all(jnp.isfinite(z)))
    new = state.replace(params={**state.params, "prototypes": z}, active=active,
                        opt_state=reset_prototype_moments(state.opt_state))
    stats = {**stats, "skipped": ~finite,
             "num_clusters": jnp.where(finite, stats["num_clusters"],
                                       jnp.sum(state.active).astype(jnp.int32))}
    return keep_if(finite, new, state), stats

  return cluster_step


def make_loss_and_grads(model, config, text_ids, teacher_model=None):
  """`(params, batch, rng, active, teacher_params, step) -> (loss, (terms, tower
  outputs), grads)` of the objective, over config.grad_accum_steps microbatches."""
  m = config.get("grad_accum_steps", 1)

  def loss_and_grads(params, batch, rng, active, teacher_params=None, step=None):
    if m > 1:
      return accumulated_losses(model, params, batch, rng, config, text_ids, active, m, step)
    teacher = None if teacher_model is None else (teacher_model, teacher_params)
    frozen = frozen_paths(config.optim)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: compute_losses(model, stop_frozen(p, frozen), batch, rng, config, text_ids,
                                 active, teacher, step),
        has_aux=True)(params)
    return loss, aux, grads

  return loss_and_grads


def keep_if(ok, new, old):
  """`new` where the scalar `ok` is True, else `old`, leaf by leaf (a select XLA
  fuses into the update that computes `new`: no copy, no branch)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(model, tx, schedule, config, text_ids, teacher_model=None,
                    batch_transform=None):
  """Builds `train_step(state, batch[, teacher_params]) -> (state, metrics)`, to be
  jitted; with `teacher_model` the step takes the teacher's (frozen) params.

  A step whose loss or gradient norm is not finite is not applied (optax's
  apply_if_finite, extended to all the state the update writes): params,
  optimizer state, prototypes and the feature queue stay as they were, bit for
  bit; the step counter still advances (the loop's data position too), and
  metrics["skipped"] is 1 (int32) for it, 0 otherwise.

  batch_transform: `(batch, step) -> batch` applied inside the step before the
  forward pass; a test hook (tests inject non-finite images through it).
  """
  if not loss_weights(config.loss):
    raise ValueError("every loss weight in config.loss is 0: nothing to train.")
  loss_and_grads = make_loss_and_grads(model, config, text_ids, teacher_model)

  def train_step(state, batch, teacher_params=None):
    if batch_transform is not None:
      batch = batch_transform(batch, state.step)
    rng = jax.random.fold_in(state.rng, state.step)
    loss, (terms, out), grads = loss_and_grads(state.params, batch, rng, state.active,
                                               teacher_params, state.step)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = normalize_prototypes(optax.apply_updates(state.params, updates))
    metrics = dict(loss=loss, **terms, learning_rate=schedule(state.step), grad_norm=grad_norm,
                   num_clusters=jnp.sum(state.active).astype(jnp.int32),
                   skipped=(~finite).astype(jnp.int32))
    params, opt_state, queue = keep_if(
        finite, (params, opt_state, push_queue(state.queue, state.step, out)),
        (state.params, state.opt_state, state.queue))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              queue=queue)
    return new_state, metrics

  return train_step
