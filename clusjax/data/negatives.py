"""Hard negative captions by swapping one word (NegCLIP, Yuksekgonul et al. 2023).

A caption's negative is the caption with one word replaced by another word of
the same group, e.g. groups ("circle square triangle",) turn "a red circle on
the left" into "a red triangle on the left". ITC contrasts each image with its
caption's negative too (`negative_logits` of `clusjax.losses.infonce_from_logits`),
so the model has to read the swapped attribute. In-batch negatives rarely differ in
one attribute only; when another attribute always tells the pairs apart (on
the built-in shapes: colour, size and position), a contrastive model never
learns the redundant one (the kind of a shape) without them. The groups come
from `config.data.caption_negatives`, parsed by
`clusjax.config.caption_negative_groups`.

On the built-in shapes a one-word swap makes one kind of near miss; what ITM
re-ranking still gets wrong there is mostly another scene with one shape more
or fewer, or the same attributes bound to other shapes (docs/experiments.md,
"Hard negatives for ITM"). `SCENE` in place of word groups
(`config.data.scene_negatives`) makes each caption's negative the caption of such a
scene (`scene_negative`): two shapes' colour, kind or size swapped, a shape dropped,
added, changed or moved, worded by the caption's own template.

The swap is drawn from `np.random.default_rng([seed, index])`: example `index`
gets the same negative on every read, so a resumed run sees the same batches.
"""
import re

import numpy as np

from clusjax.config import SCENE_NEGATIVES as SCENE
from clusjax.config import WORD_PATTERN
from clusjax.data import shapes

_WORD = re.compile(WORD_PATTERN)
_SHAPE = re.compile(r"\ba (%s) (%s) (%s)\b" % tuple(
    "|".join(words) for words in (shapes.SIZES, shapes.COLOURS, shapes.KINDS)))
_PLACE = re.compile("|".join(re.escape(p) for p in shapes.POSITION_PHRASES))
_BACKGROUND_WORDS = ("black", "white")
_ATTRIBUTES = (shapes.SIZES, shapes.COLOURS, shapes.KINDS)   # an item: (size, colour, kind, place)
SCENE_EDITS = ("bind", "drop", "add", "change", "move")


def swap_word(caption, groups, rng):
  """`caption` with one of its group words replaced by another of its group.

  The word is uniform over the caption's occurrences of group words, the
  replacement uniform over the rest of that group; a capitalised word stays
  capitalised. Returns None when the caption has no group word.
  """
  group_of = {w: g for g, words in enumerate(groups) for w in words}
  found = [m for m in _WORD.finditer(caption) if m.group(0).lower() in group_of]
  if not found:
    return None
  m = found[rng.integers(len(found))]
  word = m.group(0).lower()
  others = [w for w in groups[group_of[word]] if w != word]
  new = others[rng.integers(len(others))]
  if m.group(0)[0].isupper():
    new = new.capitalize()
  return caption[:m.start()] + new + caption[m.end():]


def _render(template, items, background):
  size, colour, kind, place = zip(*items)
  return shapes.template_caption(template, shapes.described_items(kind, colour, size, place),
                                 background)


def parse_scene_caption(caption):
  """(template, background word, items) of a built-in shapes caption, items
  [(size, colour, kind, place)] as indices in the caption's order; None for any
  caption the shapes grammar does not produce (another data set, a clipped one)."""
  found, places = list(_SHAPE.finditer(caption)), _PLACE.findall(caption)
  if not found or len(found) != len(places):
    return None
  items = [tuple(words.index(m.group(a + 1)) for a, words in enumerate(_ATTRIBUTES))
           + (shapes.POSITION_PHRASES.index(place),) for m, place in zip(found, places)]
  for template in range(shapes.NUM_TEMPLATES):
    for background in _BACKGROUND_WORDS:
      if _render(template, items, background) == caption:
        return template, background, items
  return None


def _edit(items, edit, rng):
  """`items` after one `edit` (SCENE_EDITS); None when the edit cannot apply."""
  items = [list(item) for item in items]
  free = [p for p in range(len(shapes.POSITIONS)) if p not in {it[3] for it in items}]
  if edit == "bind":   # one attribute of two shapes swapped: the same words, other bindings
    pairs = [(a, i, j) for a in range(3) for i in range(len(items)) for j in range(i)
             if items[i][a] != items[j][a]]
    if not pairs:
      return None
    a, i, j = pairs[rng.integers(len(pairs))]
    items[i][a], items[j][a] = items[j][a], items[i][a]
  elif edit == "drop":
    if len(items) < 2:
      return None
    del items[rng.integers(len(items))]
  elif edit == "add":
    if len(items) >= shapes.MAX_SHAPES or not free:
      return None
    new = [int(rng.integers(len(words))) for words in _ATTRIBUTES] + [free[rng.integers(len(free))]]
    items.insert(int(rng.integers(len(items) + 1)), new)
  elif edit == "change":
    i, a = rng.integers(len(items)), rng.integers(3)
    others = [v for v in range(len(_ATTRIBUTES[a])) if v != items[i][a]]
    items[i][a] = others[rng.integers(len(others))]
  else:   # move
    if not free:
      return None
    items[rng.integers(len(items))][3] = free[rng.integers(len(free))]
  return [tuple(item) for item in items]


def scene_negative(caption, rng):
  """The caption of a scene near `caption`'s, never the same one: an edit drawn
  uniformly from those that apply (SCENE_EDITS), worded by `caption`'s template.
  None when `caption` is not a built-in shapes caption (`parse_scene_caption`)."""
  parsed = parse_scene_caption(caption)
  if parsed is None:
    return None
  template, background, items = parsed
  for edit in rng.permutation(SCENE_EDITS):
    edited = _edit(items, edit, rng)
    if edited is not None:
      return _render(template, edited, background)
  return None


def negative_caption(caption, groups, seed, index):
  """The negative of example `index`'s caption (None when nothing can be swapped);
  `groups`: word groups (`swap_word`) or SCENE (`scene_negative`)."""
  rng = np.random.default_rng([seed, index])
  return scene_negative(caption, rng) if groups == SCENE else swap_word(caption, groups, rng)
