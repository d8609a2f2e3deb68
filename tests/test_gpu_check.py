"""tools/gpu_check.py's CPU fallback, run the way the GPU machine runs it: without detectron2 and
the packages it brings (unimportable in it and in every process it starts; torch and pytest are
there).  The recorded figures are checked against pytest's own report and the benchmarks' files."""
import json
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DETECTRON2 = """\
import importlib.abc, sys
BLOCKED = {"detectron2", "fvcore", "iopath", "omegaconf", "hydra", "pycocotools", "detrex"}
class _NoDetectron2(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the GPU machine has no detectron2")
sys.meta_path.insert(0, _NoDetectron2())
"""


def _gpu_machine_env(tmp_path):
    site = tmp_path / "gpu_machine"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_DETECTRON2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]))
    env.pop("ENACT_OPS_EXTENSION", None)
    return env


def test_the_blocker_blocks_detectron2(tmp_path):
    """The blocker works (else the test below would prove nothing)."""
    out = subprocess.run([sys.executable, "-c", "import detectron2"], env=_gpu_machine_env(tmp_path),
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "blocked" in out.stderr


def _pytest_counts(log):
    """pytest's own count line (the log's last line), e.g. '1 failed, 1 passed, 1 skipped in 0.2s'."""
    last = log.strip().splitlines()[-1]
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


def _gpu_check(tmp_path, *args, env=None, timeout=400):
    out_dir = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(out_dir), "--quick", "--device", "cpu", *args],
                          env=env or _gpu_machine_env(tmp_path), capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    results = {p.stem: json.loads(p.read_text()) for p in out_dir.glob("*.json") if not p.name.endswith(".bench.json")}
    return proc, out_dir, results


def test_cpu_fallback_quick_run(tmp_path):
    proc, out_dir, results = _gpu_check(tmp_path, "--skip-build", "--detector", "auto", "--budget-s", "240")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for stage in ("env", "build", "tests", "attention_fp32", "ops_fp32", "attention_bf16", "ops_bf16", "detector"):
        assert results[stage]["status"] in ("ok", "skipped"), (stage, results[stage])
    assert results["build"]["status"] == "skipped" and "CPU" in results["build"]["reason"]
    assert results["ops_bf16"]["status"] == "skipped" and "--quick" in results["ops_bf16"]["reason"]
    assert results["detector"]["status"] == "skipped" and "no CUDA" in results["detector"]["reason"]
    assert results["env"]["env"]["device"] == "cpu" and results["env"]["env"]["pytest"] is True
    # the tests stage: pytest -m cuda on every file with cuda-marked tests; its counts are pytest's
    tests = results["tests"]
    assert set(tests["files"]) >= {"tests/test_cuda.py", "tests/test_information.py", "tests/test_mixed_precision.py",
                                   "tests/test_ops.py", "tests/test_segment_scan.py"} and "tests/test_gpu_check.py" not in tests["files"]
    assert tests["counts"] == _pytest_counts((out_dir / "logs" / "tests.log").read_text())
    assert tests["counts"]["failed"] == tests["counts"]["error"] == 0 and not tests["failing"]
    assert tests["counts"]["skipped"] + tests["counts"]["passed"] >= 40
    if not torch.cuda.is_available():  # every one of them skips, and says why
        assert tests["counts"]["passed"] == 0
        assert sum(tests["skip_reasons"].values()) == tests["counts"]["skipped"]
        assert set(tests["skip_reasons"]) <= {"no GPU with enact_ops CUDA kernels", "enact_ops._C is not built",
                                                   "TF32 exists on CUDA only"}
    # benchmark figures: the rows of the benchmarks' own files, and the targets computed from them
    bench = json.loads((out_dir / "attention_fp32.bench.json").read_text())["rows"]
    rows = results["attention_fp32"]["rows"]
    assert [(r["variant"], r["time_s"]) for r in rows] == [(r["variant"], r["time_s"]) for r in bench]
    assert {r["variant"] for r in rows} == {"mhsa-sdpa", "mhsa-eager", "enact-sdpa"} and all(r["time_s"] > 0 for r in rows)
    assert next(r for r in rows if r["variant"] == "mhsa-sdpa")["sdpa_kernel"] == "math (CPU)"
    enact = next(r for r in rows if r["variant"] == "enact-sdpa")
    targets = json.loads((out_dir / "summary.json").read_text())["targets"]
    time_target = next(t for t in targets if t["target"].startswith("EnactAttention time") and "float32" in t["target"])
    assert time_target["measured"].startswith(f"{enact['time_ratio_vs_sdpa']:.2f}x")
    assert time_target["verdict"] == ("met" if enact["time_ratio_vs_sdpa"] <= 1.0 else "not met")
    if "not built" not in results["build"]["reason"]:  # the compiled ops against the reference
        ops = json.loads((out_dir / "ops_fp32.bench.json").read_text())["rows"]
        assert [r["speedup"] for r in results["ops_fp32"]["rows"]] == [r["speedup"] for r in ops]
        speed = [t for t in targets if t["target"].startswith("compiled ops")]
        assert [t["verdict"] for t in speed] == ["met" if r["speedup"] >= 3 else "not met" for r in ops]
    summary = (out_dir / "summary.md").read_text()
    assert f"| tests | ok | {tests['seconds']} | {tests['summary']} |" in summary


PROBE_TESTS = """\
import pytest


def test_passes():
    pass


def test_fails():
    assert 1 + 1 == 3, "the probe's failure"


def test_skips():
    pytest.skip("the probe's skip")
"""


def test_failing_tests_and_a_failing_stage_are_recorded_and_the_run_goes_on(tmp_path):
    """The tests stage records pytest's counts and each failing test with its message; a stage
    that cannot run (ops_fp32 given a broken extension path) is recorded with its error; the
    stages after a failed one still run, and the exit status is 1."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE_TESTS)
    env = _gpu_machine_env(tmp_path)
    env["ENACT_OPS_EXTENSION"] = str(tmp_path / "missing_C.so")
    env.pop("ENACT_REQUIRE_COMPILED", None)  # this test is about running without the extension
    proc, out_dir, results = _gpu_check(tmp_path, "--stages", "env", "tests", "ops_fp32", "--tests", str(probe),
                                        "--marker", "", "--budget-s", "120", env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    tests = results["tests"]
    assert tests["status"] == "failed" and tests["files"] == [str(probe)]
    assert tests["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert tests["counts"] == _pytest_counts((out_dir / "logs" / "tests.log").read_text())
    assert [c["name"] for c in tests["failing"]] == ["test_probe::test_fails"]
    assert "the probe's failure" in tests["failing"][0]["message"]
    assert tests["skip_reasons"] == {"the probe's skip": 1}
    ops = results["ops_fp32"]
    assert ops["status"] == "failed" and "missing_C.so" in ops["error"]
    summary = (out_dir / "summary.md").read_text()
    assert "| tests | failed |" in summary and "- `test_probe::test_fails`: " in summary
    assert "| ops_fp32 | failed |" in summary and "| attention_fp32 | not selected |" in summary
