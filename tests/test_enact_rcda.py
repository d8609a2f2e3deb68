"""Tests of separable ENACT for the RCDA encoder of Anchor DETR (projects/enact/modeling/
separable_enact.py; its encoder in enact_rcda.py).

Layer-level tests run in float64 on small maps with sigma = 1 or 2 (so that the short row and
column sequences split into several clusters); the detector tests use
configs/anchor_detr_r50_dc5_50ep_enact.py shrunk to a tiny Anchor DETR (ResNet-18, 2 + 2 layers,
C = 32) with the ENACT-RCDA encoder.
"""

import math

import pytest
import torch
from detection_helpers import (
    CachedBackbone,
    build,
    checked_gradients,
    sample,
    tiny_config,
    train_steps,
    training_losses,
)

import enact_ops
from projects.enact.modeling.anchor_detr import RCDAEncoder, RCDAEncoderLayer
from projects.enact.modeling.enact import EnactClustering
from projects.enact.modeling.enact_rcda import (
    EnactRCDAEncoder,
    EnactRCDAEncoderLayer,
    cluster_grid,
)
from projects.enact.modeling.rcda import MultiheadRCDA

C, HEADS = 16, 2

# These tensors are small: one intra-op thread is as fast and, on a busy 2-core machine,
# several times faster than OpenMP threads competing with other processes.
pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------- helpers
def _tiny_anchor_detr(enact: bool = True, sigma=None, freeze_at=None):
    """The tiny Anchor DETR with the RCDA or (``enact``) the ENACT-RCDA encoder, seeded;
    ``sigma`` and ``freeze_at`` replace the config's when given."""
    cfg = tiny_config("anchor_detr_r50_dc5_50ep_enact" if enact else "anchor_detr_r50_dc5_50ep")
    if sigma is not None:
        cfg.transformer.encoder.sigma = sigma
    if freeze_at is not None:
        cfg.backbone.freeze_at = freeze_at
    return build(cfg)


def _randomise(module, std=0.3):
    """Non-trivial weights and biases everywhere (LayerNorm scales around 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, std)


def _force_singletons(layer):
    """Make both clusterings of an ENACT-RCDA layer put every valid column / row in its own
    cluster (alternating signs), whatever the information signal."""
    for clustering in (layer.cluster_x, layer.cluster_y):

        def segment(module, sign, key_padding_mask, seg):
            alternating = (torch.arange(sign.shape[1], device=sign.device) % 2 == 0).expand_as(sign)
            return enact_ops.segment_runs(alternating.contiguous(), key_padding_mask, backend=module.backend)

        clustering.register_segmentation_hook(segment)


def _inputs(b, h, w, valid_hw, dtype=torch.float64, seed=0, garbage=True):
    """src (B, H, W, C), pos_x (B, W, C), pos_y (B, H, C), mask (B, H, W): image i valid on its
    top-left valid_hw[i] block; the padded part of src holds large values (it must not matter)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(b, h, w, C, generator=g, dtype=dtype)
    pos_x = torch.randn(b, w, C, generator=g, dtype=dtype)
    pos_y = torch.randn(b, h, C, generator=g, dtype=dtype)
    mask = torch.ones(b, h, w, dtype=torch.bool)
    for i, (hv, wv) in enumerate(valid_hw):
        mask[i, :hv, :wv] = False
    if garbage:
        src = torch.where(mask[..., None], 50 * torch.randn(src.shape, generator=g, dtype=dtype), src)
    return src, pos_x, pos_y, mask


def _layers(sigma=1, seed=0):
    """A baseline RCDA layer and an ENACT-RCDA layer with the same (random) shared weights."""
    torch.manual_seed(seed)
    base = RCDAEncoderLayer(MultiheadRCDA(C, HEADS), C, ffn_dim=24).double()
    _randomise(base)
    enact = EnactRCDAEncoderLayer(MultiheadRCDA(C, HEADS), C, ffn_dim=24, sigma=sigma).double()
    result = enact.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(
        f"cluster_{a}.w_prob.{p}" for a in "xy" for p in ("weight", "bias")
    )
    with torch.no_grad():  # non-zero W_prob biases too (they do not matter: softmax)
        for clustering in (enact.cluster_x, enact.cluster_y):
            clustering.w_prob.weight.normal_(0.0, 1.0)
            clustering.w_prob.bias.normal_(0.0, 1.0)
    return base, enact


