"""Tests of Anchor DETR: row-column decoupled attention, the transformer and the detector.

The parameter count uses the real configuration (configs/anchor_detr_r50_dc5_50ep.py: R50-DC5,
6 + 6 layers, C = 256); the functional tests use the configs shrunk to a tiny model (ResNet-18
backbone, 2 + 2 layers, C = 32, 6 anchors x 2 patterns).
"""

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyCall as L
from detection_helpers import (
    NUM_CLASSES,
    CachedBackbone,
    RecordingAttention,
    build,
    check_detections,
    checked_gradients,
    infer,
    inference_batch,
    instances,
    model_config,
    tiny_config,
    train_steps,
    training_losses,
    two_image_batch,
)

from projects.enact.modeling.anchor_detr import (
    AnchorDETR,
    AnchorDETRTransformer,
    RCDAEncoder,
    RCDAEncoderLayer,
    mask_to_positions,
)
from projects.enact.modeling.rcda import MultiheadRCDA
from projects.enact.modeling.transformer import TransformerEncoder

# detrex's Anchor DETR R50-DC5 with 80 classes (FrozenBN affine terms are buffers).
DETREX_ANCHOR_DETR_R50_DC5_PARAMS = 37_035_884
CONFIG = "anchor_detr_r50_dc5_50ep"  # RCDA encoder
MHSA_CONFIG = "anchor_detr_r50_dc5_50ep_mhsa"  # standard self-attention encoder



def _batch():
    """Two images of different sizes: two boxes (one partly outside the image), and none."""
    return two_image_batch((64, 96), [[10, 12, 60, 50], [70, 30, 120, 60]], (48, 64))


# ---------------------------------------------------------------------- configuration
def test_parameter_count_matches_detrex_r50_dc5():
    model = build(model_config(CONFIG))
    count = sum(p.numel() for p in model.parameters())
    assert count == DETREX_ANCHOR_DETR_R50_DC5_PARAMS, count  # exactly detrex's count
    assert isinstance(model, AnchorDETR)
    t = model.transformer
    assert t.encoder_type == "rcda" and isinstance(t.encoder, RCDAEncoder)
    assert len(t.encoder.layers) == 6 and len(t.decoder_layers) == 6
    assert all(isinstance(layer.self_attn, MultiheadRCDA) for layer in t.encoder.layers)
    assert t.encoder.layers[0].self_attn.num_heads == 8
    assert t.encoder.layers[0].linear1.out_features == 1024
    assert t.anchors.weight.shape == (300, 2) and t.pattern.weight.shape == (3, 256)
    assert ((t.anchors.weight >= 0) & (t.anchors.weight <= 1)).all()
    assert model.num_queries == t.num_queries == 900
    assert model.class_embed.out_features == 80
    assert model.backbone.output_shape()["res5"].stride == 16  # DC5
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "res2"}
    assert model.criterion.use_focal and model.criterion.matcher.use_focal
    assert (model.criterion.matcher.cost_class, model.criterion.matcher.cost_bbox) == (2, 5)
    assert model.criterion.weight_dict["loss_ce_4"] == 2.0
    assert model.criterion.weight_dict["loss_bbox"] == 5.0
    # Same model with the standard self-attention encoder: only the encoder attention differs.
    mhsa = build(model_config(MHSA_CONFIG))
    assert isinstance(mhsa.transformer.encoder, TransformerEncoder)
    assert mhsa.transformer.encoder_type == "mhsa"
    diff = count - sum(p.numel() for p in mhsa.parameters())
    assert diff == 6 * 2 * (256 * 256 + 256)  # RCDA has 6 projections, MHA 4


