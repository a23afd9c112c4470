"""Checks a run config before anything is built or compiled.

Every error names the key, the bad value and, where there is one, the fix:
`config.train.batch_size=30 is not divisible by the batch axes data x fsdp (8)`.
`validate` reads RULES, one line per key (key, kind, constraint[, when]; the kinds
in clusjax/config_rules.py), then the checks that relate several keys. A new key
is one line of RULES (tests/test_config.py fails for a key without one).
This module imports no jax so that `launch/main.py` fails in well under a
second on a bad flag.
"""
import dataclasses
import re

from clusjax.config_checks import (  # noqa: F401 (re-exported: clusjax.config's API)
    MAX_ARRAY_BYTES, SHAPES_CAPTION_TEMPLATES, WORD_PATTERN, check_bytes_of, check_clustering,
    check_grad_accum, check_longnet, check_losses, check_model, check_prompt_labels, itc_kind,
    prompts_on, twin_ids_read, twin_pairs_per_batch)
from clusjax.config_mesh import (  # noqa: F401 (re-exported: clusjax.config's API)
    MESH_AXES, check_devices, check_sharding_rules, dcn_mesh_shape, resolve_mesh_shape)
from clusjax.config_rules import (  # noqa: F401 (ConfigError, set_key: clusjax.config's API)
    BOOL, EXISTING_PATH, FLOAT, INT, NON_EMPTY, NON_NEGATIVE, POSITIVE, STR, STRS, UNIT,
    ConfigError, Kind, OneOf, Range, check_numbers, check_rules, has, is_on, its, set_key)
from clusjax.config_tasks import (  # noqa: F401 (re-exported: clusjax.config's API)
    DATA_SOURCES, EVALUATORS, HEAD_TASKS, INIT_FROM_KEYS, TASK_EVALUATORS, TASK_SOURCES, TASKS,
    check_init_from, check_task, negatives_in_itc, source_of_task, split_of_source, task_of)

DTYPES = ("float32", "bfloat16")
# config.remat: activation checkpointing of the transformer blocks: none, full (keep only
# each block's input) or a jax.checkpoint_policies policy (kept here: no jax import).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable", "checkpoint_dots",
                  "checkpoint_dots_with_no_batch_dims")
FUSIONS = ("co_attention", "self_attention")
# clusjax.kernels.dilated_attention's implementations (kept here: no jax import).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "pallas")
ITC_KINDS = ("infonce", "siglip", "softclip", "label_smooth")
SOFTCLIP_SELF_SIMILARITY = ("features", "tags")
# clusjax.models.vit stems, clusjax.data.shapes VERSIONS and shapes_v2.BACKGROUNDS,
# clusjax.eval.retrieval.RERANK_SCORES (kept here: no jax / TFDS import; a test checks).
VISION_STEMS = ("patch", "conv", "pool", "cnn")
SHAPES_VERSIONS = (1, 2, 3)
SHAPES_BACKGROUNDS = ("dark", "noise", "light")
RERANK_SCORES = ("itm", "itm+itc")
INTS = Kind((tuple, list), "a tuple of integers", int, "an integer")
ANY_TUPLE = Kind((tuple, list), "a tuple")


# `negative_groups`' value for config.data.scene_negatives (clusjax/data/negatives.py).
SCENE_NEGATIVES = "scene"


def negative_groups(config):
  """What makes each training caption's hard negative: SCENE_NEGATIVES
  (config.data.scene_negatives), word groups (config.data.caption_negatives) or ()."""
  if config.data.get("scene_negatives", False):
    return SCENE_NEGATIVES
  return caption_negative_groups(config.data.get("caption_negatives", ()))


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


def _mesh_size(value, config):
  return None if value >= 1 or value == -1 else "must be a positive integer or -1 (the rest)."


def _negatives(value, config):
  caption_negative_groups(value)


def _negative_share(value, config):
  if not 0 < value <= 1:
    return "must be in (0, 1]: the share of a batch's rows whose hard negative is used."
  if value < 1 and config.grad_accum_steps > 1:
    return (f"keeps the first rows' negatives, which microbatches (config.grad_accum_steps="
            f"{config.grad_accum_steps}) would split: use 1.0 with gradient accumulation.")
  return None


