"""The ENACT module: against a loop-by-loop reading of the spec, batch independence, equivalence
with standard attention when every token is its own cluster, gradients, bad input."""
import math

import pytest
import torch
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import enact_ops
from projects.enact import EnactAttention, EnactClustering, MultiheadAttention
from projects.enact.modeling.attention import multi_head_attention
from projects.enact.modeling.enact import curvature_sign, gaussian_kernel, smooth
from projects.enact.modeling.enact_fused import project

BACKENDS = ["reference"] + (["compiled"] if enact_ops.compiled_available("cpu") else [])


def spec_clusters(key, value, mask, weight, bias, sigma, radius):
    """docs/method.md steps 1-7 for each image with plain Python loops (float64): the oracle."""
    B, N, _ = key.shape
    out_k, out_v, ids = [], [], torch.full((B, N), -1, dtype=torch.long)
    for b in range(B):
        idx = [i for i in range(N) if mask is None or not mask[b, i]]
        n = len(idx)
        logits = [float(key[b, i] @ weight.detach() + bias.detach()) for i in idx]
        mx = max(logits)
        z = sum(math.exp(l - mx) for l in logits)
        p = [math.exp(l - mx) / z + 1e-8 for l in logits]
        h = [-q * math.log2(q) for q in p]
        g = {x: math.exp(-x * x / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi)) for x in range(-radius, radius + 1)}
        hs = [sum(g[x] * h[i + x] for x in g if 0 <= i + x < n) for i in range(n)]
        at = lambda i: hs[i] if 0 <= i < n else 0.0  # noqa: E731
        s = [(2 * at(i) - at(i - 1) - at(i + 1)) > 0 for i in range(n)]
        clusters, c = [], -1
        for j in range(n):
            if j == 0 or s[j] != s[j - 1]:
                clusters.append([])
                c += 1
            clusters[-1].append(j)
            ids[b, idx[j]] = c
        ks, vs = [], []
        for members in clusters:
            m = max(hs[j] for j in members)
            e = [math.exp(hs[j] - m) for j in members]
            w = [x / sum(e) for x in e]
            ks.append(sum(wj * key[b, idx[j]] for wj, j in zip(w, members)))
            vs.append(sum(wj * value[b, idx[j]] for wj, j in zip(w, members)))
        out_k.append(torch.stack(ks))
        out_v.append(torch.stack(vs))
    return out_k, out_v, ids


def detr_batch(sizes, C, seed=0, dtype=torch.float64):
    """Images of (h, w) padded on the right and bottom to the batch's max (H, W), flattened."""
    g = torch.Generator().manual_seed(seed)
    H, W = max(s[0] for s in sizes), max(s[1] for s in sizes)
    x = torch.randn(len(sizes), H, W, C, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(len(sizes), H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = False
    x = x.masked_fill(mask[..., None], 0.0)
    return x.view(len(sizes), H * W, C), mask.view(len(sizes), H * W)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", [1, 2, 3])
def test_clustering_matches_spec_loops(backend, sigma):
    torch.manual_seed(sigma)
    key, mask = detr_batch([(5, 7), (4, 5), (2, 3)], C=6, seed=sigma)
    value = torch.randn(3, 35, 4, dtype=torch.float64)
    module = EnactClustering(6, sigma=sigma, backend=backend).double()
    with torch.no_grad():
        module.w_prob.weight.normal_(0, 3.0)  # a peaky p.d.f. gives a varied curvature
        module.w_prob.bias.fill_(0.3)
    out = module(key, value, mask)
    ref_k, ref_v, ref_ids = spec_clusters(key, value, mask, module.w_prob.weight[0], module.w_prob.bias[0], sigma, 3 * sigma)
    assert torch.equal(out.cluster_ids, ref_ids)
    for b in range(3):
        m = len(ref_k[b])
        torch.testing.assert_close(out.key[b, :m], ref_k[b], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out.value[b, :m], ref_v[b], rtol=1e-9, atol=1e-12)
        assert torch.all(out.key[b, m:] == 0) and torch.all(out.cluster_mask[b, m:]) and not out.cluster_mask[b, :m].any()


def test_curvature_sign_and_smoothing_by_hand():
    # d2_i = 2 x_i - x_{i-1} - x_{i+1} with zeros outside: [0,1,0,0,2,0] -> [-1,2,-1,-2,4,-2]
    x = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]])
    assert curvature_sign(x).tolist() == [[False, True, False, False, True, False]]
    # smoothing a unit impulse gives the kernel itself, cut at the row's length
    k = gaussian_kernel(1, 3, torch.float64)
    assert k.numel() == 7 and abs(float(k[3]) - 1 / math.sqrt(2 * math.pi)) < 1e-15
    impulse = torch.zeros(1, 9, dtype=torch.float64)
    impulse[0, 4] = 1.0
    torch.testing.assert_close(smooth(impulse, k, torch.tensor([9]))[0, 1:8], k)
    assert smooth(impulse, k, torch.tensor([6]))[0, 6:].abs().sum() == 0


