"""Image <-> text retrieval: recall@K on a paired test split."""
import numpy as np

from clusjax.data import iterate_eval, make_source

RECALL_AT = (1, 5, 10)


def match_ranks(similarity, t2i_similarity=None, text_image=None):
  """Each query's rank of its match, both ways; an image may have several captions
  (COCO, Flickr30k: 5).

  image->text: image i is a hit at K when any of its captions ranks in its top K,
  i.e. fewer than K captions score strictly higher than its best own caption.
  An image with no caption is skipped (not in the i2t mean). text->image:
  caption j is a hit at K when image text_image[j] ranks in its top K. Ties
  count for the query: only strictly higher scores push a match down.

  Args:
    similarity: [N_img, N_txt] image-by-text scores.
    t2i_similarity: optional [N_img, N_txt] image-by-text scores to rank images
      for each text with (default: `similarity`); re-ranking scores the two
      directions differently.
    text_image: optional int [N_txt], the image of each caption; None = paired
      (N_img == N_txt, caption i belongs to image i).
  Returns:
    {"i2t": int [N_img with a caption], "t2i": int [N_txt]}: 0 = the match first
    (a hit at K when the rank is below K).
  """
  similarity = np.asarray(similarity, np.float64)
  t2i = similarity if t2i_similarity is None else np.asarray(t2i_similarity, np.float64)
  if similarity.ndim != 2:
    raise ValueError(f"similarity {similarity.shape} must be [N_img, N_txt].")
  if t2i.shape != similarity.shape:
    raise ValueError(f"t2i_similarity {t2i.shape} must match similarity {similarity.shape}.")
  n_img, n_txt = similarity.shape
  if text_image is None:
    if n_img != n_txt:
      raise ValueError(f"similarity {similarity.shape} is not square: a paired set needs "
                       "N_img == N_txt; pass text_image for several captions per image.")
    text_image = np.arange(n_txt)
  text_image = np.asarray(text_image)
  if text_image.shape != (n_txt,) or not np.issubdtype(text_image.dtype, np.integer):
    raise ValueError(f"text_image {text_image.shape} {text_image.dtype} must be int "
                     f"[N_txt] = [{n_txt}].")
  if n_txt and (text_image.min() < 0 or text_image.max() >= n_img):
    raise ValueError(f"text_image values [{text_image.min()}, {text_image.max()}] must be "
                     f"image indices in [0, {n_img}).")
  txt = np.arange(n_txt)
  # Each image's best own caption score: O(N_txt), no [N_img, N_txt] float copy.
  best = np.full(n_img, -np.inf)
  np.maximum.at(best, text_image, similarity[text_image, txt])
  has_caption = np.bincount(text_image, minlength=n_img) > 0
  # Rank of the true match = number of items scored strictly higher.
  return {"i2t": (similarity > best[:, None]).sum(axis=1)[has_caption],
          "t2i": (t2i > t2i[text_image, txt][None, :]).sum(axis=0)}


def recall_at_k(similarity, ks=RECALL_AT, t2i_similarity=None, text_image=None):
  """Recall@K both ways (`match_ranks`' arguments).

  Returns:
    {"i2t_r1": ..., "t2i_r1": ..., ..., "rsum": ...}: recalls are fractions in
    [0, 1]; rsum is their sum over both directions and all ks.
  """
  return recalls(match_ranks(similarity, t2i_similarity, text_image), ks)


def recalls(ranks, ks=RECALL_AT):
  """`recall_at_k`'s figures from `match_ranks`' ranks."""
  out = {}
  for name, rank in ranks.items():
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(rank < k))
  out["rsum"] = sum(out[f"{name}_r{k}"] for name in ranks for k in ks)
  return out


def paired_bootstrap(before, after, num_samples=4000, level=0.95, seed=0):
  """The change in a per-query score (e.g. R@1 hits, `match_ranks(...) < 1`, before and
  after re-ranking) and how sure it is: the mean of after - before over the queries,
  and its `level` percentile interval over `num_samples` resamplings of the queries.
  Both are resampled together (the same queries), so the interval is the change's own,
  much narrower than either recall's.

  Returns (change, low, high), as fractions.
  """
  before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
  if before.ndim != 1 or before.shape != after.shape or not before.size:
    raise ValueError(f"before {before.shape} and after {after.shape} must be the same "
                     "non-empty [N_queries].")
  if not 0.0 < level < 1.0 or num_samples < 1:
    raise ValueError(f"level={level} must be in (0, 1) and num_samples={num_samples} >= 1.")
  diff, n = after - before, before.size
  rng = np.random.default_rng(seed)
  means = np.concatenate([diff[rng.integers(0, n, (min(500, num_samples - i), n))].mean(axis=1)
                          for i in range(0, num_samples, 500)])
  tail = 100.0 * (1.0 - level) / 2.0
  low, high = np.percentile(means, [tail, 100.0 - tail])
  return float(diff.mean()), float(low), float(high)


