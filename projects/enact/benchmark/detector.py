"""The whole-detector benchmark behind ``tools/benchmark.py`` (the paper's Table 1): memory and time
of detectors with and without ENACT on identical synthetic batches.  What is measured, and how,
is described in tools/benchmark.py's docstring (its ``--help``).

Flow: ``parse_args`` -> ``run`` -> ``make_plan`` (configs paired per detector, batch sizes,
header) -> ``run_group`` per (detector, attention backend): build ``Runner``s, warm up, time
interleaved, profile, then memory in fresh worker processes -> ``write_outputs`` (Markdown +
JSON, rewritten after every group).  The memory workers run this module
(``python -m projects.enact.benchmark.detector --worker-config ...``).
"""
import argparse
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from .report import Progress, hms, markdown_document, markdown_table, profile_lines, write_atomic
from .runner import (
    MODES, ORIENTATIONS, ROOT, Runner, config_batch_size, config_name, detector_key, load_config, memory_worker,
    profile_step, resolve_config, split_spec, variant, with_query_ratio,
)
from .utils import device_name, timed

WORKER_MODULE = "projects.enact.benchmark.detector"
DEFAULT_CONFIGS = [
    "configs/detr_r50_300ep.py",
    "configs/detr_r50_300ep_enact.py",
    "configs/conditional_detr_r50_50ep.py",
    "configs/conditional_detr_r50_50ep_enact.py",
    "configs/anchor_detr_r50_dc5_50ep.py",
    "configs/anchor_detr_r50_dc5_50ep_enact.py",  # used if the file exists
]
BACKENDS = ("sdpa", "eager")
DROPOUT_MASKS = ("native", "bool")
# Rough relative costs, only for the progress ETA.
_COST = {"train": 3.0, "infer": 1.0, "encoder": 0.5, "build": 1.5}


# ------------------------------------------------------------------------------------ memory
def worker_command(args, path, mode, backend, batch_size):
    """The command line of the memory worker of one (config, mode)."""
    cmd = [sys.executable, "-m", WORKER_MODULE, "--worker-config", path, "--worker-mode", mode,
           "--attention", backend, "--batch", str(batch_size), "--size", *map(str, args.size),
           "--device", args.device, "--seed", str(args.seed), "--min-scale", str(args.min_scale),
           "--max-boxes", str(args.max_boxes), "--orientation", args.orientation,
           "--dropout-mask", args.dropout_mask, "--amp", args.amp]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.opts:
        cmd += ["--opts", *args.opts]
    return cmd


