"""The built-in "captioned shapes" set: generated from a seed, no download.

Each image is a black square with 1-3 coloured shapes; each shape has a kind,
a colour, a size and a position, and its caption names all four of every
shape, so a caption is true of exactly its image's content. Retrieval and
zero-shot classification on it are real tasks a small model learns on a CPU.

Layout: the image is a 3x3 grid of cells; the five positions are the plus
pattern of it (left / right / top / bottom / center). A shape is drawn only
inside its own cell, so shapes never overlap, and shapes in one image have
distinct positions, so a caption is never ambiguous.

Two renderers (`version`): 2 (the default, TFDS 2.0.0; clusjax/data/shapes_v2.py)
draws each shape with a continuous size, a place anywhere in its cell, a small
rotation, anti-aliased edges, colour / brightness jitter and a varied background;
1 (TFDS 1.1.0) draws five fixed masks centred in their cells in pure colours on
black, which a model can learn pixel by pixel without learning shape. The scene
(attributes, caption) of example i is the same in both.

Example i of a split depends only on (seed, split, i, image_size): it is drawn
from its own RNG, `np.random.default_rng([seed, split_id, i])`, so any prefix
of a split equals a shorter split and generation order does not matter.

Data version 3 (TFDS 3.0.0) draws v2's images, but no val or test scene repeats
within its split (make_example).

`clusjax.data.shapes_tfds.CaptionedShapes` stores the set as a TFDS ArrayRecord data
set (no TensorFlow needed); `shapes_tfds.prepare_shapes` builds it once per data dir.
"""
import io
import math

import numpy as np
import PIL.Image

from clusjax.data import shapes_v2

KINDS = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange")
# RGB of each colour in COLOURS (pure values: no anti-aliasing, so the image
# holds exactly these and black).
COLOUR_RGB = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
              (255, 0, 255), (0, 255, 255), (255, 255, 255), (255, 128, 0))
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
# How a caption says each position.
POSITION_PHRASES = ("on the left", "on the right", "at the top", "at the bottom",
                    "in the center")
SPLITS = ("train", "val", "test")
MAX_SHAPES = 3          # attribute arrays in the TFDS set are [MAX_SHAPES]
MIN_IMAGE_SIZE = 16
# Data versions, TFDS 1.1.0, 2.0.0, 3.0.0: 1 and 2 are renderers; 3 is v2's renderer with
# val / test scenes that never repeat within their split (make_example).
VERSIONS = (1, 2, 3)
LATEST_VERSION = 2      # the default
DEFAULT_BACKGROUNDS = shapes_v2.DEFAULT_BACKGROUNDS
# v1: offset of a shape inside its cell, as a fraction of the free room (0 = centred).
JITTER = 0.0

# (row, col) of each position's cell in the 3x3 grid.
_CELLS = ((1, 0), (1, 2), (0, 1), (2, 1), (1, 1))


