"""What `clusjax.config.validate` checks of a run's task, its data source and the
workdirs it reads (config.task, config.data.*_split, config.finetune,
config.caption, config.init_from, config.distill.teacher).

Each split is checked against what its data source offers before anything is
generated, trained or compiled (a typo in config.data.eval_split used to surface
at the end-of-run evaluation). Imports no jax, no TFDS.
"""
import glob
import json
import os
import re

from clusjax import workdir as wd
from clusjax.config_rules import (BOOL, FLOAT, INT, NON_NEGATIVE, POSITIVE, STR, STRS, UNIT,
                                  ConfigError, OneOf, check_rules, has, its, lookup)

DATA_SOURCES = ("shapes", "tfds", "jsonl", "easy_vqa")
# config.task: what a run trains (DESIGN §9). Pre-training and retrieval read
# image-caption records; vqa and nlvr2 train a head on the fused CLS.
TASKS = ("pretrain", "retrieval", "vqa", "nlvr2", "caption")
HEAD_TASKS = ("vqa", "nlvr2")
# The data sources each task reads (config.data.name).
TASK_SOURCES = {"pretrain": ("shapes", "tfds", "jsonl"), "retrieval": ("shapes", "tfds", "jsonl"),
                "vqa": ("shapes", "jsonl", "easy_vqa"), "nlvr2": ("shapes", "jsonl"),
                "caption": ("shapes", "tfds", "jsonl")}
# config.caption.decode_query: what a captioning step reads (clusjax/models/decode.py).
CAPTION_QUERIES = ("mask", "next")
# config.finetune.loss: the head's objective (clusjax/losses/finetune.py).
FINETUNE_LOSSES = ("ce", "supcon", "clce")
EVALUATORS = ("retrieval", "zeroshot", "zeroshot_transfer", "vqa", "nlvr2", "caption")
# The evaluators each task can run.
TASK_EVALUATORS = {"pretrain": ("retrieval", "zeroshot", "zeroshot_transfer"),
                   "retrieval": ("retrieval", "zeroshot", "zeroshot_transfer"),
                   "vqa": ("vqa",), "nlvr2": ("nlvr2",), "caption": ("caption",)}
# The splits of each source whose splits are known without reading it (kept here, not
# imported: clusjax.data imports TFDS; tests/test_config.py checks that they agree).
# clusjax.data.sources._SHAPES_SPLITS and _jsonl_path: "validation" is "val".
SHAPES_SPLITS = ("train", "val", "validation", "test")
JSONL_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
EASY_VQA_SPLITS = ("train", "test")


def task_of(config):
  """config.task ("pretrain" for a workdir from before the key)."""
  return config.get("task", "pretrain")


def _colour_kinds(value, config):
  bad = [i for i, o in enumerate(value) if len(o.split()) != 2]
  return f'[{bad[0]}] must be "colour kind", e.g. "red circle".' if bad else None


def source_of_task(value, config):
  """The constraint of config.data.name: a source of records for config.task."""
  if value not in DATA_SOURCES:
    return f"must be one of {', '.join(DATA_SOURCES)}."
  task = task_of(config)
  if value not in TASK_SOURCES[task]:
    return f"has no records for config.task={task!r}; use one of {', '.join(TASK_SOURCES[task])}."
  return None


# config.task and config.data.name are lines of clusjax.config.RULES (read first).
TASK_RULES = (
    ("loss.task_weight", FLOAT, NON_NEGATIVE),
    ("finetune.loss", STR, OneOf(FINETUNE_LOSSES), has("finetune")),
    ("finetune.head_hidden", INT, NON_NEGATIVE, has("finetune")),
    ("finetune.head_product", BOOL, None, has("finetune.head_product")),
    ("finetune.supcon_temperature", FLOAT, POSITIVE, has("finetune")),
    ("finetune.clce_lam", FLOAT, UNIT, has("finetune")),
    ("finetune.clce_temperature", FLOAT, POSITIVE, has("finetune")),
    ("finetune.num_answers", INT, POSITIVE, its("task", "vqa")),
    ("data.questions_per_image", INT, POSITIVE, its("task", "vqa")),
    ("caption.mask_ratio", FLOAT, UNIT, has("caption")),
    ("caption.lm_weight", FLOAT, NON_NEGATIVE, has("caption")),
    ("caption.label_smoothing", FLOAT, UNIT, has("caption")),
    ("caption.decode_query", STR, OneOf(CAPTION_QUERIES), has("caption")),
    ("caption.beam_size", INT, POSITIVE, has("caption")),
    ("caption.length_penalty", FLOAT, NON_NEGATIVE, has("caption")),
    ("caption.max_len", INT, NON_NEGATIVE, has("caption")),
    ("data.novel_objects", STRS, _colour_kinds, has("data.novel_objects")),
)


