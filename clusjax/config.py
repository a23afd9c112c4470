"""Checks a run config before anything is built or compiled.

Every error names the key, the bad value and, where there is one, the fix:
`config.train.batch_size=30 is not divisible by the batch axes data x fsdp (8)`.
This module imports no jax so that `launch/main.py` fails in well under a
second on a bad flag.
"""
import dataclasses
import math
import os
import re

from clusjax import workdir as wd

MESH_AXES = ("data", "fsdp", "tensor")
DATA_SOURCES = ("shapes", "tfds", "jsonl", "easy_vqa")
# config.task: what a run trains (DESIGN §9). Pre-training and retrieval read
# image-caption records; vqa and nlvr2 train a head on the fused CLS.
TASKS = ("pretrain", "retrieval", "vqa", "nlvr2")
HEAD_TASKS = ("vqa", "nlvr2")
# The data sources each task reads (config.data.name).
TASK_SOURCES = {"pretrain": ("shapes", "tfds", "jsonl"), "retrieval": ("shapes", "tfds", "jsonl"),
                "vqa": ("shapes", "jsonl", "easy_vqa"), "nlvr2": ("shapes", "jsonl")}
# config.finetune.loss: the head's objective (clusjax/losses/finetune.py).
FINETUNE_LOSSES = ("ce", "supcon", "clce")
EASY_VQA_SPLITS = ("train", "test")
# clusjax.data.shapes.NUM_TEMPLATES (kept here: no TFDS import; a test checks they agree).
SHAPES_CAPTION_TEMPLATES = 7
DTYPES = ("float32", "bfloat16")
# config.remat: activation checkpointing of the transformer blocks: none, full (keep only
# each block's input) or a jax.checkpoint_policies policy (kept here: no jax import).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable", "checkpoint_dots",
                  "checkpoint_dots_with_no_batch_dims")
EVALUATORS = ("retrieval", "zeroshot", "vqa", "nlvr2")
# The evaluators each task can run.
TASK_EVALUATORS = {"pretrain": ("retrieval", "zeroshot"), "retrieval": ("retrieval", "zeroshot"),
                   "vqa": ("vqa",), "nlvr2": ("nlvr2",)}
FUSIONS = ("co_attention", "self_attention")
# clusjax.kernels.dilated_attention's implementations (kept here: no jax import).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "pallas")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


# A swappable word of config.data.caption_negatives (clusjax/data/negatives.py).
WORD_PATTERN = r"[A-Za-z]+"


def caption_negative_groups(groups, key="config.data.caption_negatives"):
  """("w1 w2 ...", one string per group) -> tuple of lower-case word tuples.

  Raises ConfigError naming `key` for a bare string, a group of fewer than two
  distinct words, a word that is not letters a-z, or a word in two groups.
  """
  if isinstance(groups, str) or not isinstance(groups, (tuple, list)):
    raise ConfigError(f"{key}={groups!r} must be a tuple of strings, one group of "
                      "space-separated words each, e.g. ('circle square triangle',).")
  parsed, seen = [], {}
  for i, group in enumerate(groups):
    if not isinstance(group, str):
      raise ConfigError(f"{key}[{i}]={group!r} must be a string of space-separated words.")
    words = tuple(dict.fromkeys(w.lower() for w in group.split()))
    if len(words) < 2:
      raise ConfigError(f"{key}[{i}]={group!r} needs at least two distinct words to swap.")
    for w in words:
      if not re.fullmatch(WORD_PATTERN, w):
        raise ConfigError(f"{key}[{i}]: {w!r} is not a word of letters a-z.")
      if w in seen:
        raise ConfigError(f"{key}: {w!r} is in group {seen[w]} and in group {i}.")
      seen[w] = i
    parsed.append(words)
  return tuple(parsed)


