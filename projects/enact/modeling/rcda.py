"""Row-Column Decoupled Attention (RCDA) of Anchor DETR (Wang et al., AAAI 2022).

For a key/value feature map of H x W positions, standard attention gives every query one weight
per position (H * W of them).  RCDA factorises that weight into a weight over the columns
(x, W values) times a weight over the rows (y, H values)::

    K_x[w] = mean_h key_x[h, w]         (B, W, C)   key map carrying a 1-D encoding of x
    K_y[h] = mean_w key_y[h, w]         (B, H, C)   key map carrying a 1-D encoding of y
    A_x    = softmax_w(q_x K_x^T / sqrt(d))          (B, n, Q, W)
    A_y    = softmax_h(q_y K_y^T / sqrt(d))          (B, n, Q, H)
    out[q] = sum_h A_y[q, h] sum_w A_x[q, w] V[h, w]

per head (n heads of width d = C / n), with learnt projections of the two queries, the two
pooled keys and the values, and an output projection.  The means run over the *valid* (not
padded) pixels only; a column without valid pixel gets zero weight in A_x and a row without valid
pixel zero weight in A_y, so the padded part of the map does not influence the result.  Padding
masks are assumed rectangular (bottom/right padding, as detectron2's ``ImageList``): a padded
pixel whose row and column both hold valid pixels would still get the weight
``A_y[h] * A_x[w]``.

Cost: O(Q (H + W) d) for the weights and O(Q H W d) for the output, with an intermediate of
Q * min(H, W) * d per head (the longer axis is contracted first).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import check_embed_heads

__all__ = ["MultiheadRCDA", "rcda_weights", "rcda_combine"]


def _masked_softmax(logits: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax over the last dim; ``pad`` (B, S) True = zero weight.  logits (B, n, Q, S)."""
    if pad is not None:
        logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


