"""Draws the built-in shapes renderers side by side (the README's picture).

    python launch/render_shapes.py --out=docs/shapes_renderers.png

Rows: v1 (TFDS 1.1.0), v2 on each background (the default training data), and the
independent transfer renderer (clusjax/data/shapes_transfer.py) at the centre and at
random places; one column per example, the same scenes in the v1 / v2 rows.
"""
import argparse

import numpy as np
import PIL.Image
import PIL.ImageDraw

from clusjax.data import shapes, shapes_transfer


def rows(image_size, columns):
  out = [("v1", [shapes.make_example("test", i, image_size, version=1)["image"]
                 for i in range(columns)])]
  for background in ("dark", "noise", "light"):
    out.append((f"v2 {background}", [shapes.make_example("test", i, image_size,
                                                         backgrounds=(background,))["image"]
                                     for i in range(columns)]))
  for layout in shapes_transfer.LAYOUTS:
    # A random few of the 40 colour x kind classes.
    images, _, _ = shapes_transfer.make_transfer_set(40, image_size, layouts=(layout,))
    order = np.random.default_rng(0).permutation(40)[:columns]
    out.append((f"transfer {layout}", list(images[order])))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="docs/shapes_renderers.png")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--columns", type=int, default=8)
  parser.add_argument("--scale", type=int, default=2)
  args = parser.parse_args()
  label_w, pad, s = 130, 4, args.image_size * args.scale
  table = rows(args.image_size, args.columns)
  canvas = PIL.Image.new("RGB", (label_w + args.columns * (s + pad), len(table) * (s + pad)),
                         (255, 255, 255))
  draw = PIL.ImageDraw.Draw(canvas)
  for r, (name, images) in enumerate(table):
    y = r * (s + pad)
    draw.text((6, y + s // 2 - 6), name, fill=(0, 0, 0))
    for c, image in enumerate(images):
      tile = PIL.Image.fromarray(image).resize((s, s), PIL.Image.NEAREST)
      canvas.paste(tile, (label_w + c * (s + pad), y))
  canvas.save(args.out)
  print(f"wrote {args.out} ({canvas.size[0]}x{canvas.size[1]})")


if __name__ == "__main__":
  main()
