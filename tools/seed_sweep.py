#!/usr/bin/env python
"""Train a list of configs over several seeds, one run after another, and compare them.

    python tools/seed_sweep.py --configs configs/shapes/detr_r18_shapes.py configs/shapes/detr_r18_shapes_enact.py \\
        --seeds 0 1 2 --output-root output/seed_sweep --eval-period 100 [train.max_iter=900 ...]
    python tools/seed_sweep.py --output-root output/seed_sweep --report-only   # table + curves of what is there

Each (config, seed) runs ``tools/train_net.py --config-file CONFIG [OPTS] train.seed=S
train.output_dir=ROOT/<config stem>/seed<S> train.eval_period=K`` in a subprocess (its output in
``seed<S>/sweep.log``), seeds in the outer loop (after two runs of a two-config sweep, seed 0 of
both is done).  Periodic evaluation gives every run an AP-vs-iteration curve in its metrics.json.

Resumable across sessions: run it again with the same arguments.  A *finished* run
(model_final.pth and the final evaluation, at an iteration >= train.max_iter, in metrics.json)
is skipped; a *partial* one (last_checkpoint but not finished) is resumed with ``--resume``; a
run whose config.yaml has another train.max_iter than asked is left alone (reported).  Progress
(steps of the run and of the whole sweep, ETA from this session's speed) every ``--poll`` s.

At the end (and with ``--report-only``, which trains nothing) ROOT/sweep_table.md and .json:
per config mean ± sample std over finished seeds of AP, AP50, AP75, AP_S/M/L, the seeds
finished, and the AP gap to the first config against the seed spread; ROOT/sweep_curves.png:
AP and AP50 against iterations, one line per seed, one colour per config.  See
projects/enact/engine/sweep.py for the exact rules.

``--num-gpus N`` is passed on to train_net (N processes per run).  Subprocesses get
PYTHONHASHSEED=0 unless it is set.  Exit status 1 when a run failed.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from projects.enact.engine.sweep import RunState, parse_run, run_max_iter, write_report  # noqa: E402

TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")


def config_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def run_dir(output_root: str, name: str, seed: int) -> str:
    return os.path.join(output_root, name, f"seed{seed}")


def planned_max_iter(config: str, opts: List[str]) -> Optional[int]:
    """train.max_iter of ``config`` with ``opts`` applied (loads the LazyConfig)."""
    from detectron2.config import LazyConfig

    cfg = LazyConfig.apply_overrides(LazyConfig.load(config), list(opts))
    return int(cfg.train.max_iter)


def train_command(config: str, seed: int, out: str, eval_period: int, opts: List[str], resume: bool,
                  num_gpus: int = 1, train_net: str = TRAIN_NET) -> List[str]:
    cmd = [sys.executable, train_net, "--config-file", config]
    if num_gpus > 1:
        cmd += ["--num-gpus", str(num_gpus), "--dist-url", "auto"]
    if resume:
        cmd.append("--resume")
    return cmd + list(opts) + [f"train.seed={seed}", f"train.output_dir={out}", f"train.eval_period={eval_period}"]


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Steps done over the whole sweep; ETA from the steps trained in this session."""

    def __init__(self, total_steps: int, done_steps: int):
        self.total, self.done_before = total_steps, done_steps
        self.start = time.time()
        self.session_steps = 0  # steps of runs that ended in this session
        self.current = 0  # steps trained by the running run in this session

    def line(self, label: str, run_steps: int, run_total: int) -> str:
        elapsed = time.time() - self.start
        trained = self.session_steps + self.current
        done = min(self.total, self.done_before + trained)
        eta = (self.total - done) * elapsed / trained if trained > 0 else None
        pct = 100.0 * done / self.total if self.total else 100.0
        return (f"[sweep] {label}: step {run_steps}/{run_total} | sweep {done}/{self.total} steps ({pct:.0f}%) | "
                f"elapsed {_duration(elapsed)} | ETA {_duration(eta)}")


def run_one(cmd: List[str], out: str, state: RunState, progress: Progress, label: str, poll: float,
            verbose: bool) -> int:
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    start_steps = state.last_iter
    with open(os.path.join(out, "sweep.log"), "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=None if verbose else log,
                                stderr=subprocess.STDOUT if not verbose else None)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=poll)
                    break
                except subprocess.TimeoutExpired:
                    now = parse_run(out, state.name, state.seed, state.max_iter)
                    progress.current = max(0, now.last_iter - start_steps)
                    print(progress.line(label, now.last_iter, state.max_iter or 0), flush=True)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    final = parse_run(out, state.name, state.seed, state.max_iter)
    progress.session_steps += max(0, final.last_iter - start_steps)
    progress.current = 0
    return rc


