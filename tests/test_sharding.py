"""Logical -> mesh shardings of the parameters: dimensions the mesh does not divide."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clusjax.parallel.mesh import create_mesh, logical_shardings, per_device_bytes

RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("batch", ("data", "fsdp")))


def _boxed(shape, names):
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


def test_a_dimension_its_mesh_axes_do_not_divide_is_replicated_over_them():
  """As LongNet's width 64 and the ITM head's 1,600 inputs on a 256-way fsdp axis."""
  mesh = create_mesh({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()[:8])
  tree = {"divides": _boxed((12, 64), ("embed", "mlp")),
          "does_not": _boxed((6, 64), ("embed", "mlp")),
          "partly": _boxed((6, 3), ("batch", None)),
          "plain": jax.ShapeDtypeStruct((5,), jnp.int32)}
  specs = {k: s.spec for k, s in logical_shardings(tree, mesh, RULES).items()}
  assert specs == {"divides": P("fsdp", "tensor"), "does_not": P(None, "tensor"),
                   "partly": P("data", None), "plain": P(None)}, specs
  # Every sharding can place its array (jax would raise on an uneven split).
  shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(tree), logical_shardings(tree, mesh, RULES))
  assert per_device_bytes(shapes["divides"]) == 12 * 64 * 4 // 4
  assert per_device_bytes(shapes["does_not"]) == 6 * 64 * 4
