#!/usr/bin/env python
"""Memory and time of whole detectors with and without ENACT (the paper's Table 1).

For every config (default: DETR R50, Conditional DETR R50 and Anchor DETR R50-DC5, each with and
without ENACT) and identical synthetic batches, measures

  train     one full training step: forward, loss, backward, gradient clipping (the config's
            train.clip_max_norm) and the config's optimizer step (AdamW)
  infer     one inference call in eval mode under torch.no_grad()
  encoder   forward + backward of ``model.transformer.encoder`` alone, on the inputs it receives
            inside the model (captured with a forward pre-hook: real feature-map shapes, masks and
            position encodings), train mode
  clusters  for ENACT models, the clusters per image of every encoder layer (eval-mode forward
            on the first batch, initial weights) and their mean over the layers

Batches: ``--batch`` images (default: the config's dataloader.train.total_batch_size, i.e. 8, and
4 for Anchor DETR, as in the paper) padded to ``--size H W`` (default 800 x 1333): image 0 is
exactly H x W, the others have random sides in [min-scale, 1] x (H, W) (so the batch carries
DETR's bottom / right padding), random uint8 pixels and 1..max-boxes random ground-truth boxes.
``--orientation mixed`` turns every odd image portrait (image 1 exactly W x H), so the batch pads
to max(H, W) squared: with the default size, 1333 x 1333 — what a COCO batch pads to when it
holds a landscape and a portrait image at the largest training scale, the batch that sets a
training run's peak memory.  Everything is seeded; every variant sees the same batch.

Time: the baseline and the ENACT variant of one detector live in one process, and their steps are
interleaved (train, infer, encoder for each variant, ``--repeats`` times after one warm-up);
the median is reported, per image (s/img, encoder ms/img).
Memory: one fresh process per (config, mode) after a warm-up step of the same mode and size.
On CUDA the peak of torch.cuda.max_memory_allocated during the measured step (weights,
gradients and optimizer state included, as the paper's GPU memory); on CPU the increase of the
peak RSS (VmHWM, reset before the step) over the RSS just before it (activations, gradients and
temporaries; weights and AdamW state are already resident), with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_) so that freed buffers leave the RSS.  ``--jobs N`` runs N memory
workers side by side (each measures only its own process; timing never overlaps them).
``--attention`` sets the backend ("sdpa" or "eager") of every encoder attention module that has
one, on both sides; encoders without such a module (Anchor DETR's RCDA) are labelled "rcda".
Dropout: on CPU, PyTorch's ``F.dropout`` keeps a float32 mask for backward where CUDA keeps a
1-byte one, which inflates every dropout's memory on CPU, most of all eager attention's (B, h, N, N)
dropout.  ``--dropout-mask bool`` runs every ``F.dropout`` as ``torch.native_dropout`` (the same
function, a bool mask), so that a CPU run stores what a GPU run stores; the default ``native``
leaves PyTorch's behaviour alone.

    python tools/benchmark.py                                          # the paper's sizes
    python tools/benchmark.py --batch 2 --size 512 768 --repeats 2     # a quick CPU run
    python tools/benchmark.py --device cuda --attention both
    python tools/benchmark.py --configs configs/shapes/detr_r18_shapes.py \\
        configs/shapes/detr_r18_shapes_enact.py --batch 1 --size 64 96 --opts model.num_queries=10

Profile: ``--profile DIR`` runs, after the timing, one more step of every (variant, mode) under
torch.profiler and writes its op table (sorted by self time) to DIR/<config>_<attention>_<mode>.txt;
the JSON and the Markdown get the time of the labelled ranges (``enact::cluster_keys_values``,
``enact::attend_clusters``, ``mhsa::attend_heads`` — every MultiheadAttention, the decoder's too:
forward, summed over the layers) and of the costliest backward functions, as a share of the
step's profiled op time.

Writes a Markdown table (``--out-md``, default output/benchmark.md) and the raw numbers
(``--out-json``, default output/benchmark.json).
"""
import argparse
import ctypes
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_utils import peak_rss_bytes, reset_peak_rss, rss_bytes, sync, timed  # noqa: E402

warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")