def measure_memory(args, path, mode, backend, batch_size):
    """Run the memory worker of one (config, mode) in a fresh process; returns its JSON result."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # large buffers are mmap'ed, freed ones leave the RSS
    proc = subprocess.run(worker_command(args, path, mode, backend, batch_size), capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {config_name(path)} / {mode} failed (rc {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ one group
def run_group(args, paths, backend, batch_size, device, progress):
    """Time the configs of one detector interleaved in this process, then their memory in workers."""
    tag = f"{detector_key(paths[0])} [{backend}]"
    runners = build_runners(args, paths, backend, batch_size, device, progress, tag)
    warm_up(runners, args.modes, progress, tag)
    times = time_runners(runners, args, device, progress, tag)
    profiles = profile_runners(runners, args, backend, device, progress, tag)
    rows = [result_row(args, r, batch_size, times[r.name], profiles[r.name]) for r in runners]
    del runners
    release_memory(device)
    measure_group_memory(args, rows, backend, batch_size, progress, tag)
    add_baseline_ratios(rows, args.modes)
    return rows


def build_runners(args, paths, backend, batch_size, device, progress, tag):
    """A prepared Runner per config (built, first eval forward done)."""
    runners = []
    for path in paths:
        runner = Runner(path, args, backend, batch_size, device)
        runner.prepare()
        runners.append(runner)
        progress.update(_COST["build"] + _COST["infer"], f"{tag} built {runner.name}")
    return runners


def warm_up(runners, modes, progress, tag):
    """One step of every mode but "infer" per runner (prepare()'s eval forward warmed up inference)."""
    for mode in modes:
        if mode == "infer":
            continue
        for r in runners:
            r.step(mode)
            progress.update(_COST[mode], f"{tag} warm-up {r.name} {mode}")


def time_runners(runners, args, device, progress, tag):
    """Seconds of every step, {model: {mode: [s, ...]}}; the runners' steps are interleaved."""
    times = {r.name: {m: [] for m in args.modes} for r in runners}
    for rep in range(args.repeats):
        for mode in args.modes:
            for r in runners:  # interleaved: baseline, ENACT, baseline, ...
                times[r.name][mode].append(timed(lambda: r.step(mode), device))
                progress.update(_COST[mode], f"{tag} repeat {rep + 1}/{args.repeats} {r.name} {mode}")
    return times


def profile_runners(runners, args, backend, device, progress, tag):
    """{model: {mode: profile summary}} with --profile, else {model: {}}; after the timing, so the
    profiler never slows a timed step."""
    profiles = {r.name: {} for r in runners}
    if args.profile:
        for mode in args.modes:
            for r in runners:
                profiles[r.name][mode] = profile_step(r, mode, backend, device, args.profile)
                progress.update(_COST[mode], f"{tag} profiled {r.name} {mode}")
    return profiles


def result_row(args, runner, batch_size, times, profile):
    """The output row of one runner: what it is, its median times, its clusters and profile."""
    row = {
        "config": os.path.relpath(runner.path, ROOT), "model": runner.name, "detector": detector_key(runner.path),
        "variant": variant(runner.path), "attention": runner.attention,
        "attention_modules_set": runner.attention_modules, "batch": batch_size, "size": list(args.size),
        "amp": args.amp,
        "params": sum(p.numel() for p in runner.model.parameters()),
    }
    for mode, seconds in times.items():
        med = statistics.median(seconds)
        row[f"{mode}_times_s"] = seconds
        if mode == "encoder":
            row["encoder_ms_per_batch"] = med * 1e3
            row["encoder_ms_per_img"] = med * 1e3 / batch_size
        else:
            row[f"{mode}_s_per_img"] = med / batch_size
    if runner.layer_stats:
        add_clusters(row, runner.layer_stats)
    if profile:
        row["profile"] = profile
    return row


def add_clusters(row, layer_stats):
    """The clustering attention's (ENACT's, ACT's) clusters per image of every encoder layer,
    their mean and the mean compression (key ``enact_layer_stats`` for either)."""
    row["clusters_per_layer"] = [s["clusters_per_image"] for s in layer_stats]
    row["clusters_mean"] = statistics.mean(row["clusters_per_layer"])
    if all("compression" in s for s in layer_stats):
        row["compression_mean"] = statistics.mean(s["compression"] for s in layer_stats)
    row["enact_layer_stats"] = layer_stats


def release_memory(device):
    """Free what the group's models left behind before the memory workers start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_group_memory(args, rows, backend, batch_size, progress, tag):
    """Every (row, mode)'s memory from its own worker process, ``--jobs`` workers side by side (each
    measures only its own process; timing is never measured while they run)."""
    jobs = [(row, mode) for row in rows for mode in args.modes]

    def work(job):
        row, mode = job
        return measure_memory(args, resolve_config(row["config"]), mode, backend, batch_size)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (row, mode), mem in zip(jobs, pool.map(work, jobs)):
            row[f"{mode}_memory_bytes"] = mem["memory_bytes"]
            row[f"{mode}_memory"] = mem
            progress.update(_COST["build"] + 2 * _COST[mode] + _COST["infer"], f"{tag} memory {row['model']} {mode}")


def add_baseline_ratios(rows, modes):
    """Every non-baseline row's memory gain and time ratio over the group's baseline, per mode."""
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    for row in rows:
        if base is None or row is base:
            continue
        for mode in modes:
            b = base.get(f"{mode}_memory_bytes")
            if b:
                row[f"{mode}_memory_gain"] = 1.0 - row[f"{mode}_memory_bytes"] / b
            key = "encoder_ms_per_img" if mode == "encoder" else f"{mode}_s_per_img"
            if base.get(key):
                row[f"{mode}_time_ratio"] = row[key] / base[key]


# ------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """What one run measures, fixed before its first step."""

    device: torch.device
    groups: Dict[str, List[str]]  # detector key -> its config paths, the baseline first
    backends: List[str]  # encoder attention backends: one run of every group each
    sizes: Dict[str, int]  # detector key -> images per batch
    padded: Tuple[int, int]  # (H, W) every batch is padded to
    layout: str  # which images have which sides, in words
    command: str  # the command line, as the outputs quote it
    memory_measure: str  # how memory is measured, in words
    header: List[str]  # the header lines: printed, and written into both outputs


def make_plan(args):
    """The Plan of the parsed arguments: configs paired per detector, batch sizes, header."""
    device = torch.device(args.device)
    groups = group_configs(expand_query_ratios(config_paths(args.configs), args.query_ratios))
    sizes = {key: args.batch or config_batch_size(load_config(members[0], args.opts, str(device)))
             for key, members in groups.items()}
    padded, layout = batch_layout(args.size, args.orientation)
    plan = Plan(
        device=device, groups=groups, backends=list(BACKENDS) if args.attention == "both" else [args.attention],
        sizes=sizes, padded=padded, layout=layout,
        command="python tools/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        memory_measure=memory_measure(device), header=[],
    )
    plan.header = header_lines(args, plan)
    return plan


def config_paths(configs):
    """The resolved ``--configs``; by default those of DEFAULT_CONFIGS that exist."""
    if configs is None:
        return [resolve_config(c) for c in DEFAULT_CONFIGS if os.path.isfile(os.path.join(ROOT, c))]
    return [resolve_config(c) for c in configs]


def expand_query_ratios(paths, ratios):
    """Every Sparse DETR config (``X_sparse*.py``) once per query ratio in ``ratios`` (``PATH@RHO``);
    the others as they are.  ``ratios`` None: unchanged."""
    if not ratios:
        return paths
    for rho in ratios:
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"--query-ratios: {rho} is not in (0, 1]")
    out = []
    for path in paths:
        sparse = variant(path).startswith("sparse") and split_spec(path)[1] is None
        out.extend([with_query_ratio(path, rho) for rho in ratios] if sparse else [path])
    return out


def group_configs(paths):
    """{detector key: its config paths}, the baseline of every detector first."""
    groups = {}
    for path in paths:
        groups.setdefault(detector_key(path), []).append(path)
    for members in groups.values():
        members.sort(key=lambda q: variant(q) != "baseline")  # stable: the variants keep their order
    return groups


def batch_layout(size, orientation):
    """The padded (H, W) of a batch and its layout in words."""
    if orientation == "mixed":
        return (max(size),) * 2, (f"image 0 {size[0]}x{size[1]}, image 1 portrait {size[1]}x{size[0]}, "
                                  "odd images portrait")
    return tuple(size), "image 0 full size"


def memory_measure(device):
    """How memory is measured on ``device``, in words."""
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated during one step after a warm-up step "
                "(weights, grads, optimizer state included)")
    return "peak-RSS increase over the RSS just before one step, after a warm-up step; fresh process per (config, mode)"


def header_lines(args, plan):
    """The run's settings in words: device, sizes, attention, memory, time and overrides."""
    dropout = ("bool (F.dropout as torch.native_dropout)" if args.dropout_mask == "bool"
               else "PyTorch's (float32 on CPU, bool on CUDA)")
    header = [
        f"device: {plan.device} ({device_name(plan.device)}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}",
        f"sizes: padded {plan.padded[0]}x{plan.padded[1]} ({plan.layout}, others >= {args.min_scale:g}x per side), "
        + ", ".join(f"{k}: batch {b}" for k, b in plan.sizes.items())
        + (" (--batch)" if args.batch else " (configs' batch sizes)"),
        f"attention: {', '.join(plan.backends)} (encoder attention modules of both sides); repeats {args.repeats} "
        f"interleaved, median; seed {args.seed}",
        f"memory: {plan.memory_measure}; dropout masks: {dropout}; precision: "
        + ("float32" if args.amp == "none" else f"torch.autocast {args.amp} (--amp)"),
        "time: train = forward + backward + clip + AdamW step, infer = eval forward under no_grad, "
        "encoder = forward + backward of model.transformer.encoder on its captured inputs",
    ]
    if args.opts:
        header.append("overrides: " + " ".join(args.opts))
    return header


