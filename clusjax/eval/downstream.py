"""VQA and NLVR2 accuracy on the eval split, overall and per question / statement type."""
import collections

import numpy as np

from clusjax.data import iterate_eval, make_source
from clusjax.data.tasks import task_targets


def _batches(config, model):
  """The eval split's batches with the task's targets (model.answers: VQA's vocabulary)."""
  source = make_source(config.data, config.data.eval_split, config.task)
  return iterate_eval(source, batch_size=config.eval.batch_size,
                      image_size=config.data.image_size, tokenizer=model.tokenizer,
                      max_text_len=config.data.max_text_len,
                      num_examples=config.eval.num_examples,
                      targets=task_targets(config, model.answers))


def _by_type(scores, types):
  """{type: mean score} over the examples of each type."""
  groups = collections.defaultdict(list)
  for score, t in zip(scores, types):
    groups[t].append(score)
  return {t: float(np.mean(v)) for t, v in sorted(groups.items())}


class VqaEvaluator:
  """VQA accuracy: the mean over questions of the predicted answer's VQA score
  (min(#annotators who gave it / 3, 1); exact match for single-answer sets), and
  per question type: `accuracy`, `accuracy/<type>`."""
  name = "vqa"

  def __init__(self, config):
    self.config = config

  def scores(self, model):
    """(per-question scores [N], question types [N], predicted answers [N])."""
    scores, types, predicted = [], [], []
    num_answers = len(model.answers)
    for batch in _batches(self.config, model):
      valid = np.asarray(batch["valid"])
      n = int(valid.sum())
      logits = model.task_logits(batch["image"][:n], batch["caption"][:n])[:, :num_answers]
      top = np.argmax(logits, axis=-1)
      scores.extend(np.asarray(batch["target_scores"])[np.arange(n), top])
      types.extend(batch.get("question_type", [None] * n)[:n])
      predicted.extend(model.answers.answers[i] for i in top)
    return np.asarray(scores, np.float64), types, predicted

  def run(self, model):
    scores, types, _ = self.scores(model)
    yield "num_examples", len(scores)
    yield "accuracy", float(scores.mean())
    if any(t is not None for t in types):
      for t, value in _by_type(scores, types).items():
        yield f"accuracy/{t}", value


class Nlvr2Evaluator:
  """NLVR2 accuracy (true / false against the label), overall and per statement
  type: `accuracy`, `accuracy/<type>`."""
  name = "nlvr2"

  def __init__(self, config):
    self.config = config

  def run(self, model):
    correct, types = [], []
    for batch in _batches(self.config, model):
      n = int(np.asarray(batch["valid"]).sum())
      logits = model.task_logits(batch["image"][:n], batch["caption"][:n], batch["image2"][:n])
      correct.extend(np.argmax(logits, axis=-1) == np.asarray(batch["label"])[:n])
      types.extend(batch.get("statement_type", [None] * n)[:n])
    correct = np.asarray(correct, np.float64)
    yield "num_examples", len(correct)
    yield "accuracy", float(correct.mean())
    if any(t is not None for t in types):
      for t, value in _by_type(correct, types).items():
        yield f"accuracy/{t}", value
