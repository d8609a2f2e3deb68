"""Shared pieces of the checkpoint converters: the report type, checkpoint unwrapping and loading,
the COCO class-head re-ordering, the torchvision -> detectron2 ResNet names and the shape check.

Class heads.  The original implementations index their class head by COCO category id (91 ids,
0..90, several unused), DETR with one extra "no object" row last (92 rows).  This project uses the
80 contiguous classes of detectron2's COCO metadata (``thing_dataset_id_to_contiguous_id``):
project row ``c`` is source row ``coco_id(c)``; DETR's no-object row (source row 91) becomes the
project's last row (80).
"""
import argparse
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "ConversionReport",
    "ConversionError",
    "MODEL_KINDS",
    "NUM_COCO_IDS",
    "coco_ids_in_contiguous_order",
    "select_class_rows",
    "torchvision_resnet_to_d2",
    "unwrap_state_dict",
    "load_checkpoint_file",
    "check_shapes",
    "model_kind",
    "enact_parameter_names",
    "input_format_of",
    "INPUT_FORMATS",
    "STEM_CONV",
    "apply_rules",
    "reverse_stem_channels",
    "Rule",
    "RCDA_PARTS",
    "rename_rule",
    "split_rcda_rule",
    "shared_copy_rule",
]

INPUT_FORMATS = ("BGR", "RGB")
STEM_CONV = "backbone.stem.conv1.weight"

# The detector architectures of this project that checkpoints can be converted into.
MODEL_KINDS = ("detr", "conditional_detr", "anchor_detr")

# Class-head rows of the original COCO models: category ids 0..90 (0 and 11 others unused).
NUM_COCO_IDS = 91


class ConversionError(ValueError):
    """A checkpoint cannot be converted (unknown layout, wrong shapes, ...)."""


@dataclass
class ConversionReport:
    """What a conversion did besides renaming.

    unused_source_keys: source keys that no rule consumed (listed by name, never dropped silently).
    notes: human-readable remarks (re-ordered class heads, dropped counters, split projections...).
    """

    unused_source_keys: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"note: {n}" for n in self.notes]
        if self.unused_source_keys:
            lines.append(f"{len(self.unused_source_keys)} source key(s) not used:")
            lines += [f"  {k}" for k in self.unused_source_keys]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- class heads
def coco_ids_in_contiguous_order() -> List[int]:
    """COCO category ids (1..90) of the project's 80 classes, in contiguous class order."""
    import detectron2.data.datasets  # noqa: F401  (registers the COCO metadata)
    from detectron2.data import MetadataCatalog

    id_map = MetadataCatalog.get("coco_2017_val").thing_dataset_id_to_contiguous_id
    by_class = sorted(id_map.items(), key=lambda kv: kv[1])
    if [c for _, c in by_class] != list(range(len(by_class))):
        raise ConversionError("detectron2's COCO metadata has non-contiguous class ids")
    return [coco_id for coco_id, _ in by_class]


def select_class_rows(
    tensor: torch.Tensor, key: str, no_object: bool, report: ConversionReport
) -> torch.Tensor:
    """Re-order a 91-id class head (weight (R, C) or bias (R,)) to the project's 80 classes.

    ``no_object``: the head has an extra last "no object" row (DETR, R = 92) which stays last.
    A head of another size (a non-COCO model) is returned unchanged with a note; the shape check
    against the project model then decides.
    """
    rows = tensor.shape[0]
    expected = NUM_COCO_IDS + (1 if no_object else 0)
    if rows != expected:
        report.notes.append(
            f"{key}: {rows} rows, not the {expected} of a COCO model: copied without re-ordering"
        )
        return tensor
    index = coco_ids_in_contiguous_order()
    if no_object:
        index = index + [NUM_COCO_IDS]
    out = tensor[torch.as_tensor(index, dtype=torch.long)].clone()
    if key.endswith("weight"):
        report.notes.append(
            f"class head {key}: {rows} rows (COCO ids 0..90{' + no-object' if no_object else ''}) "
            f"-> {out.shape[0]} rows (80 contiguous classes{' + no-object last' if no_object else ''})"
        )
    return out


