"""Tests of the DETR meta-architecture (backbone, positional embedding, transformer, detector).

The parameter count uses the real configuration (configs/detr_r50_300ep.py: R50, 6 + 6 layers,
C = 256); the functional tests use that config shrunk to a tiny model (ResNet-18 backbone,
2 + 2 layers, C = 32) to stay fast on a CPU.
"""

import math

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.structures import Boxes, Instances
from detection_helpers import (
    NUM_CLASSES,
    RecordingAttention,
    build,
    check_detections,
    checked_gradients,
    image,
    infer,
    inference_batch,
    instances,
    model_config,
    tiny_config,
    training_losses,
    two_image_batch,
)
from torch import nn

from projects.enact.modeling.attention import MultiheadAttention
from projects.enact.modeling.backbone import build_resnet_backbone, make_resnet_stages
from projects.enact.modeling.detr import DETR
from projects.enact.modeling.position_encoding import PositionEmbeddingSine
from projects.enact.modeling.transformer import Transformer, TransformerDecoder, TransformerEncoder

# detrex's DETR-R50 with 80 classes (FrozenBN affine terms are buffers, not parameters).
DETREX_DETR_R50_PARAMS = 41_521_941



@pytest.fixture(scope="module")
def tiny_model():
    return build(tiny_config("detr_r50_300ep"))


def test_parameter_count_matches_detrex_r50():
    model = build(model_config("detr_r50_300ep"))
    count = sum(p.numel() for p in model.parameters())
    assert count == DETREX_DETR_R50_PARAMS, count  # exactly detrex's count
    # Canonical structure: 6 + 6 layers, width 256, 100 queries, frozen stem.
    assert len(model.transformer.encoder.layers) == 6
    assert len(model.transformer.decoder.layers) == 6
    assert model.query_embed.weight.shape == (100, 256)
    assert model.class_embed.out_features == 81
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    attn = model.transformer.encoder.layers[0].self_attn
    assert isinstance(attn, MultiheadAttention) and attn.num_heads == 8
    assert model.criterion.weight_dict["loss_giou_4"] == 2.0


def test_training_step_losses_and_gradients(tiny_model):
    model = tiny_model
    losses = training_losses(model, two_image_batch())
    # Weighting: canonical weights, aux losses weighted as their base loss, unweighted dropped.
    one = torch.tensor(1.0)
    weighted = model.weight_losses({"loss_bbox": one, "loss_giou_7": one, "class_error": one})
    assert {k: float(v) for k, v in weighted.items()} == {"loss_bbox": 5.0, "loss_giou_7": 2.0}
    sum(losses.values()).backward()
    checked_gradients(model, frozen=("backbone.stem", "backbone.res2"))  # freeze_at=2, as DETR's code
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("backbone.res3") for n in trainable) and not any(
        n.startswith(("backbone.stem", "backbone.res2")) for n in trainable
    )


def test_targets_are_normalised_clipped_and_filtered(tiny_model):
    model = tiny_model
    batch = [
        {
            "image": image(50, 100, 2),
            "instances": instances(
                50,
                100,
                [
                    [10, 5, 30, 25],
                    [90, 40, 130, 80],
                    [20, 20, 20, 30],
                    [120, 0, 140, 10],
                    [-5, -5, 0, 10],
                ],
                [0, 1, 2, 3, 4],
            ),
        },
        {"image": image(40, 40, 3), "instances": Instances((40, 40))},  # no fields at all
    ]
    images = model.preprocess_image(batch)
    targets = model.prepare_targets(batch, images)
    # Kept: box 0 as is, box 1 clipped to (90, 40, 100, 50); dropped: zero width, outside, outside.
    assert targets[0]["labels"].tolist() == [0, 1]
    expected = torch.tensor(
        [[20 / 100, 15 / 50, 20 / 100, 20 / 50], [95 / 100, 45 / 50, 10 / 100, 10 / 50]]
    )
    torch.testing.assert_close(targets[0]["boxes"], expected)
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["labels"].shape == (0,)


def test_inference_returns_instances_inside_output_size(tiny_model):
    model = tiny_model
    batch = inference_batch(two_image_batch())
    del batch[0]["instances"]
    for inst, size in zip(infer(model, batch), [(192, 256), (64, 96)]):
        check_detections(inst, size, NUM_CLASSES)
        assert 0 < len(inst) <= model.num_queries
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()


