"""Text encoder: a transformer with the architecture of HF `BertModel`.

    ids [B, L] --word + position + token-type(0) embeddings--> LayerNorm
    --> depth x post-LN layer (masked self-attention, MLP)
    --> last_hidden_state [B, L, W]

Same layers, order and numerics as transformers 5.23 `BertModel` without its
pooler, so `clusjax.export.hf_convert` moves weights both ways by re-keying
and transposing alone.

Params (top level): word_embeddings {embedding [V, W]},
position_embeddings {embedding [max_len, W]}, token_type_embeddings
{embedding [T, W]}, embed_norm {scale, bias}, layer_0 .. layer_{depth-1}
(see layers.TransformerBlock).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clusjax.models.layers import (ACT_EMBED, Embed, LayerNorm, TransformerBlock, constrain,
                                   run_layers)

Dtype = Any


class BertEncoder(nn.Module):
  """BERT encoder returning all tokens after the last layer.

  No pooler: Clus projects the CLS token with its own ITC head. Export
  targets `BertModel(config, add_pooling_layer=False)`. Token types are all
  0 (one segment), as BertModel does when token_type_ids is not given; the
  table keeps `type_vocab_size` rows so the HF state dict loads unchanged.
  """
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int                        # rows of the position table (HF max_position_embeddings)
  type_vocab_size: int = 2
  dropout: float = 0.0
  dtype: Dtype = jnp.float32          # compute dtype; params stay float32
  layer_norm_eps: float = 1e-12       # HF BertConfig default
  remat: str = "none"                 # config.remat: activation checkpointing of the layers
  scan_layers: bool = False           # config.scan_layers: the layers as one lax.scan

  @nn.compact
  def __call__(self, ids, mask=None, deterministic=True, positions=None, cache=None,
               cache_index=None):
    """Encodes token ids.

    Args:
      ids: int32 [B, L], L <= max_len.
      mask: bool [B, L]; True = real token, False = padding (masked out of
        every attention as keys; padded positions still get outputs, which
        callers ignore). Or [B, L, Lk], per query (captioning's causal mask;
        Lk = L, or the cache length when decoding). None = all real.
      deterministic: False applies dropout with the 'dropout' rng.
      positions: int32 [1 or B, L], the tokens' positions (default 0..L-1);
        decoding passes where in the sequence the new tokens are.
      cache, cache_index: decoding (clusjax/models/decode.py): one
        {"self": {"k", "v"} [B, Lk, H, D]} per layer, the new tokens written
        at cache_index.

    Returns:
      last_hidden_state [B, L, width] in self.dtype; token 0 is CLS. With
      `cache`: (that, the updated caches).
    """
    if ids.ndim != 2:
      raise ValueError(f"BertEncoder expects ids [B, L]; got shape {ids.shape}.")
    _, length = ids.shape
    if length > self.max_len:
      raise ValueError(f"BertEncoder: sequence length {length} exceeds max_len={self.max_len}; "
                       f"truncate the text or build the model with max_len >= {length}.")
    if mask is not None and mask.shape[:2] != ids.shape:
      raise ValueError(f"mask has shape {mask.shape}; expected ids.shape={ids.shape}.")

    # Lookups stay float32: the sum feeds a float32 LayerNorm right away.
    word = Embed(self.vocab_size, self.width, ("vocab", "embed"), name="word_embeddings")(ids)
    token_type = Embed(self.type_vocab_size, self.width, (None, "embed"),
                       name="token_type_embeddings")(jnp.zeros_like(ids))
    position = Embed(self.max_len, self.width, (None, "embed"),
                     name="position_embeddings")(
                         jnp.arange(length)[None, :] if positions is None else positions)
    # HF's summation order ((word + type) + position), for bit-level agreement.
    x = constrain((word + token_type) + position, ACT_EMBED)
    x = LayerNorm(self.layer_norm_eps, self.dtype, name="embed_norm")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = constrain(x, ACT_EMBED)

    kv_mask = None if mask is None else mask.astype(bool)
    layer = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=False,
                 dropout=self.dropout, dtype=self.dtype, layer_norm_eps=self.layer_norm_eps)
    blocks = {"layer": (TransformerBlock, layer, (3,), "layer_{}")}
    if cache is None:
      return run_layers(self, blocks, range(self.depth),
                        lambda x, b: b["layer"](x, kv_mask, deterministic), x,
                        deterministic=deterministic, remat=self.remat, scan=self.scan_layers)

    def cached(carry, b):   # decoding: the same blocks, each with its cache
      x, done = carry
      x, c = b["layer"](x, kv_mask, deterministic, cache=cache[len(done)],
                        cache_index=cache_index)
      return x, done + [c]
    return run_layers(self, blocks, range(self.depth), cached, (x, []),
                      deterministic=deterministic)
