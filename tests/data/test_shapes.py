"""The captioned-shapes generator and its TFDS builder."""
import io
import os
import re
import time

import numpy as np
import PIL.Image
import pytest

from clusjax.data import shapes, shapes_tfds
from clusjax.data.shapes import COLOUR_RGB, COLOURS, KINDS, POSITIONS, SIZES

S = 32


@pytest.fixture(scope="module")
def split():
  """v1 (pure colours, fixed masks): the pixel tests below read its exact colours;
  tests/data/test_shapes_v2.py covers the v2 renderer."""
  return shapes.make_split("train", 200, S, version=1)


def test_deterministic_and_prefix_stable():
  a = shapes.make_split("val", 40, S, seed=3)
  b = shapes.make_split("val", 40, S, seed=3)
  prefix = shapes.make_split("val", 10, S, seed=3)
  for key in ("images", "num_shapes", "kind", "colour", "size", "position"):
    np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a[key][:10], prefix[key])
  assert a["captions"] == b["captions"] and a["captions"][:10] == prefix["captions"]


def test_splits_and_seeds_differ():
  base = shapes.make_split("train", 20, S)
  for other in (shapes.make_split("test", 20, S), shapes.make_split("train", 20, S, seed=1)):
    # Each example is a fresh draw: (almost) none coincide.
    same = sum(np.array_equal(x, y) for x, y in zip(base["images"], other["images"]))
    assert same <= 2
    assert base["captions"] != other["captions"]


def test_shapes_and_dtypes(split):
  n = 200
  assert split["images"].shape == (n, S, S, 3) and split["images"].dtype == np.uint8
  assert split["num_shapes"].shape == (n,) and split["num_shapes"].dtype == np.int32
  for key in ("kind", "colour", "size", "position"):
    assert split[key].shape == (n, 3) and split[key].dtype == np.int32
  assert len(split["captions"]) == n
  assert set(split["num_shapes"].tolist()) == {1, 2, 3}


def test_attributes_padded_and_positions_distinct(split):
  for i, k in enumerate(split["num_shapes"]):
    for key, vocab in (("kind", KINDS), ("colour", COLOURS), ("size", SIZES),
                       ("position", POSITIONS)):
      assert np.all(split[key][i, k:] == -1)
      assert np.all((0 <= split[key][i, :k]) & (split[key][i, :k] < len(vocab)))
    assert len(set(split["position"][i, :k].tolist())) == k


def test_captions_name_every_shape_fully(split):
  kind_words = re.compile(r"\b(" + "|".join(KINDS) + r")\b")
  for i, caption in enumerate(split["captions"]):
    assert caption == caption.lower() and caption.isascii() and caption.endswith(".")
    k = split["num_shapes"][i]
    for j in range(k):
      phrase = (f"{SIZES[split['size'][i, j]]} {COLOURS[split['colour'][i, j]]} "
                f"{KINDS[split['kind'][i, j]]}")
      assert phrase in caption, (phrase, caption)
      assert shapes.POSITION_PHRASES[split["position"][i, j]] in caption, caption
    # No shape is mentioned that is not in the image.
    assert len(kind_words.findall(caption)) == k, caption
    assert sum(caption.count(p) for p in shapes.POSITION_PHRASES) == k, caption


def test_at_least_five_caption_templates(split):
  words = set(KINDS + COLOURS + SIZES) | {w for p in shapes.POSITION_PHRASES for w in p.split()}
  skeletons = {" ".join("X" if w.strip(".,;") in words else w for w in c.split())
               for c, k in zip(split["captions"], split["num_shapes"]) if k == 1}
  assert len(skeletons) >= 5, skeletons