def rcda_weights(
    q_x: torch.Tensor,
    q_y: torch.Tensor,
    k_x: torch.Tensor,
    k_y: torch.Tensor,
    pad_x: Optional[torch.Tensor] = None,
    pad_y: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two attention distributions of RCDA from projected, per-head tensors.

    q_x, q_y (B, n, Q, d) (not yet scaled); k_x (B, n, W, d); k_y (B, n, H, d); pad_x (B, W),
    pad_y (B, H) bool, True = padded column / row.  Returns A_x (B, n, Q, W), A_y (B, n, Q, H).
    """
    scale = q_x.shape[-1] ** -0.5
    a_x = _masked_softmax(torch.matmul(q_x * scale, k_x.transpose(-2, -1)), pad_x)
    a_y = _masked_softmax(torch.matmul(q_y * scale, k_y.transpose(-2, -1)), pad_y)
    return a_x, a_y


def rcda_combine(a_x: torch.Tensor, a_y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out[q] = sum_h A_y[q, h] sum_w A_x[q, w] V[h, w]``.

    a_x (B, n, Q, W), a_y (B, n, Q, H), v (B, n, H, W, d) -> (B, n, Q, d).  The longer of the two
    axes is contracted first, which keeps the intermediate at Q * min(H, W) * d.
    """
    height, width = v.shape[2], v.shape[3]
    if width >= height:
        rows = torch.einsum("bnqw,bnhwd->bnqhd", a_x, v)  # (B, n, Q, H, d)
        return torch.einsum("bnqh,bnqhd->bnqd", a_y, rows)
    cols = torch.einsum("bnqh,bnhwd->bnqwd", a_y, v)  # (B, n, Q, W, d)
    return torch.einsum("bnqw,bnqwd->bnqd", a_x, cols)


KEY_POOLINGS = ("valid", "all")


def check_key_pooling(key_pooling: str) -> None:
    if key_pooling not in KEY_POOLINGS:
        raise ValueError(f"key_pooling must be one of {KEY_POOLINGS}, got {key_pooling!r}")


class MultiheadRCDA(nn.Module):
    """Multi-head row-column decoupled attention.

    Args:
        embed_dim: model width C.
        num_heads: number of heads n (C must be a multiple of n).
        dropout: dropout on the two attention distributions (training only).
        bias: biases of the projections.
        key_pooling: how the key maps are averaged into column / row keys when a padding mask is
            given: "valid" (default) over the valid pixels only, so an image's output does not
            depend on how much the batch pads it; "all" over the whole padded map, as the authors'
            code does (use it to reproduce a released Anchor DETR's outputs on padded batches).

    Parameters: five input projections (``q_x_proj``, ``q_y_proj``, ``k_x_proj``, ``k_y_proj``,
    ``v_proj``) and ``out_proj``, all C x C; Xavier-uniform weights, zero biases.

    ``forward`` returns the attention output (B, Q, C) *without* residual connection.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
        key_pooling: str = "valid",
    ):
        super().__init__()
        check_key_pooling(key_pooling)
        self.key_pooling = key_pooling
        check_embed_heads(embed_dim, num_heads)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_x_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_y_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_x_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_y_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for proj in (self.q_x_proj, self.q_y_proj, self.k_x_proj, self.k_y_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ..., C) -> (B, n, ..., d)."""
        x = x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)
        return x.movedim(-2, 1)

    @staticmethod
    def pool_keys(
        key_x: torch.Tensor, key_y: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
        key_pooling: str = "valid",
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Column keys (B, W, C), row keys (B, H, C) as means over the valid pixels ("valid") or
        over all pixels of the padded map ("all"), and the masks of the columns / rows without
        any valid pixel, (B, W) / (B, H) (or None)."""
        if key_padding_mask is not None and key_pooling == "all":
            return key_x.mean(1), key_y.mean(2), key_padding_mask.all(1), key_padding_mask.all(2)
        if key_padding_mask is None:
            return key_x.mean(1), key_y.mean(2), None, None
        valid = (~key_padding_mask).to(key_x.dtype)[..., None]  # (B, H, W, 1)
        k_x = (key_x * valid).sum(1) / valid.sum(1).clamp(min=1)  # (B, W, C)
        k_y = (key_y * valid).sum(2) / valid.sum(2).clamp(min=1)  # (B, H, C)
        return k_x, k_y, key_padding_mask.all(1), key_padding_mask.all(2)

    def attention_weights(
        self,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
        key_x: torch.Tensor,
        key_y: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """A_x (B, n, Q, W) and A_y (B, n, Q, H), without dropout (for inspection)."""
        k_x, k_y, pad_x, pad_y = self.pool_keys(key_x, key_y, key_padding_mask, self.key_pooling)
        return rcda_weights(
            self.split_heads(self.q_x_proj(query_x)),
            self.split_heads(self.q_y_proj(query_y)),
            self.split_heads(self.k_x_proj(k_x)),
            self.split_heads(self.k_y_proj(k_y)),
            pad_x,
            pad_y,
        )

    def forward(
        self,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
        key_x: torch.Tensor,
        key_y: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query_x: queries for the column (x) attention, content + encoding of x (B, Q, C).
            query_y: queries for the row (y) attention, content + encoding of y (B, Q, C).
            key_x: key map with the encoding of x (B, H, W, C), pooled over the rows.
            key_y: key map with the encoding of y (B, H, W, C), pooled over the columns.
            value: value map (B, H, W, C).
            key_padding_mask: (B, H, W) bool, True = padding.

        Returns:
            (B, Q, C), no residual.
        """
        if value.dim() != 4 or key_x.shape != value.shape or key_y.shape != value.shape:
            raise ValueError(
                "key_x, key_y and value must be (B, H, W, C) maps of one shape, got "
                f"{tuple(key_x.shape)}, {tuple(key_y.shape)}, {tuple(value.shape)}"
            )
        if key_padding_mask is not None and key_padding_mask.shape != value.shape[:3]:
            raise ValueError(
                f"key_padding_mask must be (B, H, W) = {tuple(value.shape[:3])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        a_x, a_y = self.attention_weights(query_x, query_y, key_x, key_y, key_padding_mask)
        if self.training and self.dropout > 0.0:
            a_x = F.dropout(a_x, p=self.dropout)
            a_y = F.dropout(a_y, p=self.dropout)
        v = self.split_heads(self.v_proj(value))  # (B, n, H, W, d)
        out = rcda_combine(a_x, a_y, v)  # (B, n, Q, d)
        out = out.movedim(1, -2).flatten(-2)  # (B, Q, C)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"key_pooling={self.key_pooling!r}"
        )