def sweep(args) -> int:
    names = [config_name(c) for c in args.configs]
    if len(set(names)) != len(names):
        raise SystemExit(f"configs must have distinct file names (the run folders are named after them): {names}")
    max_iters: Dict[str, int] = {}
    for config, name in zip(args.configs, names):
        max_iters[name] = planned_max_iter(config, args.opts)
    eval_periods = {n: args.eval_period or max(1, max_iters[n] // 10) for n in names}

    plan = []  # (config, name, seed, state)
    for seed in args.seeds:
        for config, name in zip(args.configs, names):
            out = run_dir(args.output_root, name, seed)
            plan.append((config, name, seed, parse_run(out, name, seed, max_iters[name])))
    total = sum(max_iters[n] for _, n, _, _ in plan)
    done = sum(min(s.last_iter, max_iters[n]) for _, n, _, s in plan)
    progress = Progress(total, done)
    print(f"[sweep] {len(plan)} runs ({len(names)} configs x {len(args.seeds)} seeds), "
          f"{sum(s.finished for *_, s in plan)} finished, {total} steps in all, {done} done", flush=True)

    failed = []
    for i, (config, name, seed, state) in enumerate(plan):
        out = state.run_dir
        label = f"run {i + 1}/{len(plan)} {name} seed {seed}"
        recorded = run_max_iter(out)
        if recorded is not None and recorded != max_iters[name] and state.status != "missing":
            print(f"[sweep] {label}: SKIPPED, its config.yaml has train.max_iter={recorded}, asked {max_iters[name]} "
                  f"(delete {out} to rerun)", flush=True)
            continue
        if state.finished:
            ap = state.final.get("AP")
            print(f"[sweep] {label}: finished, skipped (AP {'n/a' if ap is None else f'{ap:.2f}'})", flush=True)
            continue
        resume = state.status == "partial"
        if not resume and os.path.isfile(os.path.join(out, "metrics.json")):
            # started without reaching a checkpoint: a fresh start must not append to the old curve
            stale = os.path.join(out, f"metrics.json.stale-{int(time.time())}")
            shutil.move(os.path.join(out, "metrics.json"), stale)
            print(f"[sweep] {label}: no checkpoint, restarting (old metrics moved to {stale})", flush=True)
        cmd = train_command(config, seed, out, eval_periods[name], args.opts, resume, args.num_gpus, args.train_net)
        print(f"[sweep] {label}: {'resuming from step ' + str(state.last_iter) if resume else 'starting'} "
              f"(log: {os.path.join(out, 'sweep.log')})", flush=True)
        if args.dry_run:
            print("  " + " ".join(cmd))
            continue
        t0 = time.time()
        rc = run_one(cmd, out, state, progress, label, args.poll, args.verbose)
        after = parse_run(out, name, seed, max_iters[name])
        if rc != 0 or not after.finished:
            failed.append(label)
            print(f"[sweep] {label}: FAILED (exit {rc}, status {after.status}); see {os.path.join(out, 'sweep.log')}",
                  flush=True)
        else:
            ap = after.final.get("AP")
            print(f"[sweep] {label}: done in {_duration(time.time() - t0)}, AP {'n/a' if ap is None else f'{ap:.2f}'}",
                  flush=True)
            print(progress.line(label, after.last_iter, max_iters[name]), flush=True)
    args.seeds_given = True  # the table of this sweep's seeds
    report(args, names)
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {failed}", flush=True)
        return 1
    return 0


def discover(output_root: str, names: Optional[List[str]]) -> Dict[str, List[int]]:
    """Seeds per config name found under ``output_root`` (names: every sub-folder, sorted)."""
    if not names:
        names = sorted(d for d in os.listdir(output_root) if os.path.isdir(os.path.join(output_root, d)))
    found = {}
    for name in names:
        folder = os.path.join(output_root, name)
        seeds = []
        if os.path.isdir(folder):
            for d in os.listdir(folder):
                if d.startswith("seed") and d[4:].isdigit() and os.path.isdir(os.path.join(folder, d)):
                    seeds.append(int(d[4:]))
        if seeds:
            found[name] = sorted(seeds)
    return found


def report(args, names: Optional[List[str]]) -> dict:
    found = discover(args.output_root, names)
    if args.seeds_given:
        found = {n: list(args.seeds) for n in (names or found)}
    names = [n for n in (names or found) if n in found]
    runs = [parse_run(run_dir(args.output_root, n, s), n, s) for n in names for s in found[n]]
    summary = write_report(runs, names, args.output_root)
    with open(summary["table"]) as f:
        print(f.read())
    print(f"[sweep] table: {summary['table']}, {summary['json']}; curves: {summary.get('curves') or 'none'}")
    return summary


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, help="LazyConfig files; the first is the reference")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="train.seed values (default 0 1 2)")
    parser.add_argument("--output-root", required=True, help="runs go to ROOT/<config stem>/seed<S>")
    parser.add_argument("--eval-period", type=int, default=None,
                        help="train.eval_period of every run (default: a tenth of train.max_iter)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per run, passed to train_net")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: table and curves of the runs under --output-root "
                             "(--configs: names or files, to pick and order them; default all, sorted)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--verbose", action="store_true", help="train_net's output on the console, not in sweep.log")
    parser.add_argument("--train-net", default=TRAIN_NET, help=argparse.SUPPRESS)  # tests
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run (key=value ...)")
    return parser


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    if args.configs:  # overrides written right after the config files: `--configs a.py b.py train.max_iter=9`
        args.opts = [c for c in args.configs if "=" in c] + list(args.opts)
        args.configs = [c for c in args.configs if "=" not in c]
    args.seeds_given = args.seeds is not None
    if args.seeds is None:
        args.seeds = [0, 1, 2]
    if args.report_only:
        names = [config_name(c) for c in args.configs] if args.configs else None
        report(args, names)
        return 0
    if not args.configs:
        raise SystemExit("--configs is required (unless --report-only)")
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
