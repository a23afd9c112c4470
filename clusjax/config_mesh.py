"""The mesh a config asks for (config.mesh, config.sharding.rules), checked
before jax starts and again against the devices present.

Imports no jax: `clusjax.config.validate` runs before jax is imported.
"""
import math

from clusjax.config_rules import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def dcn_mesh_shape(mesh_config, shape):
  """{axis: slices} of config.mesh.dcn (all 1 when absent), each dividing the
  axis size in `shape` (`resolve_mesh_shape`'s)."""
  dcn = mesh_config.get("dcn") or {}
  unknown = set(dcn.keys()) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.mesh.dcn.{sorted(unknown)[0]} is not a mesh axis; axes are "
                      f"{MESH_AXES}.")
  out = {}
  for axis in MESH_AXES:
    value = dcn.get(axis, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.mesh.dcn.{axis}={value!r} must be a positive integer.")
    if shape[axis] % value:
      raise ConfigError(f"config.mesh.dcn.{axis}={value} does not divide the {axis} axis "
                        f"({shape[axis]} devices): each slice holds an equal part of it.")
    out[axis] = value
  return out


def resolve_mesh_shape(mesh_config, num_devices):
  """Returns {axis: size} with the one -1 axis filled in from num_devices."""
  shape = {}
  for axis in MESH_AXES:
    value = mesh_config.get(axis, 1)
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise ConfigError(f"config.mesh.{axis}={value!r} must be a positive integer or -1.")
    shape[axis] = value
  unknown = set(mesh_config.keys()) - set(MESH_AXES) - {"dcn"}
  if unknown:
    raise ConfigError(f"config.mesh.{sorted(unknown)[0]} is not a mesh axis; axes are {MESH_AXES}.")
  free = [a for a in MESH_AXES if shape[a] == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {free}.")
  fixed = math.prod(v for v in shape.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config.mesh: {num_devices} devices cannot be split with fixed axes of size {fixed}.")
    shape[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"config.mesh={dict(shape)} has {fixed} devices but {num_devices} are present; "
        f"set one axis to -1 or match the device count.")
  return shape


def check_sharding_rules(config):
  """(logical name, mesh axes) pairs over known mesh axes."""
  for rule in config.sharding.rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"config.sharding.rules has {rule!r}; each rule is (logical_name, "
                        "mesh_axes).")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for axis in axes:
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(
            f"config.sharding.rules maps {rule[0]!r} to {axis!r}, not a mesh axis {MESH_AXES}.")
  free = [axis for axis in MESH_AXES if config.mesh[axis] == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {free}.")


def check_devices(config, num_devices):
  """The mesh over `num_devices`, and the shapes and batch split over its axes."""
  shape = resolve_mesh_shape(config.mesh, num_devices)
  dcn_mesh_shape(config.mesh, shape)
  for tower in ("vision", "text"):
    t = config.model[tower]
    for key, value, axis in (("width", t.width, "fsdp"), ("num_heads", t.num_heads, "tensor"),
                             ("mlp_dim", t.mlp_dim, "tensor")):
      if value % shape[axis]:
        raise ConfigError(
            f"config.model.{tower}.{key}={value} is not divisible by the {axis} mesh "
            f"axis ({shape[axis]}); parameters are split over it.")
  batch, accum = config.train.batch_size, config.get("grad_accum_steps") or 1
  batch_shards = shape["data"] * shape["fsdp"]
  if batch % batch_shards:
    raise ConfigError(
        f"config.train.batch_size={batch} is not divisible by the batch axes "
        f"data x fsdp ({batch_shards}).")
  if batch % (batch_shards * accum):
    raise ConfigError(
        f"config.train.batch_size={batch} is not divisible by config.grad_accum_steps={accum} "
        f"x the batch axes data x fsdp ({batch_shards}): every microbatch is split over them.")
