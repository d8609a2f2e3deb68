"""Pictures of what ENACT does (matplotlib, Agg backend): detections and ground truth on the
input image; per encoder layer the self-information map h before smoothing (as the paper's
Fig. 3), the clusters as coloured regions of the feature grid and the smoothed 1-D signal with
its curvature-sign runs; the statistics plot; an index.html.  Inputs are
:class:`~projects.enact.analysis.runner.ImageRecord` and :func:`~.stats.summarize` outputs."""
import html
import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .stats import inside_boxes  # noqa: E402

__all__ = [
    "save_detections",
    "save_layer_maps",
    "save_overview",
    "save_signal",
    "save_stats_plot",
    "write_index",
]

# ground-truth boxes: one colour per box, the same on the image and on the maps (as in Fig. 3)
_GT_COLOURS = ["#00e5ff", "#76ff03", "#ffea00", "#ff40ff", "#ff9100", "#2979ff", "#ffffff", "#00c853"]
_PRED_COLOUR = "#ff1744"
# clusters: tab20 reordered so that consecutive cluster ids (neighbouring runs) differ in hue
_TAB20 = plt.get_cmap("tab20").colors
CLUSTER_CMAP = ListedColormap([_TAB20[i] for i in list(range(0, 20, 2)) + list(range(1, 20, 2))], name="enact_clusters")
CLUSTER_CMAP.set_bad("#d0d0d0")
_SIGN_COLOURS = {True: "#ff9800", False: "#3f51b5"}


def _label(classes: Optional[Sequence[str]], c: int) -> str:
    return classes[c] if classes is not None and 0 <= c < len(classes) else str(int(c))


def _valid_crop(layer):
    """The image's valid rectangle of the feature grid: (rows, cols)."""
    return int(layer.valid.any(1).sum()), int(layer.valid.any(0).sum())


def _extent(record, layer):
    rows, cols = _valid_crop(layer)
    return (0, cols * record.cell[1], rows * record.cell[0], 0)


def _draw_gt(ax, record, classes, text=True, lw=1.6):
    for i, (box, c) in enumerate(zip(record.gt_boxes, record.gt_classes)):
        x0, y0, x1, y1 = box
        colour = _GT_COLOURS[i % len(_GT_COLOURS)]
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=lw, ls="--"))
        if text:
            ax.text(x0, y1, _label(classes, c), color="black", fontsize=6, va="top",
                    bbox=dict(fc=colour, ec="none", pad=0.5, alpha=0.8))


def _draw_detections(ax, record, classes, score_threshold):
    ax.imshow(record.image)
    keep = record.scores >= score_threshold
    for box, s, c in zip(record.pred_boxes[keep], record.scores[keep], record.pred_classes[keep]):
        x0, y0, x1, y1 = box
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=_PRED_COLOUR, lw=1.4))
        ax.text(x0, y0, f"{_label(classes, c)} {s:.2f}", color="white", fontsize=6, va="bottom",
                bbox=dict(fc=_PRED_COLOUR, ec="none", pad=0.5, alpha=0.8))
    _draw_gt(ax, record, classes)
    ax.set_title(f"{int(keep.sum())} predictions (solid, score >= {score_threshold:g}), "
                 f"{len(record.gt_boxes)} ground truth (dashed)", fontsize=8)
    ax.set_axis_off()


def _draw_information(ax, record, layer):
    rows, cols = _valid_crop(layer)
    h = np.where(layer.valid, layer.information, np.nan)[:rows, :cols]
    im = ax.imshow(h, cmap="inferno", extent=_extent(record, layer), interpolation="nearest")
    _draw_gt(ax, record, None, text=False, lw=1.2)
    ax.set_xlim(0, cols * record.cell[1]), ax.set_ylim(rows * record.cell[0], 0)
    ax.set_axis_off()
    return im


def _draw_clusters(ax, record, layer):
    rows, cols = _valid_crop(layer)
    ids = layer.cluster_ids.astype(np.float64)
    ids = np.where(layer.valid & (layer.cluster_ids >= 0), ids % CLUSTER_CMAP.N, np.nan)[:rows, :cols]
    ax.imshow(ids, cmap=CLUSTER_CMAP, vmin=0, vmax=CLUSTER_CMAP.N, extent=_extent(record, layer), interpolation="nearest")
    _draw_gt(ax, record, None, text=False, lw=1.2)
    ax.set_xlim(0, cols * record.cell[1]), ax.set_ylim(rows * record.cell[0], 0)
    ax.set_axis_off()


