"""DETR's data augmentation as detectron2 augmentations, and the dataset mappers.

Training (DETR, Carion et al. 2020, ``make_coco_transforms("train")``)::

    RandomHorizontalFlip(0.5)
    then, with probability 0.5 each, either
      (a) RandomResize(min_sizes, max_size)                       # shortest edge, one of min_sizes
      (b) RandomResize(crop_pre_sizes) -> RandomSizeCrop(crop_size) -> RandomResize(min_sizes, max_size)

detectron2 equivalents: ``RandomFlip``, ``ResizeShortestEdge(sample_style="choice")`` and
``RandomCrop("absolute_range", crop_size)`` (height and width drawn independently in
``[min(side, lo), min(side, hi)]``, like DETR's RandomSizeCrop).  :class:`RandomChoice` picks one
of the two branches per image.  Test: ``ResizeShortestEdge(min_size, max_size)``.

The mapper is detectron2's :class:`~detectron2.data.DatasetMapper`: at training it drops crowd
annotations, transforms the boxes with the image (flip mirrors them, crop clips them), and drops
the boxes left empty; at test it keeps only the image (evaluation reads the json).  Images are
read as RGB (``image_format="RGB"``): the model's ``pixel_mean``/``pixel_std`` must be in RGB order.
"""

from typing import List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

__all__ = [
    "DETR_MIN_SIZES",
    "RandomChoice",
    "detr_train_augmentation",
    "detr_test_augmentation",
    "build_detr_mapper",
]

DETR_MIN_SIZES = tuple(range(480, 801, 32))  # 480, 512, ..., 800


class RandomChoice(T.Augmentation):
    """Apply one of several augmentations (each an Augmentation or a list of them, applied in
    order), chosen at random per call with probabilities ``probs`` (uniform by default).

    Uses numpy's global random state, like detectron2's own augmentations.
    """

    def __init__(self, branches: Sequence, probs: Optional[Sequence[float]] = None):
        super().__init__()
        if len(branches) == 0:
            raise ValueError("RandomChoice needs at least one branch")
        branches = [
            T.AugmentationList(list(b)) if isinstance(b, (list, tuple)) else b for b in branches
        ]
        if probs is None:
            probs = [1.0 / len(branches)] * len(branches)
        if len(probs) != len(branches) or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ValueError(f"probs {probs} do not fit {len(branches)} branches")
        probs = [float(p) / float(sum(probs)) for p in probs]
        self._init(locals())

    def get_transform(self, *args):  # pragma: no cover - __call__ is used instead
        raise NotImplementedError("RandomChoice needs the whole AugInput: call it on one")

    def __call__(self, aug_input) -> T.Transform:
        # Branches may resize then crop: each step must see the output of the previous one, so
        # the chosen branch is applied to the AugInput (like AugmentationList does).
        u = self._rand_range()
        idx = int(np.searchsorted(np.cumsum(self.probs), u, side="right"))
        idx = min(idx, len(self.branches) - 1)
        return self.branches[idx](aug_input)


def detr_train_augmentation(
    min_sizes: Sequence[int] = DETR_MIN_SIZES,
    max_size: int = 1333,
    crop_pre_sizes: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
    flip_prob: float = 0.5,
    crop_prob: float = 0.5,
) -> List[T.Augmentation]:
    """DETR's training augmentation: flip, then multi-scale resize or resize-crop-resize.

    Args:
        min_sizes: choices of the shortest edge of the final resize.
        max_size: longest edge cap of the final resize.
        crop_pre_sizes: choices of the shortest edge before the crop (no cap).
        crop_size: (min, max) height and width of the crop, in pixels.
        flip_prob: probability of the horizontal flip.
        crop_prob: probability of the crop branch.
    """
    resize = T.ResizeShortestEdge(
        short_edge_length=tuple(min_sizes), max_size=max_size, sample_style="choice"
    )
    crop_branch = [
        T.ResizeShortestEdge(short_edge_length=tuple(crop_pre_sizes), sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(crop_size)),
        T.ResizeShortestEdge(short_edge_length=tuple(min_sizes), max_size=max_size, sample_style="choice"),
    ]
    return [
        T.RandomFlip(prob=flip_prob, horizontal=True, vertical=False),
        RandomChoice([resize, crop_branch], probs=[1.0 - crop_prob, crop_prob]),
    ]


def detr_test_augmentation(min_size: int = 800, max_size: int = 1333) -> List[T.Augmentation]:
    """DETR's test resize: shortest edge ``min_size``, longest at most ``max_size``."""
    return [T.ResizeShortestEdge(short_edge_length=min_size, max_size=max_size, sample_style="choice")]


def build_detr_mapper(
    is_train: bool,
    augmentations: Optional[Sequence[T.Augmentation]] = None,
    image_format: str = "RGB",
    **aug_kwargs,
) -> DatasetMapper:
    """detectron2's DatasetMapper with DETR's augmentation.

    ``augmentations=None`` builds :func:`detr_train_augmentation` (``is_train``) or
    :func:`detr_test_augmentation` from ``aug_kwargs`` (e.g. ``min_sizes=(128, 160, 192),
    max_size=256`` for the synthetic dataset).
    """
    if augmentations is None:
        build = detr_train_augmentation if is_train else detr_test_augmentation
        augmentations = build(**aug_kwargs)
    elif aug_kwargs:
        raise TypeError(f"augmentations given: unexpected {sorted(aug_kwargs)}")
    return DatasetMapper(
        is_train=is_train,
        augmentations=list(augmentations),
        image_format=image_format,
        use_instance_mask=False,
        use_keypoint=False,
    )
