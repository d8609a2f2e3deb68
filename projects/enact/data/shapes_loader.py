"""The synthetic "shapes" dataset as a LazyConfig ``dataset=`` entry: registers (generating the
files on first use) and returns detectron2's dataset dicts."""
from typing import List, Optional

from detectron2.data import get_detection_dataset_dicts

from .synthetic import register_shapes

__all__ = ["shapes_dataset_dicts"]


def shapes_dataset_dicts(
    split: str = "train",
    name_prefix: str = "enact_shapes",
    root: Optional[str] = None,
    num_train: int = 300,
    num_val: int = 50,
    seed: int = 0,
    filter_empty: bool = True,
    **kwargs,
) -> List[dict]:
    """Dicts of ``{name_prefix}_{split}`` (split "train" or "val"); ``kwargs`` go to
    :func:`register_shapes` (image size, object size, number of classes ...)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train_name, val_name = register_shapes(name_prefix, root, num_train, num_val, seed, **kwargs)
    return get_detection_dataset_dicts(train_name if split == "train" else val_name, filter_empty=filter_empty)
