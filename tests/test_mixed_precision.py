"""EnactAttention where detectors are trained: bf16 / fp16 (autocast, and bf16 tokens from a
detector) against float32, activation checkpointing (non-reentrant and reentrant), save_on_cpu,
and what the layer keeps for backward outside saved-tensor hooks."""
import json

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import enact_ops
from projects.enact import EnactAttention, MultiheadAttention

pytestmark = pytest.mark.skipif(not enact_ops.compiled_available("cpu"), reason="enact_ops._C is not built")
# every test on the CPU, and on the GPU where one is present (marked ``cuda``: `pytest -m cuda`)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and enact_ops.compiled_available("cuda")), reason="no GPU with enact_ops CUDA kernels")])]

N, B, C, HEADS = 160, 2, 32, 4  # small: fp16 GEMMs on a CPU are slow
LOW = [torch.bfloat16, torch.float16]
# how many times MHSA's own low-precision error ENACT's may be (measured 0.79-1.23x, docs/mixed_precision.md)
ERROR_FACTOR = 2.0


def _inputs(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(N, B, C, generator=g)
    pos = torch.randn(N, B, C, generator=g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 130:] = True
    return src.to(device), pos.to(device), mask.to(device)


def _pair(seed=0, device="cpu"):
    torch.manual_seed(seed)
    enact = EnactAttention(C, HEADS, sigma=2).train().to(device)
    with torch.no_grad():
        enact.clustering.w_prob.weight.mul_(20.0)  # informative logits: clusters of a few tokens
    mhsa = MultiheadAttention(C, HEADS).train().to(device)
    mhsa.attn.load_state_dict(enact.attn.state_dict())
    return enact, mhsa


def _run(m, src, pos, mask, amp=None, dtype=None):
    """Output and gradients (src, every parameter) of sum(out * probe), float32 results."""
    m.zero_grad(set_to_none=True)
    x = src.clone().to(dtype or src.dtype).requires_grad_()
    with torch.autocast(src.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = m(x, query_pos=pos, key_padding_mask=mask)
    probe = torch.linspace(-1, 1, C, device=src.device)
    (out.float() * probe).sum().backward()
    grads = {"src": x.grad.float()}
    grads.update({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    return (out.float() - x.detach().float()), grads  # the attention's contribution (residual removed)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def _errors(m, amp=None, dtype=None):
    src, pos, mask = _inputs(device=next(m.parameters()).device)
    out32, g32 = _run(m, src, pos, mask)
    out, g = _run(m, src, pos, mask, amp=amp, dtype=dtype)
    errs = {"out": _rel(out, out32)}
    errs.update({k: _rel(g[k], g32[k]) for k in g32 if k in g and "w_prob" not in k})
    return errs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", LOW)
def test_autocast_keeps_the_float32_clusters_and_mhsa_error(amp, device):
    """Under autocast the logits read the float32 key: the clusters are exactly float32's.  The
    output and every gradient are within ERROR_FACTOR x MHSA's own autocast error."""
    enact, mhsa = _pair(device=device)
    src, pos, mask = _inputs(device=device)
    ids = []
    for a in (None, amp):
        traces = []
        handle = enact.clustering.register_trace_hook(lambda _, t: traces.append(t.cluster_ids))
        _run(enact, src, pos, mask, amp=a)
        handle.remove()
        ids.append(traces[0])
    assert torch.equal(ids[0], ids[1])
    assert enact.statistics()["compression"] > 2.0  # clusters of several tokens, not identity
    ours, theirs = _errors(enact, amp=amp), _errors(mhsa, amp=amp)
    for k, e in theirs.items():
        assert ours[k] <= ERROR_FACTOR * e + 1e-6, (k, ours[k], e)
    assert enact.clustering.w_prob.weight.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", LOW)
def test_low_precision_tokens_with_the_segmentation_held_fixed(amp, device):
    """Tokens that reach the encoder in bf16 / fp16 (a detector under autocast): the logits read
    the upcast key, so a near-zero curvature sign may flip; with float32's segmentation held fixed
    the output and gradients stay within ERROR_FACTOR x MHSA's error on the same inputs."""
    enact, mhsa = _pair(device=device)
    src, pos, mask = _inputs(device=device)
    fixed = []
    enact.clustering.register_trace_hook(lambda _, t: fixed.append(t))
    _run(enact, src, pos, mask)
    seg32 = enact.clustering.segment(fixed[0].sign, mask)
    enact.clustering.register_segmentation_hook(lambda module, sign, mask, seg: seg32)  # held fixed
    ours, theirs = _errors(enact, amp=amp, dtype=amp), _errors(mhsa, amp=amp, dtype=amp)
    for k, e in theirs.items():
        assert ours[k] <= ERROR_FACTOR * e + 1e-6, (k, ours[k], e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", LOW)
def test_mixed_precision_keeps_low_precision_copies(amp, device):
    """What EnactAttention saves for backward under autocast: no (B, N, C) float32 tensor (MHSA
    keeps its inputs' low-precision copies; so does ENACT)."""
    enact, _ = _pair(device=device)
    src, pos, mask = _inputs(device=device)
    saved = []
    x = src.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(device, dtype=amp):
            enact(x, query_pos=pos, key_padding_mask=mask)
    full = [t for t in saved if t.numel() >= N * B * C]
    assert full and all(t.dtype == amp for t in full), [(tuple(t.shape), t.dtype) for t in full]


def _outputs_and_grads(fn, m, src, pos, mask):
    m.zero_grad(set_to_none=True)
    x, p = src.clone().requires_grad_(), pos.clone().requires_grad_()
    out = fn(x, p)
    (out * torch.linspace(-1, 1, C, device=out.device)).sum().backward()
    return [out.detach(), x.grad, p.grad] + [q.grad for q in m.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_activation_checkpointing_and_save_on_cpu(amp, device):
    """torch.utils.checkpoint (use_reentrant=False) and save_on_cpu give the plain run's output and
    gradients bitwise; use_reentrant=True (forward without grad first, recomputed in backward)
    within float rounding."""
    enact, _ = _pair(device=device)
    src, pos, mask = _inputs(device=device)

    def layer(x, p):
        with torch.autocast(device, dtype=amp or torch.bfloat16, enabled=amp is not None):
            return enact(x, query_pos=p, key_padding_mask=mask).float()

    plain = _outputs_and_grads(layer, enact, src, pos, mask)
    ckpt = _outputs_and_grads(lambda x, p: checkpoint(layer, x, p, use_reentrant=False), enact, src, pos, mask)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def on_cpu(x, p):
        with torch.autograd.graph.save_on_cpu():
            return layer(x, p)

    for a, b in zip(_outputs_and_grads(on_cpu, enact, src, pos, mask), plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    reentrant = _outputs_and_grads(lambda x, p: checkpoint(layer, x, p, use_reentrant=True), enact, src, pos, mask)
    tol = {} if amp is None else {"rtol": 2e-2, "atol": 1e-3}
    for a, b in zip(reentrant, plain):
        torch.testing.assert_close(a, b, **tol)


def _live_bytes_after(fn, tmp_path):
    """Bytes allocated while ``fn`` runs and still alive when it returns, with the objects it
    returns (a census of the allocator's events: profiler memory records, alloc minus free)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    live = {}
    for e in json.loads(trace.read_text())["traceEvents"]:
        if e.get("name") == "[memory]":
            addr, size = e["args"]["Addr"], e["args"]["Bytes"]
            if size > 0:
                live[addr] = size
            else:
                live.pop(addr, None)
    return sum(live.values()), kept


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_nothing_is_kept_outside_saved_tensor_hooks(amp, tmp_path):
    """Forward under pack hooks that drop every saved tensor: what is still alive beyond the
    output is what the layer keeps outside the hooks (ctx attributes, a kept sub-graph, closures),
    which activation checkpointing and offloading could not free: at most 0.1x the inputs."""
    enact, _ = _pair()
    src, pos, mask = _inputs()
    x = src.clone().requires_grad_()
    enact(x, query_pos=pos, key_padding_mask=mask)  # warm-up: lazily made caches (Gaussian taps)

    def forward():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                return enact(x, query_pos=pos, key_padding_mask=mask)

    live, out = _live_bytes_after(forward, tmp_path)
    assert out.grad_fn is not None  # the graph is alive while we count
    kept = live - out.untyped_storage().nbytes()
    inputs = (src.numel() + pos.numel()) * src.element_size()
    assert kept <= 0.1 * inputs, f"{kept} bytes kept outside saved-tensor hooks ({kept / inputs:.3f}x the inputs)"
