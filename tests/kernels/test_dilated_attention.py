"""Dilated attention against an independent implementation of its definition.

The reference below shares no code or method with clusjax.kernels: its masks
are built by loops over positions straight from the definition (padding to a
multiple of w, no clamping), and the branch mixing uses the identity

    sum_i softmax_i(lse_i) O_i = sum_i sum_k exp(s_ik) v_k / sum_i sum_k exp(s_ik),

i.e. ONE softmax over all (branch, key) pairs instead of per-branch lse's.
It runs in float64 numpy (forward) and float32 jnp (for jax.grad).
"""
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax.kernels import dilated_attention
from clusjax.kernels import dilated_attention_pallas
from clusjax.kernels.dilated_attention import segment_attention_xla

IMPLS = ("xla", "pallas")  # "pallas" runs with interpret=True on CPU


def allowed_pairs(n, kv_mask, ws, rs, num_heads, causal):
  """[B, H, n_branches, N, N] bool: query p may attend key k in branch i."""
  b = kv_mask.shape[0]
  allowed = np.zeros((b, num_heads, len(ws), n, n), bool)
  for i, (w, r) in enumerate(zip(ws, rs)):
    for h in range(num_heads):
      for s in range(-(-n // w)):
        sel = [s * w + h % r + r * t for t in range(w // r)]
        sel = [p for p in sel if p < n]  # the rest is padding: masked keys, no output
        for pq in sel:
          for pk in sel:
            if not causal or pk <= pq:
              allowed[:, h, i, pq, pk] = kv_mask[:, pk]
  return allowed


def reference(q, k, v, allowed, xp):
  """q, k, v: [B, N, H, D]; allowed: [B, H, nb, N, N]. Returns [B, N, H, D]."""
  stop = getattr(jax.lax, "stop_gradient") if xp is jnp else (lambda x: x)
  s = xp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  s = xp.where(allowed, s[:, :, None], -xp.inf)  # [B, H, nb, N, N]
  mx = stop(xp.max(s, axis=(2, 4), keepdims=True))
  mx = xp.where(xp.isfinite(mx), mx, 0.0)
  e = xp.exp(s - mx)
  den = xp.sum(e, axis=(2, 4))  # [B, H, N]
  out = xp.einsum("bhiqk,bkhd->bqhd", e, v)
  return out / xp.where(den > 0, den, 1.0).transpose(0, 2, 1)[..., None]


# (name, segment_lengths, dilation_rates, N, H, causal, mask kind)
CASES = [
    ("w8", (8,), (1,), 37, 4, False, "random"),
    ("w4-8_causal", (4, 8), (1, 2), 37, 4, True, None),
    ("w4-8-16_holes", (4, 8, 16), (1, 2, 4), 37, 4, False, "holes"),
    ("w4-8-16_holes_causal", (4, 8, 16), (1, 2, 4), 37, 4, True, "holes"),
    # w > N (clamped), r > H (offset 3 has no head), odd N.
    ("w_gt_n", (16, 64), (2, 4), 29, 3, False, "random"),
]


@functools.lru_cache(maxsize=None)
def case_data(name):
  _, ws, rs, n, h, causal, mask_kind = next(c for c in CASES if c[0] == name)
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  b, d = 2, 8
  q, k, v, ct = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(4))
  kv_mask = np.ones((b, n), bool)
  if mask_kind == "random":
    kv_mask = rng.random((b, n)) > 0.25
  elif mask_kind == "holes":
    kv_mask = rng.random((b, n)) > 0.2
    kv_mask[0, :16] = False  # positions 0..15: no key in ANY branch -> output 0
    kv_mask[1, 8:16] = False  # a fully masked w=8 segment; w=16 still sees keys
  allowed = allowed_pairs(n, kv_mask, ws, rs, h, causal)
  out64 = reference(*(x.astype(np.float64) for x in (q, k, v)), allowed, np)
  grads = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v, allowed, jnp) * ct),
                   argnums=(0, 1, 2))(q, k, v)
  kw = dict(segment_lengths=ws, dilation_rates=rs, kv_mask=None if mask_kind is None
            else jnp.asarray(kv_mask), causal=causal)
  return (q, k, v, ct), kw, out64, grads, allowed


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_matches_independent_reference(name, impl):
  (q, k, v, ct), kw, out64, ref_grads, allowed = case_data(name)
  f = lambda q, k, v: dilated_attention(q, k, v, implementation=impl, **kw)  # noqa: E731
  out, vjp = jax.vjp(f, q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, out64, atol=2e-5, rtol=0)
  no_key = ~allowed.any(axis=(2, 4)).transpose(0, 2, 1)  # [B, N, H]
  np.testing.assert_array_equal(np.asarray(out)[no_key], 0.0)
  grads = vjp(jnp.asarray(ct))
  for g, rg in zip(grads, ref_grads):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, rg, atol=1e-4, rtol=0)


def test_cases_cover_masked_rows():
  """The 'holes' cases really have positions with no key in one / all branches."""
  *_, allowed = case_data("w4-8-16_holes")
  per_branch = allowed.any(axis=4)  # [B, H, nb, N]
  assert (~per_branch.all(axis=2) & per_branch.any(axis=2)).any()  # some branch empty
  assert (~per_branch.any(axis=2)).any()  # every branch empty


