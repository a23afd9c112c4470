"""Transformer building blocks shared by the ViT, the text encoder and fusion.

Every parameter carries logical axis names (MaxText style) through
`nn.with_logical_partitioning`; `config.sharding.rules` maps them to mesh axes:

    "embed"  model width          "mlp"   MLP hidden width
    "heads"  attention heads      "kv"    per-head width
    "vocab"  token table rows     None    small or odd dims (positions, patch
                                          kernel spatial/channel dims)

Activations carry `nn.with_logical_constraint` with *separate* names
("act_batch", "act_len", "act_embed", "act_mlp", "act_heads", "act_kv") so an
activation rule never claims the mesh axis a parameter rule already uses in
the same array. Outside `nn.logical_axis_rules(...)` + `jax.set_mesh(...)`
both are no-ops, so the modules run plainly on one CPU.

Numerics follow Hugging Face ViT/BERT so weights move by re-keying alone:
exact (erf) GELU, LayerNorm with two-pass variance, attention logits scaled
after the q.k product. LayerNorm, logits and softmax run in float32 whatever
the compute dtype; parameters are always float32.

`remat_block` wraps a block class in `nn.remat` for `config.remat` (activation
checkpointing); the towers apply it to every block. `run_layers` runs a
tower's layers as a Python loop or, for `config.scan_layers`, as one
`lax.scan` over their stacked parameters (XLA compiles the layer once).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusjax.kernels.matmul import einsum_f32

Dtype = Any

# HF's `initializer_range` default for ViT and BERT (normal, std 0.02).
default_init = nn.initializers.normal(stddev=0.02)

# Activation logical names (kept apart from the parameter names on purpose).
ACT_EMBED = ("act_batch", "act_len", "act_embed")
ACT_MLP = ("act_batch", "act_len", "act_mlp")
ACT_HEADS = ("act_batch", "act_len", "act_heads", "act_kv")


def constrain(x, names):
  """`nn.with_logical_constraint`; a no-op without rules and a mesh."""
  return nn.with_logical_constraint(x, names)


class DenseGeneral(nn.Module):
  """nn.DenseGeneral with float32 params whose kernel/bias carry logical names.

  Own module rather than nn.DenseGeneral(kernel_init=with_logical_partitioning
  (...)): flax 0.12.8's DenseGeneral initialises multi-dim kernels at a
  flattened 2-D shape and unboxes that, which applies the 3-name constraint to
  a rank-2 array and raises whenever a mesh is set (jax.set_mesh). Same param
  names and shapes as nn.DenseGeneral.
  """
  features: int | tuple[int, ...]
  names: tuple[str | None, ...]   # kernel names: contracted dims, then output dims
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = default_init
  # Logits for a float32 softmax: the product accumulated and returned in
  # float32 (never rounded to bf16), its backward in self.dtype (einsum_f32).
  float32_output: bool = False

  @nn.compact
  def __call__(self, x):
    """x: [..., *in_dims] -> [..., *features] in self.dtype (float32_output: float32)."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    if len(self.names) != len(axis) + len(features):
      raise ValueError(f"names={self.names} must name {len(axis)} input + {len(features)} "
                       f"output dims.")
    in_shape = tuple(x.shape[a] for a in axis)

    def init(rng, shape, dtype):
      # Fan-in/fan-out initialisers see the 2-D [prod(in), prod(out)] matrix.
      flat = (int(np.prod(in_shape)), int(np.prod(features)))
      return self.kernel_init(rng, flat, dtype).reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.names)),
                        in_shape + features, jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.float32_output:
      if axis != (x.ndim - 1,) or len(features) != 1:
        raise ValueError("float32_output takes one input and one output axis; got "
                         f"axis={self.axis}, features={self.features}.")
      y = einsum_f32("...i,io->...o", x, kernel)
    else:
      y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, tuple(self.names[len(axis):])), features, jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


def dense(features, names, *, axis=-1, dtype=jnp.float32, use_bias=True,
          kernel_init=default_init, float32_output=False, name=None):
  """A DenseGeneral; `names` are the kernel's logical axis names, e.g.
  ("embed", "heads", "kv") for [E] -> [H, D]; the bias takes the output names."""
  return DenseGeneral(features=features, names=tuple(names), axis=axis, use_bias=use_bias,
                      dtype=dtype, kernel_init=kernel_init, float32_output=float32_output,
                      name=name)


