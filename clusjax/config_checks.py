"""The checks of `clusjax.config.validate` that relate several keys (one key's
rules are lines of clusjax.config.RULES): divisibility, sizes that must agree, and
the arrays a config would make, refused by arithmetic when they cannot exist.

Imports no jax.
"""
import re

from clusjax.config_rules import ConfigError, check_bytes
from clusjax.config_tasks import check_distill, negatives_in_itc

# clusjax.data.shapes.NUM_TEMPLATES (kept here: no TFDS import; a test checks they agree).
SHAPES_CAPTION_TEMPLATES = 7
# A swappable word of config.data.caption_negatives (clusjax/data/negatives.py).
WORD_PATTERN = r"[A-Za-z]+"
# The most bytes one array (or the built-in data set) may take: more than any host's
# memory or any slice's HBM holds. A size past it is refused by arithmetic here, not
# by numpy or XLA deep inside data generation or compilation.
MAX_ARRAY_BYTES = 2**40


def itc_kind(loss_config):
  """The contrastive loss of `config.loss` (a workdir from before the switch: infonce)."""
  itc = loss_config.get("itc")
  return "infonce" if itc is None else itc.kind


# The config.loss weights of the terms that read config.prompt_labels.
LABEL_LOSS_KEYS = ("prompt_weight", "noun_code_weight", "noun_code_text_weight")


def prompts_on(config):
  """Whether config.prompt_labels is read (a prompt-label loss is on)."""
  return any(config.loss.get(key, 0.0) for key in LABEL_LOSS_KEYS)


def twin_pairs_per_batch(data_config, batch_size):
  """Place-twin pairs per batch of `batch_size` (`clusjax.data.twins`): from
  `data_config.shapes_twins`, the share of a batch's rows in pairs; 0 when off or
  when the data is not the built-in shapes (which alone has scenes to move)."""
  if data_config.name != "shapes":
    return 0
  return int(data_config.get("shapes_twins", 0.0) * batch_size) // 2   # <= batch_size / 2


def twin_ids_read(config):
  """Whether the train step reads each row's "pair_id": place twins in the batch and
  `loss.itm_twin_negatives` < 1. The loader writes it and `dummy_batch` has it exactly
  then, so that the compiled step's batch and the loader's agree."""
  return (twin_pairs_per_batch(config.data, config.train.batch_size) > 0
          and config.loss.get("itm_twin_negatives", 1.0) < 1)


def _arrays(config):
  """(what, ((key, power), ...), bytes per element) of the largest arrays a run makes."""
  image = (("data.image_size", 2),)
  arrays = [
      ("a training batch of images (float32 RGB)", (("train.batch_size", 1), *image), 12),
      ("an evaluation batch of images (float32 RGB)", (("eval.batch_size", 1), *image), 12),
      ("a training batch's MLM logits (float32)",
       (("train.batch_size", 1), ("data.max_text_len", 1), ("data.vocab_size", 1)), 4),
      ("the word embeddings (float32)", (("data.vocab_size", 1), ("model.text.width", 1)), 4),
      ("the feature queue (float32)", (("clustering.queue_size", 1), ("model.embed_dim", 1)), 4),
      ("one caption's text attention scores (float32)",
       (("model.text.num_heads", 1), ("data.max_text_len", 2)), 4),
      # A Grain worker is a Python process of ~100 MiB.
      ("the Grain worker processes", (("data.num_workers", 1),), 100 * 2**20)]
  if config.longnet.depth:
    arrays.append(("the cluster tokens of a batch's 3B ITM pairs (float32)",
                   (("train.batch_size", 1), ("clustering.max_prototypes", 1),
                    ("longnet.width", 1)), 12))
  if config.data.name == "shapes":
    arrays.append(("the built-in shapes training set (uint8 RGB)",
                   (("data.shapes_num_train", 1), *image), 3))
  if "retrieval" in config.eval.evaluators:
    arrays.append(("the retrieval similarities (float32)", (("eval.num_examples", 2),), 4))
  return arrays