def _itc_negatives(value, config):
  if value or not negative_groups(config) or config.loss.get("itm_caption_negatives", False):
    return None
  return ("leaves the hard negative captions to ITM, but config.loss.itm_caption_negatives "
          "is False: nothing would use them.")


def _scene_negatives(value, config):
  if not value:
    return None
  if config.data.name != "shapes":
    return (f"makes negatives from the built-in shapes' captions; config.data.name is "
            f"{config.data.name!r}.")
  if config.data.caption_negatives:
    return (f"and config.data.caption_negatives={tuple(config.data.caption_negatives)!r} both "
            "make each caption's one negative: set one of them.")
  return None


# ClusModel's top-level parameter groups (tests/train/test_train.py checks the list).
PARAM_GROUPS = ("vision", "vision_proj", "text", "text_proj", "temperature",
                "siglip_log_temperature", "siglip_bias", "prototypes", "fusion", "longnet",
                "itm_head", "mlm_transform", "mlm_norm", "mlm_decoder", "task_head")


def _frozen(value, config):
  bad = [p for p in value if p.split("/")[0] not in PARAM_GROUPS or "" in p.split("/")]
  if bad:
    return (f"{bad[0]!r} is not a parameter path; each is a group ({', '.join(PARAM_GROUPS)}) "
            f"or a module in one, as 'vision/cnn_stem'.")
  return None


def _backgrounds(value, config):
  bad = [b for b in value if b not in SHAPES_BACKGROUNDS]
  if bad or not value:
    return f"must be a non-empty tuple of {', '.join(SHAPES_BACKGROUNDS)}."
  return None


_SHAPES, _SOFTCLIP = its("data.name", "shapes"), its("loss.itc.kind", "softclip")
_LONGNET, _DISTILL = is_on("longnet.depth"), is_on("distill.teacher")
_UNIMODAL = has("loss.unimodal")