def _naive_enact_1d(w_prob, keys, sigma):
    """ENACT on one valid sequence keys (n, C), written out: returns the clusters (lists of
    indices, in order) and the weight of every token."""
    n = keys.shape[0]
    logits = keys @ w_prob.weight[0].double() + w_prob.bias[0].double()
    p = torch.softmax(logits, 0) + 1e-8
    info = -p * torch.log2(p)
    r = 3 * sigma
    taps = [math.exp(-(x**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi)) for x in range(-r, r + 1)]
    at = lambda t, i: t[i] if 0 <= i < n else 0.0  # noqa: E731  zero padding at both ends
    smoothed = torch.stack([sum(taps[k] * at(info, i + k - r) for k in range(2 * r + 1)) for i in range(n)])
    smoothed = smoothed.detach()
    sign = [float(-at(smoothed, i - 1) + 2 * smoothed[i] - at(smoothed, i + 1)) > 0 for i in range(n)]
    clusters = [[0]]
    for i in range(1, n):
        if sign[i] == sign[i - 1]:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    weights = torch.zeros(n, dtype=torch.float64)
    for members in clusters:
        weights[members] = torch.softmax(smoothed[members], 0)
    return clusters, weights


# ---------------------------------------------------------------------- (a) identity clustering
@pytest.mark.parametrize("h, w", [(5, 7), (7, 5)])  # both contraction orders of rcda_combine
def test_singleton_clusters_equal_baseline_rcda(h, w):
    base, enact = _layers()
    _force_singletons(enact)
    src, pos_x, pos_y, mask = _inputs(2, h, w, [(h, w), (h - 2, w - 3)])
    outs, grads = [], []
    for layer in (base, enact):
        leaves = [t.clone().requires_grad_() for t in (src, pos_x, pos_y)]
        out = layer(*leaves, mask)
        out.mul(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in leaves] + [dict(layer.named_parameters())])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for g_enact, g_base in zip(grads[1][:3], grads[0][:3]):
        torch.testing.assert_close(g_enact, g_base, rtol=1e-10, atol=1e-10)
    params_base, params_enact = grads[0][3], grads[1][3]
    for name, p in params_base.items():
        torch.testing.assert_close(params_enact[name].grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)
    # every valid column / row is one cluster: W' = valid columns, H' = valid rows
    stats = enact.statistics()
    assert stats["compression"] == 1.0 and stats["column_ratio"] == 1.0 and stats["row_ratio"] == 1.0
    assert stats["clusters_per_image"] == (h * w + (h - 2) * (w - 3)) / 2
    # ... and with the real clustering the layer does compress and differs from the baseline
    _, enact = _layers()
    out = enact(src, pos_x, pos_y, mask)
    assert enact.statistics()["compression"] > 1.5
    assert not torch.allclose(out, outs[0])


