"""DETR's post-norm encoder-decoder transformer with a swappable encoder self-attention.

Tensors are sequence-first, as in DETR: the flattened feature map is (N, B, C) with N = H * W,
the object queries are (Q, B, C).  Every layer is post-norm ("Add & Norm" after each block).

The encoder self-attention is the single point where ENACT replaces standard multi-head
attention: :class:`TransformerEncoder` takes an attention *prototype* module and deep-copies it
into each layer.  Any module with the call signature of
:class:`projects.enact.modeling.attention.MultiheadAttention` fits::

    out = attention(query=src, key=src, value=src, query_pos=pos, key_pos=pos,
                    key_padding_mask=mask)          # (N, B, C)

and its output must already contain the residual, i.e. ``identity + dropout(attn(...))``;
the layer then only applies the LayerNorm.  The decoder always uses standard multi-head
attention (self-attention over the queries, cross-attention to the encoder memory).

:class:`Transformer` re-initialises every weight matrix (parameters with more than one
dimension) with Xavier-uniform, as DETR does; this also gives every encoder layer its own
random attention weights although they start as copies of one prototype.
"""

import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiheadAttention, check_attn_implementation
from .sparse_selection import SparseOutputs, mha_attention_map

__all__ = [
    "decoder_outputs",
    "feed_forward",
    "feed_forward_modules",
    "check_attention_width",
    "TransformerEncoderLayer",
    "EncoderStack",
    "TransformerEncoder",
    "TransformerDecoderLayer",
    "TransformerDecoder",
    "Transformer",
]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


def feed_forward_modules(embed_dim: int, ffn_dim: int, dropout: float, activation: str):
    """The parts of a post-norm feed-forward block, in the order (and under the names) every
    layer registers them: ``linear1`` (C -> F), ``linear2`` (F -> C), ``dropout`` (hidden), the
    dropout after ``linear2`` and the LayerNorm after the residual (``dropout2``/``norm2`` in an
    encoder layer, ``dropout3``/``norm3`` in a decoder layer), and the activation function::

        self.linear1, self.linear2, self.dropout, self.dropout2, self.norm2, self.activation = (
            feed_forward_modules(embed_dim, ffn_dim, dropout, activation)
        )
    """
    return (
        nn.Linear(embed_dim, ffn_dim),
        nn.Linear(ffn_dim, embed_dim),
        nn.Dropout(dropout),
        nn.Dropout(dropout),
        nn.LayerNorm(embed_dim),
        _activation(activation),
    )


def check_attention_width(attention: nn.Module, embed_dim: int) -> None:
    """An encoder layer's attention (if it says its width) must be as wide as the layer."""
    attn_dim = getattr(attention, "embed_dim", embed_dim)
    if attn_dim != embed_dim:
        raise ValueError(f"attention embed_dim ({attn_dim}) differs from embed_dim ({embed_dim})")


def feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The FFN branch of a layer with ``linear1``/``linear2``/``dropout``/``activation``."""
    return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))


def decoder_outputs(states, norm: nn.Module, return_intermediate: bool) -> torch.Tensor:
    """The decoders' result from every layer's output ``states`` (each (Q, B, C)): the shared
    final ``norm`` of each of them (L, Q, B, C), or of the last one only (1, Q, B, C)."""
    return torch.stack([norm(s) for s in (states if return_intermediate else states[-1:])])


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: ``norm1(attention(src, pos, mask))`` then the FFN block.

    Args:
        attention: the self-attention module (used as is, not copied); its output includes the
            residual, see the module docstring.
        embed_dim: model width C.
        ffn_dim: hidden width of the feed-forward block.
        dropout: dropout of the feed-forward block (the attention carries its own).
        activation: "relu" (DETR) or "gelu".
    """

    def __init__(
        self,
        attention: nn.Module,
        embed_dim: int = 256,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
    ):
        super().__init__()
        check_attention_width(attention, embed_dim)
        if getattr(attention, "batch_first", False):
            raise ValueError("the encoder attention must be sequence-first (batch_first=False)")
        self.self_attn = attention
        self.norm1 = nn.LayerNorm(embed_dim)
        # Feed-forward block (post-norm): norm2(x + dropout2(linear2(dropout(act(linear1(x)))))).
        self.linear1, self.linear2, self.dropout, self.dropout2, self.norm2, self.activation = (
            feed_forward_modules(embed_dim, ffn_dim, dropout, activation)
        )

    def forward(
        self,
        src: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        query: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """src, pos (N, B, C); mask (B, N) bool, True = padding.  Returns (N, B, C).
        ``query`` (K, B, C) with ``query_pos``: only those tokens are updated (a sparse encoder's
        selected ones; keys and values stay all of src), and (K, B, C) is returned."""
        if query is None:
            query, query_pos = src, pos
        x = self.self_attn(
            query=query, key=src, value=src, query_pos=query_pos, key_pos=pos, key_padding_mask=mask
        )  # (K, B, C), residual included
        x = self.norm1(x)
        return self.norm2(x + self.dropout2(feed_forward(self, x)))


class EncoderStack(nn.Module):
    """Base of the encoders: ``num_layers`` layers of class ``layer_class``, each built as
    ``layer_class(attention, embed_dim, ffn_dim, dropout, activation)`` around its own deep copy
    of one prototype attention (``default_attention(embed_dim, num_heads, dropout)`` when the
    prototype is ``None``).  A copy with a ``set_layer_index`` method (``ActAttention``) is told
    its layer index, so that copies of one prototype can differ (ACT's hash projections).
    Subclasses give the defaults and ``forward``."""

    layer_class: type

    def __init__(
        self,
        attention: Optional[nn.Module],
        num_layers: int,
        embed_dim: int,
        ffn_dim: int,
        dropout: float,
        activation: str,
        num_heads: int,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if attention is None:
            attention = self.default_attention(embed_dim, num_heads, dropout)
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            self.layer_class(copy.deepcopy(attention), embed_dim, ffn_dim, dropout, activation)
            for _ in range(num_layers)
        )
        for index, layer in enumerate(self.layers):  # e.g. ActAttention: per-layer hash projections
            set_layer_index = getattr(getattr(layer, "self_attn", None), "set_layer_index", None)
            if callable(set_layer_index):
                set_layer_index(index)

    @staticmethod
    def default_attention(embed_dim: int, num_heads: int, dropout: float) -> nn.Module:
        raise NotImplementedError


class TransformerEncoder(EncoderStack):
    """A stack of ``num_layers`` post-norm encoder layers (no final norm, as post-norm DETR).

    Args:
        attention: prototype self-attention, deep-copied into every layer; ``None`` builds the
            standard ``MultiheadAttention(embed_dim, num_heads, attn_drop=dropout,
            proj_drop=dropout)``.
        num_layers, embed_dim, ffn_dim, dropout, activation: see
            :class:`TransformerEncoderLayer`.
        num_heads: heads of the default attention (ignored when ``attention`` is given).
    """

    layer_class = TransformerEncoderLayer

    def __init__(
        self,
        attention: Optional[nn.Module] = None,
        num_layers: int = 6,
        embed_dim: int = 256,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        num_heads: int = 8,
    ):
        super().__init__(attention, num_layers, embed_dim, ffn_dim, dropout, activation, num_heads)

    @staticmethod
    def default_attention(embed_dim: int, num_heads: int, dropout: float) -> nn.Module:
        return MultiheadAttention(embed_dim, num_heads, attn_drop=dropout, proj_drop=dropout)

    def forward(
        self,
        src: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """src, pos (N, B, C); mask (B, N) bool, True = padding.  Returns the memory (N, B, C)."""
        for layer in self.layers:
            src = layer(src, pos=pos, mask=mask)
        return src


class TransformerDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: query self-attention, cross-attention to the memory, FFN.

    Args:
        embed_dim, num_heads, ffn_dim, dropout, activation: the usual.
        attn_implementation: of the two ``MultiheadAttention`` modules ("sdpa" or "eager").
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(
            embed_dim, num_heads, attn_drop=dropout, proj_drop=dropout, attn_implementation=attn_implementation
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiheadAttention(
            embed_dim, num_heads, attn_drop=dropout, proj_drop=dropout, attn_implementation=attn_implementation
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        # Feed-forward block (post-norm): norm3(x + dropout3(linear2(dropout(act(linear1(x)))))).
        self.linear1, self.linear2, self.dropout, self.dropout3, self.norm3, self.activation = (
            feed_forward_modules(embed_dim, ffn_dim, dropout, activation)
        )

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
        memory_key_padding_mask: Optional[torch.Tensor] = None,
        attention_map: bool = False,
    ):
        """tgt, query_pos (Q, B, C); memory, pos (N, B, C); memory_key_padding_mask (B, N).

        Returns (Q, B, C); with ``attention_map`` also the cross-attention weights summed over
        queries and heads (B, N), without gradient (Sparse DETR's DAM, see
        :mod:`.sparse_selection`)."""
        # Self-attention: queries and keys carry the query embedding, values do not.
        tgt = self.norm1(
            self.self_attn(query=tgt, key=tgt, value=tgt, query_pos=query_pos, key_pos=query_pos)
        )
        dam = None
        if attention_map:
            q_in = tgt if query_pos is None else tgt + query_pos
            k_in = memory if pos is None else memory + pos
            dam = mha_attention_map(self.cross_attn, q_in, k_in, memory_key_padding_mask)
        # Cross-attention: keys are memory + spatial position, values the bare memory.
        tgt = self.norm2(
            self.cross_attn(
                query=tgt,
                key=memory,
                value=memory,
                query_pos=query_pos,
                key_pos=pos,
                key_padding_mask=memory_key_padding_mask,
            )
        )
        tgt = self.norm3(tgt + self.dropout3(feed_forward(self, tgt)))
        return (tgt, dam) if attention_map else tgt


class TransformerDecoder(nn.Module):
    """A stack of post-norm decoder layers followed by a shared final LayerNorm.

    With ``return_intermediate`` the normalised output of every layer is returned (for the
    auxiliary losses), otherwise only the last one; the result is always
    (num_layers or 1, Q, B, C).
    """

    def __init__(
        self,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        attn_implementation: str = "sdpa",
        return_intermediate: bool = True,
        attention: Optional[str] = None,
    ):
        super().__init__()
        attn_implementation = check_attn_implementation(attn_implementation, attention, type(self).__name__)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(embed_dim, num_heads, ffn_dim, dropout, activation, attn_implementation)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
        memory_key_padding_mask: Optional[torch.Tensor] = None,
        return_attention_map: bool = False,
    ):
        """tgt, query_pos (Q, B, C); memory, pos (N, B, C).  Returns (L, Q, B, C); with
        ``return_attention_map`` also the DAM (B, N): the cross-attention weights summed over
        queries, heads and layers, without gradient."""
        states, dam = [], 0
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, memory_key_padding_mask, return_attention_map)
            if return_attention_map:
                tgt, layer_map = tgt
                dam = dam + layer_map
            states.append(tgt)
        hs = decoder_outputs(states, self.norm, self.return_intermediate)  # (L, Q, B, C)
        return (hs, dam) if return_attention_map else hs


class Transformer(nn.Module):
    """DETR's encoder-decoder.

    Args:
        encoder: a :class:`TransformerEncoder` (this is where the encoder attention is chosen).
        decoder: a :class:`TransformerDecoder`.
        reset_parameters: Xavier-uniform initialisation of every weight matrix, as DETR.
    """

    def __init__(
        self,
        encoder: TransformerEncoder,
        decoder: TransformerDecoder,
        reset_parameters: bool = True,
    ):
        super().__init__()
        if encoder.embed_dim != decoder.embed_dim:
            raise ValueError(
                f"encoder ({encoder.embed_dim}) and decoder ({decoder.embed_dim}) widths differ"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.embed_dim = encoder.embed_dim
        if reset_parameters:
            self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode_decode(
        self,
        src: torch.Tensor,
        mask: torch.Tensor,
        query_embed: torch.Tensor,
        pos_embed: torch.Tensor,
        return_sparse: bool = False,
    ):
        """Flattens the map, runs the encoder and the decoder (from zero targets).

        Args: as :meth:`forward`.
        Returns: the decoder's result as it returns it (hs (L, Q, B, C), or a tuple starting
        with hs for a decoder that returns more), the memory (B, C, H, W) and, with
        ``return_sparse`` and a sparse encoder (``encoder.returns_selection``), a
        :class:`~.sparse_selection.SparseOutputs` (the encoder's selection and the decoder's
        cross-attention map), else None.
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # (HW, B, C)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1).to(src.dtype)  # (HW, B, C)
        mask = mask.flatten(1)  # (B, HW)
        query_embed = query_embed.unsqueeze(1).expand(-1, bs, -1)  # (Q, B, C)
        tgt = torch.zeros_like(query_embed)  # (Q, B, C)

        sparse = return_sparse and getattr(self.encoder, "returns_selection", False)
        if sparse:  # Sparse DETR: the selection and the DAM for the scorer's loss
            memory, selection = self.encoder(src, pos=pos_embed, mask=mask, return_selection=True)
            target = getattr(self.encoder, "scorer_target", "dam")
            decoded = self.decoder(
                tgt, memory, pos=pos_embed, query_pos=query_embed, memory_key_padding_mask=mask,
                return_attention_map=target == "dam",
            )
            dam = None
            if target == "dam":
                *decoded, dam = decoded
                decoded = decoded[0] if len(decoded) == 1 else tuple(decoded)
            sparse = SparseOutputs(selection, dam, (h, w), target)
        else:
            memory = self.encoder(src, pos=pos_embed, mask=mask)  # (HW, B, C)
            decoded = self.decoder(
                tgt, memory, pos=pos_embed, query_pos=query_embed, memory_key_padding_mask=mask
            )  # hs (L, Q, B, C) or (hs, ...)
            sparse = None
        return decoded, memory.permute(1, 2, 0).reshape(bs, c, h, w), sparse

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor,
        query_embed: torch.Tensor,
        pos_embed: torch.Tensor,
        return_sparse: bool = False,
    ):
        """
        Args:
            src: projected features (B, C, H, W).
            mask: padding mask (B, H, W), True = padding.
            query_embed: learnt object queries (Q, C).
            pos_embed: positional embedding (B, C, H, W).
            return_sparse: also return the sparse encoder's :class:`SparseOutputs` (None for a
                dense encoder).

        Returns:
            hs: decoder outputs (L, B, Q, C), L = decoder layers (or 1).
            memory: encoder output (B, C, H, W).
            sparse: with ``return_sparse`` only.
        """
        hs, memory, sparse = self.encode_decode(src, mask, query_embed, pos_embed, return_sparse)  # (L, Q, B, C)
        return (hs.transpose(1, 2), memory, sparse) if return_sparse else (hs.transpose(1, 2), memory)