def half_extents(image_size):
  """(small, large) shape half-extent e in pixels: a shape spans 2e + 1 pixels.

  Large is the biggest that fits a cell with a 1 px margin all round (so
  shapes are always >= 2 px apart); small is ~0.55 of it (about a third of
  the area): 5 vs 7 px at 32 px, 11 vs 19 px at 64 px. From 16 to 21 px both
  are 3 px wide and size is not visible.
  """
  cell = int(np.diff(np.round(np.linspace(0, image_size, 4)).astype(int)).min())
  large = max(1, (cell - 3) // 2)
  return max(1, min(large - 1, round(0.55 * large))), large


def cell_bounds(position, image_size):
  """(y0, y1, x0, x1) pixel bounds of `position`'s cell (index into POSITIONS)."""
  edges = np.round(np.linspace(0, image_size, 4)).astype(int)
  row, col = _CELLS[position]
  return int(edges[row]), int(edges[row + 1]), int(edges[col]), int(edges[col + 1])


def _shape_mask(kind, dy, dx, e):
  """Boolean mask of `kind` with half-extent e over integer offsets dy [h, 1], dx [1, w].

  Defined on whole-pixel offsets from a pixel centre so that shapes are
  symmetric and stay distinct down to e = 2 (5 px).
  """
  name = KINDS[kind]
  if name == "circle":
    # (e + 0.4)^2 rounds the rim: with e^2 small circles get one-pixel tips.
    return dx * dx + dy * dy < (e + 0.4) ** 2
  if name == "square":
    # Slightly inset when large, so its area stays near the circle's.
    h = round(0.85 * e)
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if name == "triangle":
    # Apex up at dy = -e, base 2e + 1 wide at dy = +e.
    return (dy >= -e) & (dy <= e) & (2 * np.abs(dx) <= dy + e)
  if name == "diamond":
    return np.abs(dx) + np.abs(dy) <= e
  # cross (a plus sign): thin arms (1 px while e < 4) keep it from reading as a blob.
  t = e // 4
  return ((np.abs(dx) <= t) & (np.abs(dy) <= e)) | ((np.abs(dy) <= t) & (np.abs(dx) <= e))


def _join(items):
  """'x' / 'x and y' / 'x, y and z'."""
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def described_items(kind, colour, size, position):
  """The caption items [(desc "a small red circle", where "on the left")] of the shapes
  whose attribute indices these are (int sequences; a shape with kind -1 is absent)."""
  return [(f"a {SIZES[s]} {COLOURS[c]} {KINDS[k]}", POSITION_PHRASES[p])
          for k, c, s, p in zip(kind, colour, size, position) if k >= 0]


def template_caption(template, items, background="black"):
  """Caption for `items` = [(desc "a small red circle", where "on the left"), ...]."""
  both = [f"{d} {w}" for d, w in items]
  if template == 0:
    return _join(both) + "."
  if template == 1:
    return "a photo of " + _join(both) + "."
  if template == 2:
    return "there is " + _join(both) + "."
  if template == 3:
    return "; ".join(f"{w} there is {d}" for d, w in items) + "."
  if template == 4:
    return "an image with " + _join(both) + "."
  if template == 5:
    return _join([f"{d} is {w}" for d, w in items]) + "."
  return f"a {background} background with " + _join(both) + "."


NUM_TEMPLATES = 7


def caption_variants(kind, colour, size, position, image_index, num_captions,
                     background="black"):
  """`num_captions` (<= NUM_TEMPLATES) differently worded captions of one image, each
  true of it: templates image_index + j (mod NUM_TEMPLATES), every other one with the
  shapes named in reverse order. The attribute arrays are int [MAX_SHAPES], -1 where absent;
  background: the word for the image's background ("black", or "white" on v2's light ones).
  """
  if not 1 <= num_captions <= NUM_TEMPLATES:
    raise ValueError(f"num_captions={num_captions} must be in [1, {NUM_TEMPLATES}] "
                     "(one caption template each).")
  items = described_items(kind, colour, size, position)
  return [template_caption((image_index + j) % NUM_TEMPLATES,
                           items[::-1] if j % 2 else items, background)
          for j in range(num_captions)]


def _draw_scene(rng, n):
  """n shapes' attributes at distinct places (the scene), drawn from `rng`."""
  return {"position": rng.permutation(len(POSITIONS))[:n],
          "kind": rng.integers(0, len(KINDS), n),
          "colour": rng.integers(0, len(COLOURS), n),
          "size": rng.integers(0, len(SIZES), n)}


def scene_key(attrs):
  """A scene as a hashable value: its shapes' (position, kind, colour, size), sorted;
  `attrs` maps those names to arrays, -1 (a record's padding) where no shape is."""
  items = zip(*(np.asarray(attrs[k]).tolist() for k in ("position", "kind", "colour", "size")))
  return tuple(sorted(item for item in items if item[1] >= 0))


def _num_scenes(n):
  """How many different scenes of n shapes there are."""
  return math.comb(len(POSITIONS), n) * (len(KINDS) * len(COLOURS) * len(SIZES)) ** n


# (split_id, seed, min_shapes, max_shapes) -> (attrs of examples 0.. so far, keys seen).
_DISTINCT = {}


def _distinct_scene(split, split_id, index, seed, min_shapes, max_shapes):
  """Data version 3's scene of eval example `index`: its v2 draw unless an earlier
  example of the split has that scene; then redrawn (the same number of shapes)
  from its own stream until new. A pure function of its arguments: the examples
  before `index` are drawn (and kept) first."""
  done, seen = _DISTINCT.setdefault((split_id, seed, min_shapes, max_shapes), ([], set()))
  for i in range(len(done), index + 1):
    rng = np.random.default_rng([seed, split_id, i])
    m = int(rng.integers(min_shapes, max_shapes + 1))
    scene = _draw_scene(rng, m)
    redraw = np.random.default_rng([seed, split_id, i, 3])
    while scene_key(scene) in seen:
      if sum(len(k) == m for k in seen) >= _num_scenes(m):
        raise ValueError(
            f"captioned shapes version 3: {split} example {i} needs a new scene of {m} "
            f"shape(s), but all {_num_scenes(m)} are taken; use fewer {split} examples "
            "or version 2 (which repeats scenes).")
      scene = _draw_scene(redraw, m)
    seen.add(scene_key(scene))
    done.append(scene)
  return done[index]


def draw_rng(seed, split, index):
  """The stream v2 (and version 3) draws example `index`'s image from: its own, so
  v2's draws never shift the scene's."""
  return np.random.default_rng([seed, SPLITS.index(split), index, 2])


def draw_v2(rng, attrs, image_size, backgrounds=shapes_v2.DEFAULT_BACKGROUNDS):
  """v2's drawing of a scene (`attrs`: kind, colour, size, position arrays, -1 where
  no shape is), from `rng`: (uint8 image [S, S, 3], the caption's background word)."""
  kind = rng.choice(shapes_v2.check_backgrounds(backgrounds))
  canvas = shapes_v2.background(rng, image_size, kind)
  largest = half_extents(image_size)[1]
  for k, c, s, p in zip(*(np.asarray(attrs[key]).tolist()
                          for key in ("kind", "colour", "size", "position"))):
    if k >= 0:
      shapes_v2.draw_shape(canvas, rng, KINDS[k], COLOUR_RGB[c], s,
                           cell_bounds(p, image_size), largest)
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8), (
      "white" if kind == "light" else "black")


