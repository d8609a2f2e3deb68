"""enact_ops.smoothed_information (ENACT's steps 1-4 in one operator) against the readable
functions of projects/enact/modeling/enact.py and the operator's own pure-PyTorch reference:
values, signs, row sizes, gradients (float64 gradcheck), padding layouts, input errors, CUDA."""
import pytest
import torch

import enact_ops
from enact_ops.segmentation import count_runs
from projects.enact.modeling.enact import gaussian_kernel, self_information, smoothed_information

compiled = pytest.mark.skipif(not enact_ops.compiled_available("cpu"), reason="enact_ops._C is not built")
BACKENDS = ["reference", pytest.param("compiled", marks=compiled)]


def _masks(B, N, W=None):
    """Padding layouts by name: (B, N) bool, True = pad, or None."""
    detr = torch.zeros(B, N, dtype=torch.bool)  # right / bottom padding of a W-wide feature map
    W = W or max(1, N // 5)
    for b in range(B):
        h, w = max(1, (N // W) - b), max(1, W - 2 * b)
        grid = torch.ones(N // W, W, dtype=torch.bool)
        grid[:h, :w] = False
        detr[b, : grid.numel()] = grid.flatten()
        detr[b, grid.numel():] = True
    scattered = torch.rand(B, N, generator=torch.Generator().manual_seed(1)) < 0.3
    scattered[:, 0] = True  # rows start with a pad
    one_token = torch.ones(B, N, dtype=torch.bool)
    one_token[:, N // 2] = False
    return {"none": None, "detr": detr, "scattered": scattered, "one_token": one_token}


def _readable(logits, mask, taps):
    """Steps 1-4 as EnactClustering's readable path computes them, with the row sizes."""
    valid = None if mask is None else ~mask
    smoothed, sign = smoothed_information(self_information(logits, valid), valid, taps)
    lengths = torch.full((logits.shape[0],), logits.shape[1]) if valid is None else valid.sum(1)
    return smoothed, sign, lengths, count_runs(sign, valid)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["none", "detr", "scattered", "one_token"])
@pytest.mark.parametrize("sigma,radius", [(1, 3), (2, 5), (5, 15)])
def test_matches_the_readable_path_float64(backend, layout, sigma, radius):
    torch.manual_seed(sigma)
    B, N = 3, 97
    logits = torch.randn(B, N, dtype=torch.float64) * 2
    mask = _masks(B, N)[layout]
    taps = gaussian_kernel(sigma, radius, torch.float64)
    got = enact_ops.smoothed_information(logits, taps, mask, backend=backend)
    smoothed, sign, lengths, runs = _readable(logits, mask, taps)
    torch.testing.assert_close(got.smoothed, smoothed, rtol=1e-9, atol=1e-15)
    assert torch.equal(got.sign, sign)
    assert got.lengths.tolist() == lengths.tolist() and got.runs.tolist() == runs.tolist()
    if mask is not None:  # pads: exactly 0 / False
        assert not got.smoothed[mask].any() and not got.sign[mask].any()


@compiled
@pytest.mark.parametrize("layout", ["none", "detr", "scattered"])
def test_float32_signs_agree_away_from_zero_curvature(layout):
    """float32: values to float32 rounding; a sign may differ only where the curvature is within
    float32 rounding of zero (the spec's rule for comparisons across implementations)."""
    torch.manual_seed(0)
    B, N = 4, 850
    logits = torch.randn(B, N)
    mask = _masks(B, N, W=34)[layout]
    taps = gaussian_kernel(2, 6)
    got = enact_ops.smoothed_information(logits, taps, mask, backend="compiled")
    smoothed, sign, lengths, _ = _readable(logits, mask, taps)
    torch.testing.assert_close(got.smoothed, smoothed, rtol=1e-5, atol=1e-9)
    exact, exact_sign, _, _ = _readable(logits.double(), mask, taps.double())
    curvature = (2 * exact - exact.roll(1, 1) - exact.roll(-1, 1)).abs()  # near-zero test only
    differ = got.sign != sign
    assert (curvature[differ] < 1e-5 * curvature.max()).all()
    assert differ.sum() <= 2
    assert got.lengths.tolist() == lengths.tolist()


@compiled
def test_empty_rows_and_tiny_rows():
    """A row with no valid token: zeros, no run, length 0 (the module then raises); N = 1; taps
    wider than the row."""
    logits = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [False, True, True, True], [False] * 4])
    taps = gaussian_kernel(3, 9, torch.float64)
    for backend in ("compiled", "reference"):
        got = enact_ops.smoothed_information(logits, taps, mask, backend=backend)
        assert got.lengths.tolist() == [0, 1, 4] and got.runs[:2].tolist() == [0, 1]
        assert not got.smoothed[0].any() and not got.sign[0].any()
    one = enact_ops.smoothed_information(torch.zeros(2, 1, dtype=torch.float64), taps)
    # one token: p = 1 + 1e-8, h = -p log2 p, h~ = g(0) h, curvature 2 h~ < 0
    h = -(1 + 1e-8) * torch.log2(torch.tensor(1 + 1e-8, dtype=torch.float64))
    torch.testing.assert_close(one.smoothed, (taps[9] * h).expand(2, 1), rtol=1e-12, atol=0)
    assert one.sign.tolist() == [[False], [False]] and one.runs.tolist() == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["none", "detr", "scattered"])
def test_gradcheck(backend, layout):
    torch.manual_seed(0)
    B, N = 2, 23
    logits = torch.randn(B, N, dtype=torch.float64, requires_grad=True)
    mask = _masks(B, N)[layout]
    taps = gaussian_kernel(1, 3, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: enact_ops.smoothed_information(x, taps, mask, backend=backend).smoothed, (logits,)
    )


@compiled
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gradient_matches_the_readable_path(dtype, tol):
    torch.manual_seed(0)
    B, N = 3, 200
    mask = _masks(B, N, W=20)["detr"]
    taps = gaussian_kernel(2, 6, dtype)
    grad = torch.randn(B, N, dtype=dtype)
    grads = []
    for fused in (True, False):
        logits = torch.randn(B, N, dtype=dtype, generator=torch.Generator().manual_seed(3)).requires_grad_()
        if fused:
            smoothed = enact_ops.smoothed_information(logits, taps, mask, backend="compiled").smoothed
        else:
            smoothed = _readable(logits, mask, taps)[0]
        (g,) = torch.autograd.grad(smoothed, logits, grad)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol * grads[1].abs().max().item())
    assert not grads[0][mask].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_refused(backend):
    logits = torch.randn(2, 8)
    taps = gaussian_kernel(1, 3)
    op = enact_ops.smoothed_information
    with pytest.raises(TypeError, match="logits must be float32 or float64"):
        op(logits.half(), taps, backend=backend)
    with pytest.raises(ValueError, match=r"logits must be of shape \(B, N\)"):
        op(logits[0], taps, backend=backend)
    with pytest.raises(ValueError, match="taps must have an odd length"):
        op(logits, taps[:-1], backend=backend)
    with pytest.raises(TypeError, match="taps must be torch.float32"):
        op(logits, taps.double(), backend=backend)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 8\)"):
        op(logits, taps, torch.zeros(2, 7, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        op(logits, taps, torch.zeros(2, 8), backend=backend)


@compiled
def test_operator_checks_its_inputs_on_the_host():
    """torch.ops.enact_ops.* called directly: a clear error, not a read out of bounds."""
    logits, taps = torch.randn(2, 8), gaussian_kernel(1, 3)
    op = torch.ops.enact_ops.smoothed_information
    with pytest.raises(RuntimeError, match="taps must be 1-D of odd length"):
        op(logits, None, taps[:-1])
    with pytest.raises(RuntimeError, match="valid must be a bool tensor of the logits' shape"):
        op(logits, torch.ones(2, 9, dtype=torch.bool), taps)
    with pytest.raises(RuntimeError, match="taps must be Float"):
        op(logits, None, taps.double())
    _, _, probs, _, _ = op(logits, None, taps)
    with pytest.raises(RuntimeError, match="grad_smoothed must be Float"):
        torch.ops.enact_ops.smoothed_information_backward(torch.randn(2, 7), probs, None, taps)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and enact_ops.compiled_available("cuda")),
                    reason="no GPU with enact_ops CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype):
    """The CUDA kernel (one block per row) against the CPU kernel at detector sizes."""
    torch.manual_seed(0)
    for B, N, W in ((8, 850, 34), (8, 3400, 68), (2, 20000, 160)):
        logits = torch.randn(B, N, dtype=dtype)
        mask = _masks(B, N, W)["detr"]
        taps = gaussian_kernel(5, 15, dtype)
        cpu = enact_ops.smoothed_information(logits, taps, mask)
        gpu = enact_ops.smoothed_information(logits.cuda(), taps.cuda(), mask.cuda())
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(gpu.smoothed.cpu(), cpu.smoothed, rtol=tol, atol=tol * 1e-3)
        differ = (gpu.sign.cpu() != cpu.sign).sum().item()
        assert differ == 0 if dtype == torch.float64 else differ <= 2
        assert gpu.lengths.tolist() == cpu.lengths.tolist()
        grad = torch.randn(B, N, dtype=dtype)
        l_cpu, l_gpu = logits.clone().requires_grad_(), logits.cuda().requires_grad_()
        (g_cpu,) = torch.autograd.grad(enact_ops.smoothed_information(l_cpu, taps, mask).smoothed, l_cpu, grad)
        (g_gpu,) = torch.autograd.grad(
            enact_ops.smoothed_information(l_gpu, taps.cuda(), mask.cuda()).smoothed, l_gpu, grad.cuda())
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=tol * 10, atol=tol * g_cpu.abs().max().item())
