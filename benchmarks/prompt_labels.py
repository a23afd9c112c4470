"""Why the prompt-label loss needs its noun codes: kind learned from scratch.

    python benchmarks/prompt_labels.py [--steps 200] [--targets text,codes,text+codes]
        [--batch 128] [--stem patch|conv|pool] [--max_shapes 1] [--shapes_version 2]

The tiny towers (configs/clus_base.py:tiny, image stem `--stem`), from scratch, on
shapes images with 1 to `--max_shapes` shapes (6,400 training, 500 one-shape
test, 64 px, renderer `--shapes_version`), batch `--batch`, AdamW 1e-3
(b2 0.98, clipping at 1, no warm-up), temperature 0.06, trained on
`clusjax.losses.prompt_label_loss` alone with one label per image
("a photo of a {kind}." from its caption, `clusjax.data.prompts`) and as
targets:
  text        the label texts through the text tower (the paper's labels);
  codes       `clusjax.losses.noun_codes` (a fixed random vector per noun);
  text+codes  the sum of the two losses (what configs/clus_base.py trains).
Every 25 steps it prints the loss, the kind accuracy on the test images by
nearest target (text: the five prompts "a photo of a {kind}." through the
text tower, as zero-shot does; codes: the five codes) and the mean cosine
between the five prompts' text features. Also printed: that cosine at init, and
at the end the kind accuracy on 400 single shapes of the independent transfer
renderer (`clusjax.data.shapes_transfer`, as the zeroshot_transfer evaluator).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from clusjax.data import Tokenizer  # noqa: E402
from clusjax.data.prompts import PromptLabeler, noun_id  # noqa: E402
from clusjax.data.shapes import KINDS, make_split  # noqa: E402
from clusjax.data.shapes_transfer import make_transfer_set  # noqa: E402
from clusjax.losses import noun_codes, prompt_label_loss  # noqa: E402
from clusjax.models.clus import ClusModel, build_model  # noqa: E402
from configs.clus_base import get_config  # noqa: E402

TEMPERATURE, LABEL_LEN = 0.06, 16


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--targets", default="text,codes,text+codes")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--stem", default="patch", help="model.vision.stem: patch | conv | pool")
  parser.add_argument("--max_shapes", type=int, default=1, help="shapes per training image, 1..3")
  parser.add_argument("--shapes_version", type=int, default=2, help="shapes renderer: 1 | 2")
  args = parser.parse_args()
  batch = args.batch
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {os.cpu_count()} cores")

  config = get_config("tiny")
  config.model.vision.stem = args.stem
  if args.stem == "patch":    # the options of :tiny's CNN stem have no patch-stem meaning
    config.model.vision.update(dict(stem_max_cls=False, stem_width=0))
  pc = config.prompt_labels
  size, version = config.data.image_size, args.shapes_version
  train = make_split("train", 6400, size, max_shapes=args.max_shapes, version=version)
  test = make_split("test", 500, size, max_shapes=1, version=version)
  transfer_images, _, transfer_kinds = make_transfer_set(400, size)
  tokenizer = Tokenizer.train(train["captions"] + [t.format(k) for t in pc.templates for k in KINDS],
                              "/tmp/clusjax_prompt_labels_tok.model", config.data.vocab_size)
  labeler = PromptLabeler(pc.templates, 1, pc.max_nouns, LABEL_LEN, pc.stop_nouns)
  labels = [labeler(c, i) for i, c in enumerate(train["captions"])]
  label_ids, label_mask = tokenizer.encode([texts[0] for texts, _, _ in labels], LABEL_LEN)
  label_noun = np.array([n[0] for _, n, _ in labels], np.int32)
  caption_nouns = np.stack([c for _, _, c in labels])
  kind_ids, kind_mask = tokenizer.encode([f"a photo of a {k}." for k in KINDS], LABEL_LEN)
  kind_nouns = jnp.asarray([noun_id(k) for k in KINDS], jnp.int32)

  model = build_model(config, tokenizer.vocab_size)
  init = nn.unbox(model.init(jax.random.key(0), train["images"][:2], label_ids[:2],
                             label_mask[:2])["params"])

  def prompt_cosine(params):
    _, f = model.apply({"params": params}, kind_ids, kind_mask, method=ClusModel.encode_text)
    return jnp.mean((f @ f.T)[np.triu_indices(len(KINDS), 1)])

  print(f"init: mean cosine between the five prompts' features {float(prompt_cosine(init)):.4f}")
  for targets in args.targets.split(","):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.98, weight_decay=0.01))
    params, opt = init, tx.init(init)

    def loss_fn(p, images, ids, mask, nouns, cap_nouns, targets=targets):
      _, f_img = model.apply({"params": p}, images, method=ClusModel.encode_image)
      loss = 0.0
      if "text" in targets:
        _, f_lab = model.apply({"params": p}, ids, mask, method=ClusModel.encode_text)
        loss += prompt_label_loss(f_img, f_lab, nouns, cap_nouns, TEMPERATURE)
      if "codes" in targets:
        loss += prompt_label_loss(f_img, noun_codes(nouns, f_img.shape[-1]), nouns, cap_nouns,
                                  TEMPERATURE)
      return loss

    @jax.jit
    def step(p, o, *batch):
      loss, g = jax.value_and_grad(loss_fn)(p, *batch)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o, loss

    @jax.jit
    def kind_accuracy(p, images=test["images"], kinds=test["kind"][:, 0], targets=targets):
      _, f_img = model.apply({"params": p}, images, method=ClusModel.encode_image)
      if targets == "codes":
        f_kind = noun_codes(kind_nouns, f_img.shape[-1])
      else:
        _, f_kind = model.apply({"params": p}, kind_ids, kind_mask, method=ClusModel.encode_text)
      return jnp.mean((f_img @ f_kind.T).argmax(-1) == kinds)

    print(f"\ntargets={targets} stem={args.stem} batch={batch} shapes 1-{args.max_shapes} "
          f"(v{version})")
    start = time.perf_counter()
    for s in range(args.steps):
      i = np.arange(s * batch, (s + 1) * batch) % len(label_noun)
      params, opt, loss = step(params, opt, train["images"][i], label_ids[i], label_mask[i],
                               label_noun[i], caption_nouns[i])
      if (s + 1) % 25 == 0:
        print(f"  step {s + 1:4d}  loss {float(loss):.3f}  kind accuracy "
              f"{float(kind_accuracy(params)):.3f}  prompt cosine "
              f"{float(prompt_cosine(params)):.4f}  ({time.perf_counter() - start:.0f} s)",
              flush=True)
    transfer = kind_accuracy(params, jnp.asarray(transfer_images), jnp.asarray(transfer_kinds))
    print(f"  kind accuracy on the transfer renderer: {float(transfer):.3f}")


if __name__ == "__main__":
  main()
