"""clusjax's SentencePiece BPE tokenizer as a Hugging Face `tokenizer.json`.

    tokenizer = sentencepiece_to_hf(open("tokenizer.model", "rb").read())
    write_tokenizer_files(tokenizer, "export/text_model", max_len=32)
    AutoTokenizer.from_pretrained("export/text_model")(texts)   # same ids as Tokenizer.encode

The pieces of the `tokenizers` pipeline, and the SentencePiece step each one
reproduces (for the models `Tokenizer.train` writes: BPE, nmt_nfkc_cf, no
byte fallback):
  normalizer  Precompiled(charsmap)   the model's own NFKC + case-folding table
              Strip, Replace(" {2,}") remove_extra_whitespaces
  pre-tokens  Metaspace("▁", always)  add_dummy_prefix, split_by_whitespace
  model       BPE, merges by score    SentencePiece merges the adjacent pair whose
                                      piece scores highest; a merge's rank here is
                                      its piece's id (ids are in score order)
  post        [CLS] $A [SEP]          Tokenizer._pack
One known difference: a literal "[MASK]" inside the text is one token in both,
but SentencePiece also keeps the "▁" before it as a piece of its own and gives
the word after it no "▁"; tests/export/test_pytorch.py checks equality on the
shapes captions and odd spacing, case and Unicode.
"""
import json
import os

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def _bpe_merges(pieces):
  """[(left, right)] ranked as SentencePiece applies them: by the merged piece's id."""
  ids = {p.piece: i for i, p in enumerate(pieces) if p.type == _NORMAL}
  merges = []
  for i, p in enumerate(pieces):
    if p.type != _NORMAL:
      continue
    for cut in range(1, len(p.piece)):
      left, right = p.piece[:cut], p.piece[cut:]
      if left in ids and right in ids:
        merges.append((i, ids[left], ids[right], left, right))
  return [(left, right) for *_, left, right in sorted(merges)]


def sentencepiece_to_hf(model_proto):
  """A serialized SentencePiece BPE model (bytes) -> tokenizers.Tokenizer."""
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
  from tokenizers import pre_tokenizers, processors

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise ValueError("only SentencePiece BPE models convert (Tokenizer.train's default); got "
                     f"model_type={proto.trainer_spec.model_type}.")
  if proto.trainer_spec.byte_fallback:
    raise ValueError("SentencePiece byte_fallback is not supported by this converter.")
  pieces = proto.pieces
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  tokenizer = Tokenizer(models.BPE(vocab, _bpe_merges(pieces),
                                   unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                                   byte_fallback=False))
  steps = [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
  if proto.normalizer_spec.precompiled_charsmap:
    steps.insert(0, normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
  tokenizer.normalizer = normalizers.Sequence(steps)
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
  tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in pieces if p.type in (_UNKNOWN, _CONTROL, _USER_DEFINED)])
  cls, sep = pieces[proto.trainer_spec.bos_id].piece, pieces[proto.trainer_spec.eos_id].piece
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
      special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
  return tokenizer


def write_tokenizer_files(tokenizer, directory, *, max_len, pad="[PAD]", unk="[UNK]",
                          cls="[CLS]", sep="[SEP]", mask="[MASK]"):
  """Writes tokenizer.json + tokenizer_config.json that AutoTokenizer loads.

  `max_len` becomes model_max_length, so `truncation=True` cuts where
  clusjax does (the position table has exactly max_len rows).
  """
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "pad_token": pad, "unk_token": unk, "cls_token": cls, "sep_token": sep,
            "mask_token": mask, "padding_side": "right", "truncation_side": "right",
            "model_input_names": ["input_ids", "attention_mask"]}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
