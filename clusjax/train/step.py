"""The pure train step: (state, batch) -> (state, metrics).

The Clus objective (DESIGN §5), each term with its weight in `config.loss`:

    ITC   symmetric InfoNCE over the global batch
    ITM   match / no-match of the fused pair; per positive one hard negative
          text and one hard negative image sampled from the global batch
    MLM   15% of the text tokens masked, predicted from the fused text stream
    L_z   clustering swap prediction against the active prototypes
    prompt  prompt-template labels (paper Fig. 4b): each image against the
          batch's "a photo of a {noun}." texts, positive where its caption
          has the noun
    noun_code  the same labels against a fixed random code per noun
    uni_image  image-image InfoNCE: each image against a caption-preserving
          augmented view of itself (`clusjax.data.augment`), the batch's
          other images the negatives
    uni_text  text-text InfoNCE: each caption against a copy with tokens
          masked (and the tower's dropout)
    task  a downstream head (config.task vqa / nlvr2) on the fused CLS, with
          config.finetune.loss: ce | supcon | clce; for config.task caption,
          masked-token + next-token LM loss under the seq2seq mask

A term whose weight is 0 (or `loss.swap_prediction=False`) is not computed at
all, so an ITC-only run costs what the dual encoder costs.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax

from clusjax.clustering import cluster_prototypes
from clusjax.config import itc_kind
from clusjax.data.augment import augment_images
from clusjax.losses import (clip_temperature, infonce_from_logits, itc_logits, itm_loss, itm_pairs,
                            distillation_loss, mask_tokens, mlm_loss, noun_codes,
                            prompt_label_loss, sample_hard_negatives, siglip_loss, softclip_loss,
                            swap_prediction_loss)
from clusjax.models.clus import ClusModel
from clusjax.train.downstream import caption_terms, task_terms
from clusjax.train.state import is_prototype_leaf


@dataclasses.dataclass(frozen=True)
class TextIds:
  """The token ids the objectives need from the tokenizer."""
  cls_id: int
  sep_id: int
  mask_id: int
  vocab_size: int        # real (unpadded) vocabulary size
  first_random_id: int   # MLM's random replacements come from [first_random_id, vocab_size)

  @classmethod
  def of(cls, tokenizer):
    special = (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)
    first = max(special) + 1
    return cls(tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.vocab_size,
               first if first < tokenizer.vocab_size else 0)


def _weights(loss_config):
  """{term: weight} of the terms that run."""
  w = dict(itc=loss_config.itc_weight, itm=loss_config.itm_weight,
           mlm=loss_config.mlm_weight,
           swap=loss_config.swap_weight if loss_config.swap_prediction else 0.0,
           prompt=loss_config.get("prompt_weight", 0.0),
           noun_code=loss_config.get("noun_code_weight", 0.0),
           task=loss_config.get("task_weight", 0.0))
  uni = loss_config.get("unimodal")
  if uni is not None:
    w.update(uni_image=uni.image_weight, uni_text=uni.text_weight)
  return {k: v for k, v in w.items() if v > 0}


def contrastive_loss(loss_config, out, logits, negative_logits=None):
  """The ITC term of kind `loss.itc.kind` from the towers' outputs and the ITC logits [B, B]."""
  kind = itc_kind(loss_config)
  if kind == "siglip":
    return siglip_loss(out["image_feats"], out["text_feats"], out["siglip_log_temperature"],
                       out["siglip_bias"])
  if kind == "label_smooth":   # targets (1 - a) I + a / B: SoftCLIP against uniform "self" rows
    uniform = jnp.zeros_like(logits)
    return softclip_loss(logits, uniform, uniform, beta=loss_config.itc.label_smoothing,
                         relation_weight=0.0, symmetric_kl=False)
  if kind == "softclip":
    sc = loss_config.itc.softclip
    # Tags: one self-similarity (of each example's objects) for both directions.
    keys = ("tag_feats",) * 2 if "tag_feats" in out else ("image_feats", "text_feats")
    self_logits = [itc_logits(out[k], out[k], out["temperature"]) for k in keys]
    return softclip_loss(logits, *self_logits, beta=sc.beta, relation_weight=sc.relation_weight,
                         symmetric_kl=sc.symmetric_kl, clip_weight=sc.clip_weight)
  return infonce_from_logits(logits, negative_logits)


def distilled_itc(logits, teacher_logits, distill_config):
  """The ITC term under distillation (paper Eq. 1): `distillation_loss` of the
  image->text rows and of the text->image rows, averaged; the labels are the pairs."""
  labels = jnp.arange(logits.shape[0])
  kw = dict(alpha=distill_config.alpha, temperature=distill_config.temperature)
  return 0.5 * (distillation_loss(logits, teacher_logits, labels, **kw)
                + distillation_loss(logits.T, teacher_logits.T, labels, **kw))


