"""Converter from detrex's (the detrex repository on GitHub) DETR, Conditional DETR and Anchor DETR
checkpoints to this project's models.

detrex layouts (``model.state_dict()`` of ``projects/{detr,conditional_detr,anchor_detr}``, as
detrex's checkpointer saves it under ``"model"``):

* backbone: detectron2 ``ResNet`` names (``backbone.stem.conv1.*``,
  ``backbone.res2.0.conv1.norm.*``) in the DETR / Conditional DETR C5 configs, identical to this
  project's; the DC5 configs and Anchor DETR use detrex's ``TorchvisionResNet``
  (``backbone.body.layer1.0.bn1.*``), renamed here to the detectron2 names.  Both layouts are
  accepted for every model.
* DETR / Conditional DETR transformer: detrex's ``BaseTransformerLayer`` stores the attentions,
  FFNs and norms of a layer in lists: ``attentions.0`` (self-attention) / ``attentions.1``
  (cross-attention), ``ffns.0.layers.0.0`` (linear1) / ``ffns.0.layers.1`` (linear2), ``norms.i``
  (the i-th norm in the layer's operation order) -> this project's ``self_attn`` / ``cross_attn``,
  ``linear1`` / ``linear2``, ``norm{i+1}``.  DETR's attentions are detrex ``MultiheadAttention``
  (an ``nn.MultiheadAttention`` under ``attn``, packed ``in_proj_weight``, kept packed);
  Conditional DETR's decoder attentions have separate ``query_content_proj``, ``query_pos_proj``,
  ``key_content_proj``, ``key_pos_proj``, ``value_proj`` (+ ``query_pos_sine_proj`` in the
  cross-attention, ``query_pos_proj`` of the cross-attention in the first layer only) and
  ``out_proj``, with the same names here.  ``decoder.post_norm_layer`` -> ``decoder.norm``.
* Anchor DETR: the reference implementation's module tree (detrex copied it): RCDA attentions with
  one packed ``in_proj_weight`` (5C, C) in the order [q_row, q_col, k_row, k_col, v], where "row"
  is x (``k_row`` is averaged over the rows of the map: one key per column, queried with the x
  coordinate) -> ``q_x_proj, q_y_proj, k_x_proj, k_y_proj, v_proj``; ``ffn.*`` flattened into the
  layer; in the decoder detrex's ``norm2`` follows the self-attention and ``norm1`` the
  cross-attention (here ``norm1`` then ``norm2``), ``ffn.norm2`` -> ``norm3``;
  ``transformer.position`` -> ``transformer.anchors``; the class / box heads live in the
  transformer as one module shared by the six decoder layers (stored six times,
  ``transformer.class_embed.0..5``) -> the detector's ``class_embed`` / ``bbox_embed``;
  ``input_proj`` is already ``Sequential(conv, GroupNorm)``.

Class heads: detrex trains on detectron2's ``coco_2017_*`` registration, i.e. the same 80
contiguous classes as this project (DETR: 81 rows, "no object" last; Conditional / Anchor DETR:
80 sigmoid rows), so they are copied as they are.  A head indexed by COCO category id (92 / 91
rows, as the original repositories and detrex's own ``converter.py`` inputs have) is re-ordered.

Input channels: detrex's models read RGB images normalised with RGB statistics; this project's
configs read BGR images (detectron2's default ``pixel_mean`` / ``pixel_std``, BGR order).  With
``input_format="BGR"`` (the default) the input channels of the first convolution
(``backbone.stem.conv1.weight``) are reversed so that the converted model computes on a BGR image
exactly what the detrex model computes on the RGB one; pass ``input_format="RGB"`` for a project
model configured with RGB input and RGB statistics.

detrex models hold their criterion, so their checkpoints carry its state (``criterion.*``: the
``empty_weight`` buffer of the cross-entropy loss): it is not a model weight and is dropped, named
in a note of the report.  Everything else that maps nowhere (an encoder ``post_norm_layer``,
multi-level Anchor DETR parts, ...) is listed in ``report.unused_source_keys``; BatchNorm
``num_batches_tracked`` counters are dropped with a note.
"""
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

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
    unwrap_state_dict,
)

