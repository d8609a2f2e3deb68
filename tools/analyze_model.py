#!/usr/bin/env python
"""Parameters and FLOPs of the detectors, whole model and encoder, with and without ENACT.

For every config: parameters (total, trainable = requires_grad, encoder) and the FLOPs of one
inference forward (eval mode) on ``--batch`` random images of exactly ``--size H W`` (default one
800 x 1333 image), counted by fvcore's ``FlopCountAnalysis`` (detectron2's subclass of it, which
traces detectron2's list-of-dicts inputs and Instances outputs and ignores element-wise ops).
The encoder's FLOPs are the ``model.transformer.encoder`` entry of ``by_module()``.

FLOP convention: fvcore's, one multiply-add = one flop (so "GFLOPs" here are GMACs, the number
DETR papers quote).  Handles added for ops fvcore does not know, in that convention:

  aten::scaled_dot_product_attention   B*h*L*S*(d + d_v)   (Q K^T and A V; = the eager matmuls)
  ENACT segment softmax pooling        B*N*C per pooled feature tensor (weighted sum); the
                                       softmax is element-wise and ignored like detectron2's
                                       (enact_ops::pool_shared_key_value: key and value)
  enact_ops::segment_runs / _uniform   0 (a discrete segmentation, no arithmetic)
  enact_ops::smoothed_information      B*N*(K + 3)   (steps 1-4: the Gaussian's K taps and the
                                       3 of the curvature per token; softmax and log element-wise)

ACT (``X_act.py``, paired with ``X.py`` like ``X_enact.py``): its hashing einsum is counted by
fvcore, its discrete clustering (unique, sorts, bincount) is unsupported and counts as zero.

Ops still without a handle are listed per model ("unsupported"); they count as zero.  For ENACT
the FLOPs depend on the data (the clusters per image, also reported): random pixels and initial
weights here, so they show the mechanism, not COCO numbers.

    python tools/analyze_model.py                                   # the default configs, 800x1333
    python tools/analyze_model.py --configs configs/detr_r50_300ep_enact.py --size 800 1216
    python tools/analyze_model.py --configs conditional_detr_r50_50ep conditional_detr_r50_50ep_sparse_enact \\
        --query-ratios 0.1 0.3          # a Sparse DETR config at each rho (also PATH@RHO in --configs)
"""
import argparse
import json
import os
import shlex
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from projects.enact.benchmark.detector import DEFAULT_CONFIGS  # noqa: E402
from projects.enact.modeling.encoder_adapter import find_encoder  # noqa: E402
from projects.enact.benchmark.runner import (  # noqa: E402
    config_name, detector_key, encoder_layer_statistics, load_config, resolve_config, seed_all, set_encoder_attention,
    encoder_kind, variant,
)

warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")

SDPA_OP = "aten::scaled_dot_product_attention"
POOL_OP = "enact_ops::segment_softmax_pool_forward"  # enact_ops.segment_softmax_pool: keys, values, extras
ZERO_OPS = ("enact_ops::segment_runs", "enact_ops::segment_uniform")
INFORMATION_OP = "enact_ops::smoothed_information"
SHARED_POOL_OP = "enact_ops::pool_shared_key_value"  # encoder self-attention: key = value + key_pos


def _shapes(values):
    """Shapes of the tensor inputs of a traced node; lists (prim::ListConstruct) are flattened."""
    from fvcore.nn.jit_handles import get_shape

    shapes = []
    for v in values:
        node = v.node()
        if node.kind() == "prim::ListConstruct":
            shapes.extend(_shapes(list(node.inputs())))
            continue
        try:
            shape = get_shape(v)
        except Exception:  # noqa: BLE001  (not a tensor)
            shape = None
        if shape is not None:
            shapes.append(list(shape))
    return shapes


def sdpa_flop_jit(inputs, outputs):
    """Q (.., L, d), K (.., S, d), V (.., S, d_v): L*S*d for Q K^T plus L*S*d_v for A V (MACs)."""
    q, k, v = _shapes(inputs[:3])
    batch = 1
    for n in q[:-2]:
        batch *= n
    length, d = q[-2], q[-1]
    src = k[-2]
    return batch * length * src * (d + v[-1])


def pool_flop_jit(inputs, outputs):
    """Segment softmax pooling: one multiply-add per token and channel of every feature tensor."""
    return sum(s[0] * s[1] * s[2] for s in _shapes(inputs) if len(s) == 3)


def shared_pool_flop_jit(inputs, outputs):
    """enact_ops::pool_shared_key_value: the key and the value pooled (its first two inputs; key_pos
    is there for the gradient only)."""
    return pool_flop_jit(inputs[:2], outputs)


def information_flop_jit(inputs, outputs):
    """Steps 1-4 on logits (B, N) with K taps: the two correlations, K + 3 multiply-adds per token."""
    shapes = _shapes(inputs)
    logits, taps = shapes[0], shapes[-1]
    return logits[0] * logits[1] * (taps[0] + 3)


