"""Sine/cosine embeddings of coordinates: the one implementation every detector uses.

``sine_embedding(c, F)`` embeds each coordinate c with F channels

    e[2i] = sin(scale c / T^(2i / F)),  e[2i + 1] = cos(scale c / T^(2i / F))

and ``sine_embedding_2d`` embeds points (x, y) as [e(y), e(x)] (Conditional DETR's reference
points, Anchor DETR's anchors and pixel grid).  ``PositionEmbeddingSine`` is DETR's fixed 2-D
embedding of a feature map, computed from the padding mask:

For a feature map with padding mask ``mask`` (B, H, W), True on padded pixels, the row and
column coordinates of a pixel are the number of valid pixels above / left of it, inclusive
(a cumulative sum over the valid pixels, so the padding does not shift the coordinates of the
image).  With ``normalize`` they are rescaled to (0, scale] by the extent of the valid region:

    y = (cumsum_H(valid) + offset) / (valid height + eps) * scale

Each coordinate c is embedded with ``num_pos_feats`` channels

    e[2i] = sin(c / T^(2i / F)),  e[2i + 1] = cos(c / T^(2i / F)),   F = num_pos_feats

and the y-embedding is concatenated before the x-embedding: the output is
(B, 2 * num_pos_feats, H, W).
"""

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "sine_embedding", "sine_embedding_2d"]


def sine_embedding(
    coords: torch.Tensor, num_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> torch.Tensor:
    """(...,) -> (..., num_feats) float32: channels 2i / 2i + 1 = sin / cos(scale c / T^(2i / F))."""
    if num_feats <= 0 or num_feats % 2:
        raise ValueError(f"num_feats must be a positive even number, got {num_feats}")
    idx = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / num_feats)  # (F,)
    x = (coords.float() * scale)[..., None] / dim_t  # (..., F)
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_embedding_2d(
    points: torch.Tensor, num_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> torch.Tensor:
    """points (..., 2) as (x, y) -> (..., 2 * num_feats) float32: [e(y), e(x)].  A point at (x, y)
    in [0, 1]^2 gets the embedding of the feature-map pixel at the same normalised position."""
    if points.shape[-1] != 2:
        raise ValueError(f"points must be (..., 2), got shape {tuple(points.shape)}")
    embed = sine_embedding(points, num_feats, temperature, scale)  # (..., 2, F)
    return torch.cat((embed[..., 1, :], embed[..., 0, :]), dim=-1)


class PositionEmbeddingSine(nn.Module):
    """DETR's sine positional embedding.

    Args:
        num_pos_feats: channels per coordinate; the output has ``2 * num_pos_feats`` channels
            (use ``embed_dim // 2``).
        temperature: the base T of the frequencies.
        normalize: rescale the coordinates to (0, scale] per image (DETR: True).
        scale: the range of the normalised coordinates (2 * pi).
        offset: added to the coordinates before normalising (0 in DETR, -0.5 in some variants).
        eps: guards the division by the valid extent.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: Optional[float] = 2 * math.pi,
        offset: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, H, W) bool, True = padding.  Returns (B, 2 * num_pos_feats, H, W) float32."""
        if mask.dim() != 3:
            raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
        valid = (~mask.bool()).to(torch.float32)
        y_embed = valid.cumsum(1)  # (B, H, W): 1-based row index among valid pixels
        x_embed = valid.cumsum(2)  # (B, H, W): 1-based column index among valid pixels
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale

        pos_x = sine_embedding(x_embed, self.num_pos_feats, self.temperature, scale=1.0)  # (B, H, W, F)
        pos_y = sine_embedding(y_embed, self.num_pos_feats, self.temperature, scale=1.0)  # (B, H, W, F)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}"
        )
