"""Pure-PyTorch reference of the enact_ops operators.

Vectorised (cumsum / scatter, no Python loop over the batch); it is the fallback when the compiled
extension is absent and the oracle the compiled kernels are tested against.  Inputs are assumed
to be checked already (see ``enact_ops.ops``).
"""
from typing import List, Sequence, Tuple

import torch

from .segmentation import Segmentation

__all__ = ["segment_runs", "segment_uniform", "segment_softmax_pool"]


def _csr_from_tokens(
    valid_flat_index: torch.Tensor, segment_of_token: torch.Tensor, num_clusters: torch.Tensor,
    batch: int, seq_len: int,
) -> Segmentation:
    """Build a Segmentation from the kept tokens (row-major) and their global segment ids."""
    device = num_clusters.device
    row_offsets = torch.zeros(batch + 1, dtype=torch.long, device=device)
    row_offsets[1:] = torch.cumsum(num_clusters, 0)
    num_segments = int(row_offsets[-1])
    seg_sizes = torch.bincount(segment_of_token, minlength=num_segments)
    seg_starts = torch.zeros(num_segments + 1, dtype=torch.long, device=device)
    seg_starts[1:] = torch.cumsum(seg_sizes, 0)
    seg_batch = torch.repeat_interleave(torch.arange(batch, device=device), num_clusters)
    row_of_token = valid_flat_index // seq_len if seq_len else valid_flat_index
    cluster_ids = torch.full((batch * seq_len,), -1, dtype=torch.long, device=device)
    cluster_ids[valid_flat_index] = segment_of_token - row_offsets[row_of_token]
    return Segmentation(
        cluster_ids.view(batch, seq_len), num_clusters, valid_flat_index, segment_of_token,
        seg_starts, seg_batch, row_offsets,
    )


def segment_runs(sign: torch.Tensor, valid: torch.Tensor) -> Segmentation:
    """Clusters = maximal runs of equal ``sign`` over each row's valid sequence.

    sign, valid: (B, N) bool.  Pads (valid False) get no cluster and do not break a run.
    """
    batch, seq_len = sign.shape
    tokens = valid.reshape(-1).nonzero().squeeze(1)  # (T,) row-major
    row = tokens // seq_len
    s = sign.reshape(-1)[tokens]
    starts_run = torch.ones_like(s)
    if tokens.numel() > 1:
        starts_run[1:] = (row[1:] != row[:-1]) | (s[1:] != s[:-1])
    segment_of_token = torch.cumsum(starts_run.long(), 0) - 1
    num_clusters = torch.bincount(row[starts_run], minlength=batch)
    return _csr_from_tokens(tokens, segment_of_token, num_clusters, batch, seq_len)


def segment_uniform(valid: torch.Tensor, chunk: int) -> Segmentation:
    """Crop-and-chunk segmentation of the ``uniform`` mode (chunk length L = ``chunk``).

    Each row's valid sequence of length n is cropped to a multiple of L, dropping
    ``(n mod L) // 2`` tokens at the start and the rest at the end, and cut into n // L chunks;
    a row with 0 < n < L is a single chunk; an empty row has none.
    """
    batch, seq_len = valid.shape
    n = valid.sum(1)  # (B,)
    short = n < chunk
    num_clusters = torch.where(short, (n > 0).long(), n // chunk)
    start = torch.where(short, torch.zeros_like(n), (n % chunk) // 2)
    kept = torch.where(short, n, num_clusters * chunk)
    pos = torch.cumsum(valid.long(), 1) - 1  # position inside the valid sequence
    keep = valid & (pos >= start[:, None]) & (pos < (start + kept)[:, None])
    tokens = keep.reshape(-1).nonzero().squeeze(1)
    row = tokens // seq_len
    local = pos.reshape(-1)[tokens] - start[row]
    slot = torch.where(short[row], torch.zeros_like(local), local // chunk)
    row_offsets = torch.cumsum(num_clusters, 0) - num_clusters
    return _csr_from_tokens(tokens, row_offsets[row] + slot, num_clusters, batch, seq_len)


def segment_softmax_pool(
    scores: torch.Tensor, features: Sequence[torch.Tensor], seg: Segmentation,
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """w = softmax(scores) inside each segment; pooled[b, c] = sum_{i in c} w_i x[b, i].

    scores (B, N) floating, features: (B, N, C_f) tensors.  Returns the pooled tensors
    (B, M_max, C_f) (zeros at padded clusters) and the weights (B, N) (0 outside any cluster,
    detached: gradients flow through the pooled outputs only).
    """
    batch, seq_len = scores.shape
    num_segments, width = seg.num_segments, seg.max_clusters
    tok, sid = seg.tokens, seg.token_segment
    s = scores.reshape(-1)[tok]  # (T,)
    seg_max = torch.full((num_segments,), float("-inf"), dtype=s.dtype, device=s.device)
    seg_max = seg_max.scatter_reduce(0, sid, s.detach(), reduce="amax")
    e = torch.exp(s - seg_max[sid])
    denom = torch.zeros(num_segments, dtype=s.dtype, device=s.device).index_add(0, sid, e)
    w = e / denom[sid]  # (T,)
    weights = torch.zeros(batch * seq_len, dtype=s.dtype, device=s.device)
    weights = weights.index_put((tok,), w.detach()).view(batch, seq_len)
    slot = torch.arange(num_segments, device=s.device) - seg.row_offsets[seg.seg_batch]
    dest = seg.seg_batch * width + slot  # (S,) row of each segment in (B * M_max)
    pooled = []
    for x in features:
        channels = x.shape[-1]
        xt = x.reshape(batch * seq_len, channels)[tok]  # (T, C)
        summed = torch.zeros(num_segments, channels, dtype=s.dtype, device=s.device)
        summed = summed.index_add(0, sid, w[:, None] * xt.to(s.dtype))  # (S, C)
        out = torch.zeros(batch * width, channels, dtype=s.dtype, device=s.device)
        out = out.index_copy(0, dest, summed).view(batch, width, channels)
        pooled.append(out.to(x.dtype))
    return pooled, weights
