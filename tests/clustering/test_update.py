"""clusjax.clustering.update and .plots on synthetic unit-norm features.

The features lie around a few directions u_c = 0.8 c + 0.6 e3 (c on the
unit circle of the e1-e2 plane): in-plane on a jittered square grid (step
0.02) around 0.8 c, off-plane Gaussian (0.03 in e4..e16), and e3 makes them
unit-norm. (A grid, not random offsets: with the elbow's eps, stragglers of
a random sample would turn noise, and the noise fraction would be fuzzy.) So the groups are separated both in d_p = 16 and in
the top-2 principal plane (e1, e2); the noise points, random unit vectors,
are isolated in both. Compiling dominates (two static shapes, ~15 s cold).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clusjax.clustering import (cluster_prototypes, grow_prototypes, next_k_max,
                                write_cluster_plots)

D, Q, K_MAX = 16, 512, 8        # d_p, queue length (divisible by 8 devices), K_max
BUDGET, NOISE = 420, 20         # valid queue rows: <= BUDGET grouped + noise; the rest invalid
OLD_ACTIVE = 3                  # old active prototypes, each near one true direction


def unit(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def features(num_dirs, seed=0):
  """-> queue [Q, D], valid [Q], prototypes [D, K_MAX], active [K_MAX],
  true directions [num_dirs, D], group of each of the Q + K_MAX points (-1 noise)."""
  rs = np.random.RandomState(seed)
  ang = 2 * np.pi * np.arange(num_dirs) / num_dirs
  circle = np.stack([np.cos(ang), np.sin(ang)], 1)
  dirs = np.zeros((num_dirs, D))
  dirs[:, :2], dirs[:, 2] = 0.8 * circle, 0.6
  side = int(np.sqrt(BUDGET / num_dirs))
  grid = 0.02 * np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
  grid = np.tile(grid - grid.mean(0), (num_dirs, 1))
  clustered = len(grid)
  group = np.repeat(np.arange(num_dirs), side * side)
  feats = np.zeros((clustered, D))
  feats[:, :2] = 0.8 * circle[group] + grid + 0.002 * rs.randn(clustered, 2)
  feats[:, 3:] = 0.03 * rs.randn(clustered, D - 3)
  feats[:, 2] = np.sqrt(1 - np.sum(feats**2, 1))
  garbage = 5 * rs.randn(Q - clustered - NOISE, D)      # invalid rows: must be ignored
  queue = np.concatenate([feats, unit(rs.randn(NOISE, D)), garbage])
  perm = rs.permutation(Q)
  queue, valid = queue[perm], perm < clustered + NOISE
  labels = np.where(perm < clustered, group[np.minimum(perm, clustered - 1)], -1)
  old = unit(np.concatenate([dirs[:OLD_ACTIVE] + 0.01 * rs.randn(OLD_ACTIVE, D),
                             rs.randn(K_MAX - OLD_ACTIVE, D)])).T
  active = np.arange(K_MAX) < OLD_ACTIVE
  labels = np.concatenate([labels, np.where(active, np.arange(K_MAX), -1)])
  f32 = lambda a: a.astype(np.float32)
  return f32(queue), valid, f32(old), active, dirs, labels


@functools.lru_cache(maxsize=None)
def run(num_dirs, dim):
  queue, valid, old, active, _, _ = features(num_dirs)
  z, a, stats = cluster_prototypes(queue, valid, old, active, dim=dim)
  return np.asarray(z), np.asarray(a), jax.tree.map(np.asarray, stats)


@pytest.mark.parametrize("dim", [16, 2])
def test_finds_the_directions(dim):
  queue, valid, old, _, dirs, labels = features(5)
  z, active, stats = run(5, dim)
  assert z.shape == (D, K_MAX) and z.dtype == np.float32 and active.dtype == bool
  assert int(stats["num_clusters"]) == 5
  np.testing.assert_array_equal(active, np.arange(K_MAX) < 5)
  np.testing.assert_allclose(np.linalg.norm(z, axis=0), 1.0, atol=1e-5)
  cos = dirs @ z[:, :5]                                   # [true, found]
  match = np.argmax(cos, 0)
  assert sorted(match) == list(range(5)) and np.all(cos.max(0) > 0.95)
  # Independent reference: numpy's normalised centroid of each true group
  # (queue rows and old active prototypes alike), in d_p space.
  points = np.concatenate([queue, old.T]).astype(np.float64)
  for col, g in enumerate(match):
    ref = unit(points[labels == g].sum(0))
    np.testing.assert_allclose(z[:, col], ref, atol=1e-5)
    assert stats["cluster_sizes"][col] == np.sum(labels == g)
  np.testing.assert_array_equal(z[:, 5:], old[:, 5:])    # unused columns kept
  num_valid = valid.sum() + OLD_ACTIVE
  np.testing.assert_allclose(stats["noise_fraction"], NOISE / num_valid, rtol=1e-6)
  assert int(stats["min_samples"]) == 2 * dim and stats["eps"] > 0
  kdist = stats["kdist"]
  assert kdist.shape == (Q + K_MAX,) and np.isfinite(kdist).sum() == num_valid
  assert np.all(np.diff(kdist[:num_valid]) >= 0)
  assert np.all(stats["cluster_radius"][:5] > 0) and np.all(stats["cluster_radius"][5:] == 0)
  assert np.all(stats["cluster_sizes"][5:] == 0)


def test_more_clusters_than_k_max_are_counted():
  _, _, old, _, dirs, _ = features(10)
  z, active, stats = run(10, 2)
  assert int(stats["num_clusters"]) == 10 and z.shape == (D, K_MAX)
  assert active.all()
  cos = dirs @ z
  assert len(set(np.argmax(cos, 0))) == K_MAX and np.all(cos.max(0) > 0.95)
  assert next_k_max(stats["num_clusters"], K_MAX) == 16


def test_all_noise_keeps_the_old_prototypes():
  # 2 valid rows + 1 active prototype < min_samples = 4: nothing can be core.
  queue, valid, old, active, _, _ = features(5)
  valid = valid & (np.cumsum(valid) <= 2)
  active = np.arange(K_MAX) == 4
  z, a, stats = cluster_prototypes(queue, valid, old, active, dim=2)
  np.testing.assert_array_equal(z, old)
  np.testing.assert_array_equal(a, active)
  assert int(stats["num_clusters"]) == 0 and float(stats["noise_fraction"]) == 1.0
  assert float(stats["eps"]) == 0.0 and not np.any(stats["cluster_sizes"])


def test_jits_under_a_mesh_with_a_traced_eps():
  queue, valid, old, active, _, _ = features(5)
  z_ref, a_ref, stats_ref = run(5, 2)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  queue = jax.device_put(queue, NamedSharding(mesh, P("data", None)))
  step = jax.jit(lambda q, v, z, a, eps: cluster_prototypes(q, v, z, a, dim=2, eps=eps))
  z, a, stats = step(queue, valid, old, active, stats_ref["eps"])
  np.testing.assert_allclose(z, z_ref, atol=1e-6)
  np.testing.assert_array_equal(a, a_ref)
  np.testing.assert_array_equal(stats["cluster_sizes"], stats_ref["cluster_sizes"])
  # Same compiled step, an eps below every distance: all noise, old state back.
  z, a, stats = step(queue, valid, old, active, jnp.float32(1e-6))
  np.testing.assert_array_equal(z, old)
  np.testing.assert_array_equal(a, active)
  assert int(stats["num_clusters"]) == 0 and float(stats["noise_fraction"]) == 1.0


def test_grow_prototypes_and_next_k_max():
  _, _, old, active, _, _ = features(5)
  z, a = grow_prototypes(old, active, 20)
  assert z.shape == (D, 20) and a.shape == (20,)
  np.testing.assert_array_equal(z[:, :K_MAX], old)
  np.testing.assert_array_equal(z[:, K_MAX:], old[:, np.arange(K_MAX, 20) % K_MAX])
  np.testing.assert_array_equal(a, np.arange(20) < OLD_ACTIVE)
  assert [next_k_max(k, 8) for k in (0, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
  with pytest.raises(ValueError, match="new_k_max=4"):
    grow_prototypes(old, active, 4)


def test_bad_dim_names_the_value():
  queue, valid, old, active, _, _ = features(5)
  with pytest.raises(ValueError, match="dim=17"):
    cluster_prototypes(queue, valid, old, active, dim=17)


def test_plots_are_written(tmp_path):
  _, _, stats = run(5, 2)
  paths = write_cluster_plots(str(tmp_path), 1200, stats)
  assert paths == [str(tmp_path / "clusters" / "kdistance_1200.png"),
                   str(tmp_path / "clusters" / "sizes_1200.png")]
  for p in paths:
    with open(p, "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
