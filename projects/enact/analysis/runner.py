"""A trained detector with ENACT run over images for analysis: config and checkpoint loading,
the test-time input pipeline (optionally at another input size), ground truth in input pixels,
and per image the predictions and each ENACT layer's maps on the feature grid (needs
detectron2; used by ``tools/visualize_enact.py`` and ``tools/enact_stats.py``)."""
import logging
import math
import os
from collections.abc import MutableSequence
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from ..checkpoint.checkpointer import EnactCheckpointer
from .capture import capture_enact

__all__ = [
    "ImageRecord",
    "LayerMaps",
    "auto_input_size",
    "dataset_split",
    "feature_stride",
    "image_dicts",
    "load_model",
    "run_images",
    "set_input_size",
    "test_mapper",
    "test_resize",
]

logger = logging.getLogger(__name__)


class LayerMaps(NamedTuple):
    """One ENACT layer on one image, as (h, w) maps over the batch's (padded) feature grid."""

    name: str
    information: np.ndarray  # h before smoothing (pads: not meaningful, see ``valid``)
    smoothed: np.ndarray  # h~
    sign: np.ndarray  # bool curvature sign
    cluster_ids: np.ndarray  # int64, -1 = pad
    valid: np.ndarray  # bool, the image's valid tokens (a top-left rectangle)


class ImageRecord(NamedTuple):
    """One image as the model saw it, its ground truth and predictions (xyxy in input pixels,
    i.e. after the test-time resize) and its ENACT layers."""

    name: str  # a short name for files
    file_name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, resized, unpadded
    gt_boxes: np.ndarray  # (n, 4)
    gt_classes: np.ndarray  # (n,)
    pred_boxes: np.ndarray  # (k, 4), by decreasing score
    scores: np.ndarray  # (k,)
    pred_classes: np.ndarray  # (k,)
    cell: Tuple[float, float]  # (cell_h, cell_w) of the feature grid in input pixels
    layers: List[LayerMaps]


# ---------------------------------------------------------------------- model
def load_model(config_file: str, checkpoint: Optional[str], opts: Sequence[str] = ()):
    """(cfg, model): the LazyConfig with ``opts`` applied, its model on the CPU in eval mode with
    ``checkpoint`` loaded (EnactCheckpointer: original-repo checkpoints are converted)."""
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(opts))
    if "train" in cfg and "device" in cfg.train:
        cfg.train.device = "cpu"
    if "device" in cfg.model:
        cfg.model.device = "cpu"
    model = instantiate(cfg.model).to("cpu").eval()
    if checkpoint:
        EnactCheckpointer(model).load(checkpoint)
    else:
        logger.warning("no checkpoint: the model's weights are its random initialisation")
    return cfg, model


def feature_stride(model) -> Optional[int]:
    """The output stride of the feature map the transformer reads (detectron2 backbones), or None."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "output_shape"):
        return None
    shapes = backbone.output_shape()
    name = getattr(model, "in_features", None)
    if isinstance(name, (list, tuple)):  # detrex: in_features=["res5"]
        name = name[-1] if name else None
    if name not in shapes:
        name = max(shapes, key=lambda k: shapes[k].stride or 0)
    return shapes[name].stride


# ---------------------------------------------------------------------- inputs
def _augmentations(mapper) -> Optional[list]:
    """The mapper's list of augmentations, to read and replace in place: detectron2's
    ``DatasetMapper`` keeps them in ``.augmentations`` (an AugmentationList), detrex's
    ``DetrDatasetMapper`` in ``.augmentation`` (a list); None for a mapper with neither."""
    augs = getattr(getattr(mapper, "augmentations", None), "augs", None)
    if augs is None and isinstance(getattr(mapper, "augmentation", None), MutableSequence):
        augs = mapper.augmentation  # a list, or the ListConfig that instantiate makes of one
    return augs


def test_resize(mapper) -> Optional[Tuple[int, int]]:
    """(shortest edge, max size) of the mapper's ResizeShortestEdge (the smallest edge choice), or None."""
    for aug in _augmentations(mapper) or []:
        if isinstance(aug, T.ResizeShortestEdge):
            return int(min(aug.short_edge_length)), int(aug.max_size)
    return None


def test_mapper(cfg, input_size: Optional[int] = None):
    """The config's test mapper (see :func:`set_input_size` for ``input_size``)."""
    mapper = instantiate(cfg.dataloader.test.mapper)
    return mapper if input_size is None else set_input_size(mapper, input_size)


def set_input_size(mapper, input_size: int):
    """``mapper`` with its ResizeShortestEdge resizing the shortest edge to ``input_size``, the
    max size scaled in proportion (in place; returns it)."""
    resize = test_resize(mapper)
    if resize is None:
        raise ValueError(f"the test mapper ({type(mapper).__name__}) has no ResizeShortestEdge in its augmentations "
                         "to change the input size of")
    short, max_size = resize
    new_max = math.ceil(max_size * input_size / short)
    augs = _augmentations(mapper)
    for i, aug in enumerate(augs):
        if isinstance(aug, T.ResizeShortestEdge):
            augs[i] = T.ResizeShortestEdge(input_size, max_size=new_max, sample_style="choice")
    return mapper


