"""Image <-> text retrieval: recall@K on a paired test split."""
import numpy as np

from clusjax.data import iterate_eval, make_source

RECALL_AT = (1, 5, 10)


def recall_at_k(similarity, ks=RECALL_AT):
  """Recall@K both ways for a paired set (query i's match is item i).

  Args:
    similarity: [N, N] image-by-text scores.
  Returns:
    {"i2t_r1": ..., "t2i_r1": ..., ...} fractions in [0, 1].
  """
  similarity = np.asarray(similarity, np.float64)
  n = similarity.shape[0]
  out = {}
  for name, sim in (("i2t", similarity), ("t2i", similarity.T)):
    # Rank of the true match = number of items scored strictly higher.
    true = sim[np.arange(n), np.arange(n)]
    rank = (sim > true[:, None]).sum(axis=1)
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(rank < k))
  return out


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
  """R@1/5/10 image->text and text->image by ITC similarity."""
  name = "retrieval"

  def __init__(self, config):
    self.config = config

  def run(self, model):
    images, captions = load_eval_pairs(self.config, model.tokenizer,
                                       self.config.eval.num_examples)
    sim = model.encode_image(images) @ model.encode_text(captions).T
    yield "num_examples", len(captions)
    yield from recall_at_k(sim).items()
