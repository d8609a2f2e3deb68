"""The segmentation of a batch of token sequences into clusters, as both backends return it.

A row's sequence is its *valid* tokens (``key_padding_mask`` False) in their original order;
padded positions are absent, not boundaries.  A segmentation is stored twice:

* per token, ``cluster_ids`` (B, N): the cluster slot of every token inside its row
  (0 = the cluster of the row's first clustered token), -1 for padded or cropped tokens;
* as CSR over the whole batch, for the pooling kernels: ``tokens`` (T,) holds the flat index
  ``b * N + n`` of every clustered token, row-major, so that the members of segment ``s`` are
  ``tokens[seg_starts[s]:seg_starts[s + 1]]``; segment ``s`` belongs to row ``seg_batch[s]`` and
  sits in slot ``s - row_offsets[seg_batch[s]]`` of that row's pooled output.
"""
import math
from typing import List, NamedTuple, Optional, Sequence

import torch

__all__ = [
    "Segmentation", "SegmentationSizes", "check_rows_have_tokens", "chunk_length", "count_runs", "read_row_sizes",
    "runs_sizes", "uniform_sizes",
]


class Segmentation(NamedTuple):
    cluster_ids: torch.Tensor  # (B, N) int64, -1 = no cluster
    num_clusters: torch.Tensor  # (B,) int64
    tokens: torch.Tensor  # (T,) int64, flat b * N + n, grouped by segment
    token_segment: torch.Tensor  # (T,) int64, global segment id of tokens[t]
    seg_starts: torch.Tensor  # (S + 1,) int64, CSR offsets into tokens
    seg_batch: torch.Tensor  # (S,) int64, row of each segment
    row_offsets: torch.Tensor  # (B + 1,) int64, first global segment of each row

    @property
    def batch_size(self) -> int:
        return self.cluster_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.cluster_ids.shape[1]

    @property
    def num_segments(self) -> int:
        return self.seg_batch.numel()

    @property
    def max_clusters(self) -> int:
        """M_max, the width of the pooled outputs (0 when every row is empty).  Reads the device
        (a host sync on GPUs): callers that know it (``SegmentationSizes``) pass it on instead."""
        return int(self.num_clusters.max()) if self.num_clusters.numel() else 0

    def cluster_mask(self, max_clusters: Optional[int] = None) -> torch.Tensor:
        """(B, M_max) bool, True at padded cluster slots (the convention of key_padding_mask).
        ``max_clusters``: M_max if known (no host sync), else ``self.max_clusters``."""
        width = self.max_clusters if max_clusters is None else max_clusters
        slots = torch.arange(width, device=self.num_clusters.device)
        return slots[None, :] >= self.num_clusters[:, None]


class SegmentationSizes(NamedTuple):
    """The sizes of a segmentation as Python ints, known on the host before it is built (from each
    row's valid length and number of runs, read from the device in one copy): what the ops need to
    allocate their outputs without reading the device again."""

    num_segments: int  # S, clusters of the batch
    num_tokens: int  # T, clustered tokens of the batch
    max_clusters: int  # M_max, the width of the pooled outputs

    @classmethod
    def of_rows(cls, clusters: Sequence[int], kept: Sequence[int]) -> "SegmentationSizes":
        """From each row's number of clusters and of clustered tokens."""
        return cls(sum(clusters), sum(kept), max(clusters, default=0))


def runs_sizes(lengths: Sequence[int], runs: Sequence[int]) -> SegmentationSizes:
    """Runs of equal sign: every valid token is clustered, row b has ``runs[b]`` clusters."""
    return SegmentationSizes.of_rows(runs, lengths)


def uniform_sizes(lengths: Sequence[int], chunk: int) -> SegmentationSizes:
    """Uniform chunks of length L = ``chunk`` of rows of ``lengths`` valid tokens: n // L clusters
    of L tokens (the rest cropped), one cluster of n tokens when 0 < n < L, none when n = 0."""
    clusters = [int(n > 0) if n < chunk else n // chunk for n in lengths]
    kept = [n if n < chunk else m * chunk for n, m in zip(lengths, clusters)]
    return SegmentationSizes.of_rows(clusters, kept)


def chunk_length(lengths: Sequence[int], runs: Sequence[int]) -> int:
    """Uniform mode's L = round(mean over images of (valid length / number of runs)), Python's
    round (half to even), from host ints; images without a valid token are left out."""
    ratios: List[float] = [n / m for n, m in zip(lengths, runs) if m > 0]
    if not ratios:
        raise ValueError("uniform_chunk_length: no image of the batch has a valid token")
    return max(1, round(math.fsum(ratios) / len(ratios)))



def count_runs(sign: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The number of maximal runs of equal ``sign`` (B, N) bool in each row's valid sequence
    (``valid`` (B, N) bool, None = all valid; pads do not break a run), (B,) int64 on the device,
    without a host sync: the valid signs are moved to the start of their row and the changes
    between neighbours inside the row's length counted."""
    B, N = sign.shape
    if valid is None:
        return 1 + (sign[:, 1:] != sign[:, :-1]).sum(1)
    lengths = valid.sum(1)
    pos = torch.cumsum(valid, 1) - 1
    dest = torch.where(valid, pos, torch.full_like(pos, N))  # pads go to a discarded column N
    compact = sign.new_zeros(B, N + 1).scatter(1, dest, sign)[:, :N]
    inside = torch.arange(1, N, device=sign.device)[None, :] < lengths[:, None]
    return (lengths > 0).long() + ((compact[:, 1:] != compact[:, :-1]) & inside).sum(1)


def read_row_sizes(shape, valid: Optional[torch.Tensor] = None, sign: Optional[torch.Tensor] = None):
    """Each row's valid length and (when ``sign`` is given) number of runs of equal sign, as
    Python lists, read from the device in one copy -- the one host sync a segmentation needs.
    ``shape`` (B, N); ``valid`` (B, N) bool or None (all valid: the lengths are N, and without
    ``sign`` nothing is read).  Returns (lengths, runs or None)."""
    B, N = shape
    rows = []
    if valid is not None:
        rows.append(valid.sum(1))
    if sign is not None:
        rows.append(count_runs(sign, valid))
    read = torch.stack(rows).tolist() if rows else []
    lengths = read.pop(0) if valid is not None else [N] * B
    return lengths, (read.pop(0) if sign is not None else None)


def check_rows_have_tokens(lengths: Sequence[int]) -> None:
    """Every image needs a valid token (``lengths`` from ``read_row_sizes``)."""
    for b, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"image {b} of the batch has no valid token (key_padding_mask all True)")
