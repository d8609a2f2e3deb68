"""ACT: Adaptive Clustering Transformer attention (Zheng et al., BMVC 2021), the paper's comparator.

ACT clusters the **queries** of encoder self-attention, per image and head, with L rounds of
exact-Euclidean LSH (E2LSH) on the projected, 1/sqrt(d_head)-scaled queries q:

    h_i(q) = floor((a_i . q + b_i) / r),   a_i ~ N(0, I_d),  b_i ~ U(0, r),  i = 1..L

A cluster is the set of an image's valid queries whose L hash values are **all** equal (the
(L,) integer tuples are compared as tuples -- ``torch.unique(dim=0)`` -- never folded into an
overflowing sum of 4^i h_i as the authors' code does); its prototype is the mean query; the
prototypes attend to all keys (key padding mask honoured); every query receives its prototype's
output.  Padded positions belong to no cluster and receive no attention (their output is the
identity).  ACT adds no parameters: a trained MHSA checkpoint loads as is (the projections are
buffers, reported missing and kept at their seeded values).

MTKD (the paper's multi-task knowledge distillation, Eq. 7): :func:`act_twins` and
:func:`act_branch` run the same encoder a second time with ACT in place of its attention
(shared weights); ``DETR(mtkd_attention=ActAttention(...))`` adds :func:`mtkd_loss` between the two
branches' boxes to its training losses.

Projections: buffers ``hash_a`` (h, L, d) ~ N(0, 1) and ``hash_b`` (h, L) ~ U(0, 1), float32, the
offsets in units of r (b = r * hash_b ~ U(0, r), so the state dict does not depend on r), drawn
once from a CPU generator seeded with ``seed * 1_000_003 + layer_index`` (deterministic; saved in the state dict).
``layer_index`` is 0 at construction; an encoder that deep-copies one prototype into each layer
calls ``set_layer_index(i)`` on layer i's copy (``EncoderStack`` does, and
:func:`number_act_layers` does it for any model), so every layer gets its own projections.

A built detector (this project's or detrex's) gets ACT in its encoder with
``projects.enact.act_encoder(model, num_hashes, bucket_width, seed)``
(:mod:`.encoder_adapter`, the mechanism of ``enact_encoder``): the trained weights stay, and the
k-th encoder self-attention gets layer index k, as ``EncoderStack`` numbers an ACT config's layers.
"""
import contextlib
import copy
import math
from typing import Optional

import torch
from torch import nn
from torch.profiler import record_function

import enact_ops

from .attention import MultiheadAttention, attend_heads, key_padding_bias

__all__ = ["ActAttention", "act_branch", "act_twins", "e2lsh_codes", "hash_segmentation", "mtkd_loss", "number_act_layers"]

_SEED_STRIDE = 1_000_003  # > any layer index: distinct (seed, layer) pairs get distinct seeds
_CODE_LIMIT = float(2**62)  # hash values are clamped here before the int64 cast (absurdly small r)