__all__ = ["DETREX_MODELS", "INPUT_FORMATS", "convert_detrex", "detect_detrex"]

DETREX_MODELS = ("detr", "conditional_detr", "anchor_detr")

_WB = r"(?P<p>weight|bias)"
_ATTN = r"(?P<a>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_BN_FIELDS = r"(weight|bias|running_mean|running_var)"


# ---------------------------------------------------------------------------------- backbone
_D2_BACKBONE = re.compile(
    r"^backbone\.(stem\.conv1\.(weight|norm\.\w+)"
    r"|res[2-5]\.\d+\.(conv[123]|shortcut)\.(weight|norm\.\w+))$"
)


def _backbone(key, value, report, sd):
    """detectron2 ResNet names (identity) or detrex's TorchvisionResNet (``backbone.body.``)."""
    if _D2_BACKBONE.match(key):
        if key.endswith(".norm.num_batches_tracked"):
            return None
        return [(key, value)]
    if key.startswith("backbone.body."):
        name = torchvision_resnet_to_d2(key[len("backbone.body."):])
        return None if name is None else [("backbone." + name, value)]
    return None


# ---------------------------------------------------------------------------------- class heads
def _class_head(pattern: str, target: str, no_object: bool) -> Rule:
    """Class head ``target.{weight,bias}``: copied (detectron2's 80 contiguous classes, DETR's
    no-object row last), re-ordered only when it has the 92 / 91 rows of a COCO-id head."""
    regex = re.compile(pattern)

    def rule(key, value, report, sd):
        m = regex.match(key)
        if not m:
            return None
        rows = value.shape[0] if value.dim() else 0
        if rows == 91 + int(no_object):
            value = select_class_rows(value, key, no_object, report)
        elif m.group("p") == "weight":
            last = ", no-object last" if no_object else ""
            report.notes.append(
                f"class head {key}: {rows} rows copied in order (detrex uses detectron2's "
                f"contiguous COCO classes{last}, as this project)"
            )
        return [(f"{target}.{m.group('p')}", value)]

    return rule


# ---------------------------------------------------------------------------------- DETR-like
def _layer_list_rules(prefix: str, norm_names: Tuple[str, ...]) -> List[Rule]:
    """detrex ``BaseTransformerLayer`` lists of the layers under ``prefix`` (encoder or decoder):
    ``attentions.0/1`` -> ``self_attn`` / ``cross_attn`` (everything below kept), FFN layers ->
    ``linear1`` / ``linear2``, ``norms.i`` -> ``norm_names[i]``."""
    p = re.escape(prefix)
    norms = "|".join(str(i) for i in range(len(norm_names)))

    def norm_rule(key, value, report, sd):
        m = re.match(rf"^{p}\.layers\.(\d+)\.norms\.({norms})\.{_WB}$", key)
        if not m:
            return None
        name = norm_names[int(m.group(2))]
        return [(f"{prefix}.layers.{m.group(1)}.{name}.{m.group('p')}", value)]

    return [
        rename_rule(rf"^{p}\.layers\.(\d+)\.attentions\.0\.(?P<rest>.+)$",
                rf"{prefix}.layers.\1.self_attn.\g<rest>"),
        rename_rule(rf"^{p}\.layers\.(\d+)\.attentions\.1\.(?P<rest>.+)$",
                rf"{prefix}.layers.\1.cross_attn.\g<rest>"),
        rename_rule(rf"^{p}\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.{_WB}$",
                rf"{prefix}.layers.\1.linear1.\g<p>"),
        rename_rule(rf"^{p}\.layers\.(\d+)\.ffns\.0\.layers\.1\.{_WB}$",
                rf"{prefix}.layers.\1.linear2.\g<p>"),
        norm_rule,
    ]


