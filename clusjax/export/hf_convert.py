"""Re-keying between clusjax encoder params and Hugging Face state dicts.

Pure numpy: numpy (or anything np.asarray takes: jax arrays, CPU torch
tensors) in, numpy out; torch is never imported here, so this module works
in a JAX-only install. The target is **transformers 5.23** (pinned in
requirements.txt); tests/models/test_{vit,bert}.py load the results with
`load_state_dict(strict=True)` and compare outputs to 1e-5.

Keys (transformers 5.x; ViT was renamed from 4.x's `encoder.layer.N.attention.
attention.query` / `intermediate.dense` / `output.dense` style, BERT was not):

  ViTModel                                      clusjax ViT
  embeddings.cls_token                [1,1,W]   cls_token
  embeddings.position_embeddings      [1,1+N,W] pos_embed
  embeddings.patch_embeddings.projection.weight [W,3,P,P] <- patch_embed/kernel [P,P,3,W]
  layers.N.layernorm_before.{weight,bias}       block_N/norm1/{scale,bias}
  layers.N.attention.{q,k,v}_proj.weight [H*D,W] <- block_N/attn/{query,key,value}/kernel [W,H,D]
  layers.N.attention.o_proj.weight    [W,H*D]   <- block_N/attn/out/kernel [H,D,W]
  layers.N.layernorm_after.*                    block_N/norm2/*
  layers.N.mlp.fc1.weight             [M,W]     <- block_N/mlp/fc1/kernel [W,M]
  layers.N.mlp.fc2.weight             [W,M]     <- block_N/mlp/fc2/kernel [M,W]
  layernorm.*                                   final_norm/*

  BertModel                                     clusjax BertEncoder
  embeddings.{word,position,token_type}_embeddings.weight  {..}_embeddings/embedding
  embeddings.LayerNorm.*                        embed_norm/*
  encoder.layer.N.attention.self.{query,key,value}.*  layer_N/attn/{query,key,value}/*
  encoder.layer.N.attention.output.dense.*      layer_N/attn/out/*
  encoder.layer.N.attention.output.LayerNorm.*  layer_N/norm1/*
  encoder.layer.N.intermediate.dense.*          layer_N/mlp/fc1/*
  encoder.layer.N.output.dense.*                layer_N/mlp/fc2/*
  encoder.layer.N.output.LayerNorm.*            layer_N/norm2/*

Pooler: our encoders have none (Clus puts its own ITC projection on the CLS
token), so the state dicts have no `pooler.*` keys. Build the HF model with
`ViTModel(config, add_pooling_layer=False)` / `BertModel(config,
add_pooling_layer=False)` and `load_state_dict(sd, strict=True)`, or
`ViTModel.from_pretrained(dir, add_pooling_layer=False)` (transformers 5.23
forwards the kwarg to __init__; without it the pooler is reported MISSING and
randomly initialised, which only matters to users of `pooler_output`).
On import, `pooler.*` and the non-persistent buffers `embeddings.position_ids`
/ `token_type_ids` that older checkpoints carry are skipped, and a leading
`vit.` / `bert.` prefix (task-model checkpoints) is stripped.
"""
import re

import numpy as np

# Keys an HF checkpoint may carry that our encoders have no place for.
_IGNORED = re.compile(r"^(pooler\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")


# --- per-leaf layout transforms: (to_hf, from_hf) --------------------------------
# Flax Dense kernels are [in, out]; torch Linear weights are [out, in].

def _qkv_kernel_to(k, h):      # [E, H, D] -> [H*D, E]
  return k.reshape(k.shape[0], -1).T


def _qkv_kernel_from(w, h):    # [H*D, E] -> [E, H, D]
  return w.T.reshape(w.shape[1], h, -1)


def _out_kernel_to(k, h):      # [H, D, E] -> [E, H*D]
  return k.reshape(-1, k.shape[-1]).T


def _out_kernel_from(w, h):    # [E, H*D] -> [H, D, E]
  return w.T.reshape(h, -1, w.shape[0])


_LAYOUTS = {
    "copy": (lambda a, h: a, lambda a, h: a),
    "linear": (lambda a, h: a.T, lambda a, h: a.T),
    "qkv_kernel": (_qkv_kernel_to, _qkv_kernel_from),
    "qkv_bias": (lambda a, h: a.reshape(-1), lambda a, h: a.reshape(h, -1)),  # [H, D] <-> [H*D]
    "out_kernel": (_out_kernel_to, _out_kernel_from),
    # Conv kernel [P, P, C, W] (HWIO) <-> torch Conv2d weight [W, C, P, P] (OIHW).
    "conv": (lambda a, h: a.transpose(3, 2, 0, 1), lambda a, h: a.transpose(2, 3, 1, 0)),
}


