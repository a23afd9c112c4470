"""What the downstream configs (retrieval.py, vqa.py, nlvr2.py) share.

Not a config itself: each task config calls `task_config(task, arg)` and sets
its own data, head and paper Table 1 settings. A fine-tune starts from a
pre-training workdir:

    python launch/main.py --config=configs/vqa.py:tiny --config.init_from=workdirs/tiny \\
        --workdir=workdirs/vqa_tiny
"""
import ml_collections

from clusjax.config_checks import LABEL_LOSS_KEYS
from configs import clus_base


def get_config(arg=None):
  raise ValueError("configs/downstream.py is shared code, not a config: use configs/retrieval.py, "
                   "configs/vqa.py or configs/nlvr2.py.")


def task_config(task, arg):
  """clus_base's config (variant `arg`) turned into a fine-tune of `task`.

  The pre-training terms are off (their weights 0, no clustering between steps);
  the towers, fusion and heads keep clus_base's shapes so that a pre-training
  workdir of the same variant loads (config.init_from).
  """
  if arg not in (None, "", "base", "tiny"):
    raise ValueError(f"configs/{task}.py:{arg}: unknown variant; use ':tiny' or nothing (Base).")
  c = clus_base.get_config(arg or None)
  c.task = task
  for key in ("itc_weight", "itm_weight", "mlm_weight", "swap_weight", *LABEL_LOSS_KEYS):
    c.loss[key] = 0.0
  c.loss.swap_prediction = False
  c.loss.unimodal.update(image_weight=0.0, text_weight=0.0)
  # Built-in shapes: the fine-tunes' figures are on data version 2 (its train split is
  # version 3's) without place twins.
  c.data.shapes_version = 2
  c.data.shapes_twins = 0.0
  # ITM (retrieval fine-tunes) on ALBEF's hard negatives and re-ranking by ITM log-odds
  # + ITC logit at weight 1, as their figures were measured.
  c.loss.itm_uniform_negatives = 0.0
  c.loss.itm_twin_negatives = 1.0   # no twins to leave out
  c.eval.rerank_itm_weight = 1.0
  c.clustering.enabled = False
  c.clustering.plots = False
  # Paper Table 1: AdamW betas (0.9, 0.995); cosine decay to 0.
  c.optim.b2 = 0.995
  c.finetune = ml_collections.ConfigDict(dict(
      # The head's objective: ce (cross-entropy; VQA: binary CE over soft answer
      # scores) | supcon (supervised contrastive loss on the L2-normalised fused
      # CLS, the head trained beside it on the features without their gradient)
      # | clce (CE mixed with a label-aware contrastive term; clusjax/losses/finetune.py).
      loss="ce",
      head_hidden=0,                 # the MLP head's hidden width; 0 = 2 x its input's
      # The head reads the two fused [CLS] and also their elementwise product (a
      # bilinear term: "is there a triangle?" is the question's word times the image's).
      head_product=False,
      num_answers=3_129,             # VQA: the most frequent training answers (VQA v2 practice)
      supcon_temperature=0.1,
      clce_lam=0.9,                  # CLCE: (1 - lam) CE + lam contrastive
      clce_temperature=0.5,
  ))
  return c


def table_1(c, *, image_size, batch_size, num_steps, learning_rate, warmup_frac, weight_decay,
            checkpoint_every):
  """A task's paper settings (Table 1; retrieval from the text): the epochs become
  num_steps and the warm-up epochs warmup_frac, on the task's standard training set."""
  c.data.image_size = image_size
  c.train.batch_size = batch_size
  c.train.num_steps = num_steps
  c.optim.learning_rate = learning_rate
  c.optim.warmup_frac = warmup_frac
  c.optim.weight_decay = weight_decay
  c.train.checkpoint_every = checkpoint_every


def tiny(c, *, batch_size, num_steps, checkpoint_every):
  """What the :tiny fine-tunes share: the :tiny pre-training's 64 px, a higher peak lr
  with 10% warm-up and clipping (a small model from a short pre-training)."""
  c.data.image_size = 64
  c.train.batch_size = batch_size
  c.train.num_steps = num_steps
  c.train.checkpoint_every = checkpoint_every
  c.train.log_every = 20
  c.optim.learning_rate = 1e-4
  c.optim.warmup_frac = 0.1
  c.optim.grad_clip_norm = 1.0
  c.eval.batch_size = 250