# ---------------------------------------------------------------------- (b) separable pooling
@pytest.mark.parametrize("sigma", [1, 2])
def test_separable_pooling_matches_naive_loops(sigma):
    torch.manual_seed(1)
    b, h, w, c_v = 3, 9, 13, 5
    cluster_x = EnactClustering(C, sigma=sigma).double()
    cluster_y = EnactClustering(C, sigma=sigma).double()
    g = torch.Generator().manual_seed(2)
    key_x = torch.randn(b, w, C, generator=g, dtype=torch.float64)
    key_y = torch.randn(b, h, C, generator=g, dtype=torch.float64)
    value = torch.randn(b, h, w, c_v, generator=g, dtype=torch.float64)
    valid_hw = [(h, w), (6, 8), (1, 11)]  # image 2: a single valid row
    pad_x = torch.ones(b, w, dtype=torch.bool)
    pad_y = torch.ones(b, h, dtype=torch.bool)
    for i, (hv, wv) in enumerate(valid_hw):
        pad_x[i, :wv] = False
        pad_y[i, :hv] = False
        key_x[i, wv:] = 1e3  # padded columns / rows / pixels must not matter
        key_y[i, hv:] = -1e3
        value[i, hv:] = 1e3
        value[i, :, wv:] = 1e3
    grid = cluster_grid(cluster_x, cluster_y, key_x, key_y, value, pad_x, pad_y)

    naive_x = [_naive_enact_1d(cluster_x.w_prob, key_x[i, :wv], sigma) for i, (_, wv) in enumerate(valid_hw)]
    naive_y = [_naive_enact_1d(cluster_y.w_prob, key_y[i, :hv], sigma) for i, (hv, _) in enumerate(valid_hw)]
    w_max = max(len(cols) for cols, _ in naive_x)
    h_max = max(len(rows) for rows, _ in naive_y)
    assert grid.value.shape == (b, h_max, w_max, c_v)
    assert grid.key_x.shape == (b, w_max, C) and grid.key_y.shape == (b, h_max, C)
    compressed = 0
    for i, (hv, wv) in enumerate(valid_hw):
        (cols, alpha), (rows, beta) = naive_x[i], naive_y[i]
        compressed += (len(cols) < wv) + (len(rows) < hv)
        ids_x = torch.full((w,), -1, dtype=torch.int64)
        for j, members in enumerate(cols):
            ids_x[members] = j
        ids_y = torch.full((h,), -1, dtype=torch.int64)
        for j, members in enumerate(rows):
            ids_y[members] = j
        assert torch.equal(grid.column_ids[i], ids_x) and torch.equal(grid.row_ids[i], ids_y)
        torch.testing.assert_close(grid.alpha[i, :wv], alpha, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grid.beta[i, :hv], beta, rtol=1e-9, atol=1e-12)
        assert (grid.alpha[i, wv:] == 0).all() and (grid.beta[i, hv:] == 0).all()
        assert grid.mask_x[i].tolist() == [j >= len(cols) for j in range(w_max)]
        assert grid.mask_y[i].tolist() == [j >= len(rows) for j in range(h_max)]
        expected = torch.zeros(h_max, w_max, c_v, dtype=torch.float64)
        for r, row_members in enumerate(rows):
            for s, col_members in enumerate(cols):
                for hh in row_members:
                    for ww in col_members:
                        expected[r, s] += beta[hh] * alpha[ww] * value[i, hh, ww]
        torch.testing.assert_close(grid.value[i], expected, rtol=1e-9, atol=1e-12)
        expected_kx = torch.zeros(w_max, C, dtype=torch.float64)
        for s, members in enumerate(cols):
            expected_kx[s] = sum(alpha[ww] * key_x[i, ww] for ww in members)
        expected_ky = torch.zeros(h_max, C, dtype=torch.float64)
        for r, members in enumerate(rows):
            expected_ky[r] = sum(beta[hh] * key_y[i, hh] for hh in members)
        torch.testing.assert_close(grid.key_x[i], expected_kx, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grid.key_y[i], expected_ky, rtol=1e-9, atol=1e-12)
    assert compressed >= 3  # the test does exercise multi-member clusters


