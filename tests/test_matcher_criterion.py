import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from projects.enact.modeling import criterion as criterion_module
from projects.enact.modeling.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from projects.enact.modeling.criterion import SetCriterion, aux_weight_dict, sigmoid_focal_loss
from projects.enact.modeling.matcher import HungarianMatcher

WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def random_cxcywh(*shape, generator):
    center = 0.2 + 0.6 * torch.rand(*shape, 2, generator=generator)
    size = 0.05 + 0.3 * torch.rand(*shape, 2, generator=generator)
    return torch.cat([center, size], dim=-1)


def make_batch(sizes, num_queries, num_logits, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(len(sizes), num_queries, num_logits, generator=g),
        "pred_boxes": random_cxcywh(len(sizes), num_queries, generator=g),
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "boxes": random_cxcywh(n, generator=g),
        }
        for n in sizes
    ]
    return outputs, targets


def reference_cost(logits, boxes, labels, tgt_boxes, w_class, w_bbox, w_giou, focal):
    """Cost matrix (Q, n) written out element by element, independent of the matcher code."""
    q, n = logits.shape[0], labels.shape[0]
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    cost = torch.zeros(q, n, dtype=torch.float64)
    for i in range(q):
        for j in range(n):
            c = int(labels[j])
            if focal:
                p = float(torch.sigmoid(logits[i, c]))
                pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
                neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
                class_cost = pos - neg
            else:
                class_cost = -float(logits[i].softmax(-1)[c])
            l1 = float((boxes[i] - tgt_boxes[j]).abs().sum())
            cost[i, j] = w_class * class_cost + w_bbox * l1 - w_giou * float(giou[i, j])
    return cost


def brute_force_min(cost):
    q, n = cost.shape
    cost = cost.tolist()
    if n <= q:
        return min(
            sum(cost[p[j]][j] for j in range(n)) for p in itertools.permutations(range(q), n)
        )
    return min(sum(cost[i][p[i]] for i in range(q)) for p in itertools.permutations(range(n), q))


# ----------------------------------------------------------------------------- matcher


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_is_optimal_against_brute_force(focal, seed):
    num_classes, num_queries = 4, 5
    sizes = [3, 0, 5, 6]  # includes an empty image and one with more targets than queries
    num_logits = num_classes if focal else num_classes + 1
    outputs, targets = make_batch(sizes, num_queries, num_logits, num_classes, seed)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, use_focal=focal)
    indices = matcher(outputs, targets)
    assert len(indices) == len(sizes)
    for b, ((rows, cols), t) in enumerate(zip(indices, targets)):
        n = len(t["labels"])
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(num_queries, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert torch.equal(rows, rows.sort().values)
        if n == 0:
            continue
        cost = reference_cost(
            outputs["pred_logits"][b],
            outputs["pred_boxes"][b],
            t["labels"],
            t["boxes"],
            2,
            5,
            2,
            focal,
        )
        matched_total = float(cost[rows, cols].sum())
        assert matched_total == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_matcher_all_targets_empty():
    outputs, targets = make_batch([0, 0], 4, 3, 2, seed=0)
    for rows, cols in HungarianMatcher()(outputs, targets):
        assert rows.dtype == cols.dtype == torch.int64
        assert rows.numel() == cols.numel() == 0


def test_matcher_focal_and_ce_class_costs_differ():
    """Class-only matching of one target of class 2.  Query 0 has the larger sigmoid probability
    for class 2 but, with every logit equal, only 1/4 softmax probability; query 1 has almost
    all of its softmax mass on class 2."""
    boxes = torch.full((1, 2, 4), 0.5)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    ce_logits = torch.tensor([[[5.0, 5.0, 5.0, 5.0], [-10.0, -10.0, 2.0, -10.0]]])
    focal_logits = ce_logits[..., :3]
    ce = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0)
    focal = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0, use_focal=True)
    ((ce_rows, _),) = ce({"pred_logits": ce_logits, "pred_boxes": boxes}, targets)
    ((focal_rows, _),) = focal({"pred_logits": focal_logits, "pred_boxes": boxes}, targets)
    assert ce_rows.tolist() == [1]
    assert focal_rows.tolist() == [0]


def test_matcher_follows_boxes_when_class_is_ignored():
    targets = [
        {
            "labels": torch.tensor([0, 0]),
            "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.2, 0.2]]),
        }
    ]
    pred_boxes = torch.tensor([[[0.8, 0.8, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3], [0.21, 0.2, 0.1, 0.1]]])
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": pred_boxes}
    ((rows, cols),) = HungarianMatcher(cost_class=0)(outputs, targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0}


