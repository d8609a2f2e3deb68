#!/usr/bin/env python
"""Anchor DETR encoders: time and peak memory of one forward+backward of the encoder alone.

Variants (6 post-norm layers, C=256, 8 heads, FFN 1024, dropout 0, training mode):
  rcda             RCDAEncoder: row-column decoupled attention (the Anchor DETR baseline)
  enact-rcda       EnactRCDAEncoder: separable ENACT on RCDA, sigma = --sigma (3, the paper's)
  enact-rcda-s1    the same with sigma = 1 (per-axis compression ~2, see the report)
  mhsa             TransformerEncoder with standard multi-head self-attention (SDPA)
  mhsa-enact       TransformerEncoder with EnactAttention (1-D ENACT, sigma = --sigma; SDPA)
  mhsa-eager, mhsa-enact-eager   the same with the materialised softmax (not run by default:
                   mhsa-eager needs ~3 GB per layer at B=4, 50x68)
Inputs: a DC5-like map (--height x --width, default 50 x 68) for B=4 images, random features
and positions; images 0, 2, ... padded at the bottom (10 %) and the right (15 %) as in a
detectron2 batch.  The MHSA encoders see the flattened map with pos = pos_x + pos_y.
Time: median of interleaved repeats, all variants in one process.  Memory: on CPU the peak-RSS
increase (VmHWM after "5" > /proc/self/clear_refs) over the process's state just before the
measured call, one fresh process per variant; on CUDA torch.cuda.max_memory_allocated above
the state before the call.  Cluster statistics are of the untrained (randomly initialised)
W_prob on random features: indicative only.

    python tools/benchmark_rcda.py                     # CPU, B=4, 50 x 68
    python tools/benchmark_rcda.py --device cuda --repeats 10
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from projects.enact.modeling.anchor_detr import RCDAEncoder  # noqa: E402
from projects.enact.modeling.attention import MultiheadAttention  # noqa: E402
from projects.enact.modeling.enact import EnactAttention  # noqa: E402
from projects.enact.modeling.enact_rcda import EnactRCDAEncoder  # noqa: E402
from projects.enact.modeling.transformer import TransformerEncoder  # noqa: E402
from projects.enact.benchmark.utils import device_name, peak_memory_increase, timed  # noqa: E402


def _common(a):
    return dict(num_layers=a.layers, embed_dim=a.channels, ffn_dim=a.ffn, dropout=0.0, num_heads=a.heads)


VARIANTS = {
    "rcda": lambda a: RCDAEncoder(**_common(a)),
    "enact-rcda": lambda a: EnactRCDAEncoder(**_common(a), sigma=a.sigma),
    "enact-rcda-s1": lambda a: EnactRCDAEncoder(**_common(a), sigma=1),
    "mhsa": lambda a: TransformerEncoder(MultiheadAttention(a.channels, a.heads, attn_implementation="sdpa"), **_common(a)),
    "mhsa-enact": lambda a: TransformerEncoder(
        EnactAttention(a.channels, a.heads, sigma=a.sigma, attn_implementation="sdpa"), **_common(a)
    ),
    "mhsa-eager": lambda a: TransformerEncoder(MultiheadAttention(a.channels, a.heads, attn_implementation="eager"), **_common(a)),
    "mhsa-enact-eager": lambda a: TransformerEncoder(
        EnactAttention(a.channels, a.heads, sigma=a.sigma, attn_implementation="eager"), **_common(a)
    ),
}
DEFAULT_VARIANTS = ["rcda", "enact-rcda", "enact-rcda-s1", "mhsa", "mhsa-enact"]


def make_case(args, height, width, device, variant):
    torch.manual_seed(0)
    module = VARIANTS[variant](args).to(device).train()
    for p in module.parameters():  # Xavier weights, as AnchorDETRTransformer re-initialises them
        if p.dim() > 1:
            torch.nn.init.xavier_uniform_(p)
    b, c = args.batch, args.channels
    src = torch.randn(b, height, width, c, device=device)
    pos_x = torch.randn(b, width, c, device=device)
    pos_y = torch.randn(b, height, c, device=device)
    mask = torch.zeros(b, height, width, dtype=torch.bool, device=device)
    mask[::2, int(height * 0.9):, :] = True
    mask[::2, :, int(width * 0.85):] = True
    if isinstance(module, RCDAEncoder):
        return module, (src, pos_x, pos_y, mask)
    n = height * width
    pos = (pos_x[:, None, :, :] + pos_y[:, :, None, :]).reshape(b, n, c).transpose(0, 1).contiguous()
    return module, (src.reshape(b, n, c).transpose(0, 1).contiguous(), pos, mask.reshape(b, n))


def step(module, inputs):
    if isinstance(module, RCDAEncoder):
        src, pos_x, pos_y, mask = inputs
        x = src.detach().requires_grad_()
        out = module(x, pos_x, pos_y, mask)
    else:
        src, pos, mask = inputs
        x = src.detach().requires_grad_()
        out = module(x, pos=pos, mask=mask)
    out.sum().backward()
    module.zero_grad(set_to_none=True)


def cluster_statistics(module) -> dict:
    if isinstance(module, EnactRCDAEncoder):
        stats = module.statistics()
        stats.pop("layers", None)
        return stats
    if isinstance(module, TransformerEncoder) and isinstance(module.layers[0].self_attn, EnactAttention):
        per_layer = [layer.self_attn.statistics() for layer in module.layers]
        return {k: sum(s[k] for s in per_layer) / len(per_layer) for k in per_layer[0]}
    return {}


def memory_worker(args):
    device = torch.device(args.device)
    step(*make_case(args, 10, 12, device, args.worker_variant))  # warm-up: lazy inits, thread pools
    module, inputs = make_case(args, args.height, args.width, device, args.worker_variant)
    peak = peak_memory_increase(lambda: step(module, inputs), device)
    print(json.dumps({"peak_bytes": peak, "stats": cluster_statistics(module)}))


def measure_memory(args, variant):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-variant", variant]
    for flag in ("batch", "height", "width", "channels", "heads", "ffn", "layers", "sigma", "device", "threads"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--height", type=int, default=50)
    p.add_argument("--width", type=int, default=68)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--sigma", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    p.add_argument("--out", default="output/benchmark_rcda.json")
    p.add_argument("--worker-variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker_variant is not None:
        return memory_worker(args)
    device = torch.device(args.device)
    print(f"encoder benchmark: B={args.batch} map={args.height}x{args.width} C={args.channels} heads={args.heads} "
          f"ffn={args.ffn} layers={args.layers} sigma={args.sigma} device={device} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}", flush=True)
    cases = {v: make_case(args, args.height, args.width, device, v) for v in args.variants}
    for v in args.variants:  # warm-up
        print(f"  warm-up {v}", file=sys.stderr, flush=True)
        step(*cases[v])
    times = {v: [] for v in args.variants}
    for r in range(args.repeats):
        print(f"  repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for v in args.variants:  # interleaved
            times[v].append(timed(lambda: step(*cases[v]), device))
    stats = {v: cluster_statistics(cases[v][0]) for v in args.variants}
    del cases
    rows = []
    for v in args.variants:
        mem = {"peak_bytes": None, "stats": stats[v]} if args.no_memory else measure_memory(args, v)
        rows.append(dict(variant=v, time_s=statistics.median(times[v]), min_time_s=min(times[v]), times_s=times[v],
                         peak_bytes=mem["peak_bytes"], **mem["stats"]))
    base = {r["variant"]: r for r in rows}
    print(f"\n{'variant':>16} | {'ms':>9} | {'peak MiB':>9} | {'t/rcda':>6} {'mem/rcda':>8} | {'M/img':>7} {'N/M':>6} "
          f"{'Wcl/W':>6} {'Hcl/H':>6}")
    for row in rows:
        if "rcda" in base:
            row["time_ratio_vs_rcda"] = row["time_s"] / base["rcda"]["time_s"]
            if row["peak_bytes"] is not None and base["rcda"]["peak_bytes"]:
                row["memory_ratio_vs_rcda"] = row["peak_bytes"] / base["rcda"]["peak_bytes"]
        f = lambda k, d=3: f"{row[k]:.{d}f}" if row.get(k) is not None else "-"  # noqa: E731
        mib = f"{row['peak_bytes'] / 2**20:.1f}" if row["peak_bytes"] is not None else "-"
        print(f"{row['variant']:>16} | {row['time_s'] * 1e3:>9.1f} | {mib:>9} | {f('time_ratio_vs_rcda', 2):>6} "
              f"{f('memory_ratio_vs_rcda', 2):>8} | {f('clusters_per_image', 1):>7} {f('compression', 1):>6} "
              f"{f('column_ratio'):>6} {f('row_ratio'):>6}")
    result = dict(
        tool="benchmark_rcda", device=str(device),
        device_name=device_name(device),
        cpu_threads=torch.get_num_threads(), torch=torch.__version__,
        args={k: v for k, v in vars(args).items() if not k.startswith("worker")},
        memory_measure="cuda max_memory_allocated above the state before the call" if device.type == "cuda"
        else "peak RSS (VmHWM) increase over the state before the measured call, fresh process per variant",
        rows=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
