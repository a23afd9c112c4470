"""Cluster codes and on-device density clustering."""
from clusjax.clustering.dbscan import dbscan
from clusjax.clustering.dbscan import kdistance_curve
from clusjax.clustering.dbscan import kdistance_eps
from clusjax.clustering.plots import write_cluster_plots
from clusjax.clustering.sinkhorn import sinkhorn
from clusjax.clustering.update import cluster_points
from clusjax.clustering.update import cluster_prototypes
from clusjax.clustering.update import grow_prototypes
from clusjax.clustering.update import next_k_max

__all__ = ["cluster_points", "cluster_prototypes", "dbscan", "grow_prototypes", "kdistance_curve",
           "kdistance_eps", "next_k_max", "sinkhorn", "write_cluster_plots"]
