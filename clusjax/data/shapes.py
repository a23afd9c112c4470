"""The built-in "captioned shapes" set: generated from a seed, no download.

Each image is a black square with 1-3 coloured shapes; each shape has a kind,
a colour, a size and a position, and its caption names all four of every
shape, so a caption is true of exactly its image's content. Retrieval and
zero-shot classification on it are real tasks a small model learns on a CPU.

Layout: the image is a 3x3 grid of cells; the five positions are the plus
pattern of it (left / right / top / bottom / center). A shape is drawn only
inside its own cell, so shapes never overlap, and shapes in one image have
distinct positions, so a caption is never ambiguous. A shape sits at the
centre of its cell (JITTER = 0): with random offsets a from-scratch patch-8
ViT learns the kind of a shape several times slower (supervised, 250 steps
of 128: 66% kind accuracy with full-cell offsets, 76% with +-1 px, 99%
centred), and a contrastive model within the tiny budget not at all.

Example i of a split depends only on (seed, split, i, image_size): it is drawn
from its own RNG, `np.random.default_rng([seed, split_id, i])`, so any prefix
of a split equals a shorter split and generation order does not matter.

`CaptionedShapes` stores the set as a TFDS ArrayRecord data set (no
TensorFlow needed); `prepare_shapes` builds it once per data dir.
"""
import dataclasses
import fcntl
import io
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

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


def _caption(template, items):
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
  return "a black background with " + _join(both) + "."


NUM_TEMPLATES = 7


def caption_variants(kind, colour, size, position, image_index, num_captions):
  """`num_captions` (<= NUM_TEMPLATES) differently worded captions of one image, each
  true of it: templates image_index + j (mod NUM_TEMPLATES), every other one with the
  shapes named in reverse order. The attribute arrays are int [MAX_SHAPES], -1 where absent.
  """
  if not 1 <= num_captions <= NUM_TEMPLATES:
    raise ValueError(f"num_captions={num_captions} must be in [1, {NUM_TEMPLATES}] "
                     "(one caption template each).")
  items = [(f"a {SIZES[s]} {COLOURS[c]} {KINDS[k]}", POSITION_PHRASES[p])
           for k, c, s, p in zip(kind, colour, size, position) if k >= 0]
  return [_caption((image_index + j) % NUM_TEMPLATES, items[::-1] if j % 2 else items)
          for j in range(num_captions)]


def make_example(split, index, image_size, seed=0, *, min_shapes=1, max_shapes=MAX_SHAPES):
  """Example `index` of `split`, a pure function of its arguments.

  Returns:
    dict: image uint8 [S, S, 3]; caption str; num_shapes int; kind, colour,
    size, position int32 [max_shapes] (-1 where absent).
  """
  _check_args(split, image_size, min_shapes, max_shapes)
  split_id = SPLITS.index(split)
  rng = np.random.default_rng([seed, split_id, index])
  n = int(rng.integers(min_shapes, max_shapes + 1))
  attrs = {"position": rng.permutation(len(POSITIONS))[:n],
           "kind": rng.integers(0, len(KINDS), n),
           "colour": rng.integers(0, len(COLOURS), n),
           "size": rng.integers(0, len(SIZES), n)}
  template = int(rng.integers(NUM_TEMPLATES))
  # Offset of each shape inside its cell: centred, give or take JITTER of the free room.
  jitter = 0.5 + JITTER * (rng.uniform(0.0, 1.0, (n, 2)) - 0.5)

  image = np.zeros((image_size, image_size, 3), np.uint8)
  extents = half_extents(image_size)
  described = []
  for j in range(n):
    pos, kind = int(attrs["position"][j]), int(attrs["kind"][j])
    colour, size = int(attrs["colour"][j]), int(attrs["size"][j])
    y0, y1, x0, x1 = cell_bounds(pos, image_size)
    e = extents[size]
    # Centre pixel: anywhere that keeps the shape (2e + 1 px) off the cell's
    # 1 px border; drawing only inside the cell means shapes cannot overlap.
    cy = y0 + 1 + e + int(jitter[j, 0] * (y1 - y0 - 2 * e - 2))
    cx = x0 + 1 + e + int(jitter[j, 1] * (x1 - x0 - 2 * e - 2))
    dy = (np.arange(y0, y1) - cy)[:, None]
    dx = (np.arange(x0, x1) - cx)[None, :]
    image[y0:y1, x0:x1][_shape_mask(kind, dy, dx, e)] = COLOUR_RGB[colour]
    described.append((f"a {SIZES[size]} {COLOURS[colour]} {KINDS[kind]}", POSITION_PHRASES[pos]))

  out = {"image": image, "caption": _caption(template, described), "num_shapes": n}
  for key, values in attrs.items():
    padded = np.full((max_shapes,), -1, np.int32)
    padded[:n] = values
    out[key] = padded
  return out


