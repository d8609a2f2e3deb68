"""ENACT into a built detector's encoder: :func:`enact_encoder`.

What each kind of encoder self-attention becomes (found and replaced by
:func:`~.encoder_sites.replace_encoder_attention`, the trained weights kept):

* detrex's ``MultiheadAttention`` -> ``EnactAttention`` (:func:`enact_attention_factory`);
* torch's ``nn.MultiheadAttention`` (detrex Anchor DETR's dense encoder) -> ``EnactAttention``
  behind :class:`~.torch_mha_adapter.TorchMultiheadAttentionAdapter`;
* detrex's ``MultiheadRCDA`` (Anchor DETR's default encoder) -> :class:`EnactPackedRCDA`,
  separable ENACT (:mod:`.separable_enact`) with detrex's parameters (:func:`enact_rcda_factory`).

Only ``w_prob`` is new in each.  PnP-DETR's transformer also hands its encoder the sampled tokens
in raster order (:mod:`.pnp`).  detrex's config classes (``projects.enact.detrex_support``) use
:func:`replace_with_enact` and :func:`check_enact_options` too.
"""
import functools
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

import enact_ops

from .attention import check_attn_implementation
from .enact import CLUSTERING_MODES, EnactAttention, check_sigma
from .encoder_sites import AttentionSpec, check_encoder_options, find_encoder, replace_encoder_attention
from .pnp import is_token_sampler_transformer, use_raster_order
from .separable_enact import RCDAProjections, SeparableEnact

__all__ = [
    "ENACT_ENCODER_OPTIONS",
    "EnactPackedRCDA",
    "check_enact_options",
    "enact_attention_factory",
    "enact_encoder",
    "enact_rcda_factory",
    "replace_with_enact",
]

ENACT_ENCODER_OPTIONS = ("sigma", "mode", "backend", "attn_implementation")


class EnactPackedRCDA(SeparableEnact, nn.Module):
    """Separable ENACT (:mod:`.separable_enact`) with the parameters and call signature of detrex's
    ``MultiheadRCDA`` (Anchor DETR): ``in_proj_weight`` (5C, C) packing q_row, q_col, k_row, k_col,
    v; ``in_proj_bias``; ``out_proj``; plus ``cluster_x`` / ``cluster_y`` (``w_prob`` each).

    ``forward(query_row, query_col, key_row, key_col, value, key_padding_mask=None, ...)`` with
    query_* (B, L, C), key_* and value (B, H, W, C), key_padding_mask (B, H, W) True = pad, returns
    ``(out (L, B, C), None)`` as detrex's does.  Keys are averaged over all pixels as detrex does
    (``key_row`` over H: column keys, ``key_col`` over W: row keys), then clustered per axis.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 sigma: int = 3, mode: str = "segments", backend: str = "auto"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(5 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.configure_clustering(sigma, mode, backend)

    @classmethod
    def from_module(cls, rcda: nn.Module, sigma: int = 3, mode: str = "segments", backend: str = "auto"):
        """The replacement of a detrex ``MultiheadRCDA``: its sizes, dropout, bias, device and dtype
        (its options checked; ``replace_encoder_attention`` then copies the weights)."""
        if getattr(rcda, "in_proj_weight", None) is None or getattr(rcda, "bias_k_row", None) is not None \
                or getattr(rcda, "add_zero_attn", False):
            raise ValueError(f"{type(rcda).__name__}: only packed projections without bias_k / add_zero_attn are supported")
        new = cls(rcda.embed_dim, rcda.num_heads, rcda.dropout, rcda.in_proj_bias is not None, sigma, mode, backend)
        return new.to(rcda.in_proj_weight.device, rcda.in_proj_weight.dtype)

    def projections(self) -> RCDAProjections:
        """The five slices of the packed input projection and ``out_proj``."""
        weights = self.in_proj_weight.chunk(5)
        biases = self.in_proj_bias.chunk(5) if self.in_proj_bias is not None else (None,) * 5
        q_x, q_y, k_x, k_y, v = (functools.partial(F.linear, weight=w, bias=b) for w, b in zip(weights, biases))
        return RCDAProjections(q_x, q_y, k_x, k_y, v, self.out_proj, self.num_heads)

    def forward(self, query_row, query_col, key_row, key_col, value, key_padding_mask=None, **kwargs):
        pad_x = pad_y = None
        if key_padding_mask is not None:  # rectangular pads: first row / column give them
            pad_x, pad_y = key_padding_mask[:, 0, :], key_padding_mask[:, :, 0]
        out = self.attend_clustered(  # pooling then projecting = projecting then pooling (affine)
            self.projections(), query_row, query_col, key_row.mean(1), key_col.mean(2), value, pad_x, pad_y,
            key_padding_mask=key_padding_mask, dropout=self.dropout if self.training else 0.0,
        )  # (B, L, C)
        return out.transpose(0, 1), None


def check_enact_options(entry: str, sigma, mode, backend, attn_implementation) -> None:
    """ENACT's arguments checked before anything is replaced: a ``ValueError`` naming ``entry``, the
    argument and what it accepts."""
    try:
        check_sigma(sigma)
        if mode not in CLUSTERING_MODES:
            raise ValueError(f"mode must be one of {CLUSTERING_MODES}, got {mode!r}")
        if backend not in enact_ops.BACKENDS:
            raise ValueError(f"backend must be one of {enact_ops.BACKENDS}, got {backend!r}")
        check_attn_implementation(attn_implementation)
    except ValueError as e:
        raise ValueError(f"{entry}: {e}") from None


def enact_attention_factory(sigma: int = 5, mode: str = "segments", backend: str = "auto", **options) -> Callable:
    """The factory ``replace_encoder_attention`` calls for ENACT: spec -> EnactAttention."""

    def factory(spec: AttentionSpec) -> nn.Module:
        kwargs = dict(attn_implementation=spec.attn_implementation)
        kwargs.update(options)
        return EnactAttention(spec.embed_dim, spec.num_heads, spec.attn_drop, spec.proj_drop, spec.batch_first,
                              sigma=sigma, mode=mode, backend=backend, **kwargs)

    return factory


def enact_rcda_factory(sigma: int = 3, mode: str = "segments", backend: str = "auto") -> Callable:
    """The ``rcda_factory`` ``replace_encoder_attention`` calls for ENACT: detrex's
    ``MultiheadRCDA`` -> :class:`EnactPackedRCDA`."""
    return functools.partial(EnactPackedRCDA.from_module, sigma=sigma, mode=mode, backend=backend)


def replace_with_enact(encoder: nn.Module, sigma: int, mode: str, backend: str, owner: str, **options) -> List[str]:
    """ENACT in every self-attention of ``encoder`` (any of the three kinds; arguments checked by
    the caller); returns the replaced modules' names."""
    return replace_encoder_attention(encoder, enact_attention_factory(sigma, mode, backend, **options),
                                     enact_rcda_factory(sigma, mode, backend), owner=owner)