def _attention_rows(flax_prefix, hf_modules):
  """Rows for one MultiHeadAttention; `hf_modules` = HF q, k, v, out module paths."""
  rows = []
  for ours, theirs in zip(("query", "key", "value"), hf_modules[:3]):
    rows += [((*flax_prefix, ours, "kernel"), f"{theirs}.weight", "qkv_kernel"),
             ((*flax_prefix, ours, "bias"), f"{theirs}.bias", "qkv_bias")]
  rows += [((*flax_prefix, "out", "kernel"), f"{hf_modules[3]}.weight", "out_kernel"),
           ((*flax_prefix, "out", "bias"), f"{hf_modules[3]}.bias", "copy")]
  return rows


def _norm_rows(flax_prefix, hf_prefix):
  return [((*flax_prefix, "scale"), f"{hf_prefix}.weight", "copy"),
          ((*flax_prefix, "bias"), f"{hf_prefix}.bias", "copy")]


def _dense_rows(flax_prefix, hf_prefix):
  return [((*flax_prefix, "kernel"), f"{hf_prefix}.weight", "linear"),
          ((*flax_prefix, "bias"), f"{hf_prefix}.bias", "copy")]


def _vit_table(depth):
  """[(flax path, HF key, layout)] for a ViT of `depth` blocks."""
  rows = [(("patch_embed", "kernel"), "embeddings.patch_embeddings.projection.weight", "conv"),
          (("patch_embed", "bias"), "embeddings.patch_embeddings.projection.bias", "copy"),
          (("cls_token",), "embeddings.cls_token", "copy"),
          (("pos_embed",), "embeddings.position_embeddings", "copy")]
  for i in range(depth):
    b, t = f"block_{i}", f"layers.{i}."
    rows += _norm_rows((b, "norm1"), t + "layernorm_before")
    rows += _attention_rows((b, "attn"), [f"{t}attention.{n}_proj" for n in "qkvo"])
    rows += _norm_rows((b, "norm2"), t + "layernorm_after")
    rows += _dense_rows((b, "mlp", "fc1"), t + "mlp.fc1")
    rows += _dense_rows((b, "mlp", "fc2"), t + "mlp.fc2")
  return rows + _norm_rows(("final_norm",), "layernorm")


def _bert_table(depth):
  """[(flax path, HF key, layout)] for a BertEncoder of `depth` layers."""
  rows = [((f"{n}_embeddings", "embedding"), f"embeddings.{n}_embeddings.weight", "copy")
          for n in ("word", "position", "token_type")]
  rows += _norm_rows(("embed_norm",), "embeddings.LayerNorm")
  for i in range(depth):
    b, t = f"layer_{i}", f"encoder.layer.{i}."
    rows += _attention_rows((b, "attn"), [f"{t}attention.self.query", f"{t}attention.self.key",
                                          f"{t}attention.self.value", f"{t}attention.output.dense"])
    rows += _norm_rows((b, "norm1"), t + "attention.output.LayerNorm")
    rows += _dense_rows((b, "mlp", "fc1"), t + "intermediate.dense")
    rows += _dense_rows((b, "mlp", "fc2"), t + "output.dense")
    rows += _norm_rows((b, "norm2"), t + "output.LayerNorm")
  return rows


# --- tree helpers -------------------------------------------------------------

def _to_numpy(x):
  """np.ndarray from numpy / jax / CPU torch (bf16 widened to float32)."""
  if hasattr(x, "detach"):            # a torch tensor; torch is not imported here
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    x = x.numpy()
  return np.asarray(x)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _paths(tree, prefix=()):
  """All leaf paths of a nested dict."""
  if not hasattr(tree, "items"):     # dict or FrozenDict
    return {prefix}
  return set().union(*(_paths(v, (*prefix, k)) for k, v in tree.items())) if tree else set()


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _count(keys, pattern):
  """1 + the largest N in keys matching `pattern` (one group), 0 if none."""
  found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
  return max(found) + 1 if found else 0


def _params_to_hf(params, num_heads, table, what):
  if set(params) == {"params"}:       # accept a full variables dict too
    params = params["params"]
  extra = sorted("/".join(p) for p in _paths(params) - {p for p, _, _ in table})
  if extra:
    raise KeyError(f"{what} params have leaves with no HF counterpart: {extra[:8]}; pass only "
                   f"the {what} sub-tree (e.g. params['vision'] / params['text']).")
  out = {}
  for path, key, layout in table:
    try:
      leaf = _to_numpy(_get(params, path))
    except KeyError as e:
      raise KeyError(f"{what} params lack {'/'.join(path)}; pass nn.unbox(variables['params']) "
                     f"of a {what} module.") from e
    if layout in ("qkv_kernel", "qkv_bias", "out_kernel"):
      heads = leaf.shape[1] if layout == "qkv_kernel" else leaf.shape[0]
      if heads != num_heads:
        raise ValueError(f"{'/'.join(path)} has shape {leaf.shape} ({heads} heads) but "
                         f"num_heads={num_heads}.")
    out[key] = np.ascontiguousarray(_LAYOUTS[layout][0](leaf, num_heads))
  return out


