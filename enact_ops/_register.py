"""Python registrations of the compiled ``torch.ops.enact_ops`` operators with torch.library, made
when the extension loads (``enact_ops.ops``):

* fake (meta) implementations, so that FakeTensor, torch.compile and torch.export know every
  output's shape, dtype and strides without running a kernel.  The segmentations' CSR tensors
  have data-dependent sizes (T clustered tokens, S segments): the caller's ``num_tokens`` /
  ``num_segments`` when given, else new unbacked sizes from
  ``torch.library.get_ctx().new_dynamic_size()``.
* autograd: ``segment_softmax_pool_forward`` is differentiable in ``scores`` and ``features``
  (``torch.library.register_autograd``; the backward calls ``segment_softmax_pool_backward`` on the
  pooled outputs that received a gradient, so an unused output costs no backward work and its
  feature gets no gradient); the two backward operators are first-order only: their autograd
  formula raises (a clear error instead of torch's silent "no autograd kernel" fallback).
  ``segment_runs`` / ``segment_uniform`` take bool / int inputs and are not differentiable.
  ``smoothed_information`` is differentiable in ``logits`` through its smoothed output (the
  backward calls ``smoothed_information_backward`` with the saved softmax); its other outputs
  are not differentiable.

``pool_shared_key_value`` (``shared_pooling.py``) is defined here in Python on top of the
compiled kernels, with its own fake implementation and autograd formula.

Every operator passes ``torch.library.opcheck`` (tests/test_opcheck.py).
"""
import torch

__all__ = ["register"]

_REGISTERED = False


def _size_bound(*sizes):
    """The product of sizes as a static bound for new_dynamic_size, None where a size is symbolic."""
    bound = 1
    for s in sizes:
        if not isinstance(s, int):
            return None
        bound *= s
    return bound


def _dynamic_size(bound):
    ctx = torch.library.get_ctx()
    return ctx.new_dynamic_size(max=bound) if bound is not None else ctx.new_dynamic_size()


def _fake_segmentation(valid, num_segments=None, num_tokens=None):
    """(cluster_ids (B, N), num_clusters (B,), tokens (T,), token_segment (T,), seg_starts (S + 1,),
    seg_batch (S,), row_offsets (B + 1,)), int64, with T, S <= B * N the given sizes or
    data-dependent."""
    torch._check(valid.dim() == 2, lambda: f"enact_ops: valid must be (B, N), got {valid.dim()} dims")
    torch._check(valid.dtype == torch.bool, lambda: f"enact_ops: valid must be bool, got {valid.dtype}")
    torch._check((num_segments is None) == (num_tokens is None),
                 lambda: "enact_ops: give both num_segments and num_tokens, or neither")
    B, N = valid.shape
    if num_segments is not None:
        torch._check(num_segments >= 0 and num_tokens >= 0, lambda: "enact_ops: sizes must be >= 0")
    else:
        bound = _size_bound(B, N)
        num_tokens, num_segments = _dynamic_size(bound), _dynamic_size(bound)

    def new(*shape):
        return valid.new_empty(shape, dtype=torch.int64)

    return (new(B, N), new(B), new(num_tokens), new(num_tokens), new(num_segments + 1), new(num_segments),
            new(B + 1))


def _check_pool_shapes(scores, features):
    torch._check(scores.dim() == 2, lambda: "enact_ops: scores must be a (B, N) tensor")
    torch._check(scores.dtype in (torch.float32, torch.float64),
                 lambda: f"enact_ops: scores must be float32 or float64, got {scores.dtype}")
    for f, x in enumerate(features):
        torch._check(x.dim() == 3 and x.shape[0] == scores.shape[0] and x.shape[1] == scores.shape[1],
                     lambda: f"enact_ops: features[{f}] must be (B, N, C) like scores")


def _features_grad_like(x):
    """The layout of the per-feature gradients: contiguous (B, N, C) in the feature's dtype."""
    return x.new_empty(x.shape)


