"""Pure-PyTorch reference of the enact_ops operators.

Vectorised (cumsum / scatter, no Python loop over the batch); it is the fallback when the compiled
extension is absent and the oracle the compiled kernels are tested against.  Inputs are assumed
to be checked already (see ``enact_ops.ops``).

No host sync when the sizes are given (``sizes`` / ``max_clusters``): every data-dependent size
(the clustered tokens, the segments, the pooled width) comes from them -- ``nonzero_static``,
``repeat_interleave(output_size=)`` and counts by ``index_add`` instead of ``nonzero``,
``bincount`` and boolean indexing -- and they are checked with ``torch._assert_async`` (on a GPU,
without waiting).  Without them, one read of the rows' sizes (``read_row_sizes``).
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .segmentation import Segmentation, SegmentationSizes, read_row_sizes, runs_sizes, uniform_sizes

__all__ = [
    "correlate_rows", "curvature_taps", "segment_runs", "segment_uniform", "segment_softmax_pool", "smoothed_information",
]


def _count(index: torch.Tensor, size: int, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bincount(index, weight, minlength=size) for int64 counts, without reading the device."""
    ones = torch.ones_like(index) if weight is None else weight.long()
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, ones)


def _csr_from_tokens(
    valid_flat_index: torch.Tensor, segment_of_token: torch.Tensor, num_clusters: torch.Tensor,
    batch: int, seq_len: int, num_segments: int,
) -> Segmentation:
    """Build a Segmentation from the kept tokens (row-major) and their global segment ids."""
    device = num_clusters.device
    row_offsets = torch.zeros(batch + 1, dtype=torch.long, device=device)
    row_offsets[1:] = torch.cumsum(num_clusters, 0)
    torch._assert_async(row_offsets[-1] == num_segments, "enact_ops: the given num_segments is not the segmentation's")
    seg_sizes = _count(segment_of_token, num_segments)
    seg_starts = torch.zeros(num_segments + 1, dtype=torch.long, device=device)
    seg_starts[1:] = torch.cumsum(seg_sizes, 0)
    seg_batch = torch.repeat_interleave(torch.arange(batch, device=device), num_clusters, output_size=num_segments)
    row_of_token = valid_flat_index // seq_len if seq_len else valid_flat_index
    cluster_ids = torch.full((batch * seq_len,), -1, dtype=torch.long, device=device)
    cluster_ids[valid_flat_index] = segment_of_token - row_offsets[row_of_token]
    return Segmentation(
        cluster_ids.view(batch, seq_len), num_clusters, valid_flat_index, segment_of_token,
        seg_starts, seg_batch, row_offsets,
    )


