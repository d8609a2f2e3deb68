"""The memory and speed machinery behind ``EnactAttention``; the math is in :mod:`.enact`.

Every function here computes exactly what a plain composition of the reference ops computes
(tests/test_enact.py checks values and gradients); what it changes is which tensors are made
and kept for backward:

* ``project(x, W, b, identity)``  y = identity + x W^T + b without a layout copy of x: DETR's
  sequence-first (N, B, C) tensors are projected in place, and the residual ``identity`` is
  fused into the output projection (one GEMM, no separate projection output).
* ``pool_shared_key_value``  steps 6-7 for encoder self-attention, where key = value + key_pos:
  one (B, N, C) input-gradient for everything that flows into ``value`` (pooled keys, pooled
  values and the W_prob logits) instead of three.
* ``attend_clusters``  step 8 with the queries' projections, the attention output and the
  output projection laid out like the query.

The small interface ``EnactClustering`` / ``EnactAttention`` use: ``shared_path_applies``,
``pool_shared_key_value``, ``project``, ``linear``, ``token_logits`` and ``attend_clusters``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import enact_ops

from .attention import attend_heads, key_padding_bias

__all__ = [
    "attend_clusters", "linear", "pool_shared_key_value", "project", "shared_path_applies", "token_logits",
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


class _Projection(torch.autograd.Function):
    """y = x W^T (+ b) (+ identity) for x (B, N, C_in) contiguous or the (B, N, C) view of a
    contiguous (N, B, C) tensor, with no copy of x made or kept:

    * without ``identity``: y is laid out like x (one GEMM over x's rows);
    * with ``identity`` (B, N, C_out): y = identity + x W^T + b laid out like identity, in one GEMM
      with no separate projection output when identity lies in x's memory order.

    Backward: dx is contiguous (B, N, C_in) (what SDPA's backward wants), from a dy of either
    order without a copy (an expanded dy is made contiguous); d identity = dy; dW as in
    ``_weight_grad``.  Saves x and W only."""

    @staticmethod
    def forward(ctx, x, weight, bias, identity):
        rows, batch_major = _rows(x)
        B, N = x.shape[:2]
        id_rows, id_order = _rows(identity) if identity is not None else (None, None)
        if id_rows is not None and id_order == batch_major:
            out = id_rows + bias if bias is not None else id_rows.clone()
            out.addmm_(rows, weight.t())  # identity + b + x W^T: one pass and one GEMM
            y = _view_like_rows(out, batch_major, B, N)
        else:  # one GEMM over x's rows, y laid out like x
            out = torch.addmm(bias, rows, weight.t()) if bias is not None else rows.mm(weight.t())
            y = _view_like_rows(out, batch_major, B, N)
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


def project(x, weight, bias=None, identity=None):
    """identity + x W^T + b (identity optional), x (B, N, C_in) -> (B, N, C_out): ``_Projection``
    where it applies (autograd on, no autocast, one dtype, layouts it takes), else plain
    traceable ops (``linear``, still without a layout copy of x)."""
    rows, _ = _rows(x)
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
    y = linear(x, weight, bias)
    return y if identity is None else identity + y


# ---------------------------------------------------------------- steps 6-7, fused backward
def shared_path_applies(key, value, key_pos, weight, backend: str) -> bool:
    """True where ``pool_shared_key_value`` runs: autograd on, float32 / float64 throughout, key
    and value of one shape with unit channel stride, and the compiled kernels for the device."""
    dtype = key.dtype
    return (
        torch.is_grad_enabled()
        and dtype in (torch.float32, torch.float64)
        and value.dtype == dtype
        and weight.dtype == dtype
        and value.shape == key.shape
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and (key_pos is None or (key_pos.shape == key.shape and key_pos.dtype == dtype))
        and enact_ops.use_compiled(backend, key.device)
    )


class _SharedKeyValuePooling(torch.autograd.Function):
    """Steps 6-7 for key = value + key_pos on the compiled kernels.

    ``key`` enters as data only; its gradients -- through the pooled keys and through W_prob's
    logits -- are returned for ``value`` (and ``key_pos``) and summed with the pooled values' in
    one buffer: the fused backward kernel writes w_i (dL/dK_c + dL/dV_c), and the W_prob term
    dL/dlogit_i W_prob is added in place.  ``information`` = (logits, smoothed): the (B, N) graph
    from the logits (a leaf) to the smoothed scores, recorded by the caller and differentiated
    here.  ``max_clusters``: M_max (the pooled width, known on the host).  Outputs: pooled key,
    pooled value (B, M_max, C), pooling weights (B, N)."""

    @staticmethod
    def forward(ctx, key, value, key_pos, weight, bias, information, seg, max_clusters):
        _, smoothed = information
        pooled, weights = torch.ops.enact_ops.segment_softmax_pool_forward(
            smoothed.detach().contiguous(), [key, value], seg.tokens, seg.seg_starts, seg.seg_batch,
            seg.row_offsets, max_clusters,
        )
        ctx.information, ctx.seg = information, seg
        ctx.save_for_backward(key, value, weights, weight)
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)
        return pooled[0], pooled[1], weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_key, grad_value, _):
        key, value, weights, weight = ctx.saved_tensors
        logits, smoothed = ctx.information
        seg = ctx.seg
        need_value, need_pos, need_weight, need_bias = ctx.needs_input_grad[1:5]
        grads = [(g, x) for g, x in ((grad_key, key), (grad_value, value)) if g is not None]
        if not grads:
            return (None,) * 8
        grad_scores, grad_sum = enact_ops.ops.segment_softmax_pool_backward_sum(
            [g for g, _ in grads], [x for _, x in grads], weights, seg
        )
        # (B, N), 0 at pads; the small graph lives as long as ctx (the outer graph may be retained)
        (grad_logits,) = torch.autograd.grad(smoothed, logits, grad_scores, retain_graph=True)
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
        return None, (grad_sum if need_value else None), grad_pos, grad_w, grad_b, None, None, None


def pool_shared_key_value(key, value, key_pos, w_prob: nn.Linear, information, seg, max_clusters=None):
    """Steps 6-7 (K_cl, V_cl and the weights w) for key = value + key_pos, with the gradients of
    the keys and of the W_prob logits (``information`` = (logits leaf, smoothed)) sent to
    ``value`` / ``key_pos`` / ``w_prob`` in one (B, N, C) buffer.  Same values and gradients as
    ``enact_ops.segment_softmax_pool(smoothed, [key, value], seg, max_clusters=max_clusters)``;
    ``max_clusters`` (M_max) read from ``seg`` when None (a host sync on GPUs)."""
    width = seg.max_clusters if max_clusters is None else max_clusters
    return _SharedKeyValuePooling.apply(
        key.detach(), value, key_pos, w_prob.weight, w_prob.bias, information, seg, width
    )


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