def test_matcher_all_zero_costs_raise():
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


def test_matcher_runs_without_grad():
    outputs, targets = make_batch([2], 3, 3, 2, seed=0)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert not rows.requires_grad and not cols.requires_grad


# ----------------------------------------------------------------------------- criterion


class FixedMatcher:
    def __init__(self, indices):
        self.indices = [(torch.tensor(r), torch.tensor(c)) for r, c in indices]

    def __call__(self, outputs, targets):
        return self.indices


def hand_case():
    outputs = {
        "pred_logits": torch.tensor(
            [
                [[2.0, 0.0, 0.5], [0.1, 0.2, 3.0], [1.0, -1.0, 0.0]],
                [[0.0, 1.0, 0.0], [-1.0, 2.0, 1.0], [0.5, 0.5, 0.5]],
            ]
        ),
        "pred_boxes": torch.tensor(
            [
                [[0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]],
                [[0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]],
            ]
        ),
    }
    targets = [
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.4]])},
        {
            "labels": torch.tensor([1, 0]),
            "boxes": torch.tensor([[0.7, 0.6, 0.2, 0.2], [0.3, 0.3, 0.1, 0.3]]),
        },
    ]
    # image 0: query 2 <- target 0; image 1: query 0 <- target 1, query 1 <- target 0
    indices = [([2], [0]), ([0, 1], [1, 0])]
    return outputs, targets, indices


def test_box_losses_hand_computed():
    outputs, targets, indices = hand_case()
    crit = SetCriterion(2, FixedMatcher(indices), WEIGHTS, losses=("boxes",))
    losses = crit(outputs, targets)
    assert set(losses) == {"loss_bbox", "loss_giou"}
    # |diffs|: 0.1 + 0.2 (image 0), 0.2 (image 1, q0/t1), 0.1 (image 1, q1/t0); 3 boxes
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.6 / 3))
    pairs = [((0, 2), (0, 0)), ((1, 0), (1, 1)), ((1, 1), (1, 0))]
    gious = [
        generalized_box_iou(
            box_cxcywh_to_xyxy(outputs["pred_boxes"][b, q][None]),
            box_cxcywh_to_xyxy(targets[tb]["boxes"][t][None]),
        ).item()
        for (b, q), (tb, t) in pairs
    ]
    # image 0 pair by hand: pred [0.4,0.4,0.6,0.6], target [0.3,0.3,0.5,0.7]:
    # inter 0.1*0.2 = 0.02, union 0.04 + 0.08 - 0.02 = 0.10, hull 0.3*0.4 = 0.12
    assert gious[0] == pytest.approx(0.02 / 0.10 - 0.02 / 0.12)
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(sum(1 - g for g in gious) / 3))


def test_ce_loss_hand_computed():
    outputs, targets, indices = hand_case()
    eos = 0.1
    crit = SetCriterion(2, FixedMatcher(indices), WEIGHTS, losses=("class",), eos_coef=eos)
    loss = crit(outputs, targets)["loss_ce"]
    classes = [[2, 2, 0], [0, 1, 2]]  # 2 = no object
    num, den = 0.0, 0.0
    for b in range(2):
        for q in range(3):
            c = classes[b][q]
            w = eos if c == 2 else 1.0
            num += -w * outputs["pred_logits"][b, q].log_softmax(-1)[c].item()
            den += w
    assert loss.item() == pytest.approx(num / den, rel=1e-5)


def test_sigmoid_focal_loss_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    inputs = 3 * torch.randn(4, 6, 5, generator=g)
    targets = (torch.rand(4, 6, 5, generator=g) > 0.7).float()
    for alpha, gamma in [(0.25, 2.0), (0.5, 1.0), (-1, 2.0)]:
        ours = sigmoid_focal_loss(inputs, targets, alpha, gamma)
        ref = torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction="none")
        torch.testing.assert_close(ours, ref)


def test_focal_class_loss_matches_torchvision_normalised():
    outputs, targets, indices = hand_case()
    outputs["pred_logits"] = outputs["pred_logits"][..., :2]  # focal: num_classes logits
    crit = SetCriterion(2, FixedMatcher(indices), WEIGHTS, losses=("class",), use_focal=True)
    loss = crit(outputs, targets)["loss_ce"]
    onehot = torch.zeros(2, 3, 2)
    onehot[0, 2, 0] = 1  # image 0: query 2 is class 0
    onehot[1, 0, 0] = 1  # image 1: query 0 <- target 1 (class 0)
    onehot[1, 1, 1] = 1  # image 1: query 1 <- target 0 (class 1)
    ref = torchvision.ops.sigmoid_focal_loss(
        outputs["pred_logits"], onehot, 0.25, 2.0, reduction="sum"
    )
    torch.testing.assert_close(loss, ref / 3)  # num_boxes = 3


