"""Hard negative captions: one word swapped within its group, or another scene's caption
(built-in shapes); deterministic per example."""
import re

import numpy as np
import pytest

from clusjax import data
from clusjax.config import ConfigError, caption_negative_groups
from clusjax.data import shapes
from clusjax.data.negatives import (SCENE, SCENE_EDITS, negative_caption, parse_scene_caption,
                                     swap_word)
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


def _scene(items):
  """A parsed caption's items as shapes.scene_key's scene."""
  return shapes.scene_key({k: [it[a] for it in items] for a, k in
                           enumerate(("size", "colour", "kind", "position"))})


def test_scene_captions_parse_back_in_every_template_and_background():
  rng = np.random.default_rng(0)
  seen = set()
  for i in range(300):
    n = int(rng.integers(1, shapes.MAX_SHAPES + 1))
    attrs = {k: rng.permutation(len(v))[:n] if k == "position" else rng.integers(0, len(v), n)
             for k, v in (("kind", shapes.KINDS), ("colour", shapes.COLOURS),
                          ("size", shapes.SIZES), ("position", shapes.POSITIONS))}
    background = ("black", "white")[i % 2]
    for caption in shapes.caption_variants(attrs["kind"], attrs["colour"], attrs["size"],
                                           attrs["position"], i, 2, background):
      template, word, items = parse_scene_caption(caption)
      seen.add(template)
      assert _scene(items) == shapes.scene_key(attrs)
      assert word == background or template != shapes.NUM_TEMPLATES - 1   # only it says it
  assert seen == set(range(shapes.NUM_TEMPLATES))
  for caption in ("a dog on a mat", "a small red circle.", "a small red circle on the left",
                  "a small red circle on the left and a small red circle"):
    assert parse_scene_caption(caption) is None, caption


def test_scene_negative_is_another_nearby_scene_worded_alike():
  """Each edit does what it says, and the negative is never the caption's own scene."""
  split = shapes.make_split("train", 200, 16)
  counts = dict.fromkeys(SCENE_EDITS, 0)
  for i, caption in enumerate(split["captions"]):
    negative = negative_caption(caption, SCENE, 0, i)
    template, word, items = parse_scene_caption(caption)
    neg_template, neg_word, neg_items = parse_scene_caption(negative)
    assert (neg_template, neg_word) == (template, word)
    assert _scene(neg_items) != _scene(items)
    places = {it[3] for it in items}
    if len(neg_items) == len(items) - 1:
      edit = "drop"
      assert set(neg_items) < set(items)
    elif len(neg_items) == len(items) + 1:
      edit = "add"
      assert set(items) < set(neg_items)
    elif [it[3] for it in neg_items] != [it[3] for it in items]:
      edit = "move"   # one shape elsewhere, to a free place
      moved = [(a, b) for a, b in zip(items, neg_items) if a != b]
      assert len(moved) == 1 and moved[0][0][:3] == moved[0][1][:3]
      assert moved[0][1][3] not in places
    elif sum(a != b for a, b in zip(items, neg_items)) == 1:
      edit = "change"   # one attribute of one shape
      (a, b), = [(a, b) for a, b in zip(items, neg_items) if a != b]
      assert sum(x != y for x, y in zip(a, b)) == 1
    else:
      edit = "bind"   # the same attribute values, bound to other shapes
      for attr in range(3):
        assert sorted(it[attr] for it in items) == sorted(it[attr] for it in neg_items)
    counts[edit] += 1
  assert min(counts.values()) >= 15, counts
  assert negative_caption("a dog on a mat", SCENE, 0, 0) is None
  assert [negative_caption(c, SCENE, 0, i) for i, c in enumerate(split["captions"][:20])] == [
      negative_caption(c, SCENE, 0, i) for i, c in enumerate(split["captions"][:20])]


def test_scene_negatives_are_checked(shapes_data_dir):
  from tests.conftest import micro_config
  from clusjax.config import validate
  config = micro_config(shapes_data_dir, data__scene_negatives=True,
                        data__caption_negatives=("circle square",))
  with pytest.raises(ConfigError, match=r"config\.data\.scene_negatives=True and "
                     r"config\.data\.caption_negatives=\('circle square',\) both"):
    validate(config)
  config = micro_config(shapes_data_dir, data__scene_negatives=True,
                        loss__itc_caption_negatives=False)
  with pytest.raises(ConfigError, match=r"config\.loss\.itc_caption_negatives=False leaves "
                     r".*itm_caption_negatives is False"):
    validate(config)
  config.loss.itm_caption_negatives = True
  validate(config)
  for share, message in ((0.0, "must be in \\(0, 1\\]"), (1.5, "must be in \\(0, 1\\]")):
    config.loss.caption_negative_share = share
    with pytest.raises(ConfigError, match=rf"config\.loss\.caption_negative_share={share} "
                       + message):
      validate(config)
  config.loss.caption_negative_share, config.grad_accum_steps = 0.5, 2
  with pytest.raises(ConfigError, match=r"caption_negative_share=0\.5 keeps the first rows'"):
    validate(config)
