import pytest
import torch

from projects.enact.modeling.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)


def random_xyxy(n, generator=None):
    top_left = torch.rand(n, 2, generator=generator)
    size = torch.rand(n, 2, generator=generator) + 0.01
    return torch.cat([top_left, top_left + size], dim=-1)


def test_conversion_known_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [1.0, 2.0, 2.0, 0.0]])
    xyxy = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_conversion_round_trip_any_leading_shape():
    g = torch.Generator().manual_seed(0)
    xyxy = random_xyxy(24, g).view(2, 3, 4, 4)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    cxcywh = torch.rand(2, 7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)


def test_area_and_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 7.0]])
    torch.testing.assert_close(box_area(b), torch.tensor([4.0, 4.0, 2.0]))
    iou, union = box_iou(a, b)
    assert iou.shape == union.shape == (1, 3)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 6.0]]))


def test_giou_identical_boxes_is_one():
    boxes = random_xyxy(5, torch.Generator().manual_seed(1))
    giou = generalized_box_iou(boxes, boxes)
    torch.testing.assert_close(torch.diag(giou), torch.ones(5))
    assert (giou <= 1 + 1e-6).all() and (giou > -1).all()


def test_giou_hand_computed_pairs():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    boxes2 = torch.tensor(
        [
            [1.0, 1.0, 3.0, 3.0],  # overlap: iou 1/7, hull 9, union 7
            [2.0, 3.0, 3.0, 4.0],  # disjoint from boxes1[0]: iou 0, union 5, hull 3 x 4
            [1.0, 1.0, 2.0, 2.0],  # inside both
        ]
    )
    expected = torch.tensor(
        [
            [1 / 7 - 2 / 9, 0 - (12 - 5) / 12, 1 / 4],
            # boxes1[1] contains all three, so hull == union and GIoU == IoU
            [4 / 16, 1 / 16, 1 / 16],
        ]
    )
    torch.testing.assert_close(generalized_box_iou(boxes1, boxes2), expected)


def test_giou_disjoint_is_negative_and_symmetric():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou(a, b)
    torch.testing.assert_close(giou, torch.tensor([[-1 / 3]]))  # union 2, hull 3
    assert giou.item() < 0
    g = torch.Generator().manual_seed(2)
    x, y = random_xyxy(4, g), random_xyxy(6, g)
    torch.testing.assert_close(generalized_box_iou(x, y), generalized_box_iou(y, x).T)


def test_giou_lower_bounds_iou():
    g = torch.Generator().manual_seed(3)
    x, y = random_xyxy(8, g), random_xyxy(9, g)
    iou, _ = box_iou(x, y)
    assert (generalized_box_iou(x, y) <= iou + 1e-6).all()


@pytest.mark.parametrize("which", ["boxes1", "boxes2"])
@pytest.mark.parametrize("bad", [[0.5, 0.0, 0.4, 1.0], [0.0, 0.5, 1.0, 0.4]])
def test_giou_degenerate_box_raises(which, bad):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.3, 0.3]])
    broken = torch.cat([good, torch.tensor([bad])])
    args = (broken, good) if which == "boxes1" else (good, broken)
    with pytest.raises(ValueError, match=which):
        generalized_box_iou(*args)


def test_giou_zero_size_box_is_allowed():
    point = torch.tensor([[0.5, 0.5, 0.5, 1.0]])  # zero width, x1 == x0: not degenerate
    giou = generalized_box_iou(point, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert torch.isfinite(giou).all()


def test_giou_gradient_is_finite():
    boxes = random_xyxy(3, torch.Generator().manual_seed(4)).requires_grad_()
    target = random_xyxy(3, torch.Generator().manual_seed(5))
    (1 - torch.diag(generalized_box_iou(boxes, target))).sum().backward()
    assert torch.isfinite(boxes.grad).all() and boxes.grad.abs().sum() > 0
