"""The memory and speed machinery behind ``EnactAttention``; the math is in :mod:`.enact`.

Every function here computes exactly what a plain composition of the reference ops computes
(tests/test_enact.py checks values and gradients); what it changes is which tensors are made
and kept for backward:

* ``project(x, W, b, identity)``  y = identity + x W^T + b without a layout copy of x: DETR's
  sequence-first (N, B, C) tensors are projected in place, and the residual ``identity`` is
  fused into the output projection (one GEMM, no separate projection output).
* ``pool_shared_key_value``  steps 6-7 for encoder self-attention, where key = value + key_pos,
  on one registered operator: one (B, N, C) input-gradient for everything that flows into
  ``value`` (pooled keys, pooled values and the W_prob logits) instead of three.
* ``attend_clusters``  step 8 with the queries' projections, the attention output and the
  output projection laid out like the query.

The small interface ``EnactClustering`` / ``EnactAttention`` use: ``information_dtype``,
``attention_dtype``, ``token_logits``, ``pool``, ``shared_path_applies``, ``pool_shared_key_value``,
``project``, ``linear``, ``attend_clusters`` and, for PnP-DETR's unclustered tail, ``split_tail`` /
``append_tail``.

Mixed precision (autocast bf16 / fp16, or a detector that hands the encoder bf16 tokens): steps
1-5 run in float32 (W_prob's logits read the key as given, float32 under autocast, upcast from a
bf16 key); steps 6-8 run in ``attention_dtype`` (autocast's dtype): the key (= the query in
encoder self-attention) and the value are cast once, the pooling kernels accumulate in float32,
the projections keep their low-precision input for backward, as ``F.linear`` under autocast does.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.autograd.function import once_differentiable

import enact_ops

from .attention import attend_heads, key_padding_bias

__all__ = [
    "add_hook", "append_tail", "attend_clusters", "attention_dtype", "information_dtype", "linear", "pool", "pool_shared_key_value",
    "project", "shared_path_applies", "split_tail", "token_logits",
]


# ---------------------------------------------------------------- layouts without copies
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear of a (B, N, C) tensor without a contiguous copy of a sequence-first x: the
    projection runs on the (N, B, C) tensor; the result is a (B, N, C_out) view laid out like x."""
    rows, batch_major = _rows(x)
    if rows is None or batch_major:
        return F.linear(x, weight, bias)
    return F.linear(x.transpose(0, 1), weight, bias).transpose(0, 1)


def token_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """W_prob's logits x w + b of a (B, N, C) tensor, (B, N), in exact float32 whatever the TF32 /
    matmul-precision settings: a matrix-vector product (BLAS / cuBLAS gemv, which has no TF32
    mode) over x's rows in their memory order, no layout copy.  weight (1, C), bias (1,)."""
    rows, batch_major = _rows(x)
    if rows is None:
        x = x.contiguous()
        rows, batch_major = _rows(x)
    B, N = x.shape[:2]
    out = torch.addmv(bias.expand(rows.shape[0]), rows, weight[0])  # (B*N,) or (N*B,)
    return out.view(B, N) if batch_major else out.view(N, B).t()