def analyze(path, args, device):
    from detectron2.config import instantiate
    from detectron2.utils.analysis import FlopCountAnalysis

    cfg = load_config(path, args.opts, str(device))
    seed_all(args.seed)
    model = instantiate(cfg.model).to(device).eval()
    set_count = set_encoder_attention(model, args.attention)
    encoder = find_encoder(model)  # transformer.encoder (detrex Anchor DETR: transformer.encoder_layers)
    gen = torch.Generator().manual_seed(args.seed)
    h, w = args.size
    inputs = [{"image": torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8).to(device),
               "height": h, "width": w} for _ in range(args.batch)]
    flops = FlopCountAnalysis(model, inputs)
    flops.set_op_handle(SDPA_OP, sdpa_flop_jit, **{POOL_OP: pool_flop_jit},
                        **{op: None for op in ZERO_OPS}, **{INFORMATION_OP: information_flop_jit, SHARED_POOL_OP: shared_pool_flop_jit})
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad():
        total = flops.total()
    by_module = flops.by_module()
    prefix = next(n for n, m in flops._model.named_modules() if m is model)  # "model" (TracingAdapter)
    enc_path = next(n for n, m in model.named_modules() if m is encoder)
    enc_name = f"{prefix}.{enc_path}" if prefix else enc_path
    enc_flops = by_module.get(enc_name, 0)
    by_operator = flops.by_operator()
    stats = encoder_layer_statistics(encoder)
    row = {
        "config": os.path.relpath(path, ROOT), "model": config_name(path),
        "attention": args.attention if set_count else encoder_kind(model),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "encoder_params": sum(p.numel() for p in encoder.parameters()),
        "flops": int(total), "encoder_flops": int(enc_flops),
        "encoder_share": enc_flops / total if total else 0.0,
        "flops_by_operator": {k: int(v) for k, v in sorted(by_operator.items(), key=lambda kv: -kv[1])},
        # by_operator() drops the namespace ("aten::", "prim::")
        "custom_op_flops": {k: int(by_operator[k.split("::", 1)[-1]]) for k in (SDPA_OP, POOL_OP, SHARED_POOL_OP, INFORMATION_OP)
                            if k.split("::", 1)[-1] in by_operator},
        "unsupported_ops": dict(flops.unsupported_ops()),
        "batch": args.batch, "size": list(args.size),
    }
    if stats:
        row["clusters_per_layer"] = [s["clusters_per_image"] for s in stats]
        row["clusters_mean"] = sum(row["clusters_per_layer"]) / len(stats)
    return row


def markdown_table(rows):
    lines = ["| model | attention | params (M) | trainable (M) | encoder params (M) | GFLOPs | encoder GFLOPs "
             "| encoder share | clusters/layer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = None if variant(r["config"]) == "baseline" else next(  # X.py for X_enact.py / X_act.py
            (b for b in rows if variant(b["config"]) == "baseline" and detector_key(b["config"]) == detector_key(r["config"])),
            None)
        enc = f"{r['encoder_flops'] / 1e9:.2f}"
        if base and base["encoder_flops"]:
            enc += f" ({r['encoder_flops'] / base['encoder_flops']:.2f}x)"
        clusters = f"{r['clusters_mean']:.1f}" if "clusters_mean" in r else "-"
        params = f"{r['params'] / 1e6:.2f}" + (f" (+{r['params'] - base['params']:,})" if base else "")
        lines.append(f"| {r['model']} | {r['attention']} | {params} | {r['trainable_params'] / 1e6:.2f} "
                     f"| {r['encoder_params'] / 1e6:.2f} | {r['flops'] / 1e9:.2f} | {enc} "
                     f"| {100 * r['encoder_share']:.1f}% | {clusters} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help="LazyConfig files (paths or names under configs/)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                   help="backend of the encoder attention modules (FLOPs are the same by construction)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-md", default="output/analyze_model.md")
    p.add_argument("--out-json", default="output/analyze_model.json")
    p.add_argument("--opts", nargs="*", default=[], help="LazyConfig overrides (key=value) applied to every config")
    p.add_argument("--query-ratios", type=float, nargs="+", default=None,
                   help="count every Sparse DETR config (X_sparse*.py) at each of these rho (one row each)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.configs is None:
        paths = [resolve_config(c) for c in DEFAULT_CONFIGS if os.path.isfile(os.path.join(ROOT, c))]
    else:
        paths = [resolve_config(c) for c in args.configs]
    from projects.enact.benchmark.detector import expand_query_ratios

    paths = expand_query_ratios(paths, args.query_ratios)
    given = sys.argv[1:] if argv is None else argv
    command = "python tools/analyze_model.py " + " ".join(shlex.quote(a) for a in given)
    header = (f"input: {args.batch} x 3 x {args.size[0]} x {args.size[1]} (random pixels, eval mode), device {device}; "
              "FLOPs: fvcore FlopCountAnalysis (detectron2's), 1 multiply-add = 1 flop")
    print(header, flush=True)
    rows = []
    for i, path in enumerate(paths):
        print(f"[{i + 1}/{len(paths)}] {config_name(path)}", file=sys.stderr, flush=True)
        rows.append(analyze(path, args, device))
    table = markdown_table(rows)
    notes = []
    for r in rows:
        custom = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in r["custom_op_flops"].items()) or "none"
        unsupported = ", ".join(f"{k} x{n}" for k, n in sorted(r["unsupported_ops"].items())) or "none"
        notes.append(f"- {r['model']}: custom handles: {custom}; unsupported (counted as 0): {unsupported}")
    print("\n" + table + "\n\n" + "\n".join(notes))
    md = ["# Parameters and FLOPs (tools/analyze_model.py)", "", f"`{command}`", "", header, "", table, "", *notes, ""]
    result = {"tool": "analyze_model", "command": command, "torch": torch.__version__,
              "args": vars(args), "flop_convention": "fvcore: one multiply-add = one flop", "rows": rows,
              "markdown": table}
    for out, text in ((args.out_md, "\n".join(md)), (args.out_json, json.dumps(result, indent=2))):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
    print(f"wrote {args.out_md} and {args.out_json}")
    return result


if __name__ == "__main__":
    main()
