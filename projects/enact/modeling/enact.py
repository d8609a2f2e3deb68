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
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

import enact_ops

from .attention import MultiheadAttention, attend_heads

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


def _rows(x: torch.Tensor) -> Tuple[Optional[torch.Tensor], bool]:
    """The (B*N, C) or (N*B, C) matrix of a (B, N, C) tensor in its memory order, as a view:
    (rows, True) for a contiguous x, (rows, False) for the transposed view of a contiguous (N, B, C)
    tensor (DETR's sequence-first layout), (None, ...) for any other layout."""
    if x.is_contiguous():
        return x.reshape(-1, x.shape[-1]), True
    t = x.transpose(0, 1)
    if t.is_contiguous():
        return t.reshape(-1, x.shape[-1]), False
    return None, True


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear of a (B, N, C) tensor without a contiguous copy of a sequence-first x: the
    projection runs on the (N, B, C) tensor; the result is a (B, N, C_out) view laid out like x."""
    rows, batch_major = _rows(x)
    if rows is None or batch_major:
        return F.linear(x, weight, bias)
    return F.linear(x.transpose(0, 1), weight, bias).transpose(0, 1)


def _same_order(t: torch.Tensor, batch_major: bool) -> bool:
    """True if ``_rows(t)`` exists and lies in the given memory order."""
    rows, order = _rows(t)
    return rows is not None and order == batch_major


def _weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_{b, n} g[b, n]^T x[b, n] for g (B, N, C_out) and x (B, N, C_in): one GEMM over the rows
    when both lie in the same memory order, else one batched GEMM (strided operands, no copy)."""
    g_rows, g_order = _rows(g)
    x_rows, x_order = _rows(x)
    if g_rows is not None and x_rows is not None and g_order == x_order:
        return g_rows.t().mm(x_rows)
    return torch.bmm(g.transpose(1, 2), x).sum(0)


class _Projection(torch.autograd.Function):
    """y = x W^T (+ b) (+ identity) for x (B, N, C_in) given as a contiguous tensor or as the
    (B, N, C) view of a contiguous sequence-first (N, B, C) tensor, with no copy of x made or kept:

    * without ``identity``: y is laid out like x (one GEMM over x's rows);
    * with ``identity`` (B, N, C_out): y = identity + x W^T + b laid out like identity, in one GEMM
      with no separate projection output when identity lies in x's memory order (the residual
      connection fused into the output projection).

    Backward: dx is contiguous (B, N, C_in) (what SDPA's backward wants for the gradient of its
    output), computed from a dy of either order without a copy (an expanded dy is made contiguous);
    d identity = dy; dW as in ``_weight_grad``.  Saves x and W only."""

    @staticmethod
    def forward(ctx, x, weight, bias, identity):
        rows, batch_major = _rows(x)
        if identity is not None and _same_order(identity, batch_major):
            out = _rows(identity)[0]
            out = out + bias if bias is not None else out.clone()
            out.addmm_(rows, weight.t())  # identity + b + x W^T: one pass and one GEMM
            B, N = x.shape[:2]
            y = out.view(B, N, -1) if batch_major else out.view(N, B, -1).transpose(0, 1)
        else:  # one GEMM over x's rows, y laid out like x
            out = torch.addmm(bias, rows, weight.t()) if bias is not None else rows.mm(weight.t())
            B, N = x.shape[:2]
            y = out.view(B, N, -1) if batch_major else out.view(N, B, -1).transpose(0, 1)
            if identity is not None:
                y = torch.add(identity, y, out=torch.empty_like(identity))  # identity's layout
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        g = gy
        if _rows(g)[0] is None or 0 in g.stride():
            g = g.contiguous()
        if ctx.needs_input_grad[0]:
            g_rows, batch_major = _rows(g)
            if batch_major:
                gx = g_rows.mm(weight).view(x.shape)
            else:
                gx = torch.bmm(g, weight.expand(g.shape[0], *weight.shape))
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(g, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 1))
        return gx, gw, gb, (gy if ctx.needs_input_grad[3] else None)


def _projection(x, weight, bias=None, identity=None):
    """``_Projection`` where it applies (autograd on, no autocast, one dtype, layouts it takes),
    else plain traceable ops (``_linear``, still without a layout copy of x)."""
    rows, batch_major = _rows(x)
    lean = (
        rows is not None
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == x.dtype)
        and (identity is None or (identity.dtype == x.dtype and _rows(identity)[0] is not None))
    )
    if lean:
        return _Projection.apply(x, weight, bias, identity)
    y = _linear(x, weight, bias)
    return y if identity is None else identity + y


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


