"""Why does ITM re-ranking help or hurt retrieval? Per hard-negative type.

For every query of the built-in test split (image -> text and text -> image), the
ITC top-k candidates that are not a match are typed by how their scene differs
from the query's (clusjax.eval.retrieval.negative_type: count, position, colour,
kind, size, several, same_scene), and for each type this prints

- how often the top-k holds such a negative,
- ITC pairwise accuracy: the true match scores above the negative by ITC,
- ITM pairwise accuracy: ... by the ITM log-odds (what re-ranking uses),
- ITM accuracy: the ITM head calls the negative a non-match (log-odds < 0),
- the same pairwise accuracy for each re-ranking score the evaluator offers
  (config.eval.rerank_score: itm, itm+itc).

First, two figures that bound what re-ranking and R@1 can reach: the test images that
share their whole scene with another (their captions are interchangeable, so paired
R@1 has a ceiling below 1), and the cosine between each caption's text features and
those of the caption with one place word swapped (left <-> right, top <-> bottom):
near 1, the text tower does not read where a shape is.

Last, re-ranked R@1 both ways for each weight of the ITM log-odds in the itm+itc
score (config.eval.rerank_itm_weight): pick the weight on the validation split
(--split=val), report the test split. Beside each, the gain over ITC in points and its
95% interval over the split's queries resampled (a paired bootstrap): how much of a
gain the split alone can show or hide, before any seed-to-seed spread.

    python benchmarks/itm_negatives.py --workdir=workdirs/tiny [--k=16] [--num_examples=1000]
        [--split=test] [--itm_weights=0.25,0.5,1,2]
"""
import argparse
import collections

import numpy as np

