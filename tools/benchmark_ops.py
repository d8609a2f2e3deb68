#!/usr/bin/env python
"""Benchmark the enact_ops operators: compiled kernels vs the pure-PyTorch reference.

For each sequence length N it times (median of interleaved repeats, both backends in one
process) ENACT's steps 1-4 forward + backward (``smoothed_information``, sigma = 5), the
segmentation (``segment_runs``) and the fused pooling of keys and values, forward + backward
(``segment_softmax_pool``), and measures the peak memory of the pooling:
on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the peak-RSS increase over
the process's state just before the measured calls, one fresh process per (backend, N).

    python tools/benchmark_ops.py                       # B=8, N in {850, 3400, 13600}, C=256
    python tools/benchmark_ops.py --device cuda --out bench_ops_cuda.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import enact_ops  # noqa: E402
from projects.enact.benchmark.utils import peak_memory_increase, timed, write_result  # noqa: E402
from projects.enact.modeling.enact import gaussian_kernel  # noqa: E402

BACKENDS = ("compiled", "reference")


def make_inputs(batch, seq_len, channels, mean_run, device, dtype, seed=0):
    """Keys, values, scores and a sign pattern whose runs have geometric lengths (mean_run),
    with DETR-style padding on half the batch (the last 10% of tokens)."""
    g = torch.Generator().manual_seed(seed)
    flips = torch.rand(batch, seq_len, generator=g) < 1.0 / mean_run
    sign = (torch.cumsum(flips.long(), 1) % 2).bool()
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[::2, int(seq_len * 0.9):] = True
    scores = torch.randn(batch, seq_len, generator=g)
    k = torch.randn(batch, seq_len, channels, generator=g)
    v = torch.randn(batch, seq_len, channels, generator=g)
    to = dict(device=device)
    return sign.to(**to), mask.to(**to), scores.to(**to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to)


def pool_step(backend, sign, mask, scores, k, v, seg=None):
    if seg is None:
        seg = enact_ops.segment_runs(sign, mask, backend=backend)
    s, kk, vv = (t.detach().requires_grad_() for t in (scores, k, v))
    pooled, _, _ = enact_ops.segment_softmax_pool(s, [kk, vv], seg, backend=backend)
    (pooled[0].float().sum() + pooled[1].float().sum()).backward()


def steps_step(backend, logits, mask, taps):
    """Steps 1-4 forward + backward from W_prob's logits."""
    logits = logits.detach().requires_grad_()
    enact_ops.smoothed_information(logits, taps, mask, backend=backend).smoothed.sum().backward()


def time_case(args, seq_len, device):
    inputs = make_inputs(args.batch, seq_len, args.channels, args.mean_run, device, args.dtype)
    sign, mask, scores = inputs[:3]
    taps = gaussian_kernel(5, 15, torch.float32, device)  # DETR's sigma
    segs = {b: enact_ops.segment_runs(sign, mask, backend=b) for b in BACKENDS}
    times = {f"{op}/{b}": [] for op in ("steps", "segment", "pool") for b in BACKENDS}
    for b in BACKENDS:  # warm-up
        pool_step(b, *inputs, seg=segs[b])
        steps_step(b, scores, mask, taps)
    for _ in range(args.repeats):
        for b in BACKENDS:  # interleaved
            times[f"steps/{b}"].append(timed(lambda: steps_step(b, scores, mask, taps), device))
            times[f"segment/{b}"].append(timed(lambda: enact_ops.segment_runs(sign, mask, backend=b), device))
            times[f"pool/{b}"].append(timed(lambda: pool_step(b, *inputs, seg=segs[b]), device))
    return {key: statistics.median(v) for key, v in times.items()}, segs["compiled"].max_clusters


def memory_worker(args):
    """Runs in a fresh process: peak memory of one pooling forward+backward."""
    device = torch.device(args.device)
    # warm-up on a tiny case: thread pools, autograd engine and lazy inits are not the op's memory
    pool_step(args.worker_backend, *make_inputs(2, 64, 8, args.mean_run, device, args.dtype))
    inputs = make_inputs(args.batch, args.worker_n, args.channels, args.mean_run, device, args.dtype)
    seg = enact_ops.segment_runs(*inputs[:2], backend=args.worker_backend)
    peak = peak_memory_increase(lambda: pool_step(args.worker_backend, *inputs, seg=seg), device)
    print(json.dumps({"peak_bytes": peak}))


def measure_memory(args, seq_len, backend):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-n", str(seq_len), "--worker-backend", backend,
           "--batch", str(args.batch), "--channels", str(args.channels), "--mean-run", str(args.mean_run),
           "--device", args.device, "--dtype", str(args.dtype).replace("torch.", "")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[850, 3400, 13600])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--mean-run", type=float, default=8.0, help="mean cluster length of the synthetic signs")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--out", default="output/benchmark_ops.json")
    p.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-backend", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.worker_n is not None:
        return memory_worker(args)
    device = torch.device(args.device)
    if not enact_ops.compiled_available(device):
        sys.exit(f"benchmark_ops: the compiled extension is not available for {device}; run `pip install -e .`")
    rows = []
    header = (f"{'N':>6} {'M_max':>6} | {'steps 1-4 fwd+bwd ms (ext / ref)':>33} | {'segment ms (ext / ref)':>24} |"
              f" {'pool fwd+bwd ms (ext / ref)':>28} |"
              f" {'speed-up':>8} | {'peak MiB (ext / ref)':>21} | {'mem ratio':>9}")
    print(f"enact_ops benchmark: B={args.batch} C={args.channels} dtype={args.dtype} device={device} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(header)
    print("-" * len(header))
    for i, n in enumerate(args.seq_lens):
        print(f"[{i + 1}/{len(args.seq_lens)}] N={n} ...", file=sys.stderr, flush=True)
        times, width = time_case(args, n, device)
        mem = {b: measure_memory(args, n, b) for b in BACKENDS}
        ext_total = times["steps/compiled"] + times["segment/compiled"] + times["pool/compiled"]
        ref_total = times["steps/reference"] + times["segment/reference"] + times["pool/reference"]
        row = dict(N=n, M_max=width, times_s=times, peak_bytes=mem,
                   speedup=ref_total / ext_total, memory_ratio=mem["compiled"] / max(mem["reference"], 1))
        rows.append(row)
        print(f"{n:>6} {width:>6} | {times['steps/compiled'] * 1e3:>15.2f} / {times['steps/reference'] * 1e3:>15.2f}"
              f" | {times['segment/compiled'] * 1e3:>10.2f} / {times['segment/reference'] * 1e3:>10.2f}"
              f"  | {times['pool/compiled'] * 1e3:>12.2f} / {times['pool/reference'] * 1e3:>12.2f}  |"
              f" {row['speedup']:>7.2f}x | {mem['compiled'] / 2**20:>9.1f} / {mem['reference'] / 2**20:>9.1f} |"
              f" {row['memory_ratio']:>8.2f}x")
    write_result(args.out, "benchmark_ops", device, rows, batch=args.batch, channels=args.channels, dtype=str(args.dtype), mean_run=args.mean_run, repeats=args.repeats)


if __name__ == "__main__":
    main()
