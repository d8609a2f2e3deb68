"""torch.library.opcheck for every operator of torch.ops.enact_ops (schema, fake implementations
with data-dependent output sizes, autograd registration, AOT dispatch with dynamic shapes), on CPU
with small inputs; the autograd formula registered for the pooling against the reference."""
import pytest
import torch
from torch.library import opcheck

import enact_ops
from enact_ops import segment_runs, segment_softmax_pool

pytestmark = pytest.mark.skipif(not enact_ops.compiled_available("cpu"), reason="enact_ops._C is not built")

ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
B, N, C = 3, 11, 4


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sign = torch.rand(B, N, generator=g) > 0.5
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, ::3] = True  # scattered pads
    mask[2] = True  # a row without a valid token
    scores = torch.randn(B, N, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, C, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, N, C + 2, generator=g, dtype=torch.float64).to(dtype)
    seg = segment_runs(sign, mask)
    return sign, mask, scores.to(torch.float64 if dtype == torch.float64 else torch.float32), k, v, seg


def _csr(seg):
    return (seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets)


def _check(op, args):
    results = opcheck(op, args, test_utils=ALL_UTILS)
    assert set(results) == set(ALL_UTILS) and all(r == "SUCCESS" for r in results.values()), results


def _op_names():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("enact_ops::"))


def test_every_operator_is_covered():
    """The cases below name every operator the extension registers (a new op needs its opcheck)."""
    assert _op_names() == sorted(CASES)


def _segment_runs_cases():
    sign, mask, *_ = _inputs()
    yield sign, ~mask
    yield torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)
    sizes = enact_ops.runs_sizes(*enact_ops.read_row_sizes(sign.shape, ~mask, sign))
    yield sign, ~mask, sizes.num_segments, sizes.num_tokens  # the sizes given: static output sizes


def _segment_uniform_cases():
    _, mask, *_ = _inputs()
    for chunk in (1, 3, 50):
        yield ~mask, chunk
        sizes = enact_ops.uniform_sizes(enact_ops.read_row_sizes(mask.shape, ~mask)[0], chunk)
        yield ~mask, chunk, sizes.num_segments, sizes.num_tokens


def _forward_cases():
    _, _, scores, k, v, seg = _inputs()
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    yield grad(scores), [grad(k), grad(v)], *_csr(seg), seg.max_clusters
    # sequence-first memory viewed as (B, N, C); only one feature requires grad
    k_seq_first = k.transpose(0, 1).contiguous().transpose(0, 1)
    yield scores, [k_seq_first.requires_grad_(), v], *_csr(seg), seg.max_clusters + 2
    _, _, scores32, k16, v16, seg = _inputs(torch.bfloat16)
    yield grad(scores32), [grad(k16), grad(v16)], *_csr(seg), seg.max_clusters


def _backward_cases():
    _, _, scores, k, v, seg = _inputs()
    (pk, pv), weights = torch.ops.enact_ops.segment_softmax_pool_forward(scores, [k, v], *_csr(seg), seg.max_clusters)
    yield [torch.randn_like(pk), torch.randn_like(pv)], [k, v], weights, *_csr(seg)
    yield [torch.randn_like(pv)], [v.transpose(0, 1).contiguous().transpose(0, 1)], weights, *_csr(seg)


def _backward_sum_cases():
    _, _, scores, k, _, seg = _inputs()
    v = torch.randn_like(k)
    (pk, pv), weights = torch.ops.enact_ops.segment_softmax_pool_forward(scores, [k, v], *_csr(seg), seg.max_clusters)
    yield [torch.randn_like(pk), torch.randn_like(pv)], [k, v], weights, *_csr(seg)
    seq_first = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (k, v)]  # the output keeps this layout
    yield [torch.randn_like(pk), torch.randn_like(pv)], seq_first, weights, *_csr(seg)
    yield [torch.randn_like(pk[:, :, :2])], [k[:, :, :2]], weights, *_csr(seg)  # non-dense: contiguous output


def _taps(dtype, radius=2):
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    return torch.exp(-(x**2) / 2.0)


def _information_cases():
    _, mask, scores, *_ = _inputs()
    yield scores.clone().requires_grad_(), ~mask, _taps(torch.float64)  # a row without a valid token
    yield scores.float(), None, _taps(torch.float32, radius=0)  # nothing padded, one tap
    yield scores[:, :2].contiguous(), ~mask[:, :2], _taps(torch.float64, radius=5)  # taps wider than a row


def _information_backward_cases():
    _, mask, scores, *_ = _inputs()
    _, _, probs, _, _ = torch.ops.enact_ops.smoothed_information(scores, ~mask, _taps(torch.float64))
    yield torch.randn_like(scores), probs, ~mask, _taps(torch.float64)


