"""Image augmentations that keep the caption true, on device.

Uni-modal contrast (`config.loss.unimodal`) needs a second view of each image
whose caption still holds: nothing here flips, crops away or recolours.

    shift       translate by up to `max_shift` pixels each way, borders
                repeated (the built-in shapes keep a 1 px margin inside their
                cell, so a 1 px shift never cuts one and "left" stays left)
    brightness  scale all channels by one factor in [1 - brightness, 1]
                (the hue, and with it the colour name, is kept)
    noise       add Gaussian pixel noise of `noise_std` (fraction of 255)
"""
import jax
import jax.numpy as jnp


def augment_images(rng, images, *, max_shift, brightness, noise_std):
  """A random caption-preserving view of each image.

  Args:
    rng: PRNG key; each image draws its own shift, factor and noise.
    images: uint8 (or float in [0, 255]) [B, H, W, C].
    max_shift: int >= 0, pixels.
    brightness: float in [0, 1).
    noise_std: float >= 0.
  Returns:
    float32 [B, H, W, C] in [0, 255] (what `preprocess_images` reads).
  """
  b, h, w, c = images.shape
  r_shift, r_bright, r_noise = jax.random.split(rng, 3)
  x = images.astype(jnp.float32)
  if max_shift:
    s = max_shift
    padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
    offsets = jax.random.randint(r_shift, (b, 2), 0, 2 * s + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)
  if brightness:
    x = x * jax.random.uniform(r_bright, (b, 1, 1, 1), minval=1.0 - brightness, maxval=1.0)
  if noise_std:
    x = x + 255.0 * noise_std * jax.random.normal(r_noise, x.shape)
  return jnp.clip(x, 0.0, 255.0)