def _params_from_hf(state_dict, num_heads, table_fn, layer_pattern, prefix, what):
  sd = {}
  for k, v in state_dict.items():
    k = k[len(prefix):] if k.startswith(prefix) else k
    if not _IGNORED.match(k):
      sd[k] = v
  table = table_fn(_count(sd, layer_pattern))
  expected = {key for _, key, _ in table}
  missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
  if missing or unexpected:
    raise KeyError(f"{what} state dict does not match transformers 5.23 layout: "
                   f"missing {missing[:8]}, unexpected {unexpected[:8]}.")
  params = {}
  for path, key, layout in table:
    leaf = _to_numpy(sd[key])
    _set(params, path, np.ascontiguousarray(_LAYOUTS[layout][1](leaf, num_heads)))
  return params


# --- public API -----------------------------------------------------------------

def vit_params_to_hf(params, *, num_heads):
  """Unboxed ViT params -> ViTModel(add_pooling_layer=False) state dict {key: np.ndarray}."""
  depth = _count(params.get("params", params), r"^block_(\d+)$")
  return _params_to_hf(params, num_heads, _vit_table(depth), "ViT")


def vit_params_from_hf(state_dict, *, num_heads):
  """ViTModel state dict (numpy or torch values) -> unboxed ViT params (numpy)."""
  return _params_from_hf(state_dict, num_heads, _vit_table, r"^layers\.(\d+)\.", "vit.", "ViT")


def bert_params_to_hf(params, *, num_heads):
  """Unboxed BertEncoder params -> BertModel(add_pooling_layer=False) state dict."""
  depth = _count(params.get("params", params), r"^layer_(\d+)$")
  return _params_to_hf(params, num_heads, _bert_table(depth), "BertEncoder")


def bert_params_from_hf(state_dict, *, num_heads):
  """BertModel state dict (numpy or torch values) -> unboxed BertEncoder params (numpy).

  The result feeds `BertEncoder(...).apply({"params": params}, ids, mask)`
  with vocab_size / max_len / type_vocab_size from the table shapes.
  """
  return _params_from_hf(state_dict, num_heads, _bert_table, r"^encoder\.layer\.(\d+)\.",
                         "bert.", "BertEncoder")


def vit_config_to_hf(*, patch_size, width, depth, num_heads, mlp_dim, image_size,
                     dropout=0.0, layer_norm_eps=1e-12, num_channels=3):
  """HF ViTConfig fields for a clusjax ViT (kwargs = the module's fields + image_size).

  `image_size` is an int or (H, W); `ViTConfig(**d)` accepts the dict and
  `json.dump(d)` is a valid config.json.
  """
  if not isinstance(image_size, int):
    h, w = image_size
    image_size = h if h == w else [int(h), int(w)]
  return {
      "model_type": "vit", "architectures": ["ViTModel"],
      "hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": num_heads,
      "intermediate_size": mlp_dim, "hidden_act": "gelu",
      "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
      "layer_norm_eps": layer_norm_eps, "image_size": image_size, "patch_size": patch_size,
      "num_channels": num_channels, "qkv_bias": True, "initializer_range": 0.02,
  }


def bert_config_to_hf(*, vocab_size, width, depth, num_heads, mlp_dim, max_len,
                      type_vocab_size=2, dropout=0.0, layer_norm_eps=1e-12, pad_token_id=0):
  """HF BertConfig fields for a clusjax BertEncoder (kwargs = the module's fields).

  `vocab_size` must be the embedding table's row count (padded, if the model
  padded it). `pad_token_id` only sets nn.Embedding's padding_idx in torch
  (gradient masking); it does not change outputs.
  """
  return {
      "model_type": "bert", "architectures": ["BertModel"],
      "vocab_size": vocab_size, "hidden_size": width, "num_hidden_layers": depth,
      "num_attention_heads": num_heads, "intermediate_size": mlp_dim, "hidden_act": "gelu",
      "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
      "max_position_embeddings": max_len, "type_vocab_size": type_vocab_size,
      "layer_norm_eps": layer_norm_eps, "pad_token_id": pad_token_id,
      "initializer_range": 0.02, "is_decoder": False, "add_cross_attention": False,
  }