def check_task(config):
  """config.task's loss weight, section and evaluators."""
  check_rules(config, TASK_RULES)
  task = task_of(config)
  weight = config.loss.task_weight
  if task == "caption":
    _check_caption(config, weight)
  elif task not in HEAD_TASKS:
    if weight:
      raise ConfigError(f"config.loss.task_weight={weight} trains a downstream head, but "
                        f"config.task={task!r} has none (vqa and nlvr2 do).")
  elif not weight:
    raise ConfigError(f"config.task={task!r} trains its head with config.loss.task_weight, "
                      "which is 0.")
  elif config.get("finetune") is None:
    raise ConfigError(f"config.task={task!r} needs a config.finetune section; start from "
                      f"configs/{task}.py.")
  _check_evaluators(config, task)


def _check_caption(config, weight):
  """config.task='caption': its loss weight and config.caption (configs/caption.py)."""
  if not weight:
    raise ConfigError("config.task='caption' trains with config.loss.task_weight, which is 0.")
  if config.get("caption") is None:
    raise ConfigError("config.task='caption' needs a config.caption section; start from "
                      "configs/caption.py.")
  if config.model.fusion != "co_attention":
    raise ConfigError(f"config.model.fusion={config.model.fusion!r}: captioning decodes with "
                      "the co-attention fusion's text stream; use 'co_attention'.")
  caption = config.caption
  if caption.mask_ratio == 0 and caption.lm_weight == 0:
    raise ConfigError("config.caption.mask_ratio=0 and config.caption.lm_weight=0: no caption "
                      "loss is left; set one of them > 0.")
  if caption.decode_query == "mask" and caption.mask_ratio == 0:
    raise ConfigError("config.caption.decode_query='mask' reads [MASK] positions, which "
                      "config.caption.mask_ratio=0 never trains; use 'next' or mask_ratio > 0.")
  if caption.decode_query == "next" and caption.lm_weight == 0:
    raise ConfigError("config.caption.decode_query='next' reads the next-token LM, which "
                      "config.caption.lm_weight=0 never trains; use 'mask' or lm_weight > 0.")
  if caption.max_len >= config.data.max_text_len:
    raise ConfigError(f"config.caption.max_len={caption.max_len} must be < "
                      f"config.data.max_text_len={config.data.max_text_len} ([CLS] takes a "
                      "position); 0 = the most.")


def _check_evaluators(config, task):
  evaluators = config.eval.evaluators
  for name in evaluators:
    if name not in EVALUATORS:
      raise ConfigError(f"config.eval.evaluators has {name!r}; known: {', '.join(EVALUATORS)}.")
    if name not in TASK_EVALUATORS[task]:
      raise ConfigError(f"config.eval.evaluators has {name!r}, which does not evaluate "
                        f"config.task={task!r}; use {', '.join(TASK_EVALUATORS[task])}.")
  if "zeroshot" in evaluators and config.data.name != "shapes":
    raise ConfigError(
        "config.eval.evaluators has 'zeroshot', which needs class labels: only "
        f"config.data.name='shapes' has them (got {config.data.name!r}).")


def _tfds_split_names(expression):
  """"train[:10%]+validation" -> ["train", "validation"] (TFDS split syntax)."""
  return [re.sub(r"\[.*\]$", "", part.strip()) for part in expression.split("+")]


def _prepared_tfds_splits(name, data_dir):
  """The split names of TFDS `name` as prepared in `data_dir`, read from its
  dataset_info.json files; None where that is not cheap to know (a gs:// data dir, a set
  not prepared yet: make_source then says so, before the first step)."""
  root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  base, _, version = name.partition(":")
  if "://" in root or not os.path.isdir(os.path.join(root, base)):
    return None
  splits = set()
  for path in glob.glob(os.path.join(root, base, "**", "dataset_info.json"), recursive=True):
    if version and f"{os.sep}{version}{os.sep}" not in path:
      continue
    if f"{os.sep}incomplete." in path:
      continue   # a build still running, or killed: TFDS renames it when it is complete
    try:
      with open(path) as f:
        splits.update(s["name"] for s in json.load(f).get("splits", []))
    except (OSError, ValueError, KeyError, TypeError):
      return None   # not ours to judge here; make_source reports a damaged set
  return splits or None