def enact_encoder(model: nn.Module, sigma: int = 5, mode: str = "segments", **options) -> nn.Module:
    """Turn the encoder self-attentions of a built detrex-style detector into ENACT, in place,
    keeping the trained projection weights (only ``w_prob`` is new); the decoder is untouched.

    detrex ``MultiheadAttention`` -> ``EnactAttention``; ``nn.MultiheadAttention`` (Anchor DETR
    MHSA) -> ``EnactAttention`` behind ``TorchMultiheadAttentionAdapter``; ``MultiheadRCDA``
    -> :class:`EnactPackedRCDA` (separable ENACT).  ``options``: ``backend``,
    ``attn_implementation``.  ``mode="identity"`` gives a model equal to the original.
    PnP-DETR (a transformer whose ``sampler`` pools background tokens): its encoder then gets the
    sampled tokens in raster order and keeps the pooled ones unclustered (:mod:`.pnp`).
    Returns ``model``.  Raises ``TypeError`` for an unknown option and ``ValueError`` for a bad
    value, a model without a dense self-attention encoder (e.g. deformable attention, naming its
    class) or one already converted; every message starts with ``enact_encoder``.
    """
    check_encoder_options("enact_encoder", options, ENACT_ENCODER_OPTIONS[2:])
    backend = options.pop("backend", "auto")
    check_enact_options("enact_encoder", sigma, mode, backend, options.get("attn_implementation", "sdpa"))
    owner = f"enact_encoder({type(getattr(model, 'module', model)).__name__})"
    replace_with_enact(find_encoder(model, "enact_encoder"), sigma, mode, backend, owner, **options)
    transformer = getattr(getattr(model, "module", model), "transformer", None)
    if transformer is not None and is_token_sampler_transformer(transformer):
        use_raster_order(transformer)  # PnP-DETR: sampled tokens in raster order (see .pnp)
    return model
