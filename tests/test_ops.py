"""enact_ops: compiled kernels against the pure-PyTorch reference, gradients, bad input."""
import warnings

import pytest
import torch

import enact_ops
from enact_ops import reference, segment_runs, segment_softmax_pool, segment_uniform
from enact_ops.segmentation import check_rows_have_tokens, count_runs

# every device test on the CPU, and on the GPU where one is present (marked ``cuda``: `pytest -m cuda`)
ON_GPU = [pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and enact_ops.compiled_available("cuda")), reason="no GPU with enact_ops CUDA kernels")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]
needs_compiled_cpu = pytest.mark.skipif(
    not enact_ops.compiled_available("cpu"), reason="enact_ops._C is not built"
)


def _batch(B, N, C, pad_rows=(), all_pad_rows=(), seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sign = torch.rand(B, N, generator=g) > 0.5
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in pad_rows:  # scattered pads, as DETR leaves at the end of every image row
        mask[b] = torch.rand(N, generator=g) < 0.3
    for b in all_pad_rows:
        mask[b] = True
    scores = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, N, C, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, N, C + 3, generator=g, dtype=torch.float64).to(dtype)
    return [t.to(device) for t in (sign, mask, scores, k, v)]


def _assert_same_segmentation(a, b):
    for name, x, y in zip(a._fields, a, b):
        assert torch.equal(x.cpu(), y.cpu()), name


SHAPES = [(1, 1, 4), (2, 7, 3), (3, 33, 8), (4, 129, 16), (2, 1000, 5)]
# ... and on the GPU at detector sizes too (rows longer than a CUDA block)
DEVICE_SHAPES = [("cpu", *s) for s in SHAPES] + [pytest.param("cuda", *s, marks=ON_GPU)
                                                  for s in SHAPES + [(8, 3400, 32), (2, 20000, 4)]]


@needs_compiled_cpu
@pytest.mark.parametrize("device,B,N,C", DEVICE_SHAPES)
def test_segment_runs_matches_reference(device, B, N, C):
    sign, mask, *_ = _batch(B, N, C, pad_rows=range(0, B, 2), all_pad_rows=[B - 1] if B > 2 else [], device=device)
    ours = segment_runs(sign, mask, backend="compiled")
    ref = segment_runs(sign, mask, backend="reference")
    _assert_same_segmentation(ours, ref)
    assert ours.cluster_ids.device.type == device