def e2lsh_codes(q: torch.Tensor, a: torch.Tensor, u: torch.Tensor, bucket_width: float) -> torch.Tensor:
    """floor((a_i . q + b_i) / r) = floor(a_i . q / r + u_i) with b_i = r u_i, for q (B, h, N, d),
    a (h, L, d), u (h, L) in [0, 1): (B, h, N, L) int64.  Float32 (float64 for float64 q),
    autocast off."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=q.device.type, enabled=False):
        proj = torch.einsum("bhnd,hld->bhnl", q.to(dtype), a.to(dtype)) / bucket_width
        codes = torch.floor(proj + u.to(dtype)[None, :, None, :]).clamp_(-_CODE_LIMIT, _CODE_LIMIT)
    return codes.to(torch.int64)


def hash_segmentation(codes: torch.Tensor, valid: Optional[torch.Tensor] = None) -> enact_ops.Segmentation:
    """The Segmentation of R rows of N tokens whose clusters are the equal (L,) code tuples.

    codes (R, N, L) int64; valid (R, N) bool (None: all valid).  Invalid tokens are in no
    cluster (id -1).  Inside a row, cluster slots are numbered in order of their first token
    (slot 0 = the cluster of the row's first valid token); tokens of a segment are row-major.
    Vectorised: one ``torch.unique(dim=0)`` over (row, code tuple) pairs and two sorts.
    """
    rows_n, seq_len, _ = codes.shape
    device = codes.device
    flat_codes = codes.reshape(rows_n * seq_len, -1)
    if valid is None:
        idx = torch.arange(rows_n * seq_len, device=device)
    else:
        idx = valid.reshape(-1).nonzero().squeeze(1)  # (T,) flat b * N + n, ascending
    rows = torch.div(idx, seq_len, rounding_mode="floor")
    keys = torch.cat([rows[:, None], flat_codes[idx]], dim=1)  # (T, 1 + L): row first
    uniq, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    num_segments = uniq.shape[0]
    # renumber the segments by their first token (row-major), so slots follow first appearance
    first = torch.full((num_segments,), rows_n * seq_len, dtype=torch.int64, device=device)
    first = first.scatter_reduce(0, inverse, idx, reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_segments, device=device)
    token_seg = rank[inverse]  # (T,) global segment of each valid token
    seg_batch = uniq[order, 0]
    counts = counts[order]
    perm = torch.argsort(token_seg, stable=True)  # group by segment, row-major inside
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    seg_starts = torch.cat([zero, torch.cumsum(counts, 0)])
    num_clusters = torch.bincount(seg_batch, minlength=rows_n)
    row_offsets = torch.cat([zero, torch.cumsum(num_clusters, 0)])
    cluster_ids = torch.full((rows_n * seq_len,), -1, dtype=torch.int64, device=device)
    cluster_ids[idx] = token_seg - row_offsets[rows]
    return enact_ops.Segmentation(
        cluster_ids=cluster_ids.view(rows_n, seq_len),
        num_clusters=num_clusters,
        tokens=idx[perm],
        token_segment=token_seg[perm],
        seg_starts=seg_starts,
        seg_batch=seg_batch,
        row_offsets=row_offsets,
    )


def number_act_layers(model: nn.Module) -> int:
    """Give every ActAttention in ``model`` (in ``modules()`` order) layer index 0, 1, ... and
    redraw its projections.  Returns how many were numbered."""
    count = 0
    for module in model.modules():
        if isinstance(module, ActAttention):
            module.set_layer_index(count)
            count += 1
    return count


class ActAttention(MultiheadAttention):
    """Multi-head attention whose queries are clustered by E2LSH (ACT); keys and values are not:

        out = identity + proj_drop(W_o gather_c(softmax(P_c K^T / sqrt(d_head)) V))

    with P_c the mean of the projected queries of cluster c (per image and head).  Same call
    signature, parameters (``attn.*``) and residual convention as ``MultiheadAttention``.

    Args (beyond MultiheadAttention's):
        num_hashes: L, the number of hash rounds (int >= 1; the paper: 16 / 20 / 24 / 32).
        bucket_width: r, the spacing of the hash hyperplanes (> 0; the paper: 8 at head dim 32).
        seed: seed of the projections (with the layer index, see the module docstring).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        batch_first: bool = False,
        num_hashes: int = 32,
        bucket_width: float = 8.0,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        **kwargs,
    ):
        if isinstance(num_hashes, bool) or not isinstance(num_hashes, int) or num_hashes < 1:
            raise ValueError(f"num_hashes must be an int >= 1, got {num_hashes!r}")
        if (
            isinstance(bucket_width, bool)
            or not isinstance(bucket_width, (int, float))
            or not math.isfinite(bucket_width)
            or bucket_width <= 0
        ):
            raise ValueError(f"bucket_width must be a finite number > 0, got {bucket_width!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        super().__init__(embed_dim, num_heads, attn_drop, proj_drop, batch_first, attn_implementation, **kwargs)
        self.num_hashes, self.bucket_width, self.seed = num_hashes, float(bucket_width), seed
        self.head_dim = embed_dim // num_heads
        self.layer_index = 0
        self.register_buffer("hash_a", torch.empty(num_heads, num_hashes, self.head_dim))
        self.register_buffer("hash_b", torch.empty(num_heads, num_hashes))
        self.reset_projections()
        self.last_num_clusters: Optional[torch.Tensor] = None  # (B, h) of the last call
        self.last_num_tokens: Optional[torch.Tensor] = None  # (B,) valid queries of the last call

    def extra_repr(self) -> str:
        return (
            f"num_hashes={self.num_hashes}, bucket_width={self.bucket_width}, seed={self.seed}, "
            f"layer_index={self.layer_index}"
        )

    def reset_projections(self) -> None:
        """Redraw a ~ N(0, I) and b / r ~ U(0, 1) from seed and layer index (deterministic)."""
        gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + self.layer_index)
        a = torch.randn(self.hash_a.shape, generator=gen, dtype=torch.float32)
        b = torch.rand(self.hash_b.shape, generator=gen, dtype=torch.float32)  # in units of r
        with torch.no_grad():
            self.hash_a.copy_(a)
            self.hash_b.copy_(b)

    def set_layer_index(self, layer_index: int) -> None:
        """This module is the encoder's layer ``layer_index``: redraw its projections for it."""
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not 0 <= layer_index < _SEED_STRIDE:
            raise ValueError(f"layer_index must be an int in [0, {_SEED_STRIDE}), got {layer_index!r}")
        self.layer_index = layer_index
        self.reset_projections()

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
        query_padding_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """As MultiheadAttention.forward.  ``query_padding_mask`` (B, L) bool, True = pad: the
        queries left out of the clustering; by default ``key_padding_mask`` when the queries are
        the keys (self-attention, the encoder's case)."""
        if attn_mask is not None:
            raise ValueError("ActAttention does not take attn_mask: its queries are clustered (use it in the encoder only)")
        self_attention = key is None or key is query
        query, key, value, identity = self._prepare(query, key, value, identity, query_pos, key_pos)
        if query_padding_mask is None and self_attention and query.shape[1] == key.shape[1]:
            query_padding_mask = key_padding_mask
        out = self._attend_clustered(query, key, value, key_padding_mask, query_padding_mask)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.proj_drop(out)

    def _attend_clustered(self, query, key, value, key_padding_mask, query_padding_mask):
        """Batch-first (B, L, C) in, (B, L, C) out (zero at padded queries)."""
        bsz, tgt_len, embed_dim = query.shape
        src_len = key.shape[1]
        heads, d = self.num_heads, self.head_dim
        attn = self.attn
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
        lin = torch.nn.functional.linear
        q = lin(query, w_q, b_q).view(bsz, tgt_len, heads, d).transpose(1, 2)  # (B, h, L, d)
        k = lin(key, w_k, b_k).view(bsz, src_len, heads, d).transpose(1, 2)
        v = lin(value, w_v, b_v).view(bsz, src_len, heads, d).transpose(1, 2)
        valid = None if query_padding_mask is None else ~query_padding_mask  # (B, L)
        with record_function("act::cluster_queries"):
            with torch.no_grad():
                codes = e2lsh_codes(q.detach() / math.sqrt(d), self.hash_a, self.hash_b, self.bucket_width)
                row_valid = None if valid is None else valid[:, None, :].expand(bsz, heads, tgt_len)
                seg = hash_segmentation(
                    codes.reshape(bsz * heads, tgt_len, -1),
                    None if row_valid is None else row_valid.reshape(bsz * heads, tgt_len),
                )
            zeros = q.new_zeros(bsz * heads, tgt_len, dtype=torch.float32)
            (protos,), _, _ = enact_ops.segment_softmax_pool(zeros, [q.reshape(bsz * heads, tgt_len, d)], seg)
        width = protos.shape[1]
        with record_function("act::attend_prototypes"):
            mask = None if key_padding_mask is None else key_padding_bias(key_padding_mask, q.dtype)
            dropout_p = attn.dropout if self.training else 0.0
            out = attend_heads(protos.view(bsz, heads, width, d), k, v, mask, dropout_p, self.attn_implementation)
        ids = seg.cluster_ids.view(bsz, heads, tgt_len)
        out = torch.gather(out, 2, ids.clamp(min=0)[..., None].expand(bsz, heads, tgt_len, d))  # (B, h, L, d)
        out = attn.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, embed_dim))
        if valid is not None:
            out = out * valid[..., None].to(out.dtype)
        self.last_num_clusters = seg.num_clusters.view(bsz, heads).detach()
        self.last_num_tokens = torch.full((bsz,), tgt_len, device=q.device) if valid is None else valid.sum(1)
        return out

    def statistics(self) -> dict:
        """Prototypes per image (mean over images and heads) and compression L / C of the last
        call (floats; syncs on GPU)."""
        if self.last_num_clusters is None:
            return {}
        m = self.last_num_clusters.double()  # (B, h)
        n = self.last_num_tokens.double()[:, None]
        return {"clusters_per_image": float(m.mean()), "compression": float((n / m).mean())}


