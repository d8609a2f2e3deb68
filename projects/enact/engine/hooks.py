"""A hook that puts ENACT's cluster statistics into detectron2's EventStorage (and so into
metrics.json, TensorBoard and the console)."""
from typing import List, Tuple

from detectron2.engine import HookBase
from torch import nn

__all__ = ["EnactStatsHook", "enact_modules"]


def enact_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every ENACT layer in ``model``, in registration order: anything with
    ``statistics()`` and its own clustering (``EnactAttention.clustering``, or
    ``EnactRCDAEncoderLayer.cluster_x`` / ``cluster_y``)."""
    model = getattr(model, "module", model)  # unwrap DDP
    return [
        (n, m) for n, m in model.named_modules()
        if hasattr(m, "statistics") and (hasattr(m, "clustering") or hasattr(m, "cluster_x"))
    ]


class EnactStatsHook(HookBase):
    """Every ``period`` iterations: ``enact/clusters_per_image`` and ``enact/compression`` (mean
    over layers) and the same per layer (``enact/layer{i}/...``)."""

    def __init__(self, model: nn.Module, period: int = 20):
        self._modules = enact_modules(model)
        self._period = period

    def after_step(self):
        if not self._modules or (self.trainer.iter + 1) % self._period:
            return
        storage = self.trainer.storage
        totals = {}
        for i, (_, m) in enumerate(self._modules):
            stats = m.statistics()
            for key, value in stats.items():
                storage.put_scalar(f"enact/layer{i}/{key}", value, smoothing_hint=False)
                totals.setdefault(key, []).append(value)
        for key, values in totals.items():
            storage.put_scalar(f"enact/{key}", sum(values) / len(values), smoothing_hint=False)
