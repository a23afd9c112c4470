"""Open number of clusters: re-cluster the feature queue into new prototypes.

DESIGN §3. Every `cluster_every` steps the train loop runs DBSCAN over the
queue of recent projected features together with the active prototypes;
the normalised centroids of the clusters found become the new prototypes
and `k` follows the number of clusters. Pure and jit-able with static shapes
(no python branching on traced values), so it runs inside the jitted update
under the mesh; replicated inputs need no special sharding.

K_max only changes between steps, on the host: `next_k_max` doubles it until
the reported number of clusters fits and `grow_prototypes` pads the state
(one recompile per doubling, never per step).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from clusjax.clustering.dbscan import dbscan, elbow, kdistance_curve


def _clustering_space(points, valid, dim):
  """[N, d_p] -> [N, dim] coordinates that DBSCAN clusters in (static dim).

  dim == d_p (or 0): the points themselves. dim < d_p: their projection on
  the top-`dim` principal directions of the valid points (centred). This
  stands in for the paper's learned 2-D projection: recomputed at every
  clustering step from the points themselves, it needs no extra loss and
  keeps the directions along which the features spread most.
  """
  d_p = points.shape[1]
  if dim in (0, d_p):
    return points
  w = valid.astype(jnp.float32)[:, None]
  mean = jnp.sum(points * w, 0) / jnp.maximum(jnp.sum(w), 1.0)
  xc = (points - mean) * w                        # invalid rows -> 0
  hi = lax.Precision.HIGHEST                      # no bf16 passes on TPU
  cov = jnp.dot(xc.T, xc, precision=hi) / jnp.maximum(jnp.sum(w), 1.0)
  _, vecs = jnp.linalg.eigh(cov)                  # eigenvalues ascending
  return jnp.dot(xc, vecs[:, ::-1][:, :dim], precision=hi)


def _density_labels(points, valid, dim, min_samples, eps):
  """DBSCAN of the valid points in the clustering space (`_clustering_space`).

  Returns (labels [N] int32, -1 for noise, the clustering-space points, the
  k-distance curve, eps used, min_samples used); eps None = the curve's elbow.
  """
  x = _clustering_space(points, valid, dim)
  min_samples = 2 * x.shape[1] if min_samples is None else min_samples
  kdist = kdistance_curve(x, min_samples, valid=valid)
  if eps is None:
    # With fewer than min_samples valid points the curve is all +inf; no
    # point can be core at any eps, so 0 gives the same (all-noise) answer.
    eps = elbow(kdist)
    eps = jnp.where(jnp.isfinite(eps), eps, 0.0)
  eps = jnp.asarray(eps, jnp.float32)
  return dbscan(x, eps, min_samples, valid=valid), x, kdist, eps, min_samples


@functools.partial(jax.jit, static_argnames=("dim", "min_samples"))
def cluster_points(points, valid=None, *, dim, min_samples=None, eps=None):
  """The project's clustering (DBSCAN in the clustering space) of any points.

  Args:
    points: [N, D] float, e.g. L2-normalised embeddings of a data set.
    valid: optional [N] bool, the points to cluster (the principal plane and
      the elbow eps are theirs); the others get -1.
    dim, min_samples, eps: as in `cluster_prototypes`.
  Returns:
    (labels [N] int32: cluster ids 0..k-1, -1 for noise; eps used).
  """
  if not 0 <= dim <= points.shape[1]:
    raise ValueError(f"dim={dim} must be in [0, {points.shape[1]}] (0 or D: no projection)")
  valid = jnp.ones(points.shape[0], bool) if valid is None else valid.astype(bool)
  labels, _, _, eps, _ = _density_labels(points.astype(jnp.float32), valid, dim, min_samples, eps)
  return labels, eps


@functools.partial(jax.jit, static_argnames=("dim", "min_samples"))
def cluster_prototypes(queue, queue_valid, prototypes, active, *, dim, min_samples=None,
                       eps=None):
  """DBSCAN over queue + active prototypes -> new prototypes and active mask.

  Args:
    queue: [Q, d_p] float, L2-normalised projected features.
    queue_valid: [Q] bool, False for rows not yet filled.
    prototypes: Z [d_p, K_max] float, unit columns.
    active: [K_max] bool.
    dim: static clustering dimension: d_p (or 0) clusters the features as
      they are, any smaller dim (2 in the paper) their top-`dim` principal
      components (see `_clustering_space`).
    min_samples: static DBSCAN minPts; default 2 x dim (DESIGN §3).
    eps: DBSCAN radius in the clustering space (float or scalar array);
      default the elbow of the sorted k-distance curve, k = min_samples.
  Returns:
    (new_prototypes [d_p, K_max] float32, new_active [K_max] bool, stats).
    Cluster c < K_max becomes column c: the L2-normalised centroid, in d_p
    space, of its points; the other columns keep their old values and
    new_active = arange(K_max) < min(k, K_max). When no cluster is found
    (all noise) prototypes and active come back unchanged. stats: jnp
    values num_clusters (int32 k, may exceed K_max: the caller grows K_max),
    eps, noise_fraction (of the valid points), min_samples; for plots
    kdist [Q + K_max] (`kdistance_curve`: ascending, +inf for invalid
    points), cluster_sizes [K_max] int32 and cluster_radius [K_max] float32
    (mean distance of a cluster's points to their mean, in the clustering
    space; 0 for columns without a cluster).
  """
  d_p, k_max = prototypes.shape
  if queue.ndim != 2 or queue.shape[1] != d_p:
    raise ValueError(f"queue has shape {queue.shape}, expected [Q, {d_p}] (d_p of prototypes "
                     f"{prototypes.shape})")
  if not 0 <= dim <= d_p:
    raise ValueError(f"dim={dim} must be in [0, d_p={d_p}] (0 or d_p: no projection)")
  points = jnp.concatenate([queue, prototypes.T]).astype(jnp.float32)    # [N, d_p]
  valid = jnp.concatenate([queue_valid, active]).astype(bool)             # [N]
  labels, x, kdist, eps, min_samples = _density_labels(points, valid, dim, min_samples, eps)

  k = jnp.max(labels, initial=-1) + 1
  member = labels >= 0
  seg = jnp.where(member, labels, k_max)       # noise and clusters >= K_max: dropped
  sizes = jax.ops.segment_sum(member.astype(jnp.int32), seg, k_max)
  sums = jax.ops.segment_sum(jnp.where(member[:, None], points, 0.0), seg, k_max)
  norm = jnp.linalg.norm(sums, axis=1, keepdims=True)
  centroids = sums / jnp.maximum(norm, 1e-12)                           # [K_max, d_p]
  # Radii in the clustering space, where eps (and so density) is measured.
  count = jnp.maximum(sizes, 1)[:, None].astype(jnp.float32)
  mean_x = jax.ops.segment_sum(jnp.where(member[:, None], x, 0.0), seg, k_max) / count
  spread = jnp.linalg.norm(x - mean_x[jnp.minimum(seg, k_max - 1)], axis=1)
  radius = jax.ops.segment_sum(jnp.where(member, spread, 0.0), seg, k_max) / count[:, 0]

  cols = jnp.arange(k_max)
  new_prototypes = jnp.where(cols[None, :] < k, centroids.T, prototypes.astype(jnp.float32))
  new_active = jnp.where(k > 0, cols < jnp.minimum(k, k_max), active.astype(bool))
  num_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  stats = {
      "num_clusters": k.astype(jnp.int32),
      "eps": eps,
      "noise_fraction": jnp.sum(valid & ~member) / num_valid,
      "min_samples": jnp.int32(min_samples),
      "kdist": kdist,
      "cluster_sizes": sizes,
      "cluster_radius": radius,
  }
  return new_prototypes, new_active, stats


def grow_prototypes(prototypes, active, new_k_max):
  """Pads Z [d_p, K_max] -> [d_p, new_k_max] and active with False.

  The new columns are copies of the existing ones, cyclically (column j
  repeats column j mod K_max): unit-norm, deterministic and random-free, and
  inactive until the next clustering step overwrites them with centroids.
  """
  d_p, k_max = prototypes.shape
  if new_k_max < k_max:
    raise ValueError(f"new_k_max={new_k_max} is below the current K_max={k_max}; "
                     "prototypes only grow")
  reps = -(-new_k_max // k_max)
  grown = jnp.tile(prototypes, (1, reps))[:, :new_k_max]
  return grown, jnp.pad(jnp.asarray(active, bool), (0, new_k_max - k_max))


def next_k_max(k, k_max):
  """Host-side: k_max doubled until it holds k clusters (k_max if it does)."""
  k, k_max = int(k), int(k_max)
  if k_max < 1:
    raise ValueError(f"k_max={k_max} must be >= 1")
  while k_max < k:
    k_max *= 2
  return k_max