_DETR_ATTENTION_PARAMS = re.compile(
    r"^transformer\.(encoder|decoder)\.layers\.\d+\.(self_attn|cross_attn)\.attn\."
    r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$"
)
_CONDITIONAL_DECODER_PARAMS = re.compile(
    r"^transformer\.decoder\.layers\.\d+\.(self_attn|cross_attn)\."
    r"(query_content_proj|query_pos_proj|query_pos_sine_proj|key_content_proj|key_pos_proj"
    r"|value_proj|out_proj)\.(weight|bias)$"
)


def _only(rule: Rule, allowed: "re.Pattern") -> Rule:
    """``rule`` restricted to outputs whose names match ``allowed`` (anything else stays unused:
    e.g. a detrex attention variant with parameters this project does not have)."""

    def wrapped(key, value, report, sd):
        produced = rule(key, value, report, sd)
        if produced is None or not all(allowed.match(k) for k, _ in produced):
            return None
        return produced

    return wrapped


def _attention_rules(prefix: str, allowed: "re.Pattern") -> List[Rule]:
    rules = _layer_list_rules(prefix, ("norm1", "norm2", "norm3"))
    return [_only(r, allowed) for r in rules[:2]] + rules[2:]


_DETECTOR_COMMON: List[Rule] = [
    _backbone,
    rename_rule(rf"^input_proj\.{_WB}$", r"input_proj.\g<p>"),
    rename_rule(r"^query_embed\.weight$", "query_embed.weight"),
    rename_rule(rf"^bbox_embed\.layers\.([012])\.{_WB}$", r"bbox_embed.layers.\1.\g<p>"),
    rename_rule(rf"^transformer\.decoder\.post_norm_layer\.{_WB}$", r"transformer.decoder.norm.\g<p>"),
]

DETR_RULES: List[Rule] = [
    *_DETECTOR_COMMON,
    *_attention_rules("transformer.encoder", _DETR_ATTENTION_PARAMS),
    *_attention_rules("transformer.decoder", _DETR_ATTENTION_PARAMS),
    _class_head(rf"^class_embed\.{_WB}$", "class_embed", no_object=True),
]

CONDITIONAL_DETR_RULES: List[Rule] = [
    *_DETECTOR_COMMON,
    *_attention_rules("transformer.encoder", _DETR_ATTENTION_PARAMS),
    *_attention_rules("transformer.decoder", _CONDITIONAL_DECODER_PARAMS),
    rename_rule(rf"^transformer\.decoder\.(query_scale|ref_point_head)\.layers\.([01])\.{_WB}$",
            r"transformer.decoder.\1.layers.\2.\g<p>"),
    _class_head(rf"^class_embed\.{_WB}$", "class_embed", no_object=False),
]


# ---------------------------------------------------------------------------------- Anchor DETR
def _anchor_layer(src: str, dst: str) -> Callable[[str, str], Rule]:
    def make(inner: str, out: str) -> Rule:
        return rename_rule(rf"^transformer\.{src}\.(\d+)\.{inner}\.{_WB}$",
                       rf"transformer.{dst}.\1.{out}.\g<p>")

    return make


_enc = _anchor_layer("encoder_layers", "encoder.layers")
_dec = _anchor_layer("decoder_layers", "decoder_layers")

