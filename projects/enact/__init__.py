"""ENACT: ENtropy-based Attention Clustering for detection Transformers.

``EnactAttention`` is a drop-in for detrex's encoder ``MultiheadAttention``, and so is
``ActAttention`` (the ACT comparator); ``EnactClustering`` is the clustering step alone.  All
need torch and enact_ops only.
"""
from .modeling.act import ActAttention
from .modeling.attention import MultiheadAttention
from .modeling.enact import EnactAttention, EnactClustering

__all__ = ["ActAttention", "EnactAttention", "EnactClustering", "MultiheadAttention"]