def split_of_source(key):
  """The constraint of config.data.<key> (train_split, eval_split): a split its source has.

  shapes and easy_vqa have fixed splits; jsonl the splits whose file is set (the eval split
  only when it is read at the end, config.train.eval_at_end); tfds the splits of its
  prepared dataset_info.json when it is on a local disk (on gs:// only the syntax is
  checked here, and the split by TFDS when the source is opened).
  """
  def check(value, config):
    data = config.data
    if not value.strip():
      return "must name a split, e.g. 'train' or 'test'."
    if data.name == "shapes" and value not in SHAPES_SPLITS:
      return ": the built-in shapes have the splits train, val (or validation), test."
    if data.name == "easy_vqa" and value not in EASY_VQA_SPLITS:
      return f": easy-VQA has the splits {', '.join(EASY_VQA_SPLITS)}."
    if data.name == "jsonl":
      if value not in JSONL_SPLITS:
        return ": a JSONL data set has the splits train, val (or validation), test."
      file_key = f"data.jsonl.{JSONL_SPLITS[value]}"
      read = key == "train_split" or config.train.get("eval_at_end", True)
      if read and not lookup(config, file_key):
        return f": config.{file_key} is empty; give the JSONL file of that split."
    if data.name == "tfds" and data.tfds_name:
      names = _tfds_split_names(value)
      if not all(re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names):
        return ": not a TFDS split, e.g. 'train', 'validation[:10%]' or 'train+test'."
      offered = _prepared_tfds_splits(data.tfds_name, data.data_dir)
      missing = [n for n in names if offered is not None and n not in offered]
      if missing:
        return (f": TFDS {data.tfds_name!r} has no split {missing[0]!r}; it has "
                f"{', '.join(sorted(offered))}.")
    return None
  return check


def _itc_kind(config):
  itc = config.loss.get("itc")
  return "infonce" if itc is None else itc.kind


def negatives_in_itc(config):
  """Whether ITC contrasts each image with its caption's hard negative
  (config.data.caption_negatives or scene_negatives; loss.itc_caption_negatives)."""
  has_negatives = config.data.get("caption_negatives") or config.data.get("scene_negatives")
  return bool(has_negatives) and config.loss.get("itc_caption_negatives", True)


def check_distill(config):
  """config.distill.teacher: a workdir whose ITC logits this run's can learn from."""
  teacher = config.get("distill", {}).get("teacher")
  if not teacher:
    return
  if not os.path.isfile(wd.path(teacher, wd.CONFIG_FILE)):
    raise ConfigError(f"config.distill.teacher={teacher!r} is not a trained clusjax workdir "
                      "(no config.json in it).")
  if _itc_kind(config) != "infonce" or negatives_in_itc(config):
    raise ConfigError(f"config.distill.teacher={teacher!r} distils the InfoNCE logits [B, B]: it "
                      f"needs config.loss.itc.kind='infonce' (is {_itc_kind(config)!r}) and no "
                      "hard negative captions in ITC (config.data.caption_negatives, "
                      "scene_negatives).")
  if config.loss.itc_weight == 0:
    raise ConfigError(f"config.distill.teacher={teacher!r} replaces the ITC term, but "
                      "config.loss.itc_weight=0.")
  teacher_data = wd.load_config(teacher).data
  for key in ("image_size", "max_text_len"):
    if teacher_data[key] != config.data[key]:
      raise ConfigError(f"config.distill.teacher={teacher!r} was trained with data.{key}="
                        f"{teacher_data[key]}; config.data.{key}={config.data[key]}: the teacher "
                        "reads the student's batches, so they must be equal.")


# The config keys that fix the shapes of what `config.init_from` hands over:
# a workdir that differs in one cannot start this run (image size may differ:
# the ViT position embeddings are resampled).
INIT_FROM_KEYS = tuple(f"model.{t}.{k}" for t in ("vision", "text")
                       for k in ("width", "depth", "num_heads", "mlp_dim")) + (
    "model.vision.patch_size", "model.vision.stem", "model.vision.stem_max_cls",
    "model.vision.stem_width", "model.embed_dim", "model.fusion",
    "model.fusion_depth", "model.itm_head_product", "data.max_text_len")
# What a workdir from before a key existed was trained with.
_INIT_FROM_DEFAULTS = {"model.vision.stem": "patch", "model.vision.stem_max_cls": False,
                       "model.vision.stem_width": 0, "model.itm_head_product": False}


def check_init_from(config):
  """Raises ConfigError naming the first INIT_FROM_KEYS entry where config.init_from's
  workdir differs from `config` (or naming init_from when it is not a workdir)."""
  source = config.get("init_from", "")
  if not source:
    return
  if not os.path.isfile(wd.path(source, wd.CONFIG_FILE)):
    raise ConfigError(f"config.init_from={source!r} is not a trained clusjax workdir "
                      "(no config.json in it).")
  if not os.path.isdir(wd.path(source, wd.CHECKPOINT_DIR)):
    raise ConfigError(f"config.init_from={source!r} has no checkpoints to start from.")
  theirs = wd.load_config(source)
  for key in INIT_FROM_KEYS:
    default = _INIT_FROM_DEFAULTS.get(key)
    mine, other = lookup(config, key, default), lookup(theirs, key, default)
    if mine != other:
      raise ConfigError(f"config.{key}={mine!r} but config.init_from={source!r} was trained "
                        f"with {key}={other!r}: its weights do not fit; set config.{key}="
                        f"{other!r} or start from another workdir.")