def _kept_tokens(keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The flat indices of the True entries of ``keep`` (B, N), row-major, (T,) for T given."""
    torch._assert_async(keep.sum() == num_tokens, "enact_ops: the given num_tokens is not the segmentation's")
    return torch.nonzero_static(keep.reshape(-1), size=num_tokens).squeeze(1)


def segment_runs(sign: torch.Tensor, valid: torch.Tensor, sizes: Optional[SegmentationSizes] = None) -> Segmentation:
    """Clusters = maximal runs of equal ``sign`` over each row's valid sequence.

    sign, valid: (B, N) bool.  Pads (valid False) get no cluster and do not break a run.
    ``sizes``: the segmentation's (read here when None).
    """
    batch, seq_len = sign.shape
    if sizes is None:
        sizes = runs_sizes(*read_row_sizes(sign.shape, valid, sign))
    tokens = _kept_tokens(valid, sizes.num_tokens)  # (T,) row-major
    row = tokens // seq_len
    s = sign.reshape(-1)[tokens]
    starts_run = torch.ones_like(s)
    if tokens.numel() > 1:
        starts_run[1:] = (row[1:] != row[:-1]) | (s[1:] != s[:-1])
    segment_of_token = torch.cumsum(starts_run.long(), 0) - 1
    num_clusters = _count(row, batch, starts_run)
    return _csr_from_tokens(tokens, segment_of_token, num_clusters, batch, seq_len, sizes.num_segments)


def segment_uniform(valid: torch.Tensor, chunk: int, sizes: Optional[SegmentationSizes] = None) -> Segmentation:
    """Crop-and-chunk segmentation of the ``uniform`` mode (chunk length L = ``chunk``).

    Each row's valid sequence of length n is cropped to a multiple of L, dropping
    ``(n mod L) // 2`` tokens at the start and the rest at the end, and cut into n // L chunks;
    a row with 0 < n < L is a single chunk; an empty row has none.  ``sizes``: the
    segmentation's (read here when None).
    """
    batch, seq_len = valid.shape
    if sizes is None:
        sizes = uniform_sizes(read_row_sizes(valid.shape, valid)[0], chunk)
    n = valid.sum(1)  # (B,)
    short = n < chunk
    num_clusters = torch.where(short, (n > 0).long(), n // chunk)
    start = torch.where(short, torch.zeros_like(n), (n % chunk) // 2)
    kept = torch.where(short, n, num_clusters * chunk)
    pos = torch.cumsum(valid.long(), 1) - 1  # position inside the valid sequence
    keep = valid & (pos >= start[:, None]) & (pos < (start + kept)[:, None])
    tokens = _kept_tokens(keep, sizes.num_tokens)
    row = tokens // seq_len
    local = pos.reshape(-1)[tokens] - start[row]
    slot = torch.where(short[row], torch.zeros_like(local), local // chunk)
    row_offsets = torch.cumsum(num_clusters, 0) - num_clusters
    return _csr_from_tokens(tokens, row_offsets[row] + slot, num_clusters, batch, seq_len, sizes.num_segments)


def segment_softmax_pool(
    scores: torch.Tensor, features: Sequence[torch.Tensor], seg: Segmentation, max_clusters: Optional[int] = None,
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """w = softmax(scores) inside each segment; pooled[b, c] = sum_{i in c} w_i x[b, i].

    scores (B, N) floating, features: (B, N, C_f) tensors.  Returns the pooled tensors
    (B, M_max, C_f) (zeros at padded clusters) and the weights (B, N) (0 outside any cluster,
    detached: gradients flow through the pooled outputs only).  ``max_clusters``: M_max if known
    (no host sync), else read from ``seg``.
    """
    batch, seq_len = scores.shape
    num_segments = seg.num_segments
    width = seg.max_clusters if max_clusters is None else max_clusters
    torch._assert_async((seg.num_clusters <= width).all(), "enact_ops: max_clusters is smaller than a row's clusters")
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


def correlate_rows(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Cross-correlation of each row of x (B, L) with taps (odd length), zero padding, same length.
    Exact float32 on every device: a multiply-and-sum over a (B, L, taps) window view, not
    F.conv1d, which cuDNN runs in TF32 by default (sign flips near zero curvature)."""
    r = taps.numel() // 2
    return (torch.nn.functional.pad(x, (r, r)).unfold(1, taps.numel(), 1) * taps).sum(-1)


def curvature_taps(dtype: torch.dtype, device) -> torch.Tensor:
    """(-1, 2, -1), the second difference of step 4, made on the device (no blocking copy)."""
    x = torch.arange(-1, 2, dtype=dtype, device=device)
    return 2.0 - 3.0 * x.abs()


def smoothed_information(
    logits: torch.Tensor, valid: Optional[torch.Tensor], taps: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-4 of ENACT on each row's valid sequence: q = softmax(logits), h = -p log2 p with
    p = q + 1e-8, h~ = taps * h, s = ([-1, 2, -1] * h~) > 0.  Rows are gathered into a (B, L_max)
    block with each row's valid tokens first (so both correlations see only them, zero-padded at
    the row's two ends), processed, and put back.  Returns smoothed (B, N) (0 at pads, autograd
    to ``logits``), sign (B, N) bool (False at pads), lengths (B,) and runs (B,) int64 (maximal runs
    of equal sign per valid sequence, 0 for an empty row)."""
    B, N = logits.shape
    if valid is None:
        valid = torch.ones(B, N, dtype=torch.bool, device=logits.device)
    lengths = valid.sum(1)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid tokens first, in order
    inside = torch.arange(N, device=logits.device)[None, :] < lengths[:, None]  # (B, N) in sorted order
    sorted_logits = torch.gather(logits, 1, order).masked_fill(~inside, float("-inf"))
    q = torch.softmax(sorted_logits, dim=1).nan_to_num(0.0)  # an empty row: all 0
    p = q + 1e-8
    h = (-p * torch.log2(p)) * inside
    smoothed_sorted = correlate_rows(h, taps) * inside
    curvature = correlate_rows(smoothed_sorted.detach(), curvature_taps(taps.dtype, taps.device))
    sign_sorted = (curvature > 0) & inside
    changes = (sign_sorted[:, 1:] != sign_sorted[:, :-1]) & inside[:, 1:]
    runs = (lengths > 0).long() + changes.sum(1)
    smoothed = torch.zeros_like(smoothed_sorted).scatter(1, order, smoothed_sorted)
    sign = torch.zeros_like(sign_sorted).scatter(1, order, sign_sorted)
    return smoothed, sign, lengths, runs
