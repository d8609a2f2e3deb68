"""Box utilities (torch only) used by the matcher and the set criterion.

Two box formats are used:
    cxcywh: (cx, cy, w, h), what DETR-style heads predict (normalised to [0, 1]);
    xyxy:   (x0, y0, x1, y1), with x1 >= x0 and y1 >= y0, what the IoU functions expect.
Pairwise functions take boxes1 (N, 4) and boxes2 (M, 4) and return (N, M) matrices.
"""
from typing import Tuple

import torch

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2).  boxes (..., 4) -> (..., 4)."""
    center, half_size = boxes[..., :2], 0.5 * boxes[..., 2:]  # (..., 2), (..., 2)
    return torch.cat([center - half_size, center + half_size], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) -> ((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0).  (..., 4) -> (..., 4)."""
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:]  # (..., 2), (..., 2)
    return torch.cat([0.5 * (top_left + bottom_right), bottom_right - top_left], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """area = (x1 - x0) * (y1 - y0).  boxes (..., 4) xyxy -> (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU = |A n B| / |A u B|, with |A u B| = |A| + |B| - |A n B|.

    boxes1 (N, 4), boxes2 (M, 4), xyxy.  Returns (iou, union), both (N, M).
    """
    area1 = box_area(boxes1)  # (N,)
    area2 = box_area(boxes2)  # (M,)
    inter_top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    inter_bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    inter_size = (inter_bottom_right - inter_top_left).clamp(min=0)  # (N, M, 2)
    inter = inter_size[..., 0] * inter_size[..., 1]  # (N, M)
    union = area1[:, None] + area2[None, :] - inter  # (N, M)
    return inter / union, union


def _check_xyxy(boxes: torch.Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    if not bool((boxes[:, 2:] >= boxes[:, :2]).all()):
        raise ValueError(
            f"{name} contains degenerate boxes: expected xyxy boxes with x1 >= x0 and y1 >= y0 "
            "(a NaN coordinate also fails this check)"
        )


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019):

        GIoU(A, B) = IoU(A, B) - (|C| - |A u B|) / |C|,

    where C is the smallest box enclosing A and B.  GIoU lies in (-1, 1]; it is 1 for identical
    boxes and negative for disjoint ones.  boxes1 (N, 4), boxes2 (M, 4), xyxy -> (N, M).
    Raises ValueError, naming the argument, when a box has x1 < x0 or y1 < y0.
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)  # (N, M), (N, M)
    hull_top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    hull_bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    hull_size = (hull_bottom_right - hull_top_left).clamp(min=0)  # (N, M, 2)
    hull = hull_size[..., 0] * hull_size[..., 1]  # (N, M)
    return iou - (hull - union) / hull