def make_example(split, index, image_size, seed=0, *, min_shapes=1, max_shapes=MAX_SHAPES,
                 version=LATEST_VERSION, backgrounds=shapes_v2.DEFAULT_BACKGROUNDS):
  """Example `index` of `split`, a pure function of its arguments.

  version: the data version (VERSIONS): 1 and 2 are renderers; the scene (attributes,
  caption template) does not depend on them. Version 3 draws v2's images, but the val
  and test scenes never repeat within their split: an eval example whose v2 scene an
  earlier one has gets another (v2 repeats 22% of a 1,000-image test split, all but a
  few one-shape scenes, of which there are 400, which caps paired retrieval R@1 at
  0.88); the others, and every train example, are v2's. backgrounds: v2's background
  kinds to draw from (shapes_v2).

  Returns:
    dict: image uint8 [S, S, 3]; caption str; num_shapes int; kind, colour,
    size, position int32 [max_shapes] (-1 where absent); background str (the
    caption's word for it: "black", or "white" on v2's light ones).
  """
  check_args(split, image_size, min_shapes, max_shapes)
  if version not in VERSIONS:
    raise ValueError(f"captioned shapes version={version!r} is unknown; use one of {VERSIONS}")
  split_id = SPLITS.index(split)
  rng = np.random.default_rng([seed, split_id, index])
  n = int(rng.integers(min_shapes, max_shapes + 1))
  attrs = _draw_scene(rng, n)
  template = int(rng.integers(NUM_TEMPLATES))
  if version >= 3 and split != "train":
    attrs = _distinct_scene(split, split_id, index, seed, min_shapes, max_shapes)
  if version == 1:
    cells = [cell_bounds(int(p), image_size) for p in attrs["position"]]
    image, word = _draw_v1(rng, attrs, cells, image_size), "black"
  else:
    image, word = draw_v2(draw_rng(seed, split, index), attrs, image_size, backgrounds)
  described = described_items(attrs["kind"], attrs["colour"], attrs["size"], attrs["position"])
  out = {"image": image, "caption": template_caption(template, described, word),
         "num_shapes": n, "background": word}
  for key, values in attrs.items():
    padded = np.full((max_shapes,), -1, np.int32)
    padded[:n] = values
    out[key] = padded
  return out