def auto_input_size(model, mapper, min_tokens: int = 16) -> Optional[int]:
    """The shortest edge (a multiple of the stride) giving the feature grid at least
    ``min_tokens`` tokens on its shorter side, or None when the config's test size already
    does (or the stride or test resize is unknown)."""
    stride, resize = feature_stride(model), test_resize(mapper)
    if stride is None or resize is None or resize[0] >= min_tokens * stride:
        return None
    return min_tokens * stride


def dataset_split(cfg, split: str) -> Tuple[List[Dict], Optional[str]]:
    """The dataset dicts of ``split`` ("val": ``dataloader.test``'s dataset, "train":
    ``dataloader.train``'s) and the registered dataset name whose metadata holds its class
    names (None if not found)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    loader = cfg.dataloader.test if split == "val" else cfg.dataloader.train
    dicts = instantiate(loader.dataset)
    return dicts, _dataset_name(cfg, loader.dataset, split)


def _dataset_name(cfg, dataset, split: str) -> Optional[str]:
    candidates = []
    names = dataset.get("names")
    if names:
        candidates.append(names if isinstance(names, str) else names[0])
    if split == "val":
        try:
            candidates.append(cfg.dataloader.evaluator.dataset_name)
        except Exception:  # no evaluator, or an interpolation that does not resolve
            pass
    if "split" in dataset:  # the shapes dataset: f"{name_prefix}_{split}"
        candidates.append(f"{dataset.get('name_prefix', 'enact_shapes')}_{split}")
    registered = set(DatasetCatalog.list())
    return next((c for c in candidates if isinstance(c, str) and c in registered), None)


def class_names(dataset_name: Optional[str]) -> Optional[List[str]]:
    if dataset_name is None:
        return None
    return list(MetadataCatalog.get(dataset_name).get("thing_classes", []) or []) or None


def image_dicts(paths: Iterable[str]) -> List[Dict]:
    """Dataset-style dicts for image files (no ground truth)."""
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(p)
        out.append({"file_name": p})
    return out


def _ground_truth(d: Dict, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Non-crowd boxes of dataset dict ``d`` as xyxy in the resized input of ``size`` (H, W)."""
    anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
    if not anns:
        return np.zeros((0, 4)), np.zeros((0,), dtype=np.int64)
    boxes = np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns], dtype=np.float64)
    sy, sx = size[0] / d["height"], size[1] / d["width"]  # the test transform is a resize
    return boxes * np.array([sx, sy, sx, sy]), np.array([a["category_id"] for a in anns], dtype=np.int64)


def _rgb(image: torch.Tensor, image_format: str) -> np.ndarray:
    x = image.permute(1, 2, 0).numpy()
    if image_format == "BGR":
        x = x[:, :, ::-1]
    return np.ascontiguousarray(x).astype(np.uint8)


def _name(d: Dict, index: int) -> str:
    stem = os.path.splitext(os.path.basename(d.get("file_name", "image")))[0]
    return f"{index:04d}_{stem}"


# ---------------------------------------------------------------------- run
def run_images(model, mapper, dicts: Sequence[Dict], batch_size: int = 1, progress=None) -> Iterator[ImageRecord]:
    """Runs ``model`` (eval mode, no gradients) over ``dicts`` mapped by ``mapper`` in batches of
    ``batch_size`` and yields one ImageRecord per image, in order.  ``progress(n_done, name)``
    is called after each image.  ENACT calls whose tokens are not a backbone feature grid
    (e.g. separable ENACT-RCDA's rows and columns) are left out, with a warning."""
    image_format = getattr(mapper, "image_format", "BGR")
    warned = False
    for start in range(0, len(dicts), batch_size):
        chunk = dicts[start:start + batch_size]
        mapped = [mapper(dict(d)) for d in chunk]
        inputs = []
        for m in mapped:
            _, h, w = m["image"].shape
            inputs.append({"image": m["image"], "height": h, "width": w})  # predictions in input pixels
        with torch.no_grad(), capture_enact(model) as cap:
            outputs = model(inputs)
        grids = [cap.grid_of(layer) for layer in cap.layers]
        if not warned and any(g is None for g in grids):
            skipped = sorted({l.name for l, g in zip(cap.layers, grids) if g is None})
            logger.warning("ENACT calls not on a feature grid left out: %s", ", ".join(skipped))
            warned = True
        layers = [(l, g) for l, g in zip(cap.layers, grids) if g is not None]
        for b, (d, m, out) in enumerate(zip(chunk, mapped, outputs)):
            size = tuple(m["image"].shape[-2:])
            inst = out["instances"].to("cpu")
            gt_boxes, gt_classes = _ground_truth(d, size)
            maps = [
                LayerMaps(
                    l.name,
                    *(t[b].reshape(g).numpy() for t in (l.information, l.smoothed, l.sign, l.cluster_ids, l.valid)),
                )
                for l, g in layers
            ]
            cell = cap.cell_size(layers[0][1]) if layers else (float("nan"), float("nan"))
            record = ImageRecord(
                _name(d, start + b), d.get("file_name", ""), _rgb(m["image"], image_format), gt_boxes, gt_classes,
                inst.pred_boxes.tensor.numpy().astype(np.float64), inst.scores.numpy(),
                inst.pred_classes.numpy(), cell, maps,
            )
            if progress is not None:
                progress(start + b + 1, record.name)
            yield record