def group_cost(args, members):
    """Estimated cost of one backend run of a group (for the ETA): build and prepare, warm-up,
    repeats and profile of every mode, one memory worker per mode; per config."""
    steps = sum(_COST[m] * (args.repeats + (m != "infer") + bool(args.profile)) for m in args.modes)
    memory = sum(_COST["build"] + 2 * _COST[m] + _COST["infer"] for m in args.modes)
    return len(members) * (_COST["build"] + _COST["infer"] + steps + memory)


# ------------------------------------------------------------------------------------ outputs
def result_json(args, plan, rows, table, complete):
    """The JSON output: the machine, the arguments, the sizes and the rows."""
    return {
        "tool": "benchmark", "command": plan.command, "complete": complete, "device": str(plan.device),
        "device_name": device_name(plan.device), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "sizes": {k: {"batch": b, "size": list(args.size), "padded": list(plan.padded), "orientation": args.orientation}
                  for k, b in plan.sizes.items()},
        "attention_backends": plan.backends, "memory_measure": plan.memory_measure, "rows": rows, "markdown": table,
    }


def write_outputs(args, plan, rows, complete):
    """Both outputs (rewritten after every group, so an interrupted run keeps its results); returns the table."""
    table = markdown_table(rows)
    write_atomic(args.out_md, markdown_document(plan.command, plan.header, table, rows, complete, bool(args.profile)))
    write_atomic(args.out_json, json.dumps(result_json(args, plan, rows, table, complete), indent=2))
    return table


