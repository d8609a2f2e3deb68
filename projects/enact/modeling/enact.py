"""ENACT: entropy-based clustering of the keys and values of encoder self-attention.

For one image with valid key tokens k_1..k_n (row-major, pads removed) and values v_1..v_n:

    1. p   = softmax(W_prob k) + 1e-8            learned p.d.f. over the image's tokens
    2. h   = -p log2 p                            self-information
    3. h~  = g_sigma * h                          Gaussian smoothing (zero padding at both ends)
    4. s_i = [([-1, 2, -1] * h~)_i > 0]           curvature sign
    5. clusters c = maximal runs of equal s
    6. w_i = softmax_{j in c}(h~_j)_i
    7. K_cl[c] = sum_{i in c} w_i k_i,   V_cl[c] = sum_{i in c} w_i v_i
    8. out = identity + W_o softmax(Q K_cl^T / sqrt(d_head)) V_cl     (N queries, M_b clusters)

In that order: the functions below are steps 1-4 (the reference of the compiled operator
``enact_ops.smoothed_information``), ``EnactClustering.forward`` steps 1-7, ``EnactAttention`` step
8.  Steps 1-6 run in float32 (float64 for float64 inputs) on each image's valid sequence, so an
image's result does not depend on its batch; one host sync per call (step 5).  Memory, speed and
dtype machinery lives in :mod:`.enact_fused`.  See ``docs/method.md`` (modes, conventions).
"""
import math
import warnings
from collections import OrderedDict
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.hooks import RemovableHandle

import enact_ops
from enact_ops.ops import check_cluster_inputs
from enact_ops.reference import correlate_rows, curvature_taps
from enact_ops.segmentation import check_rows_have_tokens

from . import enact_fused
from .attention import MultiheadAttention

__all__ = [
    "CLUSTERING_MODES", "ClusterOutput", "ClusterStatistics", "ClusterTrace", "EnactAttention", "EnactClustering",
    "check_sigma", "curvature_sign", "gaussian_kernel", "self_information", "smooth", "smoothed_information",
]

CLUSTERING_MODES = ("segments", "uniform", "identity")


def check_sigma(sigma) -> int:
    """sigma, the Gaussian's standard deviation, must be a positive int."""
    if isinstance(sigma, bool) or not isinstance(sigma, int) or sigma <= 0:
        raise ValueError(f"sigma must be a positive int, got {sigma!r}")
    return sigma


