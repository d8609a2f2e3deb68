#!/usr/bin/env python
"""Train and evaluate the project's detectors from a detectron2 LazyConfig.

    python tools/train_net.py --config-file configs/detr_r50_300ep_enact.py --num-gpus 8
    python tools/train_net.py --config-file configs/shapes/detr_r18_shapes_enact.py train.max_iter=300
    python tools/train_net.py --config-file CFG --resume                  # continue from last_checkpoint
    python tools/train_net.py --config-file CFG --eval-only train.init_checkpoint=model_final.pth
    DETREX_ROOT=../detrex python tools/train_net.py --config-file configs/detrex/dab_detr_r50_50ep_enact.py train.device=cpu
    python tools/train_net.py --config-file CFG --num-processes 2 train.device=cpu   # 2 CPU processes (gloo)

Uses detectron2's engine throughout: LazyConfig + instantiate, DetectionCheckpointer (periodic
checkpoints, --resume), EvalHook with the config's evaluator (COCOEvaluator), the default writers (console with ETA,
metrics.json, TensorBoard).  ENACT's clusters per image and compression are logged under
``enact/`` (ACT's under ``act/``), combined over the processes.

Several processes: ``--num-gpus N`` (alias ``--num-processes N``) starts N processes per
machine.  The backend follows ``train.device``: NCCL with one GPU per process for ``cuda``,
gloo for ``cpu`` (each process then gets cores / N intra-op threads unless OMP_NUM_THREADS is
set); ``projects.enact.engine.launch`` / ``create_ddp_model`` (DDP without ``device_ids`` for a
CPU model) replace detectron2's, which assume GPUs.  ``dataloader.train.total_batch_size`` is
split over the processes.  The dataset is prepared on each machine's first process before the
others read it.

Reproducibility: ``train.seed`` (+ rank) seeds everything before the model is built; the same
config, seed and thread count on the same machine give the same losses and AP.
``train.deterministic=True`` adds torch's deterministic algorithms (for GPUs).  Evaluation does
not draw from the training's random streams.  See projects/enact/engine/reproducibility.py.

detrex configs (``configs/detrex/``, or detrex's own) run too: ``train.device`` is copied into
``model.device`` (detrex copies it when its config is loaded, so ``train.device=cpu`` alone moves a
detrex model to the CPU), and detrex's ``train.clip_grad`` ({enabled, params: {max_norm,
norm_type}}), ``train.amp`` and ``train.fast_dev_run`` (20 iterations, an evaluation every 10 on
the first 8 test images) are honoured; ``train.model_ema`` and ``train.wandb`` are not supported
(an error if enabled).  DN-DETR's criterion calls ``.cuda()``: it trains on a GPU only.
"""
import argparse
import logging
import os
import sys

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from projects.enact.checkpoint.checkpointer import EnactCheckpointer  # noqa: E402
from projects.enact.data import check_dataset_available  # noqa: E402
from projects.enact.engine import (  # noqa: E402
    DetrTrainer,
    EnactStatsHook,
    configure_determinism,
    create_ddp_model,
    describe_enact_runtime,
    describe_rng_setup,
    launch,
    instantiate_loader,
    preserved_rng,
)

logger = logging.getLogger("enact")


def _dataset_names(loader_cfg):
    dataset = loader_cfg.get("dataset", {}) if loader_cfg is not None else {}
    names = dataset.get("names", None) if hasattr(dataset, "get") else None
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def _check_device(cfg):
    device = cfg.train.get("device", "cuda")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device!r} but CUDA is not available; add `train.device=cpu` to the command")
    return device


def _apply_train_device(cfg):
    """detrex's configs set ``model.device = train.device`` when loaded: redo it after overrides."""
    if "device" in cfg.train and "device" in cfg.model:
        cfg.model.device = cfg.train.device
    for key in ("model_ema", "wandb"):
        if cfg.train.get(key, {}).get("enabled", False):
            raise NotImplementedError(f"train.{key}.enabled=True (a detrex option) is not supported by this train_net")


FAST_DEV_RUN = dict(max_iter=20, eval_period=10, log_period=1)  # as detrex's tools/train_net.py
FAST_DEV_RUN_TEST_IMAGES = 8