# ---------------------------------------------------------------------- (c) batch independence
def test_image_in_padded_batch_equals_image_alone():
    torch.manual_seed(3)
    encoder = EnactRCDAEncoder(num_layers=2, embed_dim=C, ffn_dim=24, num_heads=HEADS, sigma=1).double()
    _randomise(encoder, std=0.2)
    h, w, (hv, wv) = 11, 14, (8, 9)
    src, pos_x, pos_y, mask = _inputs(2, h, w, [(h, w), (hv, wv)], seed=4)
    out = encoder(src, pos_x, pos_y, mask)
    assert encoder.statistics()["compression"] > 1.5

    def counts(i):  # (W', H') of image i in every layer, last call
        return [
            (int(layer.cluster_x.last_num_clusters[i]), int(layer.cluster_y.last_num_clusters[i]))
            for layer in encoder.layers
        ]

    in_batch = counts(1)
    alone = encoder(
        src[1:, :hv, :wv].contiguous(), pos_x[1:, :wv].contiguous(), pos_y[1:, :hv].contiguous(), None
    )
    torch.testing.assert_close(out[1, :hv, :wv], alone[0], rtol=1e-9, atol=1e-9)
    # the image's own clusters (W', H' per layer) do not depend on the batch either
    assert counts(0) == in_batch
    expected = sum(hv * wv / (m_x * m_y) for m_x, m_y in in_batch) / len(in_batch)  # N / M, layer mean
    assert encoder.statistics()["compression"] == pytest.approx(expected)
    # padded content does not leak into the valid tokens
    noisy = src.clone()
    noisy[1][mask[1]] = 1e3 * torch.randn(int(mask[1].sum()), C, dtype=torch.float64)
    noisy_out = encoder(noisy, pos_x, pos_y, mask)
    torch.testing.assert_close(noisy_out[1, :hv, :wv], out[1, :hv, :wv], rtol=1e-9, atol=1e-9)


def test_packed_form_equals_project_layer():
    """EnactPackedRCDA (what enact_encoder puts in place of detrex's MultiheadRCDA: packed
    projections, keys pooled over all pixels) with the weights of a project layer whose RCDA pools
    as detrex does (key_pooling="all") computes the layer's attention: one implementation."""
    from projects.enact.modeling.encoder_adapter import EnactPackedRCDA

    _, layer = _layers(sigma=1)
    layer.self_attn.key_pooling = "all"
    layer.eval()
    attn = layer.self_attn
    packed = EnactPackedRCDA(C, HEADS, sigma=1).double().eval()
    projections = (attn.q_x_proj, attn.q_y_proj, attn.k_x_proj, attn.k_y_proj, attn.v_proj)
    with torch.no_grad():
        packed.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
        packed.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
    shared = {k.removeprefix("self_attn."): v for k, v in layer.state_dict().items()
              if k.startswith(("self_attn.out_proj.", "cluster_"))}  # out_proj, cluster_{x,y}.w_prob
    result = packed.load_state_dict(shared, strict=False)
    assert sorted(result.missing_keys) == ["in_proj_bias", "in_proj_weight"] and not result.unexpected_keys
    b, h, w = 2, 9, 11
    src, pos_x, pos_y, mask = _inputs(b, h, w, [(h, w), (6, 8)], seed=6)
    src_x, src_y = src + pos_x[:, None], src + pos_y[:, :, None]
    expected = layer.attend(src, pos_x, pos_y, mask) - src
    out, weights = packed(src_x.reshape(b, h * w, C), src_y.reshape(b, h * w, C), src_x, src_y, src, mask)
    assert weights is None and out.shape == (h * w, b, C)
    torch.testing.assert_close(out.transpose(0, 1).reshape(b, h, w, C), expected, rtol=1e-9, atol=1e-9)
    assert layer.statistics()["compression"] > 1.5 and packed.statistics() == layer.statistics()


# ---------------------------------------------------------------------- (d) gradients
def test_gradients_reach_w_prob_and_rcda_projections():
    _, enact = _layers(sigma=1)
    enact.float()
    src, pos_x, pos_y, mask = _inputs(2, 10, 13, [(10, 13), (7, 9)], dtype=torch.float32, seed=5)
    src.requires_grad_()
    out = enact(src, pos_x, pos_y, mask)
    valid = (~mask)[..., None].float()
    (out * torch.randn_like(out) * valid).sum().backward()  # a loss on the valid tokens only
    stats = enact.statistics()
    assert stats["column_ratio"] < 1 and stats["row_ratio"] < 1
    for name, p in enact.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.endswith("w_prob.bias"):  # the bias cancels in the softmax over each axis
            assert p.grad.abs().sum() > 0, name
    for name in ("cluster_x.w_prob.weight", "cluster_y.w_prob.weight"):
        assert dict(enact.named_parameters())[name].grad.abs().max() > 1e-6, name
    assert src.grad[1][mask[1]].abs().max() == 0  # the padding is no key / value of any cluster