def register():
    """Register the fake implementations and autograd formulas (once; needs the extension)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True

    @torch.library.register_fake("enact_ops::segment_runs")
    def _segment_runs_fake(sign, valid, num_segments=None, num_tokens=None):
        torch._check(sign.shape == valid.shape, lambda: "enact_ops: valid must have the shape of sign")
        return _fake_segmentation(valid, num_segments, num_tokens)

    @torch.library.register_fake("enact_ops::segment_uniform")
    def _segment_uniform_fake(valid, chunk, num_segments=None, num_tokens=None):
        torch._check(chunk >= 1, lambda: f"enact_ops.segment_uniform: chunk must be >= 1, got {chunk}")
        return _fake_segmentation(valid, num_segments, num_tokens)

    @torch.library.register_fake("enact_ops::segment_softmax_pool_forward")
    def _pool_forward_fake(scores, features, tokens, seg_starts, seg_batch, row_offsets, max_clusters):
        _check_pool_shapes(scores, features)
        torch._check(max_clusters >= 0, lambda: "enact_ops: max_clusters must be >= 0")
        B = scores.shape[0]
        pooled = [x.new_empty((B, max_clusters, x.shape[2])) for x in features]
        return pooled, scores.new_empty(scores.shape)

    @torch.library.register_fake("enact_ops::segment_softmax_pool_backward")
    def _pool_backward_fake(grad_pooled, features, weights, tokens, seg_starts, seg_batch, row_offsets):
        _check_pool_shapes(weights, features)
        torch._check(len(grad_pooled) == len(features),
                     lambda: "enact_ops: one grad_pooled tensor per feature tensor expected")
        return weights.new_empty(weights.shape), [_features_grad_like(x) for x in features]

    @torch.library.register_fake("enact_ops::segment_softmax_pool_backward_sum")
    def _pool_backward_sum_fake(grad_pooled, features, weights, tokens, seg_starts, seg_batch, row_offsets):
        _check_pool_shapes(weights, features)
        torch._check(len(features) > 0 and len(grad_pooled) == len(features),
                     lambda: "enact_ops: one grad_pooled tensor per feature tensor expected")
        x = features[0]
        grad_sum = torch.empty_like(x)  # features[0]'s layout, as the kernels allocate it
        if x.shape[2] != 0 and grad_sum.stride(2) != 1:
            grad_sum = x.new_empty(x.shape)
        return weights.new_empty(weights.shape), grad_sum

    @torch.library.register_fake("enact_ops::smoothed_information")
    def _information_fake(logits, valid, taps):
        torch._check(logits.dim() == 2, lambda: "enact_ops.smoothed_information: logits must be (B, N)")
        torch._check(valid is None or valid.shape == logits.shape,
                     lambda: "enact_ops.smoothed_information: valid must have the logits' shape")
        torch._check(taps.dim() == 1, lambda: "enact_ops.smoothed_information: taps must be 1-D")
        B = logits.shape[0]
        rows = logits.new_empty(logits.shape)
        return (rows, logits.new_empty(logits.shape, dtype=torch.bool), torch.empty_like(rows),
                logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.int64))

    @torch.library.register_fake("enact_ops::smoothed_information_backward")
    def _information_backward_fake(grad_smoothed, probs, valid, taps):
        torch._check(grad_smoothed.shape == probs.shape,
                     lambda: "enact_ops.smoothed_information_backward: grad_smoothed must be shaped like probs")
        return probs.new_empty(probs.shape)

    # -- autograd --------------------------------------------------------------------------------
    def _information_setup_context(ctx, inputs, output):
        _, valid, taps = inputs
        _, sign, probs, lengths, runs = output
        ctx.save_for_backward(probs, valid, taps)
        ctx.mark_non_differentiable(sign, probs, lengths, runs)
        ctx.set_materialize_grads(False)

    def _information_backward(ctx, grad_smoothed, *_):
        probs, valid, taps = ctx.saved_tensors
        if grad_smoothed is None or not ctx.needs_input_grad[0]:
            return None, None, None
        grad = torch.ops.enact_ops.smoothed_information_backward(grad_smoothed.contiguous(), probs, valid, taps)
        return grad, None, None

    torch.library.register_autograd("enact_ops::smoothed_information", _information_backward,
                                    setup_context=_information_setup_context)

    def _pool_setup_context(ctx, inputs, output):
        scores, features, tokens, seg_starts, seg_batch, row_offsets, _ = inputs
        _, weights = output
        ctx.save_for_backward(weights, tokens, seg_starts, seg_batch, row_offsets, *features)
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)  # an unused pooled output: None, no backward work

    def _pool_backward(ctx, grad_pooled, _grad_weights):
        """Work and a gradient only for the features whose pooled output got a gradient (None:
        unused) and that need one."""
        weights, tokens, seg_starts, seg_batch, row_offsets, *features = ctx.saved_tensors
        used = [f for f, g in enumerate(grad_pooled or ()) if g is not None]
        grad_scores, grad_features = None, [None] * len(features)
        if used:
            grad_scores, grads_used = torch.ops.enact_ops.segment_softmax_pool_backward(
                [grad_pooled[f] for f in used], [features[f] for f in used], weights,
                tokens, seg_starts, seg_batch, row_offsets,
            )
            for f, g in zip(used, grads_used):
                grad_features[f] = g if ctx.needs_input_grad[1][f] else None
            grad_scores = grad_scores if ctx.needs_input_grad[0] else None
        return grad_scores, grad_features, None, None, None, None, None

    torch.library.register_autograd("enact_ops::segment_softmax_pool_forward", _pool_backward,
                                    setup_context=_pool_setup_context)

    def _first_order_only(name):
        def backward(ctx, *grads):
            raise RuntimeError(f"enact_ops.{name} is a first-order backward: its forward is not twice "
                               "differentiable (no create_graph / double backward)")

        def setup_context(ctx, inputs, output):
            pass

        torch.library.register_autograd(f"enact_ops::{name}", backward, setup_context=setup_context)

    from . import shared_pooling

    shared_pooling.define()  # enact_ops::pool_shared_key_value (steps 6-7 of encoder self-attention)

    _first_order_only("segment_softmax_pool_backward")
    _first_order_only("segment_softmax_pool_backward_sum")
    _first_order_only("smoothed_information_backward")