def test_clusters_and_weights_by_hand():
    # 1) a smoothed signal [0, 1, 0, 0, 2, 0]: d2 = [-1, 2, -1, -2, 4, -2], signs - + - - + -,
    #    runs {0} {1} {2, 3} {4} {5}; the pair shares softmax(0, 0) = (1/2, 1/2)
    module = EnactClustering(2, sigma=1, backend="reference").double()  # runs module.smoothed_information
    smoothed = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    module.smoothed_information = lambda h, valid: (smoothed, curvature_sign(smoothed))
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1)
    out = module(torch.zeros(1, 6, 2, dtype=torch.float64), value)
    assert out.cluster_ids.tolist() == [[0, 1, 2, 2, 3, 4]]
    assert out.weights.tolist() == [[1.0, 1.0, 0.5, 0.5, 1.0, 1.0]]
    assert out.value[0, :, 0].tolist() == [0.0, 1.0, 2.5, 4.0, 5.0]

    # 2) a uniform p.d.f. over N = 6 tokens, sigma = 1: h is flat, every token lies within 3
    #    sigma of a border, so smoothed_i = h * (sum of the taps that fall inside) is a concave
    #    cap whose curvature is positive everywhere: one cluster, w = softmax(smoothed)
    module = EnactClustering(2, sigma=1).double()
    with torch.no_grad():
        module.w_prob.weight.zero_()
    N = 6
    h = -(1 / N + 1e-8) * math.log2(1 / N + 1e-8)
    g = [math.exp(-x * x / 2) / math.sqrt(2 * math.pi) for x in range(-3, 4)]
    cap = [h * sum(g[x + 3] for x in range(-3, 4) if 0 <= i + x < N) for i in range(N)]
    at = lambda i: cap[i] if 0 <= i < N else 0.0  # noqa: E731
    assert all(2 * at(i) - at(i - 1) - at(i + 1) > 0 for i in range(N))
    out = module(torch.zeros(1, N, 2, dtype=torch.float64), value)
    assert out.cluster_ids.tolist() == [[0] * N]
    w = torch.softmax(torch.tensor(cap, dtype=torch.float64), 0)
    torch.testing.assert_close(out.weights[0], w, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.value[0, 0, 0], (w * value[0, :, 0]).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_independence_segments_mode(backend):
    torch.manual_seed(0)
    attn = EnactAttention(8, 2, sigma=2, backend=backend).double().eval()
    with torch.no_grad():
        attn.clustering.w_prob.weight.normal_(0, 2.0)
    small = (4, 5)
    x, mask = detr_batch([(6, 9), small, (7, 6)], C=8, seed=1)
    pos = torch.randn_like(x)
    alone_x, alone_mask = detr_batch([small], C=8, seed=0)
    idx = (~mask[1]).nonzero().squeeze(1)
    alone_x = x[1:2, idx]
    alone_pos = pos[1:2, idx]
    batched = attn(x.transpose(0, 1), query_pos=pos.transpose(0, 1), key_padding_mask=mask).transpose(0, 1)
    alone = attn(alone_x.transpose(0, 1), query_pos=alone_pos.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(batched[1, idx], alone[0], rtol=1e-10, atol=1e-12)

    # The naive alternative, masking pads inside the padded sequence, is not batch independent:
    # the smoothed signal leaks into the pads and changes the last tokens of every image row.
    clustering = attn.clustering
    key = (x + pos)[1:2]
    h = clustering.information(key, ~mask[1:2], torch.float64)
    naive = smooth(h.masked_fill(mask[1:2], 0.0), gaussian_kernel(2, 6, torch.float64), torch.tensor([x.shape[1]]))
    ours, _ = clustering.smoothed_information(h, ~mask[1:2])
    assert not torch.allclose(naive[0, idx], ours[0, idx])


def test_every_token_its_own_cluster_equals_standard_attention():
    torch.manual_seed(0)
    N, B, C = 11, 3, 16
    mhsa = MultiheadAttention(C, 4, batch_first=False).double()
    enact = EnactAttention(C, 4, batch_first=False).double()
    missing, unexpected = enact.load_state_dict(mhsa.state_dict(), strict=False)
    assert sorted(missing) == ["clustering.w_prob.bias", "clustering.w_prob.weight"] and not unexpected

    def every_token(module, sign, key_padding_mask, seg):
        alternating = (torch.arange(sign.shape[1]) % 2 == 0).expand_as(sign).contiguous()
        return enact_ops.segment_runs(alternating, key_padding_mask)

    enact.clustering.register_segmentation_hook(every_token)
    x = torch.randn(N, B, C, dtype=torch.float64)
    pos = torch.randn(N, B, C, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 7:] = True
    outs, grads = [], []
    for module in (mhsa, enact):
        xx = x.clone().requires_grad_()
        out = module(xx, query_pos=pos, key_padding_mask=mask)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append([xx.grad] + [module.attn.in_proj_weight.grad, module.attn.out_proj.weight.grad])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seq_first", [True, False])
def test_identity_mode_equals_standard_attention(seq_first):
    """mode="identity": every valid token its own cluster (weight 1), pads in none; the layer
    equals standard attention, values and gradients."""
    torch.manual_seed(0)
    N, B, C = 13, 3, 16
    mhsa = MultiheadAttention(C, 4, batch_first=not seq_first).double()
    enact = EnactAttention(C, 4, batch_first=not seq_first, mode="identity").double()
    enact.load_state_dict(mhsa.state_dict(), strict=False)
    shape = (N, B, C) if seq_first else (B, N, C)
    x, pos = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 9:] = True
    outs = []
    for module in (mhsa, enact):
        xx = x.clone().requires_grad_()
        out = module(xx, query_pos=pos, key_padding_mask=mask)
        out.pow(2).sum().backward()
        outs.append((out, xx.grad, module.attn.in_proj_weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    key = (x + pos).transpose(0, 1) if seq_first else x + pos
    clustered = enact.clustering(key, key, mask)
    expected_ids = torch.arange(N).expand(B, N).masked_fill(mask, -1)
    assert torch.equal(clustered.cluster_ids, expected_ids)
    assert enact.statistics()["compression"] == 1.0


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gradients_reach_w_prob_and_projections(attn_implementation):
    torch.manual_seed(0)
    m = EnactAttention(16, 4, attn_drop=0.1, proj_drop=0.1, attn_implementation=attn_implementation)
    x = torch.randn(40, 2, 16)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 30:] = True
    m(x, query_pos=torch.randn_like(x), key_padding_mask=mask).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_whole_module_float64():
    torch.manual_seed(0)
    m = EnactAttention(6, 2, sigma=1).double()
    x = torch.randn(9, 2, 6, dtype=torch.float64)
    pos = torch.randn(9, 2, 6, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    # segmentation is a discrete decision: freeze it at the unperturbed input
    frozen = {}
    m.clustering.register_segmentation_hook(lambda module, sign, mask, seg: frozen.setdefault("seg", seg))
    with torch.no_grad():
        m(x, query_pos=pos, key_padding_mask=mask)

    def g(xx, w_prob, in_proj):  # parameters as inputs, so gradcheck checks their gradients too
        return functional_call(m, {"clustering.w_prob.weight": w_prob, "attn.in_proj_weight": in_proj},
                               (xx,), {"query_pos": pos, "key_padding_mask": mask})

    params = [m.clustering.w_prob.weight, m.attn.in_proj_weight]
    inputs = (x.clone().requires_grad_(), params[0].detach().clone().requires_grad_(), params[1].detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(g, inputs, fast_mode=True)
    assert frozen["seg"].num_clusters.min() > 1


@pytest.mark.parametrize("seq_first", [False, True])
@pytest.mark.parametrize("use", ["both", "key", "value"])
@pytest.mark.parametrize("mode", ["segments", "uniform"])
def test_shared_clustering_matches_plain(seq_first, use, mode):
    """shared=True (key = value + pos) == the plain call: outputs, and the gradients of value, pos
    and W_prob (the fused backward sums the key's gradients into value's)."""
    torch.manual_seed(0)
    B, N, C = 3, 40, 8
    m = EnactClustering(C, sigma=1, mode=mode).double()
    with torch.no_grad():
        m.w_prob.weight.normal_(0, 3.0)
        m.w_prob.bias.fill_(0.2)
    src = torch.randn(N, B, C, dtype=torch.float64) if seq_first else torch.randn(B, N, C, dtype=torch.float64)
    pos = torch.randn_like(src)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, 31:] = True
    mask[2, 5:9] = True
    results = []
    for shared in (False, True):
        m.zero_grad()
        s, p = src.clone().requires_grad_(), pos.clone().requires_grad_()
        value, key_pos = (s.transpose(0, 1), p.transpose(0, 1)) if seq_first else (s, p)
        key = value + key_pos
        out = m(key, value, mask, shared=shared, key_pos=key_pos if shared else None)
        loss = 0
        if use in ("both", "key"):
            loss = loss + (out.key * torch.linspace(-1, 2, C, dtype=torch.float64)).pow(2).sum()
        if use in ("both", "value"):
            loss = loss + (out.value * torch.linspace(1, -3, C, dtype=torch.float64)).sin().sum()
        loss.backward()
        results.append((out, s.grad, p.grad, m.w_prob.weight.grad.clone(), m.w_prob.bias.grad.clone()))
    (plain, *plain_grads), (fused, *fused_grads) = results
    for a, b in zip(fused[:2] + fused[3:], plain[:2] + plain[3:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("x_seq_first", [False, True])
@pytest.mark.parametrize("identity_seq_first", [None, False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("expanded_grad", [False, True])
def test_projection_matches_linear(x_seq_first, identity_seq_first, bias, expanded_grad):
    torch.manual_seed(0)
    B, N, C_in, C_out = 3, 7, 6, 5

    def make(c, seq_first):
        t = torch.randn(N, B, c, dtype=torch.float64) if seq_first else torch.randn(B, N, c, dtype=torch.float64)
        return t.requires_grad_()

    x = make(C_in, x_seq_first)
    ident = make(C_out, identity_seq_first) if identity_seq_first is not None else None
    w = torch.randn(C_out, C_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C_out, dtype=torch.float64, requires_grad=True) if bias else None
    view = lambda t, sf: t.transpose(0, 1) if sf else t  # noqa: E731
    g = torch.ones((), dtype=torch.float64).expand(B, N, C_out) if expanded_grad else torch.randn(B, N, C_out, dtype=torch.float64)
    results = []
    for ours in (True, False):
        leaves = [t for t in (x, ident, w, b) if t is not None]
        xv = view(x, x_seq_first)
        iv = view(ident, identity_seq_first) if ident is not None else None
        if ours:
            y = project(xv, w, b, iv)
        else:
            y = torch.nn.functional.linear(xv, w, b)
            y = y if iv is None else iv + y
        grads = torch.autograd.grad(y, leaves, g)
        results.append((y, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, c in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    if identity_seq_first is not None:  # the residual keeps identity's layout
        assert results[0][0].stride() == view(ident, identity_seq_first).stride()
    with torch.no_grad():  # plain ops (traceable), same values
        iv = view(ident, identity_seq_first) if ident is not None else None
        torch.testing.assert_close(project(view(x, x_seq_first), w, b, iv), results[1][0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("learned_pos", [False, True])
def test_attention_matches_plain_composition(batch_first, learned_pos):
    """EnactAttention (fused clustering backward, projections without copies, residual fused into
    the output projection) == EnactClustering + multi_head_attention + residual, written plainly:
    output and the gradients of the input, the position embedding and every parameter."""
    torch.manual_seed(0)
    N, B, C = 37, 3, 16
    m = EnactAttention(C, 4, sigma=1, batch_first=batch_first).double()
    with torch.no_grad():
        m.clustering.w_prob.weight.normal_(0, 2.0)
        m.clustering.w_prob.bias.fill_(0.1)
        m.attn.in_proj_bias.normal_()
        m.attn.out_proj.bias.normal_()
    x = torch.randn(N, B, C, dtype=torch.float64)
    pos = torch.randn(N, B, C, dtype=torch.float64)
    if batch_first:
        x, pos = x.transpose(0, 1).contiguous(), pos.transpose(0, 1).contiguous()
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 30:] = True
    results = []
    for plain in (False, True):
        m.zero_grad()
        xx, pp = x.clone().requires_grad_(), pos.clone().requires_grad_(learned_pos)
        if plain:
            src, p = (xx, pp) if batch_first else (xx.transpose(0, 1), pp.transpose(0, 1))
            c = m.clustering(src + p, src, mask)
            out = src + multi_head_attention(src + p, c.key, c.value, m.attn, c.cluster_mask)
            out = out if batch_first else out.transpose(0, 1)
        else:
            out = m(xx, query_pos=pp, key_padding_mask=mask)
        g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out.backward(g)
        grads = [xx.grad] + ([pp.grad] if learned_pos else []) + [t.grad.clone() for t in m.parameters()]
        results.append((out, grads))
    (ours, ours_grads), (ref, ref_grads) = results
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert len(ours_grads) == len(ref_grads)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_uniform_mode_chunks():
    torch.manual_seed(0)
    m = EnactClustering(4, sigma=1, mode="uniform").double()
    key, mask = detr_batch([(5, 6), (3, 4)], C=4, seed=2)
    value = torch.randn(2, 30, 3, dtype=torch.float64)
    out = m(key, value, mask)
    runs_module = EnactClustering(4, sigma=1).double()
    runs_module.load_state_dict(m.state_dict())
    assert runs_module.radius == 3 and m.radius == 2  # 6 sigma + 1 taps vs the authors' 6 sigma - 1
    h = m.information(key, ~mask, torch.float64)
    _, sign = m.smoothed_information(h, ~mask)
    runs = enact_ops.segment_runs(sign, mask)
    L = enact_ops.uniform_chunk_length(runs)
    for b, n in enumerate((~mask).sum(1).tolist()):
        ids = out.cluster_ids[b][~mask[b]]
        M = n // L if n >= L else 1
        start = (n % L) // 2 if n >= L else 0
        expected = [-1] * n
        for j in range(n):
            if n < L:
                expected[j] = 0
            elif start <= j < start + M * L:
                expected[j] = (j - start) // L
        assert ids.tolist() == expected
        assert int(out.cluster_mask[b].logical_not().sum()) == M


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_pool_like_float32(backend, dtype):
    """bf16 / fp16 keys and values on the plain path: steps 1-6 run in float32 on the upcast
    inputs, so the clusters and weights are float32's on the same values and the pooled outputs
    float32's rounded to the inputs' dtype.  (EnactAttention under autocast against float32:
    tests/test_mixed_precision.py.)"""
    torch.manual_seed(0)
    m = EnactClustering(16, sigma=2, backend=backend)
    key, value = torch.randn(2, 60, 16).to(dtype), torch.randn(2, 60, 16).to(dtype)
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[1, 50:] = True
    low, ref = m(key, value, mask), m(key.float(), value.float(), mask)
    assert low.key.dtype == low.value.dtype == dtype and low.weights.dtype == torch.float32
    assert torch.equal(low.cluster_ids, ref.cluster_ids) and ref.cluster_mask.logical_not().sum(1).min() > 2
    torch.testing.assert_close(low.weights, ref.weights, rtol=0, atol=0)
    for a, b in ((low.key, ref.key), (low.value, ref.value)):
        torch.testing.assert_close(a.float(), b.to(dtype).float(), rtol=0, atol=0)


def test_deprecated_names_still_work_with_a_warning():
    """forward_shared and segment_with_sizes (now ``shared=True`` and ``segment(...,
    return_sizes=True)``) and the enact_ops names moved to their submodules."""
    torch.manual_seed(0)
    m = EnactClustering(8, sigma=1).double()
    value, pos = torch.randn(2, 20, 8, dtype=torch.float64), torch.randn(2, 20, 8, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="forward_shared is deprecated"):
        old = m.forward_shared(value + pos, value, pos)
    new = m(value + pos, value, shared=True, key_pos=pos)
    assert torch.equal(old.key, new.key) and torch.equal(old.cluster_ids, new.cluster_ids)
    sign = torch.rand(2, 20) > 0.5
    with pytest.warns(DeprecationWarning, match="segment_with_sizes is deprecated"):
        seg, sizes = m.segment_with_sizes(sign, None)
    assert sizes == m.segment(sign, return_sizes=True)[1] and torch.equal(seg.cluster_ids, m.segment(sign).cluster_ids)
    for name in ("check_cluster_inputs", "check_rows_have_tokens", "count_runs"):
        with pytest.warns(DeprecationWarning, match=f"enact_ops.{name} is deprecated"):
            assert callable(getattr(enact_ops, name))


def test_tiny_and_single_image_and_no_grad():
    m = EnactAttention(8, 2, sigma=5)
    with torch.no_grad():
        for n in (1, 2, 3):  # N far below the 31 taps
            out = m(torch.randn(n, 1, 8))
            assert out.shape == (n, 1, 8) and torch.isfinite(out).all()
    stats = m.statistics()
    assert stats["clusters_per_image"] >= 1 and stats["compression"] >= 1


def test_batch_first_matches_sequence_first():
    torch.manual_seed(0)
    a = EnactAttention(8, 2, batch_first=False).double()
    b = EnactAttention(8, 2, batch_first=True).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(20, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(a(x).transpose(0, 1), b(x.transpose(0, 1)))


def test_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("enact_ops._C is not built")
    torch.manual_seed(0)
    x, mask = detr_batch([(8, 9), (5, 7)], C=16, seed=3)
    outs = []
    for backend in BACKENDS:
        torch.manual_seed(1)
        m = EnactAttention(16, 4, backend=backend, batch_first=True).double()
        xx = x.clone().requires_grad_()
        out = m(xx, key_padding_mask=mask)
        out.sum().backward()
        outs.append((out, xx.grad, m.clustering.w_prob.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="sigma must be a positive int"):
        EnactAttention(8, 2, sigma=0)
    with pytest.raises(ValueError, match="sigma must be a positive int"):
        EnactClustering(8, sigma=2.5)
    with pytest.raises(ValueError, match="must be a positive multiple of num_heads"):
        EnactAttention(10, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        EnactClustering(8, mode="kmeans")
    m = EnactClustering(8)
    k = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match=r"key must be \(B, N, 8\)"):
        m(torch.randn(2, 10, 7), k)
    with pytest.raises(ValueError, match=r"value must be \(B, N, C\) with \(B, N\) = \(2, 10\)"):
        m(k, torch.randn(2, 9, 8))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        m(k, k, torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 10\) like key"):
        m(k, k, torch.zeros(2, 11, dtype=torch.bool))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1] = True
    with pytest.raises(ValueError, match="image 1 of the batch has no valid token"):
        m(k, k, mask)
    attn = EnactAttention(8, 2)
    with pytest.raises(ValueError, match="does not take attn_mask"):
        attn(torch.randn(5, 1, 8), attn_mask=torch.zeros(5, 5, dtype=torch.bool))


@pytest.mark.parametrize("cls", [MultiheadAttention, EnactAttention])
def test_former_attention_keyword_still_works_with_a_warning(cls):
    """``attention="eager"`` was the name of ``attn_implementation`` before it meant the encoder's
    attention module: it still selects the implementation, with a DeprecationWarning."""
    with pytest.warns(DeprecationWarning, match="attn_implementation='eager'"):
        m = cls(16, 4, attention="eager")
    assert m.attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        cls(16, 4, attn_implementation="flash")


@pytest.mark.parametrize("seq_first", [False, True])
def test_steps_1_4_primitives_equal_linear_and_conv1d(seq_first):
    """token_logits (a gemv, no TF32 mode) equals F.linear, and the window-sum smoothing equals
    F.conv1d (which cuDNN runs in TF32), in float64 and for DETR's sequence-first layout."""
    from projects.enact.modeling.enact_fused import token_logits

    torch.manual_seed(0)
    x = torch.randn(7, 3, 16, dtype=torch.float64)
    x = x.transpose(0, 1) if seq_first else x.permute(1, 0, 2).contiguous()  # (B, N, C)
    w, b = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, dtype=torch.float64)
    torch.testing.assert_close(token_logits(x, w, b), torch.nn.functional.linear(x, w, b)[..., 0], rtol=1e-12, atol=1e-12)
    h = torch.randn(3, 40, dtype=torch.float64)
    taps = gaussian_kernel(3, 9, torch.float64)
    expected = torch.nn.functional.conv1d(h[:, None], taps.view(1, 1, -1), padding=9)[:, 0]
    torch.testing.assert_close(enact_ops.reference.correlate_rows(h, taps), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA only")
def test_tf32_settings_do_not_change_the_clusters():
    """Steps 1-6 are exact float32 whatever the global TF32 settings: the same clusters and
    (to float32 rounding) the same pooled keys with TF32 off and on."""
    torch.manual_seed(0)
    m = EnactClustering(256, sigma=5).cuda()
    key = torch.randn(4, 3400, 256, device="cuda")
    value = torch.randn_like(key)
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    try:
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        exact = m(key, value)
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
        tf32 = m(key, value)
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
    assert torch.equal(exact.cluster_ids, tf32.cluster_ids)
    torch.testing.assert_close(exact.weights, tf32.weights, rtol=0, atol=0)
    torch.testing.assert_close(exact.key, tf32.key, rtol=1e-6, atol=1e-6)


class _OpNames(TorchDispatchMode):
    """The enact_ops operators a region runs, by name (what dispatch sees; the kernels an operator
    calls inside itself are not listed)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("enact_ops."):
            self.names.append(name.split(".", 1)[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not enact_ops.compiled_available("cpu"), reason="enact_ops._C is not built")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not (torch.cuda.is_available() and enact_ops.compiled_available("cuda")), reason="no GPU with enact_ops CUDA kernels")]),
])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_encoder_self_attention_takes_the_fused_path(amp, device):
    """With the extension built, EnactAttention in encoder self-attention runs steps 1-4 and 6-7 on
    the registered operators (smoothed_information, pool_shared_key_value; backward: its formula's
    two kernels), in training and inference, float32 and under bf16
    autocast: not a silent fallback to the reference path or the plain pooling."""
    torch.manual_seed(0)
    m = EnactAttention(16, 4).to(device)
    x = torch.randn(30, 2, 16, device=device, requires_grad=True)
    pos = torch.randn_like(x)
    fused = ["smoothed_information", "segment_runs", "pool_shared_key_value"]
    with torch.autocast(device, dtype=amp or torch.bfloat16, enabled=amp is not None):
        with _OpNames() as ops:
            out = m(x, query_pos=pos)
    assert ops.names == fused
    with _OpNames() as ops:
        out.float().sum().backward()
    # the operator's autograd formula: the two backward kernels, once each (no autograd.grad)
    assert ops.names == ["segment_softmax_pool_backward_sum", "smoothed_information_backward"]
    assert m.clustering.w_prob.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    with torch.no_grad(), _OpNames() as ops:  # inference: the same operators
        m(x, query_pos=pos)
    assert ops.names == fused
    traces = []
    m.clustering.register_trace_hook(lambda _, trace: traces.append(trace))  # h computed apart for it
    with _OpNames() as ops:
        m(x, query_pos=pos)
    assert ops.names == fused and traces[0].information.shape == (2, 30)


def test_torch_compile_equals_eager():
    """torch.compile(EnactAttention) (aot_eager backend) gives eager's values and gradients."""
    torch.manual_seed(0)
    m = EnactAttention(16, 4)
    x = torch.randn(30, 2, 16)
    pos = torch.randn_like(x)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 24:] = True
    results = []
    for module in (m, torch.compile(m, backend="aot_eager", dynamic=False)):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        out = module(xi, query_pos=pos, key_padding_mask=mask)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]))
    (out_e, gx_e, gp_e), (out_c, gx_c, gp_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp_c, gp_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unclustered_tail_keeps_the_last_keys_apart():
    """unclustered_tail = T (PnP-DETR's pooled tokens): the last T keys are attended as they are and
    left out of the clustering; identity mode still equals standard attention, pads included."""
    torch.manual_seed(0)
    attn = EnactAttention(16, 2, sigma=1, mode="identity").eval()
    attn.unclustered_tail = 3
    x, pos = torch.randn(12, 2, 16), torch.randn(12, 2, 16)  # (N, B, C)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 6:9] = True  # image 1: pads between its clustered tokens and the kept ones
    with torch.no_grad():
        out = attn(x, query_pos=pos, key_padding_mask=mask)
        ref = MultiheadAttention.forward(attn, x, query_pos=pos, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert attn.clustering.last_num_tokens.tolist() == [9, 6]  # the clustered part's valid tokens
    attn.clustering.mode = "segments"
    with torch.no_grad():
        attn(x, query_pos=pos, key_padding_mask=mask)
    assert (attn.clustering.last_num_clusters <= torch.tensor([9, 6])).all()
    assert attn.clustering.last_num_tokens.tolist() == [9, 6]


def test_unclustered_tail_under_autocast_equals_attention_in_identity_mode():
    """unclustered_tail under bf16 autocast: the kept keys join the clusters in the attention's
    dtype; identity mode equals MHSA under the same autocast."""
    torch.manual_seed(0)
    attn = EnactAttention(16, 2, sigma=1, mode="identity").train()
    attn.unclustered_tail = 3
    x, pos = torch.randn(12, 2, 16, requires_grad=True), torch.randn(12, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, query_pos=pos)
        ref = MultiheadAttention.forward(attn, x, query_pos=pos)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
