"""Separable ENACT: ENACT for the row-column decoupled attention (RCDA) encoder of Anchor DETR.

This is the project's documented decision on how ENACT applies to Anchor DETR's default encoder,
and its one implementation (:class:`SeparableEnact`), used by both forms of the layer:

* :class:`~projects.enact.modeling.enact_rcda.EnactRCDAEncoderLayer`, the encoder layer of this
  project's Anchor DETR (a :class:`~projects.enact.modeling.rcda.MultiheadRCDA` with one
  projection module per input, keys pooled as its ``key_pooling`` says);
* :class:`~projects.enact.modeling.enact_adapter.EnactPackedRCDA`, what ``enact_encoder`` puts in
  place of detrex's ``MultiheadRCDA`` (its packed 5C x C projection, keys pooled over all pixels
  and padded columns / rows read off the mask's first row / column, as detrex does).

Each form pools its keys as the attention it replaces does; from the pooled keys on (clustering,
attention on the clustered grid, statistics) the computation is this module's.

The problem
-----------
RCDA (:mod:`.rcda`) never attends to the H x W key pixels one by one.  Per head, with the
column keys ``K_x[w] = mean_h (src + pos_x)[h, w]`` (B, W, C) and the row keys
``K_y[h] = mean_w (src + pos_y)[h, w]`` (B, H, C)::

    A_x[q, w] = softmax_w(q_x K_x^T / sqrt(d))       A_y[q, h] = softmax_h(q_y K_y^T / sqrt(d))
    Z[q, h]   = sum_w A_x[q, w] V[h, w]              (Q, H, d)  the large intermediate
    out[q]    = sum_h A_y[q, h] Z[q, h]

i.e. pixel (h, w) gets the *product* weight ``A_y[q, h] A_x[q, w]``.  ENACT as specified for
multi-head self-attention clusters a 1-D token sequence (the row-major flattening).  Its runs
cross row boundaries and cover ragged pieces of rows, which are not products "set of rows x
set of columns", so they cannot be given a weight of the form ``A_y[h'] A_x[w']``; clustering the
row keys, column keys and values with one shared flattened segmentation (the authors' public
code) mixes three sequences of different lengths and meanings and breaks the grid.

The decision: separable ENACT
-----------------------------
ENACT runs once per axis, on the sequences RCDA actually attends over, and the value grid is
pooled over the resulting rectangular blocks:

* columns: ENACT (steps 1-6 of the spec, own ``W_prob^x``) on the column keys K_x (B, W, C):
  ``p = softmax_w(W_prob^x K_x)``, ``h = -p log2 p``, Gaussian smoothing along w, curvature-sign
  runs -> W' column clusters ``c_1..c_W'``, weights ``alpha_w = softmax_{w in c}(h~_w)``;
* rows: the same on the row keys K_y (B, H, C) with ``W_prob^y`` -> H' row clusters
  ``r_1..r_H'`` and weights ``beta_h``;
* pooling (alpha and beta sum to one inside every cluster)::

      K_x^cl[w'] = sum_{w in c_w'} alpha_w K_x[w]                       (B, W', C)
      K_y^cl[h'] = sum_{h in r_h'} beta_h  K_y[h]                       (B, H', C)
      V^cl[h', w'] = sum_{h in r_h'} sum_{w in c_w'} beta_h alpha_w V[h, w]   (B, H', W', C)

  computed as two passes of ``enact_ops.segment_softmax_pool``: V (B, H, W, C) seen as
  (B, W, H*C) pooled along W with the column segmentation, then as (B, H, W'*C) pooled along H
  with the row segmentation.  This is 2-D ENACT restricted to rectangular clusters with the
  separable weights ``w_hw = beta_h alpha_w`` (which sum to one over every block);
* RCDA then runs unchanged on the (H', W') grid, the cluster masks being its column / row
  padding masks; the queries are not clustered (all H*W pixels, each with its own q_x, q_y)::

      A_x^cl = softmax_w'(q_x K_x^cl^T / sqrt(d)),  A_y^cl = softmax_h'(q_y K_y^cl^T / sqrt(d))
      out[q] = sum_h' A_y^cl[q, h'] sum_w' A_x^cl[q, w'] V^cl[h', w']

  so the decoupled structure is kept exactly: the intermediate Z is (Q, min(H', W'), d) instead
  of (Q, min(H, W), d) (``rcda_combine`` contracts the longer axis first), A_x / A_y shrink by
  W / W' and H / H', and the value projection runs on H' * W' instead of H * W vectors.

The pooling is done on the layer's *inputs* (K_x, K_y before ``k_x_proj`` / ``k_y_proj``, as
RCDA itself pools before projecting, and ``src`` before ``v_proj``): pooling is an affine
combination with weights summing to one, so it commutes with the projections (bias included) and
the projections then run on the smaller tensors.  ``W_prob`` sees the same inputs as in ENACT for
MHSA (key content + position encoding, before the key projection).

Padding.  Detectron2 pads at the bottom / right, so an image's valid pixels are the top-left
H_b x W_b block: its valid columns are those with a valid pixel (RCDA's own column mask) and its
valid rows likewise.  Each axis is clustered over its valid sequence only (the spec's padding
rules, applied per axis), padded columns / rows belong to no cluster, hence no block contains a
padded pixel and an image's output does not depend on the batch it is in (``mode="segments"``).
As in RCDA, the padding mask must be rectangular.

Two clusterings, not one.  Each layer has two ``EnactClustering`` modules, ``cluster_x``
(columns) and ``cluster_y`` (rows), each with its own ``W_prob: Linear(C, 1)``:

* K_x and K_y are different statistics (means over rows vs. over columns, carrying the x vs. the
  y encoding); the distribution of information over the columns of an image and over its rows are
  different things, and a separate ``W_prob`` lets each be learnt without the two axes' gradients
  competing for one vector;
* the cost is negligible: 2 (C + 1) = 514 parameters per layer, 3,084 for six layers of C = 256
  (0.008 % of Anchor DETR R50-DC5's 37.0 M; one shared W_prob would save 1,542);
* checkpoint loading is the same either way: a baseline RCDA checkpoint has no ``W_prob``, the
  RCDA projections keep their names (``self_attn.*``), and the only missing keys are
  ``layers.<i>.cluster_{x,y}.w_prob.{weight,bias}`` (4 tensors per layer; detrex's form:
  ``...self_attn.cluster_{x,y}.w_prob.*``), freshly initialised;
* each module keeps its own last-call statistics (W' and H' per image).

Sigma.  The default is the paper's sigma = 3 for Anchor DETR, but note that the compression is
squared: the runs of the curvature sign have a length of about 2 sigma (for white-noise
information, by Rice's formula pi sigma / sqrt(2.5)), so 1-D ENACT keeps N / M ~ 2 sigma while
the separable variant keeps N / M ~ (2 sigma)^2.  Measured with untrained W_prob on random
50 x 68 maps (tools/benchmark_rcda.py): sigma = 3 gives W'/W ~ H'/H ~ 0.18, N / M ~ 32 (1-D
ENACT at sigma = 3 on the same maps: N / M ~ 6.4); sigma = 1 gives W'/W ~ H'/H ~ 0.43,
N / M ~ 5.4, the compression of the paper's 1-D ENACT.  Which one keeps the accuracy is for
training to tell; ``sigma`` is the encoder's knob (``model.transformer.encoder.sigma``).

Statistics: :meth:`SeparableEnact.statistics` (of either form) reports, for its last call, the
clusters per image M = H' W', the compression N / M with N the image's valid pixels, and the
per-axis counts and ratios W' / W and H' / H (W, H: the image's valid columns / rows).
"""
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .enact import EnactClustering
from .rcda import MultiheadRCDA, rcda_combine, rcda_weights

