"""The seed sweep's bookkeeping (tools/seed_sweep.py): which runs are finished, their
AP-vs-iteration curves from metrics.json, the table over seeds and the curves' plot.

Layout: one run per (config, seed) in ``{root}/{config name}/seed{seed}/`` (tools/train_net.py's
``train.output_dir``: config.yaml, metrics.json, last_checkpoint, model_final.pth).

What metrics.json holds (detectron2's JSONWriter, one JSON object per line, appended across
resumes): training scalars at ``iteration`` i (0-based, the step just run); an evaluation by
EvalHook puts ``bbox/AP``, ``bbox/AP50`` ... at the step after which it ran: periodic ones (every
``eval_period`` steps) at iteration ``k * eval_period - 1`` (``k * eval_period`` steps trained),
the final one (after training, ``trainer.iter == max_iter``) at iteration ``max_iter`` (at
``max_iter + 1`` when a run that had saved model_final.pth but died before its final evaluation
is resumed: it trains no step and evaluates).  A resumed run writes the steps after its
checkpoint again: the last record of an iteration wins.

A run is **finished** when ``model_final.pth`` exists and metrics.json has an evaluation at an
iteration >= ``train.max_iter`` of the run's config.yaml (the final evaluation; model_final.pth
alone is written before it).  A run with ``last_checkpoint`` but not finished is **partial**
(resumed with ``--resume``); one without is **missing**.
"""
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "METRICS",
    "RunState",
    "format_markdown",
    "parse_run",
    "plot_curves",
    "read_metrics",
    "run_max_iter",
    "summarize",
    "write_report",
]

# (key in metrics.json after "bbox/", column title)
METRICS: Tuple[Tuple[str, str], ...] = (
    ("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("APs", "AP_S"), ("APm", "AP_M"), ("APl", "AP_L"),
)


def read_metrics(path: str) -> List[dict]:
    """The records of a metrics.json (a missing file: none; a line cut off by a killed process
    is skipped)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_max_iter(run_dir: str) -> Optional[int]:
    """``train.max_iter`` of the run's config.yaml (written by tools/train_net.py), or None."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
        return int(cfg["train"]["max_iter"])
    except Exception:  # noqa: BLE001 - an unreadable config: unknown
        return None


def _finite(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class RunState:
    """One (config, seed) run as found on disk."""

    name: str
    seed: int
    run_dir: str
    status: str  # "finished", "partial" or "missing"
    max_iter: Optional[int] = None
    last_iter: int = 0  # training steps done (from metrics.json)
    final: Dict[str, Optional[float]] = field(default_factory=dict)  # metric key -> value (finished runs)
    curve: List[Tuple[int, Dict[str, Optional[float]]]] = field(default_factory=list)  # (steps trained, metrics)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def parse_run(run_dir: str, name: str = "", seed: int = 0, max_iter: Optional[int] = None,
              task: str = "bbox") -> RunState:
    """The state of one run.  ``max_iter`` defaults to the run's config.yaml's."""
    if max_iter is None:
        max_iter = run_max_iter(run_dir)
    by_iter: Dict[int, dict] = {}
    for record in read_metrics(os.path.join(run_dir, "metrics.json")):
        if "iteration" in record:
            by_iter.setdefault(int(record["iteration"]), {}).update(record)
    prefix = f"{task}/"
    curve, final, last_iter = [], {}, 0
    for it in sorted(by_iter):
        record = by_iter[it]
        if "total_loss" in record:
            last_iter = max(last_iter, it + 1)
        if prefix + "AP" not in record:
            continue
        values = {key: _finite(record.get(prefix + key)) for key, _ in METRICS}
        is_final = max_iter is not None and it >= max_iter
        steps = max_iter if is_final else it + 1
        curve = [(s, v) for s, v in curve if s != steps] + [(steps, values)]
        if is_final:
            final = values
            last_iter = max(last_iter, max_iter)
    has_final_ckpt = os.path.isfile(os.path.join(run_dir, "model_final.pth"))
    if has_final_ckpt and final:
        status = "finished"
    elif os.path.isfile(os.path.join(run_dir, "last_checkpoint")):
        status = "partial"
    else:
        status = "missing"
    return RunState(name, seed, run_dir, status, max_iter, last_iter, final if status == "finished" else {},
                    sorted(curve, key=lambda p: p[0]))


# ---------------------------------------------------------------- statistics over seeds
def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof = 1; None with fewer than 2 values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: Sequence[RunState], names: Sequence[str]) -> dict:
    """Per config (in ``names``' order; the first is the reference): finished seeds, mean and
    std over them of every metric, and the AP gap to the reference against the seed spread.

    The gap of metric m is ``mean_c - mean_ref``; the seed spread is the larger of the two
    configs' standard deviations over seeds; ``within_spread`` is ``|gap| <= spread`` (None when a
    side has fewer than 2 finished seeds).  ``se`` is the gap's standard error
    sqrt(s_ref^2 / n_ref + s_c^2 / n_c) and ``t`` = gap / se (Welch's statistic; |t| < 2: not a
    difference the seeds can tell apart).
    """
    configs = []
    for name in names:
        mine = [r for r in runs if r.name == name]
        done = [r for r in mine if r.finished]
        metrics = {}
        for key, _ in METRICS:
            values = [r.final[key] for r in done if r.final.get(key) is not None]
            mean, std = _mean_std(values)
            metrics[key] = {"mean": mean, "std": std, "n": len(values), "values": values}
        configs.append({
            "name": name,
            "n_finished": len(done),
            "n_runs": len(mine),
            "seeds_finished": sorted(r.seed for r in done),
            "metrics": metrics,
        })
    reference = configs[0] if configs else None
    for entry in configs:
        entry["gap"] = {}
        if reference is None or entry is reference:
            continue
        for key, _ in METRICS:
            ref, cur = reference["metrics"][key], entry["metrics"][key]
            if ref["mean"] is None or cur["mean"] is None:
                entry["gap"][key] = None
                continue
            gap = cur["mean"] - ref["mean"]
            gap_info = {"gap": gap, "spread": None, "within_spread": None, "se": None, "t": None}
            if ref["std"] is not None and cur["std"] is not None:
                spread = max(ref["std"], cur["std"])
                se = math.sqrt(ref["std"] ** 2 / ref["n"] + cur["std"] ** 2 / cur["n"])
                gap_info.update(spread=spread, within_spread=abs(gap) <= spread, se=se,
                                t=gap / se if se > 0 else (0.0 if gap == 0 else math.copysign(math.inf, gap)))
            entry["gap"][key] = gap_info
    return {"reference": reference["name"] if reference else None, "configs": configs}


