"""tools/seed_sweep.py and projects/enact/engine/sweep.py: the table and curves from fake
metrics.json files (as detectron2's JSONWriter writes them), what counts as finished, and the
sweep's skipping / resuming with a fake train_net (no training)."""
import importlib.util
import json
import math
import os
import textwrap

import pytest

from projects.enact.engine.sweep import parse_run, summarize, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_seed_sweep():
    spec = importlib.util.spec_from_file_location("seed_sweep", os.path.join(ROOT, "tools", "seed_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run_dir, max_iter, evals, final=None, model_final=True, losses=True, extra_lines=()):
    """A run folder: config.yaml, metrics.json with training lines, periodic evaluations
    ``{steps: AP}`` (at iteration steps - 1) and the final one (at iteration max_iter)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(f"train:\n  max_iter: {max_iter}\n  seed: 0\n")
    lines = []
    for it in range(max_iter if final is not None else max(evals, default=1)):
        record = {"iteration": it, "total_loss": 5.0 - it / max_iter} if losses else {"iteration": it}
        if it + 1 in evals:
            ap = evals[it + 1]
            record.update({"bbox/AP": ap, "bbox/AP50": 2 * ap, "bbox/AP75": ap / 2, "bbox/APs": float("nan"),
                           "bbox/APm": ap, "bbox/APl": ap + 1})
        lines.append(record)
    lines += list(extra_lines)
    if final is not None:
        lines.append({"iteration": max_iter, "bbox/AP": final, "bbox/AP50": 2 * final, "bbox/AP75": final / 2,
                      "bbox/APs": float("nan"), "bbox/APm": final, "bbox/APl": final + 1})
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        for record in lines:
            f.write(json.dumps(record) + "\n")
    open(os.path.join(run_dir, "last_checkpoint"), "w").write("model_final.pth" if model_final else "model_0000009.pth")
    if model_final:
        open(os.path.join(run_dir, "model_final.pth"), "wb").close()


def test_parse_run_curve_final_and_finished(tmp_path):
    run = tmp_path / "base" / "seed0"
    # a resume rewrote iteration 9's evaluation (the last record of an iteration wins)
    write_run(str(run), 20, {10: 1.0}, final=4.0, extra_lines=[{"iteration": 9, "bbox/AP": 2.0, "total_loss": 1.0}])
    state = parse_run(str(run), "base", 0)
    assert state.status == "finished" and state.max_iter == 20 and state.last_iter == 20
    assert [s for s, _ in state.curve] == [10, 20]
    assert state.curve[0][1]["AP"] == 2.0 and state.final["AP"] == 4.0 and state.final["APs"] is None  # NaN -> None

    partial = tmp_path / "base" / "seed1"  # model_final.pth written, killed before the final evaluation
    write_run(str(partial), 20, {10: 1.0}, final=None, model_final=True)
    state = parse_run(str(partial), "base", 1)
    assert state.status == "partial" and state.final == {} and state.last_iter == 10

    # resumed after model_final.pth: it trains no step and evaluates at iteration max_iter + 1
    late = tmp_path / "base" / "seed2"
    write_run(str(late), 20, {10: 1.0}, final=None, extra_lines=[{"iteration": 21, "bbox/AP": 3.0}])
    state = parse_run(str(late), "base", 2)
    assert state.finished and state.final["AP"] == 3.0 and state.curve[-1][0] == 20
    assert parse_run(str(tmp_path / "nothing"), "x", 0).status == "missing"


def test_table_from_fake_metrics(tmp_path):
    root = tmp_path / "sweep"
    base_ap, enact_ap = [30.0, 31.0, 32.0], [30.5, 32.5, 30.0]
    for seed in range(3):
        write_run(str(root / "base" / f"seed{seed}"), 20, {10: base_ap[seed] / 2}, final=base_ap[seed])
        write_run(str(root / "enact" / f"seed{seed}"), 20, {10: enact_ap[seed] / 2}, final=enact_ap[seed])
    write_run(str(root / "enact" / "seed3"), 20, {10: 5.0}, final=None, model_final=False)  # interrupted: not counted
    runs = [parse_run(str(root / n / f"seed{s}"), n, s) for n in ("base", "enact") for s in range(4 if n == "enact" else 3)]
    summary = write_report(runs, ["base", "enact"], str(root))

    base, enact = summary["configs"]
    assert (base["n_finished"], enact["n_finished"], enact["n_runs"]) == (3, 3, 4)
    assert base["metrics"]["AP"]["mean"] == pytest.approx(31.0) and base["metrics"]["AP"]["std"] == pytest.approx(1.0)
    assert enact["metrics"]["AP"]["mean"] == pytest.approx(31.0)
    assert enact["metrics"]["AP"]["std"] == pytest.approx(math.sqrt(((0.5) ** 2 + 1.5 ** 2 + 1.0 ** 2) / 2))
    assert enact["metrics"]["AP50"]["mean"] == pytest.approx(62.0)
    assert base["metrics"]["APs"]["mean"] is None  # NaN everywhere (no small objects)
    gap = enact["gap"]["AP"]
    assert gap["gap"] == pytest.approx(0.0) and gap["within_spread"] is True
    assert gap["spread"] == pytest.approx(enact["metrics"]["AP"]["std"])

    table = open(summary["table"]).read()
    assert "| base | 3/3 | 31.00 ± 1.00 |" in table and "(reference)" in table
    assert "| enact | 3/4 | 31.00 ± 1.32 |" in table and "yes (spread 1.32)" in table
    assert "| enact | 3 | partial | 10/20 |" in table
    saved = json.load(open(summary["json"]))
    assert saved["reference"] == "base" and len(saved["runs"]) == 7
    assert saved["runs"][0]["curve"][-1] == {"iteration": 20, "AP": 30.0, "AP50": 60.0, "AP75": 15.0, "APs": None,
                                             "APm": 30.0, "APl": 31.0}
    assert summary["curves"] and os.path.getsize(summary["curves"]) > 10_000  # a PNG with two panels

    # a gap beyond the spread
    far = summarize([r for r in runs if r.name == "base"] + [
        parse_run(str(root / "base" / f"seed{s}"), "shifted", s) for s in range(3)], ["shifted", "base"])
    assert far["configs"][1]["gap"]["AP"]["within_spread"] is True  # same runs: gap 0
    for run in runs:
        if run.name == "enact" and run.finished:
            run.final["AP"] += 5.0
    moved = summarize(runs, ["base", "enact"])["configs"][1]["gap"]["AP"]
    assert moved["gap"] == pytest.approx(5.0) and moved["within_spread"] is False and moved["t"] > 2


FAKE_TRAIN_NET = textwrap.dedent('''
    """A stand-in for tools/train_net.py: writes what it would, without training."""
    import json, os, sys
    args = sys.argv[1:]
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    out, seed, period = opts["train.output_dir"], int(opts["train.seed"]), int(opts["train.eval_period"])
    config = args[args.index("--config-file") + 1]
    scope = {}
    exec(open(config).read(), scope)
    max_iter = int(opts.get("train.max_iter", scope["train"]["max_iter"]))
    name = os.path.splitext(os.path.basename(config))[0]
    with open(os.path.join(os.path.dirname(os.path.dirname(out)), "calls.txt"), "a") as f:
        f.write(json.dumps({"name": name, "seed": seed, "resume": "--resume" in args}) + "\\n")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "config.yaml"), "w").write(f"train:\\n  max_iter: {max_iter}\\n")
    start = 0
    if "--resume" in args:
        start = int(open(os.path.join(out, "last_checkpoint")).read().split("_")[1].split(".")[0]) + 1
    crash = os.environ.get("FAKE_CRASH") == f"{name}:{seed}" and "--resume" not in args
    ap = 10.0 * (1 + (name == "enact")) + seed
    with open(os.path.join(out, "metrics.json"), "a") as f:
        for it in range(start, max_iter):
            record = {"iteration": it, "total_loss": 1.0}
            if (it + 1) % period == 0 and it + 1 != max_iter:
                record.update({"bbox/AP": ap * (it + 1) / max_iter, "bbox/AP50": 2 * ap})
            f.write(json.dumps(record) + "\\n")
            if it == 1:
                open(os.path.join(out, "last_checkpoint"), "w").write("model_0000001.pth")
            if crash and it == 2:
                sys.exit(3)
        open(os.path.join(out, "model_final.pth"), "wb").close()
        open(os.path.join(out, "last_checkpoint"), "w").write("model_final.pth")
        f.write(json.dumps({"iteration": max_iter, "bbox/AP": ap, "bbox/AP50": 2 * ap, "bbox/AP75": ap}) + "\\n")
''')


def test_sweep_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch, capsys):
    seed_sweep = load_seed_sweep()
    fake = tmp_path / "fake_train_net.py"
    fake.write_text(FAKE_TRAIN_NET)
    configs = []
    for name in ("base", "enact"):
        path = tmp_path / f"{name}.py"
        path.write_text("train = dict(max_iter=6, seed=0, output_dir='x')\n")
        configs.append(str(path))
    root = tmp_path / "sweep"
    argv = ["--configs", *configs, "train.max_iter=5", "--seeds", "0", "1", "--output-root", str(root),
            "--eval-period", "2", "--poll", "0.05", "--train-net", str(fake)]

    monkeypatch.setenv("FAKE_CRASH", "enact:1")
    assert seed_sweep.main(argv) == 1  # enact seed 1 died after its checkpoint at step 2
    calls = [json.loads(line) for line in open(root / "calls.txt")]
    assert [(c["name"], c["seed"], c["resume"]) for c in calls] == [
        ("base", 0, False), ("enact", 0, False), ("base", 1, False), ("enact", 1, False)]
    assert parse_run(str(root / "enact" / "seed1"), "enact", 1).status == "partial"
    out = capsys.readouterr().out
    assert "FAILED" in out and "| base | 2/2 | 10.50 ± 0.71 |" in out

    monkeypatch.delenv("FAKE_CRASH")
    assert seed_sweep.main(argv) == 0
    calls = [json.loads(line) for line in open(root / "calls.txt")][4:]
    assert calls == [{"name": "enact", "seed": 1, "resume": True}]  # only the interrupted run, resumed
    state = parse_run(str(root / "enact" / "seed1"), "enact", 1)
    assert state.finished and [s for s, _ in state.curve] == [2, 4, 5] and state.max_iter == 5
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 3
    assert "| enact | 2/2 | 20.50 ± 0.71 | 41.00 ± 1.41 | 20.50 ± 0.71 |" in out and "+10.00" in out

    # --report-only reads what is there (every config folder, sorted; seeds found on disk)
    assert seed_sweep.main(["--output-root", str(root), "--report-only"]) == 0
    summary = json.load(open(root / "sweep_table.json"))
    assert [c["name"] for c in summary["configs"]] == ["base", "enact"]
    assert [c["n_finished"] for c in summary["configs"]] == [2, 2]
    assert os.path.isfile(root / "sweep_curves.png")
