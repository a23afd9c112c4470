"""SentencePiece tokenizer: special ids, packing, round trip, persistence."""
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from clusjax.data import Tokenizer
from clusjax.data.shapes import make_split

CAPTIONS = make_split("train", 400, 16)["captions"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return Tokenizer.train(CAPTIONS, tmp_path_factory.mktemp("tok") / "sub" / "t.model", 256)


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)
  assert tok.mask_id not in (0, 1, 2, 3) and tok.mask_id < tok.vocab_size
  assert tok.vocab_size <= 256
  ids, mask = tok.encode(["a small red circle on the left."], 16)
  n = mask[0].sum()
  assert ids[0, 0] == tok.cls_id and ids[0, n - 1] == tok.sep_id
  assert np.all(ids[0, n:] == tok.pad_id) and mask[0, :n].all() and not mask[0, n:].any()
  assert not np.isin(ids[0, 1:n - 1], [0, 1, 2, 3, tok.mask_id]).any()


def test_matches_sentencepiece_and_round_trips(tok):
  ids, mask = tok.encode(CAPTIONS[:50], 48)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (50, 48)
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  for row, m, caption in zip(ids, mask, CAPTIONS[:50]):
    assert row[1:m.sum() - 1].tolist() == sp.encode(caption)
  assert tok.decode(ids) == CAPTIONS[:50]
  # Whole words: a 3-shape caption fits the tiny config's 32 tokens.
  assert mask.sum(1).max() <= 32


def test_truncation_keeps_sep_last(tok):
  ids, mask = tok.encode(CAPTIONS[:5], 6)
  assert mask.all()
  assert np.all(ids[:, 0] == tok.cls_id) and np.all(ids[:, -1] == tok.sep_id)
  one_ids, one_mask = tok.encode_one(CAPTIONS[0], 6)
  np.testing.assert_array_equal(one_ids, ids[0])
  np.testing.assert_array_equal(one_mask, mask[0])
  with pytest.raises(ValueError, match="max_len=1"):
    tok.encode_one("a", 1)


def test_decode_drops_special_tokens_and_case_folds(tok):
  ids, _ = tok.encode(["A Small RED circle."], 12)
  ids[0, 2] = tok.mask_id
  text = tok.decode(ids[0])
  assert len(text) == 1 and "[" not in text[0] and text[0].endswith("circle.")
  np.testing.assert_array_equal(tok.encode(["A Small RED circle."], 12)[0],
                                tok.encode(["a small red circle."], 12)[0])


def test_load_and_pickle_give_identical_ids(tok):
  loaded = Tokenizer.load(tok.path)
  copied = pickle.loads(pickle.dumps(tok))
  ref = tok.encode(CAPTIONS[:20], 40)[0]
  for other in (loaded, copied):
    np.testing.assert_array_equal(other.encode(CAPTIONS[:20], 40)[0], ref)
    assert other.mask_id == tok.mask_id and other.vocab_size == tok.vocab_size


def test_load_missing_names_path(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    Tokenizer.load(missing)
