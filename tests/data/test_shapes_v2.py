"""Shapes v2 (clusjax/data/shapes_v2.py) and the transfer renderer (shapes_transfer.py)."""
import hashlib

import numpy as np
import PIL.Image
import pytest

from clusjax.data import shapes, shapes_tfds, shapes_transfer, shapes_v2
from clusjax.data.shapes import COLOUR_RGB, COLOURS, KINDS

S = 32


def _hashes(images):
  return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def test_deterministic_bytes_and_same_scene_as_v1():
  a = shapes.make_example("test", 7, 64, seed=1)
  b = shapes.make_example("test", 7, 64, seed=1)
  assert shapes.encode_png(a["image"]) == shapes.encode_png(b["image"])
  v1 = shapes.make_example("test", 7, 64, seed=1, version=1)
  # The renderer changes the pixels, never the scene or its caption.
  assert a["caption"] == v1["caption"]
  for key in ("kind", "colour", "size", "position"):
    np.testing.assert_array_equal(a[key], v1[key])
  assert not np.array_equal(a["image"], v1["image"])


def test_no_repeated_test_image_and_none_in_train():
  # v1 repeats 22% of its test images (centred masks); v2's draws never coincide.
  train = shapes.make_split("train", 3000, S)["images"]
  test = shapes.make_split("test", 1000, S)["images"]
  test_hashes = _hashes(test)
  assert len(set(test_hashes)) == len(test_hashes)
  assert not set(test_hashes) & set(_hashes(train))
  v1 = _hashes(shapes.make_split("test", 1000, S, version=1)["images"])
  assert len(set(v1)) < 0.9 * len(v1)   # the v1 flaw this fixes


def _shape_pixels(image, cell, background):
  y0, y1, x0, x1 = cell
  region = image[y0:y1, x0:x1].astype(np.float32)
  return region, np.abs(region - background).max(-1) > 60


def test_shapes_drawn_in_their_cells_with_their_colours():
  split = shapes.make_split("train", 150, 64, backgrounds=("dark",))
  areas = {0: [], 1: []}
  for i, image in enumerate(split["images"]):
    background = np.median(image.reshape(-1, 3), axis=0).astype(np.float32)
    assert background.max() <= 50                    # dark: the caption's "black" holds
    outside = np.ones((64, 64), bool)
    for j in range(split["num_shapes"][i]):
      cell = shapes.cell_bounds(split["position"][i, j], 64)
      region, on = _shape_pixels(image, cell, background)
      assert on.sum() >= 10
      # Nothing touches the cell's border (shapes never overlap or cross cells).
      assert not (on[0].any() or on[-1].any() or on[:, 0].any() or on[:, -1].any())
      # The most covered pixels keep the colour's name: nearest named colour.
      core = region[on]
      mean = core[np.argsort(-np.abs(core - background).max(-1))[:5]].mean(0)
      dist = [np.abs(mean / mean.max() - np.array(rgb) / max(rgb)).max() for rgb in COLOUR_RGB]
      assert int(np.argmin(dist)) == split["colour"][i, j], (i, mean)
      areas[split["size"][i, j]].append(on.sum())
      y0, y1, x0, x1 = cell
      outside[y0:y1, x0:x1] = False
    assert np.abs(image[outside].astype(np.float32) - background).max() <= 30
  assert np.mean(areas[0]) * 1.8 < np.mean(areas[1])


def test_varies_place_size_rotation_and_edges():
  # One scene attribute set, many draws: the pixels vary, anti-aliased edges exist.
  images = [shapes.make_example("train", i, 64, backgrounds=("dark",))["image"]
            for i in range(40)]
  levels = {int(v) for im in images for v in np.unique(im.max(-1))}
  assert len(levels) > 100                           # not a handful of pure colours
  centres = []
  for i, image in enumerate(images):
    e = shapes.make_example("train", i, 64)
    if e["num_shapes"] == 1:
      ys, xs = np.nonzero(image.max(-1) > 100)
      centres.append((ys.mean() % (64 / 3), xs.mean() % (64 / 3)))
  assert np.std(np.array(centres), axis=0).min() > 0.5


def test_backgrounds_and_caption_word():
  for kind in shapes_v2.BACKGROUNDS:
    e = shapes.make_example("val", 3, 64, backgrounds=(kind,))
    corner = e["image"][:4, :4].astype(np.float32)
    if kind == "light":
      assert corner.min() >= 180 and e["background"] == "white"
    else:
      assert corner.mean() <= 60 and e["background"] == "black"
    if kind == "noise":
      assert corner.std() > 1
  # Template 6 names the background truly.
  e = next(shapes.make_example("train", i, 32, backgrounds=("light",)) for i in range(200)
           if "background" in shapes.make_example("train", i, 32)["caption"])
  assert "a white background with" in e["caption"]
  with pytest.raises(ValueError, match="checkered"):
    shapes.make_example("train", 0, 32, backgrounds=("checkered",))
  with pytest.raises(ValueError, match="version=4"):
    shapes.make_example("train", 0, 32, version=4)


