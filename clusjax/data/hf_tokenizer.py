"""A Hugging Face tokenizer (WordPiece, BPE, ...) behind clusjax's Tokenizer interface.

    tok = HFTokenizer.from_pretrained("path/to/bert")   # tokenizer.json or vocab.txt
    ids, mask = tok.encode(["a photo of a cat"], 32)   # [CLS] ... [SEP] pad, as Tokenizer

Used for text towers imported from PyTorch (clusjax.export.import_bert),
whose embedding rows are indexed by their own vocabulary. Encoding runs the
`tokenizers` pipeline that transformers' AutoTokenizer runs (normalizer,
pre-tokenizer, model, [CLS]/[SEP] post-processor, truncation to max_len), so
the ids are AutoTokenizer's. `tokenizers` ships with transformers and is
imported only when this class is used.
"""
import json
import os
import threading

import numpy as np

SPECIAL_DEFAULTS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]",
                    "mask": "[MASK]"}


def _token_name(value):
  # special_tokens_map.json may hold {"content": "[CLS]", ...} instead of "[CLS]".
  return value["content"] if isinstance(value, dict) else value


def _read_specials(directory):
  """Special-token strings from tokenizer_config.json / special_tokens_map.json."""
  names = dict(SPECIAL_DEFAULTS)
  for file in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(directory, file)
    if os.path.isfile(path):
      with open(path) as f:
        config = json.load(f)
      names.update({k: _token_name(config[f"{k}_token"]) for k in names
                    if config.get(f"{k}_token")})
  return names


def _wordpiece_from_vocab(directory, names):
  """The pipeline BertTokenizer runs, for checkpoints with vocab.txt but no tokenizer.json."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  config = {}
  config_file = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_file):
    with open(config_file) as f:
      config = json.load(f)
  lower = config.get("do_lower_case", True)
  strip_accents = config.get("strip_accents")
  tokenizer = Tokenizer(models.WordPiece.from_file(os.path.join(directory, "vocab.txt"),
                                                   unk_token=names["unk"]))
  tokenizer.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
      strip_accents=lower if strip_accents is None else strip_accents, lowercase=lower)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  tokenizer.add_special_tokens([t for t in names.values() if tokenizer.token_to_id(t) is not None])
  cls, sep = names["cls"], names["sep"]
  tokenizer.post_processor = processors.BertProcessing((sep, tokenizer.token_to_id(sep)),
                                                       (cls, tokenizer.token_to_id(cls)))
  return tokenizer


class HFTokenizer:
  """Wraps a `tokenizers.Tokenizer`; picklable (Grain workers get a copy)."""

  def __init__(self, tokenizer_json, specials=None, path=None):
    from tokenizers import Tokenizer as RustTokenizer
    self._json = tokenizer_json
    self._path = path
    self._specials = dict(SPECIAL_DEFAULTS, **(specials or {}))
    self._tok = RustTokenizer.from_str(tokenizer_json)
    self._lock = threading.Lock()
    self._by_len = {}
    self._tok.no_padding()
    self._tok.no_truncation()
    ids = {k: self._tok.token_to_id(v) for k, v in self._specials.items()}
    missing = [self._specials[k] for k in ("pad", "cls", "sep") if ids[k] is None]
    if missing:
      raise ValueError(f"tokenizer {path or ''} has no {missing} token; clusjax packs text as "
                       "[CLS] ... [SEP] [PAD]...: pass specials={'cls': ..., ...} naming its own.")
    self._ids = ids

  @classmethod
  def from_pretrained(cls, directory):
    """A transformers tokenizer directory: tokenizer.json, or else vocab.txt (WordPiece)."""
    directory = os.fspath(directory)
    names = _read_specials(directory)
    json_file = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(json_file):
      with open(json_file) as f:
        return cls(f.read(), names, json_file)
    if os.path.isfile(os.path.join(directory, "vocab.txt")):
      return cls(_wordpiece_from_vocab(directory, names).to_str(), names,
                 os.path.join(directory, "vocab.txt"))
    raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {directory!r}.")

  def __getstate__(self):
    return {"json": self._json, "specials": self._specials, "path": self._path}

  def __setstate__(self, state):
    self.__init__(state["json"], state["specials"], state["path"])

  @property
  def path(self):
    return self._path

  @property
  def vocab_size(self):
    return self._tok.get_vocab_size(with_added_tokens=True)

  pad_id = property(lambda self: self._ids["pad"])
  unk_id = property(lambda self: self._ids["unk"])
  cls_id = property(lambda self: self._ids["cls"])
  sep_id = property(lambda self: self._ids["sep"])
  mask_id = property(lambda self: self._ids["mask"])

  def encode(self, texts, max_len):
    """list[str] (B) -> (ids int32 [B, max_len], mask bool [B, max_len]); AutoTokenizer's
    `(texts, padding="max_length", truncation=True, max_length=max_len)`."""
    if max_len < 2:
      raise ValueError(f"max_len={max_len} leaves no room for [CLS] and [SEP]; use >= 2")
    texts = list(texts)
    if not texts:
      return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), bool)
    encodings = self._fixed_length(max_len).encode_batch(texts)
    ids = np.array([e.ids for e in encodings], np.int32)
    return ids, np.array([e.attention_mask for e in encodings], bool)

  def _fixed_length(self, max_len):
    """A copy of the tokenizer that truncates and pads to max_len, made once.

    Never toggles padding on a shared tokenizer: Grain encodes from several
    threads, and one thread's reset would reach another's encode.
    """
    with self._lock:
      if max_len not in self._by_len:
        from tokenizers import Tokenizer as RustTokenizer
        tok = RustTokenizer.from_str(self._json)
        tok.enable_truncation(max_len)
        tok.enable_padding(length=max_len, pad_id=self.pad_id, pad_token=self._specials["pad"])
        self._by_len[max_len] = tok
      return self._by_len[max_len]

  def encode_one(self, text, max_len):
    """str -> (ids int32 [max_len], mask bool [max_len])."""
    ids, mask = self.encode([text], max_len)
    return ids[0], mask[0]

  def decode(self, ids):
    """ids int [B, L] (or [L]) -> list[str] (B, or 1), special tokens dropped."""
    ids = np.asarray(ids)
    rows = ids[None] if ids.ndim == 1 else ids
    return self._tok.decode_batch([[int(i) for i in row] for row in rows],
                                  skip_special_tokens=True)
