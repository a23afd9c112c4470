"""SentencePiece tokenizer with BERT-style special ids.

Ids 0-3 are reserved: pad=0, unk=1, [CLS]=2 (SentencePiece's bos), [SEP]=3
(eos); "[MASK]" is a user-defined piece (for MLM) right after them. Text is
case-folded (nmt_nfkc_cf), so "A Red Circle" and "a red circle" encode alike
and decoding gives lowercase text.
"""
import io
import os

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3
MASK_PIECE = "[MASK]"


class Tokenizer:
  """Wraps a SentencePieceProcessor; picklable (Grain workers get a copy)."""

  def __init__(self, model_proto: bytes, path=None):
    self._proto = model_proto
    self._path = None if path is None else os.fspath(path)
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._mask_id = self._sp.piece_to_id(MASK_PIECE)
    if self._mask_id == self._sp.unk_id():
      raise ValueError(f"tokenizer model {self._path} has no {MASK_PIECE} piece; "
                       "train it with Tokenizer.train")
    self._special = frozenset((PAD_ID, CLS_ID, SEP_ID, self._mask_id))

  # Pickle the serialized model, not the (unpicklable) C++ processor.
  def __getstate__(self):
    return {"proto": self._proto, "path": self._path}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["path"])

  @classmethod
  def train(cls, texts, path, vocab_size, *, model_type="bpe"):
    """Trains on `texts` (an iterable of str) in memory and writes `path`.

    `vocab_size` is an upper bound (hard_vocab_limit=False): a small corpus
    such as the shapes captions gives a smaller vocabulary. BPE by default:
    on the shapes captions unigram stopped at 67 pieces (mostly characters,
    ~36 tokens per caption) whatever the vocab_size, while BPE at 256 keeps
    whole words (<= 32 tokens with [CLS]/[SEP]).
    """
    model = io.BytesIO()
    # SentencePiece rejects empty sentences and very long lines; both only
    # occur in bad records.
    sentences = (t for t in texts if t and t.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
        model_type=model_type, hard_vocab_limit=False, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=CLS_ID, eos_id=SEP_ID,
        pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
        user_defined_symbols=[MASK_PIECE], minloglevel=2)
    proto = model.getvalue()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
      f.write(proto)
    return cls(proto, path)

  @classmethod
  def load(cls, path):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no SentencePiece model at {path!r} (set config.data.tokenizer "
                              "to a model file, or to \"\" to train one)")
    with open(path, "rb") as f:
      return cls(f.read(), path)

  @property
  def path(self):
    return self._path

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()

  pad_id = property(lambda self: PAD_ID)
  unk_id = property(lambda self: UNK_ID)
  cls_id = property(lambda self: CLS_ID)
  sep_id = property(lambda self: SEP_ID)

  @property
  def mask_id(self):
    return self._mask_id

  def _pack(self, pieces, max_len):
    """pieces list[int] -> ids int32 [max_len], mask bool [max_len]: [CLS] ... [SEP] pad."""
    if max_len < 2:
      raise ValueError(f"max_len={max_len} leaves no room for [CLS] and [SEP]; use >= 2")
    tokens = [CLS_ID] + list(pieces[:max_len - 2]) + [SEP_ID]  # [SEP] survives truncation
    ids = np.full((max_len,), PAD_ID, np.int32)
    ids[:len(tokens)] = tokens
    return ids, np.arange(max_len) < len(tokens)

  def encode_one(self, text, max_len):
    """str -> (ids int32 [max_len], mask bool [max_len]); mask True on real tokens."""
    return self._pack(self._sp.encode(text), max_len)

  def encode(self, texts, max_len):
    """list[str] (B) -> (ids int32 [B, max_len], mask bool [B, max_len])."""
    texts = list(texts)
    if not texts:
      return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), bool)
    packed = [self._pack(p, max_len) for p in self._sp.encode(texts)]
    return np.stack([p[0] for p in packed]), np.stack([p[1] for p in packed])

  def decode(self, ids):
    """ids int [B, L] (or [L]) -> list[str] (B, or 1), special tokens dropped."""
    ids = np.asarray(ids)
    rows = ids[None] if ids.ndim == 1 else ids
    return [self._sp.decode([int(i) for i in row if i not in self._special]) for row in rows]
