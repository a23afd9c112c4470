"""The zeroshot_transfer evaluator, on models whose knowledge is known."""
import re

import numpy as np

from clusjax.data.shapes import COLOURS, KINDS
from clusjax.data.shapes_transfer import TRANSFER_RGB, make_transfer_set
from clusjax.eval import EVALUATORS
from configs import clus_base


class ColourOnlyModel:
  """A colour-histogram classifier in the model interface: an image's embedding is
  one-hot on its nearest named colour (the mean of its bright pixels), a text's on
  the colour it names. It knows nothing of kind."""
  tokenizer = None

  def encode_image(self, images):
    out = np.zeros((len(images), len(COLOURS)), np.float32)
    for i, image in enumerate(images):
      bright = image[image.max(-1) > 100].astype(np.float32).mean(0)
      out[i, np.argmin([np.abs(bright - np.array(TRANSFER_RGB[c])).sum() for c in COLOURS])] = 1
    return out

  def encode_text(self, texts):
    out = np.zeros((len(texts), len(COLOURS)), np.float32)
    for i, text in enumerate(texts):
      words = set(re.findall(r"[a-z]+", text))
      out[i, [j for j, c in enumerate(COLOURS) if c in words][0]] = 1
    return out + 1e-3   # never all-zero: the evaluator normalises class embeddings


class OracleModel(ColourOnlyModel):
  """Knows colour and kind: embeddings one-hot over the 40 classes."""

  def __init__(self, kinds):
    self.kinds = kinds   # the true kind of each transfer image, in order

  def encode_image(self, images):
    colour = super().encode_image(images).argmax(-1)
    out = np.zeros((len(images), len(COLOURS) * len(KINDS)), np.float32)
    out[np.arange(len(images)), colour * len(KINDS) + self.kinds[:len(images)]] = 1
    return out

  def encode_text(self, texts):
    colour = super().encode_text(texts).argmax(-1)
    kind = [[j for j, k in enumerate(KINDS) if k in t][0] for t in texts]
    out = np.full((len(texts), len(COLOURS) * len(KINDS)), 1e-3, np.float32)
    out[np.arange(len(texts)), colour * len(KINDS) + np.array(kind)] = 1
    return out


def _run(model, n=200):
  config = clus_base.get_config("tiny")
  config.eval.transfer_examples = n
  return dict(EVALUATORS["zeroshot_transfer"](config).run(model))


def test_colour_only_model_gets_colour_right_and_kind_at_chance():
  got = _run(ColourOnlyModel())
  assert got["num_examples"] == 200
  assert got["colour"] == 1.0
  # Ties over kind go to the first class: kind right for the circles only = 1/5.
  assert got["kind"] == 1 / len(KINDS)
  assert got["accuracy"] == got["kind"]


def test_oracle_model_scores_one_everywhere():
  _, _, kind = make_transfer_set(200, 64, seed=0)
  got = _run(OracleModel(kind))
  assert got == {"num_examples": 200, "accuracy": 1.0, "colour": 1.0, "kind": 1.0}