def _shared_pool_cases():
    """Encoder self-attention's steps 6-7 (key = value + key_pos) in every dtype the operator takes:
    the features in float64 / float32 / bfloat16 / float16, steps 1-4 in float64 / float32."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        g = torch.Generator().manual_seed(1)
        _, mask, *_ = _inputs()
        value = torch.randn(B, N, C, generator=g, dtype=torch.float64)
        pos = torch.randn(B, N, C, generator=g, dtype=torch.float64)
        weight = torch.randn(1, C, generator=g, dtype=torch.float64).to(compute)
        bias = torch.randn(1, generator=g, dtype=torch.float64).to(compute)
        key = (value + pos).to(dtype)
        logits = (key.to(compute) @ weight[0] + bias).contiguous()
        taps = _taps(compute)
        smoothed, sign, probs, _, _ = torch.ops.enact_ops.smoothed_information(logits, ~mask, taps)
        seg = segment_runs(sign, mask)
        grad = lambda t: t.clone().requires_grad_()  # noqa: E731
        yield (key, grad(value.to(dtype)), grad(pos.to(compute)), grad(weight), grad(bias), smoothed, probs, ~mask,
               taps, *_csr(seg), seg.max_clusters)
        if dtype == torch.float32:  # no key_pos, no bias, nothing padded
            smoothed, sign, probs, _, _ = torch.ops.enact_ops.smoothed_information(logits, None, taps)
            seg = segment_runs(sign)
            yield (value.to(dtype), grad(value.to(dtype)), None, grad(weight), None, smoothed, probs, None, taps,
                   *_csr(seg), seg.max_clusters)


CASES = {
    "pool_shared_key_value": _shared_pool_cases,
    "smoothed_information": _information_cases,
    "smoothed_information_backward": _information_backward_cases,
    "segment_runs": _segment_runs_cases,
    "segment_uniform": _segment_uniform_cases,
    "segment_softmax_pool_forward": _forward_cases,
    "segment_softmax_pool_backward": _backward_cases,
    "segment_softmax_pool_backward_sum": _backward_sum_cases,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op = getattr(torch.ops.enact_ops, name).default
    cases = list(CASES[name]())
    assert cases
    for args in cases:
        _check(op, args)


def test_information_backward_is_first_order():
    grad, probs, valid, taps = next(_information_backward_cases())
    out = torch.ops.enact_ops.smoothed_information_backward(grad.requires_grad_(), probs, valid, taps)
    with pytest.raises(RuntimeError, match="first-order backward"):
        out.sum().backward()


@pytest.mark.parametrize("name", ["segment_softmax_pool_backward", "segment_softmax_pool_backward_sum"])
def test_backward_operators_are_first_order(name):
    """The backward operators have an autograd kernel (opcheck's registration test with inputs
    that require grad), and differentiating through them is a clear error, never a silently
    missing second-order term."""
    grad_pooled, features, weights, *csr = next(CASES[name]())
    grad_pooled = [g.requires_grad_() for g in grad_pooled]
    op = getattr(torch.ops.enact_ops, name).default
    assert opcheck(op, (grad_pooled, features, weights, *csr), test_utils="test_autograd_registration") == {
        "test_autograd_registration": "SUCCESS"}
    out = op(grad_pooled, features, weights, *csr)
    with pytest.raises(RuntimeError, match="first-order backward"):
        out[1].sum().backward() if isinstance(out[1], torch.Tensor) else out[1][0].sum().backward()


def test_registered_autograd_matches_the_reference():
    """torch.ops.enact_ops.segment_softmax_pool_forward called directly: its registered gradient
    equals the reference's, an unused pooled output gives its feature no gradient, and the
    weights are not differentiable."""
    _, _, scores, k, v, seg = _inputs()
    got, ref = {}, {}
    for store, call in ((got, "op"), (ref, "reference")):
        s, kk, vv = (t.clone().requires_grad_() for t in (scores, k, v))
        if call == "op":
            (pk, pv), weights = torch.ops.enact_ops.segment_softmax_pool_forward(s, [kk, vv], *_csr(seg), seg.max_clusters)
            assert not weights.requires_grad
        else:
            (pk, pv), _, _ = segment_softmax_pool(s, [kk, vv], seg, backend="reference")
        (pk * torch.linspace(-1, 1, C, dtype=pk.dtype)).sum().backward()  # pv unused
        store.update(pk=pk.detach(), grad_scores=s.grad, grad_k=kk.grad, grad_v=vv.grad)
    assert got["grad_v"] is None
    for key in ("pk", "grad_scores", "grad_k"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-12)
    inputs = tuple(t.clone().requires_grad_() for t in (scores, k, v))
    assert torch.autograd.gradcheck(
        lambda s, kk, vv: tuple(torch.ops.enact_ops.segment_softmax_pool_forward(
            s, [kk, vv], *_csr(seg), seg.max_clusters)[0]), inputs)
