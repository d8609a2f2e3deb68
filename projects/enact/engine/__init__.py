"""Training pieces on top of detectron2's engine: a trainer with AMP and gradient clipping,
a hook that logs ENACT's cluster statistics, and the schedule / optimizer helpers."""
from .hooks import EnactStatsHook, enact_modules
from .schedule import backbone_lr_factor, epochs_to_iters, step_lr_multiplier
from .trainer import DetrTrainer
