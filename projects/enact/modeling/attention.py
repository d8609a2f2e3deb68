"""Standard multi-head attention with detrex's call signature (the baseline encoder attention).

    out = identity + Dropout(W_o concat_h softmax(Q_h K_h^T / sqrt(d_head)) V_h)

Parameters live in an ``nn.MultiheadAttention`` called ``attn`` (``attn.in_proj_weight``,
``attn.in_proj_bias``, ``attn.out_proj``) exactly as in detrex's ``MultiheadAttention``, so
checkpoints move between the two, and between this module and ``EnactAttention``.
Two interchangeable implementations (``attn_implementation``) compute the same function:
``"sdpa"`` (``F.scaled_dot_product_attention``) and ``"eager"`` (materialises the (B, h, L, S)
softmax, as the original DETR code does), so benchmarks can compare like with like.
"""
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

__all__ = [
    "ATTENTION_BACKENDS",
    "MultiheadAttention",
    "attend_heads",
    "check_attn_implementation",
    "check_embed_heads",
    "key_padding_bias",
    "multi_head_attention",
]

ATTENTION_BACKENDS = ("sdpa", "eager")  # the values of ``attn_implementation``


def check_embed_heads(embed_dim: int, num_heads: int) -> None:
    """embed_dim must be a positive multiple of num_heads."""
    if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
        raise ValueError(
            f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
        )


def check_attn_implementation(attn_implementation: str, legacy: Optional[str] = None, owner: str = "") -> str:
    """The attention implementation, "sdpa" or "eager".  ``legacy`` is the value of the former
    keyword ``attention=`` (deprecated: that name now means the encoder's attention module)."""
    if legacy is not None:
        warnings.warn(
            f"{owner}(attention=...) is deprecated; use attn_implementation={legacy!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        attn_implementation = legacy
    if attn_implementation not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_BACKENDS}, got {attn_implementation!r}")
    return attn_implementation


def key_padding_bias(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) bool, True = ignore -> additive (B, 1, 1, S) mask: -inf where ignored, else 0."""
    bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn: nn.MultiheadAttention,
    key_padding_mask: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    attn_implementation: str = "sdpa",
) -> torch.Tensor:
    """Batch-first multi-head attention with the projections of ``attn``.

    query (B, L, C), key (B, S, C), value (B, S, C); key_padding_mask (B, S) bool, True = ignore;
    attn_mask (L, S) or (B * h, L, S): bool (True = ignore) or float (added to the logits).
    Returns (B, L, C).
    """
    bsz, tgt_len, embed_dim = query.shape
    src_len = key.shape[1]
    heads = attn.num_heads
    head_dim = embed_dim // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    q = F.linear(query, w_q, b_q).view(bsz, tgt_len, heads, head_dim).transpose(1, 2)  # (B, h, L, d)
    k = F.linear(key, w_k, b_k).view(bsz, src_len, heads, head_dim).transpose(1, 2)  # (B, h, S, d)
    v = F.linear(value, w_v, b_v).view(bsz, src_len, heads, head_dim).transpose(1, 2)  # (B, h, S, d)

    # One additive float mask (B or 1, h or 1, L or 1, S): -inf where a key must be ignored.
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float("-inf"))
        mask = m.view(bsz, heads, tgt_len, src_len) if m.dim() == 3 else m.view(1, 1, tgt_len, src_len)
        mask = mask.to(q.dtype)
    if key_padding_mask is not None:
        pad = key_padding_bias(key_padding_mask, q.dtype)  # (B, 1, 1, S)
        mask = pad if mask is None else mask + pad

    with record_function("mhsa::attend_heads"):  # a range in torch.profiler's output
        out = attend_heads(q, k, v, mask, dropout_p, attn_implementation)
    out = out.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)  # (B, L, C)
    return attn.out_proj(out)


def attend_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    dropout_p: float,
    attn_implementation: str,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v per head: q (B, h, L, d), k and v (B, h, S, d), mask
    additive (broadcast to (B, h, L, S)) or None; the value dimension of v may differ from d.
    "sdpa": F.scaled_dot_product_attention; "eager": the softmax materialised (as
    nn.MultiheadAttention).  Returns (B, h, L, d_v)."""
    if attn_implementation == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if attn_implementation == "eager":
        logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, h, L, S)
        if mask is not None:
            logits = logits + mask
        weights = torch.softmax(logits, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.matmul(weights, v)
    raise ValueError(f"attn_implementation must be one of {ATTENTION_BACKENDS}, got {attn_implementation!r}")


class MultiheadAttention(nn.Module):
    """detrex-compatible multi-head attention: ``identity + proj_drop(MHA(q + query_pos,
    k + key_pos, v))``.  Inputs are (L, B, C) unless ``batch_first``.  ``attn_implementation``:
    "sdpa" or "eager" (the former keyword ``attention=`` still works, with a DeprecationWarning)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        batch_first: bool = False,
        attn_implementation: str = "sdpa",
        **kwargs,
    ):
        super().__init__()
        check_embed_heads(embed_dim, num_heads)
        self.attn_implementation = check_attn_implementation(
            attn_implementation, kwargs.pop("attention", None), type(self).__name__
        )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=attn_drop, batch_first=True, **kwargs)
        self.proj_drop = nn.Dropout(proj_drop)

    def _prepare(self, query, key, value, identity, query_pos, key_pos):
        """Fill defaults as detrex does; return batch-first (q + pos, k + pos, v, identity)."""
        if key is None:
            key = query
        if value is None:
            value = key
        if identity is None:
            identity = query
        if key_pos is None and query_pos is not None:
            if query_pos.shape == key.shape:
                key_pos = query_pos
            else:
                warnings.warn(f"position encoding of key is missing in {self.__class__.__name__}.")
        self_attention = key is query and key_pos is query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            # q = k = src + pos in encoder self-attention: add once, keep one tensor alive
            key = query if self_attention else key + key_pos
        if not self.batch_first:  # (L, B, C) -> (B, L, C): views, no copy
            same = key is query  # self-attention stays one tensor (``key is query`` after the views too)
            query, value = query.transpose(0, 1), value.transpose(0, 1)
            key = query if same else key.transpose(0, 1)
        return query, key, value, identity

    def _attend(self, query, key, value, key_padding_mask=None, attn_mask=None):
        dropout_p = self.attn.dropout if self.training else 0.0
        out = multi_head_attention(
            query, key, value, self.attn, key_padding_mask, attn_mask, dropout_p, self.attn_implementation
        )
        return out if self.batch_first else out.transpose(0, 1)

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        identity: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
        key_pos: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        query, key, value, identity = self._prepare(query, key, value, identity, query_pos, key_pos)
        out = self._attend(query, key, value, key_padding_mask, attn_mask)
        return identity + self.proj_drop(out)
