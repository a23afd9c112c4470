"""The pooled ViT stems on XLA:CPU: im2col + reshape pooling vs lax conv + reduce_window.

    python benchmarks/stems.py [--batch 96] [--image_size 64] [--width 128] [--patch 16]

For stem='pool' and stem='cnn' (clusjax/models/vit.py) at the `:tiny` width,
times forward + backward (the gradient of the summed output with respect to
the params) at --batch images, median of 5 calls after one: as shipped (each
3x3 conv one matmul over the nine shifted copies of its input on the CPU, 2x2
max pooling as a reshape and a max) against the same params run through
`nn.Conv` + `nn.max_pool` (lax's convolution and reduce_window) in the same
process. Checks first that both give the same features. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clusjax.models.vit import CnnStem, PoolStem  # noqa: E402


class _LaxStem(nn.Module):
  """The stem's layers with flax's conv and max_pool, reading the stem's own params."""
  kind: str

  @nn.compact
  def __call__(self, x):
    convs = self.variables["params"]
    for i in range(len(convs)):
      kernel = convs[f"conv_{i}"]["kernel"]
      if self.kind == "pool" and i == 0:
        x = nn.relu(nn.Conv(kernel.shape[-1], (4, 4), strides=4, padding="VALID",
                            name=f"conv_{i}")(x))
      else:
        x = nn.max_pool(nn.relu(nn.Conv(kernel.shape[-1], (3, 3), name=f"conv_{i}")(x)),
                        (2, 2), (2, 2))
    return x


def _time(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=96)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--patch", type=int, default=16)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {os.cpu_count()} cores; "
        f"batch {args.batch}, {args.image_size} px, width {args.width}, patch {args.patch}")
  images = jax.random.normal(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3))
  print("| stem | shipped (s) | lax conv + reduce_window (s) | speed-up |")
  print("| --- | --- | --- | --- |")
  for kind, stem in (("pool", PoolStem), ("cnn", CnnStem)):
    shipped = stem(args.patch, args.width)
    params = nn.meta.unbox(shipped.init(jax.random.key(1), images[:1])["params"])
    params = jax.tree.map(lambda a: a + 0.01, params)    # biases that are not zero
    lax_stem = _LaxStem(kind)
    np.testing.assert_allclose(shipped.apply({"params": params}, images[:4]),
                               lax_stem.apply({"params": params}, images[:4]), atol=1e-4)
    grads = [jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(m.apply({"params": p}, x))))
             for m in (shipped, lax_stem)]
    ours, theirs = (_time(g, params, images) for g in grads)
    print(f"| {kind} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
  main()
