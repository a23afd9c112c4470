"""Two-image statement verification (NLVR2-style): sources of statement records.

A record is `{"image": <left>, "image2": <right>, "caption": <statement>,
"label": 1 if the statement is true of the pair else 0, "statement_type":
str}`; each image is PNG/JPEG bytes, a uint8 [H, W, 3] array or None.

Sources: `ShapesNlvrSource` (statements about two captioned-shapes images
whose truth needs both images) and `Nlvr2JsonlSource`.
"""
import os

import numpy as np

from clusjax.data import shapes
from clusjax.data.damage import JsonlLines
from clusjax.data.sources import read_image_bytes
from clusjax.data.vqa import article

STATEMENT_TYPES = ("more_colour", "both_kind", "neither_kind", "same_count",
                   "only_one_kind", "more_shapes")
# Statements drawn per right image, right images per statement type, and types
# tried before giving up on the target label (the statement is then kept with
# its true label, so a label is never wrong).
_STATEMENT_TRIES = 4
_RIGHT_TRIES = 16
_TYPE_TRIES = 8


def _summary(record):
  """(number of shapes, [colour index per shape], {kind indices}) of a shapes record."""
  present = np.asarray(record["position"]) >= 0
  colours = [int(c) for c in np.asarray(record["colour"])[present]]
  kinds = {int(k) for k in np.asarray(record["kind"])[present]}
  return len(colours), colours, kinds


def shapes_statement(qtype, left, right, rng):
  """A statement of type `qtype` about two shapes records, and whether it holds.

  Args:
    qtype: one of STATEMENT_TYPES.
    left, right: captioned-shapes records (kind/colour/position int32 [3], -1 absent).
    rng: np.random.Generator for the statement's free words (colour, kind, ...).
  Returns:
    (statement str, truth bool).
  """
  nl, cl, kl = _summary(left)
  nr, cr, kr = _summary(right)
  # Kinds / colours are drawn from those in either image: a random one would
  # make "both ..." and "exactly one ..." almost always false.
  kinds = sorted(kl | kr)
  colours = sorted(set(cl) | set(cr))
  if qtype == "more_colour":
    c = colours[int(rng.integers(len(colours)))]
    a, b = cl.count(c), cr.count(c)
    if rng.integers(2):
      return f"the left image has more {shapes.COLOURS[c]} shapes than the right one.", a > b
    return f"the left image has fewer {shapes.COLOURS[c]} shapes than the right one.", a < b
  if qtype == "both_kind":
    k = kinds[int(rng.integers(len(kinds)))]
    return f"both images contain {article(shapes.KINDS[k])}.", k in kl and k in kr
  if qtype == "neither_kind":
    # Any colour: absent from both about half the time with 2-6 shapes in view.
    c = int(rng.integers(len(shapes.COLOURS)))
    return (f"neither image contains {article(shapes.COLOURS[c])} shape.",
            c not in cl and c not in cr)
  if qtype == "same_count":
    return "the two images have the same number of shapes.", nl == nr
  if qtype == "only_one_kind":
    k = kinds[int(rng.integers(len(kinds)))]
    return f"exactly one of the images contains {article(shapes.KINDS[k])}.", (k in kl) != (k in kr)
  if qtype == "more_shapes":
    return "the left image has more shapes than the right image.", nl > nr
  raise ValueError(f"statement type {qtype!r} is unknown; use one of {STATEMENT_TYPES}")


