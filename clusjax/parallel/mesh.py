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
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clusjax.config import MESH_AXES, dcn_mesh_shape, resolve_mesh_shape


def device_grid(mesh_config, devices):
  """The devices as an array of the mesh's shape (data, fsdp, tensor).

  With `mesh_config.dcn` (slices per axis, product > 1) the grid is hybrid
  (`mesh_utils.create_hybrid_device_mesh`): each slice (a TPU slice, or the
  devices of one process on GPUs and CPUs) holds a contiguous block of every
  axis, so only the axes split over slices talk over the data-centre network.
  """
  shape = resolve_mesh_shape(mesh_config, len(devices))
  dcn = dcn_mesh_shape(mesh_config, shape)
  if math.prod(dcn.values()) == 1:
    return np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
  by_slice = hasattr(devices[0], "slice_index")
  granules = {d.slice_index if by_slice else d.process_index for d in devices}
  if len(granules) != math.prod(dcn.values()):
    raise ValueError(
        f"config.mesh.dcn={dcn} asks for {math.prod(dcn.values())} slices, but the "
        f"{len(devices)} devices form {len(granules)} "
        f"{'TPU slices' if by_slice else 'processes'}.")
  return mesh_utils.create_hybrid_device_mesh(
      [shape[a] // dcn[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices,
      process_is_granule=not by_slice, allow_split_physical_axes=True)


def create_mesh(mesh_config, devices=None):
  """Builds a Mesh over `devices` (default: all) with axes (data, fsdp, tensor)
  (`device_grid`: hybrid with config.mesh.dcn).

  Axis types are Auto: classic jit/GSPMD propagation, where XLA inserts the
  collectives (jax 0.10 defaults to Explicit, which refuses mixed shardings).
  """
  devices = jax.devices() if devices is None else list(devices)
  grid = device_grid(mesh_config, devices)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(config):
  """`config.sharding.rules` as the tuple-of-tuples flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.sharding.rules)


def logical_shardings(abstract_boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves are nn.LogicallyPartitioned (or plain).

  Plain leaves (step counters, RNG keys, optimizer counts) are replicated. A
  dimension that its mesh axes do not divide (LongNet's width 64 over fsdp
  256, the ITM head's 1,600 inputs) is split over those of its axes that do,
  in order, and replicated over the rest (`fit_spec`).
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return jax.tree.map(lambda sh, x: NamedSharding(mesh, fit_spec(sh.spec, x.shape, mesh)),
                      shardings, nn.unbox(abstract_boxed_tree))


def fit_spec(spec, shape, mesh):
  """`spec` (a PartitionSpec for `shape`) without the mesh axes that would split a
  dimension unevenly: each dimension keeps its axes, in order, while their
  product divides its size."""
  fitted = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept, split = [], 1
    for name in names:
      if size % (split * mesh.shape[name]) == 0:
        kept.append(name)
        split *= mesh.shape[name]
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


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
