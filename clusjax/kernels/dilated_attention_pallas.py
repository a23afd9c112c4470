"""Pallas flash attention over independent segments, with lse and its gradient.

This is the per-branch core of dilated attention (LongNet, Ding et al. 2023):
`dilated_attention.py` gathers every (batch, segment, head) of a branch into
one row g of a `[G, m, D]` array (m = w / r, the sparsified segment length),
and this kernel runs dense softmax attention inside each row:

    o[g, i]   = sum_j softmax_j(s[g, i, j]) v[g, j]
    lse[g, i] = log sum_j exp(s[g, i, j]),   s = q k^T / sqrt(D), masked

over keys j with `valid[g, j]` (and j <= i when causal). A row with no such
key gets o = 0 and lse = -inf. Both outputs are differentiable: lse feeds the
branch mixing, so the backward pass takes a cotangent for it as well.

Structure follows `jax.experimental.pallas.ops.gpu.attention` (FlashAttention-2):
  forward   grid (G, m/block_q); each program keeps one q block and loops over
            the row's k/v blocks with an online softmax (running max m, sum l).
  backward  grid (G, m/block); program (g, i) accumulates dk, dv for k/v block
            i (loop over q blocks) and dq for q block i (loop over k/v blocks),
            recomputing p = exp(s - lse) from the saved lse.
The same code lowers to Triton on GPU (`plgpu.CompilerParams`) and runs with
`interpret=True` on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Triton's dot wants both operands' dims >= 16 and powers of two.
_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two), from `benchmarks/dilated_attention.py --sweep-blocks`
  on an H200 (bf16, m = 2048, D = 32; benchmarks/RESULTS.md): fastest of 36, and
  num_stages 3 beat 2 in all 18 pairs; block_bwd 32, or 8 warps with block_bwd <= 64,
  were 1.8-4.3x slower."""
  block_q: int = 128      # forward: queries per program
  block_k: int = 128      # forward: keys per inner-loop step
  block_bwd: int = 64     # backward: q block = k/v block (fused dq + dkdv)
  num_warps: int = 4
  num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) arguments of the custom_vjp."""
  causal: bool
  scale: float
  block_q: int
  block_k: int
  block_bwd: int
  num_warps: int
  num_stages: int
  interpret: bool


def _key_mask(valid, q_idx, k_idx, causal):
  """[bq, bk] bool: key is a real token (and not after the query if causal)."""
  mask = valid[None, :] > 0
  if causal:
    mask = jnp.logical_and(mask, q_idx[:, None] >= k_idx[None, :])
  return mask


def _fwd_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, cfg: _Config):
  # q_ref/o_ref: [block_q, Dp]; k_ref/v_ref: [m, Dp]; valid_ref: [m]; lse_ref: [block_q]
  bq, bk = cfg.block_q, cfg.block_k
  seq_len, dp = k_ref.shape
  iq = pl.program_id(1)
  q = q_ref[...]
  q_idx = iq * bq + jnp.arange(bq)

  def body(j, carry):
    acc, m_prev, l_prev = carry
    ks = pl.ds(j * bk, bk)
    k = k_ref[ks, :]
    v = v_ref[ks, :]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * cfg.scale
    s = jnp.where(_key_mask(valid_ref[ks], q_idx, j * bk + jnp.arange(bk), cfg.causal),
                  s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # Masked logits are -inf (not a large finite value) so that a row with no
    # key so far contributes exactly nothing; m_safe avoids (-inf) - (-inf).
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    corr = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l_next = corr * l_prev + jnp.sum(p, axis=1)
    acc = corr[:, None] * acc + jnp.dot(p.astype(v.dtype), v,
                                        preferred_element_type=jnp.float32)
    return acc, m_next, l_next

  # Causal: key blocks entirely after this q block are skipped.
  n_k = lax.div(bq * (iq + 1) + bk - 1, bk) if cfg.causal else seq_len // bk
  init = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m_i, l_i = lax.fori_loop(0, n_k, body, init)
  has_key = l_i > 0
  l_safe = jnp.where(has_key, l_i, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has_key, m_i + jnp.log(l_safe), -jnp.inf)


def _bwd_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref,
                dq_ref, dk_ref, dv_ref, *, cfg: _Config):
  # Inputs are whole rows: q/k/v/do [m, Dp], valid/lse/delta [m].
  # Outputs are blocks: dq/dk/dv [block, Dp], all at block index program_id(1).
  b = cfg.block_bwd
  seq_len, dp = q_ref.shape
  n_blocks = seq_len // b
  i = pl.program_id(1)

  def probs(q_blk, k_blk, lse_blk, valid_blk, q_idx, k_idx):
    """p = exp(s - lse), exactly 0 for masked keys and for rows with lse = -inf."""
    s = jnp.dot(q_blk, k_blk.T, preferred_element_type=jnp.float32) * cfg.scale
    lse_safe = jnp.where(lse_blk == -jnp.inf, jnp.inf, lse_blk)
    p = jnp.exp(s - lse_safe[:, None])
    return jnp.where(_key_mask(valid_blk, q_idx, k_idx, cfg.causal), p, 0.0)

  # dk, dv for k/v block i: loop over q blocks (causal: only those at or after i).
  ks = pl.ds(i * b, b)
  k = k_ref[ks, :]
  v = v_ref[ks, :]
  valid_k = valid_ref[ks]
  k_idx = i * b + jnp.arange(b)

  def dkdv_body(jq, carry):
    dk, dv = carry
    qs = pl.ds(jq * b, b)
    q = q_ref[qs, :]
    do = do_ref[qs, :]
    p = probs(q, k, lse_ref[qs], valid_k, jq * b + jnp.arange(b), k_idx)
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    dp_ = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    # delta = rowsum(dO * O) - dlse: the lse cotangent enters here (see _bwd).
    ds = p * (dp_ - delta_ref[qs][:, None])
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros((b, dp), jnp.float32)
  dk, dv = lax.fori_loop(i if cfg.causal else 0, n_blocks, dkdv_body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  # dq for q block i: loop over k/v blocks (causal: only those up to i).
  qs = pl.ds(i * b, b)
  q = q_ref[qs, :]
  do = do_ref[qs, :]
  lse = lse_ref[qs]
  delta = delta_ref[qs]
  q_idx = i * b + jnp.arange(b)

  def dq_body(jk, dq):
    kss = pl.ds(jk * b, b)
    k_blk = k_ref[kss, :]
    p = probs(q, k_blk, lse, valid_ref[kss], q_idx, jk * b + jnp.arange(b))
    dp_ = jnp.dot(do, v_ref[kss, :].T, preferred_element_type=jnp.float32)
    ds = p * (dp_ - delta[:, None])
    return dq + jnp.dot(ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32)

  dq = lax.fori_loop(0, i + 1 if cfg.causal else n_blocks, dq_body, zeros)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _compiler_params(cfg: _Config):
  # Passing Triton params selects the Triton lowering (the default in jax
  # 0.10.2 with no params is Mosaic GPU); ignored in interpret mode.
  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _forward(q, k, v, valid, cfg: _Config):
  g, m, dp = q.shape
  row = lambda gi, i: (gi, 0, 0)  # noqa: E731  (whole row of k / v)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(g, m // cfg.block_q),
      in_specs=[
          pl.BlockSpec((None, cfg.block_q, dp), lambda gi, i: (gi, i, 0)),
          pl.BlockSpec((None, m, dp), row),
          pl.BlockSpec((None, m, dp), row),
          pl.BlockSpec((None, m), lambda gi, i: (gi, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, cfg.block_q, dp), lambda gi, i: (gi, i, 0)),
          pl.BlockSpec((None, cfg.block_q), lambda gi, i: (gi, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct((g, m, dp), jnp.float32),
                 jax.ShapeDtypeStruct((g, m), jnp.float32)],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="dilated_attention_fwd",
  )(q, k, v, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, valid, cfg: _Config):
  return _forward(q, k, v, valid, cfg)


def _flash_fwd(q, k, v, valid, cfg: _Config):
  o, lse = _forward(q, k, v, valid, cfg)
  return (o, lse), (q, k, v, valid, o, lse)


def _flash_bwd(cfg: _Config, res, cotangents):
  q, k, v, valid, o, lse = res
  do, dlse = cotangents
  g, m, dp = q.shape
  # With s_ij the logits and p_ij = exp(s_ij - lse_i):
  #   dL/ds_ij = p_ij (dO_i . v_j - rowsum(dO_i * O_i)) + p_ij dlse_i
  #            = p_ij (dp_ij - delta_i),   delta_i = rowsum(dO_i * O_i) - dlse_i,
  # so the lse cotangent only shifts delta and the FA-2 kernel is unchanged.
  # Rows with lse = -inf have p = 0; their dlse is zeroed so 0 * junk can't be NaN.
  dlse = jnp.where(lse == -jnp.inf, 0.0, dlse)
  delta = jnp.sum(o * do.astype(jnp.float32), axis=-1) - dlse
  b = cfg.block_bwd
  row = lambda gi, i: (gi, 0, 0)  # noqa: E731
  vec = lambda gi, i: (gi, 0)  # noqa: E731
  blk = lambda gi, i: (gi, i, 0)  # noqa: E731
  full = pl.BlockSpec((None, m, dp), row)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_bwd_kernel, cfg=cfg),
      grid=(g, m // b),
      in_specs=[full, full, full, pl.BlockSpec((None, m), vec), full,
                pl.BlockSpec((None, m), vec), pl.BlockSpec((None, m), vec)],
      out_specs=[pl.BlockSpec((None, b, dp), blk)] * 3,
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="dilated_attention_bwd",
  )(q, k, v, valid, do.astype(q.dtype), lse, delta)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(x: int, n: int) -> int:
  return -(-x // n) * n


def segment_attention_pallas(q, k, v, valid, *, causal: bool, interpret: bool,
                             block_sizes: BlockSizes = BlockSizes()):
  """Softmax attention inside each row, by the Pallas kernel.

  Args:
    q, k, v: [G, m, D] -- G independent segments of m tokens.
    valid: [G, m] bool -- True = a real key.
    causal: keys only at or before the query (by index within the row).
    interpret: run the kernel with `interpret=True` (CPU).
  Returns:
    o: [G, m, D] float32, lse: [G, m] float32 (-inf for rows with no key).
    Differentiable in q, k, v through both outputs.
  """
  g, m, d = q.shape
  scale = 1.0 / math.sqrt(d)  # of the true D, not the padded one
  # Pad D and m to powers of two / block multiples that Triton accepts; padded
  # features are zero (q.k unchanged), padded keys invalid, padded queries dropped.
  dp = max(_MIN_BLOCK, pl.next_power_of_2(d))
  top = max(_MIN_BLOCK, pl.next_power_of_2(m))
  bq, bk, bb = (min(x, top) for x in (block_sizes.block_q, block_sizes.block_k,
                                      block_sizes.block_bwd))
  mp = _round_up(m, max(bq, bk, bb))
  pad = lambda x: jnp.pad(x, [(0, 0), (0, mp - m), (0, dp - d)])  # noqa: E731
  valid = jnp.pad(valid, [(0, 0), (0, mp - m)]).astype(jnp.int32)
  cfg = _Config(causal=bool(causal), scale=scale, block_q=bq, block_k=bk, block_bwd=bb,
                num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages,
                interpret=bool(interpret))
  o, lse = _flash(pad(q), pad(k), pad(v), valid, cfg)
  return o[:, :m, :d], lse[:, :m]
