"""Dilated attention (LongNet, Ding et al. 2023, Sec. 2.2), DESIGN §4.

Meaning, for branches (w_i, r_i) with r_i | w_i and q, k, v: [B, N, H, D]:
  * pad the sequence to a multiple of w_i (padding is masked);
  * head h uses offset o = h mod r_i; segment s selects the positions
    s*w_i + o + r_i*t, t = 0 .. w_i/r_i - 1;
  * softmax attention (scale 1/sqrt(D)) among the selected positions of a
    segment, over unmasked keys (and keys <= query when causal), gives O_i[p]
    and lse_i[p]; O_i = 0, lse_i = -inf where p is not selected or has no key;
  * O[p] = sum_i softmax_i(lse_i[p]) O_i[p] over branches with finite lse
    (LongNet Eq. 10: weights proportional to the softmax denominators), 0 where
    no branch has one.

How it is computed (both implementations share all but the inner attention):
  Since r_i | w_i, segment starts are multiples of r_i, so the selected
  positions of head h are exactly {p : p mod r = o}, cut into runs of
  m = w/r. Reshaping the padded [B, Np, H, D] to [B, S, m, r, H, D]
  (p = s*w + t*r + j) makes head h's tokens the static slice [:, :, :, h % r, h]:
  no gather indices, just strided slicing. All (batch, segment, head) triples
  then become G = B*S*H independent rows of m tokens, attended densely
  ("xla": jnp, a few rows at a time; "pallas": the flash kernel), and scattered
  back by a select against the one-hot (j == h mod r).

Segment clamping: when w >= N the padded sequence is one segment. Any w' with
  r | w' and N <= w' <= w gives the same result: one segment starting at 0,
  the same offset and stride, and the positions in [w', w) it drops are all
  padding (masked keys, discarded queries). We use w' = round_up(N, r).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from clusjax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from clusjax.kernels import dilated_attention_pallas
from clusjax.kernels.matmul import einsum_f32


# "xla": score elements ([m, m] per row) materialised per step of the
# segment loop; bounds the temporary memory independently of N.
_XLA_SCORE_BUDGET = 1 << 22


def _validate(q, k, v, segment_lengths, dilation_rates, kv_mask, implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
  if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(f"q, k, v must share one shape [B, N, H, D]; got q.shape={q.shape}, "
                     f"k.shape={k.shape}, v.shape={v.shape}.")
  ws, rs = tuple(segment_lengths), tuple(dilation_rates)
  if len(ws) != len(rs) or not ws:
    raise ValueError(f"segment_lengths={ws} and dilation_rates={rs} must be non-empty "
                     "tuples of equal length (one (w, r) per branch).")
  for w, r in zip(ws, rs):
    if not (isinstance(w, numbers.Integral) and isinstance(r, numbers.Integral)
            and w > 0 and r > 0):
      raise ValueError(f"segment length w={w!r} and dilation rate r={r!r} must be "
                       "positive ints.")
    if w % r:
      raise ValueError(f"dilation rate r={r} does not divide segment length w={w} "
                       f"(segment_lengths={ws}, dilation_rates={rs}).")
  ws, rs = tuple(int(w) for w in ws), tuple(int(r) for r in rs)  # hashable, jit-static
  b, n = q.shape[:2]
  if kv_mask is not None and tuple(kv_mask.shape) != (b, n):
    raise ValueError(f"kv_mask.shape={tuple(kv_mask.shape)} must be [B, N] = {(b, n)}.")
  return ws, rs


def _round_up(x: int, n: int) -> int:
  return -(-x // n) * n


def segment_attention_xla(q, k, v, valid, *, causal: bool):
  """Softmax attention inside each row, in jnp. Same contract as the kernel.

  Args:
    q, k, v: [G, m, D]; valid: [G, m] bool (True = a real key).
  Returns:
    o: [G, m, D] float32, lse: [G, m] float32 (-inf for rows with no key).

  Rows are processed `_XLA_SCORE_BUDGET // m**2` at a time by `lax.map`, and
  each step is rematerialised in the backward pass (`jax.checkpoint`), so the
  [m, m] scores of only one step are alive at a time: memory stays linear in G.
  """
  g, m, d = q.shape
  scale = 1.0 / math.sqrt(d)
  tri = jnp.tril(jnp.ones((m, m), bool))

  def one_row(args):
    qr, kr, vr, valid_r = args  # [m, D], [m, D], [m, D], [m]
    s = einsum_f32("qd,kd->qk", qr, kr) * scale
    mask = jnp.broadcast_to(valid_r[None, :], (m, m))
    if causal:
      mask = mask & tri
    s = jnp.where(mask, s, -jnp.inf)
    # Safe log-sum-exp: rows with no key give lse = -inf, o = 0, and zero
    # (not NaN) gradients. The max is a constant shift, so no gradient.
    mx = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.exp(s - mx)
    l = jnp.sum(e, axis=-1)
    has_key = l > 0
    l_safe = jnp.where(has_key, l, 1.0)
    o = einsum_f32("qk,kd->qd", e.astype(vr.dtype), vr) / l_safe[:, None]
    lse = jnp.where(has_key, mx[:, 0] + jnp.log(l_safe), -jnp.inf)
    return o, lse

  one_row = jax.checkpoint(one_row)
  rows_per_step = max(1, _XLA_SCORE_BUDGET // (m * m))
  if rows_per_step >= g:
    return jax.vmap(one_row)((q, k, v, valid))
  return lax.map(one_row, (q, k, v, valid), batch_size=rows_per_step)


def _branch(q, k, v, mask, w: int, r: int, attend):
  """One (w, r) branch. q, k, v: [B, N, H, D]; mask: [B, N] bool.

  Returns O_i: [B, N, H, D] float32 and lse_i: [B, N, H] float32.
  """
  b, n, h, d = q.shape
  w = min(w, _round_up(n, r))  # clamp: see the module docstring
  m, s = w // r, -(-n // w)
  n_pad = s * w

  def gather(x):
    """[B, N, H, ...] -> [B*S*H, m, ...]: row (b, s, h) = x[b, s*w + h%r + r*t, h]."""
    x = jnp.pad(x, [(0, 0), (0, n_pad - n)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, s, m, r, h, *x.shape[3:])
    x = jnp.stack([x[:, :, :, hh % r, hh] for hh in range(h)], axis=2)  # [B, S, H, m, ...]
    return x.reshape(b * s * h, m, *x.shape[4:])

  valid = gather(jnp.broadcast_to(mask[:, :, None], (b, n, h)))
  o, lse = attend(gather(q), gather(k), gather(v), valid)

  # Scatter back: position s*w + t*r + j of head hh holds row (b, s, hh)'s t-th
  # output iff j == hh % r; elsewhere O_i = 0 and lse_i = -inf.
  selected = (jnp.arange(r)[:, None] == jnp.arange(h)[None, :] % r)  # [r, H]
  o = jnp.moveaxis(o.reshape(b, s, h, m, d), 2, 3)[:, :, :, None]  # [B, S, m, 1, H, D]
  o = jnp.where(selected[:, :, None], o, 0.0).reshape(b, n_pad, h, d)[:, :n]
  lse = jnp.moveaxis(lse.reshape(b, s, h, m), 2, 3)[:, :, :, None]  # [B, S, m, 1, H]
  lse = jnp.where(selected, lse, -jnp.inf).reshape(b, n_pad, h)[:, :n]
  return o, lse


def _mix(outs, lses):
  """O = sum_i softmax_i(lse_i) O_i over finite lse_i; 0 where none is finite.

  outs: [nb, B, N, H, D] float32; lses: [nb, B, N, H] float32. Written so that
  -inf entries get zero weight and zero (finite) gradient.
  """
  mx = lax.stop_gradient(jnp.max(lses, axis=0))
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  e = jnp.exp(lses - mx)  # 0 for lse = -inf
  denom = jnp.sum(e, axis=0)
  weights = e / jnp.where(denom > 0, denom, 1.0)
  return jnp.sum(weights[..., None] * outs, axis=0)


def _default_implementation() -> str:
  # The kernel lowers through Triton; its TPU (Mosaic) lowering is unverified,
  # so TPU and CPU use the jnp path.
  return "pallas" if jax.default_backend() == "gpu" else "xla"


@functools.partial(jax.jit, static_argnames=("segment_lengths", "dilation_rates", "causal",
                                             "implementation"))
def _dilated_attention(q, k, v, kv_mask, *, segment_lengths, dilation_rates, causal,
                       implementation):
  if implementation == "xla":
    attend = functools.partial(segment_attention_xla, causal=causal)
  else:
    attend = functools.partial(dilated_attention_pallas.segment_attention_pallas,
                               causal=causal,
                               interpret=jax.default_backend() == "cpu")
  b, n = q.shape[:2]
  mask = jnp.ones((b, n), bool) if kv_mask is None else kv_mask.astype(bool)
  outs, lses = zip(*(_branch(q, k, v, mask, w, r, attend)
                     for w, r in zip(segment_lengths, dilation_rates)))
  return _mix(jnp.stack(outs), jnp.stack(lses)).astype(q.dtype)


def dilated_attention(q, k, v, *, segment_lengths: Sequence[int],
                      dilation_rates: Sequence[int], kv_mask=None, causal: bool = False,
                      implementation: str = "auto"):
  """LongNet dilated attention (see the module docstring for the exact meaning).

  Args:
    q, k, v: [B, N, H, D].
    segment_lengths: (w_1, ..., w_n) ints; dilation_rates: (r_1, ..., r_n),
      r_i | w_i.
    kv_mask: [B, N] bool, True = a real token; None = all real.
    causal: attend only to keys at or before the query.
    implementation: "xla" (jnp, blockwise), "pallas" (the kernel; interpret
      mode on CPU) or "auto" (pallas on GPU, xla elsewhere).
  Returns:
    [B, N, H, D] in q.dtype (softmax statistics and mixing in float32).
  Memory is linear in N for fixed (w, r): nothing larger than one segment's
  [w/r, w/r] scores per row is materialised (per step of the segment loop).
  """
  ws, rs = _validate(q, k, v, segment_lengths, dilation_rates, kv_mask, implementation)
  if implementation == "auto":
    implementation = _default_implementation()
  return _dilated_attention(q, k, v, kv_mask, segment_lengths=ws, dilation_rates=rs,
                            causal=bool(causal), implementation=implementation)


def dilated_attention_reference(q, k, v, *, segment_lengths, dilation_rates, kv_mask=None,
                                causal=False):
  """The jnp reference: `dilated_attention(..., implementation="xla")`."""
  return dilated_attention(q, k, v, segment_lengths=segment_lengths,
                           dilation_rates=dilation_rates, kv_mask=kv_mask, causal=causal,
                           implementation="xla")