ANCHOR_DETR_RULES: List[Rule] = [
    _backbone,
    rename_rule(rf"^input_proj\.([01])\.{_WB}$", r"input_proj.\1.\g<p>"),
    # encoder: RCDA self-attention, norm1, FFN (+ norm2)
    split_rcda_rule(r"^transformer\.encoder_layers\.(\d+)\.self_attn\.in_proj_(?P<p>weight|bias)$",
                r"transformer.encoder.layers.\1.self_attn"),
    _enc(r"self_attn\.out_proj", "self_attn.out_proj"),
    _enc("norm1", "norm1"),
    _enc(r"ffn\.linear1", "linear1"),
    _enc(r"ffn\.linear2", "linear2"),
    _enc(r"ffn\.norm2", "norm2"),
    # decoder: self-attention (nn.MultiheadAttention) + norm2, RCDA cross-attention + norm1, FFN
    rename_rule(rf"^transformer\.decoder_layers\.(\d+)\.self_attn\.{_ATTN}$",
            r"transformer.decoder_layers.\1.self_attn.attn.\g<a>"),
    _dec("norm2", "norm1"),  # after the self-attention
    split_rcda_rule(r"^transformer\.decoder_layers\.(\d+)\.cross_attn\.in_proj_(?P<p>weight|bias)$",
                r"transformer.decoder_layers.\1.cross_attn"),
    _dec(r"cross_attn\.out_proj", "cross_attn.out_proj"),
    _dec("norm1", "norm2"),  # after the cross-attention
    _dec(r"ffn\.linear1", "linear1"),
    _dec(r"ffn\.linear2", "linear2"),
    _dec(r"ffn\.norm2", "norm3"),
    # queries and position adapters
    rename_rule(r"^transformer\.pattern\.weight$", "transformer.pattern.weight"),
    rename_rule(r"^transformer\.position\.weight$", "transformer.anchors.weight"),
    rename_rule(rf"^transformer\.(adapt_pos[12]d)\.([02])\.{_WB}$", r"transformer.\1.\2.\g<p>"),
    # heads shared by the decoder layers
    shared_copy_rule(
        rf"^transformer\.class_embed\.(?P<i>\d+)\.{_WB}$",
        _class_head(rf"^transformer\.class_embed\.0\.{_WB}$", "class_embed", no_object=False),
        "transformer.class_embed.0-5",
    ),
    shared_copy_rule(
        rf"^transformer\.bbox_embed\.(?P<i>\d+)\.layers\.([012])\.{_WB}$",
        rename_rule(rf"^transformer\.bbox_embed\.0\.layers\.([012])\.{_WB}$",
                r"bbox_embed.layers.\1.\g<p>"),
        "transformer.bbox_embed.0-5",
    ),
]

RULES: Dict[str, List[Rule]] = {
    "detr": DETR_RULES,
    "conditional_detr": CONDITIONAL_DETR_RULES,
    "anchor_detr": ANCHOR_DETR_RULES,
}


def _target_shapes(target) -> Optional[Dict[str, torch.Size]]:
    if target is None:
        return None
    if isinstance(target, torch.nn.Module):
        target = getattr(target, "module", target).state_dict()
    return {k: v if isinstance(v, torch.Size) else torch.Size(getattr(v, "shape", v))
            for k, v in target.items()}


# state that detrex keeps in its models but that is no model weight (the loss' buffers)
NON_MODEL_PREFIXES = ("criterion.",)


