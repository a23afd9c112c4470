"""Prompt-template labels: nouns found without a tagger, labels fixed per example."""
import numpy as np
import pytest

from clusjax import data
from clusjax.config import ConfigError, validate
from clusjax.data import shapes
from clusjax.data.prompts import PromptLabeler, caption_tags, find_nouns, noun_id, tagger_from_config
from configs import clus_base
from tests.conftest import CaptionSource

STOP = ("photo", "picture", "image", "background")
TEMPLATES = ("a photo of a {}.", "a {}.")


def test_nouns_of_shapes_captions_are_their_kinds():
  split = shapes.make_split("train", 300, 32)
  for i, caption in enumerate(split["captions"]):
    kinds = [shapes.KINDS[k] for k in split["kind"][i] if k >= 0]
    assert find_nouns(caption, STOP) == list(dict.fromkeys(kinds)), caption


def test_phrases_and_tags_of_shapes_captions_are_their_shapes():
  split = shapes.make_split("train", 300, 32)
  for i, caption in enumerate(split["captions"]):
    described = [f"{shapes.SIZES[s]} {shapes.COLOURS[c]} {shapes.KINDS[k]}"
                 for k, c, s in zip(split["kind"][i], split["colour"][i], split["size"][i])
                 if k >= 0]
    assert find_nouns(caption, STOP, phrases=True) == list(dict.fromkeys(described)), caption
    assert caption_tags(caption, STOP) == ", ".join(dict.fromkeys(described))


def test_phrases_of_other_captions():
  assert find_nouns("A black background with an old man riding a brown horse.", STOP,
                    phrases=True) == ["old man", "brown horse"]
  # Labels come from the nouns and their phrases.
  labeler = PromptLabeler(("a photo of a {}.",), 2, 3, 10, STOP, phrases=True)
  texts, label_noun, caption_nouns = labeler("two red dogs in the snow.", 0)
  assert sorted(texts) == ["a photo of a dogs.", "a photo of a red dogs."]
  assert sorted(label_noun) == sorted([noun_id("dogs"), noun_id("red dogs")])
  assert list(caption_nouns) == [noun_id("dogs"), noun_id("red dogs"), 0]


@pytest.mark.parametrize("caption,nouns", [
    ("A man riding a horse on the beach.", ["man", "horse"]),
    ("Two dogs playing in the snow", ["dogs"]),
    ("A plate of food with a fork.", ["plate", "fork"]),
    ("a sleeping cat next to a building", ["cat", "building"]),
    ("a photo of a red bus", ["bus"]),
    ("the sky", []),
])
def test_nouns_of_other_captions(caption, nouns):
  assert find_nouns(caption, STOP) == nouns


def test_labels_are_a_function_of_caption_seed_and_index():
  labeler = PromptLabeler(TEMPLATES, num_nouns=2, max_nouns=4, max_text_len=8, stop_nouns=STOP)
  caption = "there is a small red circle on the left, a large blue square at the top."
  draws = [labeler(caption, i) for i in range(30)]
  again = [labeler(caption, i) for i in range(30)]
  for (t1, n1, c1), (t2, n2, c2) in zip(draws, again):
    assert t1 == t2 and (n1 == n2).all() and (c1 == c2).all()
  ids = {noun_id("circle"), noun_id("square")}
  texts = set()
  for t, label_noun, caption_nouns in draws:
    assert set(caption_nouns[:2]) == ids and not caption_nouns[2:].any()
    assert set(label_noun) == ids   # two nouns, two labels: both, in either order
    for text, n in zip(t, label_noun):
      noun = "circle" if n == noun_id("circle") else "square"
      assert text in {tmpl.format(noun) for tmpl in TEMPLATES}
    texts.update(t)
  assert len(texts) == 4   # every template with every noun is drawn
  other_seed = PromptLabeler(TEMPLATES, 2, 4, 8, STOP, seed=1)
  assert [other_seed(caption, i)[0] for i in range(30)] != [d[0] for d in draws]


def test_fewer_nouns_than_labels_leaves_empty_slots():
  labeler = PromptLabeler(TEMPLATES, num_nouns=3, max_nouns=4, max_text_len=8, stop_nouns=STOP)
  texts, label_noun, caption_nouns = labeler("an image with a cross.", 0)
  assert texts[1:] == ["", ""] and texts[0] in ("a photo of a cross.", "a cross.")
  assert list(label_noun) == [noun_id("cross"), 0, 0]
  assert list(caption_nouns) == [noun_id("cross"), 0, 0, 0]
  texts, label_noun, _ = labeler("nothing here", 0)
  assert texts == ["", "", ""] and not label_noun.any()


def test_train_batches_carry_the_labels(tmp_path):
  captions = shapes.make_split("train", 15, 16)["captions"] + ["nothing to label"]
  tok = data.Tokenizer.train(captions * 4, tmp_path / "t.model", 128)
  labeler = PromptLabeler(TEMPLATES, num_nouns=2, max_nouns=3, max_text_len=10,
                          stop_nouns=STOP, seed=5)
  config = clus_base.get_config("tiny")
  config.loss.itc.kind, config.loss.itc.softclip.self_similarity = "softclip", "tags"
  tagger = tagger_from_config(config)
  it = data.make_train_iterator(CaptionSource(captions), global_batch_size=16, seed=5,
                                image_size=8, tokenizer=tok, max_text_len=40,
                                prompt_labeler=labeler, tagger=tagger)
  batch = next(it)
  assert batch["tag_ids"].shape == batch["tag_mask"].shape == (16, 40)
  assert batch["label_ids"].shape == batch["label_mask"].shape == (16, 2, 10)
  assert batch["label_noun"].shape == (16, 2) and batch["caption_nouns"].shape == (16, 3)
  for i in range(16):
    index = int(batch["image"][i, 0, 0, 0])
    texts, label_noun, caption_nouns = labeler(captions[index], index)
    np.testing.assert_array_equal(batch["label_noun"][i], label_noun)
    np.testing.assert_array_equal(batch["caption_nouns"][i], caption_nouns)
    for slot, text in enumerate(texts):
      row, mask = batch["label_ids"][i, slot], batch["label_mask"][i, slot]
      if not text:
        assert not mask.any()
        continue
      assert tok.decode(row[mask]) == tok.decode(tok.encode_one(text, 10)[0])
    tags = caption_tags(captions[index], config.prompt_labels.stop_nouns)
    assert batch["tag_mask"][i].any() == bool(tags)   # "nothing to label": no tags, all padding
    if tags:
      assert tok.decode(batch["tag_ids"][i][batch["tag_mask"][i]]) == [tags]
  assert not batch["label_noun"].all()   # "nothing to label" and 1-noun captions


@pytest.mark.parametrize("key,value,message", [
    ("templates", ("a photo of a thing.",), r"templates\[0\].*exactly one"),
    ("templates", (), "templates is empty"),
    ("num_nouns", 0, "num_nouns=0 must be > 0"),
    ("stop_nouns", ("ph0to",), r"stop_nouns\[0\]='ph0to' is not a word"),
    ("max_text_len", 2, "max_text_len=2 must be >= 3"),
    ("max_text_len", 33, r"max_text_len=33 must be .* <= config\.data\.max_text_len=32"),
])
def test_bad_prompt_label_config_names_the_key(key, value, message):
  c = clus_base.get_config("tiny")
  c.prompt_labels[key] = value
  with pytest.raises(ConfigError, match=r"config\.prompt_labels\." + message):
    validate(c)
  c.loss.prompt_weight = c.loss.noun_code_weight = c.loss.noun_code_text_weight = 0.0   # off
  validate(c)
