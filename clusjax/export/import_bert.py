"""A BERT-architecture PyTorch checkpoint as clusjax's Flax text encoder.

    bert = import_bert("path/to/bert")            # transformers directory, a .safetensors /
                                                  # .bin file, or a state dict (+ num_heads=)
    ids, mask = bert.tokenizer.encode(["a photo of a cat"], 32)   # its WordPiece vocabulary
    states = bert.encode_tokens(ids, mask)        # float32 [B, L, H]: BertModel's last_hidden_state

The weights are re-keyed by hf_convert.bert_params_from_hf (pooler dropped);
`config.model.text.init_from` puts them into a ClusModel's text tower through
`ImportedBert.text_tower_params` (clusjax/train/state.py).
"""
import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np

from clusjax.data.hf_tokenizer import HFTokenizer
from clusjax.export.hf_convert import bert_params_from_hf
from clusjax.models.bert import BertEncoder
from clusjax.models.clus import padded_vocab_size

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# ClusModel builds its text tower with BertEncoder's default epsilon.
_CLUS_LAYER_NORM_EPS = 1e-12


def _read_weights(file):
  if file.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(file)
  import torch   # .bin / .pt: a pickled state dict; weights_only refuses arbitrary objects
  return torch.load(file, map_location="cpu", weights_only=True)