def convert_detrex(
    state_dict: Mapping[str, torch.Tensor],
    model: str,
    input_format: str = "BGR",
    target: Optional[Union[torch.nn.Module, Mapping[str, object]]] = None,
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Convert a detrex state dict of a ``model`` ("detr", "conditional_detr", "anchor_detr") to
    the key names and tensor layouts of this project's detector of the same kind.

    Args:
        state_dict: detrex's ``model.state_dict()`` (or a checkpoint ``{"model": state_dict}``).
        model: the architecture; a detrex checkpoint of one kind only fits a project model of
            the same kind.
        input_format: channel order of the project model's input images ("BGR": this project's
            configs, the stem convolution's input channels are reversed; "RGB": kept).
        target: optional project model (or its state dict / a dict of shapes): every converted
            tensor is checked against it (:class:`ConversionError`, a ``ValueError``, naming the
            key and both shapes), and converted keys it does not have are left out and their
            source keys listed as unused.

    Returns:
        (new_state_dict, report): ``report.unused_source_keys`` lists the source keys that map
        nowhere, ``report.notes`` what else was done (re-orderings, splits, dropped counters).
    """
    if model not in RULES:
        raise ConversionError(f"unknown detrex model {model!r}; known: {list(DETREX_MODELS)}")
    if input_format not in INPUT_FORMATS:
        raise ConversionError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    state_dict = unwrap_state_dict(state_dict)
    detected = detect_detrex(state_dict)
    if detected is not None and detected != model:
        raise ConversionError(
            f"the checkpoint looks like detrex's {detected!r}; it cannot be converted into a "
            f"{model!r} model (the architectures differ)"
        )
    non_model = [k for k in state_dict if k.startswith(NON_MODEL_PREFIXES)]
    state_dict = {k: v for k, v in state_dict.items() if k not in non_model}
    out, origin, report = apply_rules(state_dict, RULES[model])
    if non_model:
        report.notes.append(
            f"dropped {len(non_model)} non-model key(s) (detrex's criterion state, not weights): "
            + ", ".join(non_model)
        )
    reverse_stem_channels(out, origin, report, input_format, "detrex")

    shapes = _target_shapes(target)
    if shapes is not None:
        bad = [
            f"{k} (from detrex {origin[k]}): checkpoint {tuple(v.shape)} "
            f"vs model {tuple(shapes[k])}"
            for k, v in out.items()
            if k in shapes and tuple(v.shape) != tuple(shapes[k])
        ]
        if bad:
            raise ConversionError(
                "shape mismatch between the converted detrex checkpoint and the model:\n  "
                + "\n  ".join(bad)
            )
        extra = [k for k in out if k not in shapes]
        for k in extra:
            del out[k]
            if origin[k] not in report.unused_source_keys:
                report.unused_source_keys.append(origin[k])
        if extra:
            report.notes.append(
                f"{len(extra)} converted key(s) have no parameter in the target model; their "
                "source keys are listed as unused"
            )
    return out, report


# ---------------------------------------------------------------------------------- detection
def detect_detrex(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """"detr", "conditional_detr" or "anchor_detr" when ``state_dict`` (or ``{"model": ...}``)
    has the key layout of detrex's model of that kind, else None.

    Told apart from the original repositories by the backbone (``backbone.stem`` /
    ``backbone.res*`` or ``backbone.body.``, never the original DETRs' ``backbone.0.body.``), the
    ``BaseTransformerLayer`` lists (``attentions.N``) of DETR / Conditional DETR, and for Anchor
    DETR (whose transformer names detrex kept from the reference code) by the input projection
    ``input_proj.0`` = conv, ``input_proj.1`` = GroupNorm (the reference code has a list of them,
    ``input_proj.0.0`` / ``input_proj.0.1``).
    """
    if not isinstance(state_dict, Mapping):
        return None
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    keys = set(state_dict.keys())
    if any(k.startswith("backbone.0.") for k in keys):
        return None
    has = lambda pattern: any(re.match(pattern, k) for k in keys)  # noqa: E731
    if has(r"^transformer\.decoder\.layers\.\d+\.attentions\.1\.query_pos_sine_proj\.weight$"):
        return "conditional_detr"
    if has(r"^transformer\.encoder\.layers\.\d+\.attentions\.0\.attn\.in_proj_weight$") and has(
        r"^transformer\.decoder\.layers\.\d+\.attentions\.1\.attn\.in_proj_weight$"
    ):
        return "detr"
    conv = state_dict.get("input_proj.0.weight")
    if (
        has(r"^transformer\.(encoder|decoder)_layers\.\d+\.(self_attn|cross_attn)\.in_proj_weight$")
        and isinstance(conv, torch.Tensor)
        and conv.dim() == 4
        and "input_proj.1.weight" in keys
    ):
        return "anchor_detr"
    return None
