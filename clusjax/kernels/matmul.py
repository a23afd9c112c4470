"""A matmul with a float32 result whose backward stays in the operands' dtype.

Attention logits feed a float32 softmax, so their product is accumulated and
returned in float32 (`preferred_element_type`). Plain autodiff of that einsum
then contracts the float32 cotangent with the bf16 operands: mixed-dtype dots
that XLA runs as float32 matmuls. `einsum_f32` casts the cotangent to the
operands' dtype first, as flash attention (and dilated_attention_pallas) do
with dS, so with config.dtype = bfloat16 every backward matmul is bf16 too.
"""
import functools

import jax
import jax.numpy as jnp


def einsum_f32(subscripts, a, b):
  """`jnp.einsum(subscripts, a, b)` accumulated and returned in float32.

  The gradient is the einsum's own, taken with the cotangent cast to the
  operands' common dtype: for float32 operands jnp.einsum itself (the same
  program as before this function existed), for bf16 ones bf16 matmuls.
  """
  if jnp.result_type(a, b) == jnp.float32:
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)
  return _einsum_low_precision(subscripts, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_low_precision(subscripts, a, b):
  return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def _einsum_fwd(subscripts, a, b):
  return _einsum_low_precision(subscripts, a, b), (a, b)


def _einsum_bwd(subscripts, residuals, g):
  a, b = residuals
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(subscripts, a, b), a, b)
  return vjp(g.astype(jnp.result_type(a, b)))


_einsum_low_precision.defvjp(_einsum_fwd, _einsum_bwd)