def _layer_numbers(layer):
    n = int(layer.valid.sum())
    m = int(np.unique(layer.cluster_ids[layer.valid & (layer.cluster_ids >= 0)]).size)
    return n, m


def _finish(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def save_detections(path: str, record, classes=None, score_threshold: float = 0.5) -> str:
    """The input image (as the model saw it) with predicted and ground-truth boxes."""
    H, W = record.image.shape[:2]
    fig, ax = plt.subplots(figsize=(max(4.0, 6.0 * W / max(H, W)), max(4.0, 6.0 * H / max(H, W))))
    _draw_detections(ax, record, classes, score_threshold)
    return _finish(fig, path)


def save_layer_maps(path: str, record, index: int) -> str:
    """Layer ``index``: the self-information map h before smoothing (H x W heat map, bright =
    more information) and the clusters (runs of the row-major token order) as coloured regions,
    ground-truth boxes dashed on both."""
    layer = record.layers[index]
    rows, cols = _valid_crop(layer)
    n, m = _layer_numbers(layer)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.0 * rows / max(cols, 1) + 0.8))
    im = _draw_information(axes[0], record, layer)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.02, label="h = -p log2 p")
    axes[0].set_title(f"layer {index}: self-information h before smoothing ({rows} x {cols} tokens)", fontsize=8)
    _draw_clusters(axes[1], record, layer)
    axes[1].set_title(f"layer {index}: {m} clusters of {n} tokens (N/M = {n / max(m, 1):.2f})", fontsize=8)
    fig.suptitle(f"{record.name}  ({layer.name})", fontsize=8)
    return _finish(fig, path)


