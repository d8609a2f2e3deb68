"""Checkpoint conversion into this project's detectors.

    from projects.enact.checkpoint import convert_state_dict, detect_source
    source = detect_source(state_dict)                       # "detr", "conditional_detr", ...
    new_sd, report = convert_state_dict(state_dict, source, model="detr")

Sources (see :data:`SOURCES`):

* ``"detr"``, ``"conditional_detr"``, ``"anchor_detr"``: the original implementations
  (facebookresearch/detr, Atten4Vis/ConditionalDETR, megvii-research/AnchorDETR), see
  :mod:`.original`;
* ``"detrex"``: detrex checkpoints, converted by ``projects/enact/checkpoint/detrex.py`` when that
  module is present (``convert_detrex(state_dict, model)``, ``detect_detrex(state_dict)``).

``detect_source`` also returns ``"project"`` for a checkpoint already in this project's layout
(nothing to convert).  New sources can be added with :func:`register_source`.

The result of a conversion is a plain state dict plus a :class:`ConversionReport` listing, by
name, the source keys that were not used.  Loading the result (strictly) into the model tells the
project keys that were not filled.  ``tools/convert_checkpoint.py`` does both from the command
line; :class:`~projects.enact.checkpoint.checkpointer.EnactCheckpointer` converts on the fly when
``train.init_checkpoint`` points at a source checkpoint.
"""
import importlib
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from .common import (
    MODEL_KINDS,
    ConversionError,
    ConversionReport,
    check_shapes,
    enact_parameter_names,
    input_format_of,
    load_checkpoint_file,
    model_kind,
    unwrap_state_dict,
)
from .original import ORIGINAL_SOURCES, convert_original, detect_original

__all__ = [
    "SOURCES",
    "MODEL_KINDS",
    "ConversionError",
    "ConversionReport",
    "convert_state_dict",
    "detect_source",
    "register_source",
    "available_sources",
    "check_shapes",
    "enact_parameter_names",
    "input_format_of",
    "load_checkpoint_file",
    "model_kind",
    "unwrap_state_dict",
]

# converter(state_dict, model_kind, input_format) -> (state_dict, report)
Converter = Callable[[Mapping[str, torch.Tensor], Optional[str], str], Tuple[Dict, ConversionReport]]
Detector = Callable[[Mapping[str, torch.Tensor]], Optional[str]]

# name -> (converter, detector or None)
SOURCES: Dict[str, Tuple[Converter, Optional[Detector]]] = {}


def register_source(name: str, convert: Converter, detect: Optional[Detector] = None) -> None:
    """Add a source format.  ``detect(state_dict)`` returns a truthy value when the state dict has
    this format; detectors run in registration order, after the original implementations."""
    SOURCES[name] = (convert, detect)


def _make_original(src: str):
    return lambda state_dict, model=None, input_format="BGR": convert_original(
        state_dict, src, model, input_format
    )


for _name in ORIGINAL_SOURCES:
    register_source(_name, _make_original(_name))


def _detrex_module():
    """``projects.enact.checkpoint.detrex`` if it exists (imported lazily), else None."""
    try:
        return importlib.import_module(".detrex", __name__)
    except ModuleNotFoundError as exc:
        if exc.name in (f"{__name__}.detrex",):
            return None
        raise


def _convert_detrex(state_dict, model=None, input_format="BGR"):
    module = _detrex_module()
    if module is None:
        raise ConversionError(
            "source 'detrex' needs projects/enact/checkpoint/detrex.py, which is not available"
        )
    if model is None:
        model = module.detect_detrex(state_dict)
        if model is None:
            raise ConversionError("cannot tell which detector this detrex checkpoint holds; pass model=")
    return module.convert_detrex(state_dict, model, input_format=input_format)


def _detect_detrex(state_dict) -> Optional[str]:
    module = _detrex_module()
    if module is not None:
        return module.detect_detrex(state_dict)
    # Without the converter, still recognise detrex's layout so that the error is clear.
    if any(".attentions.0." in k or ".ffns.0." in k for k in state_dict):
        return "unknown"
    return None


register_source("detrex", _convert_detrex, _detect_detrex)


def available_sources():
    """Source names accepted by :func:`convert_state_dict`."""
    return sorted(SOURCES)


def _is_project_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    keys = list(state_dict)
    return any(k.startswith("backbone.stem.") or k.startswith("backbone.res") for k in keys) and any(
        k.startswith("transformer.") for k in keys
    )


def detect_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The source format of a state dict: a name of :data:`SOURCES`, or ``"project"`` when the
    keys already follow this project's layout.  Raises :class:`ConversionError` otherwise."""
    state_dict = unwrap_state_dict(state_dict)
    # detrex first: its Anchor DETR shares the original's `transformer.encoder_layers.` names.
    for name, (_, detect) in SOURCES.items():
        if detect is not None and detect(state_dict):
            return name
    found = detect_original(state_dict)
    if found is not None:
        return found
    if _is_project_layout(state_dict):
        return "project"
    sample = ", ".join(list(state_dict)[:5])
    raise ConversionError(
        f"cannot detect the checkpoint format (first keys: {sample}); pass the source explicitly, "
        f"one of {available_sources()}"
    )


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    model: Optional[str] = None,
    input_format: str = "BGR",
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Convert ``state_dict`` (or ``{"model": state_dict}``) from ``source`` ("auto" detects it)
    to the layout of this project's ``model`` kind ("detr", "conditional_detr", "anchor_detr";
    None: the source's own kind).  ``input_format``: channel order of the project model's input
    ("BGR", this project's configs, reverses the input channels of the RGB sources' first
    convolution; see :func:`input_format_of`).  Returns (new_state_dict, report)."""
    state_dict = unwrap_state_dict(state_dict)
    if model is not None and model not in MODEL_KINDS:
        raise ConversionError(f"unknown model kind {model!r}; known: {list(MODEL_KINDS)}")
    if source == "auto":
        source = detect_source(state_dict)
    if source == "project":
        return dict(state_dict), ConversionReport(notes=["already in this project's layout"])
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; known: {available_sources()}")
    convert, _ = SOURCES[source]
    return convert(state_dict, model, input_format)
