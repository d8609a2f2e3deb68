"""ENACT clustering operators (compiled CPU/CUDA kernels with a pure-PyTorch fallback).

``python -m enact_ops`` prints what is built and loaded."""
import warnings

from .torch_version import MIN_TORCH, check_torch

check_torch()  # before anything touches the newer torch APIs

from .ops import (  # noqa: E402
    BACKENDS,
    Information,
    compiled_available,
    extension_status,
    segment_runs,
    segment_softmax_pool,
    segment_uniform,
    smoothed_information,
    uniform_chunk_length,
    use_compiled,
)
from .segmentation import Segmentation, SegmentationSizes, chunk_length, read_row_sizes, runs_sizes, uniform_sizes  # noqa: E402

__all__ = [
    # the operators
    "segment_runs", "segment_uniform", "segment_softmax_pool", "smoothed_information",
    # what they take and return
    "Segmentation", "SegmentationSizes", "Information",
    # a batch's sizes read in one copy, passed to the operators as sizes= (no further host sync)
    "read_row_sizes", "runs_sizes", "uniform_sizes", "chunk_length", "uniform_chunk_length",
    # backends
    "BACKENDS", "compiled_available", "use_compiled", "extension_status", "MIN_TORCH",
]

# former top-level names, now in their submodules: a DeprecationWarning, then the object
_MOVED = {
    "check_cluster_inputs": "enact_ops.ops",
    "check_rows_have_tokens": "enact_ops.segmentation",
    "count_runs": "enact_ops.segmentation",
}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        warnings.warn(f"enact_ops.{name} is deprecated; import it from {_MOVED[name]}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'enact_ops' has no attribute {name!r}")