def _draw_v1(rng, attrs, cells, image_size):
  """v1: the fixed masks, centred (give or take JITTER), pure colours on black."""
  n = len(cells)
  # Offset of each shape inside its cell: centred, give or take JITTER of the free room.
  jitter = 0.5 + JITTER * (rng.uniform(0.0, 1.0, (n, 2)) - 0.5)
  image = np.zeros((image_size, image_size, 3), np.uint8)
  extents = half_extents(image_size)
  for j in range(n):
    kind, colour, size = int(attrs["kind"][j]), int(attrs["colour"][j]), int(attrs["size"][j])
    y0, y1, x0, x1 = cells[j]
    e = extents[size]
    # Centre pixel: anywhere that keeps the shape (2e + 1 px) off the cell's
    # 1 px border; drawing only inside the cell means shapes cannot overlap.
    cy = y0 + 1 + e + int(jitter[j, 0] * (y1 - y0 - 2 * e - 2))
    cx = x0 + 1 + e + int(jitter[j, 1] * (x1 - x0 - 2 * e - 2))
    dy = (np.arange(y0, y1) - cy)[:, None]
    dx = (np.arange(x0, x1) - cx)[None, :]
    image[y0:y1, x0:x1][_shape_mask(kind, dy, dx, e)] = COLOUR_RGB[colour]
  return image


def check_args(split, image_size, min_shapes, max_shapes):
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size={image_size} is too small for captioned shapes: "
                     f"use image_size >= {MIN_IMAGE_SIZE}")
  if not 1 <= min_shapes <= max_shapes <= len(POSITIONS):
    raise ValueError(f"need 1 <= min_shapes ({min_shapes}) <= max_shapes ({max_shapes}) "
                     f"<= {len(POSITIONS)} (one shape per position)")


def make_split(split, num_examples, image_size, seed=0, *, min_shapes=1, max_shapes=MAX_SHAPES,
               version=LATEST_VERSION, backgrounds=shapes_v2.DEFAULT_BACKGROUNDS):
  """The first `num_examples` examples of `split`, in memory (see make_example).

  Returns:
    dict: images uint8 [N, S, S, 3]; captions list[str];
    num_shapes int32 [N]; kind, colour, size, position int32 [N, max_shapes]
    (indices into KINDS, COLOURS, SIZES, POSITIONS; -1 where absent).
  """
  check_args(split, image_size, min_shapes, max_shapes)
  examples = [make_example(split, i, image_size, seed, min_shapes=min_shapes,
                           max_shapes=max_shapes, version=version, backgrounds=backgrounds)
              for i in range(num_examples)]
  out = {"images": np.zeros((num_examples, image_size, image_size, 3), np.uint8),
         "captions": [e["caption"] for e in examples],
         "num_shapes": np.array([e["num_shapes"] for e in examples], np.int32)}
  for key in ("kind", "colour", "size", "position"):
    out[key] = np.zeros((num_examples, max_shapes), np.int32)
  for i, e in enumerate(examples):
    out["images"][i] = e["image"]
    for key in ("kind", "colour", "size", "position"):
      out[key][i] = e[key]
  return out


def encode_png(image):
  """uint8 [H, W, 3] -> PNG bytes (lossless, so decoding gives the array back)."""
  buf = io.BytesIO()
  PIL.Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()