# One line per key: (key, kind, constraint[, when: the rule is read only when it holds]).
# Every float is also held finite and every int to int32 (check_numbers), read or not.
# The task's own keys (finetune, caption, data.questions_per_image) are lines of
# clusjax/config_tasks.py's TASK_RULES.
RULES = (
    ("task", STR, OneOf(TASKS), has("task")),
    ("seed", INT, NON_NEGATIVE),
    ("dtype", STR, OneOf(DTYPES)),
    ("init_from", STR),                      # a workdir: check_init_from
    ("remat", STR, OneOf(REMAT_POLICIES)),
    ("scan_layers", BOOL, None, has("scan_layers")),
    ("grad_accum_steps", INT, POSITIVE, has("grad_accum_steps")),
    *((f"mesh.{axis}", INT, _mesh_size) for axis in MESH_AXES),
    *((f"mesh.dcn.{axis}", INT, POSITIVE, has("mesh.dcn")) for axis in MESH_AXES),
    ("sharding.rules", ANY_TUPLE),
    # Data.
    ("data.name", STR, source_of_task),
    ("data.data_dir", STR),
    ("data.image_size", INT, Range(16)),
    ("data.seed", INT, NON_NEGATIVE, has("data.seed")),
    ("data.shapes_num_train", INT, POSITIVE, _SHAPES),
    ("data.shapes_num_val", INT, POSITIVE, _SHAPES),
    ("data.shapes_num_test", INT, POSITIVE, _SHAPES),
    ("data.shapes_version", INT, OneOf(SHAPES_VERSIONS), has("data.shapes_version")),
    ("data.shapes_backgrounds", STRS, _backgrounds, has("data.shapes_backgrounds")),
    ("data.captions_per_image", INT, POSITIVE),
    ("data.shapes_twins", FLOAT, UNIT, has("data.shapes_twins")),
    ("data.tfds_name", STR, NON_EMPTY, its("data.name", "tfds")),
    ("data.image_key", STR, NON_EMPTY),
    ("data.caption_key", STR, NON_EMPTY),
    ("data.all_captions", BOOL),
    *((f"data.jsonl.{split}", STR, EXISTING_PATH) for split in ("train", "val", "test")),
    ("data.train_split", STR, split_of_source("train_split")),
    ("data.eval_split", STR, split_of_source("eval_split")),
    ("data.max_text_len", INT, Range(3)),    # [CLS] word [SEP]
    ("data.tokenizer", STR, EXISTING_PATH),
    ("data.vocab_size", INT, POSITIVE),
    ("data.num_workers", INT, NON_NEGATIVE),
    ("data.caption_negatives", STRS, _negatives),
    ("data.scene_negatives", BOOL, _scene_negatives, has("data.scene_negatives")),
    # Model.
    *((f"model.{tower}.{key}", INT, POSITIVE) for tower in ("vision", "text")
      for key in ("width", "depth", "num_heads", "mlp_dim")),
    ("model.vision.patch_size", INT, POSITIVE),
    ("model.itm_itc_residual", BOOL, None, has("model.itm_itc_residual")),
    ("model.itm_head_product", BOOL, None, has("model.itm_head_product")),
    ("model.vision.stem", STR, OneOf(VISION_STEMS), has("model.vision.stem")),
    ("model.vision.stem_max_cls", BOOL, None, has("model.vision.stem_max_cls")),
    ("model.vision.stem_width", INT, NON_NEGATIVE, has("model.vision.stem_width")),
    ("model.text.init_from", STR, EXISTING_PATH),   # a transformers BERT dir or weights file
    ("model.embed_dim", INT, POSITIVE),
    ("model.dropout", FLOAT, Range(0, 1, high_open=True)),   # 1 would divide by 0
    ("model.temperature_init", FLOAT, Range(0.001, 0.5)),
    ("model.fusion", STR, OneOf(FUSIONS)),
    ("model.fusion_depth", INT, POSITIVE),
    ("longnet.enabled", BOOL),
    ("longnet.depth", INT, NON_NEGATIVE),
    ("longnet.width", INT, POSITIVE, _LONGNET),
    ("longnet.num_heads", INT, POSITIVE, _LONGNET),
    ("longnet.mlp_dim", INT, POSITIVE, _LONGNET),
    ("longnet.implementation", STR, OneOf(ATTENTION_IMPLEMENTATIONS), _LONGNET),
    ("longnet.segment_lengths", INTS, None, _LONGNET),
    ("longnet.dilation_rates", INTS, None, _LONGNET),
    # Losses.
    *((f"loss.{key}", FLOAT, NON_NEGATIVE) for key in (
        "itc_weight", "itm_weight", "mlm_weight", "swap_weight", "prompt_weight",
        "noun_code_weight")),
    ("loss.noun_code_text_weight", FLOAT, NON_NEGATIVE, has("loss.noun_code_text_weight")),
    ("loss.swap_prediction", BOOL),
    ("loss.itm_caption_negatives", BOOL, None, has("loss.itm_caption_negatives")),
    ("loss.itc_caption_negatives", BOOL, _itc_negatives, has("loss.itc_caption_negatives")),
    ("loss.caption_negative_share", FLOAT, _negative_share, has("loss.caption_negative_share")),
    ("loss.itm_uniform_negatives", FLOAT, UNIT, has("loss.itm_uniform_negatives")),
    # Read only where there are place twins (data.shapes_twins on the built-in shapes),
    # as shapes_twins itself: a :tiny run on another source trains as without twins.
    ("loss.itm_twin_negatives", FLOAT, UNIT, has("loss.itm_twin_negatives")),
    ("loss.mlm_probability", FLOAT, Range(0, 1, low_open=True)),
    ("loss.itc.kind", STR, OneOf(ITC_KINDS)),
    ("loss.itc.label_smoothing", FLOAT, Range(0, 1, low_open=True), its("loss.itc.kind",
                                                                          "label_smooth")),
    ("loss.itc.softclip.beta", FLOAT, UNIT, _SOFTCLIP),
    ("loss.itc.softclip.relation_weight", FLOAT, NON_NEGATIVE, _SOFTCLIP),
    ("loss.itc.softclip.clip_weight", FLOAT, NON_NEGATIVE, _SOFTCLIP),
    ("loss.itc.softclip.self_similarity", STR, OneOf(SOFTCLIP_SELF_SIMILARITY), _SOFTCLIP),
    ("loss.itc.softclip.symmetric_kl", BOOL, None, _SOFTCLIP),
    ("loss.unimodal.image_weight", FLOAT, NON_NEGATIVE, _UNIMODAL),
    ("loss.unimodal.text_weight", FLOAT, NON_NEGATIVE, _UNIMODAL),
    ("loss.unimodal.max_shift", INT, NON_NEGATIVE, _UNIMODAL),
    # 1.0 may scale an image to black.
    ("loss.unimodal.brightness", FLOAT, Range(0, 1, high_open=True), _UNIMODAL),
    ("loss.unimodal.noise_std", FLOAT, NON_NEGATIVE, _UNIMODAL),
    ("loss.unimodal.augment_both", BOOL, None, _UNIMODAL),
    ("loss.unimodal.mask_probability", FLOAT, Range(0, 1, low_open=True), _UNIMODAL),
    ("distill.teacher", STR, None, has("distill")),
    ("distill.alpha", FLOAT, UNIT, _DISTILL),
    ("distill.temperature", FLOAT, POSITIVE, _DISTILL),
    ("prompt_labels.num_nouns", INT, POSITIVE, prompts_on),
    ("prompt_labels.max_nouns", INT, POSITIVE, prompts_on),
    ("prompt_labels.max_text_len", INT, Range(3), prompts_on),   # [CLS] word [SEP]
    ("prompt_labels.templates", STRS, None, prompts_on),
    ("prompt_labels.phrases", BOOL, None, prompts_on),
    ("prompt_labels.stop_nouns", STRS, None, prompts_on),
    # Clustering.
    ("clustering.num_prototypes", INT, POSITIVE),
    ("clustering.max_prototypes", INT, POSITIVE),
    ("clustering.temperature", FLOAT, POSITIVE),
    ("clustering.sinkhorn_epsilon", FLOAT, POSITIVE),
    ("clustering.sinkhorn_iters", INT, POSITIVE),
    ("clustering.enabled", BOOL),
    ("clustering.cluster_every", INT, POSITIVE),
    ("clustering.queue_size", INT, POSITIVE),
    ("clustering.dim", INT, POSITIVE),
    ("clustering.min_samples", INT, NON_NEGATIVE),
    ("clustering.eps", FLOAT, NON_NEGATIVE),
    ("clustering.plots", BOOL),
    # Optimizer.
    ("optim.learning_rate", FLOAT, POSITIVE),
    ("optim.warmup_frac", FLOAT, UNIT),
    ("optim.end_lr_frac", FLOAT, UNIT),
    # 1 would divide Adam's bias correction (1 - b^t) by 0.
    ("optim.b1", FLOAT, Range(0, 1, high_open=True)),
    ("optim.b2", FLOAT, Range(0, 1, high_open=True)),
    ("optim.weight_decay", FLOAT, NON_NEGATIVE),
    ("optim.grad_clip_norm", FLOAT, NON_NEGATIVE),
    # Parameter subtrees held fixed ("vision", "vision/cnn_stem", ...); whether this
    # model has them is checked when the optimizer state is made.
    ("optim.frozen", STRS, _frozen, has("optim.frozen")),
    # Training loop.
    ("train.batch_size", INT, POSITIVE),
    ("train.num_steps", INT, POSITIVE),
    ("train.log_every", INT, POSITIVE),
    ("train.checkpoint_every", INT, POSITIVE),
    ("train.keep_checkpoints", INT, POSITIVE),
    ("train.max_skipped_steps", INT, POSITIVE, has("train.max_skipped_steps")),
    ("train.eval_at_end", BOOL),
    ("train.stages", ANY_TUPLE, None, has("train.stages")),   # train_stages
    ("train.cluster_pool", INT, POSITIVE, is_on("train.stages")),
    ("train.cluster_split", INT, POSITIVE, is_on("train.stages")),
    # Evaluation.
    ("eval.batch_size", INT, POSITIVE),
    ("eval.num_examples", INT, POSITIVE),
    ("eval.rerank_k", INT, NON_NEGATIVE),
    ("eval.rerank_score", STR, OneOf(RERANK_SCORES), has("eval.rerank_score")),
    ("eval.rerank_itm_weight", FLOAT, NON_NEGATIVE, has("eval.rerank_itm_weight")),
    ("eval.transfer_examples", INT, POSITIVE, has("eval.transfer_examples")),
    ("eval.evaluators", STRS),                # check_task: known, and of config.task
)


