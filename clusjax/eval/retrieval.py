"""Image <-> text retrieval: recall@K on a paired test split."""
import numpy as np

from clusjax.data import iterate_eval, make_source

RECALL_AT = (1, 5, 10)


def recall_at_k(similarity, ks=RECALL_AT, t2i_similarity=None):
  """Recall@K both ways for a paired set (query i's match is item i).

  Args:
    similarity: [N, N] image-by-text scores.
    t2i_similarity: optional [N, N] image-by-text scores to rank images for
      each text with (default: `similarity`); re-ranking scores the two
      directions differently.
  Returns:
    {"i2t_r1": ..., "t2i_r1": ..., ...} fractions in [0, 1].
  """
  similarity = np.asarray(similarity, np.float64)
  t2i = similarity if t2i_similarity is None else np.asarray(t2i_similarity, np.float64)
  n = similarity.shape[0]
  out = {}
  for name, sim in (("i2t", similarity), ("t2i", t2i.T)):
    # Rank of the true match = number of items scored strictly higher.
    true = sim[np.arange(n), np.arange(n)]
    rank = (sim > true[:, None]).sum(axis=1)
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(rank < k))
  return out


def mean_top1_probability(similarity, logit_scale):
  """Mean over images of the largest probability of the image->text softmax of
  `logit_scale * similarity` [N_img, N_txt]: how peaked the contrastive
  softmax is (SoftCLIP reports that soft targets lower it)."""
  logits = logit_scale * np.asarray(similarity, np.float64)
  logits -= logits.max(axis=1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return float(probs.max(axis=1).mean())


def rerank_scores(similarity, k, pair_scores):
  """ALBEF re-ranking: each query's ITC top-k re-scored by ITM.

  Args:
    similarity: [N_img, N_txt] ITC scores.
    k: candidates per query.
    pair_scores: fn(image_index [P], text_index [P]) -> ITM scores [P]
      (higher = better match).
  Returns:
    (i2t scores, t2i scores), both [N_img, N_txt]: a query's top-k come
    first, in ITM order; the rest keep their ITC order below them.
  """
  similarity = np.asarray(similarity, np.float64)
  out = []
  for axis in (1, 0):                        # i2t: texts per image; t2i: images per text
    sim = similarity if axis == 1 else similarity.T
    kk = min(k, sim.shape[1])
    top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]          # [Q, k]
    query = np.repeat(np.arange(sim.shape[0]), kk)
    cand = top.reshape(-1)
    img, txt = (query, cand) if axis == 1 else (cand, query)
    itm = np.asarray(pair_scores(img, txt), np.float64).reshape(-1, kk)
    # Shift ITC scores below every ITM score so the top-k stay on top.
    scores = sim - sim.max() - 1.0 + min(itm.min(), 0.0)
    np.put_along_axis(scores, top, itm, axis=1)
    out.append(scores if axis == 1 else scores.T)
  return tuple(out)


def load_eval_pairs(config, tokenizer, num_examples):
  """(images uint8 [N, H, W, 3], captions list[str]) of the eval split, in order."""
  source = make_source(config.data, config.data.eval_split)
  images, captions = [], []
  for batch in iterate_eval(source, batch_size=config.eval.batch_size,
                            image_size=config.data.image_size, tokenizer=tokenizer,
                            max_text_len=config.data.max_text_len,
                            num_examples=num_examples):
    valid = np.asarray(batch["valid"])
    images.append(np.asarray(batch["image"])[valid])
    captions.extend(c for c, v in zip(batch["caption"], valid) if v)
  return np.concatenate(images), captions


class RetrievalEvaluator:
  """R@1/5/10 image->text and text->image by ITC similarity, then (with
  `config.eval.rerank_k` > 0) with the ITC top-k re-ranked by ITM, as ALBEF:
  `rerank_i2t_r1`, ..."""
  name = "retrieval"

  def __init__(self, config):
    self.config = config

  def run(self, model):
    images, captions = load_eval_pairs(self.config, model.tokenizer,
                                       self.config.eval.num_examples)
    image_tokens, image_feats = model.image_outputs(images)
    text_tokens, text_mask, text_feats = model.text_outputs(captions)
    sim = image_feats @ text_feats.T
    yield "num_examples", len(captions)
    yield from recall_at_k(sim).items()
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
        return np.concatenate(out)
      i2t, t2i = rerank_scores(sim, k, pair_scores)
      for key, value in recall_at_k(i2t, t2i_similarity=t2i).items():
        yield f"rerank_{key}", value