def test_clear_errors_for_bad_inputs(tiny_model):
    model = tiny_model
    model.eval()
    with pytest.raises(KeyError, match="image"):
        model([{"img": image(32, 32, 0)}])
    with pytest.raises(ValueError, match="image"):
        model([{"image": torch.zeros(32, 32)}])
    with pytest.raises(TypeError, match="list"):
        model({"image": image(32, 32, 0)})
    with pytest.raises(ValueError, match="empty"):
        model([])
    model.train()
    with pytest.raises(ValueError, match="instances"):
        model([{"image": image(32, 32, 0)}])
    inst = Instances((32, 32))
    inst.gt_boxes = Boxes(torch.tensor([[1.0, 1.0, 10.0, 10.0]]))
    with pytest.raises(ValueError, match="gt_classes"):
        model([{"image": image(32, 32, 0), "instances": inst}])
    inst.gt_classes = torch.tensor([NUM_CLASSES])  # out of range
    with pytest.raises(ValueError, match="gt_classes"):
        model([{"image": image(32, 32, 0), "instances": inst}])
    model.eval()


def test_encoder_attention_is_swappable_and_copied():
    proto = RecordingAttention(32, 4)
    encoder = TransformerEncoder(proto, num_layers=2, embed_dim=32, ffn_dim=64)
    layers = [layer.self_attn for layer in encoder.layers]
    assert all(isinstance(a, RecordingAttention) for a in layers)
    assert layers[0] is not proto and layers[0] is not layers[1]
    transformer = Transformer(
        encoder, TransformerDecoder(num_layers=1, embed_dim=32, num_heads=4, ffn_dim=64)
    )
    # Xavier re-initialisation gives every layer its own weights.
    assert not torch.equal(layers[0].attn.in_proj_weight, layers[1].attn.in_proj_weight)
    src, pos = torch.randn(2, 32, 3, 4), torch.randn(2, 32, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3:] = True
    hs, memory = transformer(src, mask, torch.randn(5, 32), pos)
    assert hs.shape == (1, 2, 5, 32) and memory.shape == (2, 32, 3, 4)
    for attn in layers:
        assert attn.calls == [
            ((), ["key", "key_padding_mask", "key_pos", "query", "query_pos", "value"])
        ]
    with pytest.raises(ValueError, match="embed_dim"):
        TransformerEncoder(MultiheadAttention(64, 4), embed_dim=32)


def test_position_embedding_ignores_padding():
    pe = PositionEmbeddingSine(num_pos_feats=16)
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    mask[1, 4:, :] = True
    mask[1, :, 5:] = True
    pos = pe(mask)
    assert pos.shape == (2, 32, 6, 8)
    # The valid part of the padded image has the embedding of an unpadded 4 x 5 image.
    alone = pe(torch.zeros(1, 4, 5, dtype=torch.bool))
    torch.testing.assert_close(pos[1, :, :4, :5], alone[0])
    # Normalised coordinates end at 2 * pi: channel 0 is sin(y), channel 16 sin(x).
    assert math.isclose(float(pos[0, 0, -1, 0]), math.sin(2 * math.pi), abs_tol=1e-4)
    assert math.isclose(float(pos[0, 16, 0, -1]), math.sin(2 * math.pi), abs_tol=1e-4)


def test_backbone_dc5_and_lazy_config():
    backbone = build_resnet_backbone(depth=50, dilation=True)
    assert backbone.output_shape()["res5"].stride == 16
    res5 = backbone.res5
    assert [b.conv2.dilation for b in res5] == [(1, 1), (2, 2), (2, 2)]
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, 64, 64))
    assert feats["res5"].shape == (1, 2048, 4, 4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())

    cfg = L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(make_resnet_stages)(depth=18, norm="FrozenBN"),
        out_features=["res5"],
        freeze_at=1,
    )
    detr = instantiate(
        L(DETR)(
            backbone=cfg,
            position_embedding=L(PositionEmbeddingSine)(num_pos_feats=16),
            transformer=L(Transformer)(
                encoder=L(TransformerEncoder)(
                    attention=L(MultiheadAttention)(embed_dim=32, num_heads=4),
                    num_layers=1,
                    embed_dim=32,
                    ffn_dim=64,
                ),
                decoder=L(TransformerDecoder)(num_layers=1, embed_dim=32, num_heads=4, ffn_dim=64),
            ),
            num_classes=3,
            num_queries=4,
            in_channels=512,
            embed_dim=32,
        )
    )
    detr.eval()
    with torch.no_grad():
        out = detr([{"image": image(40, 48, 5)}])
    assert out[0]["instances"].image_size == (40, 48)
