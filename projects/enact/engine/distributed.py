"""Several processes on CPUs (gloo) as on GPUs (NCCL), without patching detectron2.

detectron2's ``launch`` picks the backend from ``torch.cuda.is_available()`` (NCCL on any machine
with a GPU, even for a CPU model; it also asserts one GPU per process and calls
``torch.cuda.set_device``), and its ``create_ddp_model`` passes ``device_ids=[local_rank]``, which
DistributedDataParallel refuses for a CPU module.  Here the backend follows the *training
device*: ``device="cpu"`` -> gloo, no GPU touched; ``device="cuda"`` -> NCCL, one GPU per
process, as detectron2 does.

    launch(main, num_processes, device="cpu", dist_url="auto", args=(args,))
    model = create_ddp_model(model, broadcast_buffers=False)   # device_ids only for CUDA modules
    loader = instantiate_loader(cfg.dataloader.train)           # dataset files written once
"""
import contextlib
from collections import abc
import logging
import os
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["backend_for_device", "create_ddp_model", "instantiate_loader", "launch", "local_main_first"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def backend_for_device(device: str) -> str:
    """"nccl" for a CUDA training device, "gloo" otherwise (CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    main_func: Callable,
    num_processes: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args=(),
    device: str = "cuda",
    timeout: timedelta = DEFAULT_TIMEOUT,
    threads_per_process: Optional[int] = None,
):
    """detectron2's ``launch`` with the backend chosen by ``device`` instead of by whether the
    machine has a GPU.  ``num_processes`` per machine (``--num-gpus``); with one process in all,
    ``main_func(*args)`` runs in this process.

    On CPU each process gets ``threads_per_process`` intra-op threads (default: the machine's
    cores divided among its processes, unless ``OMP_NUM_THREADS`` is set), so that N processes
    do not each start one thread per core.
    """
    world_size = num_machines * num_processes
    if world_size <= 1:
        return main_func(*args)
    backend = backend_for_device(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} needs CUDA, which is not available; use train.device=cpu")
        if num_processes > torch.cuda.device_count():
            raise RuntimeError(f"{num_processes} processes but {torch.cuda.device_count()} GPU(s) on this machine")
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto (or None) works on one machine only")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if backend == "gloo" and threads_per_process is None and "OMP_NUM_THREADS" not in os.environ:
        threads_per_process = max(1, (os.cpu_count() or 1) // num_processes)
    mp.start_processes(
        _distributed_worker,
        nprocs=num_processes,
        args=(main_func, world_size, num_processes, machine_rank, dist_url, args, backend, timeout,
              threads_per_process),
        daemon=False,
    )


def _distributed_worker(local_rank, main_func, world_size, num_processes, machine_rank, dist_url, args,
                        backend, timeout, threads_per_process):
    global_rank = machine_rank * num_processes + local_rank
    if threads_per_process:
        torch.set_num_threads(threads_per_process)
    try:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank,
                                timeout=timeout)
    except Exception:
        logger.error("Process group URL: %s", dist_url)
        raise
    comm.create_local_process_group(num_processes)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
        # every process done before the groups go: a gloo peer torn down while another still
        # talks to it aborts that one ("terminate called without an active exception")
        comm.synchronize()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _module_device_type(model: torch.nn.Module) -> str:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device.type
    return "cpu"


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs):
    """detectron2's ``create_ddp_model`` for CPU modules too: the model itself with one process;
    else DistributedDataParallel with ``device_ids=[local_rank]`` for a CUDA module and none for a
    CPU one (DDP rejects device_ids there).  ``fp16_compression`` adds the fp16 all-reduce hook."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and _module_device_type(model) == "cuda":
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


@contextlib.contextmanager
def local_main_first():
    """The body runs on each machine's local rank 0 first, then on the other processes (a global
    barrier in between): files that the body writes (the shapes dataset, generated on first use)
    are written once, not by several processes at the same time.  A no-op with one process; every
    process must enter it, and the body must not communicate with the other processes (they wait
    at a barrier meanwhile): building a data loader does (detectron2's training sampler agrees on
    a shared seed), see :func:`instantiate_loader`."""
    if comm.get_world_size() == 1:
        yield
        return
    first = comm.get_local_rank() == 0
    if not first:
        comm.synchronize()
    try:
        yield
    finally:
        if first:  # also on an error: the others then fail on their own instead of waiting
            comm.synchronize()


def instantiate_loader(loader_cfg):
    """``instantiate(loader_cfg)`` with its ``dataset`` entry built first under
    :func:`local_main_first` (a generated dataset is written by one process per machine; the
    loader itself, whose sampler talks to the other processes, is built by all together).  With
    one process, or a config without a ``dataset`` entry, plain ``instantiate``."""
    from detectron2.config import instantiate
    from detectron2.utils.registry import locate

    if comm.get_world_size() == 1 or not isinstance(loader_cfg, abc.Mapping) or "_target_" not in loader_cfg \
            or "dataset" not in loader_cfg:
        return instantiate(loader_cfg)
    with local_main_first():
        dataset = instantiate(loader_cfg["dataset"])
    kwargs = {k: instantiate(v) for k, v in loader_cfg.items() if k not in ("_target_", "dataset")}
    target = instantiate(loader_cfg["_target_"])
    if isinstance(target, str):
        target = locate(target)
    return target(dataset=dataset, **kwargs)
