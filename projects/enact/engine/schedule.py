"""Learning-rate schedule and optimizer helpers referenced from the LazyConfig files."""
import math

from fvcore.common.param_scheduler import MultiStepParamScheduler

__all__ = ["backbone_lr_factor", "epochs_to_iters", "step_lr_multiplier"]

COCO_TRAIN_IMAGES = 117266  # train2017 images with at least one annotation (detectron2's filter)


def epochs_to_iters(epochs: float, dataset_size: int, batch_size: int) -> int:
    """iterations = ceil(epochs * dataset_size / batch_size)."""
    if epochs <= 0 or dataset_size <= 0 or batch_size <= 0:
        raise ValueError(f"epochs ({epochs}), dataset_size ({dataset_size}) and batch_size ({batch_size}) must be > 0")
    return math.ceil(epochs * dataset_size / batch_size)


def step_lr_multiplier(max_iter: int, drop_fraction: float, gamma: float = 0.1) -> MultiStepParamScheduler:
    """lr x1 until ``drop_fraction * max_iter``, then x gamma (DETR: 200/300, the others 40/50).

    Expressed as a fraction so that overriding ``train.max_iter`` moves the drop with it."""
    if not 0.0 < drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction must be in (0, 1], got {drop_fraction}")
    max_iter = int(max_iter)
    drop = max(1, min(max_iter, round(drop_fraction * max_iter)))
    if drop >= max_iter:
        return MultiStepParamScheduler(values=[1.0], milestones=[], num_updates=max_iter)
    return MultiStepParamScheduler(values=[1.0, gamma], milestones=[drop], num_updates=max_iter)


def backbone_lr_factor(module_name: str) -> float:
    """DETR trains the backbone at 0.1x the transformer's learning rate."""
    return 0.1 if module_name.startswith("backbone.") or module_name == "backbone" else 1.0
