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

The swap is drawn from `np.random.default_rng([seed, index])`: example `index`
gets the same negative on every read, so a resumed run sees the same batches.
"""
import re

import numpy as np

from clusjax.config import WORD_PATTERN

_WORD = re.compile(WORD_PATTERN)


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


def negative_caption(caption, groups, seed, index):
  """The negative of example `index`'s caption (None when nothing can be swapped)."""
  return swap_word(caption, groups, np.random.default_rng([seed, index]))
