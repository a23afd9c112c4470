"""Cluster codes and on-device density clustering."""
from clusjax.clustering.dbscan import dbscan
from clusjax.clustering.dbscan import kdistance_curve
from clusjax.clustering.dbscan import kdistance_eps
from clusjax.clustering.sinkhorn import sinkhorn

__all__ = ["dbscan", "kdistance_curve", "kdistance_eps", "sinkhorn"]