def check_model(config):
  """The towers' widths, heads and patches against each other and the image size."""
  image_size = config.data.image_size
  for tower in ("vision", "text"):
    width, heads = config.model[tower].width, config.model[tower].num_heads
    if width % heads:
      raise ConfigError(f"config.model.{tower}.width={width} is not divisible by "
                        f"config.model.{tower}.num_heads={heads}.")
  patch = config.model.vision.patch_size
  if image_size % patch:
    raise ConfigError(f"config.model.vision.patch_size={patch} does not divide "
                      f"config.data.image_size={image_size}.")
  tokens = (image_size // patch) ** 2
  scores = 4 * config.model.vision.num_heads * tokens**2
  if scores > MAX_ARRAY_BYTES:
    raise ConfigError(f"config.data.image_size={image_size} / config.model.vision.patch_size="
                      f"{patch} makes {tokens} image tokens: one image's attention scores would "
                      f"take {scores:.3g} bytes, over the {MAX_ARRAY_BYTES / 2**40:g} TiB no one "
                      "machine holds: lower the image size or raise the patch size.")
  stem = config.model.vision.get("stem")
  smallest = {"conv": 2, "pool": 4, "cnn": 2}.get(stem, 1)
  if smallest > 1 and (patch < smallest or patch & (patch - 1)):
    raise ConfigError(f"config.model.vision.stem={stem!r} needs a power-of-two "
                      f"config.model.vision.patch_size >= {smallest}; it is {patch}.")
  for key in ("stem_max_cls", "stem_width"):
    if config.model.vision.get(key) and smallest == 1:
      raise ConfigError(f"config.model.vision.{key}={config.model.vision[key]!r} needs a "
                        f"convolutional config.model.vision.stem (conv, pool or cnn); it is "
                        f"{stem!r}.")
  for tower in ("vision", "text"):
    width = config.model[tower].width
    if width % config.model.text.num_heads:
      raise ConfigError(f"config.model.{tower}.width={width} is not divisible by "
                        f"config.model.text.num_heads={config.model.text.num_heads} "
                        "(the fusion heads).")
  vision, text = config.model.vision.width, config.model.text.width
  if config.model.fusion == "self_attention" and vision != text:
    raise ConfigError(
        f"config.model.fusion='self_attention' concatenates the two streams: it needs "
        f"config.model.vision.width ({vision}) == config.model.text.width ({text}).")
  if config.data.name == "shapes" and config.data.captions_per_image > SHAPES_CAPTION_TEMPLATES:
    raise ConfigError(f"config.data.captions_per_image={config.data.captions_per_image}: the "
                      f"built-in shapes have {SHAPES_CAPTION_TEMPLATES} caption templates (one "
                      "per caption).")
  twins = config.data.get("shapes_twins", 0.0)
  if twins and config.data.name == "shapes" and config.data.get("shapes_version", 1) == 1:
    raise ConfigError(f"config.data.shapes_twins={twins}: place twins are drawn by the v2 "
                      "renderer; use config.data.shapes_version 2 or 3 with them, or "
                      "shapes_twins=0.")


def check_longnet(config):
  """LongNet's heads and its (segment length, dilation rate) branches."""
  longnet = config.longnet
  if not longnet.depth:
    return
  if longnet.width % longnet.num_heads:
    raise ConfigError(f"config.longnet.width={longnet.width} is not divisible by "
                      f"config.longnet.num_heads={longnet.num_heads}.")
  ws, rs = longnet.segment_lengths, longnet.dilation_rates
  if not ws or len(ws) != len(rs):
    raise ConfigError(f"config.longnet.segment_lengths={tuple(ws)} and "
                      f"config.longnet.dilation_rates={tuple(rs)} must be non-empty and of "
                      "equal length (one (w, r) per branch).")
  for w, r in zip(ws, rs):
    if not (w > 0 and r > 0) or w % r:
      raise ConfigError(f"config.longnet: branch (w={w!r}, r={r!r}) needs positive ints with "
                        f"r dividing w (segment_lengths={tuple(ws)}, "
                        f"dilation_rates={tuple(rs)}).")


def check_prompt_labels(config):
  """The prompt-label templates, stop nouns and length, when a prompt-label loss is on."""
  if not prompts_on(config):
    return
  labels, data_len = config.prompt_labels, config.data.max_text_len
  if labels.max_text_len > data_len:
    raise ConfigError(f"config.prompt_labels.max_text_len={labels.max_text_len} must be >= 3 "
                      f"([CLS] word [SEP]) and <= config.data.max_text_len={data_len} (the text "
                      "tower's positions).")
  if not labels.templates:
    raise ConfigError("config.prompt_labels.templates is empty; give at least one, "
                      "e.g. ('a photo of a {}.',).")
  for i, t in enumerate(labels.templates):
    if t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1:
      raise ConfigError(f"config.prompt_labels.templates[{i}]={t!r} must be a string with "
                        'exactly one "{}" (where the noun goes).')
  for i, w in enumerate(labels.stop_nouns):
    if not re.fullmatch(WORD_PATTERN, w):
      raise ConfigError(f"config.prompt_labels.stop_nouns[{i}]={w!r} is not a word of "
                        "letters a-z.")


def check_losses(config):
  """The contrastive loss against caption negatives, SoftCLIP's beta, distillation."""
  kind = itc_kind(config.loss)
  if kind != "infonce" and negatives_in_itc(config):
    raise ConfigError(f"config.data.caption_negatives (or scene_negatives) join the InfoNCE "
                      f"softmax only; they do not work with config.loss.itc.kind={kind!r}: set "
                      "one of them off, or config.loss.itc_caption_negatives=False.")
  softclip = config.loss.itc.get("softclip")
  if kind == "softclip" and softclip.symmetric_kl and not softclip.beta:
    raise ConfigError("config.loss.itc.softclip.beta=0 with symmetric_kl=True: KL(p || t) is "
                      "infinite against one-hot targets; set beta > 0 or symmetric_kl=False.")
  check_distill(config)


def check_grad_accum(config):
  """Microbatches that split the batch, and the terms that cannot be accumulated."""
  accum, batch = config.get("grad_accum_steps") or 1, config.train.batch_size
  if batch % accum:
    raise ConfigError(f"config.train.batch_size={batch} is not divisible by "
                      f"config.grad_accum_steps={accum}.")
  if accum > 1:
    tags = (itc_kind(config.loss) == "softclip"
            and config.loss.itc.softclip.self_similarity == "tags")
    for on, what in ((config.get("distill", {}).get("teacher"), "config.distill.teacher"),
                     (tags, "config.loss.itc.softclip.self_similarity='tags'")):
      if on:
        raise ConfigError(f"config.grad_accum_steps={accum} does not work with {what} (their "
                          "extra forward passes are not accumulated): set one of them off.")


def check_clustering(config):
  """Prototype counts, the clustering space and the feature queue's rows."""
  clustering, batch = config.clustering, config.train.batch_size
  if clustering.num_prototypes > clustering.max_prototypes:
    raise ConfigError(f"config.clustering.num_prototypes={clustering.num_prototypes} exceeds "
                      f"config.clustering.max_prototypes={clustering.max_prototypes}.")
  if clustering.dim > config.model.embed_dim:
    raise ConfigError(f"config.clustering.dim={clustering.dim} exceeds config.model.embed_dim="
                      f"{config.model.embed_dim}.")
  queue, rows = clustering.queue_size, 2 * batch
  if queue % rows:
    raise ConfigError(
        f"config.clustering.queue_size={queue} must be a multiple of 2 x "
        f"config.train.batch_size={batch} ({rows} rows: each step writes its image and text "
        f"features).")


def check_bytes_of(config):
  """Every array of `_arrays` within MAX_ARRAY_BYTES."""
  check_bytes(config, _arrays(config), MAX_ARRAY_BYTES)