def _apply_fast_dev_run(cfg):
    """detrex's ``train.fast_dev_run.enabled=True``: as detrex's train_net, 20 iterations with an
    evaluation every 10 and a log line every iteration; here the evaluations also read only the
    first 8 test images (COCOEvaluator scores the images it was given).  Applied after the
    command line's overrides, so it wins over train.max_iter=...  Returns whether it applied."""
    if not cfg.train.get("fast_dev_run", {}).get("enabled", False):
        return False
    from detectron2.config import LazyCall as L

    from projects.enact.data import first_items

    for key, value in FAST_DEV_RUN.items():
        cfg.train[key] = value
    cfg.dataloader.test.dataset = L(first_items)(items=cfg.dataloader.test.dataset, count=FAST_DEV_RUN_TEST_IMAGES)
    return True


def _clip_grad(cfg):
    """(max_norm, norm_type): detrex's ``train.clip_grad`` or the project's ``train.clip_max_norm``."""
    clip = cfg.train.get("clip_grad", None)
    if clip is not None:
        if not clip.get("enabled", False):
            return 0.0, 2.0
        params = clip.get("params", {})
        return float(params.get("max_norm", 0.1)), float(params.get("norm_type", 2.0))
    return float(cfg.train.get("clip_max_norm", 0.1)), 2.0


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    for name in _dataset_names(cfg.dataloader.test):
        check_dataset_available(name)
    loader = instantiate_loader(cfg.dataloader.test)
    evaluator = instantiate(cfg.dataloader.evaluator)
    results = inference_on_dataset(model, loader, evaluator)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _evaluate_preserving_rng(cfg, model):
    """Periodic evaluation without touching the training's random streams (the test loader
    draws its seed from torch's generator): training with eval_period=K equals training without."""
    with preserved_rng():
        return do_test(cfg, model)


def do_train(args, cfg):
    device = _check_device(cfg)
    model = instantiate(cfg.model).to(device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    for name in _dataset_names(cfg.dataloader.train):
        check_dataset_available(name)
    train_loader = instantiate_loader(cfg.dataloader.train)  # a generated dataset: written by one process
    model = create_ddp_model(model, **cfg.train.get("ddp", {}))
    if comm.get_world_size() > 1:
        logger.info("%d processes (backend %s): %s on %s", comm.get_world_size(), torch.distributed.get_backend(),
                    type(model).__name__, device)
    amp = cfg.train.get("amp", {})
    clip_max_norm, clip_norm_type = _clip_grad(cfg)
    trainer = DetrTrainer(
        model, train_loader, optimizer,
        clip_max_norm=clip_max_norm, clip_norm_type=clip_norm_type,
        amp=amp.get("enabled", False), amp_dtype=amp.get("dtype", "float16"), device=device,
    )
    if trainer.amp and amp.get("dtype", "float16") == "float16" and trainer.amp_dtype != torch.float16:
        logger.warning("train.amp.dtype=float16 runs as bfloat16 on %s (float16 autocast is for CUDA)", device)
    runtime = describe_enact_runtime(model, device, trainer.amp, trainer.amp_dtype)
    if runtime is not None:
        logger.info(runtime)
    checkpointer = EnactCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        EnactStatsHook(model, period=cfg.train.log_period),
        hooks.EvalHook(cfg.train.eval_period, lambda: _evaluate_preserving_rng(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    _apply_train_device(cfg)
    fast_dev_run = _apply_fast_dev_run(cfg)
    deterministic = bool(cfg.train.get("deterministic", False))
    configure_determinism(deterministic)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="enact")
    if fast_dev_run:
        logger.info("train.fast_dev_run.enabled=True: train.max_iter=%d, train.eval_period=%d, train.log_period=%d, "
                    "evaluation on the first %d test images", *FAST_DEV_RUN.values(), FAST_DEV_RUN_TEST_IMAGES)
    logger.info("Random state: %s", describe_rng_setup(int(cfg.train.get("seed", -1)), comm.get_rank(), deterministic))
    if args.eval_only:
        model = instantiate(cfg.model).to(_check_device(cfg))
        model = create_ddp_model(model)
        EnactCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)


def argument_parser():
    """detectron2's parser plus ``--num-processes``, an alias of ``--num-gpus`` (processes per
    machine: GPUs with train.device=cuda, CPU processes with train.device=cpu)."""
    parser = default_argument_parser()
    parser.add_argument("--num-processes", dest="num_gpus", type=int, default=argparse.SUPPRESS,
                        help="processes per machine (same as --num-gpus; CPU processes with train.device=cpu)")
    return parser


def launch_device(args) -> str:
    """train.device of the config with the command line's overrides (decides gloo or NCCL)."""
    if args.num_gpus * args.num_machines <= 1:
        return "cpu"  # one process: no backend needed
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    return str(cfg.train.get("device", "cuda"))


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,), device=launch_device(args))
