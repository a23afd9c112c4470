"""What a run writes in its workdir, and where (one place for the names).

    <workdir>/config.json        the resolved config of the latest run
    <workdir>/tokenizer.model    SentencePiece model (trained or copied), or
    <workdir>/hf_tokenizer/      the WordPiece tokenizer files of model.text.init_from
    <workdir>/checkpoints/<step> Orbax checkpoints (state + data iterator)
    <workdir>/metrics.jsonl      one line per logged step
    <workdir>/tensorboard/       TensorBoard event files
    <workdir>/eval_results.json  the evaluators' figures
    <workdir>/answers.json       VQA: the answer vocabulary (the head's classes, in order)
"""
import json
import os

import ml_collections

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_DIR = "hf_tokenizer"
# The files of a transformers tokenizer directory that clusjax reads.
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                      "special_tokens_map.json")
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
EVAL_RESULTS_FILE = "eval_results.json"
ANSWERS_FILE = "answers.json"


def path(workdir, name):
  return os.path.join(workdir, name)


def _to_jsonable(value):
  if isinstance(value, (tuple, list)):
    return [_to_jsonable(v) for v in value]
  return value


def save_config(config, workdir):
  with open(path(workdir, CONFIG_FILE), "w") as f:
    json.dump(_to_jsonable(config.to_dict()), f, indent=2, sort_keys=True,
              default=_to_jsonable)


def _from_jsonable(value):
  # JSON has no tuples; configs use tuples for sequences (sharding rules, ...).
  if isinstance(value, list):
    return tuple(_from_jsonable(v) for v in value)
  if isinstance(value, dict):
    return {k: _from_jsonable(v) for k, v in value.items()}
  return value


def load_config(workdir):
  """The config a workdir was trained with (ConfigDict)."""
  file = path(workdir, CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(
        f"{file} not found: {workdir!r} is not a clusjax workdir (run training first).")
  with open(file) as f:
    return ml_collections.ConfigDict(_from_jsonable(json.load(f)))
