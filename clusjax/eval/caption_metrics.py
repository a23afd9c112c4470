"""Caption metrics: BLEU-1..4, CIDEr-D and ROUGE-L from `pycocoevalcap`'s scorers
(the COCO caption evaluation code), plus exact match.

pycocoevalcap's PTBTokenizer runs Stanford CoreNLP in Java; clusjax does not
need Java: `tokenize` is a plain lower-case, punctuation-split tokenization
(punctuation dropped, as PTBTokenizer's output drops it), so the figures can
differ slightly from the official COCO server's on real captions. The scorers
themselves (Bleu, Cider = CIDEr-D with its document frequencies from the
references, Rouge) are pure Python.
"""
import contextlib
import io
import re

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text):
  """'A red circle, on the LEFT.' -> 'a red circle on the left' (lower-case words;
  punctuation dropped)."""
  return " ".join(_WORD.findall(text.lower()))


def caption_scores(candidates, references):
  """Corpus scores of candidates [N str] against references [N list[str]].

  Returns {"bleu1".."bleu4", "cider", "rouge_l"} (fractions; CIDEr-D on its 0-10
  scale, COCO papers print it x 100). Empty input gives {}.
  """
  if not candidates:
    return {}
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists.")
  res = {i: [tokenize(c)] for i, c in enumerate(candidates)}
  gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
  with contextlib.redirect_stdout(io.StringIO()):   # Bleu prints its n-gram counts
    bleu, _ = Bleu(4).compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
  out = {f"bleu{n}": float(b) for n, b in enumerate(bleu, start=1)}
  out.update(cider=float(cider), rouge_l=float(rouge))
  return out


def exact_match(candidates, references):
  """Fraction of candidates equal (after `tokenize`) to one of their references."""
  if not candidates:
    return 0.0
  hits = [tokenize(c) in {tokenize(r) for r in refs} for c, refs in zip(candidates, references)]
  return sum(hits) / len(hits)


def names_objects(caption, objects):
  """Whether `caption` names every (colour, kind) of `objects` as "colour kind"
  (e.g. "red circle"; the built-in shapes' captions put the size before them)."""
  words = tokenize(caption)
  return all(re.search(rf"\b{c} {k}\b", words) for c, k in objects)
