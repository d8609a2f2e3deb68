#!/usr/bin/env python
"""Convert a checkpoint of the original DETR / Conditional DETR / Anchor DETR implementations (or
of detrex) into a checkpoint of one of this project's configs.

    python tools/convert_checkpoint.py --config-file configs/detr_r50_300ep.py \\
        detr-r50-e632da11.pth output/detr_r50_converted.pth
    python tools/convert_checkpoint.py --source conditional_detr \\
        --config-file configs/conditional_detr_r50_50ep_enact.py ConditionalDETR_r50_epoch50.pth out.pth
    python tools/train_net.py --config-file configs/detr_r50_300ep.py --eval-only \\
        train.init_checkpoint=output/detr_r50_converted.pth

Steps: load INPUT (``{"model": state_dict, ...}`` or a bare state dict), detect (``--source auto``)
or take the source format, convert the key names and tensors, build the config's model on CPU,
check every shape, load the result strictly, print the missing and unexpected keys by name (ENACT's
own clustering parameters separately: they are new, and keep the initialisation the model gives
them), and write ``{"model": state_dict, "__author__": ..., "matching_heuristics": False}`` to
OUTPUT, loadable with ``train.init_checkpoint=OUTPUT``.

Exit status 1 (nothing written) when the source has keys the conversion did not use, unless
``--allow-unused`` is given (they are then listed and left out), or when project parameters other
than ENACT's stay unfilled, unless ``--allow-missing``.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from projects.enact.checkpoint import (  # noqa: E402
    ConversionError,
    available_sources,
    check_shapes,
    convert_state_dict,
    detect_source,
    enact_parameter_names,
    input_format_of,
    load_checkpoint_file,
    model_kind,
    unwrap_state_dict,
)

AUTHOR = "enact convert_checkpoint"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default="auto",
                        help=f"format of INPUT: auto (detect from the key names) or one of "
                             f"{available_sources()}")
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="this project's LazyConfig whose model the checkpoint is for")
    parser.add_argument("--allow-unused", action="store_true",
                        help="write OUTPUT even if some source keys were not used (they are listed)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="write OUTPUT even if non-ENACT model parameters stay unfilled")
    parser.add_argument("--input-format", choices=("BGR", "RGB"), default=None,
                        help="channel order of the project model's input (default: read from the "
                             "config's pixel_mean; this project's configs use BGR)")
    parser.add_argument("input", metavar="INPUT", help="source checkpoint (.pth)")
    parser.add_argument("output", metavar="OUTPUT", help="converted checkpoint to write (.pth)")
    return parser


def build_model(config_file: str):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(config_file)
    cfg.model.device = "cpu"
    return instantiate(cfg.model).eval()


def convert_file(args, out=print):
    """Run the conversion described by the parsed ``args``; returns the written state dict."""
    if not os.path.isfile(args.input):
        raise ConversionError(f"INPUT: no such file: {args.input}")
    if not os.path.isfile(args.config_file):
        raise ConversionError(f"--config-file: no such file: {args.config_file}")
    if args.source != "auto" and args.source not in available_sources():
        raise ConversionError(
            f"--source: unknown source {args.source!r}; choose auto or one of {available_sources()}"
        )
    state = unwrap_state_dict(load_checkpoint_file(args.input))
    source = args.source if args.source != "auto" else detect_source(state)
    out(f"source format: {source}" + (" (detected)" if args.source == "auto" else ""))

    model = build_model(args.config_file)
    kind = model_kind(model)
    input_format = args.input_format or input_format_of(model)
    out(f"project model input: {input_format} images")
    converted, report = convert_state_dict(state, source, kind, input_format)
    for note in report.notes:
        out(f"note: {note}")

    target = model.state_dict()
    check_shapes(converted, target)
    enact = set(enact_parameter_names(model))
    # Missing keys by set difference: detectron2's FrozenBatchNorm2d silently fills absent
    # running statistics when loading a dict without version metadata.
    not_filled = [k for k in target if k not in converted]
    unexpected = [k for k in converted if k not in target]
    missing = [k for k in not_filled if k not in enact]
    new_enact = [k for k in not_filled if k in enact]
    model.load_state_dict(dict(converted), strict=False)
    if report.unused_source_keys:
        out(f"{len(report.unused_source_keys)} source key(s) not used:")
        for key in report.unused_source_keys:
            out(f"  {key}")
    if unexpected:
        out(f"{len(unexpected)} converted key(s) unexpected by the model:")
        for key in unexpected:
            out(f"  {key}")
    if missing:
        out(f"{len(missing)} model key(s) missing from the checkpoint:")
        for key in missing:
            out(f"  {key}")
    if new_enact:
        out(f"{len(new_enact)} new ENACT parameter(s), initialised as the spec says "
            "(not in OUTPUT: the model initialises them when it loads the file):")
        for key in new_enact:
            out(f"  {key}")
    problems = []
    if (report.unused_source_keys or unexpected) and not args.allow_unused:
        problems.append("source keys were not used (pass --allow-unused to write anyway)")
    if missing and not args.allow_missing:
        problems.append("model parameters are missing (pass --allow-missing to write anyway)")
    if problems:
        raise ConversionError("nothing written: " + "; ".join(problems))

    # Write what the model now holds for the converted keys.  ENACT's new parameters are left out:
    # the model initialises them when the file is loaded (detectron2 lists them as missing).
    final = {k: v.detach().clone() for k, v in model.state_dict().items() if k in converted}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": final, "__author__": AUTHOR, "matching_heuristics": False}, args.output)
    out(f"wrote {len(final)} tensors to {args.output} ({kind} model of {args.config_file})")
    return final


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert_file(args)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
