"""A grid picture of eval images with the captions a fine-tuned captioning workdir gives.

    python launch/caption_grid.py --workdir=workdirs/caption_tiny --out=docs/captions.png \\
        [--num=8] [--beam_size=3]

Reads the workdir's config (its eval split, image size), captions the first --num
eval images with `clusjax.load_finetuned(W).caption` and draws each image over its
caption (and the first reference), novel-object images marked.
"""
import os
import sys
import textwrap

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_WORKDIR = flags.DEFINE_string("workdir", None, "A captioning workdir (configs/caption.py).")
_OUT = flags.DEFINE_string("out", None, "The PNG to write.")
_NUM = flags.DEFINE_integer("num", 8, "Images in the grid.")
_BEAM = flags.DEFINE_integer("beam_size", 3, "Beam size (1 = greedy).")
flags.mark_flags_as_required(["workdir", "out"])


def main(_):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  import clusjax
  from clusjax.data import iterate_eval, make_source
  from clusjax.data.captions import eval_images

  model = clusjax.load_finetuned(_WORKDIR.value)
  c = model.config
  images = eval_images(make_source(c.data, c.data.eval_split, "caption"))
  batch = next(iterate_eval(images, batch_size=_NUM.value, image_size=c.data.image_size,
                            tokenizer=model.tokenizer, max_text_len=c.data.max_text_len,
                            num_examples=_NUM.value))
  n = int(np.asarray(batch["valid"]).sum())
  captions = model.caption(batch["image"][:n], beam_size=_BEAM.value)
  cols = 4
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.4 * rows))
  for i, ax in enumerate(np.asarray(axes).reshape(-1)):
    ax.axis("off")
    if i >= n:
      continue
    info = images.info(int(batch["image_id"][i]))
    ax.imshow(batch["image"][i], interpolation="nearest")
    text = "\n".join(textwrap.wrap(captions[i], 34))
    ref = "\n".join(textwrap.wrap("ref: " + info["references"][0], 34))
    ax.text(0, -0.03, ("[novel] " if info["novel"] else "") + text + "\n" + ref, fontsize=7,
            va="top", ha="left", transform=ax.transAxes)
  fig.subplots_adjust(hspace=0.6, wspace=0.1, left=0.02, right=0.98, top=0.98, bottom=0.1)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  fig.savefig(_OUT.value, dpi=110)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