DEFAULT_CONFIGS = [
    "configs/detr_r50_300ep.py",
    "configs/detr_r50_300ep_enact.py",
    "configs/conditional_detr_r50_50ep.py",
    "configs/conditional_detr_r50_50ep_enact.py",
    "configs/anchor_detr_r50_dc5_50ep.py",
    "configs/anchor_detr_r50_dc5_50ep_enact.py",  # used if the file exists
]
MODES = ("train", "infer", "encoder")
BACKENDS = ("sdpa", "eager")
ORIENTATIONS = ("same", "mixed")
# Rough relative costs, only for the progress ETA.
_COST = {"train": 3.0, "infer": 1.0, "encoder": 0.5, "build": 1.5}
# record_function ranges of the attention modules (forward; backward shows as autograd functions)
PROFILE_RANGES = ("enact::cluster_keys_values", "enact::attend_clusters", "mhsa::attend_heads")
_BACKWARD = "autograd::engine::evaluate_function: "


# ------------------------------------------------------------------------------------ configs
def resolve_config(name: str) -> str:
    for cand in (name, os.path.join(ROOT, name), os.path.join(ROOT, "configs", name),
                 os.path.join(ROOT, "configs", name + ".py")):
        if os.path.isfile(cand):
            return os.path.abspath(cand)
    raise FileNotFoundError(f"config {name!r} not found (tried it as a path, under {ROOT} and under configs/)")


def config_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def detector_key(path: str) -> str:
    """Configs ``X.py`` and ``X_enact.py`` are the baseline and the ENACT variant of detector X."""
    name = config_name(path)
    return name[: -len("_enact")] if name.endswith("_enact") else name


def load_config(path: str, opts, device: str):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(path)
    cfg = LazyConfig.apply_overrides(cfg, list(opts or []))
    if "train" in cfg:
        cfg.train.device = device
    return cfg


def config_batch_size(cfg, default: int = 8) -> int:
    try:
        return int(cfg.dataloader.train.total_batch_size)
    except Exception:  # noqa: BLE001  (a config without a train loader)
        return default


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------ models
def set_encoder_attention(model, backend):
    """Set ``attention`` of every module of ``model.transformer.encoder`` that has one (MHSA,
    EnactAttention).  Returns how many were set (0: the encoder has no such module, e.g. RCDA)."""
    from projects.enact.modeling.attention import ATTENTION_BACKENDS

    count = 0
    for module in model.transformer.encoder.modules():
        if isinstance(getattr(module, "attention", None), str) and module.attention in ATTENTION_BACKENDS:
            if backend is not None:
                module.attention = backend
            count += 1
    return count


def encoder_kind(model) -> str:
    encoder = model.transformer.encoder
    names = [type(m).__name__ for m in encoder.modules()]
    return "rcda" if any("RCDA" in n for n in names) else "n/a"


def encoder_layer_statistics(encoder):
    """Per-layer ENACT statistics of the last call ([] for a model without ENACT)."""
    per_layer = []
    for layer in getattr(encoder, "layers", []):
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and callable(getattr(module, "statistics", None)):
                stats = module.statistics()
                if stats:
                    per_layer.append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
                    break
    return per_layer


def make_batch(batch, size, num_classes, seed, device, min_scale=0.6, max_boxes=5, orientation="same"):
    """``batch`` detectron2 inputs; image 0 is exactly ``size``, the others smaller (padding).
    orientation="mixed": odd images are portrait (sides of ``size`` swapped, image 1 exactly)."""
    from detectron2.structures import Boxes, Instances

    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for i in range(batch):
        portrait = orientation == "mixed" and i % 2 == 1
        height, width = (size[1], size[0]) if portrait else (size[0], size[1])
        if i < (2 if orientation == "mixed" else 1):
            h, w = height, width
        else:
            h = int(torch.randint(max(1, math.ceil(min_scale * height)), height + 1, (1,), generator=gen))
            w = int(torch.randint(max(1, math.ceil(min_scale * width)), width + 1, (1,), generator=gen))
        image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=gen))
        centre = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
        half = (0.05 + 0.45 * torch.rand(n, 2, generator=gen)) * torch.tensor([w, h]) / 2
        xyxy = torch.cat([(centre - half).clamp(min=0), torch.minimum(centre + half, torch.tensor([w, h]))], 1)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(xyxy.float())
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=gen)
        inputs.append({"image": image.to(device), "instances": inst.to(device), "height": h, "width": w})
    return inputs


