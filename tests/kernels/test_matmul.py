"""einsum_f32: float32 result, jnp.einsum's gradient, bf16 backward matmuls for bf16 inputs."""
import jax
import jax.numpy as jnp
import numpy as np

from clusjax.kernels.matmul import einsum_f32

SPEC = "bqhd,bkhd->bhqk"


def _operands(dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(2))
  return jnp.asarray(q, dtype), jnp.asarray(k, dtype)


def _loss(einsum, q, k):
  # A softmax after the product, as in attention, so the cotangent is not constant.
  return jnp.sum(jax.nn.softmax(einsum(SPEC, q, k), axis=-1) * jnp.arange(5.0))


def _reference(spec, q, k):
  return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def test_float32_is_jnp_einsum_and_its_gradient():
  q, k = _operands(jnp.float32)
  np.testing.assert_array_equal(einsum_f32(SPEC, q, k), _reference(SPEC, q, k))
  ours = jax.grad(lambda q, k: _loss(einsum_f32, q, k), argnums=(0, 1))(q, k)
  ref = jax.grad(lambda q, k: _loss(_reference, q, k), argnums=(0, 1))(q, k)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bfloat16_forward_is_float32_and_backward_matmuls_are_bf16():
  q, k = _operands(jnp.bfloat16)
  out = einsum_f32(SPEC, q, k)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, _reference(SPEC, q, k))

  grad = jax.grad(lambda q, k: _loss(einsum_f32, q, k), argnums=(0, 1))
  dots = [e for e in jax.make_jaxpr(grad)(q, k).jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3   # forward, dq, dk
  for e in dots:
    assert {v.aval.dtype for v in e.invars} == {jnp.dtype(jnp.bfloat16)}, e
  # The gradient is the float32 one up to bf16 rounding of the cotangent.
  dq, dk = grad(q, k)
  assert dq.dtype == dk.dtype == jnp.bfloat16
  ref = jax.grad(lambda q, k: _loss(_reference, q, k), argnums=(0, 1))(
      q.astype(jnp.float32), k.astype(jnp.float32))
  for a, b in zip((dq, dk), ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.02)
