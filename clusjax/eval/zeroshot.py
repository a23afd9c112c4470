"""Zero-shot classification on single-shape images: classes = colour x kind.

`zeroshot` classifies the eval split's one-shape images; `zeroshot_transfer` the
same classes drawn by an independent renderer (clusjax/data/shapes_transfer.py),
with colour and kind accuracies apart: a model that learned one renderer's pixels
rather than shapes scores high on the first and low on the second's kind.
"""
import itertools

import numpy as np

from clusjax.data import decode_record, make_source
from clusjax.data.shapes import COLOURS, KINDS, POSITION_PHRASES, SIZES
from clusjax.data.shapes_transfer import make_transfer_set

# A prompt ensemble (CLIP style): each class embedding is the normalised mean
# of its prompts' embeddings. The class (colour x kind) is put into a photo
# template with every size and place, so that the ensemble covers the ways a
# one-shape picture of that class is described; no prompt names the answer's
# size or position.
TEMPLATES = tuple(f"a photo of a {size} {{}} {where}." for size in SIZES
                  for where in POSITION_PHRASES)


def class_names():
  """The 40 classes, "red circle", "red square", ...; index = colour * K + kind."""
  return [f"{c} {k}" for c, k in itertools.product(COLOURS, KINDS)]


def class_embeddings(model, templates=TEMPLATES):
  """[num_classes, E] unit-norm prompt-ensemble embeddings."""
  names = class_names()
  prompts = [t.format(name) for name in names for t in templates]
  emb = model.encode_text(prompts).reshape(len(names), len(templates), -1).mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def single_shape_examples(config, tokenizer, max_examples):
  """(images [N, H, W, 3] uint8, labels [N]) of the eval split's 1-shape images."""
  source = make_source(config.data, config.data.eval_split)
  images, labels = [], []
  for i in range(min(len(source), max_examples)):
    record = source[i]
    if int(record["num_shapes"]) != 1:
      continue
    decoded = decode_record(record, image_size=config.data.image_size, tokenizer=tokenizer,
                            max_text_len=config.data.max_text_len)
    if decoded is None:
      continue
    images.append(decoded["image"])
    labels.append(int(record["colour"][0]) * len(KINDS) + int(record["kind"][0]))
  return np.stack(images), np.asarray(labels)


class ZeroShotEvaluator:
  """Top-1 accuracy over the 40 colour x kind classes (chance 0.025)."""
  name = "zeroshot"

  def __init__(self, config):
    self.config = config

  def run(self, model):
    images, labels = single_shape_examples(self.config, model.tokenizer,
                                           self.config.eval.num_examples)
    logits = model.encode_image(images) @ class_embeddings(model).T
    yield "num_examples", len(labels)
    yield "accuracy", float(np.mean(np.argmax(logits, axis=1) == labels))


class TransferEvaluator:
  """Zero-shot top-1 over the 40 colour x kind classes on images of another renderer
  (config.eval.transfer_examples of them, half at the centre and large, half at
  random places and sizes), and the colour and kind of the top class apart:
  `accuracy`, `colour` (chance 1/8), `kind` (chance 1/5)."""
  name = "zeroshot_transfer"

  def __init__(self, config):
    self.config = config

  def run(self, model):
    images, colour, kind = make_transfer_set(self.config.eval.transfer_examples,
                                             self.config.data.image_size,
                                             seed=self.config.data.seed)
    logits = np.asarray(model.encode_image(images)) @ class_embeddings(model).T
    pred_colour, pred_kind = np.divmod(np.argmax(logits, axis=1), len(KINDS))
    yield "num_examples", len(images)
    yield "accuracy", float(np.mean((pred_colour == colour) & (pred_kind == kind)))
    yield "colour", float(np.mean(pred_colour == colour))
    yield "kind", float(np.mean(pred_kind == kind))
