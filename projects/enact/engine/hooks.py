"""A hook that puts ENACT's (and ACT's) cluster statistics into detectron2's EventStorage (and so
into metrics.json, TensorBoard and the console), combined over the training processes."""
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

__all__ = ["EnactStatsHook", "act_modules", "enact_modules", "combine_statistics"]


def enact_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every ENACT layer in ``model``, in registration order: anything with
    ``statistics()`` and its own clustering (``EnactAttention.clustering``, or
    ``EnactRCDAEncoderLayer.cluster_x`` / ``cluster_y``)."""
    model = getattr(model, "module", model)  # unwrap DDP
    return [
        (n, m) for n, m in model.named_modules()
        if hasattr(m, "statistics") and (hasattr(m, "clustering") or hasattr(m, "cluster_x"))
    ]


def act_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every ACT layer (``ActAttention``: ``statistics()`` and E2LSH
    projections ``hash_a``), MTKD's ACT twins included, in registration order."""
    model = getattr(model, "module", model)
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "statistics") and hasattr(m, "hash_a")]


def _layer_statistics(module: nn.Module) -> Dict[str, float]:
    """``module.statistics()`` (means of the last call) plus, where the module keeps its last
    cluster counts (``last_num_clusters``: per image for ENACT, per image and head for ACT), their
    minimum and maximum (separable ENACT-RCDA: its statistics only)."""
    stats = {k: float(v) for k, v in module.statistics().items()}
    counts = getattr(module, "last_num_clusters", None)  # ACT
    if counts is None:  # EnactAttention: its clustering's
        counts = getattr(getattr(module, "clustering", None), "last_num_clusters", None)
    if stats and isinstance(counts, torch.Tensor) and counts.numel():
        stats["clusters_min"] = float(counts.min())
        stats["clusters_max"] = float(counts.max())
    return stats


def combine_statistics(per_process: List[Dict[str, float]]) -> Dict[str, float]:
    """One dict from every process's ``{name: value}``: ``*_min`` keys the minimum, ``*_max`` the
    maximum, the others the mean over the processes that have the key (each process holds the
    same number of images: detectron2 splits ``total_batch_size`` evenly)."""
    values: Dict[str, List[float]] = {}
    for stats in per_process:
        for key, value in stats.items():
            values.setdefault(key, []).append(float(value))
    combined = {}
    for key, vals in values.items():
        if key.endswith("_min"):
            combined[key] = min(vals)
        elif key.endswith("_max"):
            combined[key] = max(vals)
        else:
            combined[key] = sum(vals) / len(vals)
    return combined


class EnactStatsHook(HookBase):
    """Every ``period`` iterations, for ENACT layers under ``enact/`` and ACT layers under
    ``act/``: per layer ``{prefix}/layer{i}/clusters_per_image``, ``.../compression`` (N / M, or
    ACT's L / C), ``.../clusters_min`` and ``.../clusters_max``; over layers
    ``{prefix}/clusters_per_image`` and ``{prefix}/compression`` (means of the layers).

    With several processes every process must run the hook (it all-gathers): each layer's values
    are the mean over the processes' last batches (min / max for the extremes), so metrics.json
    describes all images of the step, not rank 0's only.
    """

    def __init__(self, model: nn.Module, period: int = 20):
        self._groups = [("enact", enact_modules(model)), ("act", act_modules(model))]
        self._period = period

    def _local_statistics(self) -> Dict[str, float]:
        local = {}
        for prefix, modules in self._groups:
            for i, (_, m) in enumerate(modules):
                for key, value in _layer_statistics(m).items():
                    local[f"{prefix}/layer{i}/{key}"] = value
        return local

    def after_step(self):
        if not any(modules for _, modules in self._groups) or (self.trainer.iter + 1) % self._period:
            return
        local = self._local_statistics()
        per_process = comm.all_gather(local) if comm.get_world_size() > 1 else [local]
        combined = combine_statistics(per_process)
        storage = self.trainer.storage
        for prefix, modules in self._groups:
            totals: Dict[str, List[float]] = {}
            for i in range(len(modules)):
                layer = f"{prefix}/layer{i}/"
                for name, value in combined.items():
                    if name.startswith(layer):
                        key = name[len(layer):]
                        storage.put_scalar(name, value, smoothing_hint=False)
                        if key in ("clusters_per_image", "compression"):
                            totals.setdefault(key, []).append(value)
            for key, vals in totals.items():
                storage.put_scalar(f"{prefix}/{key}", sum(vals) / len(vals), smoothing_hint=False)


def describe_enact_runtime(model: nn.Module, device, amp: bool = False, amp_dtype=None) -> Optional[str]:
    """One line saying how the ENACT layers of ``model`` will run on ``device``: how many, their
    enact_ops backend and whether the compiled kernels serve it (the extension file), the dtype of
    steps 1-5 and of steps 6-8 (autocast's under ``amp``), and the attention kernel.  None when
    the model has no ENACT layer.  Asking may warn (once) that the reference path will run."""
    import enact_ops

    layers = enact_modules(model)
    if not layers:
        return None
    device = torch.device(device)
    clusterings = [c for _, m in layers for c in (getattr(m, "clustering", None), getattr(m, "cluster_x", None)) if c is not None]
    backends = sorted({getattr(c, "backend", "auto") for c in clusterings})
    compiled = [enact_ops.use_compiled(b, device) for b in backends]
    where = enact_ops.extension_status()["extension_file"] if any(compiled) else "the pure-PyTorch reference"
    kernels = sorted({getattr(m, "attn_implementation", "sdpa") for _, m in layers})
    params = next(iter(model.parameters()), None)
    dtype = amp_dtype if amp else (params.dtype if params is not None else torch.float32)
    dtype = str(dtype).replace("torch.", "")
    return (f"ENACT: {len(layers)} layers ({', '.join(sorted({type(m).__name__ for _, m in layers}))}), backend "
            f"{'/'.join(backends)} on {device.type}: {'compiled kernels' if all(compiled) else 'REFERENCE path'} "
            f"({where}); steps 1-5 in float32, steps 6-8 in {dtype}{' (autocast)' if amp else ''}; "
            f"attention {'/'.join(kernels)}")