# ---------------------------------------------------------------- steps 1-4
def self_information(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Steps 1-2: h = -p log2 p with p = softmax(logits over the valid tokens of each row) + 1e-8.
    logits (B, N), valid (B, N) bool or None.  Returns (B, N)."""
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    p = torch.softmax(logits, dim=-1) + 1e-8
    return -p * torch.log2(p)


def gaussian_kernel(sigma: int, radius: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """g(x) = exp(-x^2 / (2 sigma^2)) / (sigma sqrt(2 pi)) at x = -radius..radius (not renormalised)."""
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    return torch.exp(-(x**2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))


def smooth(h: torch.Tensor, kernel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Step 3, h~ = g_sigma * h, on compacted rows: h (B, N) holds each row's valid sequence at its
    start (lengths (B,)) and zeros after; the result is zero past each row's length."""
    inside = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
    return correlate_rows(h, kernel) * inside  # exact float32 (no TF32 conv1d)


def curvature_sign(smoothed: torch.Tensor) -> torch.Tensor:
    """Step 4, s = ([-1, 2, -1] * h~) > 0, on compacted rows (zeros past each row's end).  (B, N) bool"""
    return correlate_rows(smoothed, curvature_taps(smoothed.dtype, smoothed.device)) > 0


def smoothed_information(h: torch.Tensor, valid: Optional[torch.Tensor], kernel: torch.Tensor):
    """Steps 3-4 on each row's valid sequence: h~ (B, N) and s (B, N) bool, in the original token
    positions (pads: 0 / False).  The valid tokens are moved to the start of their row (so the
    convolutions see only them), processed, and moved back."""
    B, N = h.shape
    if valid is None:  # nothing padded: rows are already their valid sequences
        smoothed = smooth(h, kernel, torch.full((B,), N, device=h.device))
        return smoothed, curvature_sign(smoothed.detach())
    pos = torch.cumsum(valid, 1) - 1  # (B, N) position of each valid token in its sequence
    dest = torch.where(valid, pos, torch.full_like(pos, N))  # pads go to a discarded column N
    compact = h.new_zeros(B, N + 1).scatter(1, dest, h)[:, :N]
    smoothed_c = smooth(compact, kernel, valid.sum(1))
    sign_c = curvature_sign(smoothed_c.detach())
    src = pos.clamp(min=0)
    return torch.gather(smoothed_c, 1, src) * valid, torch.gather(sign_c, 1, src) & valid


class ClusterOutput(NamedTuple):
    key: torch.Tensor  # (B, M_max, C) clustered keys
    value: torch.Tensor  # (B, M_max, C_v) clustered values
    extra: Tuple[torch.Tensor, ...]  # each (B, M_max, C_e)
    cluster_mask: torch.Tensor  # (B, M_max) bool, True = padded cluster slot
    cluster_ids: torch.Tensor  # (B, N) int64, -1 = pad (or cropped in uniform mode)
    weights: torch.Tensor  # (B, N) pooling weights, 0 outside any cluster


class ClusterTrace(NamedTuple):
    """Steps 1-5 of one call, for the trace hooks of ``EnactClustering`` (analysis only)."""
    information: torch.Tensor  # (B, N) h of step 2, before smoothing (pads: not meaningful)
    smoothed: torch.Tensor  # (B, N) h~ of step 3 (pads: 0)
    sign: torch.Tensor  # (B, N) bool, s of step 4 (pads: False)
    cluster_ids: torch.Tensor  # (B, N) int64, step 5 (-1 = pad or cropped)
    valid: Optional[torch.Tensor]  # (B, N) bool, True = valid token; None = nothing padded


class ClusterStatistics(NamedTuple):
    """What one call clustered, per image (device tensors)."""
    num_clusters: torch.Tensor  # (B,) M_b
    num_tokens: torch.Tensor  # (B,) valid tokens n_b

    def summary(self) -> dict:
        """Clusters per image and compression N / M, means over the images (floats)."""
        m, n = self.num_clusters.double(), self.num_tokens.double()
        return {"clusters_per_image": float(m.mean()), "compression": float((n / m).mean())}


# ---------------------------------------------------------------- steps 1-7
class EnactClustering(nn.Module):
    """Clusters keys, values (and any extra per-token tensors) by the keys' self-information.
    embed_dim: C of the keys (W_prob: Linear(C, 1), Xavier-uniform weight, zero bias); sigma: the
    Gaussian's standard deviation, a positive int (5 for DETR, 3 for Anchor DETR); mode: "segments"
    (the paper), "uniform" (the authors' code: chunks of one batch-wide length L) or "identity"
    (every valid token its own cluster: standard attention); backend: "auto" | "compiled" |
    "reference" (runs the readable steps 1-4 above, ``self.smoothed_information`` included)."""

    def __init__(self, embed_dim: int, sigma: int = 5, mode: str = "segments", backend: str = "auto"):
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if mode not in CLUSTERING_MODES:
            raise ValueError(f"mode must be one of {CLUSTERING_MODES}, got {mode!r}")
        if backend not in enact_ops.BACKENDS:
            raise ValueError(f"backend must be one of {enact_ops.BACKENDS}, got {backend!r}")
        self.embed_dim, self.sigma, self.mode, self.backend = embed_dim, check_sigma(sigma), mode, backend
        # taps over -3 sigma..3 sigma (the paper) or -(3 sigma - 1)..(3 sigma - 1) (the authors' code)
        self.radius = 3 * self.sigma - 1 if mode == "uniform" else 3 * self.sigma
        self.w_prob = nn.Linear(embed_dim, 1)
        nn.init.xavier_uniform_(self.w_prob.weight)
        nn.init.zeros_(self.w_prob.bias)
        self.last_call: Optional[ClusterStatistics] = None  # the last call's, see statistics()
        self._trace_hooks: Dict[int, Callable] = OrderedDict()
        self._segmentation_hooks: Dict[int, Callable] = OrderedDict()
        self._taps: Dict[tuple, torch.Tensor] = {}  # see taps

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, sigma={self.sigma}, mode={self.mode!r}, backend={self.backend!r}"

    def register_trace_hook(self, hook: Callable[["EnactClustering", ClusterTrace], None]) -> RemovableHandle:
        """``hook(module, trace)`` runs after step 5 of every call with a :class:`ClusterTrace`
        (``projects.enact.analysis`` records them).  Returns a removable handle."""
        return enact_fused.add_hook(self._trace_hooks, hook)

    def register_segmentation_hook(self, hook: Callable[..., Optional[enact_ops.Segmentation]]) -> RemovableHandle:
        """``hook(module, sign, key_padding_mask, seg)`` runs after step 5; a Segmentation it
        returns replaces ``seg`` (to hold clusters fixed or force them; M_max is read from it)."""
        return enact_fused.add_hook(self._segmentation_hooks, hook)

    def logits_of(self, key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W_prob's logits W_prob k of the keys (B, N, C), in ``dtype``.  (B, N)"""
        w, b = self.w_prob.weight.to(dtype), self.w_prob.bias.to(dtype)
        return enact_fused.token_logits(key.to(dtype), w, b)

    def information(self, key: torch.Tensor, valid: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Steps 1-2: h = -p log2 p, p = softmax(W_prob k) over the valid tokens.  (B, N)"""
        return self_information(self.logits_of(key, dtype), valid)

    def smoothed_information(self, h: torch.Tensor, valid: Optional[torch.Tensor]):
        """Steps 3-4 with this module's kernel: h~ (B, N), s (B, N) bool."""
        return smoothed_information(h, valid, self.taps(h.dtype, h.device))

    def taps(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The Gaussian's samples of step 3, made once per dtype and device (not in every call)."""
        key = (self.sigma, self.radius, dtype, torch.device(device))
        if key not in self._taps:
            self._taps[key] = gaussian_kernel(self.sigma, self.radius, dtype, device)
        return self._taps[key]

    def segment(self, sign: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, row_sizes=None,
                return_sizes: bool = False):
        """Step 5: runs of equal sign (segments), uniform chunks of the batch's mean run length or
        one cluster per valid token (identity).  The one host sync: every image's valid length and
        number of runs (``row_sizes``, (B,) tensors from steps 1-4, else counted here), read in one
        copy, size the segmentation and M_max, give uniform mode's L and check that every image has
        a token.  Returns the Segmentation, or (Segmentation, SegmentationSizes) with ``return_sizes``."""
        if row_sizes is not None:
            lengths, runs = torch.stack(row_sizes).tolist()
        else:
            valid = None if key_padding_mask is None else ~key_padding_mask
            lengths, runs = enact_ops.read_row_sizes(sign.shape, valid, None if self.mode == "identity" else sign)
        check_rows_have_tokens(lengths)
        if self.mode == "segments":
            sizes = enact_ops.runs_sizes(lengths, runs)
            seg = enact_ops.segment_runs(sign, key_padding_mask, backend=self.backend, sizes=sizes)
        else:
            chunk = 1 if self.mode == "identity" else enact_ops.chunk_length(lengths, runs)
            sizes = enact_ops.uniform_sizes(lengths, chunk)
            mask = torch.zeros_like(sign) if key_padding_mask is None else key_padding_mask
            seg = enact_ops.segment_uniform(mask, chunk, backend=self.backend, sizes=sizes)
        return (seg, sizes) if return_sizes else seg

    def forward(self, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                extra: Sequence[torch.Tensor] = (), *, shared: bool = False, key_pos: Optional[torch.Tensor] = None,
                key_features: Optional[torch.Tensor] = None) -> ClusterOutput:
        """Steps 1-7.  key (B, N, C), value (B, N, C_v), key_padding_mask (B, N) bool (True = pad),
        extra: more (B, N, *) tensors pooled with the same weights.  Returns a ClusterOutput.
        ``shared=True``: key = value + key_pos (key_pos None: key = value), encoder self-attention;
        on the compiled backend steps 6-7 are then one operator that sends the key's gradients to
        ``value`` and ``key_pos`` (``key`` gets none) and pools ``key_features`` (the key in the
        attention's dtype, default ``key``) and ``value`` cast to it."""
        extra = tuple(extra)
        valid, mask = check_cluster_inputs(key, value, key_padding_mask, extra, self.embed_dim, check_values=False)
        features = key if key_features is None else key_features
        fused = shared and not extra and enact_fused.shared_path_applies(features, value, key_pos, self.backend)
        compiled = fused or enact_ops.use_compiled(self.backend, key.device)
        dtype = enact_fused.information_dtype(features)
        taps = self.taps(dtype, key.device)
        with torch.autocast(device_type=key.device.type, enabled=False):
            # steps 1-4; on the fused path without autograd: the pooling operator runs their backward
            with torch.set_grad_enabled(torch.is_grad_enabled() and not fused):
                logits = self.logits_of(key, dtype)  # (B, N)
                if compiled:  # one operator; h is computed apart for a trace hook only
                    smoothed, sign, probs, *row_sizes = torch.ops.enact_ops.smoothed_information(
                        logits.contiguous(), valid, taps)
                    h = self_information(logits.detach(), valid) if self._trace_hooks else None
                else:
                    h, row_sizes = self_information(logits, valid), None
                    smoothed, sign = self.smoothed_information(h, valid)
            # step 5, the one host sync
            seg, sizes = self.segment(sign, mask, row_sizes, return_sizes=True)
            seg, width = self._run_hooks(h, smoothed, sign, mask, valid, seg, sizes.max_clusters)
            # steps 6-7
            if fused:
                pooled, weights, cluster_mask = enact_fused.pool_shared_key_value(
                    features, value, key_pos, self.w_prob, (smoothed, probs, valid, taps), seg, width)
            else:
                pooled, weights, cluster_mask = enact_fused.pool(smoothed, [key, value, *extra], seg, self.backend, width)
        num_tokens = row_sizes[0] if row_sizes else valid.sum(1) if valid is not None else \
            torch.full_like(seg.num_clusters, key.shape[1])
        self.last_call = ClusterStatistics(seg.num_clusters.detach(), num_tokens)
        return ClusterOutput(pooled[0], pooled[1], tuple(pooled[2:]), cluster_mask, seg.cluster_ids, weights)

    def _run_hooks(self, h, smoothed, sign, mask, valid, seg, width):
        """The segmentation hooks (a Segmentation returned replaces ``seg``), then the trace hooks."""
        for hook in tuple(self._segmentation_hooks.values()):
            replaced = hook(self, sign, mask, seg)
            if replaced is not None:
                seg, width = replaced, replaced.max_clusters
        if self._trace_hooks:
            trace = ClusterTrace(h.detach(), smoothed.detach(), sign, seg.cluster_ids, valid)
            for hook in tuple(self._trace_hooks.values()):
                hook(self, trace)
        return seg, width

    def statistics(self) -> dict:
        """Clusters per image and compression N / M of the last call (floats; syncs on GPU)."""
        return {} if self.last_call is None else self.last_call.summary()

    last_num_clusters = property(lambda self: None if self.last_call is None else self.last_call.num_clusters)
    last_num_tokens = property(lambda self: None if self.last_call is None else self.last_call.num_tokens)

    def forward_shared(self, key, value, key_pos=None, key_padding_mask=None, key_features=None) -> ClusterOutput:
        warnings.warn("EnactClustering.forward_shared is deprecated: call the module with shared=True",
                      DeprecationWarning, stacklevel=2)
        return self(key, value, key_padding_mask, shared=True, key_pos=key_pos, key_features=key_features)

    def segment_with_sizes(self, sign, key_padding_mask, row_sizes=None):
        warnings.warn("EnactClustering.segment_with_sizes is deprecated: use segment(..., return_sizes=True)",
                      DeprecationWarning, stacklevel=2)
        return self.segment(sign, key_padding_mask, row_sizes, return_sizes=True)


# ---------------------------------------------------------------- step 8
class EnactAttention(MultiheadAttention):
    """out = identity + proj_drop(W_o softmax(Q K_cl^T / sqrt(d_head)) V_cl), K_cl, V_cl =
    EnactClustering(key + key_pos, value); queries are not clustered.  detrex's
    ``MultiheadAttention``'s signature, parameters (``attn.*``) and behaviour plus
    ``clustering.w_prob`` (an MHSA checkpoint loads with only it missing); a padded cluster slot
    gets exactly zero attention weight.  ``unclustered_tail = T`` (default 0) keeps the last T keys
    out of the clustering, each its own cluster (PnP-DETR's pooled background tokens, :mod:`.pnp`;
    a padding mask must leave them valid)."""

    unclustered_tail: int = 0

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 batch_first: bool = False, sigma: int = 5, mode: str = "segments", backend: str = "auto",
                 attn_implementation: str = "sdpa", **kwargs):
        super().__init__(embed_dim, num_heads, attn_drop, proj_drop, batch_first, attn_implementation, **kwargs)
        self.clustering = EnactClustering(embed_dim, sigma=sigma, mode=mode, backend=backend)

    def forward(self, query, key=None, value=None, identity=None, query_pos=None, key_pos=None, attn_mask=None,
                key_padding_mask=None, **kwargs) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("EnactAttention does not take attn_mask: its keys are clustered (use it in the encoder only)")
        key_in = query if key is None else key
        shared = value is None or value is key_in  # key = value + key_pos: encoder self-attention
        if key_pos is None and query_pos is not None and query_pos.shape == key_in.shape:
            key_pos = query_pos  # as _prepare does
        query, key, value, identity = self._prepare(query, key, value, identity, query_pos, key_pos)
        if shared and key_pos is not None and not self.batch_first:
            key_pos = key_pos.transpose(0, 1)
        # unclustered_tail: the last T keys and values kept apart, (B, N - T, C) clustered
        (key, value, key_pos, key_padding_mask), kept = enact_fused.split_tail(
            self.unclustered_tail, key, value, key_pos, key_padding_mask)
        with record_function("enact::cluster_keys_values"):  # a range in torch.profiler's output
            if shared:
                # steps 6-8 in autocast's dtype: the key cast once for the pooling and the query projection
                features = key.to(enact_fused.attention_dtype(key))
                clustered = self.clustering(key, value, key_padding_mask, shared=True, key_pos=key_pos,
                                            key_features=features)
                query = features if query is key else query
                del key  # under autocast the float32 key is not needed past steps 1-5: free it now
            else:
                clustered = self.clustering(key, value, key_padding_mask)  # (B, M_max, C) each
        # the kept tokens as clusters of their own, after the pooled ones: (B, M_max + T, C)
        key, value, cluster_mask = enact_fused.append_tail(clustered.key, clustered.value, clustered.cluster_mask, kept)
        with record_function("enact::attend_clusters"):
            return enact_fused.attend_clusters(self, query, key, value, cluster_mask, identity)

    def statistics(self) -> dict:
        return self.clustering.statistics()