def test_clamped_segment_equals_unclamped():
  """w >= N: one segment of w' = round_up(N, r) selects the same positions."""
  (q, k, v, _), _, _, _, _ = case_data("w8")
  n = q.shape[1]  # 37
  for r in (1, 2, 4):
    allowed = allowed_pairs(n, np.ones((2, n), bool), (128,), (r,), q.shape[2], False)
    out = dilated_attention(q, k, v, segment_lengths=(128,), dilation_rates=(r,),
                            implementation="xla")
    np.testing.assert_allclose(out, reference(q, k, v, allowed, np), atol=2e-5)


def test_kernel_lse_cotangent():
  """The kernel's custom_vjp takes a cotangent for lse (used by branch mixing)."""
  rng = np.random.default_rng(0)
  g, m, d = 3, 40, 8
  q, k, v, ct_o = (jnp.asarray(rng.standard_normal((g, m, d)), jnp.float32)
                   for _ in range(4))
  ct_lse = jnp.asarray(rng.standard_normal((g, m)), jnp.float32)
  valid = jnp.asarray(rng.random((g, m)) > 0.3).at[1].set(False)  # row 1: no key
  pallas = functools.partial(dilated_attention_pallas.segment_attention_pallas,
                             interpret=True)
  for causal in (False, True):
    o, lse = pallas(q, k, v, valid, causal=causal)
    o_ref, lse_ref = segment_attention_xla(q, k, v, valid, causal=causal)
    np.testing.assert_allclose(o, o_ref, atol=2e-5)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-5)
    assert np.isneginf(np.asarray(lse[1])).all() and not np.asarray(o[1]).any()

    def loss(attend, q, k, v):
      o, lse = attend(q, k, v, valid, causal=causal)
      return jnp.sum(o * ct_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * ct_lse, 0.0))

    ref = jax.grad(functools.partial(loss, segment_attention_xla), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(functools.partial(loss, pallas), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, ref):
      assert np.isfinite(np.asarray(a)).all()
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    # The lse term alone: d lse_i / d s_ij = p_ij, checked by finite differences.
    def lse_only(q):
      lse = pallas(q, k, v, valid, causal=causal)[1]
      return jnp.sum(jnp.where(jnp.isfinite(lse), lse * ct_lse, 0.0))

    dq = jax.grad(lse_only)(q)
    eps, e = 1e-2, jnp.zeros_like(q).at[0, 5, 3].set(1.0)
    fd = (lse_only(q + eps * e) - lse_only(q - eps * e)) / (2 * eps)
    np.testing.assert_allclose(dq[0, 5, 3], fd, atol=2e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_lowers_to_triton(causal):
  """Forward + backward lower for CUDA through Triton (lowering only: no GPU here)."""
  sd = jax.ShapeDtypeStruct((4, 256, 32), jnp.float32)
  valid = jax.ShapeDtypeStruct((4, 256), jnp.bool_)

  def loss(q, k, v, valid):
    o, lse = dilated_attention_pallas.segment_attention_pallas(
        q, k, v, valid, causal=causal, interpret=False)
    return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(sd, sd, sd, valid).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 2  # the forward and the backward kernel


def _compiled_bytes(n, impl):
  sd = jax.ShapeDtypeStruct((1, n, 4, 32), jnp.float32)
  loss = lambda q, k, v: jnp.sum(dilated_attention(  # noqa: E731
      q, k, v, segment_lengths=(2048, 4096, 8192), dilation_rates=(1, 2, 4),
      implementation=impl))
  ma = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(sd, sd, sd).compile().memory_analysis()
  return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_linear_in_n(impl):
  """Forward+backward compiled memory grows ~linearly: 16x tokens -> <= 20x bytes.

  "pallas" here is the interpret-mode kernel (its grid becomes an XLA loop, so
  compiling it at N = 2^20 is as cheap as at 2^16); nothing is run.
  """
  small, big = _compiled_bytes(1 << 16, impl), _compiled_bytes(1 << 20, impl)
  assert big <= 20 * small, (impl, small, big, big / small)


@pytest.mark.parametrize("kwargs, match", [
    (dict(segment_lengths=(4, 8), dilation_rates=(1,)), r"dilation_rates=\(1,\)"),
    (dict(segment_lengths=(6,), dilation_rates=(4,)), "r=4 does not divide segment length w=6"),
    (dict(segment_lengths=(8,), dilation_rates=(0,)), "r=0"),
    (dict(segment_lengths=(8,), dilation_rates=(1,), kv_mask=np.ones((2, 5), bool)),
     r"kv_mask.shape=\(2, 5\)"),
    (dict(segment_lengths=(8,), dilation_rates=(1,), implementation="cuda"),
     "implementation='cuda'"),
])
def test_bad_arguments(kwargs, match):
  x = jnp.zeros((2, 6, 2, 4))
  with pytest.raises(ValueError, match=match):
    dilated_attention(x, x, x, **kwargs)
