"""Anchor DETR (Wang et al., AAAI 2022) as a detectron2 meta-architecture, with a selectable
encoder: row-column decoupled attention (the Anchor DETR baseline) or standard multi-head
self-attention over the flattened map.

Pipeline, for a batch of B images padded to (H, W), one feature level::

    images --backbone (R50-DC5)--> res5 (B, 2048, h, w) --1x1 conv + GroupNorm--> src (B, C, h, w)
    padding mask -> normalised pixel centres x (B, w), y (B, h) in (0, 1]
    encoder (6 layers, post-norm, FFN 1024, dropout 0):
        "rcda": RCDA self-attention, queries/keys carry adapt_pos1d(sine(x)) resp. (sine(y))
        "mhsa": multi-head self-attention over h * w tokens, position adapt_pos2d(sine(x, y))
    queries: A learnt anchor points (x, y) in [0, 1]^2 x P pattern embeddings -> Q = P * A;
        the content of query p * A + a is pattern[p], its reference point anchor[a]
    decoder (6 layers, post-norm): self-attention (position adapt_pos2d(sine(anchor))),
        RCDA cross-attention to the memory (positions adapt_pos1d(sine(anchor x / y))), FFN
    heads, shared by all decoder layers:
        class  Linear(C, K) (sigmoid / focal, no "no object" logit)
        box    sigmoid(MLP(h) + [logit(anchor), 0, 0]): centre offsets on the inverse sigmoid of
               the anchor point, width and height predicted directly

As in the paper (and its reference implementation) the anchor points are the reference points of
every decoder layer: the layers refine the query *content*; the boxes of each layer are offsets
from the same anchors.  ``adapt_pos1d`` and ``adapt_pos2d`` (2-layer MLPs) are shared by the
encoder and all decoder layers.

The encoder is the swappable part (``model.transformer.encoder`` of the configs), either

* a :class:`~projects.enact.modeling.transformer.TransformerEncoder` ("mhsa") with an attention
  *prototype* deep-copied into every layer (any module with the call signature of
  :class:`~projects.enact.modeling.attention.MultiheadAttention`), or
* an :class:`RCDAEncoder` or subclass ("rcda"), whose layers call their attention in one method,
  :meth:`RCDAEncoderLayer.attend`, for subclasses to replace; its prototype may be any module
  with the signature of :class:`~projects.enact.modeling.rcda.MultiheadRCDA`.

Losses: sigmoid focal classification (alpha 0.25, gamma 2; weight 2), L1 (5) and GIoU (2) on the
Hungarian matching (costs 2 / 5 / 2), on the last and every intermediate decoder layer.
Inference keeps the top ``select_box_nums_for_evaluation`` (query, class) pairs by sigmoid score.
"""

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import MultiheadAttention
from .detr import MLP, ReferencePointDETR, inverse_sigmoid
from .position_encoding import sine_embedding, sine_embedding_2d
from .rcda import MultiheadRCDA, check_key_pooling
from .sparse_selection import SparseOutputs
from .transformer import (
    EncoderStack,
    feed_forward,
    check_attention_width,
    feed_forward_modules,
)

__all__ = [
    "sine_embedding",
    "sine_embedding_2d",
    "mask_to_positions",
    "inverse_sigmoid",
    "RCDAEncoderLayer",
    "RCDAEncoder",
    "AnchorDecoderLayer",
    "AnchorDETRTransformer",
    "AnchorDETR",
]

ANCHOR_PRIORS = ("learned", "grid")


