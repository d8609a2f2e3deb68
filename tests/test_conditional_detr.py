"""Tests of the Conditional DETR meta-architecture.

The parameter count uses the real configuration (configs/conditional_detr_r50_50ep.py: R50,
6 + 6 layers, C = 256, 300 queries); the functional tests use that config shrunk to a tiny model
(ResNet-18 backbone, 2 + 2 layers, C = 32) to stay fast on a CPU.
"""

import math

import pytest
import torch
from detectron2.config import LazyCall as L
from detection_helpers import (
    NUM_CLASSES,
    RecordingAttention,
    build,
    check_detections,
    checked_gradients,
    image,
    infer,
    inference_batch,
    model_config,
    sample,
    tiny_config,
    train_steps,
    training_losses,
    two_image_batch,
)

from projects.enact.modeling.attention import MultiheadAttention
from projects.enact.modeling.conditional_detr import (
    ConditionalCrossAttention,
    ConditionalDETR,
    inverse_sigmoid,
    point_sine_embedding,
)
from projects.enact.modeling.position_encoding import PositionEmbeddingSine

# detrex's Conditional DETR R50 with 80 classes (FrozenBN affine terms are buffers).
DETREX_CONDITIONAL_DETR_R50_PARAMS = 43_415_574

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = "conditional_detr_r50_50ep"


@pytest.fixture(scope="module")
def tiny_model(single_thread):
    return build(tiny_config(CONFIG))


def test_parameter_count_matches_detrex_r50():
    model = build(model_config(CONFIG))
    count = sum(p.numel() for p in model.parameters())
    expected = DETREX_CONDITIONAL_DETR_R50_PARAMS
    assert count == expected, count  # exactly detrex's count
    # Canonical structure: 6 + 6 layers, width 256, 300 queries, 80 sigmoid logits.
    assert isinstance(model, ConditionalDETR)
    decoder = model.transformer.decoder
    assert len(model.transformer.encoder.layers) == 6 and len(decoder.layers) == 6
    assert model.query_embed.weight.shape == (300, 256)
    assert model.class_embed.out_features == 80
    # The positional query projection of the cross-attention exists in the first layer only.
    assert [layer.cross_attn.query_pos_proj is not None for layer in decoder.layers] == [True] + [
        False
    ] * 5
    attn = model.transformer.encoder.layers[0].self_attn
    assert isinstance(attn, MultiheadAttention) and attn.num_heads == 8
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    # Losses and matcher of Conditional DETR.
    weights = model.criterion.weight_dict
    assert (weights["loss_ce"], weights["loss_bbox"], weights["loss_giou"]) == (2.0, 5.0, 2.0)
    assert weights["loss_ce_4"] == 2.0 and "loss_ce_5" not in weights
    assert model.criterion.use_focal and model.criterion.focal_alpha == 0.25
    matcher = model.criterion.matcher
    assert matcher.use_focal
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2, 5, 2)
    # Initialisation: prior probability 0.01 and a zero last box layer.
    torch.testing.assert_close(model.class_embed.bias, torch.full((80,), -math.log(0.99 / 0.01)))
    assert not model.bbox_embed.layers[-1].weight.any()


def test_training_step_losses_and_gradients(tiny_model):
    model = tiny_model
    losses = training_losses(model, two_image_batch())
    sum(losses.values()).backward()
    checked_gradients(model, frozen=("backbone.stem", "backbone.res2"))  # freeze_at=2, as DETR's code


def test_inference_returns_instances_inside_the_image(tiny_model):
    model = tiny_model
    batch = inference_batch(two_image_batch())
    del batch[0]["instances"]
    # top-100 over the 12 x 5 (query, class) pairs keeps all 60 of them
    num_pairs = model.num_queries * NUM_CLASSES
    for inst, size in zip(infer(model, batch), [(192, 256), (64, 96)]):
        check_detections(inst, size, NUM_CLASSES)
        assert len(inst) == min(model.select_box_nums_for_evaluation, num_pairs)
        assert ((inst.scores > 0) & (inst.scores < 1)).all()


def test_inference_ranks_query_class_pairs(tiny_model):
    model = tiny_model
    logits = torch.full((1, 3, 4), -9.0)
    logits[0, 1, 2] = 3.0  # best pair: query 1, class 2
    logits[0, 1, 0] = 2.0  # the same query again with class 0
    logits[0, 2, 3] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 3.0, 3.0]]])
    old = model.select_box_nums_for_evaluation
    model.select_box_nums_for_evaluation = 3
    try:
        (result,) = model.inference(logits, boxes, [(10, 20)])
    finally:
        model.select_box_nums_for_evaluation = old
    assert result.pred_classes.tolist() == [2, 0, 3]
    torch.testing.assert_close(result.scores, torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    torch.testing.assert_close(
        result.pred_boxes.tensor,
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0]]),
    )  # the third box is clipped to the image


