"""Shared blocks against numpy references, logical annotations, mesh behaviour.

The helpers at the top (no `test_` prefix) are reused by test_vit.py and
test_bert.py.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax.models.layers import LayerNorm, Mlp, MultiHeadAttention, TransformerBlock

RULES = (("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
         ("heads", "tensor"), ("vocab", "tensor"), ("act_mlp", "tensor"),
         ("act_heads", "tensor"))


def make_mesh():
  """(data, fsdp, tensor) = (2, 2, 2) over the 8 fake CPU devices (conftest)."""
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def randomize(params, seed=0, std=0.1):
  """Unboxed params with noise on every leaf, so LayerNorm scales/biases and
  all biases are non-trivial (init has them at 1 / 0, which hides swaps)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: (np.asarray(a) + rng.normal(0.0, std, np.shape(a))).astype(np.float32), params)


def assert_logically_annotated(boxed_params):
  """Every leaf is nn.LogicallyPartitioned with one name per array dim."""
  leaves = jax.tree.leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
    assert leaf.value.dtype == jnp.float32


def assert_sharded_matches(model, boxed_variables, *args):
  """A jitted forward with params sharded by the logical rules (under a mesh)
  equals the plain unsharded forward to 1e-5."""
  plain = nn.unbox(boxed_variables)
  expected = np.asarray(jax.jit(model.apply)(plain, *args))
  mesh = make_mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_variables), mesh, RULES)
    sharded = jax.device_put(plain, shardings)
    fn = jax.jit(model.apply)
    # The constraints are really there (not silently no-ops) under the mesh.
    assert "sharding_constraint" in fn.lower(sharded, *args).as_text()
    got = fn(sharded, *args)
  # Some parameter really is split over devices.
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


# --- numpy references ---------------------------------------------------------------

def _np_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_attention(p, xq, xkv, mask):
  q = np.einsum("ble,ehd->blhd", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("ble,ehd->blhd", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("ble,ehd->blhd", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  logits = np.where(mask[:, None, None, :], logits, -1e30)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ctx = np.einsum("bhqk,bkhd->bqhd", w, v)
  return np.einsum("bqhd,hde->bqe", ctx, p["out"]["kernel"]) + p["out"]["bias"]


_gelu = np.vectorize(lambda x: 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))))


def test_cross_attention_matches_numpy_and_masks():
  # Queries: 5 tokens of width 24; keys/values: 7 tokens of width 40.
  xq = jax.random.normal(jax.random.key(0), (2, 5, 24))
  xkv = jax.random.normal(jax.random.key(1), (2, 7, 40))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3], bool)
  mha = MultiHeadAttention(num_heads=4, head_dim=8)
  boxed = mha.init(jax.random.key(2), xq, xkv, mask)
  assert_logically_annotated(boxed)
  names = {k: v.names for k, v in boxed["params"]["query"].items()}
  assert names == {"kernel": ("embed", "heads", "kv"), "bias": ("heads", "kv")}
  assert boxed["params"]["out"]["kernel"].names == ("heads", "kv", "embed")
  params = randomize(nn.unbox(boxed)["params"])

  out = mha.apply({"params": params}, xq, xkv, mask)
  assert out.shape == (2, 5, 24)   # out width follows the query stream
  np.testing.assert_allclose(out, _np_attention(params, np.asarray(xq), np.asarray(xkv), mask),
                             atol=1e-5, rtol=1e-5)

  # Masked keys/values have no influence.
  xkv2 = xkv.at[1, 4:].set(100.0)
  np.testing.assert_allclose(mha.apply({"params": params}, xq, xkv2, mask), out, atol=1e-6)
  # ...but unmasked ones do (the check above can fail).
  assert not np.allclose(mha.apply({"params": params}, xq, xkv2, None), out, atol=1e-3)

  # Rules without a mesh: constraints stay no-ops, same numbers.
  with nn.logical_axis_rules(RULES):
    np.testing.assert_allclose(mha.apply({"params": params}, xq, xkv, mask), out, atol=1e-6)


def test_mlp_and_layer_norm_match_numpy():
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  mlp = Mlp(hidden_dim=32)
  p = randomize(nn.unbox(mlp.init(jax.random.key(1), x))["params"])
  assert p["fc1"]["kernel"].shape == (16, 32)
  h = _gelu(np.asarray(x) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  np.testing.assert_allclose(mlp.apply({"params": p}, x), h @ p["fc2"]["kernel"] + p["fc2"]["bias"],
                             atol=1e-5, rtol=1e-5)

  ln = LayerNorm(epsilon=1e-12, dtype=jnp.bfloat16)
  boxed = ln.init(jax.random.key(1), x)
  assert boxed["params"]["scale"].names == ("embed",)
  p = randomize(nn.unbox(boxed)["params"])
  y = ln.apply({"params": p}, x * 3.0 + 1.0)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             _np_layer_norm(np.asarray(x) * 3.0 + 1.0, p["scale"], p["bias"], 1e-12),
                             atol=3e-2)


def test_init_and_apply_under_mesh():
  # flax's own DenseGeneral fails here (it unboxes a flattened kernel under a
  # mesh); ours must init and run with the mesh and rules set.
  x = jax.random.normal(jax.random.key(0), (4, 6, 32))
  block = TransformerBlock(num_heads=4, mlp_dim=64, pre_norm=True)
  with jax.set_mesh(make_mesh()), nn.logical_axis_rules(RULES):
    boxed = jax.jit(block.init)(jax.random.key(1), x)
  assert_sharded_matches(block, boxed, x)


def test_dropout_uses_dropout_rng():
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  block = TransformerBlock(num_heads=4, mlp_dim=64, pre_norm=False, dropout=0.5)
  v = block.init(jax.random.key(1), x)
  a = block.apply(v, x)
  np.testing.assert_array_equal(a, block.apply(v, x, deterministic=True))
  b = block.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  with pytest.raises(Exception, match="dropout"):
    block.apply(v, x, deterministic=False)
