"""ENACT: ENtropy-based Attention Clustering for detection Transformers.

``EnactAttention`` is a drop-in for detrex's encoder ``MultiheadAttention``; ``EnactClustering``
is the clustering step alone.  Both need torch and enact_ops only.
"""
from .modeling.attention import MultiheadAttention
from .modeling.enact import EnactAttention, EnactClustering

__all__ = ["EnactAttention", "EnactClustering", "MultiheadAttention"]