# Terms over the whole batch's tower features (and parameters such as the
# temperature and prototypes, but no other forward pass): under gradient
# accumulation they still see the whole batch. The others are per microbatch.
BATCH_TERMS = ("itc", "noun_code", "swap")
# Tower outputs with a batch dimension (the rest of the towers' output dict is parameters).
_FEATURES = ("image_feats", "text_feats", "neg_text_feats")


def _rngs(rng):
  """The step's PRNG keys by use."""
  names = ("towers", "itm", "mlm", "negatives", "masking", "captions", "labels")
  rngs = dict(zip(names, jax.random.split(rng, len(names))))
  # Keys of the uni-modal terms come from their own stream, so switching them
  # on leaves every other term's randomness as it was.
  views = ("view1", "view2", "image_view", "view_masking", "text_view")
  rngs.update(zip(views, jax.random.split(jax.random.fold_in(rng, 1), len(views))))
  rngs["task"] = jax.random.fold_in(rng, 2)
  return rngs


def _augment(rng, images, unimodal_config):
  u = unimodal_config
  return augment_images(rng, images, max_shift=u.max_shift, brightness=u.brightness,
                        noise_std=u.noise_std)


def _towers(model, params, batch, rngs, config, weights):
  """The two towers' outputs for the batch (its images as view 1 under
  `loss.unimodal.augment_both`), and its hard negative captions' when a term uses them."""
  images = batch["image"]
  if "uni_image" in weights and config.loss.unimodal.augment_both:   # every term sees view 1
    images = _augment(rngs["view1"], images, config.loss.unimodal)
  out = model.apply({"params": params}, images, batch["text_ids"], batch["text_mask"],
                    deterministic=False, rngs={"dropout": rngs["towers"]})
  wants_negatives = "itc" in weights or ("itm" in weights
                                         and config.loss.get("itm_caption_negatives", False))
  if "neg_text_ids" in batch and wants_negatives:
    # Hard negative captions (config.data.caption_negatives), encoded once for ITC and ITM.
    neg_tokens, neg_feats = model.apply({"params": params}, batch["neg_text_ids"],
                                        batch["neg_text_mask"], deterministic=False,
                                        rngs={"dropout": rngs["captions"]},
                                        method=ClusModel.encode_text)
    out = {**out, "neg_text_tokens": neg_tokens, "neg_text_feats": neg_feats}
  return out


def batch_terms(model, params, out, batch, rngs, config, active, weights, teacher=None):
  """The BATCH_TERMS that `weights` has, from the towers' outputs `out`, plus
  the logged temperature and in-batch negative similarity."""
  variables = {"params": params}
  logits = itc_logits(out["image_feats"], out["text_feats"], out["temperature"])
  terms = dict(temperature=clip_temperature(out["temperature"]),
               negative_similarity=mean_negative_similarity(out["image_feats"],
                                                            out["text_feats"]))
  if "itc" in weights:
    negative_logits = None
    if "neg_text_feats" in out:   # hard negative captions (config.data.caption_negatives)
      negative_logits = jnp.where(
          batch["neg_valid"][None, :],
          itc_logits(out["image_feats"], out["neg_text_feats"], out["temperature"]), -jnp.inf)
    if "tag_ids" in batch:   # SoftCLIP's tags: targets only, so no gradient
      _, tag_feats = model.apply(variables, batch["tag_ids"], batch["tag_mask"],
                                 method=ClusModel.encode_text)
      out = {**out, "tag_feats": jax.lax.stop_gradient(tag_feats)}
    if teacher is not None:
      teacher_model, teacher_params = teacher
      t_out = teacher_model.apply({"params": teacher_params}, batch["image"], batch["text_ids"],
                                  batch["text_mask"])
      teacher_logits = itc_logits(t_out["image_feats"], t_out["text_feats"], t_out["temperature"])
      terms["itc"] = distilled_itc(logits, teacher_logits, config.distill)
    else:
      terms["itc"] = contrastive_loss(config.loss, out, logits, negative_logits)

  if "noun_code" in weights:   # prompt labels against a fixed random code per noun
    label_noun = batch["label_noun"].reshape(-1)   # [B, k] -> B * k labels
    terms["noun_code"] = prompt_label_loss(
        out["image_feats"], noun_codes(label_noun, out["image_feats"].shape[-1]), label_noun,
        batch["caption_nouns"], out["temperature"])

  if "swap" in weights:
    cc = config.clustering
    terms["swap"] = swap_prediction_loss(
        out["image_feats"], out["text_feats"], out["prototypes"], temperature=cc.temperature,
        epsilon=cc.sinkhorn_epsilon, num_iters=cc.sinkhorn_iters, active=active)
  return terms


