"""Image-text fusion encoders (paper Fig. 5): co-attention and self-attention.

co_attention (Fig. 5a, Eq. 2-4): two streams of blocks. In each block every
stream attends to itself, then cross-attends with its own queries over the
other stream's keys/values (Att_I = (Q_T, K_I, V_I), Att_T = (Q_I, K_T, V_T)),
then applies an MLP. Both streams read the other's output of the previous
block (ViLBERT-style simultaneous update). A stream's block is a post-LN
`TransformerBlock(cross_attention=True)`: the BERT layer with cross-attention
of ALBEF's fusion encoder. Params: image_block_i, text_block_i.

self_attention (Fig. 5b): the two token streams are concatenated and run
through plain post-LN transformer blocks; by default enough of them to match
the co-attention parameter count (see `self_attention_depth`).
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clusjax.config import FUSIONS
from clusjax.models.layers import TransformerBlock, run_layers

Dtype = Any


def self_attention_depth(co_attention_depth, width, mlp_dim):
  """Blocks of self-attention fusion with about the parameters of co-attention.

  A co-attention block holds two streams of (self-attn 4E^2 + cross-attn 4E^2
  + MLP 2EM); a plain block holds 4E^2 + 2EM.
  """
  co = 2 * (8 * width * width + 2 * width * mlp_dim)
  plain = 4 * width * width + 2 * width * mlp_dim
  return max(1, round(co_attention_depth * co / plain))


class FusionEncoder(nn.Module):
  """Fuses image tokens [B, Li, E] and text tokens [B, Lt, E].

  Returns (fused image tokens [B, Li, E], fused text tokens [B, Lt, E]); the
  CLS of each is token 0.
  """
  kind: str            # "co_attention" | "self_attention"
  depth: int           # co-attention blocks (self-attention derives its own)
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-12
  remat: str = "none"  # config.remat: activation checkpointing of the blocks
  # config.scan_layers: the blocks as one lax.scan (co-attention: all but the last).
  scan_layers: bool = False

  def _blocks(self, cross, **name_formats):
    """{role: run_layers block spec}; called as (x, mask, deterministic[, context,
    context_mask, num_queries])."""
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=False,
                  cross_attention=cross, dropout=self.dropout, dtype=self.dtype,
                  layer_norm_eps=self.layer_norm_eps)
    static = (3, 6) if cross else (3,)
    return {role: (TransformerBlock, kwargs, static, fmt) for role, fmt in name_formats.items()}

  @nn.compact
  def __call__(self, image_tokens, text_tokens, text_mask, deterministic=True, outputs="all",
               cache=None, cache_index=None):
    """Fuses the streams.

    outputs: which results the caller reads; the co-attention fusion skips the
    rest of its last block (same values where computed):
      "all"  (image tokens [B, Li, E], text tokens [B, Lt, E]);
      "cls"  (image CLS [B, 1, E], text CLS [B, 1, E])    -- ITM;
      "text" (None, text tokens [B, Lt, E])               -- MLM;
      "caption" (None, text tokens [B, Lt, E])            -- captioning: see below.

    "caption" runs the text stream alone as a decoder (UniLM / VLMo's seq2seq
    mask): each text block attends to the text with `text_mask` [B, Lt, Lk]
    (causal) and cross-attends to `image_tokens`, the image tower's output,
    at every layer. Why the text stream and not a decoder config beside it:
    its self-attention, cross-attention into the image and MLP are the
    pre-trained fusion weights (a decoder config would start its
    cross-attention from scratch and repeat the block code). Why the tower's
    image tokens: the image stream of co-attention reads the whole text, so
    text position i would see the words after i through it; without it the
    image side is one ViT pass per image, fixed while a caption is decoded.
    With `cache` (one {"self", "cross"} per layer, see TransformerBlock) and
    `cache_index`, returns (None, text tokens, the updated caches).
    """
    if outputs not in ("all", "cls", "text", "caption"):
      raise ValueError(f"outputs={outputs!r} must be 'all', 'cls', 'text' or 'caption'.")
    text_mask = text_mask.astype(bool)
    image_mask = jnp.ones(image_tokens.shape[:2], bool)
    run = functools.partial(run_layers, self, deterministic=deterministic, remat=self.remat,
                            scan=self.scan_layers)
    if outputs == "caption":
      if self.kind != "co_attention":
        raise ValueError(f"captioning runs the text stream of config.model.fusion="
                         f"'co_attention'; {self.kind!r} has none: use co_attention.")
      blocks = self._blocks(True, text="text_block_{}")
      if cache is None:
        return None, run(blocks, range(self.depth), lambda txt, b: b["text"](
            txt, text_mask, deterministic, image_tokens, image_mask, None), text_tokens)

      def cached(carry, b):
        txt, done = carry
        txt, c = b["text"](txt, text_mask, deterministic, image_tokens, image_mask,
                           cache=cache[len(done)], cache_index=cache_index)
        return txt, done + [c]
      txt, new_cache = run_layers(self, blocks, range(self.depth), cached, (text_tokens, []),
                                  deterministic=deterministic)
      return None, txt, new_cache
    if self.kind == "co_attention":
      blocks = self._blocks(True, image="image_block_{}", text="text_block_{}")

      def layer(streams, b, n=None, image=True):
        img, txt = streams
        new_img = b["image"](img, image_mask, deterministic, txt, text_mask, n) if image else None
        return new_img, b["text"](txt, text_mask, deterministic, img, image_mask, n)

      last = self.depth - 1
      streams = run(blocks, range(last), layer, (image_tokens, text_tokens))
      # The last block computes only what the caller reads.
      return run(blocks, range(last, self.depth),
                 functools.partial(layer, n=1 if outputs == "cls" else None,
                                   image=outputs != "text"), streams)
    if self.kind == "self_attention":
      width = text_tokens.shape[-1]
      if image_tokens.shape[-1] != width:
        raise ValueError(f"self_attention fusion needs equal widths; image {image_tokens.shape}"
                         f" vs text {text_tokens.shape}.")
      # A learned modality embedding tells the blocks which stream a token is from.
      modality = self.param("modality_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, "embed")), (2, width), jnp.float32)
      x = jnp.concatenate([image_tokens + modality[0].astype(image_tokens.dtype),
                           text_tokens + modality[1].astype(text_tokens.dtype)], axis=1)
      mask = jnp.concatenate([image_mask, text_mask], axis=1)
      x = run(self._blocks(False, block="block_{}"),
              range(self_attention_depth(self.depth, width, self.mlp_dim)),
              lambda x, b: b["block"](x, mask, deterministic), x)
      n = image_tokens.shape[1]
      img, txt = x[:, :n], x[:, n:]
      if outputs == "cls":
        return img[:, :1], txt[:, :1]
      return (None if outputs == "text" else img), txt
    raise ValueError(f"config.model.fusion={self.kind!r} must be one of {', '.join(FUSIONS)}.")