def _weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_{b, n} g[b, n]^T x[b, n] for g (B, N, C_out) and x (B, N, C_in): one GEMM over the rows
    when both lie in the same memory order, else one batched GEMM (strided operands, no copy)."""
    g_rows, g_order = _rows(g)
    x_rows, x_order = _rows(x)
    if g_rows is not None and x_rows is not None and g_order == x_order:
        return g_rows.t().mm(x_rows)
    return torch.bmm(g.transpose(1, 2), x).sum(0)


def _view_like_rows(out: torch.Tensor, batch_major: bool, B: int, N: int) -> torch.Tensor:
    """(B*N, C) or (N*B, C) rows back to a (B, N, C) view."""
    return out.view(B, N, -1) if batch_major else out.view(N, B, -1).transpose(0, 1)


def _add_in_blocks(identity: torch.Tensor, y: torch.Tensor, block: int = 1 << 20) -> torch.Tensor:
    """identity + y (B, N, C) for a y of a narrower dtype (bf16 / fp16 under mixed precision),
    laid out like identity, in blocks of tokens: on a CPU a mixed-dtype add first upcasts all of
    y into a temporary as large as the output; here only a block of it at a time."""
    out = torch.empty_like(identity)
    step = max(1, block // max(1, identity.shape[0] * identity.shape[2]))
    for i in range(0, identity.shape[1], step):
        torch.add(identity[:, i:i + step], y[:, i:i + step], out=out[:, i:i + step])
    return out


class _Projection(torch.autograd.Function):
    """y = x W^T (+ b) (+ identity) for x (B, N, C_in) contiguous or the (B, N, C) view of a
    contiguous (N, B, C) tensor, with no copy of x made or kept:

    * without ``identity``: y is laid out like x (one GEMM over x's rows);
    * with ``identity`` (B, N, C_out): y = identity + x W^T + b laid out like identity, in one GEMM
      with no separate projection output when identity lies in x's memory order; an identity of
      a wider dtype than x (mixed precision) is added in blocks, y in identity's dtype.

    Backward: dx is contiguous (B, N, C_in) (what SDPA's backward wants), from a dy of either
    order without a copy (an expanded dy is made contiguous); d identity = dy; dW as in
    ``_weight_grad``.  Saves x and W only."""

    @staticmethod
    def forward(ctx, x, weight, bias, identity):
        rows, batch_major = _rows(x)
        B, N = x.shape[:2]
        id_rows, id_order = _rows(identity) if identity is not None else (None, None)
        if id_rows is not None and id_order == batch_major and identity.dtype == x.dtype:
            out = id_rows + bias if bias is not None else id_rows.clone()
            out.addmm_(rows, weight.t())  # identity + b + x W^T: one pass and one GEMM
            y = _view_like_rows(out, batch_major, B, N)
        else:  # one GEMM over x's rows, y laid out like x, then the residual in identity's layout
            out = torch.addmm(bias, rows, weight.t()) if bias is not None else rows.mm(weight.t())
            y = _view_like_rows(out, batch_major, B, N)
            if identity is not None and identity.dtype != x.dtype:  # mixed precision: a wider residual
                y = _add_in_blocks(identity, y)
            elif identity is not None:
                y = torch.add(identity, y, out=torch.empty_like(identity))
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        g = gy if gy.dtype == x.dtype else gy.to(x.dtype)  # a wider residual's gradient, cast once
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


def project(x, weight, bias=None, identity=None):
    """identity + x W^T + b (identity optional), x (B, N, C_in) -> (B, N, C_out): ``_Projection``
    where it applies (autograd on, layouts it takes), else plain traceable ops (``linear``, still
    without a layout copy of x).  Under autocast an ``x`` in autocast's dtype runs with W and b
    cast to it (what ``F.linear`` does); a residual of another dtype is then added to the
    projection (identity + y in the promoted dtype, as ``identity + out_proj(out)`` gives)."""
    rows, _ = _rows(x)
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device):
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    lean = (
        rows is not None
        and torch.is_grad_enabled()
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == x.dtype)
        and (identity is None or _rows(identity)[0] is not None)
    )
    if lean:
        with torch.autocast(device, enabled=False):
            return _Projection.apply(x, weight, bias, identity)
    y = linear(x, weight, bias)
    return y if identity is None else identity + y


# ---------------------------------------------------------------- dtypes
def information_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype steps 1-6 run in for keys ``x``: float64 for float64, else float32 (1e-8
    underflows in float16, -0 log2 0 would be NaN)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype steps 6-8 run in for an input ``x``: autocast's dtype for a float32 ``x`` where
    autocast is on for its device (what ``F.linear`` would cast to), else ``x``'s own dtype."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


# ---------------------------------------------------------------- steps 6-7
def pool(smoothed, features, seg, backend: str, max_clusters: int):
    """Steps 6-7 for any (B, N, *) tensors (keys, values, extras): ``enact_ops.segment_softmax_pool``
    in their promoted dtype, each pooled output returned in its own tensor's dtype.  Returns
    (pooled list, weights, cluster_mask)."""
    common = functools.reduce(torch.promote_types, [f.dtype for f in features])
    pooled, weights, cluster_mask = enact_ops.segment_softmax_pool(
        smoothed, [f.to(common) for f in features], seg, backend=backend, max_clusters=max_clusters
    )
    return [p.to(f.dtype) for p, f in zip(pooled, features)], weights, cluster_mask


def shared_path_applies(key, value, key_pos, backend: str) -> bool:
    """True where ``pool_shared_key_value`` runs: floating key and value of one shape with unit
    channel stride, a key_pos of that shape (or None), and the compiled kernels for the device.
    Any floating dtype (float32 / float64, bfloat16 / float16 under mixed precision)."""
    return (
        key.is_floating_point()
        and value.is_floating_point()
        and value.shape == key.shape
        and (key_pos is None or key_pos.shape == key.shape)
        and enact_ops.use_compiled(backend, key.device)
    )


def pool_shared_key_value(key, value, key_pos, w_prob: nn.Linear, information, seg, max_clusters: int):
    """Steps 6-7 (K_cl, V_cl and the weights w) for key = value + key_pos on the registered
    operator ``torch.ops.enact_ops.pool_shared_key_value`` (``enact_ops/shared_pooling.py``): the
    gradients of the keys -- through the pooling and through W_prob's logits -- go to ``value`` /
    ``key_pos`` / ``w_prob`` in one (B, N, C) buffer.  ``key`` in the dtype the pooling runs in
    (``value`` is cast to it); ``information`` = (smoothed, probs, valid, taps) of steps 1-4
    (float32, float64 for float64 features), computed without autograd.  Returns ([pooled key,
    pooled value] (B, M_max, C) each, the weights (B, N), the cluster mask (B, M_max))."""
    smoothed, probs, valid, taps = information
    value = value.to(key.dtype)
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    pooled_key, pooled_value, weights = torch.ops.enact_ops.pool_shared_key_value(
        key, value, key_pos, w_prob.weight, w_prob.bias, smoothed, probs, valid, taps,
        seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets, max_clusters,
    )
    return [pooled_key, pooled_value], weights, seg.cluster_mask(max_clusters)


def add_hook(hooks: dict, hook) -> RemovableHandle:
    """Register ``hook`` in ``hooks`` (an OrderedDict, as nn.Module's hooks); the handle removes it."""
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle


# ---------------------------------------------------------------- unclustered tail (PnP-DETR)
def split_tail(tail: int, key, value, key_pos, key_padding_mask):
    """The last ``tail`` keys and values kept out of the clustering: ((key, value, key_pos,
    key_padding_mask) without them, (kept key, kept value) or None when ``tail`` is 0)."""
    if not tail:
        return (key, value, key_pos, key_padding_mask), None
    cut = [None if t is None else t[:, :-tail] for t in (key, value, key_pos, key_padding_mask)]
    return tuple(cut), (key[:, -tail:], value[:, -tail:])


def append_tail(key, value, cluster_mask, kept):
    """The kept keys and values (``split_tail``) as clusters of their own after the pooled ones,
    in the pooled outputs' dtype: (B, M_max + T, C) each and the (B, M_max + T) cluster mask."""
    if kept is None:
        return key, value, cluster_mask
    kept_key, kept_value = kept
    mask = cluster_mask.new_zeros(cluster_mask.shape[0], kept_key.shape[1])
    return (torch.cat([key, kept_key.to(key.dtype)], 1), torch.cat([value, kept_value.to(value.dtype)], 1),
            torch.cat([cluster_mask, mask], 1))


# ---------------------------------------------------------------- step 8, lean layout
def attend_clusters(module, query, key, value, cluster_mask, identity):
    """identity + proj_drop(W_o softmax(Q K_cl^T / sqrt(d) + mask) V_cl) for ``module``
    (a ``MultiheadAttention``): query (B, N, C), key / value (B, M, C), cluster_mask (B, M) bool.
    The queries' projections, the attention output and the output projection keep the layout of
    ``query`` (for DETR's sequence-first input, a transposed view of an (N, B, C) tensor), so no
    full-size copy is made or kept for backward.  Returns (B, N, C) if ``module.batch_first``
    else (N, B, C)."""
    attn = module.attn
    bsz, tgt_len, embed_dim = query.shape
    src_len = key.shape[1]
    heads = attn.num_heads
    head_dim = embed_dim // heads
    dropout_p = attn.dropout if module.training else 0.0
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    q = project(query, w_q, b_q).view(bsz, tgt_len, heads, head_dim).transpose(1, 2)  # (B, h, N, d)
    k = F.linear(key, w_k, b_k).view(bsz, src_len, heads, head_dim).transpose(1, 2)  # (B, h, M, d)
    v = F.linear(value, w_v, b_v).view(bsz, src_len, heads, head_dim).transpose(1, 2)  # (B, h, M, d)
    mask = None if cluster_mask is None else key_padding_bias(cluster_mask, q.dtype)  # (B, 1, 1, M)
    out = attend_heads(q, k, v, mask, dropout_p, module.attn_implementation)  # (B, h, N, d)
    out = out.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)  # a view: out is laid out like q
    if not module.batch_first:
        identity = identity.transpose(0, 1)  # (B, N, C)
    w_o, b_o = attn.out_proj.weight, attn.out_proj.bias
    if module.proj_drop.p > 0.0 and module.training:
        out = identity + module.proj_drop(project(out, w_o, b_o))
    else:  # the residual fused into the output projection
        out = project(out, w_o, b_o, identity)
    return out if module.batch_first else out.transpose(0, 1)
