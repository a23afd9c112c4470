"""Cluster codes and on-device density clustering."""
from clusjax.clustering.sinkhorn import sinkhorn

__all__ = ["sinkhorn"]
