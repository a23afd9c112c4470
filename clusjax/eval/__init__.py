"""Evaluators: each has `run(model)` yielding (metric_name, value).

`model` is a `clusjax.api.Pretrained` (`encode_image`, `encode_text`,
`image_outputs`, `text_outputs`, `itm_logits`, `task_logits`, `tokenizer`).
`config.eval.evaluators` lists which run.
"""
import json
import os

import jax

from clusjax import workdir as wd
from clusjax.eval.caption import CaptionEvaluator
from clusjax.eval.retrieval import RetrievalEvaluator, recall_at_k
from clusjax.eval.downstream import Nlvr2Evaluator, VqaEvaluator
from clusjax.eval.zeroshot import TransferEvaluator, ZeroShotEvaluator

EVALUATORS = {e.name: e for e in (RetrievalEvaluator, ZeroShotEvaluator, TransferEvaluator,
                                  VqaEvaluator, Nlvr2Evaluator, CaptionEvaluator)}


def evaluate(config, model, workdir=None):
  """Runs the configured evaluators; prints, and writes eval_results.json.

  In a multi-host job every process calls it (the model's params span all
  processes' devices) and gets the results; process 0 alone prints and writes.
  """
  is_main = jax.process_index() == 0
  results = {}
  for name in config.eval.evaluators:
    evaluator = EVALUATORS[name](config)
    if hasattr(evaluator, "workdir"):   # writes files beside the scores (captions.jsonl)
      evaluator.workdir = workdir
    for metric, value in evaluator.run(model):
      results[f"{name}/{metric}"] = value
      if is_main:
        print(f"  {name}/{metric}: {value:.4f}" if isinstance(value, float)
              else f"  {name}/{metric}: {value}", flush=True)
  if workdir is not None and is_main:
    with open(os.path.join(workdir, wd.EVAL_RESULTS_FILE), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


__all__ = ["EVALUATORS", "evaluate", "recall_at_k", "CaptionEvaluator", "Nlvr2Evaluator",
           "RetrievalEvaluator", "TransferEvaluator", "VqaEvaluator", "ZeroShotEvaluator"]
