"""Fixed 2-D sine/cosine positional embedding of DETR, computed from the padding mask.

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

__all__ = ["PositionEmbeddingSine"]


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

        # Frequencies shared by each (sin, cos) pair: T^(2 * floor(i / 2) / F), i = 0..F-1.
        idx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (
            2 * torch.div(idx, 2, rounding_mode="floor") / self.num_pos_feats
        )

        pos_x = x_embed[..., None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[..., None] / dim_t  # (B, H, W, F)
        # Interleave: even channels sin, odd channels cos.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}"
        )