class Runner:
    """One model with its optimizer and batch, and the three measured steps."""

    def __init__(self, path, args, backend, batch_size, device):
        from detectron2.config import instantiate

        self.path = path
        self.name = config_name(path)
        cfg = load_config(path, args.opts, str(device))
        seed_all(args.seed)
        self.model = instantiate(cfg.model).to(device)
        self.attention_modules = set_encoder_attention(self.model, backend)
        self.attention = backend if self.attention_modules else encoder_kind(self.model)
        cfg.optimizer.params.model = self.model
        self.optimizer = instantiate(cfg.optimizer)
        self.clip = float(cfg.train.get("clip_max_norm", 0.0)) if "train" in cfg else 0.0
        self.batch_size = batch_size
        num_classes = int(getattr(self.model, "num_classes", 80))
        self.batch = make_batch(batch_size, args.size, num_classes, args.seed, device,
                                args.min_scale, args.max_boxes, args.orientation)
        self.encoder = self.model.transformer.encoder
        self.encoder_inputs = None
        self.layer_stats = []

    # a first eval forward: captures the encoder's inputs and ENACT's clusters (initial weights)
    def prepare(self):
        captured = {}

        def hook(module, args, kwargs):
            detach = lambda x: x.detach().clone() if torch.is_tensor(x) else x  # noqa: E731
            captured["args"] = tuple(detach(a) for a in args)
            captured["kwargs"] = {k: detach(v) for k, v in kwargs.items()}

        handle = self.encoder.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.infer_step()
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError(f"{self.name}: model.transformer.encoder was not called by the model's forward")
        self.encoder_inputs = (captured["args"], captured["kwargs"])
        self.layer_stats = encoder_layer_statistics(self.encoder)

    def train_step(self):
        self.model.train()
        losses = self.model(self.batch)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()

    def infer_step(self):
        self.model.eval()
        with torch.no_grad():
            self.model(self.batch)

    def encoder_step(self):
        self.model.train()
        args, kwargs = self.encoder_inputs
        args, kwargs = list(args), dict(kwargs)
        if args and torch.is_tensor(args[0]):  # src: gradients flow back into it, as in the model
            args[0] = args[0].detach().requires_grad_()
        elif torch.is_tensor(kwargs.get("src")):
            kwargs["src"] = kwargs["src"].detach().requires_grad_()
        out = self.encoder(*args, **kwargs)
        out.sum().backward()
        self.model.zero_grad(set_to_none=True)

    def step(self, mode):
        return {"train": self.train_step, "infer": self.infer_step, "encoder": self.encoder_step}[mode]()


