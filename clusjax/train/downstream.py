"""The downstream tasks' terms of the train step (config.task caption / vqa / nlvr2).

`clusjax.train.objective.micro_terms` adds them as the objective's "task" term; the
heads are `ClusModel.task_logits` / `caption_logits`, the losses in clusjax/losses.
"""
import jax
import jax.numpy as jnp

from clusjax.losses import (caption_loss, caption_masking, classification_loss, clce_loss,
                            supcon_loss, vqa_loss)
from clusjax.models.clus import ClusModel


def caption_terms(model, params, out, batch, rngs, caption_config, text_ids):
  """Captioning's masked fine-tuning (config.task caption; clusjax/losses/caption.py):
  caption_config.mask_ratio of the caption's tokens -> [MASK], one seq2seq forward
  (`ClusModel.caption_logits`) on the image tokens of the towers' pass, the
  masked-token loss + lm_weight x the next-token loss, label-smoothed."""
  r_mask, r_drop = jax.random.split(rngs["task"])
  ids, mask = batch["text_ids"], batch["text_mask"]
  masked, targets = caption_masking(r_mask, ids, mask, mask_id=text_ids.mask_id,
                                    ratio=caption_config.mask_ratio)
  logits = model.apply({"params": params}, out["image_tokens"], masked, mask,
                       deterministic=False, rngs={"dropout": r_drop},
                       method=ClusModel.caption_logits)
  loss, terms = caption_loss(logits, ids, mask, targets, vocab_size=text_ids.vocab_size,
                             label_smoothing=caption_config.label_smoothing,
                             lm_weight=caption_config.lm_weight)
  return {"task": loss, "task_accuracy": terms["accuracy"],
          "caption_mask_loss": terms["mask_loss"], "caption_lm_loss": terms["lm_loss"]}


def task_terms(model, params, out, batch, rngs, finetune_config):
  """The downstream head's loss and accuracy (config.task vqa / nlvr2).

  The features are the fused CLS (`ClusModel.task_features`; NLVR2: both pairs
  concatenated); `batch["label"]` int32 [B] is the class (VQA: the top answer,
  -1 when none is in the vocabulary: left out of the label-based terms). Loss by
  finetune_config.loss: ce (VQA: `vqa_loss` on batch["target_scores"] [B, A];
  NLVR2: softmax CE) | supcon (`supcon_loss` on the features, plus ce for the
  head, which reads the features without their gradient) | clce (`clce_loss`).
  Accuracy: VQA score of the top answer (its target score), or exact match.
  """
  variables = {"params": params}
  kw = dict(deterministic=False, rngs={"dropout": rngs["task"]})
  image2 = None
  if "image2" in batch:   # NLVR2's right image, through the same tower
    image2, _ = model.apply(variables, batch["image2"], method=ClusModel.encode_image, **kw)
  feats = model.apply(variables, out["image_tokens"], out["text_tokens"], batch["text_mask"],
                      image2, method=ClusModel.task_features, **kw)
  head_input = jax.lax.stop_gradient(feats) if finetune_config.loss == "supcon" else feats
  logits = model.apply(variables, head_input, method=ClusModel.task_logits)
  labels = batch["label"]
  valid = labels >= 0
  predicted = jnp.argmax(logits, axis=-1)
  if "target_scores" in batch:
    ce = vqa_loss(logits, batch["target_scores"])
    accuracy = jnp.mean(jnp.take_along_axis(batch["target_scores"], predicted[:, None], 1))
  else:
    ce = classification_loss(logits, labels, valid)
    accuracy = jnp.mean(predicted == labels)
  if finetune_config.loss == "supcon":
    loss = ce + supcon_loss(feats, labels, temperature=finetune_config.supcon_temperature,
                            valid=valid)
  elif finetune_config.loss == "clce":
    loss = clce_loss(logits, feats, labels, lam=finetune_config.clce_lam,
                     temperature=finetune_config.clce_temperature, valid=valid)
  else:
    loss = ce
  return {"task": loss, "task_accuracy": accuracy}
