"""One detector under measurement, for the detector benchmark (``detector``): its config, a
synthetic batch, the three measured steps (``Runner``), a profiled step and the memory worker's
measurement of one step.

detectron2 is imported only inside the functions that need it.
"""
import contextlib
import ctypes
import gc
import json
import math
import os
import random

import torch
import torch.nn.functional as F

from .utils import peak_rss_bytes, reset_peak_rss, rss_bytes, sync

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODES = ("train", "infer", "encoder")
ORIENTATIONS = ("same", "mixed")
# record_function ranges of the attention modules (forward; backward shows as autograd functions)
PROFILE_RANGES = ("enact::cluster_keys_values", "enact::attend_clusters", "act::cluster_queries",
                  "act::attend_prototypes", "mhsa::attend_heads")
# config-name suffix -> variant label: X.py is detector X's baseline, X_enact.py / X_act.py its variants
# longest first: X_sparse_enact.py is a variant of X, not of X_sparse
VARIANT_SUFFIXES = {"_sparse_enact": "sparse+enact", "_sparse": "sparse", "_enact": "enact", "_act": "act"}
_BACKWARD = "autograd::engine::evaluate_function: "


# ------------------------------------------------------------------------------------ configs
# A config is named by its path, or by ``PATH@RHO`` for a Sparse DETR config run at query ratio RHO
# (``--query-ratios``): the config with model.transformer.encoder.query_ratio=RHO.
RHO_SEP = "@"


def split_spec(spec: str):
    """(path, rho or None) of a config spec ``PATH`` or ``PATH@RHO``."""
    path, sep, rho = spec.partition(RHO_SEP)
    if not sep:
        return spec, None
    try:
        return path, float(rho)
    except ValueError:
        raise ValueError(f"config {spec!r}: after {RHO_SEP!r} a query ratio (a number in (0, 1]) was expected") from None


def with_query_ratio(path: str, rho: float) -> str:
    return f"{path}{RHO_SEP}{rho:g}"


def resolve_config(name: str) -> str:
    """Absolute path of a config given as a path, relative to the repository or a name under
    configs/ (a ``@RHO`` suffix is kept)."""
    name, rho = split_spec(name)
    for cand in (name, os.path.join(ROOT, name), os.path.join(ROOT, "configs", name),
                 os.path.join(ROOT, "configs", name + ".py")):
        if os.path.isfile(cand):
            path = os.path.abspath(cand)
            return path if rho is None else with_query_ratio(path, rho)
    raise FileNotFoundError(f"config {name!r} not found (tried it as a path, under {ROOT} and under configs/)")


