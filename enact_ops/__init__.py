"""ENACT clustering operators (compiled CPU/CUDA kernels with a pure-PyTorch fallback)."""
from .ops import (
    BACKENDS,
    Segmentation,
    check_cluster_inputs,
    compiled_available,
    segment_runs,
    segment_softmax_pool,
    segment_uniform,
    uniform_chunk_length,
    use_compiled,
)

__all__ = [
    "BACKENDS",
    "Segmentation",
    "check_cluster_inputs",
    "compiled_available",
    "segment_runs",
    "segment_uniform",
    "segment_softmax_pool",
    "uniform_chunk_length",
    "use_compiled",
]
