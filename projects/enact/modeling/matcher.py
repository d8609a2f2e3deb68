"""Hungarian matching between the queries of a DETR-style detector and the ground truth.

For every image, each ground-truth object is assigned to one distinct query by minimising

    C(q, t) = w_class * C_class(q, t) + w_bbox * ||b_q - b_t||_1 + w_giou * (-GIoU(b_q, b_t))

over all one-to-one assignments (scipy's ``linear_sum_assignment``).  The class cost is

    cross-entropy variant:  C_class = -p_q(c_t),  p = softmax over K = num_classes + 1 logits
                            (the last logit is "no object");
    focal variant:          C_class = pos(c_t) - neg(c_t),  p = sigmoid over K = num_classes logits,
                            pos = alpha (1 - p)^gamma (-log p),
                            neg = (1 - alpha) p^gamma (-log(1 - p)).
"""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]


_EMPTY_SLOT_COST = 1e8  # an unfilled slot: dearer than any real pair, still finite for the solver


class HungarianMatcher(nn.Module):
    """One-to-one assignment of targets to queries (no parameters, no gradients).

    Args:
        cost_class: weight of the classification cost.
        cost_bbox: weight of the L1 distance between normalised cxcywh boxes.
        cost_giou: weight of the negative generalised IoU.
        use_focal: use the focal (sigmoid) class cost instead of -softmax probability.
        alpha, gamma: focal cost parameters (only used when ``use_focal``).
    """

    def __init__(
        self,
        cost_class: float = 1,
        cost_bbox: float = 5,
        cost_giou: float = 2,
        use_focal: bool = False,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.use_focal = use_focal
        self.alpha = alpha
        self.gamma = gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, use_focal={self.use_focal}"
        )

    def class_cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (N, K), labels (T,) -> class cost (N, T)."""
        if self.use_focal:
            prob = logits.sigmoid()  # (N, K)
            eps = 1e-8
            neg = (1 - self.alpha) * prob.pow(self.gamma) * -(1 - prob + eps).log()  # (N, K)
            pos = self.alpha * (1 - prob).pow(self.gamma) * -(prob + eps).log()  # (N, K)
            return pos[:, labels] - neg[:, labels]  # (N, T)
        prob = logits.softmax(-1)  # (N, K)
        return -prob[:, labels]  # (N, T)

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: {"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4) normalised cxcywh,
                optionally "pred_valid": (B, Q) bool, the slots that may be matched}.
            targets: B dicts with "labels" (n_i,) int64 and "boxes" (n_i, 4) normalised cxcywh.

        Returns:
            B pairs (index_i, index_j) of int64 tensors of length min(Q, n_i) (min(valid slots,
            n_i) with "pred_valid"): query index_i[k]
            is matched to target index_j[k].  index_i is sorted.
        """
        logits = outputs["pred_logits"]
        batch_size, num_queries = logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch_size}")

        # All images at once: cost between every query of the batch and every target of the
        # batch, then keep the per-image blocks.  One device->host copy for the whole batch.
        flat_logits = logits.flatten(0, 1).float()  # (B*Q, K)
        flat_boxes = outputs["pred_boxes"].flatten(0, 1).float()  # (B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets]).long()  # (T,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(flat_boxes)  # (T, 4)
        sizes = [len(t["boxes"]) for t in targets]

        if tgt_labels.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty.clone()) for _ in targets]

        cost = (
            self.cost_class * self.class_cost(flat_logits, tgt_labels)
            + self.cost_bbox * torch.cdist(flat_boxes, tgt_boxes, p=1)
            - self.cost_giou
            * generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        )  # (B*Q, T)
        cost = cost.view(batch_size, num_queries, -1).cpu()  # (B, Q, T)
        if not bool(torch.isfinite(cost).all()):
            raise ValueError("HungarianMatcher: the matching cost has NaN or infinite entries")

        valid = outputs.get("pred_valid")  # (B, Q) bool: only these slots may be matched
        if valid is not None:
            valid = valid.cpu()
            cost = cost.masked_fill(~valid[..., None], _EMPTY_SLOT_COST)

        indices = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):  # block (B, Q, n_i)
            rows, cols = linear_sum_assignment(block[i].numpy())
            rows, cols = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
            if valid is not None:  # fewer filled slots than targets: the rest stay unmatched
                keep = valid[i, rows]
                rows, cols = rows[keep], cols[keep]
            indices.append((rows, cols))
        return indices