def set_key(config, key, value):
  """Sets the dotted `key` ("loss.itc.kind") of `config` to `value`, in place."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def _get(config, path):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing.")
    node = node[part]
  return node


def _check_type(config, path, types, what):
  value = _get(config, path)
  # bool is an int subclass; a flag like `=True` on an int key is a mistake.
  if isinstance(value, bool) and bool not in types:
    raise ConfigError(f"config.{path}={value!r} must be {what}.")
  if not isinstance(value, types):
    raise ConfigError(f"config.{path}={value!r} must be {what}.")
  return value


def _positive_int(config, path, allow_zero=False):
  value = _check_type(config, path, (int,), "an integer")
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"config.{path}={value} must be {'>= 0' if allow_zero else '> 0'}.")
  return value


def _number(config, path, low=None, high=None, low_open=False):
  value = _check_type(config, path, (int, float), "a number")
  if low is not None and (value < low or (low_open and value == low)):
    raise ConfigError(f"config.{path}={value} must be {'>' if low_open else '>='} {low}.")
  if high is not None and value > high:
    raise ConfigError(f"config.{path}={value} must be <= {high}.")
  return value


def _choice(config, path, choices):
  value = _get(config, path)
  if value not in choices:
    raise ConfigError(f"config.{path}={value!r} must be one of {', '.join(choices)}.")
  return value


def _validate_longnet(config):
  _check_type(config, "longnet.enabled", (bool,), "True or False")
  if _positive_int(config, "longnet.depth", allow_zero=True) == 0:
    return
  for key in ("width", "num_heads", "mlp_dim"):
    _positive_int(config, f"longnet.{key}")
  if config.longnet.width % config.longnet.num_heads:
    raise ConfigError(f"config.longnet.width={config.longnet.width} is not divisible by "
                      f"config.longnet.num_heads={config.longnet.num_heads}.")
  _choice(config, "longnet.implementation", ATTENTION_IMPLEMENTATIONS)
  ws = _check_type(config, "longnet.segment_lengths", (tuple, list), "a tuple of ints")
  rs = _check_type(config, "longnet.dilation_rates", (tuple, list), "a tuple of ints")
  if not ws or len(ws) != len(rs):
    raise ConfigError(f"config.longnet.segment_lengths={tuple(ws)} and "
                      f"config.longnet.dilation_rates={tuple(rs)} must be non-empty and of "
                      "equal length (one (w, r) per branch).")
  for w, r in zip(ws, rs):
    if isinstance(w, bool) or isinstance(r, bool) or not (
        isinstance(w, int) and isinstance(r, int) and w > 0 and r > 0) or w % r:
      raise ConfigError(f"config.longnet: branch (w={w!r}, r={r!r}) needs positive ints with "
                        f"r dividing w (segment_lengths={tuple(ws)}, "
                        f"dilation_rates={tuple(rs)}).")


def _validate_prompt_labels(config):
  if config.loss.prompt_weight == 0 and config.loss.noun_code_weight == 0:
    return
  for key in ("num_nouns", "max_nouns"):
    _positive_int(config, f"prompt_labels.{key}")
  label_len = _positive_int(config, "prompt_labels.max_text_len")
  if not 3 <= label_len <= config.data.max_text_len:
    raise ConfigError(f"config.prompt_labels.max_text_len={label_len} must be >= 3 ([CLS] word "
                      f"[SEP]) and <= config.data.max_text_len={config.data.max_text_len} (the "
                      "text tower's positions).")
  templates = _check_type(config, "prompt_labels.templates", (tuple, list),
                          'a tuple of strings with one "{}" each')
  if not templates:
    raise ConfigError("config.prompt_labels.templates is empty; give at least one, "
                      "e.g. ('a photo of a {}.',).")
  for i, t in enumerate(templates):
    if not isinstance(t, str) or t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1:
      raise ConfigError(f"config.prompt_labels.templates[{i}]={t!r} must be a string with "
                        'exactly one "{}" (where the noun goes).')
  _check_type(config, "prompt_labels.phrases", (bool,), "True or False")
  stop = _check_type(config, "prompt_labels.stop_nouns", (tuple, list), "a tuple of words")
  for i, w in enumerate(stop):
    if not isinstance(w, str) or not re.fullmatch(WORD_PATTERN, w):
      raise ConfigError(f"config.prompt_labels.stop_nouns[{i}]={w!r} is not a word of "
                        "letters a-z.")


ITC_KINDS = ("infonce", "siglip", "softclip", "label_smooth")
SOFTCLIP_SELF_SIMILARITY = ("features", "tags")


def itc_kind(loss_config):
  """The contrastive loss of `config.loss` (a workdir from before the switch: infonce)."""
  itc = loss_config.get("itc")
  return "infonce" if itc is None else itc.kind


def _validate_itc(config):
  kind = _choice(config, "loss.itc.kind", ITC_KINDS)
  if kind != "infonce" and config.data.caption_negatives:
    raise ConfigError(f"config.data.caption_negatives join the InfoNCE softmax only; they do not "
                      f"work with config.loss.itc.kind={kind!r}: set one of them off.")
  if kind == "label_smooth":
    _number(config, "loss.itc.label_smoothing", 0.0, 1.0, low_open=True)
  if kind == "softclip":
    beta = _number(config, "loss.itc.softclip.beta", 0.0, 1.0)
    _number(config, "loss.itc.softclip.relation_weight", 0.0)
    _number(config, "loss.itc.softclip.clip_weight", 0.0)
    _choice(config, "loss.itc.softclip.self_similarity", SOFTCLIP_SELF_SIMILARITY)
    if _check_type(config, "loss.itc.softclip.symmetric_kl", (bool,), "True or False") and not beta:
      raise ConfigError("config.loss.itc.softclip.beta=0 with symmetric_kl=True: KL(p || t) is "
                        "infinite against one-hot targets; set beta > 0 or symmetric_kl=False.")


def _validate_unimodal(config):
  _number(config, "loss.unimodal.image_weight", 0.0)
  _number(config, "loss.unimodal.text_weight", 0.0)
  _positive_int(config, "loss.unimodal.max_shift", allow_zero=True)
  _number(config, "loss.unimodal.brightness", 0.0, 1.0)
  if config.loss.unimodal.brightness == 1.0:
    raise ConfigError("config.loss.unimodal.brightness=1.0 may scale an image to black; use < 1.")
  _number(config, "loss.unimodal.noise_std", 0.0)
  _check_type(config, "loss.unimodal.augment_both", (bool,), "True or False")
  _number(config, "loss.unimodal.mask_probability", 0.0, 1.0, low_open=True)


def _validate_grad_accum(config, batch):
  """config.grad_accum_steps (1 when absent: a workdir from before it); returns it."""
  if config.get("grad_accum_steps") is None:
    return 1
  accum = _positive_int(config, "grad_accum_steps")
  if batch % accum:
    raise ConfigError(f"config.train.batch_size={batch} is not divisible by "
                      f"config.grad_accum_steps={accum}.")
  if accum > 1:
    tags = (itc_kind(config.loss) == "softclip"
            and config.loss.itc.softclip.self_similarity == "tags")
    for on, what in ((config.get("distill", {}).get("teacher"), "config.distill.teacher"),
                     (config.data.caption_negatives, "config.data.caption_negatives"),
                     (tags, "config.loss.itc.softclip.self_similarity='tags'")):
      if on:
        raise ConfigError(f"config.grad_accum_steps={accum} does not work with {what} (their "
                          "extra forward passes are not accumulated): set one of them off.")
  return accum


def _validate_distill(config):
  teacher = _check_type(config, "distill.teacher", (str,), 'a clusjax workdir or ""')
  if not teacher:
    return
  if not os.path.isfile(wd.path(teacher, wd.CONFIG_FILE)):
    raise ConfigError(f"config.distill.teacher={teacher!r} is not a trained clusjax workdir "
                      "(no config.json in it).")
  _number(config, "distill.alpha", 0.0, 1.0)
  _number(config, "distill.temperature", 0.0, low_open=True)
  if itc_kind(config.loss) != "infonce" or config.data.caption_negatives:
    raise ConfigError(f"config.distill.teacher={teacher!r} distils the InfoNCE logits [B, B]: it "
                      f"needs config.loss.itc.kind='infonce' (is {itc_kind(config.loss)!r}) and no "
                      "config.data.caption_negatives.")
  if config.loss.itc_weight == 0:
    raise ConfigError(f"config.distill.teacher={teacher!r} replaces the ITC term, but "
                      "config.loss.itc_weight=0.")
  teacher_data = wd.load_config(teacher).data
  for key in ("image_size", "max_text_len"):
    if teacher_data[key] != config.data[key]:
      raise ConfigError(f"config.distill.teacher={teacher!r} was trained with data.{key}="
                        f"{teacher_data[key]}; config.data.{key}={config.data[key]}: the teacher "
                        "reads the student's batches, so they must be equal.")


def task_of(config):
  """config.task ("pretrain" for a workdir from before the key)."""
  return config.get("task", "pretrain")


def _validate_task(config):
  """config.task, its data source, loss and config.finetune (a task config's section)."""
  task = _choice(config, "task", TASKS)
  name = config.data.name
  if name not in TASK_SOURCES[task]:
    raise ConfigError(f"config.data.name={name!r} has no records for config.task={task!r}; "
                      f"use one of {', '.join(TASK_SOURCES[task])}.")
  weight = _number(config, "loss.task_weight", 0.0)
  if task not in HEAD_TASKS:
    if weight:
      raise ConfigError(f"config.loss.task_weight={weight} trains a downstream head, but "
                        f"config.task={task!r} has none (vqa and nlvr2 do).")
    return
  if not weight:
    raise ConfigError(f"config.task={task!r} trains its head with config.loss.task_weight, "
                      "which is 0.")
  if config.get("finetune") is None:
    raise ConfigError(f"config.task={task!r} needs a config.finetune section; start from "
                      f"configs/{task}.py.")
  _choice(config, "finetune.loss", FINETUNE_LOSSES)
  _positive_int(config, "finetune.head_hidden", allow_zero=True)
  _number(config, "finetune.supcon_temperature", 0.0, low_open=True)
  _number(config, "finetune.clce_lam", 0.0, 1.0)
  _number(config, "finetune.clce_temperature", 0.0, low_open=True)
  if task == "vqa":
    _positive_int(config, "finetune.num_answers")
    _positive_int(config, "data.questions_per_image")


# The config keys that fix the shapes of what `config.init_from` hands over:
# a workdir that differs in one cannot start this run (image size may differ:
# the ViT position embeddings are resampled).
INIT_FROM_KEYS = tuple(f"model.{t}.{k}" for t in ("vision", "text")
                       for k in ("width", "depth", "num_heads", "mlp_dim")) + (
    "model.vision.patch_size", "model.embed_dim", "model.fusion", "model.fusion_depth",
    "data.max_text_len")


def _lookup_key(config, key):
  node = config
  for part in key.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


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
    mine, other = _lookup_key(config, key), _lookup_key(theirs, key)
    if mine != other:
      raise ConfigError(f"config.{key}={mine!r} but config.init_from={source!r} was trained "
                        f"with {key}={other!r}: its weights do not fit; set config.{key}="
                        f"{other!r} or start from another workdir.")


SAMPLERS = ("random", "clustered")
# The config.loss keys a stage may set: weights only (a term whose weight is 0
# is not computed), so every stage trains the same parameters.
STAGE_LOSS_KEYS = ("itc_weight", "itm_weight", "mlm_weight", "swap_weight", "prompt_weight",
                   "noun_code_weight", "unimodal.image_weight", "unimodal.text_weight",
                   "task_weight")


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  start: int          # first step (global step count before it)
  end: int            # step count after its last step
  sampler: str        # random | clustered
  mix: float          # clustered: fraction of each batch from clusters
  loss: tuple         # ((config.loss key, weight), ...)


def train_stages(config):
  """config.train.stages -> [Stage] (one random stage when empty); raises
  ConfigError naming the bad entry."""
  train_config = config.train
  specs = train_config.get("stages", ()) or ({"steps": train_config.num_steps},)
  if not isinstance(specs, (tuple, list)):
    raise ConfigError(f"config.train.stages={specs!r} must be a tuple of dicts.")
  stages, start = [], 0
  for i, spec in enumerate(specs):
    where = f"config.train.stages[{i}]"
    if not hasattr(spec, "get"):
      raise ConfigError(f"{where}={spec!r} must be a dict (steps, sampler, mix, loss).")
    unknown = set(spec) - {"steps", "sampler", "mix", "loss"}
    if unknown:
      raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}; "
                        "known: steps, sampler, mix, loss.")
    steps, sampler, mix = spec.get("steps"), spec.get("sampler", "random"), spec.get("mix", 0.5)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
      raise ConfigError(f"{where}.steps={steps!r} must be an int >= 1.")
    if sampler not in SAMPLERS:
      raise ConfigError(f"{where}.sampler={sampler!r} must be one of {SAMPLERS}.")
    if not isinstance(mix, (int, float)) or not 0 <= mix <= 1:
      raise ConfigError(f"{where}.mix={mix!r} must be a number in [0, 1].")
    loss = dict(spec.get("loss", {}))
    for key, weight in loss.items():
      if key not in STAGE_LOSS_KEYS:
        raise ConfigError(f"{where}.loss sets {key!r}; a stage sets loss weights only: "
                          f"{', '.join(STAGE_LOSS_KEYS)}.")
      if not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f"{where}.loss[{key!r}]={weight!r} must be a number >= 0.")
    stages.append(Stage(i, start, start + steps, sampler, float(mix), tuple(sorted(loss.items()))))
    start += steps
  if start != train_config.num_steps:
    raise ConfigError(f"config.train.stages have {start} steps in all; "
                      f"config.train.num_steps={train_config.num_steps}: make them equal.")
  return stages