def _fmt(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def format_markdown(summary: dict, runs: Sequence[RunState] = ()) -> str:
    """The table over seeds (mean ± sample std), the gap of every config to the first, and the
    runs one by one."""
    ref = summary["reference"]
    head = ["config", "seeds"] + [title for _, title in METRICS] + [f"ΔAP vs {ref}", "within seed spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary["configs"]:
        cells = [entry["name"], f"{entry['n_finished']}/{entry['n_runs']}"]
        cells += [_fmt(entry["metrics"][k]["mean"], entry["metrics"][k]["std"]) for k, _ in METRICS]
        gap = entry["gap"].get("AP")
        if entry["name"] == ref:
            cells += ["(reference)", ""]
        elif gap is None:
            cells += ["n/a", "n/a"]
        else:
            cells.append(f"{gap['gap']:+.2f}" + (f" (t = {gap['t']:+.2f})" if gap["t"] is not None else ""))
            cells.append("n/a (< 2 seeds)" if gap["within_spread"] is None else
                         ("yes" if gap["within_spread"] else "no") + f" (spread {gap['spread']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean ± sample standard deviation over the finished seeds; ΔAP: mean AP minus the reference's; "
                 "within seed spread: |ΔAP| <= the larger of the two seed standard deviations; "
                 "t = ΔAP / sqrt(s1²/n1 + s2²/n2).")
    if runs:
        lines += ["", "| config | seed | status | steps | AP | AP50 | AP75 |", "|---|---|---|---|---|---|---|"]
        for r in runs:
            vals = [f"{r.final[k]:.2f}" if r.final.get(k) is not None else "" for k in ("AP", "AP50", "AP75")]
            steps = f"{r.last_iter}/{r.max_iter}" if r.max_iter else str(r.last_iter)
            lines.append(f"| {r.name} | {r.seed} | {r.status} | {steps} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[RunState], names: Sequence[str], path: str, title: str = "") -> Optional[str]:
    """AP and AP50 against steps trained: one line per run, one colour per config (unfinished
    runs dashed).  Returns ``path``, or None when no run has an evaluation."""
    if not any(r.curve for r in runs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    markers = "osD^v<>p*h"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("AP", "AP50")):
        for ci, name in enumerate(names):
            labelled = False
            for r in sorted((r for r in runs if r.name == name), key=lambda r: r.seed):
                points = [(s, v[key]) for s, v in r.curve if v.get(key) is not None]
                if not points:
                    continue
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colours(ci % 10), marker=markers[r.seed % len(markers)], markersize=3,
                        linewidth=1.2, linestyle="-" if r.finished else "--",
                        label=None if labelled else name)
                labelled = True
        ax.set_xlabel("training iterations")
        ax.set_ylabel(f"{key} (COCO, %)")
        ax.grid(alpha=0.3)
        ax.set_title(key)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title or "AP vs iteration, one line per seed (markers: seed; dashed: not finished)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: Sequence[RunState], names: Sequence[str], out_dir: str, stem: str = "sweep") -> dict:
    """``{stem}_table.md``, ``{stem}_table.json`` and ``{stem}_curves.png`` (when matplotlib is
    importable and a run was evaluated) in ``out_dir``; returns the summary with the paths."""
    summary = summarize(runs, names)
    summary["runs"] = [
        {"name": r.name, "seed": r.seed, "status": r.status, "run_dir": r.run_dir, "max_iter": r.max_iter,
         "steps": r.last_iter, "final": r.final, "curve": [{"iteration": s, **v} for s, v in r.curve]}
        for r in runs
    ]
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{stem}_table.md")
    with open(md_path, "w") as f:
        f.write(format_markdown(summary, runs))
    png_path = os.path.join(out_dir, f"{stem}_curves.png")
    try:
        summary["curves"] = plot_curves(runs, names, png_path)
    except ImportError as e:  # matplotlib missing: the table still counts
        summary["curves"] = None
        summary["curves_error"] = f"no plot: {e}"
    summary["table"] = md_path
    json_path = os.path.join(out_dir, f"{stem}_table.json")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
    summary["json"] = json_path
    return summary