def test_tfds_keeps_v1_sets_loading_beside_v2(tmp_path):
  kwargs = dict(image_size=S, num_train=8, num_val=4, num_test=4, seed=0)
  v1 = shapes_tfds.prepare_shapes(str(tmp_path), version=1, **kwargs)
  v2 = shapes_tfds.prepare_shapes(str(tmp_path), **kwargs)
  assert (str(v1.version), str(v2.version)) == ("1.1.0", "2.0.0")
  for builder, version in ((v1, 1), (v2, 2)):
    ref = shapes.make_split("test", 4, S, version=version)
    record = builder.as_data_source(split="test")[2]
    image = np.asarray(PIL.Image.open(__import__("io").BytesIO(record["image"])))
    np.testing.assert_array_equal(image, ref["images"][2])
  assert "background" not in v1.info.features and "background" in v2.info.features


def test_transfer_set_balanced_and_not_the_training_renderer():
  images, colour, kind = shapes_transfer.make_transfer_set(80, 64)
  assert images.shape == (80, 64, 64, 3) and images.dtype == np.uint8
  assert np.bincount(colour * len(KINDS) + kind).tolist() == [2] * 40
  # Black background, one shape of (about) its colour.
  for image, c in zip(images, colour):
    assert image[:2, :2].max() == 0
    on = image.max(-1) > 200
    mean = image[on].astype(np.float32).mean(0)
    assert int(np.argmin([np.abs(mean - np.array(shapes_transfer.TRANSFER_RGB[name])).max()
                          for name in COLOURS])) == c
  # Its own RGB values, not the training renderer's.
  assert not set(shapes_transfer.TRANSFER_RGB.values()) & set(COLOUR_RGB)
  with pytest.raises(ValueError, match="layouts"):
    shapes_transfer.make_transfer_set(4, 64, layouts=("corner",))
  for size in (16, 32):   # small images: every shape still fits its place
    small, _, _ = shapes_transfer.make_transfer_set(80, size)
    assert (small.max(axis=(1, 2, 3)) > 100).all()


def test_version_3_eval_scenes_never_repeat_and_keep_v2s_images_otherwise(tmp_path):
  """Data version 3: v2 repeats one-shape scenes in its test split (paired R@1 can't
  tell those apart); v3 redraws each repeat until new, keeps every other eval image and
  the whole train split of v2 byte for byte, is deterministic, and says when a split
  needs more distinct scenes than there are."""
  def scenes(split):
    return [tuple(sorted(zip(*(split[k][i][:split["num_shapes"][i]].tolist()
                                for k in ("position", "kind", "colour", "size")))))
            for i in range(len(split["captions"]))]
  v2 = shapes.make_split("test", 1000, S)
  v3 = shapes.make_split("test", 1000, S, version=3)
  s2, s3 = scenes(v2), scenes(v3)
  assert len(set(s2)) < 0.9 * len(s2) and len(set(s3)) == len(s3)
  # Example i keeps v2's scene and image unless an earlier v3 example has that scene.
  taken, changed = set(), 0
  for i in range(1000):
    redrawn = s2[i] in taken
    assert (s3[i] != s2[i]) == redrawn, i
    assert np.array_equal(v2["images"][i], v3["images"][i]) == (not redrawn), i
    assert v3["num_shapes"][i] == v2["num_shapes"][i]
    taken.add(s3[i])
    changed += redrawn
  assert 100 < changed < 200
  np.testing.assert_array_equal(shapes.make_split("test", 50, S, version=3)["images"],
                                v3["images"][:50])
  train = shapes.make_split("train", 200, S)
  np.testing.assert_array_equal(shapes.make_split("train", 200, S, version=3)["images"],
                                train["images"])
  assert not set(_hashes(v3["images"])) & set(_hashes(train["images"]))
  # 400 one-shape scenes exist: the 401st one-shape test example has none left.
  with pytest.raises(ValueError, match="all 400 are taken"):
    shapes.make_split("val", 401, S, max_shapes=1, version=3)
  builder = shapes_tfds.prepare_shapes(str(tmp_path), image_size=S, num_train=4, num_val=4,
                                  num_test=30, version=3)
  assert str(builder.version) == "3.0.0"
  record = builder.as_data_source(split="test")[29]
  image = np.asarray(PIL.Image.open(__import__("io").BytesIO(record["image"])))
  np.testing.assert_array_equal(image, v3["images"][29])
