"""Set prediction loss of DETR-style detectors.

The matcher pairs queries with targets; then, with N_b the number of target boxes in the batch
(averaged over workers, at least 1),

    loss_ce   = CE(logits, classes; weight of "no object" = eos_coef)          (softmax variant)
              = sum_{b,q,k} FL(logit_bqk, onehot_bqk) / N_b                     (focal variant)
    loss_bbox = sum_{matched} ||b_q - b_t||_1 / N_b
    loss_giou = sum_{matched} (1 - GIoU(b_q, b_t)) / N_b

Unmatched queries are trained towards "no object" (class index num_classes in the softmax
variant, an all-zero one-hot in the focal variant).  The losses are returned unweighted; the
model sums ``loss[k] * weight_dict[k]`` for ``k`` in ``weight_dict``.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["SetCriterion", "aux_weight_dict", "sigmoid_focal_loss"]


def sigmoid_focal_loss(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise focal loss of Lin et al. (2017), no reduction:

        p_t = p y + (1 - p)(1 - y),  p = sigmoid(x)
        FL  = -alpha_t (1 - p_t)^gamma log(p_t),  alpha_t = alpha y + (1 - alpha)(1 - y)

    ``-log(p_t)`` is computed as the numerically stable BCE-with-logits.  A negative ``alpha``
    disables the alpha weighting.  inputs, targets: same shape (targets in [0, 1]) -> same shape.
    """
    prob = inputs.sigmoid()
    bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")  # -log(p_t)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def aux_weight_dict(weight_dict: Dict[str, float], num_aux: int) -> Dict[str, float]:
    """Copy of ``weight_dict`` with ``f"{k}_{i}"`` for i < num_aux added (same weight as ``k``),
    for the losses of the auxiliary (intermediate decoder layer) outputs."""
    full = dict(weight_dict)
    for i in range(num_aux):
        full.update({f"{k}_{i}": w for k, w in weight_dict.items()})
    return full


class SetCriterion(nn.Module):
    """Losses of a DETR-style detector given a (Hungarian) matcher.

    Args:
        num_classes: number of object classes, without "no object".
        matcher: callable(outputs, targets) -> list of (query index, target index) pairs.
        weight_dict: loss name -> weight, aux names included (see ``aux_weight_dict``).
        losses: which groups to compute: "class" (loss_ce) and/or "boxes" (loss_bbox, loss_giou).
        eos_coef: cross-entropy weight of the "no object" class (softmax variant only).
        use_focal: sigmoid focal loss over num_classes logits instead of softmax cross entropy
            over num_classes + 1 logits.
        focal_alpha, focal_gamma: focal loss parameters.
    """

    LOSS_GROUPS = ("class", "boxes")

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        losses: Sequence[str] = ("class", "boxes"),
        eos_coef: float = 0.1,
        use_focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        unknown = [name for name in losses if name not in self.LOSS_GROUPS]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; expected a subset of {self.LOSS_GROUPS}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.eos_coef = eos_coef
        self.use_focal = use_focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)  # (num_classes + 1,)

    @staticmethod
    def _matched_query_index(
        indices: List[Tuple[torch.Tensor, torch.Tensor]]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image index, query index) of every matched query, each (M,)."""
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        return batch_idx, query_idx

    def loss_class(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"]  # (B, Q, K)
        batch_size, num_queries, num_logits = logits.shape
        expected = self.num_classes if self.use_focal else self.num_classes + 1
        if num_logits != expected:
            raise ValueError(
                f"pred_logits has {num_logits} classes, expected {expected} "
                f"(num_classes={self.num_classes}, use_focal={self.use_focal})"
            )
        batch_idx, query_idx = self._matched_query_index(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        # Class index of every query; unmatched queries get num_classes ("no object").
        classes = torch.full(
            (batch_size, num_queries), self.num_classes, dtype=torch.int64, device=logits.device
        )  # (B, Q)
        classes[batch_idx, query_idx] = matched_labels.to(logits.device, torch.int64)

        valid = outputs.get("pred_valid")  # (B, Q) bool: filled slots (encoder aux outputs), else all
        if self.use_focal:
            onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1]  # (B, Q, K), drop no-object
            onehot = onehot.to(logits.dtype)
            loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
            if valid is not None:
                loss = loss * valid[..., None]
            # mean over queries * Q == sum over queries; kept in this form as in Conditional DETR.
            loss_ce = loss.mean(1).sum() / num_boxes * num_queries
        elif valid is None:
            weight = self.class_weight.to(logits.dtype)
            # logits (B, K, Q) against classes (B, Q)
            loss_ce = F.cross_entropy(logits.transpose(1, 2), classes, weight)
        else:  # the same weighted mean over the filled slots only
            weight = self.class_weight.to(logits.dtype)[classes] * valid  # (B, Q)
            ce = F.cross_entropy(logits.transpose(1, 2), classes, reduction="none")  # (B, Q)
            loss_ce = (ce * weight).sum() / weight.sum().clamp(min=1e-12)
        return {"loss_ce": loss_ce}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        batch_idx, query_idx = self._matched_query_index(indices)
        pred = outputs["pred_boxes"][batch_idx, query_idx]  # (M, 4) cxcywh
        target = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])  # (M, 4)
        target = target.to(pred)
        loss_bbox = F.l1_loss(pred, target, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))  # (M, M)
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def num_boxes(self, targets, device) -> float:
        """Number of target boxes per worker: sum over workers / world size, clamped to >= 1."""
        total = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return torch.clamp(total / comm.get_world_size(), min=1).item()

    def get_losses(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        losses = {}
        for name in self.losses:
            fn = self.loss_class if name == "class" else self.loss_boxes
            losses.update(fn(outputs, targets, indices, num_boxes))
        return losses

    def forward(
        self, outputs: Dict[str, object], targets: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: {"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4), optionally
                "aux_outputs": list of dicts with the same two keys, "encoder_aux_outputs": the
                same per encoder layer with "pred_valid" (B, Q) bool (only filled slots are
                matched and classified), and "sparse": a sparse encoder's
                :class:`~.sparse_selection.SparseOutputs`}.
            targets: B dicts with "labels" (n_i,) int64 and "boxes" (n_i, 4) normalised cxcywh.

        Returns:
            unweighted losses: loss_ce / loss_bbox / loss_giou, ``{name}_{i}`` for the i-th
            auxiliary output, ``{name}_enc_{l}`` for encoder layer l's; with "sparse" the scorer's ``loss_dam`` (or ``loss_os`` for the
            objectness target), once (no auxiliary copies).
        """
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        main_outputs = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "encoder_aux_outputs")}
        indices = self.matcher(main_outputs, targets)
        losses = self.get_losses(main_outputs, targets, indices, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux, targets)
            aux_losses = self.get_losses(aux, targets, aux_indices, num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        for i, aux in enumerate(outputs.get("encoder_aux_outputs", [])):  # Sparse DETR's encoder layers
            aux_indices = self.matcher(aux, targets)
            aux_losses = self.get_losses(aux, targets, aux_indices, num_boxes)
            losses.update({f"{k}_enc_{i}": v for k, v in aux_losses.items()})
        sparse = outputs.get("sparse")  # a sparse encoder's SparseOutputs: its scorer's loss, once
        if sparse is not None:
            losses.update(sparse.losses(targets))
        return losses

    def weight_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``{k: losses[k] * weight_dict[k]}`` for the losses with a weight (others dropped)."""
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}
