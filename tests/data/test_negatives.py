"""Hard negative captions: one word swapped within its group, deterministic per example."""
import re

import numpy as np
import pytest

from clusjax import data
from clusjax.config import ConfigError, caption_negative_groups
from clusjax.data import shapes
from clusjax.data.negatives import negative_caption, swap_word
from tests.conftest import CaptionSource

KINDS = caption_negative_groups((" ".join(shapes.KINDS),))
TWO = caption_negative_groups(("circle square triangle", "red blue"))


def _diff(a, b):
  """The (old, new) word pairs where two captions differ (same word count)."""
  wa, wb = re.findall(r"\w+|\W+", a), re.findall(r"\w+|\W+", b)
  assert len(wa) == len(wb), (a, b)
  return [(x, y) for x, y in zip(wa, wb) if x != y]


def test_swap_changes_exactly_one_word_within_its_group():
  rng = np.random.default_rng(0)
  caption = "a small red circle on the left and a large blue square at the top."
  seen = set()
  for _ in range(200):
    neg = swap_word(caption, TWO, rng)
    (old, new), = _diff(caption, neg)
    group = next(g for g in TWO if old in g)
    assert new in group and new != old
    seen.add((old, new))
  # Every occurrence and every replacement is drawn: 4 words x their others.
  assert len(seen) == 2 + 2 + 1 + 1


def test_no_group_word_gives_none_and_case_is_kept():
  rng = np.random.default_rng(0)
  assert swap_word("a dog on a mat", KINDS, rng) is None
  # Whole words only: "squares" and "crossing" are not "square" and "cross".
  assert swap_word("squares crossing", KINDS, rng) is None
  neg = swap_word("Circle.", KINDS, rng)
  assert neg[0].isupper() and neg[1:] != "ircle." and neg.lower()[:-1] in KINDS[0]


def test_negative_is_a_function_of_seed_and_index():
  cap = shapes.make_split("train", 1, 32)["captions"][0]
  a = [negative_caption(cap, KINDS, 0, i) for i in range(20)]
  assert a == [negative_caption(cap, KINDS, 0, i) for i in range(20)]
  assert len(set(a)) > 1
  assert a != [negative_caption(cap, KINDS, 1, i) for i in range(20)]


@pytest.mark.parametrize("groups,message", [
    ("circle square", "must be a tuple of strings"),
    (("circle",), r"\[0\]='circle' needs at least two distinct words"),
    (("circle circle",), "needs at least two distinct words"),
    (("circle sq-uare",), "'sq-uare' is not a word"),
    (("circle square", "red square"), "'square' is in group 0 and in group 1"),
    ((3,), r"\[0\]=3 must be a string"),
])
def test_bad_groups_name_the_key(groups, message):
  with pytest.raises(ConfigError, match=r"config\.data\.caption_negatives.*" + message):
    caption_negative_groups(groups)


def test_train_batches_carry_the_negatives(tmp_path):
  captions = shapes.make_split("train", 15, 16)["captions"] + ["nothing to swap here"]
  tok = data.Tokenizer.train(captions * 4, tmp_path / "t.model", 128)
  it = data.make_train_iterator(CaptionSource(captions), global_batch_size=16, seed=5,
                                image_size=8, tokenizer=tok, max_text_len=40,
                                negative_groups=KINDS)
  batch = next(it)
  assert batch["neg_text_ids"].shape == batch["text_ids"].shape == (16, 40)
  assert batch["neg_valid"].dtype == bool
  for i in range(16):
    index = int(batch["image"][i, 0, 0, 0])
    expected = negative_caption(captions[index], KINDS, 5, index)
    if expected is None:
      assert index == 15 and not batch["neg_valid"][i] and not batch["neg_text_mask"][i].any()
      continue
    assert batch["neg_valid"][i]
    n = batch["neg_text_mask"][i].sum()
    want = tok.encode_one(expected, 40)[0][:n]
    assert tok.decode(batch["neg_text_ids"][i][:n]) == tok.decode(want)
    assert tok.decode(batch["neg_text_ids"][i][:n]) != tok.decode(batch["text_ids"][i][:n])
  assert not batch["neg_valid"].all()
