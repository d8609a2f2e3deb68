"""ENACT: entropy-based clustering of the keys and values of encoder self-attention.

For one image with valid key tokens k_1..k_n (row-major, pads removed) and values v_1..v_n:

    p   = softmax(W_prob k) + 1e-8                  learned p.d.f. over the image's tokens
    h   = -p log2 p                                  self-information
    h~  = g_sigma * h                                Gaussian smoothing (zero padding at both ends)
    s_i = [([-1, 2, -1] * h~)_i > 0]                 curvature sign
    clusters c = maximal runs of equal s
    w_i = softmax_{j in c}(h~_j)_i
    K_cl[c] = sum_{i in c} w_i k_i,   V_cl[c] = sum_{i in c} w_i v_i

and attention uses the N un-clustered queries against the M_b clustered keys / values
(``EnactAttention``).  Steps 1-6 run on each image's valid sequence, as if the pads did not
exist, so an image's result does not depend on the batch it is in.  ``mode="uniform"`` replaces
the runs by chunks of one batch-wide length L, as the authors' public code does.
See ``ENACT_SPEC.md`` for the exact conventions implemented here.
"""
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import enact_ops

from .attention import MultiheadAttention

__all__ = [
    "CLUSTERING_MODES",
    "ClusterOutput",
    "EnactAttention",
    "EnactClustering",
    "curvature_sign",
    "gaussian_kernel",
    "self_information",
    "smooth",
]

CLUSTERING_MODES = ("segments", "uniform")
_CURVATURE = (-1.0, 2.0, -1.0)