import clusjax
from clusjax.data import make_source
from clusjax.data.negatives import swap_word
from clusjax.data.shapes import scene_key
from clusjax.eval.retrieval import (RERANK_SCORES, load_eval_pairs, match_ranks, negative_type,
                                    r1_gains, rerank_pair_scores, rerank_scores)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--num_examples", type=int, default=1000)
  parser.add_argument("--split", default="test", help="the built-in split: test | val")
  parser.add_argument("--itm_weights", default="0.25,0.5,1,2",
                      help="weights of the ITM log-odds in the itm+itc score to sweep")
  args = parser.parse_args()

  model = clusjax.load_pretrained(args.workdir)
  config = model.config
  config.data.eval_split = args.split
  weights = [float(w) for w in args.itm_weights.split(",") if w]
  if config.data.name != "shapes" or config.data.get("captions_per_image", 1) != 1:
    raise SystemExit("itm_negatives: needs the built-in shapes with one caption per image "
                     f"(got data.name={config.data.name!r}).")
  images, captions, _ = load_eval_pairs(config, model.tokenizer, args.num_examples)
  n = len(captions)
  source = make_source(config.data, config.data.eval_split)
  scenes = [source[i] for i in range(n)]
  image_tokens, image_feats = model.image_outputs(images)
  text_tokens, text_mask, text_feats = model.text_outputs(captions)
  sim = image_feats @ text_feats.T
  k = min(args.k, n)

  keys = [scene_key(r) for r in scenes]
  counts = collections.Counter(keys)
  repeats = np.array([counts[key] for key in keys])
  print(f"same-scene repeats: {np.mean(repeats > 1):.3f} of the {n} test images share their "
        f"scene with another; paired R@1 ceiling (ties at random) {np.mean(1 / repeats):.3f}")
  rng = np.random.default_rng(0)
  swapped = [(i, swap_word(c, (("left", "right"), ("top", "bottom")), rng))
             for i, c in enumerate(captions)]
  rows = [i for i, c in swapped if c is not None]
  place_feats = model.text_outputs([c for _, c in swapped if c is not None])[2]
  cos = np.sum(text_feats[rows] * place_feats, axis=1)
  above = np.mean(np.sum(image_feats[rows] * (text_feats[rows] - place_feats), axis=1) > 0)
  print(f"text features: cosine of a caption and its place-swapped copy {np.mean(cos):.4f} "
        f"(min {np.min(cos):.4f}, {len(rows)} captions); ITC scores the image's caption "
        f"above the copy for {above:.3f} of them")

  # Every (query, candidate) pair in a top-k, both directions, plus each query's match.
  pairs = {}
  for direction in ("i2t", "t2i"):
    s = sim if direction == "i2t" else sim.T
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    for q in range(n):
      for c in top[q]:
        img, txt = (q, c) if direction == "i2t" else (c, q)
        pairs[(img, txt)] = None
    for q in range(n):
      pairs[(q, q)] = None
  index = np.array(list(pairs), np.int64)
  itm = np.asarray(model.itm_logits(image_tokens[index[:, 0]], text_tokens[index[:, 1]],
                                    text_mask[index[:, 1]], image_feats[index[:, 0]],
                                    text_feats[index[:, 1]]), np.float64)
  log_odds = dict(zip(map(tuple, index), itm[:, 1] - itm[:, 0]))
  itm_weight = config.eval.get("rerank_itm_weight", 1.0)
  scores = {name: rerank_pair_scores(name, sim[index[:, 0], index[:, 1]], itm[:, 1] - itm[:, 0],
                                     model.logit_scale, itm_weight) for name in RERANK_SCORES}
  scores = {name: dict(zip(map(tuple, index), v)) for name, v in scores.items()}

  for direction in ("i2t", "t2i"):
    s = sim if direction == "i2t" else sim.T
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    stats = collections.defaultdict(lambda: collections.Counter())
    for q in range(n):
      pos = (q, q)
      for c in top[q]:
        if c == q:
          continue
        neg = (q, c) if direction == "i2t" else (c, q)
        kind = negative_type(scenes[q], scenes[c])
        st = stats[kind]
        st["count"] += 1
        st["itc"] += sim[pos] > sim[neg]
        st["itm_pair"] += log_odds[pos] > log_odds[neg]
        st["itm_neg"] += log_odds[neg] < 0
        for name in RERANK_SCORES:
          st[name] += scores[name][pos] > scores[name][neg]
    pos_acc = np.mean([log_odds[(q, q)] > 0 for q in range(n)])
    print(f"\n{direction}: top-{k} of {n} queries; ITM calls {pos_acc:.3f} of the true pairs "
          "a match")
    header = ["negative", "per query", "ITC pair", "ITM pair", "ITM says no"]
    header += [f"{name} pair" for name in RERANK_SCORES]
    print(" | ".join(f"{h:>12}" for h in header))
    for kind in sorted(stats, key=lambda t: -stats[t]["count"]):
      st = stats[kind]
      row = [kind, f"{st['count'] / n:.2f}"] + [
          f"{st[key] / st['count']:.3f}" for key in ["itc", "itm_pair", "itm_neg",
                                                      *RERANK_SCORES]]
      print(" | ".join(f"{v:>12}" for v in row))

  itc = match_ranks(sim)
  print(f"\n{args.split}: ITC R@1 {np.mean(itc['i2t'] == 0):.3f} / {np.mean(itc['t2i'] == 0):.3f}; "
        f"re-ranked (itm+itc, top-{k}) by the weight of the ITM log-odds (this run's: "
        f"{itm_weight});\nthe gain over ITC in points, with its 95% interval over resampled "
        "queries (paired bootstrap):")
  for w in weights:
    def pair_scores(i, j, w=w):
      odds = np.array([log_odds[(a, b)] for a, b in zip(i, j)])
      return rerank_pair_scores("itm+itc", sim[i, j], odds, model.logit_scale, w)
    i2t, t2i = rerank_scores(sim, k, pair_scores)
    ranks = match_ranks(i2t, t2i)
    gains = ["{:+.1f} [{:+.1f}, {:+.1f}]".format(*100 * np.array(gain))
             for gain in r1_gains(itc, ranks).values()]
    print(f"  {w:>5g}: {np.mean(ranks['i2t'] == 0):.3f} / {np.mean(ranks['t2i'] == 0):.3f}   "
          f"gain (points) {gains[0]} / {gains[1]}")


if __name__ == "__main__":
  main()
