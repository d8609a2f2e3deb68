"""Python API of the enact_ops operators: input checks, backend choice and autograd.

Three operators work on a batch of 1-D token sequences (B, N) with a key padding mask (B, N)
(True = pad).  Padded positions are absent, not boundaries: a row's sequence is its valid tokens
in order.

* ``segment_runs(sign, key_padding_mask)`` -> Segmentation: maximal runs of equal sign.
* ``segment_uniform(key_padding_mask, chunk)`` -> Segmentation: crop-and-chunk of length L.
* ``segment_softmax_pool(scores, features, seg)`` -> (pooled, weights, cluster_mask):
  ``w = softmax(scores)`` inside each segment and ``pooled[b, c] = sum_{i in c} w_i x[b, i]``.
* ``smoothed_information(logits, taps, key_padding_mask)`` -> Information: ENACT's steps 1-4
  (self-information, Gaussian smoothing, curvature sign) and each row's valid length and number
  of runs, in one kernel per direction.

Host syncs.  A segmentation's sizes (S segments, T tokens, the width M_max) are data: on a GPU
reading them is a device-to-host sync.  Each op reads what it needs in one copy when it is not
told; a caller that reads every row's sizes once (``read_row_sizes``, e.g. ENACT's one sync per
layer) passes ``sizes=`` (a ``SegmentationSizes``) to the segmentations and ``max_clusters=`` to
the pooling, and the ops read nothing (the CUDA kernels assert the sizes on the device, the CPU
ones check them on the host).

Each runs on the compiled extension (``enact_ops._C``) when it is built for the tensors' device
and on the pure-PyTorch reference otherwise; ``backend="compiled"`` or ``"reference"`` forces one.
Defined edge cases: a row with no valid token has 0 clusters (its pooled row is zeros and its
cluster mask all True); N = 0 is an error.
"""
import importlib.util
import os
import sys
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from . import _register, reference
from .segmentation import Segmentation, SegmentationSizes, check_rows_have_tokens, chunk_length

EXTENSION_ENV = "ENACT_OPS_EXTENSION"
REQUIRE_ENV = "ENACT_REQUIRE_COMPILED"


def _import_extension():
    """``enact_ops._C``: the built file named by $ENACT_OPS_EXTENSION (a build outside the
    package, e.g. tools/gpu_check.py's build for the present GPU), else the package's own.
    Returns (module or None, file or None, reason or None): no file is "not built" (module None,
    file None); a file that fails to load is "unloadable" (module None, the file, the error)."""
    path = os.environ.get(EXTENSION_ENV)
    if not path:
        spec = importlib.util.find_spec(f"{__package__}._C")
        if spec is None:
            return None, None, "not built"
        path = spec.origin
    elif not os.path.isfile(path):
        return None, path, f"${EXTENSION_ENV}={path} is not a file"
    try:
        spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # registers torch.ops.enact_ops.*
    except (ImportError, OSError) as e:  # a torch ABI change, a missing symbol, a broken file
        return None, path, f"{type(e).__name__}: {e}"
    sys.modules[spec.name] = module
    return module, path, None


def _require_compiled() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


_C, _EXTENSION_FILE, _LOAD_ERROR = _import_extension()
_IMPORT_ERROR: Optional[str] = _LOAD_ERROR
if _C is not None:
    _register.register()  # fake implementations and autograd formulas (torch.library)
elif _EXTENSION_FILE is not None:  # present but unloadable: say so now, once
    warnings.warn(
        f"enact_ops: the compiled extension {_EXTENSION_FILE} failed to load ({_LOAD_ERROR}); ENACT runs on the "
        "pure-PyTorch reference (about 5x slower).  Rebuild it for this torch with `pip install --no-build-isolation "
        "-e .` (or unset $ENACT_OPS_EXTENSION); `python -m enact_ops` shows what is built and loaded.",
        RuntimeWarning,
        stacklevel=2,
    )

_FALLBACK_WARNED = set()


def extension_status() -> dict:
    """What is built and loaded: torch version, extension file, whether it loaded (and why not),
    CPU / CUDA kernels, the CUDA archs and torch version it was built for, the GPU present."""
    cuda_kernels = bool(_C is not None and _C.with_cuda)
    return {
        "torch": torch.__version__,
        "extension_file": _EXTENSION_FILE,
        "loaded": _C is not None,
        "reason": _LOAD_ERROR,
        "cpu_kernels": _C is not None,
        "cuda_kernels": cuda_kernels,
        "cuda_archs": getattr(_C, "cuda_archs", None) if cuda_kernels else None,
        "built_for_torch": getattr(_C, "torch_version", None) if _C is not None else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "require_compiled": _require_compiled(),
    }


