"""A second, independent renderer of the captioned-shapes classes (colour x kind),
for zero-shot transfer: does a model trained on the built-in set know shapes, or
the pixels of the renderer that drew its training set?

Written apart from clusjax/data/shapes.py and shapes_v2.py on purpose: Pillow's
ImageDraw polygons and ellipses (another rasteriser) at 4x, downsampled with a
Lanczos filter (other anti-aliasing); its own RGB values and proportions
(TRANSFER_RGB, the polygons below); one shape per image on a black background,
either "center" (the image centre, large) or "random" (any size from the
built-in "small" to "large", anywhere inside one of the five caption places: the
left / right / top / bottom / centre thirds). Only the class names are shared,
so that labels mean the same.
"""
import numpy as np
import PIL.Image
import PIL.ImageDraw

from clusjax.data.shapes import COLOURS, KINDS

# Not shapes.COLOUR_RGB: near each name, never equal to the training renderer's.
TRANSFER_RGB = {"red": (228, 32, 44), "green": (44, 214, 62), "blue": (40, 70, 236),
                "yellow": (238, 226, 48), "magenta": (222, 44, 216), "cyan": (48, 222, 226),
                "white": (236, 236, 236), "orange": (244, 142, 34)}
LAYOUTS = ("center", "random")
# (row, col) thirds of the image that captions name: left, right, top, bottom, centre.
_PLACES = ((1, 0), (1, 2), (0, 1), (2, 1), (1, 1))
_SCALE = 4


def _outline(kind, cx, cy, r):
  """Pillow drawing call arguments for `kind` centred at (cx, cy) with radius r (pixels)."""
  if kind == "circle":
    return "ellipse", [cx - r, cy - r, cx + r, cy + r]
  if kind == "square":
    h = 0.8 * r
    return "polygon", [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  if kind == "triangle":
    # Equilateral, apex up, centroid at the centre.
    return "polygon", [(cx, cy - r), (cx + 0.87 * r, cy + 0.5 * r), (cx - 0.87 * r, cy + 0.5 * r)]
  if kind == "diamond":
    # A little taller than wide.
    return "polygon", [(cx, cy - r), (cx + 0.85 * r, cy), (cx, cy + r), (cx - 0.85 * r, cy)]
  if kind == "cross":
    t = 0.3 * r
    return "polygon", [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                       (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                       (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
  raise ValueError(f"unknown shape kind {kind!r}; use one of {KINDS}")


def draw(kind, colour, image_size, *, center, radius):
  """One shape on black: uint8 [S, S, 3]. center (y, x) and radius in pixels of the S image."""
  big = PIL.Image.new("RGB", (image_size * _SCALE, image_size * _SCALE), (0, 0, 0))
  method, xy = _outline(kind, center[1] * _SCALE, center[0] * _SCALE, radius * _SCALE)
  getattr(PIL.ImageDraw.Draw(big), method)(xy, fill=TRANSFER_RGB[colour])
  return np.asarray(big.resize((image_size, image_size), PIL.Image.LANCZOS), np.uint8)


def make_transfer_set(num_examples, image_size, *, seed=0, layouts=LAYOUTS):
  """`num_examples` single-shape images over the colour x kind classes, in a fixed order.

  The classes cycle (balanced labels); the layouts alternate. "center": the image
  centre, radius 0.14-0.15 of the image (the built-in "large"); "random": radius
  0.06-0.15 of the image, centre anywhere that keeps the shape inside one of the
  plus-pattern thirds of the image (_PLACES) that captions name.

  Returns:
    images uint8 [N, S, S, 3], colour int32 [N], kind int32 [N] (indices into
    shapes.COLOURS / KINDS).
  """
  if num_examples < 1:
    raise ValueError(f"num_examples={num_examples} must be >= 1")
  bad = [layout for layout in layouts if layout not in LAYOUTS]
  if not layouts or bad:
    raise ValueError(f"layouts {layouts!r}: each must be one of {LAYOUTS}")
  rng = np.random.default_rng([seed, 7])
  images = np.zeros((num_examples, image_size, image_size, 3), np.uint8)
  colour = np.zeros(num_examples, np.int32)
  kind = np.zeros(num_examples, np.int32)
  num_classes = len(COLOURS) * len(KINDS)
  for i in range(num_examples):
    colour[i], kind[i] = divmod(i % num_classes, len(KINDS))
    s = image_size
    if layouts[(i // num_classes) % len(layouts)] == "center":
      radius = rng.uniform(0.14, 0.15) * s
      center = (s / 2, s / 2)
    else:
      third = s / 3
      # Small images: the shape still fits its third with a 1 px margin.
      radius = min(rng.uniform(0.06, 0.15) * s, third / 2 - 1)
      row, col = _PLACES[rng.integers(len(_PLACES))]
      center = (rng.uniform(row * third + radius + 1, (row + 1) * third - radius - 1),
                rng.uniform(col * third + radius + 1, (col + 1) * third - radius - 1))
    images[i] = draw(KINDS[kind[i]], COLOURS[colour[i]], s, center=center, radius=radius)
  return images, colour, kind