def _check_args(split, image_size, min_shapes, max_shapes):
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size={image_size} is too small for captioned shapes: "
                     f"use image_size >= {MIN_IMAGE_SIZE}")
  if not 1 <= min_shapes <= max_shapes <= len(POSITIONS):
    raise ValueError(f"need 1 <= min_shapes ({min_shapes}) <= max_shapes ({max_shapes}) "
                     f"<= {len(POSITIONS)} (one shape per position)")


def make_split(split, num_examples, image_size, seed=0, *, min_shapes=1, max_shapes=MAX_SHAPES):
  """The first `num_examples` examples of `split`, in memory.

  Returns:
    dict: images uint8 [N, S, S, 3] (black background); captions list[str];
    num_shapes int32 [N]; kind, colour, size, position int32 [N, max_shapes]
    (indices into KINDS, COLOURS, SIZES, POSITIONS; -1 where absent).
  """
  _check_args(split, image_size, min_shapes, max_shapes)
  examples = [make_example(split, i, image_size, seed, min_shapes=min_shapes,
                           max_shapes=max_shapes) for i in range(num_examples)]
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


# ---------------------------------------------------------------------------
# TFDS builder.


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """One generated variant; its name encodes every field (see `config_name`)."""
  image_size: int = 64
  num_train: int = 20_000
  num_val: int = 1_000
  num_test: int = 1_000
  seed: int = 0


def config_name(image_size, num_train, num_val, num_test, seed):
  return f"s{image_size}_tr{num_train}_va{num_val}_te{num_test}_seed{seed}"


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """Captioned shapes as ArrayRecord; records in generation order (index i = example i).

  Features: image = PNG bytes (a string Tensor: features.Image would need
  TensorFlow to encode), caption Text (decodes to bytes), num_shapes int32,
  kind/colour/size/position int32 [MAX_SHAPES].
  """
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Shapes centred in their cells (JITTER = 0)."}
  BUILDER_CONFIGS = []  # configs are made on the fly by prepare_shapes
  # Nothing is downloaded, so no checksums file; TFDS's search for one next to
  # a module inside a package needs importlib_resources (not installed).
  code_path = None

  def _info(self):
    attr = lambda: tfds.features.Tensor(shape=(MAX_SHAPES,), dtype=np.int32)  # noqa: E731
    # Built directly: dataset_info_from_configs needs a package directory.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic images of 1-3 coloured shapes with template captions.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "caption": tfds.features.Text(),
            "num_shapes": tfds.features.Tensor(shape=(), dtype=np.int32),
            "kind": attr(), "colour": attr(), "size": attr(), "position": attr(),
        }),
        # Keep generation order so record i == make_split(...)[i].
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "val": self._generate_examples("val", c.num_val),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split, num_examples):
    c = self.builder_config
    for i in range(num_examples):
      e = make_example(split, i, c.image_size, c.seed)
      e["image"] = encode_png(e["image"])
      e["num_shapes"] = np.int32(e["num_shapes"])
      yield i, e


def prepare_shapes(data_dir, *, image_size, num_train, num_val, num_test, seed=0):
  """Builds the set in `data_dir` ("" = TFDS default) unless already there.

  Safe to call from several processes on one file system at once: a file
  lock lets one build while the others wait, then they all reuse it.

  Returns:
    The CaptionedShapes builder; read with `builder.as_data_source(split)`.
  """
  _check_args("train", image_size, 1, MAX_SHAPES)
  config = ShapesConfig(name=config_name(image_size, num_train, num_val, num_test, seed),
                        image_size=image_size, num_train=num_train, num_val=num_val,
                        num_test=num_test, seed=seed)
  make = lambda: CaptionedShapes(data_dir=data_dir or None, config=config,  # noqa: E731
                                 file_format="array_record")
  builder = make()
  if builder.is_prepared():
    return builder
  lock_dir = os.path.dirname(os.fspath(builder.data_path).rstrip("/"))
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, ".prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not builder.is_prepared():  # another process may have built it meanwhile
        builder.download_and_prepare(file_format="array_record")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  # A fresh builder reads the split sizes from disk, whoever wrote them.
  return make()
