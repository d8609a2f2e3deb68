#!/usr/bin/env python
"""EnactAttention vs standard multi-head self-attention: time and peak memory of forward+backward.

Variants (all with the same projections; encoder self-attention, q = k = src + pos, v = src):
  mhsa-sdpa, mhsa-eager          standard MHSA, SDPA or materialised softmax
  enact-sdpa, enact-eager        EnactAttention on the compiled enact_ops kernels
  enact-reference-sdpa           EnactAttention on the pure-PyTorch reference (the prototype)
  mhsa-sdpa-ckpt, enact-sdpa-ckpt  the same layers under activation checkpointing
                                 (torch.utils.checkpoint, use_reentrant=False)
Precision: ``--amp none bf16`` measures float32 and bf16 autocast side by side (ratios within one
precision); fp16 is for CUDA (on a CPU fp16 GEMMs are ~27x slower than float32).
Time: median of interleaved repeats, all variants in one process.  Memory: on CPU the peak-RSS
increase over the process's state just before the measured call, one fresh process per
variant with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=65536, as tools/benchmark.py:
freed buffers leave the RSS, so the peak is what is alive, not the heap's high-water mark); on
CUDA torch.cuda.max_memory_allocated above the inputs.

    python tools/benchmark_attention.py                        # B=8, N in {850, 3400}, C=256, 8 heads
    python tools/benchmark_attention.py --device cuda --seq-lens 850 3400 13600 --amp none bf16 fp16
    python tools/benchmark_attention.py --seq-lens 3400 --variants mhsa-sdpa enact-sdpa enact-sdpa-ckpt --amp none bf16
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from projects.enact import EnactAttention, MultiheadAttention  # noqa: E402
from projects.enact.benchmark.utils import peak_memory_increase, sdpa_backend, timed, write_result  # noqa: E402

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

VARIANTS = {
    "mhsa-sdpa": lambda a: MultiheadAttention(a.channels, a.heads, a.dropout, a.dropout, attn_implementation="sdpa"),
    "mhsa-eager": lambda a: MultiheadAttention(a.channels, a.heads, a.dropout, a.dropout, attn_implementation="eager"),
    "enact-sdpa": lambda a: EnactAttention(a.channels, a.heads, a.dropout, a.dropout, sigma=a.sigma, attn_implementation="sdpa"),
    "enact-eager": lambda a: EnactAttention(a.channels, a.heads, a.dropout, a.dropout, sigma=a.sigma, attn_implementation="eager"),
    "enact-reference-sdpa": lambda a: EnactAttention(
        a.channels, a.heads, a.dropout, a.dropout, sigma=a.sigma, attn_implementation="sdpa", backend="reference"
    ),
}
CHECKPOINTED = "-ckpt"  # a variant name + this suffix: the same layer under activation checkpointing
for _name in ("mhsa-sdpa", "enact-sdpa"):
    VARIANTS[_name + CHECKPOINTED] = VARIANTS[_name]


def make_case(args, seq_len, device, variant):
    torch.manual_seed(0)
    module = VARIANTS[variant](args).to(device).train()
    src = torch.randn(seq_len, args.batch, args.channels, device=device)
    pos = torch.randn(seq_len, args.batch, args.channels, device=device)
    mask = torch.zeros(args.batch, seq_len, dtype=torch.bool, device=device)
    mask[::2, int(seq_len * 0.9):] = True  # half the batch padded, as a DETR batch is
    return module, src, pos, mask


def step(module, src, pos, mask, amp=None, ckpt=False):
    x = src.detach().requires_grad_()
    with torch.autocast(src.device.type, dtype=amp, enabled=amp is not None):
        if ckpt:  # only the layer's input and output are kept; its forward runs again in backward
            out = checkpoint(lambda t: module(t, query_pos=pos, key_padding_mask=mask), x, use_reentrant=False)
        else:
            out = module(x, query_pos=pos, key_padding_mask=mask)
    out.float().sum().backward()
    module.zero_grad(set_to_none=True)


def sdpa_kernels(args, cases, amp):
    """{variant: the SDPA kernel its attention runs} for the "-sdpa" variants: the query
    against the keys it attends (all N for MHSA with the padding mask, the M_max clusters with
    the cluster mask for ENACT), in the dtype autocast gives."""
    from projects.enact.modeling.attention import key_padding_bias

    kernels = {}
    for v, (module, src, pos, mask) in cases.items():
        if not v.endswith("sdpa"):
            continue
        B, d = src.shape[1], args.channels // args.heads
        dtype = amp or src.dtype
        keys, key_mask = src.shape[0], mask
        if hasattr(module, "clustering"):
            with torch.no_grad():
                key_mask = module.clustering(src.transpose(0, 1) + pos.transpose(0, 1), src.transpose(0, 1), mask).cluster_mask
            keys = key_mask.shape[1]
        q = torch.randn(B, args.heads, src.shape[0], d, device=src.device, dtype=dtype)
        k = torch.randn(B, args.heads, keys, d, device=src.device, dtype=dtype)
        kernels[v] = sdpa_backend(q, k, k, key_padding_bias(key_mask, dtype))
    return kernels


def memory_worker(args):
    device = torch.device(args.device)
    amp = AMP_DTYPES[args.worker_amp]
    ckpt = args.worker_variant.endswith(CHECKPOINTED)
    step(*make_case(args, 64, device, args.worker_variant), amp=amp, ckpt=ckpt)  # warm-up: lazy inits, thread pools
    case = make_case(args, args.worker_n, device, args.worker_variant)
    peak = peak_memory_increase(lambda: step(*case, amp=amp, ckpt=ckpt), device)
    stats = case[0].statistics() if hasattr(case[0], "statistics") else {}
    print(json.dumps({"peak_bytes": peak, "stats": stats}))


def measure_memory(args, seq_len, variant, amp):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-n", str(seq_len), "--worker-variant", variant,
           "--worker-amp", amp]
    for flag in ("batch", "channels", "heads", "sigma", "dropout", "device"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # large buffers are mmap'ed, freed ones leave the RSS
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[850, 3400])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--sigma", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.0, help="attention and projection dropout")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=list(AMP_DTYPES), nargs="+", default=["none"],
                   help="autocast dtypes, each measured in turn (default none: float32); e.g. --amp none bf16")
    p.add_argument("--out", default="output/benchmark_attention.json")
    p.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-variant", help=argparse.SUPPRESS)
    p.add_argument("--worker-amp", default="none", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_n is not None:
        return memory_worker(args)
    device = torch.device(args.device)
    print(f"attention benchmark: B={args.batch} C={args.channels} heads={args.heads} sigma={args.sigma} "
          f"dropout={args.dropout} device={device} amp={args.amp} threads={torch.get_num_threads()} repeats={args.repeats}")
    rows = []
    for amp_name, n in [(a, n) for a in args.amp for n in args.seq_lens]:
        amp = AMP_DTYPES[amp_name]
        cases = {v: make_case(args, n, device, v) for v in args.variants}
        run = lambda v: step(*cases[v], amp=amp, ckpt=v.endswith(CHECKPOINTED))  # noqa: E731
        for v in args.variants:  # warm-up
            run(v)
        times = {v: [] for v in args.variants}
        for r in range(args.repeats):
            print(f"  amp={amp_name} N={n} repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            for v in args.variants:  # interleaved
                times[v].append(timed(lambda: run(v), device))
        kernels = sdpa_kernels(args, {v: c for v, c in cases.items() if not v.endswith(CHECKPOINTED)}, amp)
        del cases
        for v in args.variants:
            mem = measure_memory(args, n, v, amp_name)
            rows.append(dict(N=n, amp=amp_name, variant=v, time_s=statistics.median(times[v]),
                             peak_bytes=mem["peak_bytes"], sdpa_kernel=kernels.get(v, "-"), **mem["stats"]))
    for a, n, v, kernel in sorted({(r["amp"], r["N"], r["variant"], r["sdpa_kernel"]) for r in rows if r["sdpa_kernel"] != "-"}):
        print(f"  SDPA kernel of {v} at N={n}, amp={a}: {kernel}")
    print(f"\n{'amp':>4} {'N':>6} {'variant':>22} | {'ms':>9} | {'peak MiB':>9} | {'M/img':>7} | "
          f"{'t/sdpa':>7} {'mem/sdpa':>8} | {'t/eager':>7} {'mem/eager':>9}")
    for row in rows:
        suffix = CHECKPOINTED if row["variant"].endswith(CHECKPOINTED) else ""  # checkpointed vs checkpointed
        base = {b: next((r for r in rows if r["N"] == row["N"] and r["amp"] == row["amp"] and r["variant"] == b + suffix),
                        None) for b in ("mhsa-sdpa", "mhsa-eager")}
        for b, key in (("mhsa-sdpa", "sdpa"), ("mhsa-eager", "eager")):
            if base[b] is not None:
                row[f"time_ratio_vs_{key}"] = row["time_s"] / base[b]["time_s"]
                row[f"memory_ratio_vs_{key}"] = row["peak_bytes"] / max(base[b]["peak_bytes"], 1)
        fmt = lambda k: f"{row[k]:.3f}" if k in row else "-"  # noqa: E731
        print(f"{row['amp']:>4} {row['N']:>6} {row['variant']:>22} | {row['time_s'] * 1e3:>9.1f} | {row['peak_bytes'] / 2**20:>9.1f} | "
              f"{row.get('clusters_per_image', float('nan')):>7.1f} | {fmt('time_ratio_vs_sdpa'):>7} "
              f"{fmt('memory_ratio_vs_sdpa'):>8} | {fmt('time_ratio_vs_eager'):>7} {fmt('memory_ratio_vs_eager'):>9}")
    write_result(args.out, "benchmark_attention", device, rows, args={k: v for k, v in vars(args).items() if not k.startswith("worker")})


if __name__ == "__main__":
    main()
