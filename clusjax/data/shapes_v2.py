"""The shapes v2 rasteriser: the built-in scenes drawn with the variation a shape
recogniser must survive (captioned_shapes 2.0.0).

v1 draws five fixed masks, centred in their cells, in two sizes and pure colours
on black: a model can learn those exact pixels and nothing about shape (zero-shot
kind accuracy 0.29-0.46 on another renderer's drawings). v2 keeps the scene, its
attributes and captions, and draws every shape with

- a continuous size inside its size word's range (SIZE_RANGES, fractions of the
  largest shape that fits a cell), so "small" and "large" stay apart;
- a centre anywhere in its cell that keeps the shape inside it (shapes never
  overlap and the position word stays true);
- a rotation up to MAX_ROTATION degrees (not circles): a rotated square is still
  a square and a diamond still a diamond (45 degrees would swap them);
- anti-aliased edges: coverage of SUPERSAMPLE x SUPERSAMPLE points per pixel;
- colour and brightness jitter that keeps every colour's name true (each channel
  +-COLOUR_JITTER, then x [MIN_BRIGHTNESS, 1]);
- a background drawn from `backgrounds`: "dark" (plain, grey level 0-40 with a
  slight tint), "noise" (dark plus per-pixel Gaussian noise) or "light" (plain,
  200-240; captions then say "a white background").

Geometry is in continuous pixel coordinates (pixel (y, x) covers [y, y+1) x
[x, x+1)); each shape is a set of inequalities in its own rotated frame.
"""
import numpy as np

BACKGROUNDS = ("dark", "noise", "light")
DEFAULT_BACKGROUNDS = ("dark", "noise")
# Half-extent ranges per size word, as fractions of the largest that fits a cell.
SIZE_RANGES = ((0.45, 0.62), (0.8, 1.0))
MAX_ROTATION = 12.0          # degrees, either way
SUPERSAMPLE = 4
COLOUR_JITTER = 20           # per channel, uniform
MIN_BRIGHTNESS = 0.8


def check_backgrounds(backgrounds):
  backgrounds = tuple(backgrounds)
  bad = [b for b in backgrounds if b not in BACKGROUNDS]
  if not backgrounds or bad:
    raise ValueError(f"shapes backgrounds {backgrounds!r}: each must be one of {BACKGROUNDS} "
                     "(and at least one given)")
  return backgrounds


def _coverage(kind_name, u, v, e):
  """Boolean inside-mask of a shape with half-extent e in its rotated frame (u right, v down)."""
  if kind_name == "circle":
    return u * u + v * v <= e * e
  if kind_name == "square":
    h = 0.82 * e              # area near the circle's, as in v1
    return (np.abs(u) <= h) & (np.abs(v) <= h)
  if kind_name == "triangle":
    # Apex up at v = -e, base 2e wide at v = +e (v1's proportions).
    return (v >= -e) & (v <= e) & (2 * np.abs(u) <= v + e)
  if kind_name == "diamond":
    return np.abs(u) + np.abs(v) <= e
  if kind_name == "cross":
    t = max(0.22 * e, 0.75)   # arm half-width: thin enough not to read as a blob
    return ((np.abs(u) <= t) & (np.abs(v) <= e)) | ((np.abs(v) <= t) & (np.abs(u) <= e))
  raise ValueError(f"unknown shape kind {kind_name!r}")


def background(rng, image_size, kind):
  """float [S, S, 3] in [0, 255]."""
  if kind == "light":
    level = rng.uniform(200.0, 240.0)
  else:
    level = rng.uniform(0.0, 40.0)
  tint = rng.uniform(-6.0, 6.0, 3)
  image = np.broadcast_to(level + tint, (image_size, image_size, 3)).astype(np.float32)
  if kind == "noise":
    image = image + rng.normal(0.0, rng.uniform(4.0, 12.0), image.shape).astype(np.float32)
  return image


def draw_shape(image, rng, kind_name, rgb, size, cell, largest):
  """Draws one shape into `image` (float [S, S, 3], in place) inside `cell` = (y0, y1, x0, x1).

  size: 0 small / 1 large (SIZE_RANGES); largest: the largest half-extent that fits
  a cell with a 1 px margin (shapes.half_extents(S)[1]).
  """
  lo, hi = SIZE_RANGES[size]
  e = rng.uniform(lo, hi) * largest
  angle = 0.0 if kind_name == "circle" else np.deg2rad(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
  y0, y1, x0, x1 = cell
  # The rotated shape's bounding half-extent (square corners and cross arms reach
  # furthest); its centre ranges over the cell minus that and a 1 px margin.
  spread = abs(np.cos(angle)) + abs(np.sin(angle))
  e = min(e, (min(y1 - y0, x1 - x0) - 2) / (2 * spread))   # the rotated shape fits its cell
  reach = e * spread
  cy = rng.uniform(y0 + 1 + reach, max(y0 + 1 + reach, y1 - 1 - reach))
  cx = rng.uniform(x0 + 1 + reach, max(x0 + 1 + reach, x1 - 1 - reach))
  colour = np.clip(np.asarray(rgb, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3),
                   0, 255) * rng.uniform(MIN_BRIGHTNESS, 1.0)
  # Only the pixels the shape can touch (its bounding box within the cell).
  by0, by1 = max(y0, int(cy - reach) - 1), min(y1, int(cy + reach) + 2)
  bx0, bx1 = max(x0, int(cx - reach) - 1), min(x1, int(cx + reach) + 2)
  s = SUPERSAMPLE
  ys = by0 + (np.arange((by1 - by0) * s, dtype=np.float32) + 0.5) / s - cy
  xs = bx0 + (np.arange((bx1 - bx0) * s, dtype=np.float32) + 0.5) / s - cx
  dy, dx = ys[:, None], xs[None, :]
  c, n = np.cos(angle), np.sin(angle)
  u, v = c * dx + n * dy, -n * dx + c * dy
  inside = _coverage(kind_name, u, v, e)
  alpha = inside.reshape(by1 - by0, s, bx1 - bx0, s).sum(axis=(1, 3),
                                                         dtype=np.float32)[..., None] / (s * s)
  region = image[by0:by1, bx0:bx1]
  image[by0:by1, bx0:bx1] = region * (1.0 - alpha) + colour * alpha
