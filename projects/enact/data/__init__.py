"""Data for training and evaluating the detectors: the synthetic "shapes" dataset, COCO 2017
registration and file checks, DETR's augmentation and mappers."""

from .coco import COCO_2017_SPLITS, check_coco_files, check_dataset_available, register_coco
from .subset import first_items
from .synthetic import (
    SHAPES_CLASSES,
    SHAPES_COLORS,
    default_shapes_root,
    generate_shapes,
    register_shapes,
    shapes_metadata,
)
from .transforms import (
    DETR_MIN_SIZES,
    RandomChoice,
    build_detr_mapper,
    detr_test_augmentation,
    detr_train_augmentation,
)

__all__ = [
    "COCO_2017_SPLITS",
    "DETR_MIN_SIZES",
    "RandomChoice",
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "build_detr_mapper",
    "check_coco_files",
    "check_dataset_available",
    "default_shapes_root",
    "detr_test_augmentation",
    "detr_train_augmentation",
    "first_items",
    "generate_shapes",
    "register_coco",
    "register_shapes",
    "shapes_metadata",
]
