"""Sparse DETR's token selection and the scorer's target and loss, shared by the sparse encoder
(:mod:`.sparse_encoder`), the decoders (which sum their cross-attention maps) and the criterion.
Depends on torch only, so that :mod:`.transformer` can import it."""
from numbers import Real
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "SCORER_TARGETS",
    "SparseOutputs",
    "TokenSelection",
    "attention_map",
    "check_query_ratio",
    "check_scorer_target",
    "dam_loss",
    "dam_target",
    "mha_attention_map",
    "num_selected",
    "objectness_target",
    "select_tokens",
    "selection_statistics",
    "token_centres",
    "top_tokens",
]


SCORER_TARGETS = ("dam", "objectness")  # what the scorer learns: Sparse DETR's DAM, or its OS alternative


def check_scorer_target(scorer_target: str) -> str:
    if scorer_target not in SCORER_TARGETS:
        raise ValueError(f"scorer_target must be one of {SCORER_TARGETS}, got {scorer_target!r}")
    return scorer_target


def check_query_ratio(query_ratio) -> float:
    """rho, the share of each image's valid tokens that are encoder queries, in (0, 1]."""
    if isinstance(query_ratio, bool) or not isinstance(query_ratio, Real) or not 0.0 < float(query_ratio) <= 1.0:
        raise ValueError(f"query_ratio (rho) must be a number in (0, 1], got {query_ratio!r}")
    return float(query_ratio)


class TokenSelection(NamedTuple):
    """The tokens a :class:`SparseTransformerEncoder` call updated.  B images, N tokens, K slots."""

    scores: torch.Tensor  # (B, N) the scorer's logits (with autograd graph); pads: not meaningful
    valid: torch.Tensor  # (B, N) bool, True = valid token
    index: torch.Tensor  # (B, K) int64 selected token positions, ascending; empty slots hold N
    slots: torch.Tensor  # (B, K) bool, True = a selected token (the first num_selected[b] slots)
    num_selected: torch.Tensor  # (B,) int64, k_b = ceil(rho * n_b)
    # per encoder layer, the selected tokens after it (K, B, C) (empty slots: not meaningful),
    # with their graph: the inputs of the encoder auxiliary loss (:mod:`.encoder_aux`)
    layer_tokens: Tuple[torch.Tensor, ...] = ()

    def token_mask(self) -> torch.Tensor:
        """(B, N) bool, True = selected token (never a pad)."""
        b, n = self.scores.shape
        mask = torch.zeros(b, n + 1, dtype=torch.bool, device=self.index.device)
        return mask.scatter(1, self.index, self.slots)[:, :n]


def num_selected(valid: torch.Tensor, query_ratio: float) -> torch.Tensor:
    """k_b = ceil(rho * n_b) (at least 1 where n_b >= 1) for valid (B, N) bool.  (B,) int64.  The
    ceil is taken after subtracting 1e-6, so that e.g. 0.3 * 10 gives 3."""
    rho = check_query_ratio(query_ratio)
    n = valid.sum(1)
    return torch.ceil(n.double() * rho - 1e-6).long().clamp(min=1).minimum(n)


