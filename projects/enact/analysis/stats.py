"""ENACT's clustering statistics per image and layer, and their summary over a dataset split
(numpy only).

Per image and layer (:func:`image_layer_stats`):

- ``tokens``: N, the image's valid tokens; ``clusters``: M; ``compression``: N / M;
  ``mean_cluster_length``: clustered tokens / M (= N / M unless uniform mode crops tokens);
- ``info_share``: the share of the information mass (h before smoothing, summed over the valid
  tokens) on tokens inside a ground-truth box, against ``token_share``, the share of the valid
  tokens inside one.  A token is inside when the centre of its cell, in input pixels, lies in a
  box (closed intervals), the cells tiling the padded input: cell (i, j) has its centre at
  ((j + 0.5) * cell_w, (i + 0.5) * cell_h), with cell_h = padded H / h (the geometry of the
  model's nearest-neighbour padding mask).  Pad tokens are excluded from both sums: their h is
  not part of any image's distribution.

If information concentrated on objects, ``info_share`` would exceed ``token_share``; a
uniform p gives info_share = token_share exactly.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["cell_centres", "image_layer_stats", "inside_boxes", "summarize"]


def cell_centres(grid: Tuple[int, int], cell: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray]:
    """Centres (y, x), each (h, w), of the cells of a ``grid`` = (h, w) of ``cell`` = (cell_h,
    cell_w) pixels."""
    h, w = grid
    ys = (np.arange(h, dtype=np.float64) + 0.5) * cell[0]
    xs = (np.arange(w, dtype=np.float64) + 0.5) * cell[1]
    return np.meshgrid(ys, xs, indexing="ij")


def inside_boxes(grid: Tuple[int, int], cell: Tuple[float, float], boxes) -> np.ndarray:
    """(h, w) bool: the cells whose centre lies in at least one of ``boxes`` ((n, 4) absolute
    xyxy in input pixels)."""
    cy, cx = cell_centres(grid, cell)
    inside = np.zeros(grid, dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        inside |= (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
    return inside


def image_layer_stats(
    information: np.ndarray,
    valid: np.ndarray,
    cluster_ids: np.ndarray,
    cell: Tuple[float, float],
    boxes=(),
) -> Dict[str, float]:
    """The statistics of one image in one layer (see the module docstring).

    information, valid, cluster_ids: (h, w) maps of h before smoothing, valid tokens (bool) and
    cluster ids (-1: none); cell: (cell_h, cell_w) in input pixels; boxes: (n, 4) xyxy
    ground-truth boxes in input pixels.  ``info_share`` and ``token_share`` are None for an
    image without a valid token inside a box (they say nothing about objects then)."""
    information = np.asarray(information, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    ids = np.asarray(cluster_ids)
    if information.shape != valid.shape or ids.shape != valid.shape:
        raise ValueError(f"shapes differ: h {information.shape}, valid {valid.shape}, ids {ids.shape}")
    n = int(valid.sum())
    if n == 0:
        raise ValueError("an image without a valid token")
    clustered = ids[valid] >= 0
    m = int(np.unique(ids[valid][clustered]).size)
    inside = inside_boxes(valid.shape, cell, boxes) & valid
    n_in = int(inside.sum())
    mass = float(information[valid].sum())
    mass_in = float(information[inside].sum())
    return {
        "tokens": n,
        "clusters": m,
        "compression": n / m,
        "mean_cluster_length": int(clustered.sum()) / m,
        "tokens_in_boxes": n_in,
        "information": mass,
        "information_in_boxes": mass_in,
        "info_share": mass_in / mass if n_in else None,
        "token_share": n_in / n if n_in else None,
    }


def _spread(values: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def summarize(per_image: List[List[Dict]], names: Optional[Sequence[str]] = None) -> List[Dict]:
    """Per layer, over images: ``per_image[i][l]`` are :func:`image_layer_stats` of image i in
    layer l.  Returns one dict per layer: clusters per image and tokens per image (mean / std /
    min / max), ``compression`` (mean over images of N / M), ``mean_cluster_length`` (mean over
    images), and over the images with a token in a box (``images_with_boxes``): ``info_share``
    and ``token_share`` (mean / std / min / max of the per-image shares), their ratio
    ``enrichment`` = mean info share / mean token share, and ``info_share_pooled`` /
    ``token_share_pooled`` (sums over those images before dividing)."""
    if not per_image:
        raise ValueError("no images")
    layers = len(per_image[0])
    if any(len(row) != layers for row in per_image):
        raise ValueError("images with different numbers of ENACT layers")
    out = []
    for l in range(layers):
        rows = [row[l] for row in per_image]
        boxed = [r for r in rows if r["info_share"] is not None]
        layer = {
            "layer": l,
            "module": None if names is None else names[l],
            "images": len(rows),
            "clusters_per_image": _spread([r["clusters"] for r in rows]),
            "tokens_per_image": _spread([r["tokens"] for r in rows]),
            "compression": float(np.mean([r["compression"] for r in rows])),
            "mean_cluster_length": float(np.mean([r["mean_cluster_length"] for r in rows])),
            "images_with_boxes": len(boxed),
        }
        if boxed:
            info = _spread([r["info_share"] for r in boxed])
            tokens = _spread([r["token_share"] for r in boxed])
            layer.update(
                info_share=info,
                token_share=tokens,
                enrichment=info["mean"] / tokens["mean"],
                info_share_pooled=sum(r["information_in_boxes"] for r in boxed) / sum(r["information"] for r in boxed),
                token_share_pooled=sum(r["tokens_in_boxes"] for r in boxed) / sum(r["tokens"] for r in boxed),
            )
        out.append(layer)
    return out
