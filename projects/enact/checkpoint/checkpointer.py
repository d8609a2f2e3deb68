"""``EnactCheckpointer``: detectron2's ``DetectionCheckpointer`` that also loads checkpoints of the
original implementations (and detrex) by converting them on the fly.

    train.init_checkpoint=/path/to/detr-r50-e632da11.pth   # facebookresearch/detr, as released

The file (``{"model": state_dict, ...}`` or a bare state dict) is loaded, its format detected
(:func:`projects.enact.checkpoint.detect_source`) and, unless it is already in this project's
layout, converted for the model being loaded.  Source keys the conversion could not use are kept
under their original names, so that detectron2's usual report lists them as unexpected; missing
keys (e.g. ENACT's ``clustering.w_prob`` in an ``_enact`` model) are reported as usual.
Checkpoints written by this project (periodic checkpoints, ``--resume``) load unchanged, and so
does every checkpoint loaded into a model that is not one of the project's detectors (a detrex
checkpoint into a detrex model, with or without ENACT: converting is for the project's models).
"""
import argparse
import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer

from . import ConversionError, convert_state_dict, detect_source, input_format_of, model_kind

__all__ = ["EnactCheckpointer"]

logger = logging.getLogger(__name__)


class EnactCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer + on-the-fly conversion of source-format checkpoints."""

    def _torch_load(self, f):
        # The original repositories save their argparse.Namespace next to the weights; allow it
        # in torch.load's weights_only unpickler (otherwise unchanged).
        with torch.serialization.safe_globals([argparse.Namespace]):
            return super()._torch_load(f)

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        state = loaded.get("model") if isinstance(loaded, dict) else None
        if not isinstance(state, dict) or loaded.get("matching_heuristics", False):
            return loaded
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            return loaded
        try:
            source = detect_source(state)
        except ConversionError:
            return loaded  # unknown layout: let detectron2 report what does not match
        if source == "project":
            return loaded
        try:
            kind = model_kind(self.model)
        except ConversionError:  # not a project detector (e.g. a detrex model): its own layout
            return loaded
        converted, report = convert_state_dict(state, source, kind, input_format_of(self.model))
        logger.info(
            "Converted a %r checkpoint (%s) for this %s model: %d tensors.", source, filename, kind,
            len(converted),
        )
        for note in report.notes:
            logger.info("conversion: %s", note)
        if report.unused_source_keys:
            logger.warning(
                "%d key(s) of the %r checkpoint not used by the conversion: %s",
                len(report.unused_source_keys), source, ", ".join(report.unused_source_keys),
            )
            for key in report.unused_source_keys:  # detectron2 then lists them as unexpected
                converted.setdefault(key, state[key])
        return {
            "model": converted,
            "__author__": f"enact conversion of a {source} checkpoint",
            "matching_heuristics": False,
        }