# ---------------------------------------------------------------------------------- backbone
_TV_STEM_CONV = re.compile(r"^conv1\.weight$")
_TV_STEM_BN = re.compile(r"^bn1\.(weight|bias|running_mean|running_var)$")
_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def torchvision_resnet_to_d2(name: str) -> Optional[str]:
    """Name inside a torchvision ResNet (``layer1.0.bn1.running_var``) -> name inside
    detectron2's ``ResNet`` (``res2.0.conv1.norm.running_var``); None if not a ResNet weight."""
    if _TV_STEM_CONV.match(name):
        return "stem.conv1.weight"
    m = _TV_STEM_BN.match(name)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = _TV_BLOCK.match(name)
    if not m:
        return None
    stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
    if not 1 <= stage <= 4:
        return None
    prefix = f"res{stage + 1}.{block}"
    m2 = re.match(r"^conv(\d)\.weight$", rest)
    if m2:
        return f"{prefix}.conv{m2.group(1)}.weight"
    m2 = re.match(r"^bn(\d)\.(\w+)$", rest)
    if m2 and m2.group(2) in _BN_FIELDS:
        return f"{prefix}.conv{m2.group(1)}.norm.{m2.group(2)}"
    if rest == "downsample.0.weight":
        return f"{prefix}.shortcut.weight"
    m2 = re.match(r"^downsample\.1\.(\w+)$", rest)
    if m2 and m2.group(1) in _BN_FIELDS:
        return f"{prefix}.shortcut.norm.{m2.group(1)}"
    return None


# ---------------------------------------------------------------------------------- files
def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    """A checkpoint object (``{"model": state_dict, ...}`` or a bare state dict) -> state dict."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"checkpoint is a {type(obj).__name__}, expected a state dict or {{'model': state_dict}}"
        )
    return dict(obj)


def load_checkpoint_file(path: str):
    """``torch.load`` on CPU, ``weights_only`` with ``argparse.Namespace`` allowed (the original
    repositories store their command-line ``args`` next to the weights)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConversionError(
            f"cannot load {path} with torch.load(weights_only=True): {exc}\n"
            "If you trust the file, re-save its state dict with "
            "torch.save({'model': torch.load(path, weights_only=False)['model']}, new_path)"
        ) from exc


def check_shapes(
    converted: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> None:
    """Raise :class:`ConversionError` naming every key whose shape differs from the model's."""
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in converted.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if bad:
        raise ConversionError("shape mismatch between converted checkpoint and model:\n  " + "\n  ".join(bad))


# ---------------------------------------------------------------------------------- models
def model_kind(model: torch.nn.Module) -> str:
    """'detr', 'conditional_detr' or 'anchor_detr' for a project detector (DDP unwrapped)."""
    from ..modeling.anchor_detr import AnchorDETR
    from ..modeling.conditional_detr import ConditionalDETR
    from ..modeling.detr import DETR

    model = getattr(model, "module", model)
    if isinstance(model, AnchorDETR):
        return "anchor_detr"
    if isinstance(model, ConditionalDETR):
        return "conditional_detr"
    if isinstance(model, DETR):
        return "detr"
    raise ConversionError(f"no checkpoint conversion for a {type(model).__name__}")


def input_format_of(model: torch.nn.Module) -> str:
    """"BGR" or "RGB": the channel order a project detector expects, read from its ``pixel_mean``
    (ImageNet's mean is larger for red than for blue: R 0.485, B 0.406).  "BGR" (detectron2's
    and this project's default) when the model has no 3-channel ``pixel_mean``."""
    mean = getattr(getattr(model, "module", model), "pixel_mean", None)
    if not isinstance(mean, torch.Tensor) or mean.numel() != 3:
        return "BGR"
    mean = mean.flatten()
    return "RGB" if float(mean[0]) > float(mean[2]) else "BGR"


def enact_parameter_names(model: torch.nn.Module) -> List[str]:
    """State-dict keys owned by ENACT's clustering modules (new relative to the baseline)."""
    from ..modeling.enact import EnactClustering

    model = getattr(model, "module", model)
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, EnactClustering):
            prefix = f"{mod_name}." if mod_name else ""
            names += [prefix + k for k in module.state_dict().keys()]
    return names


def split_rows(tensor: torch.Tensor, parts: int, key: str) -> Tuple[torch.Tensor, ...]:
    """Split a packed in-projection (parts * C rows) into ``parts`` equal blocks."""
    if tensor.shape[0] % parts:
        raise ConversionError(
            f"{key}: {tuple(tensor.shape)} cannot be split into {parts} equal projections"
        )
    return tuple(t.clone() for t in tensor.chunk(parts, dim=0))