__all__ = [
    "BACKENDS", "Information", "check_cluster_inputs", "compiled_available", "extension_status", "segment_runs",
    "segment_softmax_pool", "segment_softmax_pool_backward_sum", "segment_uniform", "smoothed_information",
    "uniform_chunk_length", "use_compiled",
]

BACKENDS = ("auto", "compiled", "reference")


def compiled_available(device="cpu") -> bool:
    """True if the compiled kernels exist for ``device`` ("cpu" or a CUDA device)."""
    if _C is None:
        return False
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and bool(_C.with_cuda))


def _why_not(device) -> str:
    if _C is None:
        where = f" ({_EXTENSION_FILE})" if _EXTENSION_FILE else ""
        return f"the extension is {'not built' if _LOAD_ERROR == 'not built' else 'not loadable'}{where}: {_LOAD_ERROR}"
    return f"the extension was built without CUDA kernels, so it has none for {device}"


def use_compiled(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` ("auto" | "compiled" | "reference") runs the compiled kernels on
    ``device``.  "compiled" without a build for the device is an error; so is "auto" under
    $ENACT_REQUIRE_COMPILED=1; otherwise "auto" falls back to the reference and says so once
    per device type."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    available = compiled_available(device)
    if available:
        return True
    how = "build it with `pip install --no-build-isolation -e .` (FORCE_CUDA=1 for CUDA)"
    if backend == "compiled" or _require_compiled():
        asked = "backend='compiled'" if backend == "compiled" else f"${REQUIRE_ENV}=1"
        raise RuntimeError(
            f"enact_ops: {asked} but {_why_not(device)}; {how}, or use backend='reference'"
        )
    kind = torch.device(device).type
    if kind not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(kind)
        warnings.warn(
            f"enact_ops: no compiled kernels for {kind} ({_why_not(device)}); running the pure-PyTorch reference "
            f"(about 5x slower).  To fix: {how}.  backend='reference' chooses it without this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


# ---------------------------------------------------------------------------------------------
# input checks: one Python check per public function, run before either backend (the compiled
# operators check again on the host in csrc/vision.cpp, where they can be called directly)
# ---------------------------------------------------------------------------------------------
def _check_tensor(name: str, x, ndim: int, dims: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be of shape {dims}, got shape {tuple(x.shape)}")


def _check_like(name: str, x: torch.Tensor, shape, device, ref: str) -> None:
    """x has ``shape`` (a tuple, or the (B, N) prefix of a (B, N, C) x) and lies on ``device``."""
    if tuple(x.shape[: len(shape)]) != tuple(shape):
        dims = "be (B, N, C) with (B, N) =" if x.dim() > len(shape) else "have shape"
        raise ValueError(f"{name} must {dims} {tuple(shape)} like {ref}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, {ref} on {device}")


def _check_mask(name: str, x, like: Optional[torch.Tensor] = None, ref: str = "") -> None:
    """A (B, N) bool tensor with N > 0, shaped like and on the device of ``like`` when given."""
    _check_tensor(name, x, 2, "(B, N)")
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    if like is not None:
        _check_like(name, x, like.shape[:2], like.device, ref)
    if x.shape[1] == 0:
        raise ValueError(f"{name} has N = 0 tokens; at least one token per row is required")


def _check_features(features, shape, device, ref: str, floating: bool = True) -> torch.dtype:
    """(name, tensor) pairs of (B, N, C) tensors on ``device``; returns the dtype they share
    (None if they need not share one: ``floating=False``)."""
    dtype = None
    for name, x in features:
        _check_tensor(name, x, 3, "(B, N, C)")
        _check_like(name, x, shape, device, ref)
        if floating:
            if not x.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {x.dtype}")
            if dtype is not None and x.dtype != dtype:
                raise TypeError(f"features must share one dtype, got {dtype} and {x.dtype}")
            dtype = x.dtype
    return dtype


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_cluster_inputs(key, value, key_padding_mask, extra=(), embed_dim=None, check_values=True):
    """The checks of ENACT's clustering inputs: key (B, N, C = embed_dim), value and every extra
    tensor (B, N, *) on key's device, key_padding_mask None or (B, N) bool (True = pad) with a
    valid token in every image.  Returns (valid, key_padding_mask), both None when nothing is
    padded.

    ``check_values=False``: shapes, dtypes and devices only, no host sync -- the caller checks
    that every image has a valid token (``segmentation.check_rows_have_tokens`` on the lengths it
    reads anyway), and a given mask is returned as is (valid = ~mask, possibly all True)."""
    width = "C" if embed_dim is None else embed_dim
    if not isinstance(key, torch.Tensor) or key.dim() != 3 or (embed_dim is not None and key.shape[-1] != embed_dim):
        got = tuple(key.shape) if isinstance(key, torch.Tensor) else type(key).__name__
        raise ValueError(f"key must be (B, N, {width}), got {got}")
    if key.shape[1] == 0:
        raise ValueError("key has N = 0 tokens")
    tensors = [("value", value)] + [(f"extra[{i}]", e) for i, e in enumerate(extra)]
    _check_features(tensors, key.shape[:2], key.device, "key", floating=False)
    if key_padding_mask is None:
        return None, None
    _check_mask("key_padding_mask", key_padding_mask, key, "key")
    valid = ~key_padding_mask
    if not check_values:
        return valid, key_padding_mask
    check_rows_have_tokens(valid.sum(1).tolist())
    if bool(valid.all()):
        return None, None
    return valid, key_padding_mask


def _check_sizes(sizes) -> Optional[SegmentationSizes]:
    if sizes is None:
        return None
    if not isinstance(sizes, SegmentationSizes):
        raise TypeError(f"sizes must be an enact_ops.SegmentationSizes or None, got {type(sizes).__name__}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in sizes):
        raise ValueError(f"sizes must hold ints >= 0, got {tuple(sizes)}")
    return sizes


# ---------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------
def segment_runs(
    sign: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, backend: str = "auto",
    sizes: Optional[SegmentationSizes] = None,
) -> Segmentation:
    """Clusters = maximal runs of equal ``sign`` (B, N) bool over each row's valid sequence.
    ``sizes``: the segmentation's sizes (``runs_sizes(*read_row_sizes(...))``) if known -- then
    nothing is read from the device; they must be right (checked on CPU, asserted on CUDA, where
    a failed device-side assertion ends the CUDA context like any other)."""
    _check_mask("sign", sign)
    sizes = _check_sizes(sizes)
    if key_padding_mask is None:
        valid = torch.ones_like(sign)
    else:
        _check_mask("key_padding_mask", key_padding_mask, sign, "sign")
        valid = ~key_padding_mask
    if use_compiled(backend, sign.device):
        totals = () if sizes is None else (sizes.num_segments, sizes.num_tokens)
        return Segmentation(*torch.ops.enact_ops.segment_runs(sign, valid, *totals))
    return reference.segment_runs(sign, valid, sizes)


def segment_uniform(
    key_padding_mask: torch.Tensor, chunk: int, backend: str = "auto", sizes: Optional[SegmentationSizes] = None,
) -> Segmentation:
    """Uniform mode: crop each row's valid sequence to a multiple of ``chunk`` (L) and cut it.

    ``(n mod L) // 2`` tokens are dropped at the start and the rest at the end; a row with
    0 < n < L is one chunk.  ``key_padding_mask`` (B, N) bool, True = pad (all False if none).
    ``sizes``: as in ``segment_runs`` (``uniform_sizes(lengths, chunk)``).
    """
    _check_mask("key_padding_mask", key_padding_mask)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    sizes = _check_sizes(sizes)
    valid = ~key_padding_mask
    if use_compiled(backend, valid.device):
        totals = () if sizes is None else (sizes.num_segments, sizes.num_tokens)
        return Segmentation(*torch.ops.enact_ops.segment_uniform(valid, chunk, *totals))
    return reference.segment_uniform(valid, chunk, sizes)


def uniform_chunk_length(runs: Segmentation) -> int:
    """L = round(mean over images of (valid length / number of runs)), Python's round.

    ``runs`` is the ``segment_runs`` segmentation of the batch; images without a valid token
    are left out of the mean.  Reads the runs' sizes in one copy (``chunk_length`` does the
    arithmetic on host ints).
    """
    lengths, counts = torch.stack([(runs.cluster_ids >= 0).sum(1), runs.num_clusters]).tolist()
    return chunk_length(lengths, counts)


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
def segment_softmax_pool(
    scores: torch.Tensor,
    features: Sequence[torch.Tensor],
    seg: Segmentation,
    backend: str = "auto",
    max_clusters: Optional[int] = None,
) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Fused segment softmax pooling:  w_i = softmax_{j in c}(scores_j)_i,  y_c = sum_i w_i x_i.

    Args:
        scores: (B, N) floating.  Computed in float64 if the features are float64, else float32.
        features: one or more (B, N, C_f) floating tensors of one dtype (e.g. keys and values).
        seg: the Segmentation of the batch (``segment_runs`` or ``segment_uniform``).
        max_clusters: M_max of ``seg`` if known (``SegmentationSizes.max_clusters``: no host
            sync), else read from ``seg``.  It must be the segmentation's widest row.
    Returns:
        pooled: list of (B, M_max, C_f) in the features' dtype (zeros at padded clusters),
        weights: (B, N) in the compute dtype, 0 outside any cluster (not differentiable),
        cluster_mask: (B, M_max) bool, True at padded cluster slots.
    The compiled path is the registered operator ``enact_ops::segment_softmax_pool_forward`` and
    its autograd formula (``_register``), the one autograd path of the pooling.
    """
    if not isinstance(seg, Segmentation):
        raise TypeError(f"seg must be an enact_ops.Segmentation, got {type(seg).__name__}")
    _check_tensor("scores", scores, 2, "(B, N)")
    shape = tuple(seg.cluster_ids.shape)
    if tuple(scores.shape) != shape:
        raise ValueError(f"scores must have the segmentation's shape {shape}, got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if seg.cluster_ids.device != scores.device:
        raise ValueError(f"seg is on {seg.cluster_ids.device}, scores on {scores.device}")
    features = list(features)
    if not features:
        raise ValueError("features must hold at least one (B, N, C) tensor")
    dtype = _check_features([(f"features[{f}]", x) for f, x in enumerate(features)], shape, scores.device, "scores")
    if max_clusters is not None:
        _check_int("max_clusters", max_clusters, 0)
    scores = scores.to(torch.float64 if dtype == torch.float64 else torch.float32).contiguous()
    width = seg.max_clusters if max_clusters is None else max_clusters
    if use_compiled(backend, scores.device):
        features = [x if x.stride(-1) == 1 else x.contiguous() for x in features]
        pooled, weights = torch.ops.enact_ops.segment_softmax_pool_forward(
            scores, features, seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets, width
        )
    else:
        pooled, weights = reference.segment_softmax_pool(scores, features, seg, width)
    return list(pooled), weights, seg.cluster_mask(width)


def segment_softmax_pool_backward_sum(
    grad_pooled: Sequence[torch.Tensor],
    features: Sequence[torch.Tensor],
    weights: torch.Tensor,
    seg: Segmentation,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward of the compiled ``segment_softmax_pool`` for features of one width whose
    input-gradients flow into one tensor (e.g. keys = src + pos and values = src): returns
    ``grad_scores`` (B, N) and ``sum_f dL/dfeatures[f]`` (B, N, C) as one tensor laid out like
    ``features[0]`` -- one full-size gradient instead of one per feature.

    ``weights`` are the pooling weights of the forward; ``grad_pooled[f]`` is (B, M_max, C).
    One fused kernel on CPU and CUDA.
    """
    features = [x if x.stride(-1) == 1 else x.contiguous() for x in features]
    args = (weights, seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets)
    return torch.ops.enact_ops.segment_softmax_pool_backward_sum(list(grad_pooled), features, *args)


# ---------------------------------------------------------------------------------------------
# steps 1-4
# ---------------------------------------------------------------------------------------------
class Information(NamedTuple):
    """Steps 1-4 of a batch (``smoothed_information``)."""

    smoothed: torch.Tensor  # (B, N) h~, 0 at pads; differentiable in the logits
    sign: torch.Tensor  # (B, N) bool, s = ([-1, 2, -1] * h~) > 0, False at pads
    lengths: torch.Tensor  # (B,) int64, valid tokens per row
    runs: torch.Tensor  # (B,) int64, maximal runs of equal sign per row (0 for an empty row)


def smoothed_information(
    logits: torch.Tensor, taps: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, backend: str = "auto",
) -> Information:
    """ENACT's steps 1-4 on each row's valid sequence (pads removed, order kept):

        q = softmax(logits),  h = -p log2 p (p = q + 1e-8),  h~ = taps * h,  s = ([-1, 2, -1] * h~) > 0

    with both correlations zero-padded at the sequence's two ends, plus what sizes a segmentation
    (each row's valid length and number of runs of equal s) -- without a host sync.

    Args:
        logits: (B, N) float32 or float64, W_prob's logits of the keys.
        taps: (K,) odd K, the Gaussian's samples, in the logits' dtype and on their device.
        key_padding_mask: (B, N) bool, True = pad, or None.
    The compiled op is one kernel forward (one block per row on CUDA) and one backward;
    ``smoothed`` is differentiable in ``logits`` (float64 gradcheck in tests/test_information.py).
    """
    _check_tensor("logits", logits, 2, "(B, N)")
    if logits.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"logits must be float32 or float64, got {logits.dtype}")
    _check_tensor("taps", taps, 1, "(K,)")
    if taps.numel() % 2 != 1:
        raise ValueError(f"taps must have an odd length, got {taps.numel()}")
    if taps.dtype != logits.dtype or taps.device != logits.device:
        raise TypeError(f"taps must be {logits.dtype} on {logits.device} like logits, got {taps.dtype} on {taps.device}")
    valid = None
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask, logits, "logits")
        valid = ~key_padding_mask
    if use_compiled(backend, logits.device):
        smoothed, sign, _, lengths, runs = torch.ops.enact_ops.smoothed_information(
            logits.contiguous(), valid, taps.contiguous()
        )
        return Information(smoothed, sign, lengths, runs)
    return Information(*reference.smoothed_information(logits, valid, taps))