@pytest.mark.parametrize("focal", [False, True])
def test_losses_finite_and_gradients_reach_predictions(focal):
    num_classes = 3
    outputs, targets = make_batch(
        [2, 0, 4], 6, num_classes if focal else num_classes + 1, num_classes, 0
    )
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    matcher = HungarianMatcher(use_focal=focal)
    crit = SetCriterion(num_classes, matcher, WEIGHTS, use_focal=focal)
    losses = crit(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    total = sum(crit.weight_losses(losses).values())
    total.backward()
    for key in ("pred_logits", "pred_boxes"):
        grad = outputs[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_aux_losses_and_weight_dict():
    num_classes, num_aux = 2, 2
    outputs, targets = make_batch([3, 1], 4, num_classes + 1, num_classes, 0)
    aux = [make_batch([3, 1], 4, num_classes + 1, num_classes, s)[0] for s in (1, 2)]
    outputs["aux_outputs"] = aux
    weights = aux_weight_dict(WEIGHTS, num_aux)
    assert weights == {
        **WEIGHTS,
        **{f"{k}_{i}": w for i in range(num_aux) for k, w in WEIGHTS.items()},
    }
    assert "loss_ce_0" not in WEIGHTS  # the input is not modified
    crit = SetCriterion(num_classes, HungarianMatcher(), weights)
    losses = crit(outputs, targets)
    assert set(losses) == set(weights)
    assert set(crit.weight_losses(losses)) == set(weights)
    torch.testing.assert_close(crit.weight_losses(losses)["loss_bbox_1"], 5 * losses["loss_bbox_1"])
    # an aux output computes exactly the losses the main output would
    main_only = crit({k: v for k, v in aux[1].items()}, targets)
    for k, v in main_only.items():
        torch.testing.assert_close(losses[f"{k}_1"], v)


@pytest.mark.parametrize("focal", [False, True])
def test_perfect_prediction_has_zero_box_losses(focal):
    num_classes, num_queries = 3, 6
    g = torch.Generator().manual_seed(0)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": random_cxcywh(2, generator=g)},
        {"labels": torch.tensor([1]), "boxes": random_cxcywh(1, generator=g)},
    ]
    num_logits = num_classes if focal else num_classes + 1
    logits = torch.full((2, num_queries, num_logits), -8.0)
    if not focal:
        logits[..., -1] = 8.0  # confident "no object" everywhere but the matched queries
    boxes = torch.full((2, num_queries, 4), 0.05)
    placement = {(0, 4): (0, 0), (0, 1): (0, 1), (1, 3): (1, 0)}
    for (b, q), (tb, t) in placement.items():
        boxes[b, q] = targets[tb]["boxes"][t]
        logits[b, q] = -8.0
        logits[b, q, targets[tb]["labels"][t]] = 8.0
    crit = SetCriterion(num_classes, HungarianMatcher(use_focal=focal), WEIGHTS, use_focal=focal)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_ce"].item() < 1e-2


def test_criterion_with_no_targets():
    outputs, targets = make_batch([0, 0], 4, 3, 2, seed=0)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    crit = SetCriterion(2, HungarianMatcher(), WEIGHTS)
    losses = crit(outputs, targets)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert torch.isfinite(losses["loss_ce"]) and losses["loss_ce"].item() > 0
    sum(crit.weight_losses(losses).values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_num_boxes_divides_by_world_size_and_clamps(monkeypatch):
    crit = SetCriterion(2, HungarianMatcher(), WEIGHTS)
    _, targets = make_batch([2, 1], 2, 3, 2, seed=0)
    assert crit.num_boxes(targets, torch.device("cpu")) == 3.0
    monkeypatch.setattr(criterion_module.comm, "get_world_size", lambda: 2)
    assert crit.num_boxes(targets, torch.device("cpu")) == 1.5
    assert crit.num_boxes(targets[1:], torch.device("cpu")) == 1.0  # 0.5 clamped to 1
    assert crit.num_boxes([], torch.device("cpu")) == 1.0


def test_criterion_validates_arguments():
    outputs, targets = make_batch([1], 3, 3, 3, seed=0)  # 3 logits for 3 classes
    with pytest.raises(ValueError, match="expected 4"):
        SetCriterion(3, HungarianMatcher(), WEIGHTS)(outputs, targets)
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(3, HungarianMatcher(), WEIGHTS, losses=("class", "masks"))