# ---------------------------------------------------------------------- RCDA
def _naive_rcda(attn, query_x, query_y, key_x, key_y, value, valid_hw):
    """Loop-based RCDA over the valid (hv x wv) part of each image.  Returns the output (B, Q, C)
    and the full-size weights A_x (B, n, Q, W), A_y (B, n, Q, H) (zero outside the image)."""
    b, h, w, c = value.shape
    n, d = attn.num_heads, c // attn.num_heads
    q_len = query_x.shape[1]
    out = torch.zeros(b, q_len, c, dtype=torch.float64)
    a_x_full = torch.zeros(b, n, q_len, w, dtype=torch.float64)
    a_y_full = torch.zeros(b, n, q_len, h, dtype=torch.float64)
    lin = lambda layer, x: F.linear(x.double(), layer.weight.double(), layer.bias.double())  # noqa
    for i in range(b):
        hv, wv = valid_hw[i]
        kx = lin(attn.k_x_proj, key_x[i, :hv, :wv].mean(0))  # (wv, C)
        ky = lin(attn.k_y_proj, key_y[i, :hv, :wv].mean(1))  # (hv, C)
        v = lin(attn.v_proj, value[i, :hv, :wv])  # (hv, wv, C)
        qx, qy = lin(attn.q_x_proj, query_x[i]), lin(attn.q_y_proj, query_y[i])  # (Q, C)
        heads = []
        for j in range(n):
            sl = slice(j * d, (j + 1) * d)
            a_x = torch.softmax(qx[:, sl] @ kx[:, sl].T / d**0.5, dim=-1)  # (Q, wv)
            a_y = torch.softmax(qy[:, sl] @ ky[:, sl].T / d**0.5, dim=-1)  # (Q, hv)
            a_x_full[i, j, :, :wv], a_y_full[i, j, :, :hv] = a_x, a_y
            weight = a_y[:, :, None] * a_x[:, None, :]  # (Q, hv, wv): one weight per pixel
            heads.append(torch.einsum("qhw,hwd->qd", weight, v[..., sl]))
        out[i] = lin(attn.out_proj, torch.cat(heads, dim=-1))
    return out, a_x_full, a_y_full


@pytest.mark.parametrize("h, w", [(3, 5), (5, 3)])  # both contraction orders
def test_rcda_matches_naive_reference_and_ignores_padding(h, w):
    torch.manual_seed(0)
    b, c, q_len = 2, 8, 7
    attn = MultiheadRCDA(c, num_heads=2)
    for p in attn.parameters():  # non-zero biases too
        torch.nn.init.normal_(p, std=0.3)
    query_x, query_y = torch.randn(b, q_len, c), torch.randn(b, q_len, c)
    key_x, key_y, value = torch.randn(b, h, w, c), torch.randn(b, h, w, c), torch.randn(b, h, w, c)
    valid_hw = [(h, w), (h - 1, w - 2)]  # image 1: last row and last two columns padded
    mask = torch.ones(b, h, w, dtype=torch.bool)
    for i, (hv, wv) in enumerate(valid_hw):
        mask[i, :hv, :wv] = False

    out = attn(query_x, query_y, key_x, key_y, value, key_padding_mask=mask)
    a_x, a_y = attn.attention_weights(query_x, query_y, key_x, key_y, key_padding_mask=mask)
    ref, ref_a_x, ref_a_y = _naive_rcda(attn, query_x, query_y, key_x, key_y, value, valid_hw)
    assert out.shape == (b, q_len, c)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_x.double(), ref_a_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_y.double(), ref_a_y, rtol=1e-5, atol=1e-6)
    # Padded columns / rows get exactly zero weight; the weights are distributions.
    assert (a_x[1, :, :, w - 2 :] == 0).all() and (a_y[1, :, :, h - 1 :] == 0).all()
    torch.testing.assert_close(a_x.sum(-1), torch.ones_like(a_x.sum(-1)))
    # Nothing in the padded region influences the output.
    noisy = [t.clone() for t in (key_x, key_y, value)]
    for t in noisy:
        t[1][mask[1]] = 100 * torch.randn_like(t[1][mask[1]])
    torch.testing.assert_close(attn(query_x, query_y, *noisy, key_padding_mask=mask), out)
    # Without a mask, the unpadded image 0 gives the same result.
    torch.testing.assert_close(
        attn(query_x[:1], query_y[:1], key_x[:1], key_y[:1], value[:1]), out[:1]
    )