def test_pixels_match_attributes(split):
  rgb = {c: np.array(v, np.uint8) for c, v in enumerate(COLOUR_RGB)}
  area = {0: [], 1: []}
  for i, image in enumerate(split["images"]):
    k = split["num_shapes"][i]
    colours = {tuple(c) for c in image.reshape(-1, 3)} - {(0, 0, 0)}
    assert colours == {COLOUR_RGB[c] for c in split["colour"][i, :k]}
    outside = np.ones((S, S), bool)
    for j in range(k):
      y0, y1, x0, x1 = shapes.cell_bounds(split["position"][i, j], S)
      cell = image[y0:y1, x0:x1]
      on = np.all(cell == rgb[split["colour"][i, j]], -1)
      # The shape's cell holds only its colour and black, and the shape is
      # visible (not clipped to nothing) and away from the cell's border.
      assert np.all(on | np.all(cell == 0, -1))
      assert on.sum() >= 5
      assert not on[0].any() and not on[-1].any() and not on[:, 0].any() and not on[:, -1].any()
      outside[y0:y1, x0:x1] = False
      area[split["size"][i, j]].append(on.sum())
    assert not image[outside].any()  # nothing drawn outside the shapes' cells
  assert np.mean(area[0]) * 1.6 < np.mean(area[1])  # small is clearly smaller


def test_sizes_and_kinds_look_different():
  assert shapes.half_extents(32) == (2, 3) and shapes.half_extents(64) == (5, 9)
  # Each kind at the small 32 px size (5 px wide) and larger: all masks differ.
  for e in (2, 3, 9):
    dy, dx = np.mgrid[-e - 1:e + 2, -e - 1:e + 2]
    masks = [shapes._shape_mask(k, dy, dx, e) for k in range(len(KINDS))]  # pylint: disable=protected-access
    for a in range(len(masks)):
      assert masks[a].any() and np.array_equal(masks[a], masks[a][:, ::-1])  # left-right symmetric
      for b in range(a):
        assert (masks[a] != masks[b]).sum() >= 4, (e, KINDS[a], KINDS[b])


def test_too_small_image_raises():
  with pytest.raises(ValueError, match="15"):
    shapes.make_split("train", 2, 15)
  with pytest.raises(ValueError, match="nope"):
    shapes.make_split("nope", 2, 32)


def test_tfds_builder_matches_make_split(tmp_path):
  counts = {"train": 32, "val": 8, "test": 8}
  builder = shapes_tfds.prepare_shapes(str(tmp_path), image_size=S, num_train=32, num_val=8,
                                  num_test=8, seed=2)
  assert builder.builder_config.name == "s32_tr32_va8_te8_seed2"
  assert str(builder.version) == "2.0.0"
  for name, n in counts.items():
    source = builder.as_data_source(split=name)
    ref = shapes.make_split(name, n, S, seed=2)
    assert len(source) == n
    for i in range(n):
      record = source[i]
      image = np.asarray(PIL.Image.open(io.BytesIO(record["image"])))
      np.testing.assert_array_equal(image, ref["images"][i])
      assert record["caption"].decode() == ref["captions"][i]
      assert int(record["num_shapes"]) == ref["num_shapes"][i]
      for key in ("kind", "colour", "size", "position"):
        np.testing.assert_array_equal(record[key], ref[key][i])

  files = [os.path.join(builder.data_path, f) for f in os.listdir(builder.data_path)]
  mtimes = {f: os.path.getmtime(f) for f in files}
  start = time.time()
  again = shapes_tfds.prepare_shapes(str(tmp_path), image_size=S, num_train=32, num_val=8,
                                num_test=8, seed=2)
  assert time.time() - start < 2.0
  assert again.is_prepared()
  assert {f: os.path.getmtime(f) for f in files} == mtimes
  assert len(again.as_data_source(split="train")) == 32


def test_caption_variants_are_distinct_and_name_every_shape():
  from clusjax.data.shapes import (COLOURS, KINDS, NUM_TEMPLATES, caption_variants,
                                   make_example)
  for i in range(20):
    e = make_example("train", i, 32)
    captions = caption_variants(e["kind"], e["colour"], e["size"], e["position"], i, 5)
    assert len(set(captions)) == 5
    for c in captions:
      for k, col in zip(e["kind"], e["colour"]):
        if k >= 0:
          assert f"{COLOURS[col]} {KINDS[k]}" in c
  with pytest.raises(ValueError, match="num_captions=8"):
    caption_variants([0], [0], [0], [0], 0, NUM_TEMPLATES + 1)