def apply_rules(state_dict: Mapping[str, torch.Tensor], rules: Sequence[Callable]):
    """Run every (key, tensor) of ``state_dict`` through the first of ``rules`` that applies.

    A rule maps ``(key, tensor, report, state_dict)`` to ``[(new_key, tensor), ...]`` (``[]``:
    consumed without output) or None (does not apply).  Keys no rule takes are listed in
    ``report.unused_source_keys``; BatchNorm ``num_batches_tracked`` counters are dropped with a
    note; two source keys producing one new key raise.  Returns (out, origin, report), ``origin``
    mapping every new key to its source key."""
    report = ConversionReport()
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    counters = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            counters.append(key)
            continue
        produced = None
        if isinstance(value, torch.Tensor):
            for rule in rules:
                produced = rule(key, value, report, state_dict)
                if produced is not None:
                    break
        if produced is None:
            report.unused_source_keys.append(key)
            continue
        for new_key, new_value in produced:
            if new_key in out:
                raise ConversionError(f"{origin[new_key]} and {key} both map to {new_key}")
            out[new_key] = new_value
            origin[new_key] = key
    if counters:
        report.notes.append(
            f"dropped {len(counters)} BatchNorm num_batches_tracked counter(s) (frozen BN has none)"
        )
    return out, origin, report


def reverse_stem_channels(
    out: Dict[str, torch.Tensor], origin: Mapping[str, str], report: ConversionReport, input_format: str,
    source: str,
) -> None:
    """For a project model reading BGR (``input_format``), reverse the input channels of the
    stem convolution of a ``source`` trained on RGB images (in place, noted in ``report``)."""
    if input_format not in INPUT_FORMATS:
        raise ConversionError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    if input_format != "BGR" or STEM_CONV not in out:
        return
    weight = out[STEM_CONV]
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ConversionError(
            f"{origin.get(STEM_CONV, STEM_CONV)}: shape {tuple(weight.shape)}, expected (C, 3, k, k) "
            "for an RGB stem convolution"
        )
    out[STEM_CONV] = weight.flip(1).contiguous()
    report.notes.append(
        f"{STEM_CONV}: input channels reversed ({source} reads RGB images, the project model BGR; "
        "pass input_format='RGB' for a model configured with RGB input)"
    )


# ------------------------------------------------------------------ rules shared by the converters
Produced = Optional[List[Tuple[str, torch.Tensor]]]  # None: the rule does not apply; []: consumed
Rule = Callable[[str, torch.Tensor, ConversionReport, Mapping[str, torch.Tensor]], Produced]

RCDA_PARTS = ("q_x_proj", "q_y_proj", "k_x_proj", "k_y_proj", "v_proj")
_RCDA_NOTE = (
    "RCDA in_proj (5C rows: q_row, q_col, k_row, k_col, v; row = x) split into "
    "q_x_proj, q_y_proj, k_x_proj, k_y_proj, v_proj"
)


def rename_rule(pattern: str, repl: str) -> Rule:
    """Keys matching ``pattern`` renamed with ``re.sub(pattern, repl, key)``, tensor unchanged."""
    regex = re.compile(pattern)

    def rule(key, value, report, sd):
        if not regex.match(key):
            return None
        return [(regex.sub(repl, key), value)]

    return rule


def split_rcda_rule(pattern: str, target: str) -> Rule:
    """A packed RCDA in-projection (5C rows: q_row, q_col, k_row, k_col, v; group ``p`` =
    weight / bias) -> the five Linear layers ``{target}.{q_x,q_y,k_x,k_y,v}_proj``.  A (3C, C)
    matrix under the same name (nn.MultiheadAttention) does not apply."""
    regex = re.compile(pattern)

    def rule(key, value, report, sd):
        m = regex.match(key)
        if not m:
            return None
        if value.dim() == 2 and value.shape[0] != 5 * value.shape[1]:
            return None
        chunks = split_rows(value, len(RCDA_PARTS), key)
        if _RCDA_NOTE not in report.notes:
            report.notes.append(_RCDA_NOTE)
        base = regex.sub(target, key)
        return [(f"{base}.{part}.{m.group('p')}", t) for part, t in zip(RCDA_PARTS, chunks)]

    return rule


def shared_copy_rule(pattern: str, inner: Rule, copies: str) -> Rule:
    """Anchor DETR stores its shared heads once per decoder layer (group ``i`` = 0 .. 5, one
    module): copy 0 goes through ``inner``; a copy equal to copy 0 is consumed, one that differs
    is left unused with a note (this project shares one head across the decoder layers)."""
    regex = re.compile(pattern)

    def rule(key, value, report, sd):
        m = regex.match(key)
        if not m:
            return None
        if int(m.group("i")) == 0:
            return inner(key, value, report, sd)
        first = sd.get(key[: m.start("i")] + "0" + key[m.end("i"):])
        if isinstance(first, torch.Tensor) and first.shape == value.shape and torch.equal(first, value):
            note = f"{copies}: the decoder layers' copies of one shared head, copy 0 converted"
            if note not in report.notes:
                report.notes.append(note)
            return []
        report.notes.append(
            f"{key} differs from copy 0 although this project shares one head across the decoder "
            "layers: left unused"
        )
        return None

    return rule