def dcn_mesh_shape(mesh_config, shape):
  """{axis: slices} of config.mesh.dcn (all 1 when absent), each dividing the
  axis size in `shape` (`resolve_mesh_shape`'s)."""
  dcn = mesh_config.get("dcn") or {}
  unknown = set(dcn.keys()) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.mesh.dcn.{sorted(unknown)[0]} is not a mesh axis; axes are "
                      f"{MESH_AXES}.")
  out = {}
  for axis in MESH_AXES:
    value = dcn.get(axis, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.mesh.dcn.{axis}={value!r} must be a positive integer.")
    if shape[axis] % value:
      raise ConfigError(f"config.mesh.dcn.{axis}={value} does not divide the {axis} axis "
                        f"({shape[axis]} devices): each slice holds an equal part of it.")
    out[axis] = value
  return out


def resolve_mesh_shape(mesh_config, num_devices):
  """Returns {axis: size} with the one -1 axis filled in from num_devices."""
  shape = {}
  for axis in MESH_AXES:
    value = mesh_config.get(axis, 1)
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise ConfigError(f"config.mesh.{axis}={value!r} must be a positive integer or -1.")
    shape[axis] = value
  unknown = set(mesh_config.keys()) - set(MESH_AXES) - {"dcn"}
  if unknown:
    raise ConfigError(f"config.mesh.{sorted(unknown)[0]} is not a mesh axis; axes are {MESH_AXES}.")
  free = [a for a in MESH_AXES if shape[a] == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {free}.")
  fixed = math.prod(v for v in shape.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config.mesh: {num_devices} devices cannot be split with fixed axes of size {fixed}.")
    shape[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"config.mesh={dict(shape)} has {fixed} devices but {num_devices} are present; "
        f"set one axis to -1 or match the device count.")
  return shape


def validate(config, num_devices=None):
  """Raises ConfigError on the first key that cannot work.

  Args:
    config: the run's ConfigDict.
    num_devices: global device count; when given, the mesh and batch
      divisibility are checked too.
  """
  _positive_int(config, "seed", allow_zero=True)
  _choice(config, "dtype", DTYPES)
  _check_type(config, "init_from", (str,), 'a clusjax workdir or ""')
  _choice(config, "remat", REMAT_POLICIES)

  # Data.
  _choice(config, "data.name", DATA_SOURCES)
  _validate_task(config)
  image_size = _positive_int(config, "data.image_size")
  if image_size < 16:
    raise ConfigError(f"config.data.image_size={image_size} must be >= 16.")
  if _positive_int(config, "data.max_text_len") < 3:
    raise ConfigError("config.data.max_text_len must be >= 3 ([CLS] word [SEP]).")
  _positive_int(config, "data.vocab_size")
  _positive_int(config, "data.num_workers", allow_zero=True)
  for key in ("data_dir", "tokenizer", "tfds_name", "image_key", "caption_key",
              "train_split", "eval_split"):
    _check_type(config, f"data.{key}", (str,), "a string")
  caption_negative_groups(_get(config, "data.caption_negatives"))
  if config.data.name == "shapes":
    for key in ("shapes_num_train", "shapes_num_val", "shapes_num_test"):
      _positive_int(config, f"data.{key}")
  elif config.data.name == "tfds" and not config.data.tfds_name:
    raise ConfigError("config.data.tfds_name is empty but config.data.name='tfds'.")
  elif config.data.name == "jsonl" and not config.data.jsonl.train:
    raise ConfigError("config.data.jsonl.train is empty but config.data.name='jsonl'.")
  elif config.data.name == "easy_vqa":
    for key in ("train_split", "eval_split"):
      if config.data[key] not in EASY_VQA_SPLITS:
        raise ConfigError(f"config.data.{key}={config.data[key]!r}: easy-VQA has the splits "
                          f"{', '.join(EASY_VQA_SPLITS)}.")
  per_image = _positive_int(config, "data.captions_per_image")
  if config.data.name == "shapes" and per_image > SHAPES_CAPTION_TEMPLATES:
    raise ConfigError(f"config.data.captions_per_image={per_image}: the built-in shapes have "
                      f"{SHAPES_CAPTION_TEMPLATES} caption templates (one per caption).")
  _check_type(config, "data.all_captions", (bool,), "True or False")

  # Model.
  for tower in ("vision", "text"):
    for key in ("width", "depth", "num_heads", "mlp_dim"):
      _positive_int(config, f"model.{tower}.{key}")
    width, heads = config.model[tower].width, config.model[tower].num_heads
    if width % heads:
      raise ConfigError(
          f"config.model.{tower}.width={width} is not divisible by "
          f"config.model.{tower}.num_heads={heads}.")
  init_from = _check_type(config, "model.text.init_from", (str,), 'a path or ""')
  if init_from and not os.path.exists(init_from):
    raise ConfigError(
        f"config.model.text.init_from={init_from!r} does not exist; give a transformers BERT "
        f"directory or weights file to start the text tower from, or \"\".")
  patch = _positive_int(config, "model.vision.patch_size")
  if image_size % patch:
    raise ConfigError(
        f"config.model.vision.patch_size={patch} does not divide "
        f"config.data.image_size={image_size}.")
  _positive_int(config, "model.embed_dim")
  _number(config, "model.dropout", 0.0, 1.0)
  _number(config, "model.temperature_init", 0.001, 0.5)

  fusion = _choice(config, "model.fusion", FUSIONS)
  _positive_int(config, "model.fusion_depth")
  for tower in ("vision", "text"):
    width = config.model[tower].width
    if width % config.model.text.num_heads:
      raise ConfigError(
          f"config.model.{tower}.width={width} is not divisible by "
          f"config.model.text.num_heads={config.model.text.num_heads} (the fusion heads).")
  if fusion == "self_attention" and config.model.vision.width != config.model.text.width:
    raise ConfigError(
        f"config.model.fusion='self_attention' concatenates the two streams: it needs "
        f"config.model.vision.width ({config.model.vision.width}) == "
        f"config.model.text.width ({config.model.text.width}).")

  _validate_longnet(config)

  for key in ("itc_weight", "itm_weight", "mlm_weight", "swap_weight", "prompt_weight",
              "noun_code_weight"):
    _number(config, f"loss.{key}", 0.0)
  _validate_itc(config)
  if config.get("distill") is not None:
    _validate_distill(config)
  _validate_prompt_labels(config)
  _check_type(config, "loss.swap_prediction", (bool,), "True or False")
  _number(config, "loss.mlm_probability", 0.0, 1.0, low_open=True)
  if config.loss.get("unimodal") is not None:
    _validate_unimodal(config)

  # Clustering.
  num_prototypes = _positive_int(config, "clustering.num_prototypes")
  max_prototypes = _positive_int(config, "clustering.max_prototypes")
  if num_prototypes > max_prototypes:
    raise ConfigError(
        f"config.clustering.num_prototypes={num_prototypes} exceeds "
        f"config.clustering.max_prototypes={max_prototypes}.")
  _number(config, "clustering.temperature", 0.0, low_open=True)
  _number(config, "clustering.sinkhorn_epsilon", 0.0, low_open=True)
  _positive_int(config, "clustering.sinkhorn_iters")
  _check_type(config, "clustering.enabled", (bool,), "True or False")
  _positive_int(config, "clustering.cluster_every")
  _positive_int(config, "clustering.queue_size")
  dim = _positive_int(config, "clustering.dim")
  if dim > config.model.embed_dim:
    raise ConfigError(f"config.clustering.dim={dim} exceeds config.model.embed_dim="
                      f"{config.model.embed_dim}.")
  _positive_int(config, "clustering.min_samples", allow_zero=True)
  _number(config, "clustering.eps", 0.0)
  _check_type(config, "clustering.plots", (bool,), "True or False")

  # Optimizer.
  _number(config, "optim.learning_rate", 0.0, low_open=True)
  _number(config, "optim.warmup_frac", 0.0, 1.0)
  _number(config, "optim.end_lr_frac", 0.0, 1.0)
  _number(config, "optim.b1", 0.0, 1.0)
  _number(config, "optim.b2", 0.0, 1.0)
  _number(config, "optim.weight_decay", 0.0)
  _number(config, "optim.grad_clip_norm", 0.0)

  # Training loop.
  batch = _positive_int(config, "train.batch_size")
  accum = _validate_grad_accum(config, batch)
  _positive_int(config, "train.num_steps")
  _positive_int(config, "train.log_every")
  _positive_int(config, "train.checkpoint_every")
  _positive_int(config, "train.keep_checkpoints")
  _check_type(config, "train.eval_at_end", (bool,), "True or False")
  if config.train.get("stages"):
    _positive_int(config, "train.cluster_pool")
    _positive_int(config, "train.cluster_split")
    train_stages(config)

  # Evaluation.
  _positive_int(config, "eval.batch_size")
  _positive_int(config, "eval.num_examples")
  _positive_int(config, "eval.rerank_k", allow_zero=True)
  evaluators = _check_type(config, "eval.evaluators", (tuple, list), "a tuple of names")
  for name in evaluators:
    if name not in EVALUATORS:
      raise ConfigError(f"config.eval.evaluators has {name!r}; known: {', '.join(EVALUATORS)}.")
    if name not in TASK_EVALUATORS[task_of(config)]:
      raise ConfigError(f"config.eval.evaluators has {name!r}, which does not evaluate "
                        f"config.task={task_of(config)!r}; use "
                        f"{', '.join(TASK_EVALUATORS[task_of(config)])}.")
  if "zeroshot" in evaluators and config.data.name != "shapes":
    raise ConfigError(
        "config.eval.evaluators has 'zeroshot', which needs class labels: only "
        f"config.data.name='shapes' has them (got {config.data.name!r}).")

  # Sharding rules: (logical name, mesh axes) pairs over known mesh axes.
  rules = _check_type(config, "sharding.rules", (tuple, list), "a tuple of (name, axes) pairs")
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"config.sharding.rules has {rule!r}; each rule is (logical_name, mesh_axes).")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for axis in axes:
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(
            f"config.sharding.rules maps {rule[0]!r} to {axis!r}, not a mesh axis {MESH_AXES}.")

  if num_devices is not None:
    shape = resolve_mesh_shape(config.mesh, num_devices)
    dcn_mesh_shape(config.mesh, shape)
    for tower in ("vision", "text"):
      t = config.model[tower]
      for key, value, axis in (("width", t.width, "fsdp"), ("num_heads", t.num_heads, "tensor"),
                               ("mlp_dim", t.mlp_dim, "tensor")):
        if value % shape[axis]:
          raise ConfigError(
              f"config.model.{tower}.{key}={value} is not divisible by the {axis} mesh "
              f"axis ({shape[axis]}); parameters are split over it.")
    batch_shards = shape["data"] * shape["fsdp"]
    if batch % batch_shards:
      raise ConfigError(
          f"config.train.batch_size={batch} is not divisible by the batch axes "
          f"data x fsdp ({batch_shards}).")
    if batch % (batch_shards * accum):
      raise ConfigError(
          f"config.train.batch_size={batch} is not divisible by config.grad_accum_steps={accum} "
          f"x the batch axes data x fsdp ({batch_shards}): every microbatch is split over them.")

  queue, rows = config.clustering.queue_size, 2 * batch
  if queue % rows:
    raise ConfigError(
        f"config.clustering.queue_size={queue} must be a multiple of 2 x "
        f"config.train.batch_size={batch} ({rows} rows: each step writes its image and text "
        f"features).")
