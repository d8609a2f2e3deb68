"""Tests of the DETR meta-architecture (backbone, positional embedding, transformer, detector).

The parameter count uses the real configuration (R50, 6 + 6 layers, C = 256); the functional
tests use a tiny model (ResNet-18 backbone, 2 + 2 layers, C = 32) to stay fast on a CPU.
"""

import math

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.structures import Boxes, Instances
from torch import nn

from projects.enact.modeling.attention import MultiheadAttention
from projects.enact.modeling.backbone import build_resnet_backbone, make_resnet_stages
from projects.enact.modeling.detr import DETR, build_detr
from projects.enact.modeling.position_encoding import PositionEmbeddingSine
from projects.enact.modeling.transformer import Transformer, TransformerDecoder, TransformerEncoder

# detrex's DETR-R50 with 80 classes (FrozenBN affine terms are buffers, not parameters).
DETREX_DETR_R50_PARAMS = 41_521_941

NUM_CLASSES = 5
TINY = dict(
    num_classes=NUM_CLASSES,
    depth=18,
    num_queries=12,
    embed_dim=32,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    ffn_dim=64,
)


def _instances(h, w, boxes, classes):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _batch():
    """Two images of different sizes: two boxes (one partly outside the image), and none."""
    return [
        {
            "image": _image(96, 128, 0),
            "instances": _instances(96, 128, [[10, 12, 60, 70], [80, 40, 150, 90]], [1, 3]),
            "height": 96,
            "width": 128,
        },
        {
            "image": _image(64, 96, 1),
            "instances": _instances(64, 96, [], []),
            "height": 64,
            "width": 96,
        },
    ]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_detr(**TINY)


def test_parameter_count_matches_detrex_r50():
    model = build_detr(num_classes=80)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - DETREX_DETR_R50_PARAMS) <= 0.005 * DETREX_DETR_R50_PARAMS, count
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
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(_batch())
    expected = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert all(float(v.detach()) >= 0 for v in losses.values())
    # Weighting: canonical weights, aux losses weighted as their base loss, unweighted dropped.
    one = torch.tensor(1.0)
    weighted = model.weight_losses({"loss_bbox": one, "loss_giou_7": one, "class_error": one})
    assert {k: float(v) for k, v in weighted.items()} == {"loss_bbox": 5.0, "loss_giou_7": 2.0}
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, bad
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert n.startswith("backbone.stem"), n  # freeze_at=1 freezes the stem only


def test_targets_are_normalised_clipped_and_filtered(tiny_model):
    model = tiny_model
    batch = [
        {
            "image": _image(50, 100, 2),
            "instances": _instances(
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
        {"image": _image(40, 40, 3), "instances": Instances((40, 40))},  # no fields at all
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
    model.eval()
    batch = _batch()
    batch[0]["height"], batch[0]["width"] = 192, 256  # upscaled output
    batch[1].pop("height"), batch[1].pop("width")  # defaults to the input size
    del batch[0]["instances"]
    with torch.no_grad():
        outputs = model(batch)
    assert len(outputs) == 2
    for out, (h, w) in zip(outputs, [(192, 256), (64, 96)]):
        inst = out["instances"]
        assert isinstance(inst, Instances)
        assert inst.image_size == (h, w)
        assert 0 < len(inst) <= model.num_queries
        boxes = inst.pred_boxes.tensor
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert inst.scores.tolist() == sorted(inst.scores.tolist(), reverse=True)
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < NUM_CLASSES)).all()


def test_clear_errors_for_bad_inputs(tiny_model):
    model = tiny_model
    model.eval()
    with pytest.raises(KeyError, match="image"):
        model([{"img": _image(32, 32, 0)}])
    with pytest.raises(ValueError, match="image"):
        model([{"image": torch.zeros(32, 32)}])
    with pytest.raises(TypeError, match="list"):
        model({"image": _image(32, 32, 0)})
    with pytest.raises(ValueError, match="empty"):
        model([])
    model.train()
    with pytest.raises(ValueError, match="instances"):
        model([{"image": _image(32, 32, 0)}])
    inst = Instances((32, 32))
    inst.gt_boxes = Boxes(torch.tensor([[1.0, 1.0, 10.0, 10.0]]))
    with pytest.raises(ValueError, match="gt_classes"):
        model([{"image": _image(32, 32, 0), "instances": inst}])
    inst.gt_classes = torch.tensor([NUM_CLASSES])  # out of range
    with pytest.raises(ValueError, match="gt_classes"):
        model([{"image": _image(32, 32, 0), "instances": inst}])
    model.eval()


class _RecordingAttention(MultiheadAttention):
    """MultiheadAttention that records the keyword arguments it is called with."""

    def forward(self, *args, **kwargs):
        self.calls = getattr(self, "calls", []) + [(args, sorted(kwargs))]
        return super().forward(*args, **kwargs)


def test_encoder_attention_is_swappable_and_copied():
    proto = _RecordingAttention(32, 4)
    encoder = TransformerEncoder(proto, num_layers=2, embed_dim=32, ffn_dim=64)
    layers = [layer.self_attn for layer in encoder.layers]
    assert all(isinstance(a, _RecordingAttention) for a in layers)
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
        out = detr([{"image": _image(40, 48, 5)}])
    assert out[0]["instances"].image_size == (40, 48)
