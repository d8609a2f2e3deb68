"""Recording ENACT's per-layer intermediates during a forward pass (torch only).

    with capture_enact(model) as cap:
        outputs = model(batch)
    for layer in cap.layers:            # one per EnactClustering call, in call order
        layer.name, layer.information   # (B, N) h before smoothing, on the CPU
        cap.grid_of(layer)              # (h, w) of the feature map it clustered, or None

Every ``EnactClustering`` in ``model`` gets a trace hook (``register_trace_hook``) for the
duration of the ``with`` block; the backbone (when the model has one) gets a forward hook that
records the padded input size and the shapes of its feature maps, so that a layer's N tokens can
be laid out on their H x W grid.  Outside the block the model runs exactly as before.
"""
import contextlib
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..modeling.enact import ClusterTrace, EnactClustering

__all__ = ["EnactCapture", "LayerTrace", "capture_enact"]


class LayerTrace(NamedTuple):
    """One ``EnactClustering`` call; tensors detached, on the CPU."""

    name: str  # the clustering module's name in the model
    information: torch.Tensor  # (B, N) float, h before smoothing
    smoothed: torch.Tensor  # (B, N) float, h~
    sign: torch.Tensor  # (B, N) bool, curvature sign s
    cluster_ids: torch.Tensor  # (B, N) int64, -1 = pad (or cropped)
    valid: torch.Tensor  # (B, N) bool, True = valid token


class EnactCapture:
    """What :func:`capture_enact` recorded: ``layers`` (LayerTrace, in call order),
    ``input_size`` (padded (H, W) of the backbone's last input) and ``feature_shapes`` (the
    (h, w) of each of its feature maps).  ``clear()`` forgets them (e.g. between batches)."""

    def __init__(self):
        self.layers: List[LayerTrace] = []
        self.input_size: Optional[Tuple[int, int]] = None
        self.feature_shapes: List[Tuple[int, int]] = []

    def clear(self) -> None:
        self.layers, self.input_size, self.feature_shapes = [], None, []

    def grid_of(self, layer: LayerTrace) -> Optional[Tuple[int, int]]:
        """(h, w) of the backbone feature map with h * w = the layer's N tokens, or None (no
        backbone recorded, or a clustering over something else, e.g. RCDA's rows)."""
        n = layer.information.shape[1]
        for h, w in self.feature_shapes:
            if h * w == n:
                return h, w
        return None

    def cell_size(self, grid: Tuple[int, int]) -> Optional[Tuple[float, float]]:
        """(height, width) in input pixels of one cell of ``grid`` over the padded input."""
        if self.input_size is None:
            return None
        return self.input_size[0] / grid[0], self.input_size[1] / grid[1]


def _record(capture: EnactCapture, name: str):
    def hook(module: EnactClustering, trace: ClusterTrace) -> None:
        h = trace.information
        valid = torch.ones_like(h, dtype=torch.bool) if trace.valid is None else trace.valid
        capture.layers.append(
            LayerTrace(
                name,
                h.float().cpu(),
                trace.smoothed.float().cpu(),
                trace.sign.cpu(),
                trace.cluster_ids.cpu(),
                valid.cpu(),
            )
        )

    return hook


def _backbone_hook(capture: EnactCapture):
    def hook(module, inputs, output) -> None:
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            capture.input_size = (int(x.shape[-2]), int(x.shape[-1]))
        maps = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else [output]
        capture.feature_shapes = [
            (int(f.shape[-2]), int(f.shape[-1])) for f in maps if isinstance(f, torch.Tensor) and f.dim() == 4
        ]

    return hook


@contextlib.contextmanager
def capture_enact(model: nn.Module):
    """Records every ENACT clustering call of ``model`` inside the block (see the module
    docstring); yields an :class:`EnactCapture`.  Raises ValueError if ``model`` has no
    ``EnactClustering``."""
    model = getattr(model, "module", model)  # unwrap DDP
    capture = EnactCapture()
    names: Dict[nn.Module, str] = {m: n for n, m in model.named_modules() if isinstance(m, EnactClustering)}
    if not names:
        raise ValueError(f"{type(model).__name__} has no EnactClustering module: nothing to capture")
    handles = [m.register_trace_hook(_record(capture, n)) for m, n in names.items()]
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        handles.append(backbone.register_forward_hook(_backbone_hook(capture)))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