def print_summary(args, table, rows, seconds):
    """The final table, the profile lines, the total time and where the outputs are."""
    print("\n" + table)
    if args.profile:
        print("\n" + "\n".join(profile_lines(rows)))
    print(f"\ntotal {hms(seconds)}")
    print(f"wrote {args.out_md} and {args.out_json}")


# ------------------------------------------------------------------------------------ run
def run_benchmark(args):
    """The whole benchmark: the plan, every group and backend, the outputs, the summary."""
    plan = make_plan(args)
    if plan.device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    print("\n".join(plan.header), flush=True)
    progress = Progress(sum(group_cost(args, m) for m in plan.groups.values()) * len(plan.backends), quiet=args.quiet)
    rows = []
    t0 = time.perf_counter()
    try:
        for key in plan.groups:
            run_detector(args, plan, key, progress, rows)
    finally:
        progress.close()
    print_summary(args, write_outputs(args, plan, rows, complete=True), rows, time.perf_counter() - t0)


def run_detector(args, plan, key, progress, rows):
    """Every attention backend of one detector's group; appends the rows and rewrites the outputs
    after each.  A second backend is skipped when neither side has a backend to switch."""
    members = plan.groups[key]
    group_rows = []
    for i, backend in enumerate(plan.backends):
        if i and not any(r["attention_modules_set"] for r in group_rows):
            progress.update(group_cost(args, members), f"{key}: no encoder attention backend to switch, skipped")
            continue  # e.g. RCDA on both sides: another run would repeat the first
        group_rows = run_group(args, members, backend, plan.sizes[key], plan.device, progress)
        rows.extend(group_rows)
        write_outputs(args, plan, rows, complete=False)


def build_parser(description=None):
    """The command line of tools/benchmark.py (and of the memory workers, the hidden --worker-*)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None,
                   help="LazyConfig files (paths, or names under configs/); X, X_enact, X_act are grouped")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: the config's, 8 / 4)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"),
                   help="padded batch size (default 800 1333)")
    p.add_argument("--orientation", choices=ORIENTATIONS, default="same",
                   help="mixed: odd images portrait, the batch padded to max(H, W) squared (default same)")
    p.add_argument("--dropout-mask", choices=DROPOUT_MASKS, default="native",
                   help="bool: F.dropout as torch.native_dropout, so CPU keeps CUDA's 1-byte masks (default native)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="every step under torch.autocast with this dtype (default none: float32; fp16 is for CUDA)")
    p.add_argument("--min-scale", type=float, default=0.6, help="smallest side of images 1.. as a fraction of --size")
    p.add_argument("--max-boxes", type=int, default=5, help="ground-truth boxes per image: 1..max-boxes")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats after one warm-up")
    p.add_argument("--attention", choices=[*BACKENDS, "both"], default="sdpa",
                   help="backend of every encoder attention module (both: one run per backend)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1,
                   help="memory workers run side by side (each measures only itself; default 1)")
    p.add_argument("--out-md", default="output/benchmark.md")
    p.add_argument("--out-json", default="output/benchmark.json")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="after the timing, one step per (variant, mode) under torch.profiler; op tables to DIR")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--opts", nargs="*", default=[], help="LazyConfig overrides (key=value) applied to every config")
    p.add_argument("--query-ratios", type=float, nargs="+", default=None,
                   help="run every Sparse DETR config (X_sparse*.py) at each of these rho (one row each)")
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--worker-mode", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None, description=None):
    """The parsed command line; exits with a usage error for --device cuda without CUDA."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args


def run(args):
    """What the parsed arguments ask for: one memory worker (--worker-config) or the whole benchmark."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_config:
        return memory_worker(args)
    return run_benchmark(args)


if __name__ == "__main__":  # the memory workers (worker_command)
    run(parse_args())