def micro_terms(model, params, out, batch, rngs, config, text_ids, active, weights):
  """The other terms `weights` has (prompt labels, uni-modal views, ITM with
  its hard negatives, MLM), from the batch and its towers' outputs."""
  variables = {"params": params}
  ids, mask = batch["text_ids"], batch["text_mask"]
  maskable = mask & (ids != text_ids.cls_id) & (ids != text_ids.sep_id)
  terms = {}
  if "prompt" in weights:   # prompt-template labels, [B, k, L] -> B * k label texts
    b, k, length = batch["label_ids"].shape
    _, label_feats = model.apply(variables, batch["label_ids"].reshape(b * k, length),
                                 batch["label_mask"].reshape(b * k, length),
                                 deterministic=False, rngs={"dropout": rngs["labels"]},
                                 method=ClusModel.encode_text)
    terms["prompt"] = prompt_label_loss(out["image_feats"], label_feats,
                                        batch["label_noun"].reshape(-1), batch["caption_nouns"],
                                        out["temperature"])

  if "uni_image" in weights:   # against a second view of the (unaugmented) images
    view = _augment(rngs["view2"], batch["image"], config.loss.unimodal)
    _, view_feats = model.apply(variables, view, deterministic=False,
                                rngs={"dropout": rngs["image_view"]},
                                method=ClusModel.encode_image)
    terms["uni_image"] = infonce_from_logits(
        itc_logits(out["image_feats"], view_feats, out["temperature"]))
  if "uni_text" in weights:
    masked_ids, _ = mask_tokens(rngs["view_masking"], ids, maskable, mask_id=text_ids.mask_id,
                                num_tokens=text_ids.vocab_size,
                                probability=config.loss.unimodal.mask_probability,
                                first_random_id=text_ids.first_random_id)
    _, view_feats = model.apply(variables, masked_ids, mask, deterministic=False,
                                rngs={"dropout": rngs["text_view"]},
                                method=ClusModel.encode_text)
    terms["uni_text"] = infonce_from_logits(
        itc_logits(out["text_feats"], view_feats, out["temperature"]))

  if "itm" in weights:
    logits = itc_logits(out["image_feats"], out["text_feats"], out["temperature"])
    neg_text, neg_image = sample_hard_negatives(rngs["negatives"], logits)
    # Each pair carries its tokens (fusion) and ITC features (LongNet's cluster tokens).
    (image_tokens, image_feats), (text_tokens, text_mask, text_feats), labels = itm_pairs(
        (out["image_tokens"], out["image_feats"]), (out["text_tokens"], mask, out["text_feats"]),
        neg_text, neg_image)
    pair_weights = None
    if "neg_text_tokens" in out and config.loss.get("itm_caption_negatives", False):
      # Each image with its caption's one-word swap (config.data.caption_negatives): the
      # near misses a retrieval top-k holds, which in-batch negatives rarely are.
      neg_tokens, neg_feats = out["neg_text_tokens"], out["neg_text_feats"]
      image_tokens = jnp.concatenate([image_tokens, out["image_tokens"]])
      image_feats = jnp.concatenate([image_feats, out["image_feats"]])
      text_tokens = jnp.concatenate([text_tokens, neg_tokens])
      text_mask = jnp.concatenate([text_mask, batch["neg_text_mask"]])
      text_feats = jnp.concatenate([text_feats, neg_feats])
      pair_weights = jnp.concatenate([jnp.ones_like(labels, jnp.float32),
                                      batch["neg_valid"].astype(jnp.float32)])
      labels = jnp.concatenate([labels, jnp.zeros_like(batch["neg_valid"], jnp.int32)])
    match_logits = model.apply(variables, image_tokens, text_tokens, text_mask, image_feats,
                               text_feats, active, deterministic=False,
                               rngs={"dropout": rngs["itm"]}, method=ClusModel.itm_logits)
    terms["itm"], terms["itm_accuracy"] = itm_loss(match_logits, labels, pair_weights)

  if "mlm" in weights:
    masked_ids, targets = mask_tokens(
        rngs["masking"], ids, maskable, mask_id=text_ids.mask_id,
        num_tokens=text_ids.vocab_size, probability=config.loss.mlm_probability,
        first_random_id=text_ids.first_random_id)
    token_logits = model.apply(variables, out["image_tokens"], masked_ids, mask,
                               deterministic=False, rngs={"dropout": rngs["mlm"]},
                               method=ClusModel.mlm_logits)
    terms["mlm"], terms["mlm_accuracy"] = mlm_loss(token_logits, ids, targets)

  if "task" in weights:
    if config.get("task") == "caption":
      terms.update(caption_terms(model, params, out, batch, rngs, config.caption, text_ids))
    else:
      terms.update(task_terms(model, params, out, batch, rngs, config.finetune))
  return terms


