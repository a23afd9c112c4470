"""What do a pre-trained workdir's image outputs hold? Linear probes of kind and colour.

For each image of the built-in val and test splits, the labels are which of the 5 kinds
and 8 colours its scene has (yes / no each). A logistic regression per label is fitted
on the val split's images and read on the test split's, from four views of the image
tower's output:

- cls: the [CLS] token (what the ITC projection reads),
- itc: the ITC feature,
- mean / max: the patch tokens but [CLS], averaged / max-pooled (the tokens the fusion,
  and so ITM, MLM and the fine-tune heads, read).

Printed per view: the accuracy per label and its mean, against always guessing the
commoner answer. A view near that baseline does not hold the attribute linearly.

    python benchmarks/token_probe.py --workdir=workdirs/tiny [--num_examples=1000]
"""
import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression

import clusjax
from clusjax.data import make_source
from clusjax.data.shapes import COLOURS, KINDS
from clusjax.eval.retrieval import load_eval_pairs

VIEWS = ("cls", "itc", "mean", "max")
ATTRIBUTES = {"kind": KINDS, "colour": COLOURS}   # record key -> its value names


def presence(record, key, size):
  """[size] 0/1: which values of `key` (kind | colour) the scene's shapes have."""
  out = np.zeros(size)
  out[np.asarray(record[key])[:int(record["num_shapes"])]] = 1
  return out


def views(model, split, num_examples):
  """({view: [N, D]}, {attribute: labels [N, values]}) of a split (ATTRIBUTES)."""
  config = model.config
  config.data.eval_split = split
  images, captions, _ = load_eval_pairs(config, model.tokenizer, num_examples)
  source = make_source(config.data, split)
  records = [source[i] for i in range(len(captions))]
  tokens, feats = (np.asarray(x, np.float64) for x in model.image_outputs(images))
  x = dict(cls=tokens[:, 0], itc=feats, mean=tokens[:, 1:].mean(1), max=tokens[:, 1:].max(1))
  labels = {key: np.stack([presence(r, key, len(names)) for r in records])
            for key, names in ATTRIBUTES.items()}
  return x, labels


def probe(x_fit, y_fit, x_test, y_test):
  """Test accuracy [labels] of one logistic regression per label (standardised inputs)."""
  mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
  acc = []
  for j in range(y_fit.shape[1]):
    if len(set(y_fit[:, j])) < 2:   # a label the fit split never varies: the constant
      acc.append(np.mean(y_test[:, j] == y_fit[0, j]))
      continue
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((x_fit - mu) / sd, y_fit[:, j])
    acc.append(np.mean(clf.predict((x_test - mu) / sd) == y_test[:, j]))
  return np.array(acc)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_examples", type=int, default=1000)
  args = parser.parse_args()
  model = clusjax.load_pretrained(args.workdir)
  if model.config.data.name != "shapes":
    raise SystemExit("token_probe: needs the built-in shapes (got "
                     f"data.name={model.config.data.name!r}).")
  (x_fit, y_fit), (x_test, y_test) = (views(model, split, args.num_examples)
                                       for split in ("val", "test"))
  for attribute, names in ATTRIBUTES.items():
    y = y_test[attribute]
    base = np.maximum(y.mean(0), 1 - y.mean(0))
    print(f"\n{attribute} presence (fit on {len(y_fit[attribute])} val images, read on "
          f"{len(y)} test images): {', '.join(names)}")
    print(f"  {'guess':5s} {' '.join(f'{a:.3f}' for a in base)} | mean {base.mean():.3f}")
    for view in VIEWS:
      acc = probe(x_fit[view], y_fit[attribute], x_test[view], y)
      print(f"  {view:5s} {' '.join(f'{a:.3f}' for a in acc)} | mean {acc.mean():.3f}")


if __name__ == "__main__":
  main()