def top_tokens(values: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> TokenSelection:
    """The k_b (``k`` (B,)) valid tokens of every row of ``values`` (B, N) with the highest value.
    Ranked by a stable descending sort of the detached values, valid tokens first, so ties go to
    the lower position and a row's choice depends on that row only.  One host sync (K = max k_b)."""
    b, n = values.shape
    width = int(k.max()) if b else 0  # the host sync
    order = torch.sort(values.detach(), dim=1, descending=True, stable=True).indices  # (B, N)
    pads_last = torch.sort((~valid).gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    order = order.gather(1, pads_last)[:, :width]  # (B, K) best first, valid tokens before pads
    slots = torch.arange(width, device=values.device)[None, :] < k[:, None]  # (B, K)
    index = torch.where(slots, order, torch.full_like(order, n)).sort(dim=1).values  # ascending, N last
    return TokenSelection(values, valid, index, slots, k)


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, query_ratio: float) -> TokenSelection:
    """The top ceil(rho * n_b) valid tokens of every row of ``scores`` (B, N) (``valid`` (B, N)
    bool): :func:`top_tokens` with k = :func:`num_selected`."""
    return top_tokens(scores, valid, num_selected(valid, query_ratio))


# ---------------------------------------------------------------------- the scorer's target and loss
@torch.no_grad()
def attention_map(q: torch.Tensor, k: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One attention's share of the decoder cross-attention map (DAM): the attention weights
    softmax(q k^T / sqrt(d) + mask) summed over heads and queries, per key token, without
    gradient (recomputed where the attention kernel returns no weights).  q (B, h, L, d),
    k (B, h, S, d), key_padding_mask (B, S) bool (True = pad: weight 0).  Returns (B, S), float32
    or float64.  The DAM of a decoder is the sum of this over its layers."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) / (q.shape[-1] ** 0.5)  # (B, h, L, S)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2))


@torch.no_grad()
def mha_attention_map(module, query: torch.Tensor, key: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`attention_map` of a :class:`~.attention.MultiheadAttention` (its ``attn``'s
    projections) for sequence-first query (L, B, C) and key (S, B, C), positions already added."""
    attn = module.attn
    heads = attn.num_heads
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3

    def split(x):  # (L, B, C) -> (B, h, L, d)
        length, bsz, dim = x.shape
        return x.reshape(length, bsz, heads, dim // heads).permute(1, 2, 0, 3)

    return attention_map(split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), key_padding_mask)


def dam_target(dam: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Sparse DETR's binary target of the scorer: 1 on the top k_b (``k`` (B,), the encoder's
    ceil(rho * n_b)) valid tokens of each image by the DAM (B, N) (ranked as :func:`top_tokens`
    ranks scores), else 0.  (B, N) in the DAM's dtype, detached."""
    return top_tokens(dam.detach(), valid, k).token_mask().to(dam.dtype)


def dam_loss(scores: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the scorer's logits ``scores`` (B, N) against ``target`` (B, N),
    the mean over the batch's valid tokens (pads count nothing).  A scalar; its weight is the
    criterion's."""
    bce = F.binary_cross_entropy_with_logits(scores, target.to(scores.dtype), reduction="none")
    return (bce * valid).sum() / valid.sum().clamp(min=1)


def token_centres(valid: torch.Tensor, shape: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The centres of the columns and rows of a (H, W) token map, normalised by each image's
    valid region: valid (B, H * W) bool, the valid tokens of image b a top-left h_b x w_b block.
    Column j's centre is (j + 0.5) / w_b, row i's (i + 0.5) / h_b.  Returns cx (B, W), cy (B, H)
    float32."""
    height, width = shape
    grid = valid.view(-1, height, width)
    rows = grid.any(2).sum(1).clamp(min=1)  # (B,) h_b
    cols = grid.any(1).sum(1).clamp(min=1)  # (B,) w_b
    cy = (torch.arange(height, device=valid.device, dtype=torch.float32)[None] + 0.5) / rows[:, None]  # (B, H)
    cx = (torch.arange(width, device=valid.device, dtype=torch.float32)[None] + 0.5) / cols[:, None]  # (B, W)
    return cx, cy


def objectness_target(valid: torch.Tensor, shape: Tuple[int, int], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """The objectness-score (OS) target: 1 on the valid tokens whose centre lies inside one of
    their image's ground-truth boxes, else 0.  valid (B, H * W) bool, ``shape`` (H, W) of the
    map, boxes: per image (n_b, 4) cxcywh normalised by the unpadded image (the criterion's
    targets).  Token (i, j) of an image whose valid region is h_b x w_b tokens has its centre
    at ((j + 0.5) / w_b, (i + 0.5) / h_b).  (B, H * W) float."""
    dtype = torch.float32
    cx, cy = token_centres(valid, shape)  # (B, W), (B, H)
    inside: List[torch.Tensor] = []
    for b, box in enumerate(boxes):  # targets come as a list; boxes per image vary in number
        box = box.to(valid.device, dtype)
        x1, y1 = box[:, 0] - box[:, 2] / 2, box[:, 1] - box[:, 3] / 2
        x2, y2 = box[:, 0] + box[:, 2] / 2, box[:, 1] + box[:, 3] / 2  # (n,)
        in_x = (x1[:, None] <= cx[b][None]) & (cx[b][None] <= x2[:, None])  # (n, W)
        in_y = (y1[:, None] <= cy[b][None]) & (cy[b][None] <= y2[:, None])  # (n, H)
        inside.append((in_y[:, :, None] & in_x[:, None, :]).any(0))  # (H, W)
    return (torch.stack(inside).flatten(1) & valid).to(dtype)


class SparseOutputs(NamedTuple):
    """What a transformer with a sparse encoder hands up for the criterion: the encoder's
    selection; the decoder cross-attention map (B, N) (summed over queries, heads and layers,
    no gradient), or None where it is not computed (the objectness target needs none); the
    map's (H, W); the scorer's target, "dam" or "objectness"."""

    selection: TokenSelection
    dam: Optional[torch.Tensor]
    shape: Optional[Tuple[int, int]] = None
    target: str = "dam"

    def losses(self, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
        """The scorer's loss, once: ``loss_dam`` (target "dam") or ``loss_os`` (target
        "objectness": the tokens inside the ``targets``' boxes); empty where it cannot be made."""
        sel = self.selection
        if self.target == "objectness":
            if targets is None or self.shape is None:
                return {}
            target = objectness_target(sel.valid, self.shape, [t["boxes"] for t in targets])
            return {"loss_os": dam_loss(sel.scores, target, sel.valid)}
        loss = self.loss_dam()
        return {} if loss is None else {"loss_dam": loss}

    def loss_dam(self) -> Optional[torch.Tensor]:
        """BCE of the scores against the top k_b tokens of the DAM (None without a DAM)."""
        if self.dam is None:
            return None
        sel = self.selection
        return dam_loss(sel.scores, dam_target(self.dam, sel.valid, sel.num_selected), sel.valid)


@torch.no_grad()
def selection_statistics(sparse: SparseOutputs, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
    """How well a call's selection S_b matches what the decoder used, per image ((B,) float):

    * ``selected_share``: k_b / n_b;
    * ``dam_overlap``: |S_b & T_b| / k_b, T_b the top k_b tokens of the DAM (the scorer's target);
    * ``dam_mass``: the DAM's mass on S_b over its mass on T_b (1 = S_b captures as much of the
      decoder's attention as the best k_b tokens could) -- the paper's correlation analysis;
    * ``dam_top_share``: the DAM's mass on T_b over its mass on all valid tokens (how
      concentrated the decoder's attention is: k_b / n_b for a uniform map);
    * ``in_box_share``: the share of S_b inside ground-truth boxes (with ``targets``; see
      :func:`objectness_target`), and ``box_token_share``, the share of all valid tokens inside
      them (what a random selection would give).

    Keys whose inputs are missing (no DAM, no targets) are left out."""
    sel = sparse.selection
    chosen = sel.token_mask()
    k = sel.num_selected.to(torch.float64)
    stats = {"selected_share": k / sel.valid.sum(1).clamp(min=1).to(torch.float64)}
    if sparse.dam is not None:
        dam = sparse.dam.to(torch.float64)
        best = dam_target(dam, sel.valid, sel.num_selected).bool()
        stats["dam_overlap"] = (chosen & best).sum(1) / k.clamp(min=1)
        stats["dam_mass"] = (dam * chosen).sum(1) / (dam * best).sum(1).clamp(min=1e-12)
        stats["dam_top_share"] = (dam * best).sum(1) / (dam * sel.valid).sum(1).clamp(min=1e-12)
    if targets is not None and sparse.shape is not None:
        inside = objectness_target(sel.valid, sparse.shape, [t["boxes"] for t in targets]).bool()
        stats["in_box_share"] = (chosen & inside).sum(1) / k.clamp(min=1)
        stats["box_token_share"] = inside.sum(1) / sel.valid.sum(1).clamp(min=1).to(torch.float64)
    return stats