@needs_compiled_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 3, 8, 50])
def test_segment_uniform_matches_reference(device, chunk):
    _, mask, *_ = _batch(5, 61, 2, pad_rows=[0, 2], all_pad_rows=[4], device=device)
    _assert_same_segmentation(
        segment_uniform(mask, chunk, backend="compiled"), segment_uniform(mask, chunk, backend="reference")
    )


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_segment_runs_by_hand(backend):
    if backend == "compiled" and not enact_ops.compiled_available("cpu"):
        pytest.skip("enact_ops._C is not built")
    sign = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 0], [1, 0, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    # row 1: pads at 1 and 2 vanish, so tokens 0, 3, 4, 5 (all sign 1) form one run
    mask = torch.tensor([[0] * 8, [0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    seg = segment_runs(sign, mask, backend=backend)
    assert seg.cluster_ids.tolist() == [[0, 0, 1, 1, 1, 2, 3, 3], [0, -1, -1, 0, 0, 0, 1, 2]]
    assert seg.num_clusters.tolist() == [4, 3]
    assert seg.tokens.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15]
    assert seg.seg_starts.tolist() == [0, 2, 5, 6, 8, 12, 13, 14]
    assert seg.seg_batch.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert seg.row_offsets.tolist() == [0, 4, 7]
    assert seg.cluster_mask().tolist() == [[False] * 4, [False] * 3 + [True]]


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_segment_uniform_crop_and_chunk_rule(backend):
    if backend == "compiled" and not enact_ops.compiled_available("cpu"):
        pytest.skip("enact_ops._C is not built")
    # n = 11, L = 3: 11 mod 3 = 2, drop 1 at the start and 1 at the end, 3 chunks.
    # n = 2 < L: one chunk.  n = 0: none.
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[0] = False
    mask[1, :2] = False
    seg = segment_uniform(mask, 3, backend=backend)
    assert seg.cluster_ids[0].tolist() == [-1, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1]
    assert seg.cluster_ids[1].tolist() == [0, 0] + [-1] * 9
    assert seg.cluster_ids[2].tolist() == [-1] * 11
    assert seg.num_clusters.tolist() == [3, 1, 0]


def test_uniform_chunk_length_rounds_half_to_even():
    # row lengths 5 and 3 with 2 and 1 runs: mean(2.5, 3.0) = 2.75 -> 3; rows (5/2) alone -> 2
    sign = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert enact_ops.uniform_chunk_length(segment_runs(sign, mask)) == 3
    assert enact_ops.uniform_chunk_length(segment_runs(sign[:1], mask[:1])) == 2


def _backends():
    return ["reference"] + (["compiled"] if enact_ops.compiled_available("cpu") else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("B,N,C", SHAPES)
def test_sizes_read_once_build_the_same_segmentation(backend, B, N, C):
    """The host-side sizes (one read of the rows' lengths and runs) are the segmentation's: given
    to the ops, the same segmentation and pooling come out, and M_max is the pooled width."""
    sign, mask, scores, k, v = _batch(B, N, C, pad_rows=range(0, B, 2), all_pad_rows=[B - 1] if B > 2 else [])
    lengths, runs = enact_ops.read_row_sizes(sign.shape, ~mask, sign)
    seg = segment_runs(sign, mask, backend=backend)
    assert count_runs(sign, ~mask).tolist() == runs == seg.num_clusters.tolist()
    assert count_runs(sign).tolist() == segment_runs(sign, backend=backend).num_clusters.tolist()
    sizes = enact_ops.runs_sizes(lengths, runs)
    assert sizes == (seg.num_segments, seg.tokens.numel(), seg.max_clusters)
    _assert_same_segmentation(segment_runs(sign, mask, backend=backend, sizes=sizes), seg)
    for chunk in (1, 3, 50):
        useg = segment_uniform(mask, chunk, backend=backend)
        usizes = enact_ops.uniform_sizes(lengths, chunk)
        assert usizes == (useg.num_segments, useg.tokens.numel(), useg.max_clusters)
        _assert_same_segmentation(segment_uniform(mask, chunk, backend=backend, sizes=usizes), useg)
    if any(runs):
        assert enact_ops.chunk_length(lengths, runs) == enact_ops.uniform_chunk_length(seg)
    pooled, weights, cmask = segment_softmax_pool(scores, [k, v], seg, backend=backend)
    given = segment_softmax_pool(scores, [k, v], seg, backend=backend, max_clusters=sizes.max_clusters)
    for a, b in zip([*pooled, weights, cmask], [*given[0], given[1], given[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", _backends())
def test_wrong_sizes_are_refused(backend):
    """Sizes that are not the segmentation's are an error (CPU: checked on the host; the CUDA
    kernels assert them on the device), and so is a pooled width below a row's clusters."""
    sign, mask, scores, k, _ = _batch(3, 20, 4, pad_rows=[0])
    sizes = enact_ops.runs_sizes(*enact_ops.read_row_sizes(sign.shape, ~mask, sign))
    for wrong in (sizes._replace(num_segments=sizes.num_segments - 1), sizes._replace(num_tokens=sizes.num_tokens + 1)):
        with pytest.raises(RuntimeError, match="not the segmentation's"):
            segment_runs(sign, mask, backend=backend, sizes=wrong)
    usizes = enact_ops.uniform_sizes(enact_ops.read_row_sizes(sign.shape, ~mask)[0], 3)
    with pytest.raises(RuntimeError, match="not the segmentation's"):
        segment_uniform(mask, 3, backend=backend, sizes=usizes._replace(num_tokens=usizes.num_tokens - 1))
    with pytest.raises(TypeError, match="SegmentationSizes"):
        segment_runs(sign, mask, backend=backend, sizes=(1, 2, 3))
    with pytest.raises(ValueError, match="ints >= 0"):
        segment_runs(sign, mask, backend=backend, sizes=sizes._replace(num_tokens=-1))
    seg = segment_runs(sign, mask, backend=backend, sizes=sizes)
    with pytest.raises(RuntimeError, match="max_clusters"):
        segment_softmax_pool(scores, [k], seg, backend=backend, max_clusters=sizes.max_clusters - 1)
    with pytest.raises(ValueError, match="max_clusters"):
        segment_softmax_pool(scores, [k], seg, backend=backend, max_clusters=-1)
    if backend == "compiled":  # the raw ops: both sizes or neither
        with pytest.raises(RuntimeError, match="both"):
            torch.ops.enact_ops.segment_runs(sign, ~mask, sizes.num_segments)


def test_row_sizes_and_the_empty_image_check():
    sign = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert enact_ops.read_row_sizes(sign.shape, valid, sign) == ([3, 0], [3, 0])
    assert enact_ops.read_row_sizes(sign.shape, None, sign) == ([4, 4], [3, 1])
    assert enact_ops.read_row_sizes(sign.shape) == ([4, 4], None)  # nothing to read
    with pytest.raises(ValueError, match="image 1 of the batch has no valid token"):
        check_rows_have_tokens([3, 0])
    assert enact_ops.uniform_sizes([7, 2, 0], 3) == (3, 8, 2)  # 2 chunks of 3 (one cropped), 1 short row
    with pytest.raises(ValueError, match="no image of the batch has a valid token"):
        enact_ops.chunk_length([0, 0], [0, 0])


@needs_compiled_cpu
@pytest.mark.parametrize("device,B,N,C", DEVICE_SHAPES)
@pytest.mark.parametrize("mode", ["runs", "uniform"])
def test_pool_forward_backward_matches_reference(device, B, N, C, mode):
    sign, mask, scores, k, v = _batch(B, N, C, pad_rows=[0], all_pad_rows=[1] if B > 1 else [], device=device)
    seg = segment_runs(sign, mask) if mode == "runs" else segment_uniform(mask, 4)
    results = {}
    for backend in ("compiled", "reference"):
        s, kk, vv = (t.clone().requires_grad_() for t in (scores, k, v))
        pooled, weights, cmask = segment_softmax_pool(s, [kk, vv], seg, backend=backend)
        grads_out = [torch.ones_like(p) * torch.linspace(-1, 1, p.shape[-1], dtype=p.dtype, device=p.device) for p in pooled]
        torch.autograd.backward(pooled, grads_out)
        results[backend] = (pooled, weights, cmask, s.grad, kk.grad, vv.grad)
    ours, ref = results["compiled"], results["reference"]
    for x, y in zip(ours[0], ref[0]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    for x, y in zip(ours[1:], ref[1:]):
        if x.dtype == torch.bool:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    pooled, weights, cmask = ours[:3]
    assert pooled[0].shape == (B, seg.max_clusters, C) and pooled[1].shape == (B, seg.max_clusters, C + 3)
    # padded cluster slots hold zeros; weights sum to one per cluster and vanish off clusters
    assert torch.all(pooled[0][cmask] == 0)
    assert torch.all(weights[seg.cluster_ids < 0] == 0)
    sums = torch.zeros(seg.num_segments, dtype=weights.dtype, device=weights.device)
    sums.index_add_(0, seg.token_segment, weights.reshape(-1)[seg.tokens])
    torch.testing.assert_close(sums, torch.ones_like(sums))


@needs_compiled_cpu
def test_pool_edge_segmentations():
    """One segment spanning everything, and every token its own segment."""
    B, N, C = 2, 40, 6
    _, _, scores, k, v = _batch(B, N, C)
    mask = torch.zeros(B, N, dtype=torch.bool)
    one = segment_runs(torch.zeros(B, N, dtype=torch.bool), mask)
    pooled, weights, _ = segment_softmax_pool(scores, [k], one, backend="compiled")
    expected = (torch.softmax(scores, 1)[..., None] * k).sum(1, keepdim=True)
    torch.testing.assert_close(pooled[0], expected, rtol=1e-12, atol=1e-12)
    alternating = torch.arange(N).repeat(B, 1) % 2 == 0
    single = segment_runs(alternating, mask)
    pooled, weights, _ = segment_softmax_pool(scores, [k, v], single, backend="compiled")
    torch.testing.assert_close(pooled[0], k)
    torch.testing.assert_close(pooled[1], v)
    assert torch.all(weights == 1)


@needs_compiled_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["runs", "uniform"])
def test_pool_gradcheck(device, mode):
    sign, mask, scores, k, v = _batch(3, 13, 4, pad_rows=[1], seed=3, device=device)
    seg = segment_runs(sign, mask) if mode == "runs" else segment_uniform(mask, 3)
    inputs = tuple(t.clone().requires_grad_() for t in (scores, k, v))

    def f(s, kk, vv):
        return tuple(segment_softmax_pool(s, [kk, vv], seg, backend="compiled")[0])

    assert torch.autograd.gradcheck(f, inputs)


@needs_compiled_cpu
def test_pool_only_some_outputs_used_and_strided_features():
    sign, mask, scores, k, v = _batch(2, 21, 8)
    seg = segment_runs(sign, mask)
    # (N, B, C) memory viewed as (B, N, C): strided rows, contiguous channels
    k_seq_first = k.transpose(0, 1).contiguous().requires_grad_()
    s = scores.clone().requires_grad_()
    vv = v.clone().requires_grad_()
    pooled, _, _ = segment_softmax_pool(s, [k_seq_first.transpose(0, 1), vv], seg, backend="compiled")
    pooled[0].sum().backward()  # v's output unused
    assert vv.grad is None
    s2 = scores.clone().requires_grad_()
    k2 = k.clone().requires_grad_()
    ref, _, _ = segment_softmax_pool(s2, [k2], seg, backend="reference")
    ref[0].sum().backward()
    torch.testing.assert_close(pooled[0], ref[0])
    torch.testing.assert_close(s.grad, s2.grad)
    torch.testing.assert_close(k_seq_first.grad.transpose(0, 1), k2.grad)


@needs_compiled_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pool_low_precision_accumulates_in_float(device, dtype):
    sign, mask, scores, k, v = _batch(2, 300, 16, pad_rows=[0], device=device)
    seg = segment_runs(sign, mask)
    pooled, weights, _ = segment_softmax_pool(scores.float(), [k.to(dtype), v.to(dtype)], seg, backend="compiled")
    ref, ref_w, _ = segment_softmax_pool(scores.float(), [k.float(), v.float()], seg, backend="reference")
    assert pooled[0].dtype == dtype and weights.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for x, y in zip(pooled, ref):
        torch.testing.assert_close(x.float(), y, rtol=tol, atol=tol)
    torch.testing.assert_close(weights, ref_w)


@needs_compiled_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["runs", "uniform"])
@pytest.mark.parametrize("seq_first", [False, True])
def test_pool_backward_sum_is_the_sum_of_the_feature_gradients(device, mode, seq_first):
    """segment_softmax_pool_backward_sum: one gradient, sum over the features, laid out like
    features[0], and the scores' gradient of the per-feature backward."""
    sign, mask, scores, k, _ = _batch(3, 57, 8, pad_rows=[0], all_pad_rows=[2], seed=5, device=device)
    v = torch.randn_like(k)
    seg = segment_runs(sign, mask) if mode == "runs" else segment_uniform(mask, 4)
    if seq_first:  # (N, B, C) memory viewed as (B, N, C)
        k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (k, v))
    s, kk, vv = (t.detach().clone().requires_grad_() for t in (scores, k, v))
    pooled, weights, _ = segment_softmax_pool(s, [kk, vv], seg, backend="compiled")
    g = [torch.randn_like(p) for p in pooled]
    torch.autograd.backward(pooled, g)
    grad_scores, grad_sum = enact_ops.ops.segment_softmax_pool_backward_sum(g, [k, v], weights.detach(), seg)
    torch.testing.assert_close(grad_scores, s.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_sum, kk.grad + vv.grad, rtol=1e-10, atol=1e-12)
    if device == "cpu":
        assert grad_sum.stride() == k.stride()
    assert torch.all(grad_sum[seg.cluster_ids < 0] == 0)
    grad_scores, grad_one = enact_ops.ops.segment_softmax_pool_backward_sum(g[1:], [v], weights.detach(), seg)
    torch.testing.assert_close(grad_one, vv.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_bad_segmentation_input(backend):
    if backend == "compiled" and not enact_ops.compiled_available("cpu"):
        pytest.skip("enact_ops._C is not built")
    sign = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="sign must be a bool"):
        segment_runs(sign.int(), backend=backend)
    with pytest.raises(ValueError, match=r"sign must be of shape \(B, N\)"):
        segment_runs(sign[0], backend=backend)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        segment_runs(sign, torch.zeros(2, 5), backend=backend)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\)"):
        segment_runs(sign, torch.zeros(2, 4, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="N = 0"):
        segment_runs(torch.zeros(2, 0, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        segment_uniform(sign, 0, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        segment_runs(sign, backend="fast")


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_bad_pool_input(backend):
    if backend == "compiled" and not enact_ops.compiled_available("cpu"):
        pytest.skip("enact_ops._C is not built")
    sign, mask, scores, k, v = _batch(2, 9, 4)
    seg = segment_runs(sign, mask)
    with pytest.raises(ValueError, match=r"scores must have the segmentation's shape \(2, 9\)"):
        segment_softmax_pool(scores[:, :5], [k], seg, backend=backend)
    with pytest.raises(ValueError, match=r"features\[1\] must be \(B, N, C\)"):
        segment_softmax_pool(scores, [k, v[:, :3]], seg, backend=backend)
    with pytest.raises(ValueError, match=r"features\[0\] must be of shape \(B, N, C\)"):
        segment_softmax_pool(scores, [k[0]], seg, backend=backend)
    with pytest.raises(TypeError, match="features must share one dtype"):
        segment_softmax_pool(scores, [k, v.float()], seg, backend=backend)
    with pytest.raises(TypeError, match=r"features\[0\] must be floating point"):
        segment_softmax_pool(scores, [k.long()], seg, backend=backend)
    with pytest.raises(TypeError, match="seg must be an enact_ops.Segmentation"):
        segment_softmax_pool(scores, [k], tuple(seg), backend=backend)
    with pytest.raises(ValueError, match="at least one"):
        segment_softmax_pool(scores, [], seg, backend=backend)


@needs_compiled_cpu
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_checks_inputs_on_host(device):
    """Calling the registered op directly with a wrong max_clusters is refused, not a crash."""
    sign, mask, scores, k, _ = _batch(2, 9, 4, device=device)
    seg = segment_runs(sign, mask)
    with pytest.raises(RuntimeError, match="max_clusters"):
        torch.ops.enact_ops.segment_softmax_pool_forward(
            scores, [k], seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets, 1
        )
    with pytest.raises(RuntimeError, match="scores must be float32 or float64"):
        torch.ops.enact_ops.segment_softmax_pool_forward(
            scores.half(), [k], seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets, 9
        )


def test_all_padding_row_is_defined():
    sign, mask, scores, k, _ = _batch(3, 10, 4, all_pad_rows=[1])
    for backend in ["reference"] + (["compiled"] if enact_ops.compiled_available("cpu") else []):
        seg = segment_runs(sign, mask, backend=backend)
        pooled, weights, cmask = segment_softmax_pool(scores, [k], seg, backend=backend)
        assert seg.num_clusters[1] == 0
        assert torch.all(cmask[1]) and torch.all(pooled[0][1] == 0) and torch.all(weights[1] == 0)


def test_reference_is_the_fallback_without_extension(monkeypatch):
    """Without the extension "auto" runs the reference and says so once per device type;
    backend="compiled" and $ENACT_REQUIRE_COMPILED=1 make it an error; "reference" stays allowed."""
    import enact_ops.ops as ops

    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_LOAD_ERROR", "not built")
    monkeypatch.setattr(ops, "_FALLBACK_WARNED", set())
    monkeypatch.delenv("ENACT_REQUIRE_COMPILED", raising=False)
    assert not ops.compiled_available("cpu")
    sign, mask, scores, k, _ = _batch(2, 9, 4)
    with pytest.warns(RuntimeWarning, match=r"no compiled kernels for cpu \(the extension is not built.*pip install"):
        seg = segment_runs(sign, mask)  # auto -> reference
    expected = reference.segment_runs(sign, ~mask)
    _assert_same_segmentation(seg, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call says nothing
        segment_runs(sign, mask)
    with pytest.raises(RuntimeError, match="backend='compiled' but the extension is not built"):
        segment_runs(sign, mask, backend="compiled")
    monkeypatch.setenv("ENACT_REQUIRE_COMPILED", "1")
    with pytest.raises(RuntimeError, match=r"\$ENACT_REQUIRE_COMPILED=1 but the extension is not built"):
        segment_runs(sign, mask)
    _assert_same_segmentation(segment_runs(sign, mask, backend="reference"), expected)


@needs_compiled_cpu
def test_public_ops_check_index_values():
    """torch.ops.enact_ops.* are public: a segmentation whose index values are out of range, or a
    pooled-output gradient without a slot for every cluster, is an error naming what is wrong,
    never an out-of-bounds read."""
    sign, mask, scores, k, v = _batch(2, 9, 4)
    seg = segment_runs(sign, mask)
    ops = torch.ops.enact_ops

    def forward(tokens=seg.tokens, seg_starts=seg.seg_starts, seg_batch=seg.seg_batch, row_offsets=seg.row_offsets):
        return ops.segment_softmax_pool_forward(
            scores, [k], tokens, seg_starts, seg_batch, row_offsets, seg.max_clusters
        )

    forward()  # the segmentation as built is accepted
    bad = seg.tokens.clone()
    bad[-1] = 2 * 9  # past the last token of the batch
    with pytest.raises(RuntimeError, match=r"tokens\[\d+\] = 18 is not a token of row 1"):
        forward(tokens=bad)
    bad = seg.tokens.clone()
    bad[0] = 9  # row 1's first token in a segment of row 0
    with pytest.raises(RuntimeError, match=r"tokens\[0\] = 9 is not a token of row 0"):
        forward(tokens=bad)
    bad = seg.seg_starts.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="seg_starts must run from 0 to the number of tokens"):
        forward(seg_starts=bad)
    bad = seg.seg_batch.clone()
    bad[0] = 5
    with pytest.raises(RuntimeError, match=r"seg_batch\[0\] = 5 does not match row_offsets"):
        forward(seg_batch=bad)
    bad = seg.row_offsets.clone()
    bad[1] = bad[2] + 1
    with pytest.raises(RuntimeError, match="row_offsets must be non-decreasing"):
        forward(row_offsets=bad)

    pooled, weights = forward()
    narrow = torch.zeros(2, seg.max_clusters - 1, 4, dtype=k.dtype)  # one slot short
    args = (weights, seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets)
    for op in (ops.segment_softmax_pool_backward, ops.segment_softmax_pool_backward_sum):
        with pytest.raises(RuntimeError, match=rf"grad_pooled must have M >= {seg.max_clusters} cluster slots"):
            op([narrow], [k], *args)


@needs_compiled_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["segment_softmax_pool_backward", "segment_softmax_pool_backward_sum"])
def test_backward_ops_check_grad_pooled_alike(device, name):
    """Both backward operators check grad_pooled with one host-side helper (checked_grad_pooled):
    one gradient per feature, (B, M, C_f) in the feature's dtype, and -- for the summed one --
    features of one width and dtype; every error names the argument."""
    sign, mask, scores, k, v = _batch(2, 9, 4, device=device)
    seg = segment_runs(sign, mask)
    op = getattr(torch.ops.enact_ops, name)
    pooled, weights = torch.ops.enact_ops.segment_softmax_pool_forward(
        scores, [k], seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets, seg.max_clusters)
    args = (weights, seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets)
    g = torch.ones_like(pooled[0])
    op([g], [k], *args)  # accepted
    shape = r"must be \(B, M_max, C\) like the pooled output"
    cases = [
        ([g, g], [k], "one grad_pooled tensor per feature tensor expected"),
        ([g.float()], [k], rf"grad_pooled\[0\] {shape} \(B = 2, C = 4, Double"),
        ([torch.ones(2, seg.max_clusters, 5, dtype=k.dtype, device=device)], [k], rf"grad_pooled\[0\] {shape}"),
        ([torch.ones(3, seg.max_clusters, 4, dtype=k.dtype, device=device)], [k], rf"grad_pooled\[0\] {shape}"),
    ]
    if name.endswith("_sum"):
        cases.append(([g, torch.ones(2, seg.max_clusters, 7, dtype=k.dtype, device=device)], [k, v],
                      "the summed features must share their width and dtype"))
        cases.append(([], [], "one grad_pooled tensor per feature tensor expected"))
    for grads, features, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            op(grads, features, *args)