SAMPLERS = ("random", "clustered")
# The config.loss keys a stage may set: weights only (a term whose weight is 0
# is not computed), so every stage trains the same parameters.
STAGE_LOSS_KEYS = ("itc_weight", "itm_weight", "mlm_weight", "swap_weight", "prompt_weight",
                   "noun_code_weight", "noun_code_text_weight", "unimodal.image_weight",
                   "unimodal.text_weight", "task_weight")


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
  ConfigError naming the bad entry. A stage gives its length as `steps` (an int)
  or as `fraction` of config.train.num_steps (rounded; the last such stage takes
  what rounding leaves), so a config's stages follow a --config.train.num_steps
  override."""
  train_config = config.train
  num_steps = train_config.num_steps
  specs = train_config.get("stages", ()) or ({"steps": num_steps},)
  if not isinstance(specs, (tuple, list)):
    raise ConfigError(f"config.train.stages={specs!r} must be a tuple of dicts.")
  parsed, lengths, by_fraction, exact = [], [], [], 0.0
  for i, spec in enumerate(specs):
    where = f"config.train.stages[{i}]"
    if not hasattr(spec, "get"):
      raise ConfigError(f"{where}={spec!r} must be a dict (steps or fraction, sampler, mix, "
                        "loss).")
    unknown = set(spec) - {"steps", "fraction", "sampler", "mix", "loss"}
    if unknown:
      raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}; "
                        "known: steps, fraction, sampler, mix, loss.")
    steps, fraction = spec.get("steps"), spec.get("fraction")
    sampler, mix = spec.get("sampler", "random"), spec.get("mix", 0.5)
    if (steps is None) == (fraction is None):
      raise ConfigError(f"{where} must give one of steps (an int) or fraction (of "
                        f"config.train.num_steps); it gives {dict(spec)!r}.")
    if fraction is not None:
      if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not (
          0 < fraction <= 1):
        raise ConfigError(f"{where}.fraction={fraction!r} must be a number in (0, 1].")
      steps = round(fraction * num_steps)
      by_fraction.append(i)
    elif not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
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
    parsed.append((sampler, float(mix), tuple(sorted(loss.items()))))
    lengths.append(steps)
    exact += steps if fraction is None else fraction * num_steps
  if abs(exact - num_steps) > 1e-6 * num_steps:
    raise ConfigError(f"config.train.stages have {exact:g} steps in all; "
                      f"config.train.num_steps={num_steps}: make them equal.")
  if by_fraction:   # what rounding the fractions left over goes to the last of them
    lengths[by_fraction[-1]] += num_steps - sum(lengths)
  stages, start = [], 0
  for i, ((sampler, mix, loss), steps) in enumerate(zip(parsed, lengths)):
    if steps < 1:
      raise ConfigError(f"config.train.stages[{i}] has {steps} steps at "
                        f"config.train.num_steps={num_steps}: too few steps for its fraction (more "
                        "steps, or config.train.stages=() for one random stage).")
    stages.append(Stage(i, start, start + steps, sampler, mix, loss))
    start += steps
  return stages


def validate(config, num_devices=None):
  """Raises ConfigError on the first key that cannot work.

  Args:
    config: the run's ConfigDict.
    num_devices: global device count; when given, the mesh and batch
      divisibility are checked too.
  """
  check_numbers(config)      # NaN, inf, 1e300, 10**12: anywhere, read or not
  check_rules(config, RULES)
  check_task(config)         # clusjax/config_tasks.py: its rules, data source, evaluators
  check_bytes_of(config)     # clusjax/config_checks.py: what relates several keys
  check_model(config)
  check_longnet(config)
  check_losses(config)
  check_prompt_labels(config)
  check_grad_accum(config)
  if config.train.get("stages"):
    train_stages(config)
  check_sharding_rules(config)
  if num_devices is not None:
    check_devices(config, num_devices)
  check_clustering(config)
