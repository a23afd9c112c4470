"""Figures of a clustering step (paper Figs. 11 and 12), from its stats.

Host-side only: called by the loop with the stats `cluster_prototypes`
returns. matplotlib is imported lazily and drawn through its Agg canvas
(`Figure.savefig`, no pyplot), so no global backend state is touched.
"""
import math
import os

import numpy as np

CLUSTERS_DIR = "clusters"


def write_cluster_plots(directory, step, stats):
  """Writes the k-distance curve and the cluster size / density heat maps.

  Args:
    directory: a workdir (or any folder); figures go to <directory>/clusters/.
    step: train step, used in the file names.
    stats: `cluster_prototypes`' stats (jnp or numpy values): kdist, eps,
      num_clusters, cluster_sizes, and optionally cluster_radius, min_samples.
  Returns:
    [kdistance_path, sizes_path]: <dir>/clusters/kdistance_<step>.png (Fig. 11)
    and <dir>/clusters/sizes_<step>.png (Fig. 12).
  """
  from matplotlib.figure import Figure  # lazy: training without plots never imports it

  out = os.path.join(directory, CLUSTERS_DIR)
  os.makedirs(out, exist_ok=True)
  step = int(step)
  paths = [os.path.join(out, f"kdistance_{step}.png"), os.path.join(out, f"sizes_{step}.png")]

  fig = Figure(figsize=(5, 3.5), layout="constrained")
  _kdistance(fig.add_subplot(), stats)
  fig.savefig(paths[0], dpi=100)

  has_radius = "cluster_radius" in stats
  fig = Figure(figsize=(9 if has_radius else 5, 4), layout="constrained")
  _heat_maps(fig, stats, has_radius)
  fig.savefig(paths[1], dpi=100)
  return paths


def _kdistance(ax, stats):
  """Fig. 11: the sorted k-distance curve, eps (its elbow unless set) marked."""
  kdist = np.asarray(stats["kdist"], np.float64)
  kdist = kdist[np.isfinite(kdist)]               # invalid points are +inf
  eps = float(np.asarray(stats["eps"]))
  ax.plot(np.arange(kdist.size), kdist, lw=1.2)
  ax.axhline(eps, color="tab:red", ls="--", lw=1, label=f"eps = {eps:.4g}")
  if kdist.size:
    at = int(np.searchsorted(kdist, eps, side="right")) - 1
    ax.plot([max(at, 0)], [eps], "o", color="tab:red")
  k = f"k = {int(np.asarray(stats['min_samples']))}" if "min_samples" in stats else "k"
  ax.set(xlabel="points, sorted by k-distance", ylabel=f"k-distance ({k})",
         title=f"{int(np.asarray(stats['num_clusters']))} clusters")
  ax.legend(loc="upper left")


def _heat_maps(fig, stats, has_radius):
  """Fig. 12: one cell per cluster (row-major), coloured by size (and density)."""
  sizes = np.asarray(stats["cluster_sizes"], np.float64)
  found = int(np.asarray(stats["num_clusters"]))
  k = min(found, sizes.size)          # clusters beyond K_max have no column
  shown = f"{found} clusters" + (f" ({k} shown: K_max)" if k < found else "")
  side = max(1, math.ceil(math.sqrt(max(k, 1))))
  panels = [("cluster size", sizes[:k])]
  if has_radius:
    radius = np.asarray(stats["cluster_radius"], np.float64)[:k]
    # size / mean radius: points per unit of spread in the clustering space.
    panels.append(("density (size / mean radius)", sizes[:k] / np.maximum(radius, 1e-12)))
  for i, (title, values) in enumerate(panels):
    grid = np.full(side * side, np.nan)
    grid[:k] = values
    ax = fig.add_subplot(1, len(panels), i + 1)
    im = ax.imshow(np.ma.masked_invalid(grid.reshape(side, side)), cmap="viridis")
    ax.set(title=f"{title}\n{shown}", xticks=[], yticks=[])
    fig.colorbar(im, ax=ax)
