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
    noun_code_text  the captions' text features against the same codes
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

from clusjax.config import itc_kind, negatives_in_itc
from clusjax.data.augment import augment_images
from clusjax.losses import (clip_temperature, infonce_from_logits, itc_logits, itm_loss, itm_pairs,
                            distillation_loss, mask_tokens, mlm_loss, noun_codes,
                            prompt_label_loss, sample_hard_negatives, siglip_loss, softclip_loss,
                            swap_prediction_loss, twin_pairs)
from clusjax.models.clus import ClusModel
from clusjax.train.downstream import caption_terms, task_terms


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


def loss_weights(loss_config):
  """{term: weight} of the terms that run."""
  w = dict(itc=loss_config.itc_weight, itm=loss_config.itm_weight,
           mlm=loss_config.mlm_weight,
           swap=loss_config.swap_weight if loss_config.swap_prediction else 0.0,
           prompt=loss_config.get("prompt_weight", 0.0),
           noun_code=loss_config.get("noun_code_weight", 0.0),
           noun_code_text=loss_config.get("noun_code_text_weight", 0.0),
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
BATCH_TERMS = ("itc", "noun_code", "noun_code_text", "swap")
# Tower outputs with a batch dimension (the rest of the towers' output dict is parameters).
FEATURES = ("image_feats", "text_feats", "neg_text_feats")


def step_rngs(rng):
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


def negative_rows(config, rows):
  """How many of a batch's `rows` (the first) have their hard negative caption encoded:
  config.loss.caption_negative_share of them, at least one."""
  return max(1, round(config.loss.get("caption_negative_share", 1.0) * rows))


def tower_outputs(model, params, batch, rngs, config, weights):
  """The two towers' outputs for the batch (its images as view 1 under
  `loss.unimodal.augment_both`), and its hard negative captions' when a term uses them."""
  images = batch["image"]
  if "uni_image" in weights and config.loss.unimodal.augment_both:   # every term sees view 1
    images = _augment(rngs["view1"], images, config.loss.unimodal)
  out = model.apply({"params": params}, images, batch["text_ids"], batch["text_mask"],
                    deterministic=False, rngs={"dropout": rngs["towers"]})
  wants_negatives = ("itc" in weights and negatives_in_itc(config)) or (
      "itm" in weights and config.loss.get("itm_caption_negatives", False))
  if "neg_text_ids" in batch and wants_negatives:
    # Hard negative captions (config.data.caption_negatives or scene_negatives) of the
    # batch's first rows (loss.caption_negative_share), encoded once for ITC and ITM.
    n = negative_rows(config, batch["neg_text_ids"].shape[0])
    neg_tokens, neg_feats = model.apply({"params": params}, batch["neg_text_ids"][:n],
                                        batch["neg_text_mask"][:n], deterministic=False,
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
    if "neg_text_feats" in out and negatives_in_itc(config):   # hard negative captions
      n = out["neg_text_feats"].shape[0]
      negative_logits = jnp.where(
          batch["neg_valid"][None, :n],
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

  for term, feats in (("noun_code", "image_feats"), ("noun_code_text", "text_feats")):
    if term in weights:   # prompt labels against a fixed random code per noun
      label_noun = batch["label_noun"].reshape(-1)   # [B, k] -> B * k labels
      terms[term] = prompt_label_loss(
          out[feats], noun_codes(label_noun, out[feats].shape[-1]), label_noun,
          batch["caption_nouns"], out["temperature"])

  if "swap" in weights:
    cc = config.clustering
    terms["swap"] = swap_prediction_loss(
        out["image_feats"], out["text_feats"], out["prototypes"], temperature=cc.temperature,
        epsilon=cc.sinkhorn_epsilon, num_iters=cc.sinkhorn_iters, active=active)
  return terms


def micro_terms(model, params, out, batch, rngs, config, text_ids, active, weights, step=None):
  """The other terms `weights` has (prompt labels, uni-modal views, ITM with
  its hard negatives, MLM), from the batch and its towers' outputs; `step` (the
  train step, traced) for the schedule of ITM's twin negatives."""
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
    neg_text, neg_image = sample_hard_negatives(
        rngs["negatives"], logits, config.loss.get("itm_uniform_negatives", 0.0),
        excluded=twin_exclusion(batch, config, step))
    # Each pair carries its tokens (fusion) and ITC features (LongNet's cluster tokens).
    (image_tokens, image_feats), (text_tokens, text_mask, text_feats), labels = itm_pairs(
        (out["image_tokens"], out["image_feats"]), (out["text_tokens"], mask, out["text_feats"]),
        neg_text, neg_image)
    pair_weights = None
    if "neg_text_tokens" in out and config.loss.get("itm_caption_negatives", False):
      # Each image with its caption's hard negative (a one-word swap, or another scene's
      # caption): the near misses a retrieval top-k holds, which in-batch negatives rarely are.
      neg_tokens, neg_feats = out["neg_text_tokens"], out["neg_text_feats"]
      n = neg_feats.shape[0]   # the batch's first rows (loss.caption_negative_share)
      neg_valid = batch["neg_valid"][:n]
      image_tokens = jnp.concatenate([image_tokens, out["image_tokens"][:n]])
      image_feats = jnp.concatenate([image_feats, out["image_feats"][:n]])
      text_tokens = jnp.concatenate([text_tokens, neg_tokens])
      text_mask = jnp.concatenate([text_mask, batch["neg_text_mask"][:n]])
      text_feats = jnp.concatenate([text_feats, neg_feats])
      pair_weights = jnp.concatenate([jnp.ones_like(labels, jnp.float32),
                                      neg_valid.astype(jnp.float32)])
      labels = jnp.concatenate([labels, jnp.zeros_like(neg_valid, jnp.int32)])
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


def twin_exclusion(batch, config, step):
  """None, or bool [B, B]: the place twins ITM may not draw as negatives at `step`.
  For the first `loss.itm_twin_negatives` share of the steps an example's twin is
  a negative like any other (ITM learns place from it); after, never (its
  negatives are the other near misses: kind, count, binding). A traced switch on
  the step: one compiled step, the same batches. Without a step (the objective
  outside a train step) as at step 0."""
  share = config.loss.get("itm_twin_negatives", 1.0)
  if share >= 1 or "pair_id" not in batch:
    return None
  step = 0 if step is None else step
  return twin_pairs(batch["pair_id"]) & (step >= round(share * config.train.num_steps))


def weighted_sum(terms, weights):
  return sum(w * terms[k] for k, w in weights.items())


def compute_losses(model, params, batch, rng, config, text_ids, active, teacher=None,
                   step=None):
  """Forward passes and the weighted objective.

  Args:
    active: bool [K_max], the active prototypes.
    teacher: (teacher model, its params) when config.distill.teacher is set.
    step: the train step (traced), for schedules inside the objective.
  Returns:
    (total loss, (dict of per-term scalars for logging, the towers' outputs)).
  """
  weights = loss_weights(config.loss)
  rngs = step_rngs(rng)
  out = tower_outputs(model, params, batch, rngs, config, weights)
  terms = batch_terms(model, params, out, batch, rngs, config, active, weights, teacher)
  terms.update(micro_terms(model, params, out, batch, rngs, config, text_ids, active, weights,
                           step))
  return weighted_sum(terms, weights), (terms, out)


def mean_negative_similarity(image_feats, text_feats):
  """Mean cosine of image i and text j over the batch's pairs i != j: how hard
  the in-batch negatives are (the clustered sampler raises it)."""
  b = image_feats.shape[0]
  sims = jax.lax.stop_gradient(image_feats @ text_feats.T)
  return (jnp.sum(sims) - jnp.trace(sims)) / max(b * (b - 1), 1)
