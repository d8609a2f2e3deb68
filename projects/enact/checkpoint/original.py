"""Converters from the checkpoints of the ORIGINAL implementations to this project's models.

Sources (state dicts as their ``main.py`` saves them under ``"model"``):

* ``"detr"`` - facebookresearch/detr (DETR R50/R101, also DC5): torchvision ResNet under
  ``backbone.0.body.``, ``nn.MultiheadAttention`` in every layer (``self_attn``,
  ``multihead_attn``), class head of 92 rows (COCO ids 0..90 + "no object").
* ``"conditional_detr"`` - Atten4Vis/ConditionalDETR: DETR's backbone and encoder; decoder
  projections as separate Linear layers (``sa_qcontent_proj``, ..., ``ca_qpos_sine_proj``),
  ``ca_qpos_proj`` in the first decoder layer only; sigmoid class head of 91 rows.
* ``"anchor_detr"`` - megvii-research/AnchorDETR (R50-DC5, RCDA): torchvision ResNet under
  ``backbone.body.``; RCDA with one packed ``in_proj_weight`` (5C, C) in the order
  [q_row, q_col, k_row, k_col, v] (row = x: k_row is averaged over the rows of the map, i.e. one
  key per column, and is queried with the x anchor coordinate), which is split into this project's
  ``q_x_proj, q_y_proj, k_x_proj, k_y_proj, v_proj``; ``ffn.*`` flattened into the layer; in the
  decoder the source's ``norm2`` follows self-attention and ``norm1`` cross-attention (this
  project: ``norm1`` then ``norm2``); ``transformer.position`` -> ``transformer.anchors``; one class
  / box head shared by the six decoder layers (stored six times: ``transformer.class_embed.0..5``),
  moved to the detector's ``class_embed`` / ``bbox_embed``; 91-row sigmoid class head.

Everything that is not consumed is listed in the report's ``unused_source_keys``.
BatchNorm ``num_batches_tracked`` counters (meaningless for frozen BN) are dropped with a note.
"""
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .common import (
    INPUT_FORMATS,
    ConversionError,
    ConversionReport,
    Rule,
    apply_rules,
    rename_rule,
    reverse_stem_channels,
    shared_copy_rule,
    split_rcda_rule,
    select_class_rows,
    torchvision_resnet_to_d2,
)

__all__ = [
    "INPUT_FORMATS",
    "ORIGINAL_SOURCES",
    "convert_original",
    "detect_original",
]


def _backbone(prefix: str) -> Rule:
    def rule(key, value, report, sd):
        if not key.startswith(prefix):
            return None
        name = torchvision_resnet_to_d2(key[len(prefix):])
        return None if name is None else [("backbone." + name, value)]

    return rule


def _class_head(pattern: str, target: str, no_object: bool) -> Rule:
    regex = re.compile(pattern)

    def rule(key, value, report, sd):
        m = regex.match(key)
        if not m:
            return None
        return [(f"{target}.{m.group('p')}", select_class_rows(value, key, no_object, report))]

    return rule


_ATTN = r"(?P<a>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_WB = r"(weight|bias)"

_DETR_ENCODER = [
    rename_rule(rf"^transformer\.encoder\.layers\.(\d+)\.self_attn\.{_ATTN}$",
            r"transformer.encoder.layers.\1.self_attn.attn.\g<a>"),
    rename_rule(rf"^transformer\.encoder\.layers\.(\d+)\.(linear[12]|norm[12])\.{_WB}$",
            r"transformer.encoder.layers.\1.\2.\3"),
]

_DETECTOR_COMMON = [
    rename_rule(r"^query_embed\.weight$", "query_embed.weight"),
    rename_rule(rf"^input_proj\.{_WB}$", r"input_proj.\1"),
    rename_rule(rf"^bbox_embed\.layers\.(\d+)\.{_WB}$", r"bbox_embed.layers.\1.\2"),
]

DETR_RULES: List[Rule] = [
    _backbone("backbone.0.body."),
    *_DETR_ENCODER,
    rename_rule(rf"^transformer\.decoder\.layers\.(\d+)\.self_attn\.{_ATTN}$",
            r"transformer.decoder.layers.\1.self_attn.attn.\g<a>"),
    rename_rule(rf"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.{_ATTN}$",
            r"transformer.decoder.layers.\1.cross_attn.attn.\g<a>"),
    rename_rule(rf"^transformer\.decoder\.layers\.(\d+)\.(linear[12]|norm[123])\.{_WB}$",
            r"transformer.decoder.layers.\1.\2.\3"),
    rename_rule(rf"^transformer\.decoder\.norm\.{_WB}$", r"transformer.decoder.norm.\1"),
    *_DETECTOR_COMMON,
    _class_head(r"^class_embed\.(?P<p>weight|bias)$", "class_embed", no_object=True),
]

