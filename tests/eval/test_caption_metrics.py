"""Caption metrics (clusjax/eval/caption_metrics.py): the tokenization, BLEU by hand,
CIDEr-D's ordering, exact match and the colour-kind check."""
import numpy as np
import pytest

from clusjax.eval.caption_metrics import caption_scores, exact_match, names_objects, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
  assert tokenize("A Red circle, on the LEFT; there's  more.") == (
      "a red circle on the left there's more")


def test_bleu_by_hand():
  """cand 'a red circle on the left' vs ref 'a red circle at the top': unigram
  precision 4/6, bigram 2/5, equal lengths (no brevity penalty)."""
  s = caption_scores(["A red circle on the left."], [["a red circle at the top."]])
  assert s["bleu1"] == pytest.approx(4 / 6, rel=1e-6)
  assert s["bleu2"] == pytest.approx(np.sqrt(4 / 6 * 2 / 5), rel=1e-6)
  # ROUGE-L: LCS 4 ("a red circle the") of 6 and 6 words, beta 1.2.
  p = r = 4 / 6
  assert s["rouge_l"] == pytest.approx((1 + 1.2 ** 2) * p * r / (r + 1.2 ** 2 * p), rel=1e-6)


def test_cider_prefers_the_right_caption_and_perfect_bleu():
  refs = [["a small red circle on the left.", "there is a small red circle on the left."],
          ["a large blue square at the top.", "a photo of a large blue square at the top."],
          ["a small green cross in the center.", "a small green cross is in the center."]]
  right = [r[0] for r in refs]
  wrong = ["a large blue square at the top."] * 3
  good, bad = caption_scores(right, refs), caption_scores(wrong, refs)
  assert good["cider"] > bad["cider"] > 0
  assert good["bleu4"] == pytest.approx(1.0, abs=1e-6)
  assert caption_scores([], []) == {}


def test_exact_match_and_names_objects():
  refs = [["a red circle.", "there is a red circle."], ["a blue cross."]]
  assert exact_match(["There is a red circle", "a blue square."], refs) == 0.5
  assert names_objects("a small red circle and a large blue cross.",
                       [("red", "circle"), ("blue", "cross")])
  assert not names_objects("a small red circle and a large blue square.",
                           [("red", "circle"), ("blue", "cross")])
  assert not names_objects("a red circles", [("red", "circle")])