def test_rcda_key_pooling_all_averages_over_the_padded_map_like_the_authors_code():
    torch.manual_seed(0)
    b, h, w, c = 2, 3, 4, 8
    key_x, key_y = torch.randn(b, h, w, c), torch.randn(b, h, w, c)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    k_x, k_y, pad_x, pad_y = MultiheadRCDA.pool_keys(key_x, key_y, mask, "all")
    torch.testing.assert_close(k_x, key_x.mean(1))
    torch.testing.assert_close(k_y, key_y.mean(2))
    assert pad_x[1].tolist() == [False, False, False, True] and pad_y[1].tolist() == [False, False, True]
    v_x, _, v_pad_x, _ = MultiheadRCDA.pool_keys(key_x, key_y, mask)  # "valid"
    torch.testing.assert_close(v_x[1, :3], key_x[1, :2, :3].mean(0))
    assert not torch.allclose(v_x[1], k_x[1]) and torch.equal(v_pad_x, pad_x)
    torch.testing.assert_close(v_x[0], k_x[0])  # an unpadded image: both the same

    attn = MultiheadRCDA(c, 2, key_pooling="all")
    q = torch.randn(b, 5, c)
    value = torch.randn(b, h, w, c)
    out_all = attn(q, q, key_x, key_y, value, key_padding_mask=mask)
    attn.key_pooling = "valid"
    out_valid = attn(q, q, key_x, key_y, value, key_padding_mask=mask)
    torch.testing.assert_close(out_all[0], out_valid[0])
    assert not torch.allclose(out_all[1], out_valid[1])

    transformer = AnchorDETRTransformer(
        RCDAEncoder(num_layers=1, embed_dim=c, ffn_dim=16, num_heads=2),
        num_decoder_layers=1, num_heads=2, ffn_dim=16, num_anchors=4, num_patterns=1,
        rcda_key_pooling="all",
    )
    pools = [m.key_pooling for m in transformer.modules() if isinstance(m, MultiheadRCDA)]
    assert pools == ["all", "all"]
    with pytest.raises(ValueError, match="key_pooling must be one of"):
        MultiheadRCDA(c, 2, key_pooling="padded")
    with pytest.raises(ValueError, match="key_pooling must be one of"):
        AnchorDETRTransformer(RCDAEncoder(num_layers=1, embed_dim=c, ffn_dim=16, num_heads=2),
                              num_heads=2, rcda_key_pooling="mean")


def test_positions_and_queries():
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    x, y = mask_to_positions(mask)
    torch.testing.assert_close(x[0], (torch.arange(6) + 0.5) / 6)
    torch.testing.assert_close(x[1, :3], (torch.arange(3) + 0.5) / 3)
    torch.testing.assert_close(y[1, :2], torch.tensor([0.25, 0.75]))
    t = AnchorDETRTransformer(
        RCDAEncoder(num_layers=1, embed_dim=32, num_heads=4), 1, 4, num_anchors=5, num_patterns=3
    )
    content, reference = t.queries(2)
    assert content.shape == (2, 15, 32) and reference.shape == (2, 15, 2)
    # Query p * A + a = (pattern p, anchor a).
    torch.testing.assert_close(content[1, 7], t.pattern.weight[1])
    torch.testing.assert_close(reference[1, 7], t.anchors.weight[2])
    grid = AnchorDETRTransformer(
        RCDAEncoder(num_layers=1, embed_dim=32, num_heads=4),
        1,
        4,
        num_anchors=16,
        anchor_prior="grid",
    )
    assert grid.anchor_points.shape == (16, 2) and grid.num_queries == 48
    assert float(grid.anchor_points.min()) == 0.125 and float(grid.anchor_points.max()) == 0.875


