"""tools/gpu_check.py's CPU fallback, run the way the GPU machine runs it: with torch alone
(detectron2, fvcore, pytest & co. made unimportable in it and in every process it starts)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_ALONE = """\
import importlib.abc, sys
BLOCKED = {"detectron2", "fvcore", "iopath", "pytest", "omegaconf", "hydra", "scipy", "pycocotools", "detrex",
           "timm", "cv2"}
class _TorchAlone(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the GPU machine has torch alone")
sys.meta_path.insert(0, _TorchAlone())
"""


def _torch_alone_env(tmp_path):
    site = tmp_path / "torch_alone"
    site.mkdir()
    (site / "sitecustomize.py").write_text(TORCH_ALONE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]))
    env.pop("ENACT_OPS_EXTENSION", None)
    return env


def test_torch_alone_blocks_detectron2(tmp_path):
    """The blocker works (else the test below would prove nothing)."""
    out = subprocess.run([sys.executable, "-c", "import detectron2"], env=_torch_alone_env(tmp_path),
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "blocked" in out.stderr


def test_cpu_fallback_quick_run(tmp_path):
    out_dir = tmp_path / "gpu_check"
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--out", str(out_dir), "--quick", "--device", "cpu",
         "--skip-build", "--detector", "auto", "--budget-s", "240"],
        env=_torch_alone_env(tmp_path), capture_output=True, text=True, cwd=ROOT, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {}
    for stage in ("env", "build", "checks", "attention_fp32", "ops_fp32", "attention_bf16", "ops_bf16", "detector"):
        path = out_dir / f"{stage}.json"
        assert path.exists(), stage
        results[stage] = json.loads(path.read_text())
        assert results[stage]["status"] in ("ok", "skipped"), (stage, results[stage])
    # the stages that need CUDA (or full sizes) are skipped and say why
    assert results["build"]["status"] == "skipped" and "CPU" in results["build"]["reason"]
    assert results["ops_bf16"]["status"] == "skipped" and "--quick" in results["ops_bf16"]["reason"]
    assert results["detector"]["status"] == "skipped" and "no CUDA" in results["detector"]["reason"]
    assert results["env"]["env"]["cuda_available"] in (False, True) and results["env"]["env"]["device"] == "cpu"
    # the op and module checks ran on CPU without pytest; the CUDA-only ones say why they skipped
    checks = {c["name"]: c for c in results["checks"]["checks"]}
    compiled = "not loaded" not in results["checks"]["extension"]
    must_run = ["enact_attention_agreement", "bound_errors", "backward_sum_vs_reference", "segmentation_vs_reference"]
    for name in must_run:
        assert checks[name]["status"] == ("ok" if compiled else "skipped"), checks[name]
    assert checks["tf32_same_clusters"]["status"] == "skipped" and "CUDA" in checks["tf32_same_clusters"]["reason"]
    assert checks["device_assertions"]["status"] == "skipped"
    # benchmark figures, ENACT against MHSA with the SDPA kernel named
    rows = results["attention_fp32"]["rows"]
    assert {r["variant"] for r in rows} == {"mhsa-sdpa", "mhsa-eager", "enact-sdpa"}
    assert all(r["time_s"] > 0 for r in rows)
    assert next(r for r in rows if r["variant"] == "mhsa-sdpa")["sdpa_kernel"] == "math (CPU)"
    if compiled:
        assert results["ops_fp32"]["rows"][0]["speedup"] > 0
    summary = (out_dir / "summary.md").read_text()
    assert "## Targets (issue 16, first GPU run)" in summary
    assert "| build | skipped |" in summary and "| detector | skipped |" in summary
    assert "not the target's setting" in summary
    assert summary.count("**met**") + summary.count("**not met**") >= 4
    assert (out_dir / "stages.md").read_text().count("\n") == 2 + 8  # header + one line per stage
    data = json.loads((out_dir / "summary.json").read_text())
    assert data["final"] and len(data["targets"]) >= 5


def test_a_failing_stage_is_recorded_and_the_run_goes_on(tmp_path):
    """A stage that cannot run (here: the checks' child given a broken extension path) is recorded
    as failed with its error, and the stages after it still run and write their results."""
    env = _torch_alone_env(tmp_path)
    env["ENACT_OPS_EXTENSION"] = str(tmp_path / "missing_C.so")
    env.pop("ENACT_REQUIRE_COMPILED", None)  # this test is about running without the extension
    out_dir = tmp_path / "gpu_check"
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--out", str(out_dir), "--quick", "--device", "cpu",
         "--stages", "env", "checks", "ops_fp32", "--budget-s", "120"],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    checks = json.loads((out_dir / "checks.json").read_text())
    # without the extension the op checks skip and say why; nothing crashes
    assert all(c["status"] in ("ok", "skipped") for c in checks["checks"])
    assert any("missing_C.so" in c.get("reason", "") for c in checks["checks"])
    ops = json.loads((out_dir / "ops_fp32.json").read_text())
    assert ops["status"] == "failed" and "not available" in ops["error"]
    summary = (out_dir / "summary.md").read_text()
    assert "| ops_fp32 | failed |" in summary and "| attention_fp32 | not selected |" in summary