class ShapesNlvrSource:
  """Statements about pairs of captioned-shapes images.

  Example i: left image i % n, a target label alternating with i, then from
  `np.random.default_rng([seed, i])` a statement type and a random other
  right image; statements of that type are redrawn (then the right image,
  then the type) until one has the target truth value, so labels are
  balanced and every type occurs true and false.
  Extra keys: image_index, image2_index (indices into the wrapped source).
  """

  def __init__(self, shapes_source, num_examples=None, seed=0):
    if len(shapes_source) < 2:
      raise ValueError(f"ShapesNlvrSource needs >= 2 images to pair, the source has "
                       f"{len(shapes_source)}")
    if num_examples is not None and int(num_examples) < 0:
      raise ValueError(f"num_examples={num_examples} must be >= 0 (or None for one per image)")
    self._source = shapes_source
    self.num_examples = len(shapes_source) if num_examples is None else int(num_examples)
    self.seed = int(seed)

  def __len__(self):
    return self.num_examples

  def _right(self, left, rng):
    r = int(rng.integers(len(self._source) - 1))
    return r + 1 if r >= left else r  # any index but `left`

  def __getitem__(self, index):
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a source of {len(self)} records")
    left_i = index % len(self._source)
    left = self._source[left_i]
    qtype, right_i, right, statement, truth = self._draw(index, left_i, left)
    return {"image": left["image"], "image2": right["image"], "caption": statement,
            "label": int(truth), "statement_type": qtype,
            "image_index": left_i, "image2_index": right_i}

  def _draw(self, index, left_i, left):
    """(statement type, right index, right record, statement, truth) of example `index`."""
    rng = np.random.default_rng([self.seed, index])
    # Alternating labels balance any run of examples; flipping the parity on
    # each pass over the images keeps a left image from always having one label.
    target = bool((left_i + index // len(self._source)) % 2)
    # Some targets are impossible for a left image whatever the right one
    # ("more shapes" when it has one): then another type is drawn.
    for _ in range(_TYPE_TRIES):
      qtype = STATEMENT_TYPES[int(rng.integers(len(STATEMENT_TYPES)))]
      for _ in range(_RIGHT_TRIES):
        right_i = self._right(left_i, rng)
        right = self._source[right_i]
        for _ in range(_STATEMENT_TRIES):
          statement, truth = shapes_statement(qtype, left, right, rng)
          if truth == target:
            return qtype, right_i, right, statement, truth
    # Never reached: the last statement is kept with its true label.
    return qtype, right_i, right, statement, truth


# ---------------------------------------------------------------------------
# JSONL.

_TRUE = ("true", "1")
_FALSE = ("false", "0")


def _parse_label(value, where):
  """bool, 0/1 or "True"/"False" (any case) -> 0/1."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int) and value in (0, 1):
    return value
  if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
    return int(value.strip().lower() in _TRUE)
  raise ValueError(f"{where}: \"label\" must be true/false, \"True\"/\"False\" or 0/1, "
                   f"got {value!r}")


class Nlvr2JsonlSource:
  """Records from JSONL lines `{"left": <path>, "right": <path>, "sentence": <str>, "label": ...}`.

  label: bool, "True"/"False" or 0/1; "statement_type" optional ("" when
  absent). Image paths are relative to the JSONL's folder (or absolute). The
  file is parsed at construction, damaged lines skipped and counted in
  `skipped` as JsonlSource's; images are read lazily, a missing one gives None.
  """

  _HINT = '{"left": <path>, "right": <path>, "sentence": <text>, "label": true/false}'

  def __init__(self, path):
    self.path = os.fspath(path)
    self._items = []  # [(left path, right path, sentence, label, statement_type)]
    lines = JsonlLines(self.path, ("left", "right", "sentence", "label"), self._HINT)
    for where, entry in lines:
      try:   # a bad line is counted; too many raise (clusjax.data.damage)
        left, right = (lines.image_path(entry, k, where) for k in ("left", "right"))
        sentence = lines.text(entry["sentence"], "sentence", where)
        label = _parse_label(entry["label"], where)
      except ValueError as e:
        lines.skip("bad_fields", where, str(e))
        continue
      self._items.append((left, right, sentence, label, str(entry.get("statement_type", ""))))
    self.skipped = lines.done(len(self._items))

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index):
    left, right, sentence, label, stype = self._items[index]
    return {"image": read_image_bytes(left), "image2": read_image_bytes(right),
            "caption": sentence, "label": label, "statement_type": stype,
            "image_path": left, "image2_path": right}