def config_name(path: str) -> str:
    """The config's file name without ``.py`` (``_rho{RHO}`` appended for ``PATH@RHO``)."""
    path, rho = split_spec(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem if rho is None else f"{stem}_rho{rho:g}"


def detector_key(path: str) -> str:
    """Configs ``X.py``, ``X_enact.py``, ``X_act.py``, ``X_sparse.py`` and ``X_sparse_enact.py``
    are the baseline, the ENACT, the ACT, the Sparse DETR and the Sparse DETR + ENACT variant of
    detector X."""
    name = config_name(split_spec(path)[0])
    for suffix in VARIANT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def variant(path: str) -> str:
    """The variant label of a config: "enact" (``X_enact.py``), "act" (``X_act.py``), "sparse"
    (``X_sparse.py``), "sparse+enact" (``X_sparse_enact.py``) or "baseline"; a Sparse DETR
    config at ``@RHO`` gets " rho=RHO" appended."""
    path, rho = split_spec(path)
    name = config_name(path)
    label = next((label for suffix, label in VARIANT_SUFFIXES.items() if name.endswith(suffix)), "baseline")
    return label if rho is None else f"{label} rho={rho:g}"


def load_config(path: str, opts, device: str):
    """The LazyConfig at ``path`` with the ``key=value`` overrides ``opts``, on ``device``."""
    from detectron2.config import LazyConfig

    path, rho = split_spec(path)
    cfg = LazyConfig.load(path)
    cfg = LazyConfig.apply_overrides(cfg, list(opts or []))
    if rho is not None:
        if "query_ratio" not in cfg.model.transformer.get("encoder", {}):
            raise ValueError(f"{path}@{rho:g}: a query ratio is for a Sparse DETR config "
                             "(model.transformer.encoder.query_ratio); this config has none")
        cfg.model.transformer.encoder.query_ratio = rho
    if "train" in cfg:
        cfg.train.device = device
    if "device" in cfg.model:  # detrex's models take their device as an argument
        cfg.model.device = device
    return cfg


def clip_max_norm(cfg) -> float:
    """Gradient clipping of a config: detrex's ``train.clip_grad`` or the project's ``train.clip_max_norm``."""
    if "train" not in cfg:
        return 0.0
    clip = cfg.train.get("clip_grad", None)
    if clip is not None:
        return float(clip.params.max_norm) if clip.get("enabled", False) else 0.0
    return float(cfg.train.get("clip_max_norm", 0.0))


def config_batch_size(cfg, default: int = 8) -> int:
    """The config's training batch size (dataloader.train.total_batch_size), else ``default``."""
    try:
        return int(cfg.dataloader.train.total_batch_size)
    except Exception:  # noqa: BLE001  (a config without a train loader)
        return default


def seed_all(seed: int) -> None:
    """Seed Python's, torch's and (if installed) numpy's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------ models
def set_encoder_attention(model, backend):
    """Set ``attn_implementation`` of every module of the encoder (``model.transformer.encoder``,
    or detrex Anchor DETR's ``encoder_layers``) that has one (MHSA, EnactAttention).  Returns how
    many were set (0: the encoder has no such module, e.g. RCDA or detrex's own attention)."""
    from projects.enact.modeling.attention import ATTENTION_BACKENDS
    from projects.enact.modeling.encoder_adapter import find_encoder

    count = 0
    for module in find_encoder(model).modules():
        if getattr(module, "attn_implementation", None) in ATTENTION_BACKENDS:
            if backend is not None:
                module.attn_implementation = backend
            count += 1
    return count


def encoder_kind(model) -> str:
    """The label of an encoder without attention backends: "rcda" (Anchor DETR) or "n/a"."""
    from projects.enact.modeling.encoder_adapter import find_encoder

    encoder = find_encoder(model)
    names = [type(m).__name__ for m in encoder.modules()]
    return "rcda" if any("RCDA" in n for n in names) else "n/a"


def encoder_layer_statistics(encoder):
    """Per-layer ENACT statistics of the last call ([] for a model without ENACT)."""
    per_layer = []
    layers = encoder if isinstance(encoder, torch.nn.ModuleList) else getattr(encoder, "layers", [])
    for layer in layers:
        attentions = getattr(layer, "attentions", None)  # detrex's BaseTransformerLayer
        for module in (layer, getattr(layer, "self_attn", None), attentions[0] if attentions else None):
            if module is not None and callable(getattr(module, "statistics", None)):
                stats = module.statistics()
                if stats:
                    per_layer.append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
                    break
    return per_layer


def make_batch(batch, size, num_classes, seed, device, min_scale=0.6, max_boxes=5, orientation="same"):
    """``batch`` detectron2 inputs; image 0 is exactly ``size``, the others smaller (padding).
    orientation="mixed": odd images are portrait (sides of ``size`` swapped, image 1 exactly)."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    gen = torch.Generator().manual_seed(seed)
    full = 2 if orientation == "mixed" else 1  # images 0.. full-1 have exactly their (oriented) size
    inputs = []
    for i in range(batch):
        portrait = orientation == "mixed" and i % 2 == 1
        height, width = (size[1], size[0]) if portrait else (size[0], size[1])
        h, w = (height, width) if i < full else _random_sides(height, width, min_scale, gen)
        image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)  # (3, h, w)
        instances = _random_instances(h, w, num_classes, max_boxes, gen)
        inputs.append({"image": image.to(device), "instances": instances.to(device), "height": h, "width": w})
    return inputs


def _random_sides(height, width, min_scale, gen):
    """Random (h, w) in [min_scale, 1] x (height, width)."""
    h = int(torch.randint(max(1, math.ceil(min_scale * height)), height + 1, (1,), generator=gen))
    w = int(torch.randint(max(1, math.ceil(min_scale * width)), width + 1, (1,), generator=gen))
    return h, w


def _random_instances(h, w, num_classes, max_boxes, gen):
    """1..max_boxes random ground-truth boxes inside an h x w image, with random classes."""
    from detectron2.structures import Boxes, Instances

    n = int(torch.randint(1, max_boxes + 1, (1,), generator=gen))
    extent = torch.tensor([w, h])
    centre = torch.rand(n, 2, generator=gen) * extent  # (n, 2): x, y
    half = (0.05 + 0.45 * torch.rand(n, 2, generator=gen)) * extent / 2  # (n, 2): half width, height
    xyxy = torch.cat([(centre - half).clamp(min=0), torch.minimum(centre + half, extent)], 1)  # (n, 4)
    instances = Instances((h, w))
    instances.gt_boxes = Boxes(xyxy.float())
    instances.gt_classes = torch.randint(0, num_classes, (n,), generator=gen)
    return instances


@contextlib.contextmanager
def bool_dropout_masks():
    """Inside the block, ``F.dropout`` (hence ``nn.Dropout``) runs as ``torch.native_dropout``: the
    same function, but backward keeps a bool mask (what CUDA keeps) instead of CPU dropout's float
    one.  The original ``F.dropout`` is restored on exit, also when the block raises."""
    plain = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0 or inplace or not 0.0 < p < 1.0:
            return plain(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = plain


def dropout_masks(kind):
    """The context of ``--dropout-mask kind``: bool masks for "bool", PyTorch's own for "native"."""
    return bool_dropout_masks() if kind == "bool" else contextlib.nullcontext()


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --amp


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
        self.clip = clip_max_norm(cfg)
        self.batch_size = batch_size
        self.dropout_mask = args.dropout_mask
        self.amp = AMP_DTYPES[getattr(args, "amp", "none")]  # autocast dtype of every step, None: float32
        self.device_type = torch.device(device).type
        num_classes = int(getattr(self.model, "num_classes", 80))
        self.batch = make_batch(batch_size, args.size, num_classes, args.seed, device,
                                args.min_scale, args.max_boxes, args.orientation)
        from projects.enact.modeling.encoder_adapter import find_encoder

        self.encoder = find_encoder(self.model)  # detrex Anchor DETR: a list of layers
        self.encoder_inputs = None
        self.layer_stats = []

    def prepare(self):
        """A first eval forward: captures the encoder's inputs and ENACT's clusters (initial weights)."""
        captured = {}

        def hook(module, args, kwargs):
            detach = lambda x: x.detach().clone() if torch.is_tensor(x) else x  # noqa: E731
            captured["args"] = tuple(detach(a) for a in args)
            captured["kwargs"] = {k: detach(v) for k, v in kwargs.items()}

        if isinstance(self.encoder, torch.nn.ModuleList):  # no encoder call to capture
            self.infer_step()
            self.layer_stats = encoder_layer_statistics(self.encoder)
            return
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
        """Forward, loss, backward, gradient clipping and the optimizer step."""
        self.model.train()
        losses = self.model(self.batch)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()

    def infer_step(self):
        """One eval-mode forward under torch.no_grad()."""
        self.model.eval()
        with torch.no_grad():
            self.model(self.batch)

    def encoder_step(self):
        """Forward + backward of the encoder alone on its captured inputs, train mode."""
        if self.encoder_inputs is None:
            raise NotImplementedError(f"{self.name}: the encoder is a list of layers, not one module: "
                                      "no encoder-only timing (use --modes train infer)")
        self.model.train()
        args, kwargs = self.encoder_inputs
        args, kwargs = list(args), dict(kwargs)
        if args and torch.is_tensor(args[0]):  # src: gradients flow back into it, as in the model
            args[0] = args[0].detach().requires_grad_()
        else:
            for name in ("src", "query"):  # the project's / detrex's encoders
                if torch.is_tensor(kwargs.get(name)):
                    kwargs[name] = kwargs[name].detach().requires_grad_()
                    break
        out = self.encoder(*args, **kwargs)
        out.sum().backward()
        self.model.zero_grad(set_to_none=True)

    def step(self, mode):
        """One step of ``mode`` (one of MODES), with the dropout masks of ``--dropout-mask``."""
        run = {"train": self.train_step, "infer": self.infer_step, "encoder": self.encoder_step}[mode]
        with dropout_masks(self.dropout_mask), torch.autocast(
            self.device_type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None
        ):
            run()


# ------------------------------------------------------------------------------------ profile
def profile_step(runner, mode, backend, device, out_dir):
    """One step of ``mode`` under torch.profiler: writes the op table, returns a summary (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        runner.step(mode)
        sync(device)
    events = prof.key_averages()
    path = _write_op_table(events, f"{runner.name}_{backend}_{mode}", f"{runner.name} [{backend}] {mode}", cuda,
                           out_dir)
    return {"table": os.path.relpath(path, ROOT) if path.startswith(ROOT) else path, **_profile_summary(events, cuda)}


def _write_op_table(events, stem, title, cuda, out_dir):
    """The profiler's op table, sorted by self time, to ``out_dir/stem.txt``; returns that path."""
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.txt")
    with open(path, "w") as f:
        f.write(f"# {title}: one step under torch.profiler, sorted by {sort}\n")
        f.write(events.table(sort_by=sort, row_limit=40))
    return path


def _total_us(event, cuda):
    """Inclusive time of a range / backward function, microseconds."""
    if cuda:
        return getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0))
    return event.cpu_time_total


def _self_us(event, cuda):
    """Self time of an op, microseconds."""
    if cuda:
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
    return event.self_cpu_time_total


def _profile_summary(events, cuda):
    """The step's op time, the labelled ranges and the six costliest backward functions (ms)."""
    step_us = sum(_self_us(e, cuda) for e in events)
    ranges = {e.key: _total_us(e, cuda) / 1e3 for e in events if e.key in PROFILE_RANGES}
    backward = sorted(((e.key[len(_BACKWARD):], _total_us(e, cuda) / 1e3) for e in events
                       if e.key.startswith(_BACKWARD)), key=lambda kv: -kv[1])[:6]
    return {"clock": "device" if cuda else "cpu", "step_ms": step_us / 1e3, "ranges_ms": ranges,
            "backward_ms": dict(backward)}


# ------------------------------------------------------------------------------------ memory
def _malloc_trim():
    """Hand glibc's free heap memory back to the system, so that it leaves the RSS."""
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
        result = _cuda_step_memory(lambda: runner.step(mode), device)
    else:
        result = _cpu_step_memory(lambda: runner.step(mode))
    print(json.dumps(result))


def _cuda_step_memory(step, device):
    """torch.cuda.max_memory_allocated during one call of ``step`` (weights etc. included)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"memory_bytes": peak, "peak_bytes": peak, "increase_bytes": max(peak - base, 0), "base_bytes": base}


def _cpu_step_memory(step):
    """The peak-RSS increase of one call of ``step`` over the RSS just before it."""
    _malloc_trim()
    reset_peak_rss()
    base = rss_bytes()
    hwm_reset = peak_rss_bytes() <= base + (1 << 20)
    step()
    peak = peak_rss_bytes()
    return {"memory_bytes": max(peak - base, 0), "peak_bytes": peak, "increase_bytes": max(peak - base, 0),
            "base_bytes": base, "peak_reset": hwm_reset}