# ---------------------------------------------------------------------- detector-level
def _batch(h0=256, w0=320, h1=192, w1=256):
    """Two images of different sizes (feature maps 8 x 10 and 6 x 8 at stride 32)."""
    return [
        sample(h0, w0, 0, [[40, 48, 240, 200], [180, 120, 300, 240]], [1, 3], output_size=(h0, w0)),
        sample(h1, w1, 1, [[80, 32, 200, 160]], [2], output_size=(h1, w1)),
    ]


def test_baseline_checkpoint_loads_with_only_w_prob_missing():
    base = _tiny_anchor_detr(enact=False)
    enact = _tiny_anchor_detr()
    encoder = enact.transformer.encoder
    assert isinstance(encoder, EnactRCDAEncoder) and encoder.sigma == 3
    assert all(isinstance(layer, EnactRCDAEncoderLayer) and layer.sigma == 3 for layer in encoder.layers)
    assert isinstance(base.transformer.encoder, RCDAEncoder)
    result = enact.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    num_layers, embed_dim = len(encoder.layers), encoder.embed_dim
    assert (num_layers, embed_dim) == (2, 32)  # the tiny model's
    expected = {
        f"transformer.encoder.layers.{i}.cluster_{a}.w_prob.{p}"
        for i in range(num_layers)
        for a in "xy"
        for p in ("weight", "bias")
    }
    assert set(result.missing_keys) == expected
    extra = sum(p.numel() for p in enact.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == num_layers * 2 * (embed_dim + 1)
    # with every column / row its own cluster the loaded detector predicts what the baseline does
    for layer in encoder.layers:
        _force_singletons(layer)
    base.eval(), enact.eval()
    batch = _batch(64, 96, 48, 64)
    with torch.no_grad():
        expected_out, got = base(batch), enact(batch)
    for e, g in zip(expected_out, got):
        torch.testing.assert_close(g["instances"].scores, e["instances"].scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            g["instances"].pred_boxes.tensor, e["instances"].pred_boxes.tensor, rtol=1e-4, atol=1e-3
        )
    with pytest.raises(ValueError, match="sigma"):
        EnactRCDAEncoder(num_layers=1, embed_dim=C, num_heads=HEADS, sigma=2.5)
    with pytest.raises(TypeError, match="MultiheadRCDA"):
        EnactRCDAEncoderLayer(torch.nn.Linear(C, C), C)


def test_training_step_finite_losses_and_gradients():
    model = _tiny_anchor_detr(sigma=1)
    losses = training_losses(model, _batch())
    sum(losses.values()).backward()
    checked_gradients(model)
    for i, layer in enumerate(model.transformer.encoder.layers):
        assert layer.sigma == 1
        for a in "xy":
            grad = getattr(layer, f"cluster_{a}").w_prob.weight.grad
            assert grad.abs().sum() > 0, (i, a)
        stats = layer.statistics()
        assert stats["compression"] > 1.5, stats
    stats = model.transformer.encoder.statistics()
    assert len(stats["layers"]) == 2 and 0 < stats["column_ratio"] < 1 and 0 < stats["row_ratio"] < 1


def test_loss_decreases_on_fixed_images():
    model = _tiny_anchor_detr(sigma=1, freeze_at=5)
    model.backbone = CachedBackbone(model.backbone)
    model.train()
    batch = _batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = train_steps(model, batch, optimizer, steps=30)
    assert all(math.isfinite(x) for x in history)
    assert min(history[-5:]) < 0.5 * history[0], history
    assert model.transformer.encoder.statistics()["compression"] > 1.5
