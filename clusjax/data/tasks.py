"""A downstream task's targets: what the pipeline adds to each example beside
image and text (config.task; records from clusjax/data/vqa.py and nlvr.py).

    vqa    {"target_scores": float32 [A] (VQA score of each vocabulary answer),
            "label": int32 (the top answer's index, -1 if none is in the vocabulary)}
    nlvr2  {"label": int32 (1 = the statement is true of the two images)}

The VQA answer vocabulary is the training set's `num_answers` most frequent
answers, made once per workdir (`answer_vocab`) and kept in answers.json, so a
resumed run, `--mode=eval` and `clusjax.load_finetuned` read the same classes.
"""
import json
import os

import numpy as np

from clusjax import workdir as wd
from clusjax.data.vqa import AnswerVocab


class VqaTargets:
  """record -> {"target_scores" [num_classes], "label"} over `vocab` (picklable)."""

  def __init__(self, vocab, num_classes):
    if len(vocab) > num_classes:
      raise ValueError(f"{len(vocab)} answers do not fit a head of {num_classes} classes.")
    self.vocab, self.num_classes = vocab, num_classes

  def __call__(self, record):
    scores, label = self.vocab.targets(record["answers"])
    padded = np.zeros((self.num_classes,), np.float32)
    padded[:len(scores)] = scores
    return {"target_scores": padded, "label": np.int32(label)}


def nlvr_targets(record):
  """record -> {"label": int32} (1 = true)."""
  return {"label": np.int32(int(record["label"]))}


def task_targets(config, vocab=None):
  """The targets function of config.task (None for pre-training and retrieval)."""
  task = config.get("task", "pretrain")
  if task == "vqa":
    return VqaTargets(vocab, config.finetune.num_answers)
  if task == "nlvr2":
    return nlvr_targets
  return None


def answer_vocab(config, workdir, train_source=None, write=True):
  """The workdir's VQA answer vocabulary: read from answers.json, or (with
  `train_source`) made from its answers and, with `write` (process 0 of a
  multi-host job; every process makes the same one), written there."""
  file = wd.path(workdir, wd.ANSWERS_FILE)
  if os.path.exists(file):
    with open(file) as f:
      return AnswerVocab.from_json(json.load(f))
  if train_source is None:
    raise FileNotFoundError(f"{file} not found: {workdir!r} is not a VQA workdir.")
  vocab = AnswerVocab.from_answers(train_source.all_answers(), config.finetune.num_answers)
  if not write:
    return vocab
  tmp = file + ".partial"
  with open(tmp, "w") as f:
    json.dump(vocab.to_json(), f, indent=1)
  os.replace(tmp, file)
  return vocab
