"""Device mesh and logical -> mesh sharding.

The mesh has axes (data, fsdp, tensor). Parameters and activations carry
logical axis names; `config.sharding.rules` maps those to mesh axes, so
changing the parallelism is a config edit (MaxText style).
"""
import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clusjax.config import MESH_AXES, resolve_mesh_shape


def create_mesh(mesh_config, devices=None):
  """Builds a Mesh over `devices` (default: all) with axes (data, fsdp, tensor).

  Axis types are Auto: classic jit/GSPMD propagation, where XLA inserts the
  collectives (jax 0.10 defaults to Explicit, which refuses mixed shardings).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  grid = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(config):
  """`config.sharding.rules` as the tuple-of-tuples flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.sharding.rules)


def logical_shardings(abstract_boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves are nn.LogicallyPartitioned (or plain).

  Plain leaves (step counters, RNG keys, optimizer counts) are replicated.
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh, rules):
  """Sharding of a batch array: leading axis over the logical 'batch' axes."""
  axes = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, P(*axes))


@contextlib.contextmanager
def mesh_context(mesh, rules):
  """Makes `mesh` and the logical `rules` current while tracing model code.

  Activation constraints (`nn.with_logical_constraint`) read both.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def per_device_bytes(tree):
  """Bytes one device holds of a tree of (possibly sharded) jax.Arrays, or of
  ShapeDtypeStructs with shardings (a state that is compiled, never made)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    shape = leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total