_COND_PROJ = {
    "qcontent": "query_content_proj",
    "qpos": "query_pos_proj",
    "kcontent": "key_content_proj",
    "kpos": "key_pos_proj",
    "v": "value_proj",
    "qpos_sine": "query_pos_sine_proj",
}


def _conditional_projection(key, value, report, sd):
    m = re.match(
        r"^transformer\.decoder\.layers\.(\d+)\.(sa|ca)_(qcontent|qpos|kcontent|kpos|v|qpos_sine)"
        r"_proj\.(weight|bias)$",
        key,
    )
    if not m:
        return None
    layer, kind, proj, param = m.groups()
    if kind == "sa" and proj == "qpos_sine":
        return None
    attn = "self_attn" if kind == "sa" else "cross_attn"
    return [(f"transformer.decoder.layers.{layer}.{attn}.{_COND_PROJ[proj]}.{param}", value)]


CONDITIONAL_DETR_RULES: List[Rule] = [
    _backbone("backbone.0.body."),
    *_DETR_ENCODER,
    _conditional_projection,
    rename_rule(rf"^transformer\.decoder\.layers\.(\d+)\.(self_attn|cross_attn)\.out_proj\.{_WB}$",
            r"transformer.decoder.layers.\1.\2.out_proj.\3"),
    rename_rule(rf"^transformer\.decoder\.layers\.(\d+)\.(linear[12]|norm[123])\.{_WB}$",
            r"transformer.decoder.layers.\1.\2.\3"),
    rename_rule(rf"^transformer\.decoder\.norm\.{_WB}$", r"transformer.decoder.norm.\1"),
    rename_rule(rf"^transformer\.decoder\.(query_scale|ref_point_head)\.layers\.(\d+)\.{_WB}$",
            r"transformer.decoder.\1.layers.\2.\3"),
    *_DETECTOR_COMMON,
    _class_head(r"^class_embed\.(?P<p>weight|bias)$", "class_embed", no_object=False),
]

ANCHOR_DETR_RULES: List[Rule] = [
    _backbone("backbone.body."),
    # encoder (RCDA)
    split_rcda_rule(r"^transformer\.encoder_layers\.(\d+)\.self_attn\.in_proj_(?P<p>weight|bias)$",
                r"transformer.encoder.layers.\1.self_attn"),
    rename_rule(rf"^transformer\.encoder_layers\.(\d+)\.self_attn\.out_proj\.{_WB}$",
            r"transformer.encoder.layers.\1.self_attn.out_proj.\2"),
    rename_rule(rf"^transformer\.encoder_layers\.(\d+)\.norm1\.{_WB}$",
            r"transformer.encoder.layers.\1.norm1.\2"),
    rename_rule(rf"^transformer\.encoder_layers\.(\d+)\.ffn\.(linear[12]|norm2)\.{_WB}$",
            r"transformer.encoder.layers.\1.\2.\3"),
    # decoder: self-attention (nn.MultiheadAttention), RCDA cross-attention, FFN
    rename_rule(rf"^transformer\.decoder_layers\.(\d+)\.self_attn\.{_ATTN}$",
            r"transformer.decoder_layers.\1.self_attn.attn.\g<a>"),
    split_rcda_rule(r"^transformer\.decoder_layers\.(\d+)\.cross_attn\.in_proj_(?P<p>weight|bias)$",
                r"transformer.decoder_layers.\1.cross_attn"),
    rename_rule(rf"^transformer\.decoder_layers\.(\d+)\.cross_attn\.out_proj\.{_WB}$",
            r"transformer.decoder_layers.\1.cross_attn.out_proj.\2"),
    rename_rule(rf"^transformer\.decoder_layers\.(\d+)\.norm2\.{_WB}$",
            r"transformer.decoder_layers.\1.norm1.\2"),  # after self-attention
    rename_rule(rf"^transformer\.decoder_layers\.(\d+)\.norm1\.{_WB}$",
            r"transformer.decoder_layers.\1.norm2.\2"),  # after cross-attention
    rename_rule(rf"^transformer\.decoder_layers\.(\d+)\.ffn\.(linear[12])\.{_WB}$",
            r"transformer.decoder_layers.\1.\2.\3"),
    rename_rule(rf"^transformer\.decoder_layers\.(\d+)\.ffn\.norm2\.{_WB}$",
            r"transformer.decoder_layers.\1.norm3.\2"),
    # queries and position adapters
    rename_rule(r"^transformer\.pattern\.weight$", "transformer.pattern.weight"),
    rename_rule(r"^transformer\.position\.weight$", "transformer.anchors.weight"),
    rename_rule(rf"^transformer\.(adapt_pos[12]d)\.([02])\.{_WB}$", r"transformer.\1.\2.\3"),
    # heads shared across decoder layers
    shared_copy_rule(
        r"^transformer\.class_embed\.(?P<i>\d+)\.(?P<p>weight|bias)$",
        _class_head(r"^transformer\.class_embed\.0\.(?P<p>weight|bias)$", "class_embed", False),
        "transformer.class_embed.0-5",
    ),
    shared_copy_rule(
        r"^transformer\.bbox_embed\.(?P<i>\d+)\.layers\.(\d+)\.(weight|bias)$",
        rename_rule(rf"^transformer\.bbox_embed\.0\.layers\.(\d+)\.{_WB}$", r"bbox_embed.layers.\1.\2"),
        "transformer.bbox_embed.0-5",
    ),
    # input projection: ModuleList([Sequential(conv, GroupNorm)]) -> Sequential(conv, GroupNorm)
    rename_rule(rf"^input_proj\.0\.([01])\.{_WB}$", r"input_proj.\1.\2"),
]

