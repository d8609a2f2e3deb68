"""ENACT: ENtropy-based Attention Clustering for detection Transformers."""
from .modeling.attention import MultiheadAttention