class Embed(nn.Module):
  """Lookup table `embedding` [num, features] (float32) with logical names.

  The table is gathered whole (constrained replicated) before the lookup, as
  FSDP does for every weight: a gather from a table sharded over its rows
  and columns into batch-sharded activations makes GSPMD fall back to
  "involuntary full rematerialization" of the output instead.
  """
  num_embeddings: int
  features: int
  names: tuple[str | None, str | None] = ("vocab", "embed")

  @nn.compact
  def __call__(self, ids):
    """ids: int [...] -> float32 [..., features]."""
    table = self.param("embedding", nn.with_logical_partitioning(default_init, self.names),
                       (self.num_embeddings, self.features), jnp.float32)
    table = constrain(table, (None, None))
    return jnp.take(table, ids, axis=0)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32, output in the compute dtype.

  Params `scale`, `bias` [E] ("embed",). Two-pass variance, as
  torch.nn.LayerNorm: the fast E[x^2]-E[x]^2 form drifts from HF outputs.
  """
  epsilon: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [..., E] -> [..., E] in self.dtype."""
    width = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (width,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (width,), jnp.float32)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head (self- or cross-) attention with q/k/v/out biases.

  Queries come from `inputs_q`, keys and values from `inputs_kv` (the same
  array for self-attention; the other stream for co-attention fusion).
  Kernels: query/key/value [E_in, heads, kv], out [heads, kv, E_out], the
  layout HF's [H*D, E] Linear weights map to by transpose + reshape.
  """
  num_heads: int
  head_dim: int
  out_features: int | None = None   # default: width of inputs_q
  dropout: float = 0.0              # on the attention probabilities
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, kv_mask=None, deterministic=True, cache=None,
               cache_index=None):
    """Attends from inputs_q to inputs_kv.

    Args:
      inputs_q: [B, Lq, Eq].
      inputs_kv: [B, Lk, Ekv].
      kv_mask: optional bool [B, Lk], or [B, Lq, Lk] (per query: a causal or
        seq2seq mask); True = real token. False keys get no weight (a query
        row whose keys are all masked gets uniform weights, like HF's
        additive float-min mask).
      deterministic: False applies dropout with the 'dropout' rng.
      cache: decoding only (clusjax/models/decode.py), a dict of keys/values
        [B, Lc, H, D]:
        - with `cache_index` (self-attention): {"k", "v"} of the Lc positions;
          the keys/values of inputs_kv are written at cache_index
          (dynamic_update_slice) and the queries attend over all Lc
          (kv_mask [B, Lq, Lc] says which are visible);
        - without: {"k", "v"} computed once (cross-attention over the image):
          used as they are, inputs_kv is not read; {} computes them.
      cache_index: int32 scalar, the position of inputs_kv[:, 0] in the cache.

    Returns:
      [B, Lq, out_features or Eq] in self.dtype; with `cache`, (that, the
      updated cache).
    """
    out_features = self.out_features or inputs_q.shape[-1]
    qkv_shape = (self.num_heads, self.head_dim)
    names = ("embed", "heads", "kv")
    inputs_q = inputs_q.astype(self.dtype)
    q = dense(qkv_shape, names, dtype=self.dtype, name="query")(inputs_q)
    if cache is not None and cache_index is None and "k" in cache:
      k, v = cache["k"], cache["v"]   # fixed keys/values, computed once
    else:
      inputs_kv = inputs_kv.astype(self.dtype)
      k = dense(qkv_shape, names, dtype=self.dtype, name="key")(inputs_kv)
      v = dense(qkv_shape, names, dtype=self.dtype, name="value")(inputs_kv)
      if cache_index is not None:   # the new positions into the per-layer cache
        start = (0, cache_index, 0, 0)
        k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
        v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
    q, k, v = (constrain(t, ACT_HEADS) for t in (q, k, v))   # [B, L, H, D]

    # Logits in float32 even for bf16 inputs (their backward matmuls stay bf16);
    # scaled after the product, as HF.
    logits = einsum_f32("bqhd,bkhd->bhqk", q, k)
    logits = logits * (self.head_dim ** -0.5)
    if kv_mask is not None:
      b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
      if kv_mask.shape not in ((b, lk), (b, lq, lk)):
        raise ValueError(f"kv_mask has shape {kv_mask.shape}; expected [B, Lk] = {(b, lk)} or "
                         f"[B, Lq, Lk] = {(b, lq, lk)} to match the keys {k.shape}.")
      big_neg = jnp.finfo(jnp.float32).min
      visible = kv_mask[:, None, None, :] if kv_mask.ndim == 2 else kv_mask[:, None]
      logits = jnp.where(visible.astype(bool), logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)   # [B, H, Lq, Lk]
    probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic)

    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    ctx = constrain(ctx, ACT_HEADS)
    out = dense(out_features, ("heads", "kv", "embed"), axis=(-2, -1),
                dtype=self.dtype, name="out")(ctx)
    out = constrain(out, ACT_EMBED)
    return out if cache is None else (out, {"k": k, "v": v})


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2; HF ViTMLP / BertIntermediate+BertOutput.dense."""
  hidden_dim: int
  out_dim: int | None = None   # default: input width
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, L, E] -> [B, L, out_dim or E]."""
    out_dim = self.out_dim or x.shape[-1]
    h = dense(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = nn.gelu(h, approximate=False)   # HF "gelu" is the erf form
    h = constrain(h, ACT_MLP)
    y = dense(out_dim, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
    return constrain(y, ACT_EMBED)


class TransformerBlock(nn.Module):
  """Self-attention (+ cross-attention) + MLP block; `pre_norm` picks ViT or BERT.

    pre-LN  (ViT):   x = x + drop(attn(norm1(x)));  x = x + drop(mlp(norm2(x)))
    post-LN (BERT):  x = norm1(x + drop(attn(x)));  x = norm2(x + drop(mlp(x)))

  With `cross_attention`, a cross-attention sub-layer (queries from x, keys
  and values from `context`, the other stream) sits between the two, with its
  own norm `norm_cross`: the BERT layer with cross-attention that ALBEF's
  fusion uses, and one stream of a co-attention block (paper Eq. 2-4).

  Params: norm1, attn (query, key, value, out), [norm_cross, cross_attn],
  norm2, mlp (fc1, fc2).
  """
  num_heads: int
  mlp_dim: int
  pre_norm: bool
  cross_attention: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-12

  @nn.compact
  def __call__(self, x, mask=None, deterministic=True, context=None, context_mask=None,
               num_queries=None, cache=None, cache_index=None):
    """x: [B, L, E]; mask: optional bool [B, L] over keys (or [B, L, Lk] per
    query: causal / seq2seq) -> [B, L, E].

    context: [B, Lc, Ec] (required with cross_attention); context_mask:
    optional bool [B, Lc]. num_queries: compute only the first n outputs
    ([B, n, E]; all L tokens still serve as keys/values), exactly what the
    full block gives there: a last block whose caller reads only CLS.
    cache, cache_index: decoding (see MultiHeadAttention): cache = {"self":
    {"k", "v"}[, "cross": {"k", "v"} or {}]}; returns (x, the updated cache).
    """
    if self.cross_attention != (context is not None):
      raise ValueError(f"TransformerBlock(cross_attention={self.cross_attention}) called "
                       f"with context={'None' if context is None else context.shape}.")
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={self.num_heads}.")
    norm1 = LayerNorm(self.layer_norm_eps, self.dtype, name="norm1")
    norm2 = LayerNorm(self.layer_norm_eps, self.dtype, name="norm2")
    attn = MultiHeadAttention(num_heads=self.num_heads, head_dim=width // self.num_heads,
                              dropout=self.dropout, dtype=self.dtype, name="attn")
    mlp = Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")
    drop = nn.Dropout(self.dropout)

    if self.cross_attention:
      norm_cross = LayerNorm(self.layer_norm_eps, self.dtype, name="norm_cross")
      cross = MultiHeadAttention(num_heads=self.num_heads, head_dim=width // self.num_heads,
                                 dropout=self.dropout, dtype=self.dtype, name="cross_attn")

    x = constrain(x.astype(self.dtype), ACT_EMBED)
    n = x.shape[1] if num_queries is None else num_queries
    if mask is not None and mask.ndim == 3:
      mask = mask[:, :n]
    new_cache = {}

    def attend(module, role, q, kv, kv_mask, index):
      if cache is None:
        return module(q, kv, kv_mask, deterministic)
      y, new_cache[role] = module(q, kv, kv_mask, deterministic, cache=cache.get(role, {}),
                                  cache_index=index)
      return y

    if self.pre_norm:
      h = norm1(x)
      x = x[:, :n] + drop(attend(attn, "self", h[:, :n], h, mask, cache_index),
                          deterministic=deterministic)
      if self.cross_attention:
        x = x + drop(attend(cross, "cross", norm_cross(x), context, context_mask, None),
                     deterministic=deterministic)
      x = x + drop(mlp(norm2(x)), deterministic=deterministic)
    else:
      x = norm1(x[:, :n] + drop(attend(attn, "self", x[:, :n], x, mask, cache_index),
                                deterministic=deterministic))
      if self.cross_attention:
        x = norm_cross(x + drop(attend(cross, "cross", x, context, context_mask, None),
                                deterministic=deterministic))
      x = norm2(x + drop(mlp(x), deterministic=deterministic))
    x = constrain(x, ACT_EMBED)
    return x if cache is None else (x, new_cache)


def remat_block(module_cls, policy, static_argnums):
  """`module_cls` itself, or its `nn.remat` (activation checkpointing) for `config.remat`.

  Args:
    module_cls: a block class (TransformerBlock, LongNetBlock).
    policy: "none" (store every activation), "full" (store only the block's
      inputs; recompute the rest in the backward pass) or the name of a
      `jax.checkpoint_policies` policy, e.g. "dots_saveable".
    static_argnums: positions (self = 0) of the Python-valued call arguments
      (`deterministic`, `num_queries`); callers pass them positionally.

  The parameter tree is the same with or without remat: a lifted transform
  keeps the module's name and scope.
  """
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=_checkpoint_policy(policy), static_argnums=static_argnums)


def _checkpoint_policy(policy):
  return None if policy == "full" else getattr(jax.checkpoint_policies, policy)


def run_layers(module, blocks, layers, layer_fn, carry, *, deterministic, remat="none",
               scan=False):
  """`carry` through the layers `layers` (a range) of `module`, in order.

  Args:
    module: the calling (compact) module; the blocks are its children.
    blocks: {role: (block class, constructor kwargs, static_argnums, name
      format)}; layer i has one block per role, named `format.format(i)`.
    layers: range of layer indices.
    layer_fn: (carry, {role: block callable}) -> carry, one layer.
    deterministic: False draws each block's dropout from the 'dropout' rng.
    remat: config.remat for every block.
    scan: config.scan_layers. False: a Python loop over bound blocks (and
      always at init, which creates the per-layer parameters). True: one
      `jax.lax.scan` whose body applies unbound blocks to the layer's slice of
      the parameters stacked along a new leading axis, so XLA compiles the
      layer once instead of len(layers) times. The parameter tree is the same
      either way (block_0, block_1, ...): checkpoints, export and import do
      not see the switch. Cost: the stacked copy of the layers' parameters
      (and of their gradients) is a temporary of the step. Dropout masks
      differ from the loop's (a per-layer key split); without dropout the
      two give the same values.
  """
  if not scan or module.is_initializing() or len(layers) < 2:
    for i in layers:
      called = {role: remat_block(cls, remat, static)(**kwargs, name=fmt.format(i))
                for role, (cls, kwargs, static, fmt) in blocks.items()}
      carry = layer_fn(carry, called)
    return carry

  params = module.variables["params"]
  stacked = {role: jax.tree.map(lambda *a: jnp.stack(a),
                                *[nn.meta.unbox(params[fmt.format(i)]) for i in layers])
             for role, (_, _, _, fmt) in blocks.items()}
  keys = None
  if not deterministic:
    keys = jax.random.split(module.make_rng("dropout"), len(layers))
  unbound = {role: cls(**kwargs, parent=None) for role, (cls, kwargs, _, _) in blocks.items()}

  def body(carry, xs):
    layer_params, key = xs

    def call(n, role, *args):
      rngs = {} if key is None else {"dropout": jax.random.fold_in(key, n)}
      return unbound[role].apply({"params": layer_params[role]}, *args, rngs=rngs)
    called = {role: functools.partial(call, n, role) for n, role in enumerate(blocks)}
    return layer_fn(carry, called), None

  if remat != "none":
    body = jax.checkpoint(body, policy=_checkpoint_policy(remat), prevent_cse=False)
  # A block returns its compute dtype: the carry enters the scan in the dtype it leaves in.
  first = jax.tree.map(lambda a: a[0], (stacked, keys))
  out = jax.eval_shape(lambda c: body(c, first)[0], carry)
  carry = jax.tree.map(lambda c, o: c.astype(o.dtype), carry, out)
  carry, _ = jax.lax.scan(body, carry, (stacked, keys))
  return carry