def r1_gains(before, after):
  """R@1's change from `match_ranks` `before` to `after` (the same queries), with its
  95% interval: {direction: (change, low, high)} (`paired_bootstrap`)."""
  return {d: paired_bootstrap(before[d] == 0, after[d] == 0) for d in before}


def mean_top1_probability(similarity, logit_scale):
  """Mean over images of the largest probability of the image->text softmax of
  `logit_scale * similarity` [N_img, N_txt]: how peaked the contrastive
  softmax is (SoftCLIP reports that soft targets lower it)."""
  logits = logit_scale * np.asarray(similarity, np.float64)
  logits -= logits.max(axis=1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return float(probs.max(axis=1).mean())


# What a re-ranked candidate is scored by (config.eval.rerank_score): itm = the ITM
# log-odds of a match (ALBEF); itm+itc = those (times config.eval.rerank_itm_weight)
# plus the ITC logit (cosine x the learned logit scale): the two heads as a product of
# experts, as BLIP adds its ITM score to the ITC similarity.
# benchmarks/itm_negatives.py compares them per negative type and sweeps the weight.
RERANK_SCORES = ("itm", "itm+itc")


def rerank_pair_scores(name, itc_similarity, itm_log_odds, logit_scale, itm_weight=1.0):
  """The re-ranking score `name` (RERANK_SCORES) of pairs: cosines [P], log-odds [P] -> [P]."""
  if name == "itm":
    return np.asarray(itm_log_odds, np.float64)
  if name == "itm+itc":
    return itm_weight * np.asarray(itm_log_odds, np.float64) + logit_scale * np.asarray(
        itc_similarity, np.float64)
  raise ValueError(f"re-ranking score {name!r} is unknown; use one of {RERANK_SCORES}")


def negative_type(query, candidate):
  """How two built-in shapes scenes (records with num_shapes, kind, colour, size,
  position) differ: count | position (the same number of shapes, other places) |
  colour | kind | size (one attribute of the shapes at the same places) | several |
  same_scene (a true match that another image or caption draws)."""
  n = int(query["num_shapes"])
  if n != int(candidate["num_shapes"]):
    return "count"
  order_q, order_c = (np.argsort(np.asarray(r["position"])[:n]) for r in (query, candidate))
  if not np.array_equal(np.asarray(query["position"])[:n][order_q],
                        np.asarray(candidate["position"])[:n][order_c]):
    return "position"
  differ = [key for key in ("colour", "kind", "size")
            if not np.array_equal(np.asarray(query[key])[:n][order_q],
                                  np.asarray(candidate[key])[:n][order_c])]
  return differ[0] if len(differ) == 1 else "several" if differ else "same_scene"


def rerank_scores(similarity, k, pair_scores):
  """ALBEF re-ranking: each query's ITC top-k re-scored by ITM.

  Args:
    similarity: [N_img, N_txt] ITC scores.
    k: candidates per query.
    pair_scores: fn(image_index [P], text_index [P]) -> re-ranking scores [P]
      (higher = better match; see rerank_pair_scores). Called once, on the distinct
      pairs of both directions (a pair in an image's top-k and its text's is scored
      once: ~40% fewer ITM passes on the built-in test split).
  Returns:
    (i2t scores, t2i scores), both [N_img, N_txt]: a query's top-k come
    first, in ITM order; the rest keep their ITC order below them.
  """
  similarity = np.asarray(similarity, np.float64)
  num_texts = similarity.shape[1]
  sims, tops, pairs = [], [], []
  for axis in (1, 0):                        # i2t: texts per image; t2i: images per text
    sim = similarity if axis == 1 else similarity.T
    kk = min(k, sim.shape[1])
    top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]          # [Q, k]
    query = np.repeat(np.arange(sim.shape[0]), kk)
    cand = top.reshape(-1)
    img, txt = (query, cand) if axis == 1 else (cand, query)
    sims.append(sim)
    tops.append(top)
    pairs.append(img * num_texts + txt)
  distinct, where = np.unique(np.concatenate(pairs), return_inverse=True)
  itm_all = np.asarray(pair_scores(distinct // num_texts, distinct % num_texts), np.float64)
  out, offset = [], 0
  for axis, sim, top in zip((1, 0), sims, tops):
    itm = itm_all[where[offset:offset + top.size]].reshape(top.shape)
    offset += top.size
    # Shift ITC scores below every ITM score so the top-k stay on top.
    scores = sim - sim.max() - 1.0 + min(itm.min(), 0.0)
    np.put_along_axis(scores, top, itm, axis=1)
    out.append(scores if axis == 1 else scores.T)
  return tuple(out)


def load_eval_pairs(config, tokenizer, num_examples):
  """The eval split's images and captions, in order.

  Returns (images uint8 [N_img, H, W, 3], captions list[str] [N_txt], text_image):
  records with an "image_id" (several captions per image: the built-in shapes
  with config.data.captions_per_image > 1, COCO / Flickr JSONL) give each image
  once and text_image int [N_txt], the image index of each caption; otherwise
  text_image is None (caption i is image i's).
  """
  source = make_source(config.data, config.data.eval_split, config.get("task", "pretrain"))
  images, captions, image_ids = [], [], []
  for batch in iterate_eval(source, batch_size=config.eval.batch_size,
                            image_size=config.data.image_size, tokenizer=tokenizer,
                            max_text_len=config.data.max_text_len,
                            num_examples=num_examples):
    valid = np.asarray(batch["valid"])
    images.append(np.asarray(batch["image"])[valid])
    captions.extend(c for c, v in zip(batch["caption"], valid) if v)
    if "image_id" in batch:
      image_ids.append(np.asarray(batch["image_id"])[valid])
  images = np.concatenate(images)
  if not image_ids:
    return images, captions, None
  ids = np.concatenate(image_ids)
  # Each image once, in order of its first caption; text_image maps captions to it.
  _, first, text_image = np.unique(ids, return_index=True, return_inverse=True)
  order = np.argsort(first)
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return images[first[order]], captions, rank[text_image]


class RetrievalEvaluator:
  """R@1/5/10 image->text and text->image by ITC similarity, then (with
  `config.eval.rerank_k` > 0) with the ITC top-k re-ranked by ITM, as ALBEF
  (or by ITM and ITC together: config.eval.rerank_score):
  `rerank_i2t_r1`, ..., and R@1's change `rerank_i2t_r1_gain` with its 95% interval
  over resampled queries (`_low`, `_high`; `paired_bootstrap`); `rsum` is the sum of
  the six recalls. With several captions per image (records with "image_id"), the
  COCO / Flickr protocol: an image's hit is any of its captions, a caption's its
  image."""
  name = "retrieval"

  def __init__(self, config):
    self.config = config

  def run(self, model):
    images, captions, text_image = load_eval_pairs(self.config, model.tokenizer,
                                                   self.config.eval.num_examples)
    image_tokens, image_feats = model.image_outputs(images)
    text_tokens, text_mask, text_feats = model.text_outputs(captions)
    sim = image_feats @ text_feats.T
    yield "num_examples", len(captions)
    yield "num_images", len(images)
    itc_ranks = match_ranks(sim, text_image=text_image)
    yield from recalls(itc_ranks).items()
    yield "i2t_top1_prob", mean_top1_probability(sim, model.logit_scale)
    k = self.config.eval.rerank_k
    if k:
      def pair_scores(i, j):
        # Gathered a chunk at a time: N * k token copies would not fit at Base size.
        chunk = 4 * self.config.eval.batch_size
        out = []
        for s in range(0, len(i), chunk):
          ii, jj = i[s:s + chunk], j[s:s + chunk]
          logits = model.itm_logits(image_tokens[ii], text_tokens[jj], text_mask[jj],
                                    image_feats[ii], text_feats[jj])
          out.append(logits[:, 1] - logits[:, 0])   # log-odds of a match
        return rerank_pair_scores(self.config.eval.get("rerank_score", "itm"), sim[i, j],
                                  np.concatenate(out), model.logit_scale,
                                  self.config.eval.get("rerank_itm_weight", 1.0))
      i2t, t2i = rerank_scores(sim, k, pair_scores)
      ranks = match_ranks(i2t, t2i, text_image)
      for key, value in recalls(ranks).items():
        yield f"rerank_{key}", value
      # R@1's change and its 95% interval over the queries resampled: how much of it
      # the split's sample of queries alone could make.
      for direction, gain in r1_gains(itc_ranks, ranks).items():
        for suffix, value in zip(("", "_low", "_high"), gain):
          yield f"rerank_{direction}_r1_gain{suffix}", value
