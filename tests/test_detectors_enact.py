"""The three detectors with and without ENACT: a training step, inference, and the overfitting
check (the loss drops on a handful of fixed images within a bounded number of CPU steps)."""
import math

import pytest
import torch
from detection_helpers import (
    TINY_TRANSFORMER,
    check_detections,
    checked_gradients,
    infer,
    sample,
    train_steps,
    training_losses,
)

from projects.enact import EnactAttention
from projects.enact.engine import enact_modules
from projects.enact.modeling.anchor_detr import build_anchor_detr
from projects.enact.modeling.conditional_detr import build_conditional_detr
from projects.enact.modeling.detr import build_detr

TINY = dict(num_classes=4, depth=18, **TINY_TRANSFORMER)


def enact(sigma=1):
    return EnactAttention(32, 4, sigma=sigma)


# (name, builder, kwargs, ENACT in the encoder?)
VARIANTS = [
    ("detr", build_detr, dict(num_queries=12), False),
    ("detr+enact", build_detr, dict(num_queries=12, encoder_attention=enact()), True),
    ("conditional_detr", build_conditional_detr, dict(num_queries=12), False),
    ("conditional_detr+enact", build_conditional_detr, dict(num_queries=12, encoder_attention=enact()), True),
    ("anchor_detr(rcda)", build_anchor_detr, dict(num_anchors=6, num_patterns=2, dilation=False), False),
    ("anchor_detr(mhsa)+enact", build_anchor_detr,
     dict(num_anchors=6, num_patterns=2, dilation=False, encoder_type="mhsa", encoder_attention=enact()), True),
    ("anchor_detr(rcda)+separable_enact", build_anchor_detr,
     dict(num_anchors=6, num_patterns=2, dilation=False, encoder_type="enact_rcda", enact_sigma=1), True),
]
IDS = [v[0] for v in VARIANTS]

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread


def batch():
    """Images of different sizes (padded in the batch), one without objects."""
    return [
        sample(160, 224, 0, [[10, 12, 90, 100], [120, 40, 210, 150]], [1, 3], output_size=(320, 448)),
        sample(128, 160, 1),
    ]


def build(builder, kwargs, **extra):
    torch.manual_seed(0)
    return builder(**dict(TINY, **kwargs, **extra))


@pytest.mark.parametrize("name,builder,kwargs,has_enact", VARIANTS, ids=IDS)
def test_training_step_and_inference(name, builder, kwargs, has_enact):
    model = build(builder, kwargs)
    losses = training_losses(model, batch())
    sum(losses.values()).backward()
    checked_gradients(model)
    layers = enact_modules(model)
    assert bool(layers) == has_enact
    for _, m in layers:
        stats = m.statistics()
        assert stats["compression"] >= 1.0 and stats["clusters_per_image"] >= 1
        for w_prob in [mod for n, mod in m.named_modules() if n.endswith("w_prob")]:
            assert w_prob.weight.grad.abs().sum() > 0
    for inputs, inst in zip(batch(), infer(model, batch())):
        h, w = inputs.get("height", inputs["image"].shape[1]), inputs.get("width", inputs["image"].shape[2])
        assert inst.image_size == (h, w) and len(inst) > 0
        check_detections(inst, (h, w), TINY["num_classes"])


@pytest.mark.parametrize("name,builder,kwargs,has_enact", VARIANTS, ids=IDS)
def test_overfits_fixed_images(name, builder, kwargs, has_enact):
    """60 Adam steps on two fixed images: the summed weighted loss falls below 60% of its start.

    The randomly initialised backbone is frozen (it has no batch statistics); everything after
    it, ENACT's W_prob included, learns."""
    model = build(builder, kwargs, dropout=0.0, freeze_at=5)
    model.train()
    data = [
        sample(128, 192, 10, [[8, 6, 100, 80], [120, 40, 180, 120]], [1, 3]),
        sample(160, 128, 11, [[10, 60, 80, 150]], [2]),
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    history = train_steps(model, data, optimizer, steps=60)
    assert all(math.isfinite(x) for x in history)
    assert history[-1] < 0.6 * history[0], (name, history[0], history[-1])
