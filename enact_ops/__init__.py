"""ENACT clustering operators (compiled CPU/CUDA kernels with a pure-PyTorch fallback)."""
from .ops import (
    Segmentation,
    compiled_available,
    segment_runs,
    segment_softmax_pool,
    segment_uniform,
    uniform_chunk_length,
)

__all__ = [
    "Segmentation",
    "compiled_available",
    "segment_runs",
    "segment_uniform",
    "segment_softmax_pool",
    "uniform_chunk_length",
]
