"""Caption-preserving augmentations: no shape is cut, moved across cells or recoloured."""
import jax
import numpy as np

from clusjax.data import COLOUR_RGB, shapes
from clusjax.data.augment import augment_images


def _examples(n, size=64):
  return [shapes.make_example("train", i, size) for i in range(n)]


def test_shift_keeps_every_shape_whole_and_in_its_cell():
  examples = _examples(32)
  images = np.stack([e["image"] for e in examples])
  out = np.asarray(augment_images(jax.random.key(0), images, max_shift=1, brightness=0.0,
                                  noise_std=0.0))
  assert out.shape == images.shape and out.dtype == np.float32
  moved = 0
  for before, after in zip(images, out):
    # Every coloured pixel is still there (nothing cut at a border), in the same colours.
    for rgb in COLOUR_RGB:
      assert np.all(after == rgb, -1).sum() == np.all(before == rgb, -1).sum()
    moved += not np.array_equal(before, after)
    # A shift of at most one pixel: the shape stays in its own cell.
    ys, xs = np.nonzero(before.any(-1))
    ys2, xs2 = np.nonzero(after.any(-1))
    assert abs(ys.mean() - ys2.mean()) <= 1 and abs(xs.mean() - xs2.mean()) <= 1
  assert moved >= 16   # 8 of 9 offsets move the image


def test_brightness_and_noise_keep_the_colour_names():
  images = np.stack([e["image"] for e in _examples(16)])
  out = np.asarray(augment_images(jax.random.key(1), images, max_shift=0, brightness=0.2,
                                  noise_std=0.03))
  assert 0 <= out.min() and out.max() <= 255 and not np.allclose(out, images)
  for before, after in zip(images, out):
    shape = before.any(-1)
    # The nearest named colour (at the image's brightness) of each shape pixel is its own.
    palette = np.array(COLOUR_RGB + ((0, 0, 0),), np.float32)
    scaled = palette * after[shape].sum() / before[shape].astype(np.float32).sum()
    nearest = np.argmin(((after[shape][:, None] - scaled[None]) ** 2).sum(-1), 1)
    own = np.argmin(((before[shape][:, None].astype(np.float32) - palette[None]) ** 2).sum(-1), 1)
    assert np.mean(nearest == own) > 0.99
  # Each image draws its own view; the same key gives the same views.
  again = np.asarray(augment_images(jax.random.key(1), images, max_shift=0, brightness=0.2,
                                    noise_std=0.03))
  np.testing.assert_array_equal(out, again)