class _SharedKeyValueClustering(torch.autograd.Function):
    """Steps 1-7 for key = value + key_pos and value (encoder self-attention), on the compiled
    kernels, with one (B, N, C) input-gradient for everything that flows into ``value``.

    ``key`` enters as data only (it must equal value + key_pos); its gradients -- through the
    pooled keys and through W_prob's logits -- are returned for ``value`` (and ``key_pos``) and
    summed there with the pooled values' in one buffer: the fused backward kernel writes
    w_i (dL/dK_c + dL/dV_c) and the W_prob term dL/dlogit_i W_prob is added in place, where plain
    autograd materialises and accumulates three (B, N, C) gradients.  The (B, N) chain from the
    logits to the smoothed scores is differentiated through a small graph recorded in forward.
    Outputs: pooled key, pooled value, pooling weights and the segmentation's seven tensors."""

    @staticmethod
    def forward(ctx, module, key, value, key_pos, weight, bias, valid, mask):
        logits = _linear(key, weight, bias)[..., 0]  # (B, N)
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            smoothed, sign = module.smoothed_information(self_information(leaf, valid), valid)
        seg = module.segment(sign, mask)
        pooled, weights = torch.ops.enact_ops.segment_softmax_pool_forward(
            smoothed.detach().contiguous(), [key, value], seg.tokens, seg.seg_starts, seg.seg_batch,
            seg.row_offsets, seg.max_clusters,
        )
        ctx.graph = (leaf, smoothed)
        ctx.seg = seg
        ctx.save_for_backward(key, value, weights, weight)
        ctx.mark_non_differentiable(weights, *seg)
        ctx.set_materialize_grads(False)
        return (pooled[0], pooled[1], weights, *seg)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_key, grad_value, *_):
        key, value, weights, weight = ctx.saved_tensors
        leaf, smoothed = ctx.graph
        seg = ctx.seg
        need_value, need_pos, need_weight, need_bias = (ctx.needs_input_grad[i] for i in (2, 3, 4, 5))
        grads = [(g, x) for g, x in ((grad_key, key), (grad_value, value)) if g is not None]
        if not grads:
            return (None,) * 8
        grad_scores, grad_sum = enact_ops.ops.segment_softmax_pool_backward_sum(
            [g for g, _ in grads], [x for _, x in grads], weights, seg
        )
        # (B, N), 0 at pads; the small graph lives as long as ctx (the outer graph may be retained)
        (grad_logits,) = torch.autograd.grad(smoothed, leaf, grad_scores, retain_graph=True)
        grad_w = _weight_grad(grad_logits.unsqueeze(-1), key) if need_weight else None  # (1, C)
        grad_b = grad_logits.sum().reshape(1) if need_bias else None
        term = (grad_logits.unsqueeze(-1), weight.view(1, 1, -1))  # dL/dkey through the logits
        grad_pos = None
        if need_pos:  # dL/dkey_pos = dL/dkey: its own buffer (a learned position embedding)
            if grad_key is not None:
                _, grad_pos = enact_ops.ops.segment_softmax_pool_backward_sum([grad_key], [key], weights, seg)
                grad_pos.addcmul_(*term)
            else:
                grad_pos = term[0] * term[1]
        if need_value:
            grad_sum.addcmul_(*term)
        return None, None, (grad_sum if need_value else None), grad_pos, grad_w, grad_b, None, None


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
        logits = _linear(key.to(dtype), self.w_prob.weight.to(dtype), self.w_prob.bias.to(dtype))
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

    @staticmethod
    def _valid(mask: Optional[torch.Tensor]):
        """(valid, mask) from a checked key_padding_mask; both None when nothing is padded."""
        if mask is None:
            return None, None
        valid = ~mask
        empty = (~valid.any(1)).nonzero()
        if empty.numel():
            raise ValueError(f"image {int(empty[0])} of the batch has no valid token (key_padding_mask all True)")
        if bool(valid.all()):
            return None, None
        return valid, mask

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
        valid, mask = self._valid(mask)
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

    def forward_shared(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_pos: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> ClusterOutput:
        """``forward(key, value, key_padding_mask)`` for key = value + key_pos (key = value if
        key_pos is None), the encoder self-attention case: the same outputs, and on the compiled
        kernels (float32 / float64, autograd on) one fused backward that sends the key's gradients to
        ``value`` and ``key_pos`` and builds the (B, N, C) gradient of ``value`` in one buffer (see
        ``_SharedKeyValueClustering``).  ``key`` must equal value + key_pos; on that path it is
        read as data only, elsewhere it is clustered as in ``forward``."""
        mask = self._check(key, value, key_padding_mask, ())
        dtype = key.dtype
        fused = (
            torch.is_grad_enabled()
            and dtype in (torch.float32, torch.float64)
            and value.dtype == dtype
            and self.w_prob.weight.dtype == dtype
            and value.shape == key.shape
            and key.stride(-1) == 1
            and value.stride(-1) == 1
            and (key_pos is None or (key_pos.shape == key.shape and key_pos.dtype == dtype))
            and enact_ops.ops._use_compiled(self.backend, key.device)
        )
        if not fused:
            return self.forward(key, value, key_padding_mask)
        B, N, _ = key.shape
        valid, mask = self._valid(mask)
        with torch.autocast(device_type=key.device.type, enabled=False):
            pooled_key, pooled_value, weights, *seg = _SharedKeyValueClustering.apply(
                self, key.detach(), value, key_pos, self.w_prob.weight, self.w_prob.bias, valid, mask
            )
        seg = enact_ops.Segmentation(*seg)
        self.last_num_clusters = seg.num_clusters.detach()
        self.last_num_tokens = torch.full_like(seg.num_clusters, N) if mask is None else valid.sum(1)
        return ClusterOutput(pooled_key, pooled_value, (), seg.cluster_mask(), seg.cluster_ids, weights)

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

    Memory: K/V are N/M times smaller, so the full-size (B, N, C) tensors of the query path set
    the peak.  None of them is copied for its layout (DETR's sequence-first tensors are projected
    in place, ``_Projection``), the residual is fused into the output projection, and in encoder
    self-attention (value = the key before its position) the clustering's backward returns one
    (B, N, C) gradient for the input instead of three (``EnactClustering.forward_shared``).
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
        # key = value + key_pos when the value is the key before its position (encoder self-attention)
        key_in = query if key is None else key
        shared = value is None or value is key_in
        if key_pos is None and query_pos is not None and query_pos.shape == key_in.shape:
            key_pos = query_pos  # as _prepare does
        query, key, value, identity = self._prepare(query, key, value, identity, query_pos, key_pos)
        with record_function("enact::cluster_keys_values"):  # a range in torch.profiler's output
            if shared:
                if key_pos is not None and not self.batch_first:
                    key_pos = key_pos.transpose(0, 1)
                clustered = self.clustering.forward_shared(key, value, key_pos, key_padding_mask)
            else:
                clustered = self.clustering(key, value, key_padding_mask)  # (B, M_max, C) each
        with record_function("enact::attend_clusters"):
            return self._attend_clustered(query, clustered.key, clustered.value, clustered.cluster_mask, identity)

    def _attend_clustered(self, query, key, value, key_padding_mask, identity):
        """``multi_head_attention`` of the N queries (B, N, C) against the clustered keys / values
        (B, M, C), memory-lean: the queries' projections, the attention output and the output
        projection keep the layout of ``query`` (for DETR's sequence-first input, a transposed
        view of an (N, B, C) tensor), so no full-size (B, N, C) copy is made or kept for backward.
        Returns (B, N, C) if ``batch_first`` else (N, B, C)."""
        attn = self.attn
        bsz, tgt_len, embed_dim = query.shape
        src_len = key.shape[1]
        heads = attn.num_heads
        head_dim = embed_dim // heads
        dropout_p = attn.dropout if self.training else 0.0
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
        q = _projection(query, w_q, b_q).view(bsz, tgt_len, heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        k = F.linear(key, w_k, b_k).view(bsz, src_len, heads, head_dim).transpose(1, 2)  # (B, h, M, d)
        v = F.linear(value, w_v, b_v).view(bsz, src_len, heads, head_dim).transpose(1, 2)  # (B, h, M, d)
        mask = None
        if key_padding_mask is not None:
            mask = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(key_padding_mask, float("-inf")).view(bsz, 1, 1, src_len)
        out = attend_heads(q, k, v, mask, dropout_p, self.attention)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)  # a view: out is laid out like q
        if not self.batch_first:
            identity = identity.transpose(0, 1)  # (B, N, C)
        w_o, b_o = attn.out_proj.weight, attn.out_proj.bias
        if self.proj_drop.p > 0.0 and self.training:
            out = identity + self.proj_drop(_projection(out, w_o, b_o))
        else:  # the residual fused into the output projection
            out = _projection(out, w_o, b_o, identity)
        return out if self.batch_first else out.transpose(0, 1)

    def statistics(self) -> dict:
        return self.clustering.statistics()