ORIGINAL_SOURCES: Dict[str, List[Rule]] = {
    "detr": DETR_RULES,
    "conditional_detr": CONDITIONAL_DETR_RULES,
    "anchor_detr": ANCHOR_DETR_RULES,
}


def convert_original(
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    model: Optional[str] = None,
    input_format: str = "BGR",
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Convert a state dict of an original implementation (``source`` in ORIGINAL_SOURCES) to the
    key names and layouts of this project's detector of the same kind.

    ``input_format``: channel order of the project model's input.  The original models read RGB
    images normalised with ImageNet's RGB mean/std; this project's configs read BGR images with
    the same statistics in BGR order (detectron2's defaults, x255).  With "BGR" (the default) the
    input channels of the first convolution are reversed, so the converted model computes on the
    BGR image exactly what the source model computes on the RGB one; "RGB" keeps them.

    Returns (new_state_dict, report); unknown keys are left out of the result and listed in
    ``report.unused_source_keys``.
    """
    if source not in ORIGINAL_SOURCES:
        raise ConversionError(f"unknown source {source!r}; known: {sorted(ORIGINAL_SOURCES)}")
    if model is not None and model != source:
        raise ConversionError(
            f"a {source!r} checkpoint holds a {source} model; it cannot be loaded into a "
            f"{model!r} model (architectures differ)"
        )
    out, origin, report = apply_rules(state_dict, ORIGINAL_SOURCES[source])
    reverse_stem_channels(out, origin, report, input_format, "the source")
    if source == "anchor_detr":
        report.notes.append(
            "the authors' RCDA averages its keys over padded pixels too; set "
            "model.transformer.rcda_key_pooling=all to reproduce their outputs exactly on padded batches"
        )
    return out, report


def detect_original(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name of the original implementation whose key layout ``state_dict`` has, or None."""
    keys = list(state_dict.keys())
    if any(".ca_qpos_sine_proj." in k for k in keys):
        return "conditional_detr"
    # detrex's Anchor DETR keeps the transformer names of the reference code: tell them apart by
    # the backbone (torchvision ``backbone.body.``) or the list of input projections.
    if any(k.startswith("transformer.encoder_layers.") or k.startswith("transformer.position.")
           for k in keys) and (
        any(k.startswith("backbone.body.") for k in keys) or "input_proj.0.0.weight" in state_dict
    ):
        return "anchor_detr"
    if any(k.startswith("backbone.0.body.") for k in keys) and any(
        k.startswith("transformer.decoder.layers.") and ".multihead_attn." in k for k in keys
    ):
        return "detr"
    return None