__all__ = ["GridClusters", "RCDAProjections", "SeparableEnact", "cluster_grid", "rcda_on_grid"]


class GridClusters(NamedTuple):
    key_x: torch.Tensor  # (B, W', C) clustered column keys
    key_y: torch.Tensor  # (B, H', C) clustered row keys
    value: torch.Tensor  # (B, H', W', C_v) block-pooled value grid
    mask_x: torch.Tensor  # (B, W') bool, True = padded column-cluster slot
    mask_y: torch.Tensor  # (B, H') bool, True = padded row-cluster slot
    column_ids: torch.Tensor  # (B, W) int64 column cluster of every column, -1 = padded column
    row_ids: torch.Tensor  # (B, H) int64 row cluster of every row, -1 = padded row
    alpha: torch.Tensor  # (B, W) column weights, 0 on padded columns
    beta: torch.Tensor  # (B, H) row weights, 0 on padded rows


def cluster_grid(
    cluster_x: EnactClustering,
    cluster_y: EnactClustering,
    key_x: torch.Tensor,
    key_y: torch.Tensor,
    value: torch.Tensor,
    pad_x: Optional[torch.Tensor] = None,
    pad_y: Optional[torch.Tensor] = None,
) -> GridClusters:
    """Separable ENACT: cluster the columns (``cluster_x`` on key_x) and the rows (``cluster_y``
    on key_y) and pool the value grid over the rectangular blocks.

    Args:
        key_x: column keys (B, W, C); key_y: row keys (B, H, C).
        value: value map (B, H, W, C_v).
        pad_x (B, W), pad_y (B, H): bool, True = padded column / row (or None).
    Returns a :class:`GridClusters`.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be a (B, H, W, C) map, got {tuple(value.shape)}")
    b, h, w, c = value.shape
    if tuple(key_x.shape[:2]) != (b, w) or tuple(key_y.shape[:2]) != (b, h):
        raise ValueError(
            f"key_x must be (B, W, C) = ({b}, {w}, C) and key_y (B, H, C) = ({b}, {h}, C), got "
            f"{tuple(key_x.shape)} and {tuple(key_y.shape)}"
        )
    # Pass 1, columns: V seen as W tokens of H * C features each.
    cols = cluster_x(key_x, value.transpose(1, 2).reshape(b, w, h * c), pad_x)
    w_cl = cols.key.shape[1]
    # Pass 2, rows: the column-pooled map seen as H tokens of W' * C features each.
    by_row = cols.value.view(b, w_cl, h, c).transpose(1, 2).reshape(b, h, w_cl * c)
    rows = cluster_y(key_y, by_row, pad_y)
    h_cl = rows.key.shape[1]
    return GridClusters(
        key_x=cols.key,
        key_y=rows.key,
        value=rows.value.view(b, h_cl, w_cl, c),
        mask_x=cols.cluster_mask,
        mask_y=rows.cluster_mask,
        column_ids=cols.cluster_ids,
        row_ids=rows.cluster_ids,
        alpha=cols.weights,
        beta=rows.weights,
    )


Projection = Callable[[torch.Tensor], torch.Tensor]


class RCDAProjections(NamedTuple):
    """The projections of an RCDA, whatever their parameters look like: the two queries', the two
    pooled keys', the value's and the output's, each (..., C) -> (..., C), and the head count."""

    q_x: Projection
    q_y: Projection
    k_x: Projection
    k_y: Projection
    v: Projection
    out: Projection
    num_heads: int

    @classmethod
    def of(cls, attn: MultiheadRCDA) -> "RCDAProjections":
        """Those of this project's :class:`MultiheadRCDA` (one ``nn.Linear`` each)."""
        return cls(attn.q_x_proj, attn.q_y_proj, attn.k_x_proj, attn.k_y_proj, attn.v_proj, attn.out_proj,
                   attn.num_heads)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ..., C) -> (B, n, ..., d)."""
        return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads).movedim(-2, 1)


def rcda_on_grid(
    proj: RCDAProjections,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    grid: GridClusters,
    dropout: float = 0.0,
) -> torch.Tensor:
    """RCDA of the queries over the clustered grid: what RCDA computes after pooling its keys,
    with ``grid``'s keys, value blocks and cluster masks in place of the pooled keys, the value map
    and the padding masks.

    query_x, query_y (B, Q, C) (not projected); ``dropout``: probability on the two attention
    distributions (0: none; pass 0 outside training).  Returns (B, Q, C), no residual.
    """
    a_x, a_y = rcda_weights(
        proj.split_heads(proj.q_x(query_x)),
        proj.split_heads(proj.q_y(query_y)),
        proj.split_heads(proj.k_x(grid.key_x)),
        proj.split_heads(proj.k_y(grid.key_y)),
        grid.mask_x,
        grid.mask_y,
    )  # (B, n, Q, W'), (B, n, Q, H')
    if dropout > 0.0:
        a_x, a_y = F.dropout(a_x, p=dropout), F.dropout(a_y, p=dropout)
    v = proj.split_heads(proj.v(grid.value))  # (B, n, H', W', d): projected after pooling
    return proj.out(rcda_combine(a_x, a_y, v).movedim(1, -2).flatten(-2))  # (B, Q, C)


class SeparableEnact:
    """Separable ENACT, mixed into the ``nn.Module`` of an RCDA self-attention (it has no
    ``__init__``: the module calls :meth:`configure_clustering` in its own, after its projections,
    and has an ``embed_dim``).

    It gives the module two clusterings, ``cluster_x`` (columns) and ``cluster_y`` (rows), whose
    parameters are the module's ``cluster_{x,y}.w_prob.*``; :meth:`attend_clustered`, the
    attention of pooled keys clustered per axis; and the statistics of the last call.
    """

    def configure_clustering(self, sigma: int = 3, mode: str = "segments", backend: str = "auto") -> None:
        """(Re)build the two clustering modules ``cluster_x`` (columns) and ``cluster_y`` (rows)."""
        self.cluster_x = EnactClustering(self.embed_dim, sigma, mode, backend)
        self.cluster_y = EnactClustering(self.embed_dim, sigma, mode, backend)
        self.last_num_tokens: Optional[torch.Tensor] = None  # (B,) valid pixels of the last call

    @property
    def sigma(self) -> int:
        return self.cluster_x.sigma

    def attend_clustered(
        self,
        proj: RCDAProjections,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
        key_x: torch.Tensor,
        key_y: torch.Tensor,
        value: torch.Tensor,
        pad_x: Optional[torch.Tensor] = None,
        pad_y: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        """RCDA with separable ENACT: :func:`cluster_grid` then :func:`rcda_on_grid`.

        query_x, query_y (B, Q, C); key_x (B, W, C) column keys and key_y (B, H, C) row keys,
        pooled (not projected); value (B, H, W, C) (not projected); pad_x (B, W), pad_y (B, H)
        bool, True = padded column / row; key_padding_mask (B, H, W) True = padding (counts the
        valid pixels for the statistics); ``dropout`` as :func:`rcda_on_grid`.  Returns
        (B, Q, C), no residual.
        """
        grid = cluster_grid(self.cluster_x, self.cluster_y, key_x, key_y, value, pad_x, pad_y)
        out = rcda_on_grid(proj, query_x, query_y, grid, dropout)
        b, h, w, _ = value.shape
        self.last_num_tokens = (torch.full((b,), h * w, device=value.device) if key_padding_mask is None
                                else (~key_padding_mask).sum((1, 2)).detach())
        return out

    def statistics(self) -> dict:
        """Of the last call, means over the images (floats; syncs on GPU):
        ``clusters_per_image`` M = H' W', ``compression`` N / M (N: valid pixels),
        ``column_clusters`` W', ``row_clusters`` H', ``column_ratio`` W' / W, ``row_ratio`` H' / H
        (W, H: the image's valid columns / rows)."""
        cx, cy = self.cluster_x, self.cluster_y
        if self.last_num_tokens is None or cx.last_num_clusters is None or cy.last_num_clusters is None:
            return {}
        mx, my = cx.last_num_clusters.double(), cy.last_num_clusters.double()
        wx, hy = cx.last_num_tokens.double(), cy.last_num_tokens.double()
        m = mx * my
        n = self.last_num_tokens.double()
        return {
            "clusters_per_image": float(m.mean()),
            "compression": float((n / m).mean()),
            "column_clusters": float(mx.mean()),
            "row_clusters": float(my.mean()),
            "column_ratio": float((mx / wx).mean()),
            "row_ratio": float((my / hy).mean()),
        }
