"""``enact_ops::pool_shared_key_value``: ENACT's steps 6-7 for encoder self-attention, where the
keys are the values plus a position embedding (key = value + key_pos), as one registered operator.

Forward (``segment_softmax_pool_forward`` on [key, value]):

    w_i = softmax_{j in c}(h~_j)_i,   K_cl[c] = sum_{i in c} w_i k_i,   V_cl[c] = sum_{i in c} w_i v_i

Backward, with the gradients of the key -- through the pooled keys and through W_prob's logits
l_i = w_prob . k_i + b that steps 1-4 turned into h~ -- sent to ``value`` and ``key_pos`` (``key``
itself is data: its gradient is None), all in one (B, N, C) buffer:

    dL/dv_i   = w_i (dL/dK_cl[c] + dL/dV_cl[c]) + dL/dl_i w_prob
    dL/dpos_i = w_i dL/dK_cl[c] + dL/dl_i w_prob
    dL/dw_prob = sum_i dL/dl_i k_i,   dL/db = sum_i dL/dl_i

where dL/dh~ comes from ``segment_softmax_pool_backward_sum`` and dL/dl from
``smoothed_information_backward`` (the softmax ``probs`` that steps 1-4 returned).  Everything the
backward reads is saved with ``save_for_backward``, so saved-tensor hooks (activation
checkpointing, ``save_on_cpu``) see all of it; no graph from the forward is kept.

Dtypes: ``key`` and ``value`` share one floating dtype, the dtype the pooling and the pooled
outputs run in (float32 / float64, or bfloat16 / float16 under mixed precision, with float32
accumulation inside the kernels); ``smoothed``, ``probs``, ``taps``, the weights and the logits'
gradient are float32 (float64 for float64 features); ``key_pos`` and ``weight`` may be of another
floating dtype (their gradients are returned in their own).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["define"]

_DEFINED = False
OP_NAME = "enact_ops::pool_shared_key_value"


def _check_inputs(key, value, key_pos, weight, smoothed, probs):
    torch._check(key.dim() == 3 and value.shape == key.shape,
                 lambda: f"enact_ops.pool_shared_key_value: value must be shaped like key {tuple(key.shape)}, "
                 f"got {tuple(value.shape)}")
    torch._check(value.dtype == key.dtype,
                 lambda: f"enact_ops.pool_shared_key_value: key and value must share one dtype, got {key.dtype} "
                 f"and {value.dtype}")
    torch._check(key_pos is None or key_pos.shape == key.shape,
                 lambda: "enact_ops.pool_shared_key_value: key_pos must be shaped like key")
    torch._check(weight.dim() == 2 and weight.shape[0] == 1 and weight.shape[1] == key.shape[2],
                 lambda: f"enact_ops.pool_shared_key_value: weight must be (1, C) = (1, {key.shape[2]}), "
                 f"got {tuple(weight.shape)}")
    torch._check(smoothed.shape == key.shape[:2] and probs.shape == smoothed.shape,
                 lambda: "enact_ops.pool_shared_key_value: smoothed and probs must be (B, N) like key")
    torch._check(smoothed.dtype == probs.dtype,
                 lambda: "enact_ops.pool_shared_key_value: smoothed and probs must share one dtype")


def define():
    """Define the operator, its fake implementation and its autograd formula (once; needs the
    compiled extension: the forward and backward call its kernels)."""
    global _DEFINED
    if _DEFINED:
        return
    _DEFINED = True

    @torch.library.custom_op(OP_NAME, mutates_args=())
    def pool_shared_key_value(
        key: Tensor, value: Tensor, key_pos: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
        smoothed: Tensor, probs: Tensor, valid: Optional[Tensor], taps: Tensor,
        tokens: Tensor, seg_starts: Tensor, seg_batch: Tensor, row_offsets: Tensor, max_clusters: int,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        _check_inputs(key, value, key_pos, weight, smoothed, probs)
        pooled, weights = torch.ops.enact_ops.segment_softmax_pool_forward(
            smoothed, [key, value], tokens, seg_starts, seg_batch, row_offsets, max_clusters
        )
        return pooled[0], pooled[1], weights  # (B, M_max, C) x 2, (B, N)

    @pool_shared_key_value.register_fake
    def _fake(key, value, key_pos, weight, bias, smoothed, probs, valid, taps,
              tokens, seg_starts, seg_batch, row_offsets, max_clusters):
        _check_inputs(key, value, key_pos, weight, smoothed, probs)
        torch._check(max_clusters >= 0, lambda: "enact_ops: max_clusters must be >= 0")
        B, _, C = key.shape
        return key.new_empty((B, max_clusters, C)), value.new_empty((B, max_clusters, C)), torch.empty_like(smoothed)

    def setup_context(ctx, inputs, output):
        key, value, key_pos, weight, bias, _, probs, valid, taps, tokens, seg_starts, seg_batch, row_offsets, _ = inputs
        weights = output[2]
        ctx.save_for_backward(key, value, weight, weights, probs, valid, taps, tokens, seg_starts, seg_batch,
                              row_offsets)
        ctx.key_pos_dtype = None if key_pos is None else key_pos.dtype  # metadata only, no tensors on ctx
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)  # an unused pooled output: None, no work for it

    def backward(ctx, grad_key, grad_value, _grad_weights):
        key, value, weight, weights, probs, valid, taps, *seg = ctx.saved_tensors
        need_value, need_pos, need_weight, need_bias = ctx.needs_input_grad[1:5]
        used = [(g, x) for g, x in ((grad_key, key), (grad_value, value)) if g is not None]
        none = (None,) * 14
        if not used or not any((need_value, need_pos, need_weight, need_bias)):
            return none
        # dL/dh~ (B, N) and w_i (dL/dK_cl + dL/dV_cl) (B, N, C) in the features' dtype: one kernel
        grad_scores, grad_sum = torch.ops.enact_ops.segment_softmax_pool_backward_sum(
            [g for g, _ in used], [x for _, x in used], weights, *seg
        )
        # dL/dl (B, N) in the scores' dtype, through steps 1-4 (softmax, -p log2 p, smoothing)
        grad_logits = torch.ops.enact_ops.smoothed_information_backward(grad_scores, probs, valid, taps)
        logit_term = (grad_logits.unsqueeze(-1), weight.view(1, 1, -1))  # dL/dk through the logits
        grad_w = grad_b = grad_pos = None
        if need_weight:  # sum_i dL/dl_i k_i: one GEMM in the key's dtype (float32 accumulation)
            grad_w = torch.einsum("bn,bnc->c", grad_logits.to(key.dtype), key).to(weight.dtype).view(1, -1)
        if need_bias:
            grad_b = grad_logits.sum().reshape(1)
        if need_pos:  # dL/dkey_pos = dL/dkey: its own buffer (a learned position embedding)
            if grad_key is not None:
                _, grad_pos = torch.ops.enact_ops.segment_softmax_pool_backward_sum([grad_key], [key], weights, *seg)
                grad_pos = grad_pos.to(ctx.key_pos_dtype).addcmul_(*logit_term)
            else:
                grad_pos = (logit_term[0] * logit_term[1]).to(ctx.key_pos_dtype)
        if need_value:  # in the features' dtype: a mixed-dtype in-place op would copy grad_sum on CPU
            grad_sum.addcmul_(logit_term[0].to(grad_sum.dtype), logit_term[1].to(grad_sum.dtype))
        grads = list(none)
        grads[1:5] = (grad_sum if need_value else None), grad_pos, grad_w, grad_b
        return tuple(grads)

    pool_shared_key_value.register_autograd(backward, setup_context=setup_context)