# ---------------------------------------------------------------- MTKD (the paper's Eq. 7)
def act_twins(encoder: nn.Module, prototype: "ActAttention") -> nn.ModuleList:
    """One ActAttention per layer of ``encoder`` (a stack whose ``layers[i].self_attn`` are
    MultiheadAttention), copies of ``prototype`` numbered 0, 1, ... (their own projections),
    *without* their ``attn`` weights: :func:`act_branch` lends them the layer's own, so the ACT
    branch shares every weight with the full one.  Their state dict holds only the projections."""
    twins = nn.ModuleList()
    for index, layer in enumerate(encoder.layers):
        full = layer.self_attn
        if not isinstance(full, MultiheadAttention) or isinstance(full, ActAttention):
            raise TypeError(f"MTKD needs a full multi-head attention encoder; layer {index} has {type(full).__name__}")
        if (full.embed_dim, full.num_heads, full.batch_first) != (
            prototype.embed_dim, prototype.num_heads, prototype.batch_first
        ):
            raise ValueError(
                f"the ACT prototype (embed_dim {prototype.embed_dim}, {prototype.num_heads} heads) does not fit "
                f"encoder layer {index} (embed_dim {full.embed_dim}, {full.num_heads} heads)"
            )
        twin = copy.deepcopy(prototype)
        twin.set_layer_index(index)
        del twin.attn
        twins.append(twin)
    return twins


@contextlib.contextmanager
def act_branch(encoder: nn.Module, twins: nn.ModuleList):
    """Inside the block, ``encoder``'s layers run ACT (``twins`` from :func:`act_twins`) with
    their own attention weights; the full attention modules are restored on exit."""
    layers = list(encoder.layers)
    saved = [layer.self_attn for layer in layers]
    try:
        for layer, twin, full in zip(layers, twins, saved):
            twin.attn = full.attn
            twin.attn_implementation = full.attn_implementation
            layer.self_attn = twin
        yield
    finally:
        for layer, twin, full in zip(layers, twins, saved):
            layer.self_attn = full
            if "attn" in twin._modules:
                del twin.attn


def mtkd_loss(act_boxes: torch.Tensor, full_boxes: torch.Tensor) -> torch.Tensor:
    """L_KD(B_1, B_2.detach()): squared L2 distance between ACT's and the full branch's predicted
    boxes (B, Q, 4), summed over the 4 coordinates and averaged over the queries."""
    return (act_boxes - full_boxes.detach()).square().sum(-1).mean()