def _read_directory(directory):
  """(state dict, config dict) of a transformers checkpoint directory (sharded or not)."""
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise FileNotFoundError(f"{directory!r} has no config.json: not a transformers checkpoint "
                            "directory (pass the weights file and num_heads= instead).")
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  for name in _WEIGHT_FILES:
    if os.path.isfile(os.path.join(directory, name)):
      return _read_weights(os.path.join(directory, name)), config
  for name in _INDEX_FILES:
    if os.path.isfile(os.path.join(directory, name)):
      with open(os.path.join(directory, name)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      state_dict = {}
      for shard in shards:
        state_dict.update(_read_weights(os.path.join(directory, shard)))
      return state_dict, config
  raise FileNotFoundError(
      f"{directory!r} has config.json but none of {_WEIGHT_FILES + _INDEX_FILES}.")


def _check_config(config, where):
  problems = []
  if config.get("model_type", "bert") != "bert":
    problems.append(f"model_type={config['model_type']!r} (only 'bert'; RoBERTa-style models "
                    "offset their position ids)")
  if config.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={config['hidden_act']!r} (only the erf 'gelu')")
  if config.get("position_embedding_type", "absolute") != "absolute":
    problems.append(f"position_embedding_type={config['position_embedding_type']!r}")
  if config.get("is_decoder") or config.get("add_cross_attention"):
    problems.append("a decoder / cross-attention config")
  if problems:
    raise ValueError(f"{where} is not a plain BERT encoder: {'; '.join(problems)}.")


def _shape_config(params):
  """The BertConfig fields that the param shapes fix."""
  def rows(name):
    return params[name]["embedding"].shape[0]
  return {"vocab_size": rows("word_embeddings"),
          "max_position_embeddings": rows("position_embeddings"),
          "type_vocab_size": rows("token_type_embeddings"),
          "hidden_size": params["embed_norm"]["scale"].shape[0],
          "num_hidden_layers": sum(k.startswith("layer_") for k in params),
          "intermediate_size": params["layer_0"]["mlp"]["fc1"]["kernel"].shape[1]}


@dataclasses.dataclass
class ImportedBert:
  """Flax BertEncoder params (numpy), the HF BertConfig fields, and the tokenizer (or None)."""
  params: Any
  config: dict
  tokenizer: HFTokenizer | None = None

  @functools.cached_property
  def module(self):
    c = self.config
    return BertEncoder(
        vocab_size=c["vocab_size"], width=c["hidden_size"], depth=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
        max_len=c["max_position_embeddings"], type_vocab_size=c["type_vocab_size"],
        layer_norm_eps=c.get("layer_norm_eps", 1e-12))

  @functools.cached_property
  def _apply(self):
    import jax
    params = jax.device_put(self.params)
    fn = jax.jit(self.module.apply)
    return lambda ids, mask: fn({"params": params}, ids, mask)

  def encode_tokens(self, input_ids, attention_mask=None):
    """input_ids int [B, L], attention_mask int/bool [B, L] (1 = real token; None = all)
    -> last hidden states float32 [B, L, H], as BertModel(...).last_hidden_state."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"input_ids must be an int array [B, L]; got {ids.dtype} {ids.shape}.")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    return np.asarray(self._apply(ids.astype(np.int32), mask), np.float32)

  def text_tower_params(self, target):
    """These params fitted to a ClusModel text tower `target` (its params['text']; arrays or
    ShapeDtypeStructs): the word table padded with zero rows to the model's padded vocab
    (padded ids never occur), the position table cut to config.data.max_text_len rows."""
    from flax import traverse_util
    eps = self.config.get("layer_norm_eps", 1e-12)
    if eps != _CLUS_LAYER_NORM_EPS:
      raise ValueError(f"checkpoint layer_norm_eps={eps}; ClusModel's text tower uses "
                       f"{_CLUS_LAYER_NORM_EPS}.")
    ours = traverse_util.flatten_dict(self.params)
    theirs = traverse_util.flatten_dict(target)
    if ours.keys() != theirs.keys():
      raise ValueError(
          "checkpoint and text tower differ in layers: config.model.text.depth must equal the "
          f"checkpoint's num_hidden_layers={self.config.get('num_hidden_layers')} (extra "
          f"{sorted('/'.join(k) for k in ours.keys() - theirs.keys())[:4]}, missing "
          f"{sorted('/'.join(k) for k in theirs.keys() - ours.keys())[:4]}).")
    out = {}
    for key, value in ours.items():
      shape = tuple(theirs[key].shape)
      if key == ("word_embeddings", "embedding") and padded_vocab_size(len(value)) == shape[0]:
        value = np.concatenate([value, np.zeros((shape[0] - len(value), *value.shape[1:]),
                                                value.dtype)])
      elif key == ("word_embeddings", "embedding"):
        raise ValueError(
            f"checkpoint vocabulary has {len(value)} ids but the model's tokenizer gives "
            f"{shape[0]} embedding rows (padded): train with the checkpoint's tokenizer "
            "(clusjax.data.hf_tokenizer.HFTokenizer.from_pretrained(init_from)).")
      elif key == ("position_embeddings", "embedding") and len(value) >= shape[0]:
        value = value[:shape[0]]
      elif key == ("position_embeddings", "embedding"):
        raise ValueError(f"checkpoint max_position_embeddings={len(value)} < "
                         f"config.data.max_text_len={shape[0]}.")
      if value.shape != shape:
        c = self.config
        raise ValueError(
            f"text tower {'/'.join(key)} has shape {shape} but the checkpoint's is {value.shape}: "
            "config.model.text.{width, num_heads, mlp_dim} must be the checkpoint's "
            f"({c.get('hidden_size')}, {c.get('num_attention_heads')}, "
            f"{c.get('intermediate_size')}).")
      out[key] = np.asarray(value, np.float32)
    return traverse_util.unflatten_dict(out)


def import_bert(path_or_state_dict, *, num_heads=None, config=None, tokenizer=None):
  """Loads a BERT-architecture PyTorch checkpoint into Flax BertEncoder params.

  Args:
    path_or_state_dict: a transformers directory (config.json + model.safetensors or
      pytorch_model.bin, tokenizer files), a weights file (.safetensors / .bin; a
      config.json beside it is read), or a state dict {key: torch tensor or numpy}.
    num_heads: needed only when no config gives num_attention_heads.
    config: HF BertConfig fields, overriding any config.json.
    tokenizer: a tokenizer directory, when it is not the checkpoint's own directory.

  Returns:
    ImportedBert (params, config, tokenizer; tokenizer None when none is found).
  """
  where, state_dict, found = "state dict", path_or_state_dict, {}
  tokenizer_dir = tokenizer
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    where = path = os.fspath(path_or_state_dict)
    if os.path.isdir(path):
      state_dict, found = _read_directory(path)
      tokenizer_dir = tokenizer_dir or path
    elif os.path.isfile(path):
      state_dict = _read_weights(path)
      sibling = os.path.join(os.path.dirname(path), "config.json")
      if os.path.isfile(sibling):
        with open(sibling) as f:
          found = json.load(f)
    else:
      raise FileNotFoundError(f"no BERT checkpoint at {path!r} (a transformers directory, a "
                              ".safetensors / .bin file, or pass a state dict).")
  config = dict(found, **(config or {}))
  if num_heads is not None:
    config["num_attention_heads"] = num_heads
  if "num_attention_heads" not in config:
    raise ValueError(f"{where}: the head count is not in the weights; pass num_heads= or a "
                     "directory with config.json.")
  _check_config(config, where)
  params = bert_params_from_hf(state_dict, num_heads=config["num_attention_heads"])
  config.update(_shape_config(params))   # the weights' shapes win over config.json
  tok = None
  if tokenizer_dir is not None and any(
      os.path.isfile(os.path.join(tokenizer_dir, f)) for f in ("tokenizer.json", "vocab.txt")):
    tok = HFTokenizer.from_pretrained(tokenizer_dir)
  elif tokenizer is not None:
    raise FileNotFoundError(f"tokenizer={tokenizer!r} has no tokenizer.json or vocab.txt.")
  return ImportedBert(params, config, tok)
