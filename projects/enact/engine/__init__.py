"""Training pieces on top of detectron2's engine: a trainer with AMP and gradient clipping,
a hook that logs ENACT's (and ACT's) cluster statistics, the schedule / optimizer helpers,
several processes on CPUs (gloo) or GPUs (NCCL), reproducibility settings, and the seed sweep's
metrics parsing and tables (:mod:`.sweep`, imported on use)."""
from .distributed import backend_for_device, create_ddp_model, instantiate_loader, launch, local_main_first
from .hooks import EnactStatsHook, act_modules, combine_statistics, describe_enact_runtime, enact_modules
from .reproducibility import configure_determinism, describe_rng_setup, preserved_rng
from .schedule import backbone_lr_factor, epochs_to_iters, step_lr_multiplier
from .trainer import DetrTrainer