def gaussian_kernel(sigma: int, radius: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """g(x) = exp(-x^2 / (2 sigma^2)) / (sigma sqrt(2 pi)) at x = -radius..radius (not renormalised)."""
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    return torch.exp(-(x**2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))


def self_information(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h = -p log2 p with p = softmax(logits over the valid tokens of each row) + 1e-8.  (B, N)"""
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    p = torch.softmax(logits, dim=-1) + 1e-8
    return -p * torch.log2(p)


def _conv_same(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Cross-correlation of each row of x (B, N) with taps (odd length), zero padding, same length."""
    return F.conv1d(x[:, None], taps.view(1, 1, -1), padding=taps.numel() // 2)[:, 0]


def smooth(h: torch.Tensor, kernel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Gaussian smoothing of compacted rows: h (B, N) holds each row's valid sequence at its start
    (lengths (B,)) and zeros after; the result is zero past each row's length."""
    inside = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
    return _conv_same(h, kernel) * inside


def curvature_sign(smoothed: torch.Tensor) -> torch.Tensor:
    """s = ([-1, 2, -1] * smoothed) > 0, on compacted rows (zeros past each row's end).  (B, N) bool"""
    taps = torch.tensor(_CURVATURE, dtype=smoothed.dtype, device=smoothed.device)
    return _conv_same(smoothed, taps) > 0


class ClusterOutput(NamedTuple):
    key: torch.Tensor  # (B, M_max, C) clustered keys
    value: torch.Tensor  # (B, M_max, C_v) clustered values
    extra: Tuple[torch.Tensor, ...]  # each (B, M_max, C_e)
    cluster_mask: torch.Tensor  # (B, M_max) bool, True = padded cluster slot
    cluster_ids: torch.Tensor  # (B, N) int64, -1 = pad (or cropped in uniform mode)
    weights: torch.Tensor  # (B, N) pooling weights, 0 outside any cluster


def _check_sigma(sigma) -> int:
    if isinstance(sigma, bool) or not isinstance(sigma, int) or sigma <= 0:
        raise ValueError(f"sigma must be a positive int, got {sigma!r}")
    return sigma


class EnactClustering(nn.Module):
    """Clusters keys, values (and any extra per-token tensors) by the keys' self-information.

    Args:
        embed_dim: C of the keys (W_prob: Linear(C, 1), Xavier-uniform weight, zero bias).
        sigma: the Gaussian's standard deviation, a positive int (5 for DETR, 3 for Anchor DETR).
        mode: "segments" (the paper: runs of equal curvature sign) or "uniform" (the authors'
            code: chunks of one batch-wide length L).
        backend: enact_ops backend, "auto" | "compiled" | "reference".
    """

    def __init__(self, embed_dim: int, sigma: int = 5, mode: str = "segments", backend: str = "auto"):
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if mode not in CLUSTERING_MODES:
            raise ValueError(f"mode must be one of {CLUSTERING_MODES}, got {mode!r}")
        if backend not in enact_ops.ops.BACKENDS:
            raise ValueError(f"backend must be one of {enact_ops.ops.BACKENDS}, got {backend!r}")
        self.embed_dim = embed_dim
        self.sigma = _check_sigma(sigma)
        self.mode = mode
        self.backend = backend
        # taps over -3 sigma..3 sigma (the paper) or -(3 sigma - 1)..(3 sigma - 1) (the authors' code)
        self.radius = 3 * self.sigma if mode == "segments" else 3 * self.sigma - 1
        self.w_prob = nn.Linear(embed_dim, 1)
        nn.init.xavier_uniform_(self.w_prob.weight)
        nn.init.zeros_(self.w_prob.bias)
        self.last_num_clusters: Optional[torch.Tensor] = None  # (B,) of the last call
        self.last_num_tokens: Optional[torch.Tensor] = None  # (B,) valid tokens of the last call

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, sigma={self.sigma}, mode={self.mode!r}, backend={self.backend!r}"

    # -- the pieces -------------------------------------------------------------------------
    def _check(self, key, value, key_padding_mask, extra):
        if not isinstance(key, torch.Tensor) or key.dim() != 3 or key.shape[-1] != self.embed_dim:
            got = tuple(key.shape) if isinstance(key, torch.Tensor) else type(key).__name__
            raise ValueError(f"key must be (B, N, {self.embed_dim}), got {got}")
        B, N, _ = key.shape
        if N == 0:
            raise ValueError("key has N = 0 tokens")
        for name, t in [("value", value)] + [(f"extra[{i}]", e) for i, e in enumerate(extra)]:
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[:2]) != (B, N):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (B, N, C) with (B, N) = ({B}, {N}) like key, got {got}")
            if t.device != key.device:
                raise ValueError(f"{name} is on {t.device}, key on {key.device}")
        if key_padding_mask is None:
            return None
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor (True = pad), got {got}")
        if tuple(key_padding_mask.shape) != (B, N):
            raise ValueError(f"key_padding_mask must be (B, N) = ({B}, {N}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != key.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, key on {key.device}")
        return key_padding_mask

    def information(self, key: torch.Tensor, valid: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Steps 1-2: h = -p log2 p, p = softmax(W_prob k) over the valid tokens.  (B, N)"""
        logits = F.linear(key.to(dtype), self.w_prob.weight.to(dtype), self.w_prob.bias.to(dtype))
        return self_information(logits[..., 0], valid)

    def smoothed_information(self, h: torch.Tensor, valid: Optional[torch.Tensor]):
        """Steps 3-4 on each row's valid sequence.  Returns smoothed h (B, N) and sign (B, N) bool,
        both in the original token positions (pads: 0 / False)."""
        kernel = gaussian_kernel(self.sigma, self.radius, h.dtype, h.device)
        B, N = h.shape
        if valid is None:  # nothing padded: rows are already their valid sequences
            lengths = torch.full((B,), N, device=h.device)
            smoothed = smooth(h, kernel, lengths)
            return smoothed, curvature_sign(smoothed.detach())
        # compact: row b's valid tokens to positions 0..n_b - 1 (pads go to a discarded column N)
        pos = torch.cumsum(valid, 1) - 1
        dest = torch.where(valid, pos, torch.full_like(pos, N))
        compact = h.new_zeros(B, N + 1).scatter(1, dest, h)[:, :N]
        smoothed_c = smooth(compact, kernel, valid.sum(1))
        sign_c = curvature_sign(smoothed_c.detach())
        src = pos.clamp(min=0)
        smoothed = torch.gather(smoothed_c, 1, src) * valid
        sign = torch.gather(sign_c, 1, src) & valid
        return smoothed, sign

    def segment(self, sign: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> enact_ops.Segmentation:
        """Step 5: runs of equal sign (segments) or uniform chunks of the batch's mean run length."""
        runs = enact_ops.segment_runs(sign, key_padding_mask, backend=self.backend)
        if self.mode == "segments":
            return runs
        if key_padding_mask is None:
            key_padding_mask = torch.zeros_like(sign)
        chunk = enact_ops.uniform_chunk_length(runs)
        return enact_ops.segment_uniform(key_padding_mask, chunk, backend=self.backend)

    # -- the clustering step ----------------------------------------------------------------
    def forward(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        extra: Sequence[torch.Tensor] = (),
    ) -> ClusterOutput:
        """key (B, N, C), value (B, N, C_v), key_padding_mask (B, N) bool (True = pad), extra:
        more (B, N, *) tensors pooled with the same weights.  Returns a ClusterOutput."""
        extra = tuple(extra)
        mask = self._check(key, value, key_padding_mask, extra)
        B, N, _ = key.shape
        valid = None
        if mask is not None:
            valid = ~mask
            empty = (~valid.any(1)).nonzero()
            if empty.numel():
                raise ValueError(f"image {int(empty[0])} of the batch has no valid token (key_padding_mask all True)")
            if bool(valid.all()):
                valid, mask = None, None
        dtype = torch.float64 if key.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=key.device.type, enabled=False):
            h = self.information(key, valid, dtype)  # (B, N)
            smoothed, sign = self.smoothed_information(h, valid)  # (B, N) each
            seg = self.segment(sign, mask)
            feats = [key, value, *extra]
            common = torch.promote_types(key.dtype, value.dtype)
            for e in extra:
                common = torch.promote_types(common, e.dtype)
            pooled, weights, cluster_mask = enact_ops.segment_softmax_pool(
                smoothed, [f.to(common) for f in feats], seg, backend=self.backend
            )
        pooled = [p.to(f.dtype) for p, f in zip(pooled, feats)]
        self.last_num_clusters = seg.num_clusters.detach()
        self.last_num_tokens = torch.full_like(seg.num_clusters, N) if mask is None else valid.sum(1)
        return ClusterOutput(pooled[0], pooled[1], tuple(pooled[2:]), cluster_mask, seg.cluster_ids, weights)

    def statistics(self) -> dict:
        """Clusters per image and compression N / M of the last call (floats; syncs on GPU)."""
        if self.last_num_clusters is None:
            return {}
        m = self.last_num_clusters.double()
        n = self.last_num_tokens.double()
        return {"clusters_per_image": float(m.mean()), "compression": float((n / m).mean())}


class EnactAttention(MultiheadAttention):
    """Multi-head attention whose keys and values are clustered by ENACT; queries are not:

        out = identity + proj_drop(W_o softmax(Q K_cl^T / sqrt(d_head)) V_cl)

    with K_cl, V_cl = EnactClustering(key + key_pos, value).  Same call signature, parameters
    (``attn.*``) and behaviour as detrex's ``MultiheadAttention`` plus ``clustering.w_prob``, so a
    trained MHSA checkpoint loads with only ``clustering.w_prob.{weight,bias}`` missing.
    A padded cluster slot gets exactly zero attention weight.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        batch_first: bool = False,
        sigma: int = 5,
        mode: str = "segments",
        backend: str = "auto",
        attention: str = "sdpa",
        **kwargs,
    ):
        super().__init__(embed_dim, num_heads, attn_drop, proj_drop, batch_first, attention, **kwargs)
        self.clustering = EnactClustering(embed_dim, sigma=sigma, mode=mode, backend=backend)

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        identity: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
        key_pos: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("EnactAttention does not take attn_mask: its keys are clustered (use it in the encoder only)")
        query, key, value, identity = self._prepare(query, key, value, identity, query_pos, key_pos)
        clustered = self.clustering(key, value, key_padding_mask)  # (B, M_max, C) each
        out = self._attend(query, clustered.key, clustered.value, key_padding_mask=clustered.cluster_mask)
        return identity + self.proj_drop(out)

    def statistics(self) -> dict:
        return self.clustering.statistics()
