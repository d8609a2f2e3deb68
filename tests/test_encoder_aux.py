"""Sparse DETR's encoder auxiliary loss (projects/enact/modeling/encoder_aux.py): the proposals sit
on the selected tokens, empty slots are never matched nor classified, every detector trains a step
with ``{name}_enc_{l}`` losses weighted as ``name``, and a clear error without a sparse encoder."""
import pytest
import torch
from detectron2.config import instantiate
from detection_helpers import sample, sparse, tiny_config

from projects.enact.modeling.criterion import SetCriterion
from projects.enact.modeling.encoder_aux import EncoderAuxHeads
from projects.enact.modeling.matcher import HungarianMatcher
from projects.enact.modeling.sparse_selection import top_tokens

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGES = [sample(64, 96, 0, [[5, 6, 40, 50], [50, 10, 90, 60]], [1, 2]), sample(48, 64, 1)]


def test_proposals_sit_on_the_selected_tokens():
    # a 2 x 4 map; image 0 all valid, image 1 valid in its top-left 1 x 2 block
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([[0.0, 0, 0, 0, 0, 0, 9, 8], [1.0, 2, 0, 0, 0, 0, 0, 0]])
    sel = top_tokens(scores, valid, torch.tensor([2, 1]))  # image 0: tokens 6, 7; image 1: token 1
    heads = EncoderAuxHeads(8, 3, proposal_size=0.1)
    boxes = heads.proposals(sel, (2, 4)).sigmoid()  # (B, K, 4)
    # token 6 = row 1, col 2 of 2 x 4: centre ((2 + .5) / 4, (1 + .5) / 2); token 7: col 3
    expected0 = torch.tensor([[2.5 / 4, 1.5 / 2, 0.1, 0.1], [3.5 / 4, 1.5 / 2, 0.1, 0.1]])
    torch.testing.assert_close(boxes[0], expected0)
    # image 1 (valid 1 x 2): token 1 = col 1 -> (1.5 / 2, 0.5 / 1); its second slot is empty
    torch.testing.assert_close(boxes[1, 0], torch.tensor([1.5 / 2, 0.5, 0.1, 0.1]))
    assert sel.slots.tolist() == [[True, True], [True, False]]


def outputs_with_empty_slots(num_logits, filled=(5, 2), slots=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(filled)
    logits = torch.randn(b, slots, num_logits, generator=g, dtype=torch.float64)
    boxes = torch.rand(b, slots, 4, generator=g, dtype=torch.float64) * 0.5 + 0.25
    valid = torch.arange(slots)[None, :] < torch.tensor(filled)[:, None]
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_valid": valid}


TARGETS = [
    {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]], dtype=torch.float64)},
    {"labels": torch.tensor([2, 1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.4, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.2]], dtype=torch.float64)},
]


@pytest.mark.parametrize("use_focal", [True, False])
def test_empty_slots_are_never_matched_nor_classified(use_focal):
    """Image 1 has 2 filled slots and 3 targets: 2 pairs, both on filled slots.  The losses equal
    those of the filled slots alone (each image cut to its filled slots, one image at a time)."""
    num_classes = 3
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, use_focal=use_focal)
    crit = SetCriterion(num_classes, matcher, {}, use_focal=use_focal)
    out = outputs_with_empty_slots(num_classes if use_focal else num_classes + 1)
    indices = matcher(out, TARGETS)
    assert len(indices[0][0]) == 2 and len(indices[1][0]) == 2
    for (rows, _), valid in zip(indices, out["pred_valid"]):
        assert valid[rows].all()
    num_boxes = 5.0
    got = crit.get_losses(out, TARGETS, indices, num_boxes)
    # the same sums over the filled slots, written plainly
    if use_focal:
        from projects.enact.modeling.criterion import sigmoid_focal_loss

        total = 0.0
        for b, (rows, cols) in enumerate(indices):
            k = int(out["pred_valid"][b].sum())
            onehot = torch.zeros(k, num_classes, dtype=torch.float64)
            onehot[rows, TARGETS[b]["labels"][cols]] = 1
            total = total + sigmoid_focal_loss(out["pred_logits"][b, :k], onehot, 0.25, 2.0).sum()
        expected = total / num_boxes
    else:
        num, den = 0.0, 0.0
        for b, (rows, cols) in enumerate(indices):
            k = int(out["pred_valid"][b].sum())
            classes = torch.full((k,), num_classes)
            classes[rows] = TARGETS[b]["labels"][cols]
            w = torch.where(classes == num_classes, 0.1, 1.0).double()
            ce = torch.nn.functional.cross_entropy(out["pred_logits"][b, :k], classes, reduction="none")
            num, den = num + (ce * w).sum(), den + w.sum()
        expected = num / den
    torch.testing.assert_close(got["loss_ce"], expected)
    # without empty slots the plain path gives the same value (pred_valid all True)
    full = dict(out, pred_valid=torch.ones_like(out["pred_valid"]))
    plain = {k: v for k, v in full.items() if k != "pred_valid"}
    idx = matcher(plain, TARGETS)
    torch.testing.assert_close(crit.get_losses(full, TARGETS, idx, num_boxes)["loss_ce"],
                               crit.get_losses(plain, TARGETS, idx, num_boxes)["loss_ce"])


@pytest.mark.parametrize("config", ["detr_r50_300ep", "conditional_detr_r50_50ep", "anchor_detr_r50_dc5_50ep_mhsa"])
def test_every_detector_trains_with_the_encoder_aux_loss(config):
    cfg = sparse(tiny_config(config))
    cfg.criterion.weight_dict["loss_dam"] = 1.0
    cfg.encoder_aux_loss = True
    torch.manual_seed(0)
    model = instantiate(cfg).train()
    layers = len(model.transformer.encoder.layers)
    weights = model.criterion.weight_dict
    losses = model(IMAGES)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        for layer in range(layers):
            key = f"{name}_enc_{layer}"
            assert key in losses, sorted(losses)
    # weighted as the decoder's loss of the same name
    one = torch.tensor(1.0)
    assert model.weight_losses({"loss_giou_enc_1": one, "loss_ce_enc_0": one}) == {
        "loss_giou_enc_1": weights["loss_giou"], "loss_ce_enc_0": weights["loss_ce"]}
    sum(losses.values()).backward()
    heads = dict(model.encoder_aux.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in heads.values())
    # the box head's last layer starts at zero (so its earlier layers get no gradient yet)
    assert all(heads[n].grad.abs().sum() > 0 for n in ("class_embed.weight", "bbox_embed.layers.2.weight", "bbox_embed.layers.2.bias"))
    logits = model.encoder_aux.class_embed
    assert logits.out_features == (model.num_classes + 1 if config.startswith("detr") else model.num_classes)
    if not config.startswith("detr"):  # focal heads: the encoder's class bias starts at the decoder's prior
        torch.testing.assert_close(logits.bias, model.class_embed.bias)
    model.eval()  # inference needs no heads and returns detections as before
    with torch.no_grad():
        assert len(model(IMAGES)) == 2


def test_encoder_aux_loss_without_a_sparse_encoder_is_a_clear_error():
    cfg = tiny_config("conditional_detr_r50_50ep")
    cfg.encoder_aux_loss = True
    with pytest.raises(ValueError, match="encoder_aux_loss=True needs a sparse encoder"):
        instantiate(cfg)
