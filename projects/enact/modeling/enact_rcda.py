"""Separable ENACT in this project's Anchor DETR: the encoder layer and encoder of
``configs/anchor_detr_r50_dc5_50ep_enact.py`` (RCDA encoder whose keys and values are clustered).

The method, why it is this one, and its implementation are in :mod:`.separable_enact`; this module
puts it into :class:`~.anchor_detr.RCDAEncoderLayer` (keys pooled by the layer's
:class:`~.rcda.MultiheadRCDA` as its ``key_pooling`` says).  A baseline RCDA checkpoint loads with
only ``layers.<i>.cluster_{x,y}.w_prob.{weight,bias}`` missing.
"""

from typing import List, Optional

import torch
from torch import nn

from .anchor_detr import RCDAEncoder, RCDAEncoderLayer
from .enact import CLUSTERING_MODES, check_sigma
from .rcda import MultiheadRCDA
from .separable_enact import GridClusters, RCDAProjections, SeparableEnact, cluster_grid

__all__ = [
    "GridClusters",  # re-exported from .separable_enact
    "cluster_grid",  # re-exported from .separable_enact
    "EnactRCDAEncoderLayer",
    "EnactRCDAEncoder",
]


class EnactRCDAEncoderLayer(SeparableEnact, RCDAEncoderLayer):
    """RCDA encoder layer whose column keys, row keys and value grid are clustered by separable
    ENACT (:class:`~.separable_enact.SeparableEnact`); queries stay un-clustered.

    Args:
        attention: a :class:`MultiheadRCDA` (``self_attn``; its parameters keep the baseline's
            names, so a baseline checkpoint loads with only the ``cluster_{x,y}.w_prob`` missing).
        embed_dim, ffn_dim, dropout, activation: as :class:`RCDAEncoderLayer`.
        sigma: ENACT's Gaussian sigma, a positive int (3, the paper's value for Anchor DETR).
        mode, backend: of both :class:`EnactClustering` modules.
    """

    def __init__(
        self,
        attention: nn.Module,
        embed_dim: int = 256,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        sigma: int = 3,
        mode: str = "segments",
        backend: str = "auto",
    ):
        if not isinstance(attention, MultiheadRCDA):
            raise TypeError(
                f"EnactRCDAEncoderLayer needs a MultiheadRCDA attention, got {type(attention).__name__}"
            )
        super().__init__(attention, embed_dim, ffn_dim, dropout, activation)
        self.embed_dim = embed_dim
        self.configure_clustering(sigma, mode, backend)

    def attend(
        self,
        src: torch.Tensor,
        pos_x: torch.Tensor,
        pos_y: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """As :meth:`RCDAEncoderLayer.attend`, with separable ENACT on the keys and values.

        src (B, H, W, C); pos_x (B, W, C); pos_y (B, H, C); mask (B, H, W) bool, True = padding
        (rectangular: bottom / right).  Returns ``src + dropout(RCDA_cl(...))`` (B, H, W, C).
        """
        b, h, w, c = src.shape
        if mask is not None and tuple(mask.shape) != (b, h, w):
            raise ValueError(f"mask must be (B, H, W) = {(b, h, w)}, got {tuple(mask.shape)}")
        attn = self.self_attn
        src_x = src + pos_x[:, None, :, :]  # (B, H, W, C)
        src_y = src + pos_y[:, :, None, :]  # (B, H, W, C)
        key_x, key_y, pad_x, pad_y = MultiheadRCDA.pool_keys(src_x, src_y, mask, attn.key_pooling)  # (B,W,C), (B,H,C)
        out = self.attend_clustered(
            RCDAProjections.of(attn),
            src_x.reshape(b, h * w, c),
            src_y.reshape(b, h * w, c),
            key_x,
            key_y,
            src,
            pad_x,
            pad_y,
            key_padding_mask=mask,
            dropout=attn.dropout if attn.training else 0.0,
        )  # (B, HW, C)
        return src + self.dropout1(out.reshape(b, h, w, c))


class EnactRCDAEncoder(RCDAEncoder):
    """:class:`RCDAEncoder` with separable ENACT in every layer (:class:`EnactRCDAEncoderLayer`).

    Args: as :class:`RCDAEncoder`, plus ``sigma`` (default 3, the paper's value for Anchor DETR),
    ``mode`` and ``backend`` of the clusterings.
    """

    layer_class = EnactRCDAEncoderLayer

    def __init__(
        self,
        attention: Optional[nn.Module] = None,
        num_layers: int = 6,
        embed_dim: int = 256,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_heads: int = 8,
        sigma: int = 3,
        mode: str = "segments",
        backend: str = "auto",
    ):
        check_sigma(sigma)
        if mode not in CLUSTERING_MODES:
            raise ValueError(f"mode must be one of {CLUSTERING_MODES}, got {mode!r}")
        super().__init__(attention, num_layers, embed_dim, ffn_dim, dropout, activation, num_heads)
        self.sigma = sigma
        self.mode = mode
        for layer in self.layers:  # RCDAEncoder builds layers with the default clustering options
            if (layer.sigma, layer.cluster_x.mode, layer.cluster_x.backend) != (sigma, mode, backend):
                layer.configure_clustering(sigma, mode, backend)

    def statistics(self) -> dict:
        """Per-layer statistics of the last call (``layers``) and their means over the layers."""
        per_layer: List[dict] = [layer.statistics() for layer in self.layers]
        if not per_layer or not all(per_layer):
            return {}
        mean = {k: sum(s[k] for s in per_layer) / len(per_layer) for k in per_layer[0]}
        return {**mean, "layers": per_layer}