# ------------------------------------------------------------------------------------ memory
def profile_step(runner, mode, backend, device, out_dir):
    """One step of ``mode`` under torch.profiler: writes the op table, returns a summary (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        runner.step(mode)
        sync(device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{runner.name}_{backend}_{mode}.txt")
    with open(path, "w") as f:
        f.write(f"# {runner.name} [{backend}] {mode}: one step under torch.profiler, sorted by {sort}\n")
        f.write(events.table(sort_by=sort, row_limit=40))

    def total(e):  # inclusive time of a range / backward function, microseconds
        return getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) if cuda else e.cpu_time_total

    def self_time(e):
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) if cuda \
            else e.self_cpu_time_total

    step_us = sum(self_time(e) for e in events)
    ranges = {e.key: total(e) / 1e3 for e in events if e.key in PROFILE_RANGES}
    backward = sorted(((e.key[len(_BACKWARD):], total(e) / 1e3) for e in events if e.key.startswith(_BACKWARD)),
                      key=lambda kv: -kv[1])[:6]
    return {"table": os.path.relpath(path, ROOT) if path.startswith(ROOT) else path,
            "clock": "device" if cuda else "cpu", "step_ms": step_us / 1e3, "ranges_ms": ranges,
            "backward_ms": dict(backward)}


def use_bool_dropout_masks():
    """Route ``F.dropout`` (hence ``nn.Dropout``) through ``torch.native_dropout``: the same
    function, but backward keeps a bool mask instead of CPU dropout's float one.  Returns the
    function it replaced."""
    import torch.nn.functional as F

    plain = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0 or inplace or not 0.0 < p < 1.0:
            return plain(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    F.dropout = dropout
    return plain


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(args):
    """Runs in a fresh process: peak memory of one (config, mode); prints one JSON line."""
    device = torch.device(args.device)
    runner = Runner(args.worker_config, args, args.attention, args.batch, device)
    runner.prepare()
    mode = args.worker_mode
    runner.step(mode)  # warm-up: lazy initialisation, thread pools, AdamW state
    runner.optimizer.zero_grad(set_to_none=True)
    runner.model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        runner.step(mode)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        result = {"memory_bytes": peak, "peak_bytes": peak, "increase_bytes": max(peak - base, 0), "base_bytes": base}
    else:
        _malloc_trim()
        reset_peak_rss()
        base = rss_bytes()
        hwm_reset = peak_rss_bytes() <= base + (1 << 20)
        runner.step(mode)
        peak = peak_rss_bytes()
        result = {"memory_bytes": max(peak - base, 0), "peak_bytes": peak, "increase_bytes": max(peak - base, 0),
                  "base_bytes": base, "peak_reset": hwm_reset}
    print(json.dumps(result))


def measure_memory(args, path, mode, backend, batch_size):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-config", path, "--worker-mode", mode,
           "--attention", backend, "--batch", str(batch_size), "--size", *map(str, args.size),
           "--device", args.device, "--seed", str(args.seed), "--min-scale", str(args.min_scale),
           "--max-boxes", str(args.max_boxes), "--orientation", args.orientation,
           "--dropout-mask", args.dropout_mask]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.opts:
        cmd += ["--opts", *args.opts]
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # large buffers are mmap'ed, freed ones leave the RSS
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {config_name(path)} / {mode} failed (rc {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ progress
def _hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """A tqdm bar on a terminal, else one line per event; both with an ETA (costs are estimates)."""

    def __init__(self, total, quiet=False):
        self.total, self.done, self.t0, self.quiet = total, 0.0, time.perf_counter(), quiet
        self.bar = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=round(total, 1), file=sys.stderr, dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
            except ImportError:
                pass

    def update(self, cost, what):
        self.done = min(self.total, self.done + cost)
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_description(what[:60])
            self.bar.update(round(cost, 1))
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"[{100 * self.done / self.total:5.1f}%] {what}   elapsed {_hms(elapsed)}  ETA {_hms(eta)}",
              file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------ benchmark
def run_group(args, paths, backend, batch_size, device, progress):
    """Time the configs of one detector interleaved in this process, then their memory in workers."""
    tag = f"{detector_key(paths[0])} [{backend}]"
    runners = []
    for path in paths:
        runners.append(Runner(path, args, backend, batch_size, device))
        runners[-1].prepare()
        progress.update(_COST["build"] + _COST["infer"], f"{tag} built {runners[-1].name}")
    for mode in args.modes:  # warm-up (the eval forward of prepare() warmed up inference)
        if mode == "infer":
            continue
        for r in runners:
            r.step(mode)
            progress.update(_COST[mode], f"{tag} warm-up {r.name} {mode}")
    times = {r.name: {m: [] for m in args.modes} for r in runners}
    for rep in range(args.repeats):
        for mode in args.modes:
            for r in runners:  # interleaved: baseline, ENACT, baseline, ...
                times[r.name][mode].append(timed(lambda: r.step(mode), device))
                progress.update(_COST[mode], f"{tag} repeat {rep + 1}/{args.repeats} {r.name} {mode}")
    profiles = {r.name: {} for r in runners}
    if args.profile:  # after the timing, so the profiler never slows a timed step
        for mode in args.modes:
            for r in runners:
                profiles[r.name][mode] = profile_step(r, mode, backend, device, args.profile)
                progress.update(_COST[mode], f"{tag} profiled {r.name} {mode}")
    rows = []
    for r in runners:
        row = {
            "config": os.path.relpath(r.path, ROOT), "model": r.name, "detector": detector_key(r.path),
            "variant": "enact" if r.name.endswith("_enact") else "baseline", "attention": r.attention,
            "attention_modules_set": r.attention_modules, "batch": batch_size, "size": list(args.size),
            "params": sum(p.numel() for p in r.model.parameters()),
        }
        for mode in args.modes:
            med = statistics.median(times[r.name][mode])
            row[f"{mode}_times_s"] = times[r.name][mode]
            if mode == "encoder":
                row["encoder_ms_per_batch"] = med * 1e3
                row["encoder_ms_per_img"] = med * 1e3 / batch_size
            else:
                row[f"{mode}_s_per_img"] = med / batch_size
        if r.layer_stats:
            row["clusters_per_layer"] = [s["clusters_per_image"] for s in r.layer_stats]
            row["clusters_mean"] = statistics.mean(row["clusters_per_layer"])
            if all("compression" in s for s in r.layer_stats):
                row["compression_mean"] = statistics.mean(s["compression"] for s in r.layer_stats)
            row["enact_layer_stats"] = r.layer_stats
        if profiles[r.name]:
            row["profile"] = profiles[r.name]
        rows.append(row)
    del runners, r
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    jobs = [(row, mode) for row in rows for mode in args.modes]

    def work(job):
        row, mode = job
        return measure_memory(args, resolve_config(row["config"]), mode, backend, batch_size)

    # Each worker measures its own process, so workers may run side by side (--jobs); timing is
    # never measured while they run.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (row, mode), mem in zip(jobs, pool.map(work, jobs)):
            row[f"{mode}_memory_bytes"] = mem["memory_bytes"]
            row[f"{mode}_memory"] = mem
            progress.update(_COST["build"] + 2 * _COST[mode] + _COST["infer"], f"{tag} memory {row['model']} {mode}")
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    for row in rows:
        if base is None or row is base:
            continue
        for mode in args.modes:
            b = base.get(f"{mode}_memory_bytes")
            if b:
                row[f"{mode}_memory_gain"] = 1.0 - row[f"{mode}_memory_bytes"] / b
            key = "encoder_ms_per_img" if mode == "encoder" else f"{mode}_s_per_img"
            if base.get(key):
                row[f"{mode}_time_ratio"] = row[key] / base[key]
    return rows


def _mem(nbytes):
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _gain(row, mode):
    g = row.get(f"{mode}_memory_gain")
    return "-" if g is None else f"{100 * g:.1f}%"


def _time(row, key, mode, scale=1.0, digits=4):
    if key not in row:
        return "-"
    text = f"{row[key] * scale:.{digits}f}"
    ratio = row.get(f"{mode}_time_ratio")
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def profile_lines(rows):
    """One line per profiled (variant, mode): labelled ranges and costliest backward functions."""
    lines = []
    for row in rows:
        for mode, prof in row.get("profile", {}).items():
            step = prof["step_ms"] or 1.0
            parts = [f"{k} {v:.1f} ms ({v / step:.0%})" for k, v in prof["ranges_ms"].items()]
            parts += [f"{k} {v:.1f} ms ({v / step:.0%})" for k, v in list(prof["backward_ms"].items())[:3]]
            lines.append(f"- {row['model']} [{row['attention']}] {mode}: {prof['step_ms']:.1f} ms of {prof['clock']} "
                         f"op time; " + "; ".join(parts) + f" (`{prof['table']}`)")
    return lines


def markdown_table(rows):
    lines = [
        "| model | attention | batch | train mem | gain | train s/img | infer mem | gain | infer s/img "
        "| encoder ms/img | encoder mem | gain | clusters/layer (N/M) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        clusters = "-"
        if "clusters_mean" in r:
            clusters = f"{r['clusters_mean']:.1f}"
            if "compression_mean" in r:
                clusters += f" ({r['compression_mean']:.1f}x)"
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['batch']} | {_mem(r.get('train_memory_bytes'))} | {_gain(r, 'train')} "
            f"| {_time(r, 'train_s_per_img', 'train')} | {_mem(r.get('infer_memory_bytes'))} | {_gain(r, 'infer')} "
            f"| {_time(r, 'infer_s_per_img', 'infer')} | {_time(r, 'encoder_ms_per_img', 'encoder', digits=2)} "
            f"| {_mem(r.get('encoder_memory_bytes'))} | {_gain(r, 'encoder')} | {clusters} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None,
                   help="LazyConfig files (paths, or names under configs/); X and X_enact are paired")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: the config's, 8 / 4)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"),
                   help="padded batch size (default 800 1333)")
    p.add_argument("--orientation", choices=ORIENTATIONS, default="same",
                   help="mixed: odd images portrait, the batch padded to max(H, W) squared (default same)")
    p.add_argument("--dropout-mask", choices=("native", "bool"), default="native",
                   help="bool: F.dropout as torch.native_dropout, so CPU keeps CUDA's 1-byte masks (default native)")
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
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--worker-mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dropout_mask == "bool":
        use_bool_dropout_masks()
    if args.worker_config:
        return memory_worker(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    if args.configs is None:
        paths = [resolve_config(c) for c in DEFAULT_CONFIGS if os.path.isfile(os.path.join(ROOT, c))]
    else:
        paths = [resolve_config(c) for c in args.configs]
    groups = {}
    for path in paths:
        groups.setdefault(detector_key(path), []).append(path)
    for key in groups:  # baseline first
        groups[key].sort(key=lambda q: config_name(q).endswith("_enact"))
    backends = list(BACKENDS) if args.attention == "both" else [args.attention]

    sizes = {}
    for key, members in groups.items():
        cfg = load_config(members[0], args.opts, str(device))
        sizes[key] = args.batch or config_batch_size(cfg)
    if args.orientation == "mixed":
        padded = (max(args.size),) * 2
        layout = f"image 0 {args.size[0]}x{args.size[1]}, image 1 portrait {args.size[1]}x{args.size[0]}, odd images portrait"
    else:
        padded, layout = tuple(args.size), "image 0 full size"
    command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    memory_measure = (
        "torch.cuda.max_memory_allocated during one step after a warm-up step (weights, grads, optimizer state included)"
        if device.type == "cuda" else
        "peak-RSS increase over the RSS just before one step, after a warm-up step; fresh process per (config, mode)"
    )
    header = [
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"sizes: padded {padded[0]}x{padded[1]} ({layout}, others >= {args.min_scale:g}x per side), "
        + ", ".join(f"{k}: batch {b}" for k, b in sizes.items())
        + (" (--batch)" if args.batch else " (configs' batch sizes)"),
        f"attention: {', '.join(backends)} (encoder attention modules of both sides); repeats {args.repeats} "
        f"interleaved, median; seed {args.seed}",
        f"memory: {memory_measure}; dropout masks: "
        + ("bool (F.dropout as torch.native_dropout)" if args.dropout_mask == "bool"
           else "PyTorch's (float32 on CPU, bool on CUDA)"),
        "time: train = forward + backward + clip + AdamW step, infer = eval forward under no_grad, "
        "encoder = forward + backward of model.transformer.encoder on its captured inputs",
    ]
    if args.opts:
        header.append("overrides: " + " ".join(args.opts))
    print("\n".join(header), flush=True)

    group_cost = {
        key: len(members) * (_COST["build"] + _COST["infer"]
                             + sum(_COST[m] * (args.repeats + (m != "infer") + bool(args.profile))
                                   for m in args.modes)
                             + sum(_COST["build"] + 2 * _COST[m] + _COST["infer"] for m in args.modes))
        for key, members in groups.items()
    }
    progress = Progress(sum(group_cost.values()) * len(backends), quiet=args.quiet)
    rows = []
    t0 = time.perf_counter()

    def write(complete):
        """Both outputs; rewritten after every detector, so an interrupted run keeps its results."""
        table = markdown_table(rows)
        status = [] if complete else ["", "**partial: the run was interrupted or is still running**"]
        md = (["# Detector benchmark (tools/benchmark.py)", "", f"`{command}`", ""] + [f"- {h}" for h in header]
              + status + ["", table, ""])
        if args.profile:
            md += ["## torch.profiler, one step each (inclusive times; share of the step's op time)", ""]
            md += profile_lines(rows) + [""]
        result = {
            "tool": "benchmark", "command": command, "complete": complete, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
            "sizes": {k: {"batch": b, "size": list(args.size), "padded": list(padded), "orientation": args.orientation}
                      for k, b in sizes.items()},
            "attention_backends": backends, "memory_measure": memory_measure, "rows": rows, "markdown": table,
        }
        for out, text in ((args.out_md, "\n".join(md)), (args.out_json, json.dumps(result, indent=2))):
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".tmp", "w") as f:
                f.write(text)
            os.replace(out + ".tmp", out)
        return table

    try:
        for key, members in groups.items():
            for i, backend in enumerate(backends):
                if i and not any(r["attention_modules_set"] for r in group_rows):
                    progress.update(group_cost[key], f"{key}: no encoder attention backend to switch, skipped")
                    continue  # e.g. RCDA on both sides: another run would repeat the first
                group_rows = run_group(args, members, backend, sizes[key], device, progress)
                rows.extend(group_rows)
                write(complete=False)
    finally:
        progress.close()
    table = write(complete=True)
    print("\n" + table)
    if args.profile:
        print("\n" + "\n".join(profile_lines(rows)))
    print(f"\ntotal {_hms(time.perf_counter() - t0)}")
    print(f"wrote {args.out_md} and {args.out_json}")


if __name__ == "__main__":
    main()