# ---------------------------------------------------------------------- detector
@pytest.mark.parametrize("encoder_type", ["rcda", "mhsa"])
def test_training_step_losses_and_gradients(encoder_type):
    if encoder_type == "mhsa":
        cfg = tiny_config(MHSA_CONFIG)
        cfg.transformer.encoder.attention = L(RecordingAttention)(embed_dim=32, num_heads=4)
    else:
        cfg = tiny_config(CONFIG)
    model = build(cfg)
    losses = training_losses(model, _batch())
    sum(losses.values()).backward()
    trainable = checked_gradients(model, frozen=("backbone.stem", "backbone.res2"))
    # Non-zero everywhere except behind the zero-initialised last layer of the box MLP.
    behind_zero_init = ("bbox_embed.layers.0.", "bbox_embed.layers.1.")
    zero = [n for n, p in trainable if not p.grad.abs().sum() > 0]
    assert all(n.startswith(behind_zero_init) for n in zero), zero
    if encoder_type == "mhsa":
        layers = [layer.self_attn for layer in model.transformer.encoder.layers]
        assert all(isinstance(a, RecordingAttention) and len(a.calls) == 1 for a in layers)
        assert not torch.equal(layers[0].attn.in_proj_weight, layers[1].attn.in_proj_weight)


def test_rcda_encoder_attention_is_one_overridable_method():
    class RecordingLayer(RCDAEncoderLayer):
        def attend(self, src, pos_x, pos_y, mask=None):
            self.shapes = (tuple(src.shape), tuple(pos_x.shape), tuple(pos_y.shape), mask.shape)
            return super().attend(src, pos_x, pos_y, mask)

    class RecordingEncoder(RCDAEncoder):
        layer_class = RecordingLayer

    encoder = RecordingEncoder(num_layers=2, embed_dim=32, num_heads=4, ffn_dim=64)
    transformer = AnchorDETRTransformer(encoder, 1, 4, ffn_dim=64, num_anchors=4, num_patterns=2)
    a0, a1 = (layer.self_attn for layer in encoder.layers)
    assert not torch.equal(a0.q_x_proj.weight, a1.q_x_proj.weight)  # copies re-initialised
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 4:] = True
    hs, reference, memory = transformer(torch.randn(2, 32, 3, 5), mask)
    assert hs.shape == (1, 2, 8, 32) and reference.shape == (2, 8, 2)
    assert memory.shape == (2, 32, 3, 5)
    for layer in encoder.layers:
        assert layer.shapes == ((2, 3, 5, 32), (2, 5, 32), (2, 3, 32), (2, 3, 5))


def test_inference_returns_instances_inside_the_image():
    model = build(tiny_config(CONFIG))
    num_pairs = model.num_queries * NUM_CLASSES  # 60 < 100: every (query, class) pair
    for inst, size in zip(infer(model, inference_batch(_batch())), [(192, 256), (48, 64)]):
        check_detections(inst, size, NUM_CLASSES)
        assert len(inst) == min(num_pairs, 100)
        assert ((inst.scores > 0) & (inst.scores < 1)).all()
    # Top-k over (query, class) pairs: with k = 4 the best four sigmoid scores over all pairs.
    logits = torch.tensor([[[0.0, 3.0], [2.0, 1.0], [-1.0, 2.5]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    model.select_box_nums_for_evaluation = 4
    (res,) = model.inference(logits, boxes, [(10, 20)])
    assert res.pred_classes.tolist() == [1, 1, 0, 1]
    torch.testing.assert_close(res.scores, torch.tensor([3.0, 2.5, 2.0, 1.0]).sigmoid())
    torch.testing.assert_close(res.pred_boxes.tensor[1], torch.tensor([0.0, 0.0, 20.0, 10.0]))
    torch.testing.assert_close(res.pred_boxes.tensor[2], torch.tensor([0.0, 0.0, 10.0, 5.0]))


def test_loss_decreases_on_fixed_images():
    # The backbone is frozen (freeze_at=5) and, the images being fixed, its output cached to keep
    # the 30 steps fast; everything after it (input projection, transformer, heads) is trained.
    cfg = tiny_config(CONFIG)
    cfg.backbone.freeze_at = 5
    model = build(cfg)
    model.backbone = CachedBackbone(model.backbone)
    model.train()
    batch = _batch()
    batch[1]["instances"] = instances(48, 64, [[20, 8, 50, 40]], [2])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = train_steps(model, batch, optimizer, steps=30)
    assert all(torch.isfinite(torch.tensor(history)))
    assert min(history[-5:]) < 0.5 * history[0], history
