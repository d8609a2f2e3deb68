"""Conditional DETR (Meng et al., ICCV 2021) as a detectron2 meta-architecture, with the same
swappable encoder self-attention as :mod:`.detr` (standard multi-head attention or ENACT).

What changes with respect to DETR is the decoder and the heads; the backbone, the positional
embedding and the encoder are DETR's.  For a batch of B images, Q queries, width C, h heads::

    memory (N, B, C), pos (N, B, C)       encoder output and its sine positional embedding
    query_pos (Q, B, C)                   learnt query embedding (``query_embed``), tgt = 0
    s = sigmoid(ref_point_head(query_pos))                       (Q, B, 2) reference points
    per decoder layer l:
        T = 1 if l == 0 else query_scale(f)                      f: output of layer l - 1
        p_s = T * sinusoidal(s)                                  conditional spatial query
        self-attention:  q = Wq_c f + Wq_p query_pos,  k = Wk_c f + Wk_p query_pos,  v = Wv f
        cross-attention, per head, the content and spatial parts are concatenated:
            q = [Wq_c f (+ Wq_p query_pos, first layer only) | Wq_s p_s]          (Q, B, h, 2C/h)
            k = [Wk_c memory (+ Wk_p pos, first layer only)  | Wk_p pos]          (N, B, h, 2C/h)
            v = Wv memory                                                         (N, B, h, C/h)
        so that q.k = c_q.c_k + p_q.p_k (a dot product of dimension 2C/h per head).
    class head: Linear(C, K) (sigmoid, focal loss), bias -log((1 - 0.01) / 0.01)
    box head:   3-layer MLP, b = sigmoid(MLP(f) + [inverse_sigmoid(s), 0, 0])     cxcywh

Only the first decoder layer has the projection ``Wq_p`` of the query embedding in the
cross-attention, as in the authors' code; this gives the parameter layout (and count) of the
reference implementation.  Every decoder layer is post-norm, and a shared LayerNorm normalises
the outputs fed to the heads.

Inference keeps, per image, the ``select_box_nums_for_evaluation`` best (query, class) pairs
(scores = sigmoid probabilities), as detectron2 ``Instances``.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import attend_heads, check_attn_implementation, check_embed_heads, key_padding_bias
from .detr import MLP, ReferencePointDETR, inverse_sigmoid
from .sparse_selection import attention_map as sum_attention_weights
from .position_encoding import sine_embedding_2d
from .transformer import Transformer, decoder_outputs, feed_forward, feed_forward_modules

__all__ = [
    "inverse_sigmoid",
    "point_sine_embedding",
    "ConditionalSelfAttention",
    "ConditionalCrossAttention",
    "ConditionalDecoderLayer",
    "ConditionalTransformerDecoder",
    "ConditionalTransformer",
    "ConditionalDETR",
]


def point_sine_embedding(points: torch.Tensor, num_pos_feats: int = 128) -> torch.Tensor:
    """Reference points (..., 2) as (x, y) in [0, 1] -> (..., 2 * num_pos_feats), in the layout
    of :class:`PositionEmbeddingSine` ([e(y), e(x)], see ``sine_embedding_2d``), so the spatial
    dot products of the cross-attention compare positions directly.  Keeps the points' dtype."""
    return sine_embedding_2d(points, num_pos_feats).to(points.dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(L, B, h * d) -> (B, h, L, d)."""
    length, bsz, dim = x.shape
    return x.reshape(length, bsz, heads, dim // heads).permute(1, 2, 0, 3)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, L, d) -> (L, B, h * d)."""
    bsz, heads, length, dim = x.shape
    return x.permute(2, 0, 1, 3).reshape(length, bsz, heads * dim)


class _ConditionalAttention(nn.Module):
    """What the two conditional attentions share: the settings, the projections (the query
    projections named by the subclass, then ``key_content_proj``, ``key_pos_proj``,
    ``value_proj``, ``out_proj``) and the residual output :meth:`attend`."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attn_drop: float,
        proj_drop: float,
        attn_implementation: str,
        query_projections: Sequence[str],
    ):
        super().__init__()
        check_embed_heads(embed_dim, num_heads)
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        for name in query_projections:
            setattr(self, name, nn.Linear(embed_dim, embed_dim))
        self.key_content_proj = nn.Linear(embed_dim, embed_dim)
        self.key_pos_proj = nn.Linear(embed_dim, embed_dim)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (L, B, C); per-head q (B, h, L, E), k (B, h, S, E), v (B, h, S, C/h);
        key_padding_mask (B, S).  Returns ``x + proj_drop(Wo concat_h attention)`` (L, B, C)."""
        mask = None if key_padding_mask is None else key_padding_bias(key_padding_mask, q.dtype)
        out = attend_heads(
            q, k, v, mask, self.attn_drop if self.training else 0.0, self.attn_implementation
        )  # (B, h, L, C/h)
        return x + self.proj_drop(self.out_proj(_merge_heads(out)))


class ConditionalSelfAttention(_ConditionalAttention):
    """Decoder self-attention with separate content and positional projections:

        q = Wq_c x + Wq_p pos,  k = Wk_c x + Wk_p pos,  v = Wv x
        out = x + proj_drop(Wo MHA(q, k, v))

    Inputs are sequence-first: x, pos (Q, B, C).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_implementation: str = "sdpa",
    ):
        super().__init__(
            embed_dim,
            num_heads,
            attn_drop,
            proj_drop,
            attn_implementation,
            query_projections=("query_content_proj", "query_pos_proj"),
        )

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x, pos (Q, B, C) -> (Q, B, C), residual included."""
        q = self.query_content_proj(x) + self.query_pos_proj(pos)
        k = self.key_content_proj(x) + self.key_pos_proj(pos)
        v = self.value_proj(x)
        h = self.num_heads
        return self.attend(x, _split_heads(q, h), _split_heads(k, h), _split_heads(v, h))


class ConditionalCrossAttention(_ConditionalAttention):
    """Conditional cross-attention: per head, the query is [content | spatial] and so is the key,

        q_h = [(Wq_c x + Wq_p query_pos)_h | (Wq_s p_s)_h]     (Wq_p only with ``use_query_pos``)
        k_h = [(Wk_c m + Wk_p pos)_h       | (Wk_p pos)_h]     (Wk_p pos added only with it too)
        v_h = (Wv m)_h

    so the attention logits are (c_q.c_k + p_q.p_k) / sqrt(2 C / h) and the output is
    ``x + proj_drop(Wo concat_h softmax(.) v_h)``.

    Args:
        use_query_pos: build ``query_pos_proj`` and add the positional terms to the content
            parts (the first decoder layer of Conditional DETR); later layers leave it out.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        use_query_pos: bool = False,
        attn_implementation: str = "sdpa",
    ):
        query_pos = ("query_pos_proj",) if use_query_pos else ()  # Wq_p: first layer only
        super().__init__(
            embed_dim,
            num_heads,
            attn_drop,
            proj_drop,
            attn_implementation,
            query_projections=("query_content_proj", *query_pos, "query_pos_sine_proj"),
        )
        self.use_query_pos = use_query_pos
        if not use_query_pos:
            self.query_pos_proj = None

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        query_sine_embed: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        attention_map: bool = False,
    ):
        """x, query_pos, query_sine_embed (Q, B, C); memory, pos (N, B, C);
        key_padding_mask (B, N) bool, True = padding.  Returns (Q, B, C), residual included; with
        ``attention_map`` also the attention weights summed over queries and heads (B, N),
        recomputed without gradient (Sparse DETR's DAM)."""
        q_content = self.query_content_proj(x)  # (Q, B, C)
        k_content = self.key_content_proj(memory)  # (N, B, C)
        k_pos = self.key_pos_proj(pos)  # (N, B, C)
        v = self.value_proj(memory)  # (N, B, C)
        if self.use_query_pos:
            q_content = q_content + self.query_pos_proj(query_pos)
            k_content = k_content + k_pos
        q_spatial = self.query_pos_sine_proj(query_sine_embed)  # (Q, B, C)
        h = self.num_heads
        q = torch.cat((_split_heads(q_content, h), _split_heads(q_spatial, h)), dim=-1)
        k = torch.cat((_split_heads(k_content, h), _split_heads(k_pos, h)), dim=-1)
        # q (B, h, Q, 2C/h), k (B, h, N, 2C/h), v (B, h, N, C/h)
        out = self.attend(x, q, k, _split_heads(v, h), key_padding_mask)
        return (out, sum_attention_weights(q, k, key_padding_mask)) if attention_map else out


class ConditionalDecoderLayer(nn.Module):
    """Post-norm Conditional DETR decoder layer: conditional self-attention, conditional
    cross-attention, FFN, each followed by a LayerNorm.

    Args:
        is_first: first layer of the decoder (positional query projection in the
            cross-attention, see :class:`ConditionalCrossAttention`).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        is_first: bool = False,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        self.is_first = is_first
        self.self_attn = ConditionalSelfAttention(
            embed_dim, num_heads, attn_drop=dropout, proj_drop=dropout, attn_implementation=attn_implementation
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = ConditionalCrossAttention(
            embed_dim,
            num_heads,
            attn_drop=dropout,
            proj_drop=dropout,
            use_query_pos=is_first,
            attn_implementation=attn_implementation,
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
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        query_sine_embed: torch.Tensor,
        memory_key_padding_mask: Optional[torch.Tensor] = None,
        attention_map: bool = False,
    ):
        """tgt, query_pos, query_sine_embed (Q, B, C); memory, pos (N, B, C).  -> (Q, B, C), and
        with ``attention_map`` the cross-attention's summed weights (B, N)."""
        tgt = self.norm1(self.self_attn(tgt, query_pos))
        out = self.cross_attn(
            tgt, memory, pos, query_pos, query_sine_embed, memory_key_padding_mask, attention_map
        )
        out, dam = out if attention_map else (out, None)
        tgt = self.norm2(out)
        tgt = self.norm3(tgt + self.dropout3(feed_forward(self, tgt)))
        return (tgt, dam) if attention_map else tgt


class ConditionalTransformerDecoder(nn.Module):
    """Conditional DETR decoder: reference points from the query embedding, conditional spatial
    queries ``query_scale(f) * sine(s)`` (no scaling in the first layer), a shared final norm.

    ``forward`` returns the normalised output of every layer (L, Q, B, C) — or only of the last
    one (1, Q, B, C) without ``return_intermediate`` — and the reference points (Q, B, 2).
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
        if embed_dim % 4 != 0:
            raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(
                embed_dim, num_heads, ffn_dim, dropout, activation, i == 0, attn_implementation
            )
            for i in range(num_layers)
        )
        self.query_scale = MLP(embed_dim, embed_dim, embed_dim, num_layers=2)
        self.ref_point_head = MLP(embed_dim, embed_dim, 2, num_layers=2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_key_padding_mask: Optional[torch.Tensor] = None,
        return_attention_map: bool = False,
    ):
        """tgt, query_pos (Q, B, C); memory, pos (N, B, C); memory_key_padding_mask (B, N).

        Returns hs (L, Q, B, C) and the reference points (Q, B, 2), sigmoid (x, y); with
        ``return_attention_map`` also the DAM (B, N): the cross-attention weights summed over
        queries, heads and layers, without gradient."""
        reference = self.ref_point_head(query_pos).sigmoid()  # (Q, B, 2)
        sine = point_sine_embedding(reference, self.embed_dim // 2)  # (Q, B, C)
        states, dam = [], 0
        for idx, layer in enumerate(self.layers):
            query_sine_embed = sine if idx == 0 else sine * self.query_scale(tgt)
            tgt = layer(tgt, memory, pos, query_pos, query_sine_embed, memory_key_padding_mask, return_attention_map)
            if return_attention_map:
                tgt, layer_map = tgt
                dam = dam + layer_map
            states.append(tgt)
        hs = decoder_outputs(states, self.norm, self.return_intermediate)
        return (hs, reference, dam) if return_attention_map else (hs, reference)


class ConditionalTransformer(Transformer):
    """DETR's encoder (swappable attention) with a :class:`ConditionalTransformerDecoder`.

    Same construction (and Xavier-uniform re-initialisation of every weight matrix) as
    :class:`.transformer.Transformer`; ``forward`` also returns the reference points.
    """

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
            src: projected features (B, C, H, W); mask: padding mask (B, H, W), True = padding;
            query_embed: learnt query embedding (Q, C); pos_embed: (B, C, H, W);
            return_sparse: see :meth:`.transformer.Transformer.forward`.

        Returns:
            hs (L, B, Q, C), reference points (B, Q, 2) in [0, 1], memory (B, C, H, W), and with
            ``return_sparse`` the sparse encoder's SparseOutputs (or None).
        """
        (hs, reference), memory, sparse = self.encode_decode(src, mask, query_embed, pos_embed, return_sparse)
        # hs (L, Q, B, C), reference (Q, B, 2)
        out = hs.transpose(1, 2), reference.transpose(0, 1), memory
        return (*out, sparse) if return_sparse else out


class ConditionalDETR(ReferencePointDETR):
    """Conditional DETR detector (detectron2 meta-architecture interface).

    Arguments as :class:`.detr.DETR` (whose input checks, preprocessing, padding masks, target
    preparation and loss weighting are reused); ``transformer`` must return
    ``(hs, reference, memory)`` like :class:`ConditionalTransformer` and ``criterion`` use the
    focal (sigmoid) classification loss.  The class head has ``num_classes`` logits (no
    "no object" logit), initialised to the prior probability ``prior_prob``; the last layer of
    the box head starts at zero, i.e. every query first predicts a box of half the image size
    centred on its reference point.  Boxes and inference: see
    :class:`.detr.ReferencePointDETR`.
    """

    def __init__(self, *args, prior_prob: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.class_embed = nn.Linear(self.embed_dim, self.num_classes)
        self.init_heads(prior_prob)
        self.to(self.device)

    def run_transformer(
        self, src: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, return_sparse: Optional[bool] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """hs (L, B, Q, C) and the reference points (B, Q, 2) of the learnt queries; with a sparse
        encoder and ``return_sparse`` (default: in training) also its SparseOutputs (for ``loss_dam``)."""
        if self.want_sparse(return_sparse):
            hs, reference, _, sparse = self.transformer(src, mask, self.query_embed.weight, pos, return_sparse=True)
            return hs, reference, sparse
        hs, reference, _ = self.transformer(src, mask, self.query_embed.weight, pos)
        return hs, reference