# ---------------------------------------------------------------------- position encodings
def mask_to_positions(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixel centres of a map padded at the bottom/right: mask (B, H, W) bool,
    True = padding -> x (B, W), y (B, H), ``(index + 0.5) / valid extent`` (in (0, 1) on the
    image, above 1 on the padding)."""
    _, h, w = mask.shape
    width = (~mask.all(1)).sum(1, keepdim=True).clamp(min=1)  # (B, 1): columns with a valid pixel
    height = (~mask.all(2)).sum(1, keepdim=True).clamp(min=1)  # (B, 1): rows with a valid pixel
    x = (torch.arange(w, dtype=torch.float32, device=mask.device) + 0.5) / width  # (B, W)
    y = (torch.arange(h, dtype=torch.float32, device=mask.device) + 0.5) / height  # (B, H)
    return x, y


def _position_mlp(embed_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, embed_dim)
    )


# ---------------------------------------------------------------------- encoder
class RCDAEncoderLayer(nn.Module):
    """Post-norm encoder layer with row-column decoupled self-attention, on (B, H, W, C) maps:
    ``norm1(attend(src, pos_x, pos_y, mask))`` then the FFN block.

    Args:
        attention: a :class:`MultiheadRCDA` (used as is, not copied).
        embed_dim, ffn_dim, dropout, activation: the usual.
    """

    def __init__(
        self,
        attention: nn.Module,
        embed_dim: int = 256,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        check_attention_width(attention, embed_dim)
        self.self_attn = attention
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.linear1, self.linear2, self.dropout, self.dropout2, self.norm2, self.activation = (
            feed_forward_modules(embed_dim, ffn_dim, dropout, activation)
        )

    def attend(
        self,
        src: torch.Tensor,
        pos_x: torch.Tensor,
        pos_y: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The self-attention block, residual included (the extension point of subclasses).

        src (B, H, W, C); pos_x (B, W, C) encoding of the columns; pos_y (B, H, C) encoding of
        the rows; mask (B, H, W) bool, True = padding.  Returns ``src + dropout(RCDA(...))``.
        """
        b, h, w, c = src.shape
        src_x = src + pos_x[:, None, :, :]  # (B, H, W, C)
        src_y = src + pos_y[:, :, None, :]  # (B, H, W, C)
        out = self.self_attn(
            src_x.reshape(b, h * w, c),
            src_y.reshape(b, h * w, c),
            src_x,
            src_y,
            src,
            key_padding_mask=mask,
        )  # (B, HW, C)
        return src + self.dropout1(out.reshape(b, h, w, c))

    def forward(
        self,
        src: torch.Tensor,
        pos_x: torch.Tensor,
        pos_y: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """src (B, H, W, C) -> (B, H, W, C); see :meth:`attend`."""
        src = self.norm1(self.attend(src, pos_x, pos_y, mask))
        return self.norm2(src + self.dropout2(feed_forward(self, src)))


class RCDAEncoder(EncoderStack):
    """A stack of :class:`RCDAEncoderLayer` (class attribute ``layer_class``), each with a deep
    copy of the prototype attention (``MultiheadRCDA(embed_dim, num_heads, dropout)`` if None)."""

    layer_class = RCDAEncoderLayer

    def __init__(
        self,
        attention: Optional[nn.Module] = None,
        num_layers: int = 6,
        embed_dim: int = 256,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_heads: int = 8,
    ):
        super().__init__(attention, num_layers, embed_dim, ffn_dim, dropout, activation, num_heads)

    @staticmethod
    def default_attention(embed_dim: int, num_heads: int, dropout: float) -> nn.Module:
        return MultiheadRCDA(embed_dim, num_heads, dropout=dropout)

    def forward(self, src, pos_x, pos_y, mask=None) -> torch.Tensor:
        """src (B, H, W, C), pos_x (B, W, C), pos_y (B, H, C), mask (B, H, W) -> (B, H, W, C)."""
        for layer in self.layers:
            src = layer(src, pos_x, pos_y, mask)
        return src


# ---------------------------------------------------------------------- decoder
class AnchorDecoderLayer(nn.Module):
    """Post-norm Anchor DETR decoder layer: query self-attention, RCDA cross-attention to the
    memory, FFN.  All tensors batch-first."""

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(
            embed_dim, num_heads, attn_drop=dropout, proj_drop=dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiheadRCDA(embed_dim, num_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.linear1, self.linear2, self.dropout, self.dropout3, self.norm3, self.activation = (
            feed_forward_modules(embed_dim, ffn_dim, dropout, activation)
        )

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        query_pos: torch.Tensor,
        query_pos_x: torch.Tensor,
        query_pos_y: torch.Tensor,
        key_x: torch.Tensor,
        key_y: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        attention_map: bool = False,
    ):
        """
        Args:
            tgt: query content (B, Q, C).
            memory: encoder output (B, H, W, C) (the values).
            query_pos: 2-D encoding of the anchors (B, Q, C) (self-attention).
            query_pos_x, query_pos_y: 1-D encodings of the anchors' x and y (B, Q, C).
            key_x, key_y: memory + encoding of x / y (B, H, W, C).
            mask: (B, H, W) bool, True = padding.
            attention_map: also return the cross-attention's weight on every pixel, summed over
                queries and heads (B, H * W): the product of the row and column weights,
                recomputed without gradient (Sparse DETR's DAM).

        Returns (B, Q, C) (and the map).
        """
        tgt = self.norm1(
            self.self_attn(query=tgt, key=tgt, value=tgt, query_pos=query_pos, key_pos=query_pos)
        )
        dam = None
        if attention_map:
            with torch.no_grad():
                a_x, a_y = self.cross_attn.attention_weights(
                    tgt + query_pos_x, tgt + query_pos_y, key_x, key_y, mask
                )  # (B, n, Q, W), (B, n, Q, H)
                dam = torch.einsum("bnqh,bnqw->bhw", a_y.float(), a_x.float())  # (B, H, W)
                if mask is not None:
                    dam = dam.masked_fill(mask, 0.0)
                dam = dam.flatten(1)
        out = self.cross_attn(
            tgt + query_pos_x, tgt + query_pos_y, key_x, key_y, memory, key_padding_mask=mask
        )
        tgt = self.norm2(tgt + self.dropout2(out))
        tgt = self.norm3(tgt + self.dropout3(feed_forward(self, tgt)))
        return (tgt, dam) if attention_map else tgt


# ---------------------------------------------------------------------- transformer
class AnchorDETRTransformer(nn.Module):
    """Anchor DETR's encoder-decoder with anchor-point queries (single feature level).

    Args:
        encoder: :class:`RCDAEncoder` or a sequence encoder with the interface of
            :class:`TransformerEncoder` (``encoder(src (N, B, C), pos, mask (B, N))``).
        num_decoder_layers, num_heads, ffn_dim, dropout, activation: decoder settings.
        num_anchors: number of anchor points A.
        num_patterns: number of pattern embeddings P (Q = P * A queries).
        anchor_prior: "learned" (``nn.Embedding(A, 2)``, uniform in [0, 1]) or "grid" (fixed
            centres of a round(sqrt(A))^2 grid; A is changed to that square).
        reset_parameters: Xavier-uniform initialisation of the weight matrices of the encoder and
            decoder layers (the prototype copies then differ between layers).
        rcda_key_pooling: ``key_pooling`` of every :class:`MultiheadRCDA` (encoder and decoder):
            "valid" (default, batch-independent) or "all" (the authors' code, to reproduce a
            released model's outputs exactly on padded batches).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_decoder_layers: int = 6,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_anchors: int = 300,
        num_patterns: int = 3,
        anchor_prior: str = "learned",
        reset_parameters: bool = True,
        rcda_key_pooling: str = "valid",
    ):
        super().__init__()
        check_key_pooling(rcda_key_pooling)
        if num_decoder_layers < 1 or num_anchors < 1 or num_patterns < 1:
            raise ValueError(
                f"num_decoder_layers ({num_decoder_layers}), num_anchors ({num_anchors}) and "
                f"num_patterns ({num_patterns}) must be >= 1"
            )
        if anchor_prior not in ANCHOR_PRIORS:
            raise ValueError(f"anchor_prior must be one of {ANCHOR_PRIORS}, got {anchor_prior!r}")
        embed_dim = encoder.embed_dim
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
        self.embed_dim = embed_dim
        self.encoder = encoder
        self.encoder_type = "rcda" if isinstance(encoder, RCDAEncoder) else "mhsa"
        self.decoder_layers = nn.ModuleList(
            AnchorDecoderLayer(embed_dim, num_heads, ffn_dim, dropout, activation)
            for _ in range(num_decoder_layers)
        )
        self.num_decoder_layers = num_decoder_layers
        self.anchor_prior = anchor_prior
        if anchor_prior == "learned":
            self.anchors = nn.Embedding(num_anchors, 2)
        else:
            side = max(1, round(math.sqrt(num_anchors)))
            num_anchors = side * side
            centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
            gy, gx = torch.meshgrid(centres, centres, indexing="ij")
            self.register_buffer("grid_anchors", torch.stack((gx, gy), -1).reshape(-1, 2))
        self.num_anchors = num_anchors
        self.num_patterns = num_patterns
        self.num_queries = num_anchors * num_patterns
        self.pattern = nn.Embedding(num_patterns, embed_dim)
        self.adapt_pos2d = _position_mlp(embed_dim)
        self.adapt_pos1d = _position_mlp(embed_dim)
        if reset_parameters:
            self._reset_parameters()
        for module in self.modules():
            if isinstance(module, MultiheadRCDA):
                module.key_pooling = rcda_key_pooling

    def _reset_parameters(self) -> None:
        for module in (self.encoder, self.decoder_layers):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if self.anchor_prior == "learned":
            nn.init.uniform_(self.anchors.weight, 0.0, 1.0)

    @property
    def anchor_points(self) -> torch.Tensor:
        """(A, 2) anchor points (x, y)."""
        return self.anchors.weight if self.anchor_prior == "learned" else self.grid_anchors

    def queries(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query content (B, Q, C) and reference points (B, Q, 2); query p * A + a is
        (pattern[p], anchor[a])."""
        c = self.embed_dim
        content = self.pattern.weight[:, None, :].expand(-1, self.num_anchors, -1)  # (P, A, C)
        reference = self.anchor_points[None].expand(self.num_patterns, -1, -1)  # (P, A, 2)
        content = content.reshape(1, self.num_queries, c).expand(batch_size, -1, -1)
        reference = reference.reshape(1, self.num_queries, 2).expand(batch_size, -1, -1)
        return content, reference

    def encode(self, src: torch.Tensor, mask: torch.Tensor, pos_x, pos_y, x, y, return_selection: bool = False):
        """src (B, H, W, C) -> memory (B, H, W, C); with ``return_selection`` (a sparse
        sequence encoder only) also its token selection."""
        if self.encoder_type == "rcda":
            return self.encoder(src, pos_x, pos_y, mask)
        b, h, w, c = src.shape
        grid = torch.stack(
            (x[:, None, :].expand(-1, h, -1), y[:, :, None].expand(-1, -1, w)), dim=-1
        )  # (B, H, W, 2)
        pos = self.adapt_pos2d(sine_embedding_2d(grid, c // 2).to(src.dtype))  # (B, H, W, C)
        extra = {"return_selection": True} if return_selection else {}
        memory = self.encoder(
            src.reshape(b, h * w, c).transpose(0, 1),
            pos=pos.reshape(b, h * w, c).transpose(0, 1),
            mask=mask.reshape(b, h * w),
            **extra,
        )  # (HW, B, C), or (memory, selection)
        if return_selection:
            memory, selection = memory
            return memory.transpose(0, 1).reshape(b, h, w, c), selection
        return memory.transpose(0, 1).reshape(b, h, w, c)

    def forward(self, src: torch.Tensor, mask: torch.Tensor, return_sparse: bool = False):
        """
        Args:
            src: projected features (B, C, H, W).
            mask: padding mask (B, H, W), True = padding.
            return_sparse: also return a sparse encoder's SparseOutputs (its selection and the
                decoder's cross-attention map), None for another encoder.

        Returns:
            hs: decoder outputs (L, B, Q, C);
            reference: anchor point of every query (B, Q, 2), (x, y) in [0, 1];
            memory: encoder output (B, C, H, W);
            sparse: with ``return_sparse`` only.
        """
        b, c, h, w = src.shape
        src = src.permute(0, 2, 3, 1)  # (B, H, W, C)
        x, y = mask_to_positions(mask)  # (B, W), (B, H)
        pos_x = self.adapt_pos1d(sine_embedding(x, c).to(src.dtype))  # (B, W, C)
        pos_y = self.adapt_pos1d(sine_embedding(y, c).to(src.dtype))  # (B, H, C)
        sparse = return_sparse and self.encoder_type == "mhsa" and getattr(self.encoder, "returns_selection", False)
        want_dam = False
        if sparse:
            memory, selection = self.encode(src, mask, pos_x, pos_y, x, y, return_selection=True)
            want_dam = getattr(self.encoder, "scorer_target", "dam") == "dam"
        else:
            memory = self.encode(src, mask, pos_x, pos_y, x, y)  # (B, H, W, C)

        tgt, reference = self.queries(b)  # (B, Q, C), (B, Q, 2)
        query_pos = self.adapt_pos2d(sine_embedding_2d(reference, c // 2).to(src.dtype))
        query_pos_x = self.adapt_pos1d(sine_embedding(reference[..., 0], c).to(src.dtype))
        query_pos_y = self.adapt_pos1d(sine_embedding(reference[..., 1], c).to(src.dtype))
        key_x = memory + pos_x[:, None, :, :]
        key_y = memory + pos_y[:, :, None, :]
        outputs, dam = [], 0
        for layer in self.decoder_layers:
            tgt = layer(tgt, memory, query_pos, query_pos_x, query_pos_y, key_x, key_y, mask, want_dam)
            if want_dam:
                tgt, layer_map = tgt
                dam = dam + layer_map
            outputs.append(tgt)
        out = torch.stack(outputs), reference, memory.permute(0, 3, 1, 2)
        if return_sparse:
            target = "dam" if want_dam else "objectness"
            return (*out, SparseOutputs(selection, dam if want_dam else None, (h, w), target) if sparse else None)
        return out


# ---------------------------------------------------------------------- meta-architecture
class AnchorDETR(ReferencePointDETR):
    """Anchor DETR detector (detectron2 meta-architecture interface).

    Reuses :class:`DETR`'s input checks, image normalisation and padding, target preparation
    and loss weighting, and :class:`ReferencePointDETR`'s sigmoid class head, box head (offsets
    from the anchors) and inference (top-k over (query, class) pairs); differs in the input
    projection (1x1 conv + GroupNorm) and the queries (anchor points x patterns, inside the
    transformer, which also computes the positions).

    Args:
        backbone: module mapping (B, 3, H, W) to a dict of feature maps containing ``in_features``.
        transformer: :class:`AnchorDETRTransformer`.
        num_classes: number of object classes K (sigmoid logits, no "no object" class).
        in_features, in_channels, embed_dim, criterion, aux_loss, pixel_mean, pixel_std, device,
            select_box_nums_for_evaluation, encoder_aux_loss: as :class:`DETR` (the criterion must
            use focal loss).
    """

    def __init__(
        self,
        backbone: nn.Module,
        transformer: AnchorDETRTransformer,
        num_classes: int = 80,
        in_features: str = "res5",
        in_channels: int = 2048,
        embed_dim: int = 256,
        criterion: Optional[nn.Module] = None,
        aux_loss: bool = True,
        pixel_mean: Optional[Sequence[float]] = None,
        pixel_std: Optional[Sequence[float]] = None,
        device: str = "cpu",
        select_box_nums_for_evaluation: int = 100,
        encoder_aux_loss: bool = False,
    ):
        super().__init__(
            backbone=backbone,
            position_embedding=None,  # positions are computed inside the transformer
            transformer=transformer,
            num_classes=num_classes,
            num_queries=transformer.num_queries,
            in_features=in_features,
            in_channels=in_channels,
            embed_dim=embed_dim,
            criterion=criterion,
            aux_loss=aux_loss,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            device=device,
            select_box_nums_for_evaluation=select_box_nums_for_evaluation,
            encoder_aux_loss=encoder_aux_loss,
        )
        if criterion is not None and not getattr(criterion, "use_focal", True):
            raise ValueError("AnchorDETR predicts sigmoid class scores: use a focal criterion")
        del self.query_embed  # the queries are anchor points x patterns, see the transformer
        self.input_proj = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, kernel_size=1),
            nn.GroupNorm(math.gcd(32, embed_dim), embed_dim),
        )
        nn.init.xavier_uniform_(self.input_proj[0].weight, gain=1)
        nn.init.zeros_(self.input_proj[0].bias)
        # Heads shared by all decoder layers.
        self.class_embed = nn.Linear(embed_dim, num_classes)
        self.bbox_embed = MLP(embed_dim, embed_dim, 4, num_layers=3)
        self.init_heads(prior_prob=0.01)
        nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)
        self.to(device)

    def run_transformer(
        self, src: torch.Tensor, mask: torch.Tensor, pos: Optional[torch.Tensor], return_sparse: Optional[bool] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """hs (L, B, Q, C) and the anchor point of every query (B, Q, 2); the transformer
        computes the positions from the mask itself (``pos`` is None); with a sparse encoder and
        ``return_sparse`` (default: in training) also its SparseOutputs (for ``loss_dam``)."""
        if self.want_sparse(return_sparse):
            hs, reference, _, sparse = self.transformer(src, mask, return_sparse=True)
            return hs, reference, sparse
        hs, reference, _ = self.transformer(src, mask)
        return hs, reference
