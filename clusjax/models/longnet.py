"""LongNet over cluster tokens (DESIGN §4, paper Eq. 8).

    v_t, v_i [B, K] (V_T, V_I: the image's / the text's prototype scores, Eq. 6-7)
    --> token j = Dense(2 -> width)([v_t[:, j], v_i[:, j]]) + Embed(j)    [B, K, width]
    --> depth x pre-LN block (dilated attention, MLP) --> final LayerNorm
    --> mean over the active clusters --> pooled [B, width] float32

K is the K_max columns of the prototype matrix; `active` [K] says which
clusters exist now. Inactive clusters are masked keys, their scores are
zeroed before the embedding, and they are left out of the mean, so nothing at
an inactive column (even inf / NaN) reaches the output.

Attention is LongNet's dilated attention (clusjax.kernels.dilated_attention:
branches (w_i, r_i), non-causal). `dense=True` is the paper's "w/o LongNet"
ablation: the same blocks with ordinary dense masked attention
(layers.MultiHeadAttention), with the same parameter names and shapes.

Params (top level): score_embed {kernel [2, W], bias [W]}, cluster_embed
{embedding [K_max, W]}, block_0 .. block_{depth-1} {norm1, attn {query, key,
value, out}, norm2, mlp {fc1, fc2}} (the names of layers.TransformerBlock),
final_norm {scale, bias}.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clusjax.kernels.dilated_attention import IMPLEMENTATIONS, dilated_attention
from clusjax.models import layers

Dtype = Any


class DilatedSelfAttention(nn.Module):
  """Multi-head self-attention whose core is dilated attention.

  Same projections, parameter names (query, key, value, out), shapes and
  logical axis names as layers.MultiHeadAttention, so the dense ablation is a
  swap of the attention core alone. No dropout on attention probabilities:
  the kernel never materialises them (LongNet drops the residual instead).
  """
  num_heads: int
  head_dim: int
  segment_lengths: tuple[int, ...]
  dilation_rates: tuple[int, ...]
  implementation: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kv_mask):
    """x: [B, N, E]; kv_mask: bool [B, N] (True = real token) -> [B, N, E] in self.dtype."""
    width = x.shape[-1]
    x = x.astype(self.dtype)
    heads = (self.num_heads, self.head_dim)
    names = ("embed", "heads", "kv")
    q = layers.dense(heads, names, dtype=self.dtype, name="query")(x)
    k = layers.dense(heads, names, dtype=self.dtype, name="key")(x)
    v = layers.dense(heads, names, dtype=self.dtype, name="value")(x)
    q, k, v = (layers.constrain(t, layers.ACT_HEADS) for t in (q, k, v))  # [B, N, H, D]
    # Softmax statistics and the branch mixing run in float32 inside the kernel.
    ctx = dilated_attention(q, k, v, segment_lengths=self.segment_lengths,
                            dilation_rates=self.dilation_rates, kv_mask=kv_mask,
                            causal=False, implementation=self.implementation)
    ctx = layers.constrain(ctx, layers.ACT_HEADS)
    out = layers.dense(width, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype,
                       name="out")(ctx)
    return layers.constrain(out, layers.ACT_EMBED)


class LongNetBlock(nn.Module):
  """Pre-LN block: x = x + drop(attn(norm1(x))); x = x + drop(mlp(norm2(x))).

  Params: norm1, attn (query, key, value, out), norm2, mlp (fc1, fc2).
  """
  num_heads: int
  mlp_dim: int
  segment_lengths: tuple[int, ...]
  dilation_rates: tuple[int, ...]
  dense: bool = False
  implementation: str = "auto"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-12

  @nn.compact
  def __call__(self, x, mask, deterministic=True):
    """x: [B, N, E]; mask: bool [B, N] over keys -> [B, N, E]."""
    width = x.shape[-1]
    head_dim = width // self.num_heads
    drop = nn.Dropout(self.dropout)
    h = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm1")(x)
    if self.dense:
      # dropout=0: attention-probability dropout has no dilated counterpart;
      # both variants drop the residual branch only.
      a = layers.MultiHeadAttention(self.num_heads, head_dim, dropout=0.0, dtype=self.dtype,
                                    name="attn")(h, h, mask, deterministic)
    else:
      a = DilatedSelfAttention(self.num_heads, head_dim, self.segment_lengths,
                               self.dilation_rates, self.implementation, self.dtype,
                               name="attn")(h, mask)
    x = x + drop(a, deterministic=deterministic)
    h = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm2")(x)
    x = x + drop(layers.Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(h),
                 deterministic=deterministic)
    return layers.constrain(x, layers.ACT_EMBED)


class LongNet(nn.Module):
  """Encodes the per-example cluster scores into one pooled vector (Eq. 8).

  Call: (v_t [B, K] float, v_i [B, K] float, active [K] bool) -> [B, width]
  float32; K <= max_clusters. Examples with no active cluster pool to 0.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_clusters: int                   # K_max: rows of the cluster-index embedding
  segment_lengths: tuple[int, ...]    # w_i
  dilation_rates: tuple[int, ...]     # r_i, r_i | w_i
  dense: bool = False                 # "w/o LongNet" ablation: dense attention, same params
  implementation: str = "auto"        # dilated_attention: "auto" | "xla" | "pallas"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32          # compute dtype; params stay float32
  layer_norm_eps: float = 1e-12       # as the other towers (layers.LayerNorm)
  remat: str = "none"                 # config.remat: activation checkpointing of the blocks

  def _check(self, v_t, v_i, active):
    if self.width % self.num_heads:
      raise ValueError(f"LongNet width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"LongNet implementation={self.implementation!r} is not one of "
                       f"{IMPLEMENTATIONS}.")
    if v_t.ndim != 2 or v_t.shape != v_i.shape:
      raise ValueError(f"LongNet v_t.shape={v_t.shape} and v_i.shape={v_i.shape} must be "
                       "one shape [B, K].")
    k = v_t.shape[1]
    if tuple(active.shape) != (k,):
      raise ValueError(f"LongNet active.shape={tuple(active.shape)} must be [K] = {(k,)} "
                       f"to match v_t.shape={v_t.shape}.")
    if not 0 < k <= self.max_clusters:
      raise ValueError(f"LongNet got K={k} cluster columns (v_t.shape={v_t.shape}); need "
                       f"1 <= K <= max_clusters={self.max_clusters}.")

  @nn.compact
  def __call__(self, v_t, v_i, active, deterministic=True):
    """Pools the active clusters' tokens.

    Args:
      v_t, v_i: [B, K] float, the image's and the text's prototype scores.
      active: [K] bool, True = the cluster exists now.
      deterministic: False applies dropout with the 'dropout' rng.
    Returns:
      [B, width] float32.
    """
    self._check(v_t, v_i, active)
    b, k = v_t.shape
    # (w_i, r_i) are checked, and w_i > K clamped, by dilated_attention.
    ws, rs = tuple(self.segment_lengths), tuple(self.dilation_rates)
    active = active.astype(bool)
    mask = jnp.broadcast_to(active[None, :], (b, k))  # [B, K] keys

    # Eq. 8: token j = [V_T[j], V_I[j]], embedded, plus the cluster-index
    # embedding. Zeroing inactive scores keeps inf / NaN there out of every sum.
    scores = jnp.stack([v_t, v_i], axis=-1).astype(jnp.float32)  # [B, K, 2]
    scores = jnp.where(active[None, :, None], scores, 0.0)
    x = layers.dense(self.width, (None, "embed"), dtype=self.dtype, name="score_embed")(scores)
    index = layers.Embed(self.max_clusters, self.width, ("vocab", "embed"),
                         name="cluster_embed")(jnp.arange(k))
    x = x + index[None].astype(self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = layers.constrain(x, layers.ACT_EMBED)

    block = layers.remat_block(LongNetBlock, self.remat, static_argnums=(3,))
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, ws, rs, dense=self.dense,
                       implementation=self.implementation, dropout=self.dropout,
                       dtype=self.dtype, layer_norm_eps=self.layer_norm_eps,
                       name=f"block_{i}")(x, mask, deterministic)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="final_norm")(x)

    # Masked mean in float32; 0 where no cluster is active.
    x = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)
    count = jnp.sum(active).astype(jnp.float32)
    return jnp.sum(x, axis=1) / jnp.maximum(count, 1.0)
