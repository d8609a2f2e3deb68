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
from typing import NamedTuple

import torch

__all__ = ["Segmentation"]


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
        """M_max, the width of the pooled outputs (0 when every row is empty)."""
        return int(self.num_clusters.max()) if self.num_clusters.numel() else 0

    def cluster_mask(self) -> torch.Tensor:
        """(B, M_max) bool, True at padded cluster slots (the convention of key_padding_mask)."""
        slots = torch.arange(self.max_clusters, device=self.num_clusters.device)
        return slots[None, :] >= self.num_clusters[:, None]
