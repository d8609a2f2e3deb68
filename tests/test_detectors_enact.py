"""The three detectors with and without ENACT: a training step, inference, and the overfitting
check (the loss drops on a handful of fixed images within a bounded number of CPU steps)."""
import math

import pytest
import torch
from detection_helpers import (
    build,
    check_detections,
    checked_gradients,
    infer,
    sample,
    tiny_config,
    train_steps,
    training_losses,
)

from projects.enact.engine import enact_modules

NUM_CLASSES = 4

# (name, config, ENACT in the encoder?); the ENACT configs' sigma is set to 1 (tiny maps)
VARIANTS = [
    ("detr", "detr_r50_300ep", False),
    ("detr+enact", "detr_r50_300ep_enact", True),
    ("conditional_detr", "conditional_detr_r50_50ep", False),
    ("conditional_detr+enact", "conditional_detr_r50_50ep_enact", True),
    ("anchor_detr(rcda)", "anchor_detr_r50_dc5_50ep", False),
    ("anchor_detr(mhsa)+enact", "anchor_detr_r50_dc5_50ep_mhsa_enact", True),
    ("anchor_detr(rcda)+separable_enact", "anchor_detr_r50_dc5_50ep_enact", True),
]
IDS = [v[0] for v in VARIANTS]

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread


def batch():
    """Images of different sizes (padded in the batch), one without objects."""
    return [
        sample(160, 224, 0, [[10, 12, 90, 100], [120, 40, 210, 150]], [1, 3], output_size=(320, 448)),
        sample(128, 160, 1),
    ]


def tiny_model(config, has_enact, freeze_at=None, seed=0, **kwargs):
    """The tiny model of ``configs/<config>.py`` (``kwargs``: of ``shrink_model``), seeded."""
    cfg = tiny_config(config, num_classes=NUM_CLASSES, **kwargs)
    if has_enact:  # EnactAttention in a TransformerEncoder, or the separable EnactRCDAEncoder
        encoder = cfg.transformer.encoder
        (encoder.attention if "attention" in encoder else encoder).sigma = 1
    if freeze_at is not None:
        cfg.backbone.freeze_at = freeze_at
    return build(cfg, seed)


@pytest.mark.parametrize("name,config,has_enact", VARIANTS, ids=IDS)
def test_training_step_and_inference(name, config, has_enact):
    model = tiny_model(config, has_enact)
    losses = training_losses(model, batch())
    sum(losses.values()).backward()
    checked_gradients(model)
    layers = enact_modules(model)
    assert bool(layers) == has_enact
    for _, m in layers:
        stats = m.statistics()
        assert stats["compression"] > 1.0 and stats["clusters_per_image"] >= 1  # tokens clustered
        for w_prob in [mod for n, mod in m.named_modules() if n.endswith("w_prob")]:
            assert w_prob.weight.grad.abs().sum() > 0
    for inputs, inst in zip(batch(), infer(model, batch())):
        h, w = inputs.get("height", inputs["image"].shape[1]), inputs.get("width", inputs["image"].shape[2])
        assert inst.image_size == (h, w) and len(inst) > 0
        check_detections(inst, (h, w), NUM_CLASSES)


@pytest.mark.parametrize("name,config,has_enact", VARIANTS, ids=IDS)
def test_overfits_fixed_images(name, config, has_enact):
    """100 Adam steps on two fixed images: the summed weighted loss falls below 60% of its start.

    The randomly initialised backbone is frozen (it has no batch statistics); everything after
    it, ENACT's W_prob included, learns.  Seed 0, the default, not picked: at seed 0 the seven
    variants end at 0.03-0.34 of the start (DETR + ENACT 0.34, DETR 0.22), at seeds 1 and 2 at
    0.05-0.19 and 0.02-0.50 (DETR, which leaves its ~0.65 plateau last).  At 60 steps DETR + ENACT
    was still on the plateau at seed 0 (0.65) and DETR at seed 2 (0.63)."""
    model = tiny_model(config, has_enact, freeze_at=5, seed=0, dropout=0.0)
    model.train()
    data = [
        sample(128, 192, 10, [[8, 6, 100, 80], [120, 40, 180, 120]], [1, 3]),
        sample(160, 128, 11, [[10, 60, 80, 150]], [2]),
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    history = train_steps(model, data, optimizer, steps=100)
    assert all(math.isfinite(x) for x in history)
    assert history[-1] < 0.6 * history[0], (name, history[0], history[-1])
