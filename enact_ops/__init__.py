"""ENACT clustering operators (compiled CPU/CUDA kernels with a pure-PyTorch fallback).

``python -m enact_ops`` prints what is built and loaded."""
from .torch_version import MIN_TORCH, check_torch

check_torch()  # before anything touches the newer torch APIs

from .ops import (  # noqa: E402
    BACKENDS,
    Information,
    Segmentation,
    SegmentationSizes,
    check_cluster_inputs,
    check_rows_have_tokens,
    chunk_length,
    compiled_available,
    count_runs,
    extension_status,
    read_row_sizes,
    runs_sizes,
    uniform_sizes,
    segment_runs,
    segment_softmax_pool,
    segment_uniform,
    smoothed_information,
    uniform_chunk_length,
    use_compiled,
)

__all__ = [
    "BACKENDS",
    "Information",
    "Segmentation",
    "SegmentationSizes",
    "check_cluster_inputs",
    "check_rows_have_tokens",
    "chunk_length",
    "compiled_available",
    "count_runs",
    "extension_status",
    "MIN_TORCH",
    "read_row_sizes",
    "runs_sizes",
    "uniform_sizes",
    "segment_runs",
    "segment_uniform",
    "segment_softmax_pool",
    "smoothed_information",
    "uniform_chunk_length",
    "use_compiled",
]
