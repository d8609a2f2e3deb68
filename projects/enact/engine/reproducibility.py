"""Same config, ``train.seed`` and thread count on the same machine -> the same losses and AP.

What makes a run repeatable (tools/train_net.py):

* ``default_setup`` seeds Python's ``random``, NumPy and torch with ``train.seed + rank``
  (``train.seed < 0``: a random seed, logged); the model is built after that, so its
  initialisation is fixed.  With several processes DDP copies rank 0's weights to the others.
* The training sampler's shuffle seed is drawn from that seeded NumPy state (the same on every
  rank: rank 0's, through ``comm.shared_random_seed``); data-loader workers are seeded from the
  seeded torch generator (detectron2's ``worker_init_reset_seed``), so the augmentation is fixed
  whatever ``num_workers`` is (but changing ``num_workers`` changes which worker draws what).
* The shapes dataset is generated from its own seed (not ``train.seed``): every seed trains and
  is evaluated on the same images.
* CPU kernels (ENACT's ops included: one thread per segment, no atomics) give the same results
  for the same thread count on the same CPU; a different ``torch.get_num_threads()`` may change
  float sums, and so may another CPU (oneDNN / MKL pick their kernels by the instruction set and
  the vendor): the log line names both.  A changed float sum in step 1 grows over thousands of
  steps into a run as different as another seed's.
* ``train.deterministic=True`` (for GPUs) also sets ``torch.use_deterministic_algorithms`` (warn
  only: an op without a deterministic kernel warns instead of failing), ``cudnn.deterministic``,
  no cudnn benchmark and ``CUBLAS_WORKSPACE_CONFIG``; off by default (slower on GPUs; on CPUs
  training is repeatable without it).

* Evaluation runs inside :func:`preserved_rng` (the test loader draws its seed from the torch
  generator): a run with periodic evaluation trains exactly as one without.

Not repeatable: a run resumed from a checkpoint vs one that was not interrupted (the RNG states
are not checkpointed).
"""
import contextlib
import logging
import os
import random

import numpy as np
import torch

__all__ = ["configure_determinism", "describe_rng_setup", "preserved_rng"]

logger = logging.getLogger(__name__)


def configure_determinism(deterministic: bool) -> None:
    """``deterministic=True``: deterministic algorithms (warn-only), cudnn deterministic without
    benchmark, and cuBLAS's fixed workspace (read when cuBLAS starts: set it before the first
    CUDA matmul, which this is called before).  False leaves torch's settings alone."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def describe_rng_setup(seed: int, rank: int, deterministic: bool) -> str:
    """One log line with what a repeated run must keep equal."""
    return (
        f"seed {seed} + rank {rank}" if seed >= 0 else "seed random (train.seed < 0)"
    ) + (
        f", {torch.get_num_threads()} intra-op threads, deterministic algorithms "
        f"{'on' if deterministic else 'off'}, torch {torch.__version__}, CPU kernels "
        f"{torch.backends.cpu.get_cpu_capability()} on {cpu_model()}"
    )


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "an unknown CPU"


@contextlib.contextmanager
def preserved_rng():
    """Python's, NumPy's, torch's CPU and (when initialised) the current CUDA device's generator
    states are restored on exit: what runs inside draws nothing from the training's streams."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
