"""ENACT: ENtropy-based Attention Clustering for detection Transformers.

``EnactAttention`` is a drop-in for detrex's encoder ``MultiheadAttention``, and so is
``ActAttention`` (the ACT comparator); ``enact_encoder`` / ``act_encoder`` put them into a
built detector's encoder; ``EnactClustering`` is the clustering step alone.  All
need torch and enact_ops only.
"""
from .modeling.act import ActAttention
from .modeling.attention import MultiheadAttention
from .modeling.enact import EnactAttention, EnactClustering
from .modeling.act_adapter import act_encoder
from .modeling.enact_adapter import enact_encoder
from .modeling.encoder_sites import replace_encoder_attention

__all__ = ["ActAttention", "EnactAttention", "EnactClustering", "MultiheadAttention", "act_encoder", "enact_encoder",
           "replace_encoder_attention"]
