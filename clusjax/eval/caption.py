"""Captioning: generate a caption per eval image and score it against the references.

Metrics (`caption/<name>` in eval_results.json): bleu1..bleu4, cider (CIDEr-D),
rouge_l, exact_match (the caption equals one of its references), on all images;
on the built-in shapes also the in-domain / novel-object halves (cider_in_domain,
cider_novel, exact_match_in_domain, exact_match_novel, bleu4_novel, ...) and
`names_objects`: the fraction of images whose caption names every shape's colour
and kind. With a workdir, captions.jsonl holds one line per image: image id,
caption, references (and whether it holds a novel object).
"""
import json
import os

import jax
import numpy as np

from clusjax.data import iterate_eval, make_source
from clusjax.data.captions import eval_images
from clusjax.eval.caption_metrics import caption_scores, exact_match, names_objects

CAPTIONS_FILE = "captions.jsonl"


class CaptionEvaluator:
  """Decodes with config.caption.beam_size (beam search; 1 = greedy) and scores."""
  name = "caption"

  def __init__(self, config):
    self.config = config
    self.workdir = None   # set by clusjax.eval.evaluate: where captions.jsonl goes

  def captions(self, model):
    """(image ids, captions, infos) of the first config.eval.num_examples eval images."""
    c = self.config
    images = eval_images(make_source(c.data, c.data.eval_split, "caption"))
    ids, captions = [], []
    for batch in iterate_eval(images, batch_size=c.eval.batch_size,
                              image_size=c.data.image_size, tokenizer=model.tokenizer,
                              max_text_len=c.data.max_text_len,
                              num_examples=c.eval.num_examples):
      n = int(np.asarray(batch["valid"]).sum())
      captions += model.caption(batch["image"][:n], beam_size=c.caption.beam_size)
      ids += [int(i) for i in batch["image_id"][:n]]
    return ids, captions, [images.info(i) for i in ids]

  def run(self, model):
    ids, captions, infos = self.captions(model)
    refs = [info["references"] for info in infos]
    yield "num_examples", len(captions)
    yield from caption_scores(captions, refs).items()
    yield "exact_match", exact_match(captions, refs)
    novel = np.asarray([info["novel"] for info in infos], bool)
    if novel.any():
      for part, keep in (("in_domain", ~novel), ("novel", novel)):
        sub = [i for i in range(len(captions)) if keep[i]]
        scores = caption_scores([captions[i] for i in sub], [refs[i] for i in sub])
        for key in ("bleu4", "cider"):
          yield f"{key}_{part}", scores[key]
        yield f"exact_match_{part}", exact_match([captions[i] for i in sub],
                                                 [refs[i] for i in sub])
        yield f"num_{part}", len(sub)
    if infos and all(info["objects"] is not None for info in infos):
      yield "names_objects", float(np.mean([names_objects(c, info["objects"])
                                            for c, info in zip(captions, infos)]))
    if self.workdir is not None and jax.process_index() == 0:
      with open(os.path.join(self.workdir, CAPTIONS_FILE), "w") as f:
        for i, caption, info in zip(ids, captions, infos):
          f.write(json.dumps({"image_id": i, "caption": caption,
                              "references": info["references"],
                              "novel": bool(info["novel"])}) + "\n")