def test_loss_decreases_on_fixed_images():
    """30 Adam steps on two fixed images: the (weighted, summed) loss drops clearly.

    The randomly initialised backbone has no batch statistics (FrozenBN), so it is frozen here
    (as a pretrained one would be trained at a 10x lower rate); everything else learns."""
    cfg = tiny_config(CONFIG, dropout=0.0)
    cfg.backbone.freeze_at = 5
    model = build(cfg)
    model.train()
    batch = [
        sample(64, 96, 10, [[8, 6, 50, 40], [60, 20, 90, 60]], [1, 3]),
        sample(80, 64, 11, [[5, 30, 40, 75]], [2]),
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(p.requires_grad for p in model.backbone.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    history = train_steps(model, batch, optimizer, steps=30)
    assert all(math.isfinite(x) for x in history)
    assert history[-1] < 0.7 * history[0], history


def test_encoder_attention_is_swappable():
    cfg = tiny_config(CONFIG, num_encoder_layers=3)
    cfg.transformer.encoder.attention = L(RecordingAttention)(embed_dim=32, num_heads=4)
    model = build(cfg)
    layers = [layer.self_attn for layer in model.transformer.encoder.layers]
    assert len(layers) == 3 and all(isinstance(a, RecordingAttention) for a in layers)
    assert layers[0] is not layers[1]
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": image(70, 90, 3)}])
    assert out["instances"].image_size == (70, 90)
    for attn in layers:
        assert attn.calls == [
            ((), ["key", "key_padding_mask", "key_pos", "query", "query_pos", "value"])
        ]
    cfg.transformer.encoder.attention = L(MultiheadAttention)(embed_dim=64, num_heads=4)
    with pytest.raises(ValueError, match="embed_dim"):
        build(cfg)


def test_point_sine_embedding_matches_feature_map_embedding():
    """A point at a pixel's normalised position gets that pixel's positional embedding."""
    h, w = 5, 7
    pos = PositionEmbeddingSine(num_pos_feats=16, eps=0.0)(torch.zeros(1, h, w, dtype=torch.bool))
    ys, xs = torch.meshgrid(torch.arange(1, h + 1), torch.arange(1, w + 1), indexing="ij")
    points = torch.stack((xs / w, ys / h), dim=-1)  # (h, w, 2) as (x, y)
    emb = point_sine_embedding(points, num_pos_feats=16)  # (h, w, 32)
    torch.testing.assert_close(emb.permute(2, 0, 1), pos[0], atol=1e-5, rtol=1e-5)
    x = torch.tensor([0.0, 1e-7, 0.3, 1.0])
    inner = x.clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(inverse_sigmoid(inner).sigmoid(), inner)
    assert torch.isfinite(inverse_sigmoid(x)).all()


@pytest.mark.parametrize("use_query_pos", [True, False])
def test_conditional_cross_attention_concatenates_content_and_space(use_query_pos):
    torch.manual_seed(0)
    c, heads, nq, nk, bs = 16, 2, 3, 5, 2
    attn = ConditionalCrossAttention(c, heads, use_query_pos=use_query_pos, attn_implementation="eager")
    attn.eval()
    x, qpos, sine = torch.randn(nq, bs, c), torch.randn(nq, bs, c), torch.randn(nq, bs, c)
    memory, pos = torch.randn(nk, bs, c), torch.randn(nk, bs, c)
    mask = torch.zeros(bs, nk, dtype=torch.bool)
    mask[1, 3:] = True
    out = attn(x, memory, pos, qpos, sine, key_padding_mask=mask)

    # Reference: per head, logits = (c_q . c_k + p_q . p_k) / sqrt(2 c / h).
    q_c = attn.query_content_proj(x)
    k_c = attn.key_content_proj(memory)
    k_p = attn.key_pos_proj(pos)
    if use_query_pos:
        q_c = q_c + attn.query_pos_proj(qpos)
        k_c = k_c + k_p
    q_s = attn.query_pos_sine_proj(sine)
    v = attn.value_proj(memory)
    d = c // heads
    ref = torch.zeros(nq, bs, c)
    for b in range(bs):
        for i in range(heads):
            sl = slice(i * d, (i + 1) * d)
            content = q_c[:, b, sl] @ k_c[:, b, sl].T  # (nq, nk)
            spatial = q_s[:, b, sl] @ k_p[:, b, sl].T  # (nq, nk)
            logits = (content + spatial) / math.sqrt(2 * d)
            logits = logits.masked_fill(mask[b], float("-inf"))
            ref[:, b, sl] = logits.softmax(-1) @ v[:, b, sl]
    ref = x + attn.out_proj(ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    attn.attn_implementation = "sdpa"
    torch.testing.assert_close(attn(x, memory, pos, qpos, sine, mask), out, atol=1e-5, rtol=1e-5)