def _weighted(terms, weights):
  return sum(w * terms[k] for k, w in weights.items())


def compute_losses(model, params, batch, rng, config, text_ids, active, teacher=None):
  """Forward passes and the weighted objective.

  Args:
    active: bool [K_max], the active prototypes.
    teacher: (teacher model, its params) when config.distill.teacher is set.
  Returns:
    (total loss, (dict of per-term scalars for logging, the towers' outputs)).
  """
  weights = _weights(config.loss)
  rngs = _rngs(rng)
  out = _towers(model, params, batch, rngs, config, weights)
  terms = batch_terms(model, params, out, batch, rngs, config, active, weights, teacher)
  terms.update(micro_terms(model, params, out, batch, rngs, config, text_ids, active, weights))
  return _weighted(terms, weights), (terms, out)


def _split(x, m):
  """[B, ...] -> [m, B / m, ...]; microbatch i is rows i, i + m, ... (strided,
  so each one spreads over all the devices the batch is split over)."""
  return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def _merge(x):
  """The inverse of `_split`: [m, b, ...] -> [m * b, ...] in the batch's order."""
  return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def accumulated_losses(model, params, batch, rng, config, text_ids, active, m):
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
  weights = _weights(config.loss)
  coupled = {k: w for k, w in weights.items() if k in BATCH_TERMS}
  local = {k: w for k, w in weights.items() if k not in BATCH_TERMS}
  micro = jax.tree.map(lambda x: _split(x, m), batch)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(m))

  def towers(p, microbatch, key):
    return _towers(model, p, microbatch, _rngs(key), config, weights)

  def features(args):
    out = towers(params, *args)
    return {k: v for k, v in out.items() if not k.endswith("_tokens")}
  stacked = jax.lax.map(features, (micro, keys))
  out = {k: _merge(v) if k in _FEATURES else v[0] for k, v in stacked.items()}

  def batch_total(o):
    terms = batch_terms(model, params, o, batch, _rngs(rng), config, active, coupled)
    return _weighted(terms, coupled), terms
  (batch_loss, terms), cotangents = jax.value_and_grad(batch_total, has_aux=True)(out)
  # Per microbatch: its rows of the feature gradients; a parameter's gradient
  # (the same output in every microbatch) in m equal parts.
  cotangents = {k: _split(v, m) if k in _FEATURES else jnp.broadcast_to(v / m, (m, *v.shape))
                for k, v in cotangents.items()}

  def microbatch(grads, args):
    mb, key, cot = args

    def surrogate(p):
      o = towers(p, mb, key)
      t = micro_terms(model, p, o, mb, _rngs(key), config, text_ids, active, local)
      own = _weighted(t, local)
      link = sum(jnp.vdot(cot[k], o[k].astype(cot[k].dtype)) for k in cot)
      return own / m + link, (own, t)
    g, aux = jax.grad(surrogate, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads, g), aux
  grads, (own, micro) = jax.lax.scan(microbatch, jax.tree.map(jnp.zeros_like, params),
                                     (micro, keys, cotangents))
  terms.update({k: jnp.mean(v) for k, v in micro.items()})
  return batch_loss + jnp.mean(own), (terms, out), grads


def mean_negative_similarity(image_feats, text_feats):
  """Mean cosine of image i and text j over the batch's pairs i != j: how hard
  the in-batch negatives are (the clustered sampler raises it)."""
  b = image_feats.shape[0]
  sims = jax.lax.stop_gradient(image_feats @ text_feats.T)
  return (jnp.sum(sims) - jnp.trace(sims)) / max(b * (b - 1), 1)


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
  """`(params, batch, rng, active, teacher_params) -> (loss, (terms, tower outputs),
  grads)` of the objective, over config.grad_accum_steps microbatches."""
  m = config.get("grad_accum_steps", 1)

  def loss_and_grads(params, batch, rng, active, teacher_params=None):
    if m > 1:
      return accumulated_losses(model, params, batch, rng, config, text_ids, active, m)
    teacher = None if teacher_model is None else (teacher_model, teacher_params)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: compute_losses(model, p, batch, rng, config, text_ids, active, teacher),
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
  if not _weights(config.loss):
    raise ValueError("every loss weight in config.loss is 0: nothing to train.")
  loss_and_grads = make_loss_and_grads(model, config, text_ids, teacher_model)

  def train_step(state, batch, teacher_params=None):
    if batch_transform is not None:
      batch = batch_transform(batch, state.step)
    rng = jax.random.fold_in(state.rng, state.step)
    loss, (terms, out), grads = loss_and_grads(state.params, batch, rng, state.active,
                                               teacher_params)
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
