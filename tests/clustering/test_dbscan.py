"""clusjax.clustering.dbscan against scikit-learn's DBSCAN and NearestNeighbors.

Compiling is the cost here (~3 s per shape on 2 cores), so cases share a few
static shapes: (600, 2) with block 128 (several blocks), (8000, 2),
(1500, 16), (4096, 2).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sklearn import cluster, datasets, neighbors
from sklearn.metrics import adjusted_rand_score

from clusjax.clustering import dbscan, kdistance_curve, kdistance_eps
from clusjax.clustering.dbscan import elbow

SMALL = 600          # points in the small 2-D sets (divisible by 8 devices)
BLOCK = 128          # so the small sets span several blocks
STATIC = ("min_samples", "block_size", "return_core", "return_rounds")


@functools.lru_cache(maxsize=None)
def small_set(name):
  """(points [600, 2] float32, eps): eps gives clusters, borders and noise."""
  if name == "blobs":
    x, eps = datasets.make_blobs(SMALL, centers=4, cluster_std=0.7, random_state=0)[0], 0.3
  elif name == "moons":
    x, eps = datasets.make_moons(SMALL, noise=0.06, random_state=0)[0], 0.1
  else:
    x, eps = np.random.RandomState(0).uniform(-1, 1, size=(SMALL, 2)), 0.09
  return x.astype(np.float32), eps


@functools.lru_cache(maxsize=None)
def blobs_and_noise(n, d, seed=0):
  """Separated blobs + 5% uniform noise: float32 points, true labels (-1 noise)."""
  rs = np.random.RandomState(seed)
  n_noise = n // 20
  # 5 centres, pairwise >= 11 apart in 2-D (random ones in higher D are far).
  centres = [(-8, -8), (8, -8), (0, 0), (-8, 8), (8, 8)] if d == 2 else 5
  x, y = datasets.make_blobs(n - n_noise, n_features=d, centers=centres, cluster_std=0.8,
                             center_box=(-12, 12), random_state=seed)
  x = np.concatenate([x, rs.uniform(x.min(0) - 3, x.max(0) + 3, size=(n_noise, d))])
  y = np.concatenate([y, -np.ones(n_noise, int)])
  perm = rs.permutation(n)
  return x[perm].astype(np.float32), y[perm]


def check_against_sklearn(x, eps, min_samples, labels, core):
  """sklearn on the very same (float32) points, computed in float64."""
  ref = cluster.DBSCAN(eps=eps, min_samples=min_samples).fit(np.asarray(x, np.float64))
  labels, core = np.asarray(labels), np.asarray(core)
  np.testing.assert_array_equal(np.flatnonzero(core), ref.core_sample_indices_)
  np.testing.assert_array_equal(labels == -1, ref.labels_ == -1)
  assert adjusted_rand_score(ref.labels_, labels) >= 0.99
  k = labels.max() + 1
  np.testing.assert_array_equal(np.unique(labels[labels >= 0]), np.arange(k))
  # Stronger: same border rule and same numbering, so identical labels.
  np.testing.assert_array_equal(labels, ref.labels_)
  return ref


@pytest.mark.parametrize("name", ["blobs", "moons", "noise"])
def test_small_sets_match_sklearn(name):
  x, eps = small_set(name)
  labels, core = dbscan(x, eps, 5, block_size=BLOCK, return_core=True)
  assert labels.dtype == jnp.int32 and labels.shape == (SMALL,)
  ref = check_against_sklearn(x, eps, 5, labels, core)
  # Non-trivial: several clusters, noise, and border points (labelled non-cores).
  assert ref.labels_.max() >= 1 and (ref.labels_ == -1).any()
  assert ((ref.labels_ >= 0) & ~np.asarray(core)).any()


def test_large_2d_with_kdistance_eps_matches_sklearn():
  # eps = the elbow is itself a float32 distance of the data: pairs at exactly
  # eps must be decided the way float64 decides them.
  x, _ = blobs_and_noise(8000, 2)
  eps = float(kdistance_eps(x, 5))
  labels, core = dbscan(x, eps, 5, return_core=True)
  check_against_sklearn(x, eps, 5, labels, core)


def test_d16_matches_sklearn():
  # D > 8 takes the matmul expansion + re-measured band; sklearn goes brute force.
  x, _ = blobs_and_noise(1500, 16, seed=1)
  eps = float(kdistance_eps(x, 32, block_size=BLOCK))
  labels, core = dbscan(x, eps, 32, block_size=BLOCK, return_core=True)
  ref = check_against_sklearn(x, eps, 32, labels, core)
  assert ref.labels_.max() >= 1


def near_eps_pairs(d, n_pairs, seed=0):
  """[2 n_pairs, d] float32: isolated pairs whose float64 distance is within
  3e-7 of 1 (but not 1), on both sides."""
  rs = np.random.RandomState(seed)
  side = math.ceil(math.sqrt(n_pairs))
  pts = []
  while len(pts) < 2 * n_pairs:
    i = len(pts) // 2
    base = np.zeros(d)
    base[:2] = 10.0 * np.array([i % side, i // side])    # pairs 10 apart
    base[2:] = rs.uniform(-5, 5, d - 2)
    a = (base + rs.uniform(-1, 1, d)).astype(np.float32)
    u = rs.normal(size=d)
    b = (a + u / np.linalg.norm(u) * (1 + rs.uniform(-3e-7, 3e-7))).astype(np.float32)
    dist = np.linalg.norm(b.astype(np.float64) - a)
    if abs(dist - 1) < 3e-7 and dist != 1:
      pts += [a, b]
  return np.array(pts)


@pytest.mark.parametrize("d", [2, 16])
def test_pairs_at_eps_are_decided_as_in_float64(d):
  # With min_samples = 2 a pair is two cores iff its distance is <= eps = 1.
  x = near_eps_pairs(d, 150)
  a, b = x[0::2], x[1::2]
  inside = np.linalg.norm(b.astype(np.float64) - a, axis=1) <= 1
  naive = np.sum(np.square(b - a), 1, dtype=np.float32) <= 1
  assert 0 < inside.sum() < len(a) and (naive != inside).any()   # a real test
  labels, core = dbscan(x, 1.0, 2, block_size=BLOCK, return_core=True)
  np.testing.assert_array_equal(np.asarray(core)[0::2], inside)
  check_against_sklearn(x, 1.0, 2, labels, core)


def test_padding_is_ignored():
  x, eps = small_set("moons")
  rs = np.random.RandomState(1)
  # Padding rows interleaved with the real ones (whose order is kept, so the
  # cluster numbering is too), each on top of a real point: if they counted,
  # they would make extra cores and merge clusters.
  real = np.sort(rs.choice(1024, SMALL, replace=False))
  valid = np.zeros(1024, bool)
  valid[real] = True
  xp = x[rs.randint(0, SMALL, 1024)]
  xp[real] = x
  padded = np.asarray(dbscan(xp, eps, 5, valid=valid, block_size=BLOCK))
  plain = np.asarray(dbscan(x, eps, 5, block_size=BLOCK))
  assert (padded[~valid] == -1).all()
  np.testing.assert_array_equal(padded[real], plain)


def test_compiled_memory_is_blockwise():
  n = 65536
  compiled = jax.jit(dbscan, static_argnames=STATIC).lower(
      jax.ShapeDtypeStruct((n, 2), jnp.float32), 0.1, 8).compile()
  mem = compiled.memory_analysis()
  assert mem.temp_size_in_bytes < 256 * 2**20     # an N x N float32 would be 16 GiB
  assert mem.output_size_in_bytes <= 4 * n


def spiral(n, step=0.9, turn_gap=3.0):
  """[n, 2] points along an Archimedean spiral, `step` apart, turns `turn_gap` apart."""
  a, theta, pts = turn_gap / (2 * np.pi), 2 * np.pi, []
  for _ in range(n):
    r = a * theta
    pts.append((r * np.cos(theta), r * np.sin(theta)))
    theta += step / math.hypot(r, a)
  return np.asarray(pts, np.float32)


def test_long_chain_needs_few_rounds():
  # A spiral (not a line: its kd order is not monotone along the chain) with
  # neighbours 0.9 apart and eps 1: one cluster of diameter n - 1 hops. Label
  # propagation would need ~n rounds; hooking + pointer jumping O(log n).
  n = 4096
  x = spiral(n)[np.random.RandomState(0).permutation(n)]
  labels, core, rounds = dbscan(x, 1.0, 3, return_core=True, return_rounds=True)
  np.testing.assert_array_equal(np.asarray(labels), np.zeros(n, np.int32))
  assert np.asarray(core).sum() == n - 2            # the two ends are border points
  assert 2 <= int(rounds) <= 2 * math.log2(n) + 2


def test_kdistance_curve_matches_sklearn():
  for x, k, block in [(blobs_and_noise(8000, 2)[0], 5, 256),
                      (blobs_and_noise(1500, 16, seed=1)[0], 32, BLOCK)]:
    dist = neighbors.NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)[0]
    curve = np.asarray(kdistance_curve(x, k, block_size=block))
    np.testing.assert_allclose(curve, np.sort(dist[:, -1]), rtol=0, atol=1e-5)


def test_elbow_of_synthetic_curves():
  flat, steep = np.linspace(0.0, 0.1, 800), np.linspace(0.1, 10.0, 201)[1:]
  curve = np.concatenate([flat, steep]).astype(np.float32)
  assert float(elbow(curve)) == pytest.approx(0.1, abs=1e-6)
  padded = np.concatenate([curve, np.full(24, np.inf, np.float32)])
  assert float(elbow(padded)) == float(elbow(curve))      # +inf padding ignored
  concave = np.sqrt(np.linspace(0, 1, 101)).astype(np.float32)   # elbow at x = 1/4
  assert float(elbow(concave)) == pytest.approx(0.5, abs=0.01)


def test_kdistance_eps_of_points_with_known_elbow():
  # 900 points on a lattice (k-distance 1 for k = 2, self included) and 100
  # outliers on a far line with growing gaps 2, 4, 6, ... (k-distances
  # 2, 2, 4, ..., 198): the curve is 900 ones and then a ramp, elbow = 1.
  lattice = np.stack([np.arange(900.0), np.zeros(900)], 1)
  gaps = 2.0 * np.arange(1, 100)
  outliers = np.stack([np.full(100, -1000.0), np.concatenate([[0.0], np.cumsum(gaps)])], 1)
  x = np.concatenate([lattice, outliers, np.zeros((24, 2))]).astype(np.float32)
  valid = np.arange(len(x)) < 1000                       # 24 padding rows
  curve = np.asarray(kdistance_curve(x, 2, valid=valid))
  np.testing.assert_array_equal(curve[:900], 1.0)
  assert np.isinf(curve[1000:]).all()
  assert float(kdistance_eps(x, 2, valid=valid)) == 1.0


def test_kdistance_eps_finds_the_blobs():
  x, y = blobs_and_noise(8000, 2)
  eps = float(kdistance_eps(x, 5))
  labels = np.asarray(dbscan(x, eps, 5))
  blob = y >= 0
  # Every blob is (almost all) one cluster, a different one per blob.
  majority = [np.bincount(labels[y == b][labels[y == b] >= 0]).argmax() for b in range(5)]
  assert len(set(majority)) == 5
  for b, m in enumerate(majority):
    assert (labels[y == b] == m).mean() >= 0.95
  assert adjusted_rand_score(y[blob], labels[blob]) >= 0.95
  assert (labels[~blob] == -1).mean() >= 0.7           # most uniform noise is noise


def test_jit_with_traced_eps_compiles_once():
  x, _ = small_set("blobs")
  traces = []

  @jax.jit
  def run(points, eps):
    traces.append(None)
    return dbscan(points, eps, 5, block_size=BLOCK, return_core=True)

  for eps in (0.3, 0.5):
    labels, core = run(x, jnp.float32(eps))
    check_against_sklearn(x, float(np.float32(eps)), 5, labels, core)
  assert len(traces) == 1


def test_sharded_input():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x, eps = small_set("moons")
  sharded = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  labels = dbscan(sharded, eps, 5, block_size=BLOCK)
  np.testing.assert_array_equal(np.asarray(labels), np.asarray(dbscan(x, eps, 5, block_size=BLOCK)))


def test_bad_arguments_name_the_value():
  x, _ = small_set("blobs")
  with pytest.raises(ValueError, match="min_samples=0"):
    dbscan(x, 0.3, 0)
  with pytest.raises(ValueError, match="eps=-1.0"):
    dbscan(x, -1.0, 5)