def _runs(flags: np.ndarray):
    """(start, stop, value) of the maximal runs of equal values."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts, stops = np.r_[0, edges], np.r_[edges, flags.size]
    return [(int(a), int(b), flags[a]) for a, b in zip(starts, stops)]


def save_signal(path: str, record, index: int) -> str:
    """Layer ``index``'s 1-D signal along the flattened valid tokens: h and the smoothed h~, with
    the runs of equal curvature sign s shaded; strips below: the clusters and the tokens inside
    a ground-truth box; dotted lines: feature-map rows."""
    layer = record.layers[index]
    rows, cols = _valid_crop(layer)
    valid = layer.valid
    h, smoothed, sign, ids = layer.information[valid], layer.smoothed[valid], layer.sign[valid], layer.cluster_ids[valid]
    inside = inside_boxes(valid.shape, record.cell, record.gt_boxes)[valid]
    x = np.arange(h.size)
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(14, 4.2), sharex=True, gridspec_kw=dict(height_ratios=(5, 1), hspace=0.05))
    runs = _runs(sign)
    for a, b, s in runs:
        ax.axvspan(a - 0.5, b - 0.5, color=_SIGN_COLOURS[bool(s)], alpha=0.18, lw=0)
    for r in range(1, rows):
        ax.axvline(r * cols - 0.5, color="grey", lw=0.5, ls=":")
    ax.plot(x, h, color="0.45", lw=0.7, label="h (before smoothing)")
    ax.plot(x, smoothed, color="black", lw=1.3, label="smoothed h~")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + [
        patches.Patch(color=_SIGN_COLOURS[True], alpha=0.35, label="s = 1 ([-1, 2, -1] * h~ > 0)"),
        patches.Patch(color=_SIGN_COLOURS[False], alpha=0.35, label="s = 0"),
    ], fontsize=7, loc="upper right", ncol=4)
    n, m = _layer_numbers(layer)
    ax.set_title(f"{record.name}, layer {index}: {len(runs)} curvature-sign runs, {m} clusters, {n} tokens "
                 f"({rows} rows of {cols}, dotted)", fontsize=9)
    ax.set_ylabel("bits")
    ax.set_xlim(-0.5, h.size - 0.5)
    strip.imshow(np.where(ids >= 0, ids % CLUSTER_CMAP.N, np.nan)[None], cmap=CLUSTER_CMAP, vmin=0, vmax=CLUSTER_CMAP.N, aspect="auto",
                 extent=(-0.5, h.size - 0.5, 2, 1), interpolation="nearest")
    strip.imshow(np.where(inside, 1.0, 0.0)[None], cmap="Greys", vmin=0, vmax=1, aspect="auto",
                 extent=(-0.5, h.size - 0.5, 1, 0), interpolation="nearest")
    strip.set_ylim(2, 0)
    strip.set_yticks([0.5, 1.5], ["in GT box", "clusters"], fontsize=7)
    strip.set_xlabel("valid token index (row-major)")
    return _finish(fig, path)


def save_overview(path: str, record, classes=None, score_threshold: float = 0.5) -> str:
    """One figure: detections, then per layer the information map (top) and clusters (bottom)."""
    L = len(record.layers)
    H, W = record.image.shape[:2]
    fig, axes = plt.subplots(2, L + 1, figsize=(3.2 * (L + 1), 6.4 * H / W + 0.8), squeeze=False)
    _draw_detections(axes[0, 0], record, classes, score_threshold)
    axes[0, 0].set_title("predictions (solid), ground truth (dashed)", fontsize=8)
    axes[1, 0].set_axis_off()
    axes[1, 0].text(0, 0.5, "top: self-information h before\nsmoothing (bright = high)\n\n"
                    "bottom: clusters = runs of the\nrow-major token order, one\ncolour per run",
                    fontsize=8, va="center", transform=axes[1, 0].transAxes)
    for i, layer in enumerate(record.layers):
        _draw_information(axes[0, i + 1], record, layer)
        n, m = _layer_numbers(layer)
        axes[0, i + 1].set_title(f"layer {i}: h", fontsize=8)
        _draw_clusters(axes[1, i + 1], record, layer)
        axes[1, i + 1].set_title(f"layer {i}: {m} clusters / {n} tokens", fontsize=8)
    fig.suptitle(record.name, fontsize=9)
    return _finish(fig, path)


def save_stats_plot(path: str, summary: List[Dict], per_image: List[List[Dict]]) -> str:
    """Per layer: the information share in ground-truth boxes vs their token share (mean +- std
    over images); per image and layer the same pair against y = x; clusters per image."""
    L = len(summary)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    x = np.arange(L)
    ax = axes[0]
    boxed = [s for s in summary if s.get("info_share")]
    if boxed:
        idx = np.array([s["layer"] for s in boxed])
        info = [s["info_share"] for s in boxed]
        tok = [s["token_share"] for s in boxed]
        ax.bar(idx - 0.2, [v["mean"] for v in info], 0.4, yerr=[v["std"] for v in info], label="information mass in GT boxes", color="#ff9800", capsize=3)
        ax.bar(idx + 0.2, [v["mean"] for v in tok], 0.4, yerr=[v["std"] for v in tok], label="tokens in GT boxes", color="#3f51b5", capsize=3)
        for s in boxed:
            top = max(s["info_share"]["mean"] + s["info_share"]["std"], s["token_share"]["mean"] + s["token_share"]["std"])
            ax.text(s["layer"], top + 0.02, f"x{s['enrichment']:.2f}", ha="center", fontsize=8)
        ax.set_ylim(0, min(1.15, ax.get_ylim()[1] + 0.1))
    ax.set_xticks(x, [f"layer {i}" for i in x])
    ax.set_ylabel("share (mean over images)")
    ax.set_title(f"share inside ground-truth boxes ({summary[0].get('images_with_boxes', 0)} images)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1]
    for l in range(L):
        pts = np.array([(r[l]["token_share"], r[l]["info_share"]) for r in per_image if r[l]["info_share"] is not None])
        if pts.size:
            ax.scatter(pts[:, 0], pts[:, 1], s=9, alpha=0.6, label=f"layer {l}")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_xlabel("token share in GT boxes"), ax.set_ylabel("information share in GT boxes")
    ax.set_title("per image (above the diagonal: information concentrates on objects)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[2]
    c = [s["clusters_per_image"] for s in summary]
    means = np.array([v["mean"] for v in c])
    ax.bar(x, means, 0.6, yerr=[means - [v["min"] for v in c], [v["max"] for v in c] - means], capsize=3, color="#009688")
    for s in summary:
        ax.text(s["layer"], s["clusters_per_image"]["max"], f"N/M {s['compression']:.2f}\nlen {s['mean_cluster_length']:.2f}",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"layer {i}" for i in x])
    ax.set_ylabel("clusters per image (mean, min-max)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_title(f"clusters per image ({summary[0]['images']} images)", fontsize=9)
    return _finish(fig, path)


def write_index(path: str, entries: List[Dict[str, List[str]]], title: str = "ENACT visualisation") -> str:
    """An HTML page: per entry (``{"name": str, "files": [paths]}``) its PNGs, paths relative to ``path``."""
    root = os.path.dirname(os.path.abspath(path))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif} img{max-width:100%;border:1px solid #ccc;margin:4px}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>"]
    for entry in entries:
        parts.append(f"<h2>{html.escape(entry['name'])}</h2>")
        for f in entry["files"]:
            rel = html.escape(os.path.relpath(os.path.abspath(f), root))
            parts.append(f"<div><a href='{rel}'><img src='{rel}' alt='{rel}'></a></div>")
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
