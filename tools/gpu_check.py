#!/usr/bin/env python
"""The prepared GPU check: the build, the test suite's GPU tests and the benchmarks in one run.
It needs torch, pytest, a C++ compiler and (for CUDA) nvcc -- no detectron2.  Stages, each written
under --out as it finishes (<stage>.json, and summary.md / summary.json rewritten):

  env              torch, CUDA, GPU name and capability, nvcc, compiler, what imports
  build            enact_ops for the present GPU's architecture only (TORCH_CUDA_ARCH_LIST from
                   torch.cuda.get_device_capability, FORCE_CUDA=1) into --build-dir, then loaded;
                   later stages import it through $ENACT_OPS_EXTENSION
  tests            `pytest -m cuda` on the test files with cuda-marked tests (the device
                   parametrisations of the op, information and mixed-precision tests, and
                   tests/test_cuda.py: device-side assertions, CUDA equals CPU, the fused path);
                   its junit XML gives the counts and each failing test with its message
                   (tests.junit.xml, logs/tests.log); --tests / --marker choose other tests
  attention_fp32   tools/benchmark_attention.py: ENACT vs MHSA (SDPA with the kernel it ran, and
  attention_bf16   eager), fwd+bwd time and peak memory, float32 and AMP bf16
  ops_fp32         tools/benchmark_ops.py: compiled kernels vs the reference, float32 / bfloat16
  ops_bf16
  detector         tools/benchmark.py at the paper's setting -- only where detectron2 imports
                   and a GPU is present (--detector on forces it); outside --budget-s

Each stage runs in a child process under a time limit (LIMITS, halved by --quick, and what is
left of --budget-s for all but the detector); a failure is recorded with its error and the run
goes on; the exit status is 1 if a stage failed or timed out.  Without CUDA (or --device cpu)
the build is skipped (the installed extension is used), --quick benchmarks run at small sizes,
and the tests stage runs the same `pytest -m cuda` selection, whose tests all skip there (their
CPU twins run in the ordinary suite): it shows what the GPU run collects; `--marker "not cuda"`
runs the CPU twins instead.  summary.md ends with the targets of the first GPU run, met or not:
EnactAttention at N = 3400 no slower than SDPA MHSA and at most 0.7x its peak memory (fwd+bwd,
B = 8, C = 256); compiled ops at least 3x faster than the reference.

    python tools/gpu_check.py --out output/gpu_check              # on the GPU machine
    python tools/gpu_check.py --out /tmp/gc --quick --device cpu  # the CPU fallback, ~2 min
"""
import argparse
import contextlib
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENSION_ENV = "ENACT_OPS_EXTENSION"  # enact_ops.ops reads it (kept equal there)
STAGES = ("env", "build", "tests", "attention_fp32", "ops_fp32", "attention_bf16", "ops_bf16", "detector")
# per-stage time limits in seconds (full run on a GPU; --quick halves them)
LIMITS = dict(env=60, build=240, tests=240, attention_fp32=120, ops_fp32=75, attention_bf16=90, ops_bf16=60)
MIN_STAGE_S = 10  # a stage with less of the budget left is skipped
TARGET_N, SPEEDUP_TARGET, TIME_RATIO_TARGET, MEMORY_RATIO_TARGET = 3400, 3.0, 1.0, 0.7
OK, FAILED, SKIPPED, TIMEOUT = "ok", "failed", "skipped", "timeout"


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tail(text, lines=25):
    return "\n".join((text or "").strip().splitlines()[-lines:])


def md_cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")[:300]


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


class StageError(RuntimeError):
    """A stage's command failed; the message holds the tail of its output."""


def run_command(cmd, timeout, log_path, env=None):
    """Run cmd (its own process group) with its output in log_path; TimeoutExpired after timeout
    seconds (the whole group killed), StageError on a non-zero exit."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, **(env or {})),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    with open(log_path) as f:
        output = f.read()
    if rc != 0:
        raise StageError(f"exit status {rc} of {' '.join(cmd[:3])} ...; last lines of {log_path}:\n{tail(output)}")
    return output


def command_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return tail(out.stdout or out.stderr, 1) or f"exit {out.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"not found ({type(e).__name__})"


def importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_home():
    """$CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or the folder above the bin/ of the nvcc on PATH
    (when it has bin/nvcc itself: /usr/local/bin/nvcc may be a wrapper), None if none is found."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and (
                os.path.isdir(os.path.join(home, "lib64")) or os.path.isdir(os.path.join(home, "lib"))):
            return home
    return None


def installed_extension():
    """Where enact_ops._C would come from, without importing it into this process."""
    if os.environ.get(EXTENSION_ENV):
        return f"${EXTENSION_ENV}={os.environ[EXTENSION_ENV]}"
    for path in glob.glob(os.path.join(ROOT, "enact_ops", "_C*.so")):
        return f"enact_ops._C at {path}"
    return "enact_ops._C not built here: reference backend only"


def cuda_test_files():
    """The test files that hold cuda-marked tests (relative to the repository)."""
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    return [os.path.relpath(p, ROOT) for p in files if re.search(r"\bpytest\.mark\.cuda\b", open(p).read())]


def read_junit(path):
    """Counts and the failing / skipped tests of a pytest junit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = child.get("message") or tail(child.text, 3)
                break
        cases.append(dict(name=name, status=status, message=message))
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return dict(counts=counts, failing=[c for c in cases if c["status"] in ("failed", "error")],
                skip_reasons=dict(Counter(c["message"] for c in cases if c["status"] == "skipped")))


class GpuCheck:
    def __init__(self, args):
        self.args, self.out = args, os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.t0, self.results = time.time(), {}
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        self.cuda = self.device == "cuda"
        self.child_env = {EXTENSION_ENV: os.environ[EXTENSION_ENV]} if os.environ.get(EXTENSION_ENV) else {}

    def fresh(self, name):
        """The path of an output file of this run (one left by an earlier run removed)."""
        path = os.path.join(self.out, name)
        if os.path.exists(path):
            os.remove(path)
        return path

    def remaining(self):
        return self.args.budget_s - (time.time() - self.t0)

    def stage(self, name, fn, limit=None, in_budget=True):
        if name not in self.args.stages:
            return
        start = time.time()
        limit = LIMITS.get(name, 60) / (2 if self.args.quick else 1) if limit is None else limit
        timeout = min(limit, self.remaining()) if in_budget else limit
        print(f"[gpu_check] {name} (limit {timeout:.0f} s) ...", flush=True)
        if in_budget and timeout < MIN_STAGE_S:
            result = dict(status=SKIPPED, reason=f"budget spent: {self.remaining():.0f} s of --budget-s "
                          f"{self.args.budget_s:.0f} left")
        else:
            try:
                result = fn(timeout)
            except subprocess.TimeoutExpired:
                result = dict(status=TIMEOUT, reason=f"cut off after {timeout:.0f} s (stage limit {limit:.0f} s, "
                              f"budget left {self.remaining():.0f} s)")
            except Exception as e:  # noqa: BLE001 -- every stage's failure is recorded, the run goes on
                result = dict(status=FAILED, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            bench = os.path.join(self.out, f"{name}.bench.json")
            if name.startswith(("attention", "ops")) and os.path.exists(bench):  # even when cut off
                try:
                    (self._figures_attention if name.startswith("attention") else self._figures_ops)(result, name, bench)
                except Exception:  # noqa: BLE001
                    result.setdefault("figures_error", traceback.format_exc())
        result = dict(stage=name, seconds=round(time.time() - start, 1), **result)
        self.results[name] = result
        write_json(os.path.join(self.out, f"{name}.json"), result)
        line = result.get("summary") or result.get("reason") or result.get("error") or ""
        print(f"[gpu_check] {name}: {result['status']} ({result['seconds']:.1f} s) {line.splitlines()[0] if line else ''}",
              flush=True)
        self.write_summary(final=False)

    def run_env(self, timeout):
        nvcc = os.path.join(cuda_home(), "bin", "nvcc") if cuda_home() else "nvcc"
        info = dict(python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
                    torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), device=self.device,
                    cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                    nvcc=command_version([nvcc, "--version"]), cxx=command_version(["c++", "--version"]),
                    ninja=shutil.which("ninja") is not None, quick=self.args.quick, budget_s=self.args.budget_s,
                    **{m: importable(m) for m in ("pytest", "setuptools", "numpy", "detectron2")})
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            info.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}", gpu_count=torch.cuda.device_count(),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        gpu = f"{info['gpu']} (sm_{info['capability'].replace('.', '')})" if "gpu" in info else "no CUDA device"
        return dict(status=OK, env=info, summary=f"torch {info['torch']} (CUDA {info['torch_cuda']}), Python "
                    f"{info['python']}, {gpu}, nvcc: {info['nvcc']}")

    def run_build(self, timeout):
        if not self.cuda:
            return dict(status=SKIPPED, reason=f"device is CPU ({'--device cpu' if torch.cuda.is_available() else 'no CUDA device'}): "
                        f"nothing to build for a GPU; the CPU stages use the installed extension ({installed_extension()})")
        if self.args.skip_build:
            return dict(status=SKIPPED, reason=f"--skip-build: the stages use the extension importable now ({installed_extension()})")
        arch = "{}.{}".format(*torch.cuda.get_device_capability())
        build = os.path.abspath(self.args.build_dir)
        lib, temp = os.path.join(build, "lib"), os.path.join(build, "temp")
        shutil.rmtree(lib, ignore_errors=True)
        env = dict(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=os.environ.get("MAX_JOBS") or str(os.cpu_count() or 4))
        if cuda_home():
            env["CUDA_HOME"] = cuda_home()
        t = time.time()
        run_command([sys.executable, "setup.py", "-q", "build_ext", "--build-temp", temp, "--build-lib", lib],
                    timeout, os.path.join(self.logs, "build.log"), env=env)
        built = glob.glob(os.path.join(lib, "**", "_C*.so"), recursive=True)
        if len(built) != 1:
            raise StageError(f"expected one enact_ops/_C*.so under {lib}, found {built}")
        compile_s = time.time() - t
        probe = ("import torch, enact_ops; from enact_ops import ops; assert ops._C is not None, ops._IMPORT_ERROR; "
                 "assert ops._C.with_cuda, 'built without CUDA'; assert enact_ops.compiled_available('cuda'); "
                 "print(ops._C.__file__)")
        loaded = run_command([sys.executable, "-c", probe], max(timeout - compile_s, MIN_STAGE_S),
                             os.path.join(self.logs, "build_load.log"), env={EXTENSION_ENV: built[0]})
        self.child_env[EXTENSION_ENV] = built[0]
        return dict(status=OK, summary=f"sm_{arch.replace('.', '')} only, {compile_s:.0f} s, loaded from {built[0]}",
                    arch=arch, extension=built[0], compile_s=round(compile_s, 1), load_output=tail(loaded, 3))

    def run_tests(self, timeout):
        files = self.args.tests or cuda_test_files()
        xml = self.fresh("tests.junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", self.args.marker,
               f"--junitxml={xml}", *files]
        error = None
        try:
            run_command(cmd, timeout, os.path.join(self.logs, "tests.log"),  # no plugins but pytest's own
                        env=dict(self.child_env, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"))
        except StageError as e:  # exit 1: tests failed (the XML says which); else pytest itself failed
            error = str(e)
        if not os.path.exists(xml):
            raise StageError(error or "pytest wrote no junit XML")
        found = read_junit(xml)
        n = found["counts"]
        summary = (f"{n['passed']} passed, {n['failed']} failed, {n['error']} errors, {n['skipped']} skipped "
                   f"(-m {self.args.marker!r}, {len(files)} files, {self.device})")
        if found["failing"]:
            summary += "; failing: " + ", ".join(c["name"].rsplit(".", 1)[-1] for c in found["failing"])
        status = FAILED if error or found["failing"] else OK
        if self.cuda and not n["passed"]:
            status, summary = FAILED, summary + "; nothing passed on the GPU: " + "; ".join(found["skip_reasons"])
        return dict(status=status, summary=summary, files=files, junit_xml=xml, error=error, **found)

    def bench(self, name, timeout):
        """tools/benchmark_attention.py or tools/benchmark_ops.py for a stage (attention_fp32, ops_bf16, ...)."""
        kind, precision = name.split("_")
        q = self.args.quick
        if q and name == "ops_bf16":
            return dict(status=SKIPPED, reason="--quick: the bfloat16 op benchmark runs in full runs only")
        sizes = ["--batch", "2" if q else "8", "--channels", "32" if q else "256", "--seq-lens",
                 *(["256"] if q else ["850", str(TARGET_N)]), "--repeats", "1" if q else ("5" if kind == "attention" else "10")]
        if kind == "attention":
            variants = ["mhsa-sdpa"] + (["mhsa-eager"] if precision == "fp32" or not q else []) + ["enact-sdpa"] + \
                (["enact-eager"] if precision == "fp32" and not q else [])
            sizes += ["--heads", "4" if q else "8", "--amp", "none" if precision == "fp32" else "bf16", "--variants", *variants]
        else:
            sizes += ["--dtype", "float32" if precision == "fp32" else "bfloat16"]
        run_command([sys.executable, f"tools/benchmark_{kind}.py", "--device", self.device, "--out",
                     self.fresh(f"{name}.bench.json"), *sizes], timeout, os.path.join(self.logs, f"{name}.log"), env=self.child_env)
        return dict(status=OK)

    def _figures_attention(self, result, name, path):
        data = read_json(path)
        keys = ("N", "variant", "time_s", "peak_bytes", "sdpa_kernel", "clusters_per_image", "time_ratio_vs_sdpa",
                "memory_ratio_vs_sdpa", "time_ratio_vs_eager", "memory_ratio_vs_eager")
        rows = result["rows"] = [{k: r.get(k) for k in keys} for r in data["rows"]]
        result["device_name"] = data.get("device_name")
        top = max(r["N"] for r in rows)
        enact = next((r for r in rows if r["N"] == top and r["variant"] == "enact-sdpa"), None)
        mhsa = next((r for r in rows if r["N"] == top and r["variant"] == "mhsa-sdpa"), None)
        if enact and mhsa:
            result["summary"] = (f"N={top}: enact-sdpa {enact['time_s'] * 1e3:.1f} ms / {enact['peak_bytes'] / 2**20:.0f} MiB = "
                                 f"{fmt_ratio(enact.get('time_ratio_vs_sdpa'))} time, {fmt_ratio(enact.get('memory_ratio_vs_sdpa'))} "
                                 f"memory of mhsa-sdpa ({mhsa['sdpa_kernel']})")
        if self.cuda:  # what MHSA would run on an unpadded batch (the benchmark pads half the batch)
            from projects.enact.benchmark.utils import sdpa_backend

            dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
            q = torch.randn(*((2, 4, 256, 8) if self.args.quick else (8, 8, TARGET_N, 32)), device="cuda", dtype=dtype)
            result["sdpa_kernel_unpadded"] = sdpa_backend(q, q, q, None)

    def _figures_ops(self, result, name, path):
        result["rows"] = [dict(N=r["N"], M_max=r["M_max"], speedup=r["speedup"], memory_ratio=r["memory_ratio"],
                               times_ms={k: v * 1e3 for k, v in r["times_s"].items()},
                               peak_mib={k: v / 2**20 for k, v in r["peak_bytes"].items()}) for r in read_json(path)["rows"]]
        result["summary"] = "; ".join(f"N={r['N']}: {r['speedup']:.2f}x faster, {r['memory_ratio']:.2f}x memory"
                                      for r in result["rows"])

    def run_detector(self, timeout):
        if self.args.detector == "off":
            return dict(status=SKIPPED, reason="--detector off")
        if self.args.detector == "auto" and not self.cuda:
            return dict(status=SKIPPED, reason="no CUDA device: the paper's setting (8 images of 800 x 1333, "
                        "three detectors) is a GPU run (--detector on forces it)")
        if not importable("detectron2"):
            return dict(status=SKIPPED, reason="detectron2 is not installed")
        md, js = os.path.join(self.out, "detector.md"), os.path.join(self.out, "detector.bench.json")
        cmd = [sys.executable, "tools/benchmark.py", "--device", self.device, "--out-md", md, "--out-json", js]
        if self.args.quick:
            cmd += ["--batch", "1", "--size", "256", "384", "--repeats", "1"]
        run_command(cmd, timeout, os.path.join(self.logs, "detector.log"), env=self.child_env)
        return dict(status=OK, summary=f"paper's setting{' (quick sizes)' if self.args.quick else ''}: see detector.md",
                    markdown=md, bench_json=js)

    def run(self):
        self.stage("env", self.run_env)
        self.stage("build", self.run_build)
        self.stage("tests", self.run_tests)
        for name in ("attention_fp32", "ops_fp32", "attention_bf16", "ops_bf16"):
            self.stage(name, lambda t, name=name: self.bench(name, t))
        self.stage("detector", self.run_detector, limit=self.args.detector_budget_s, in_budget=False)
        self.write_summary(final=True)
        print(open(os.path.join(self.out, "summary.md")).read())
        return 1 if any(r["status"] in (FAILED, TIMEOUT) for r in self.results.values()) else 0

    def targets(self):
        """[(target, measured, verdict)]: the targets of the first GPU run."""
        rows = []
        note = "" if self.cuda and not self.args.quick else \
            f" (on {self.device}{', --quick sizes' if self.args.quick else ''}: not the target's setting)"
        for name, label in (("attention_fp32", "float32"), ("attention_bf16", "AMP bf16")):
            res = self.results.get(name, {})
            data = res.get("rows") or []
            ns = sorted({r["N"] for r in data})
            n = TARGET_N if TARGET_N in ns else (ns[-1] if ns else TARGET_N)
            enact = next((r for r in data if r["N"] == n and r["variant"] == "enact-sdpa"), None)
            for key, limit, what in (("time_ratio_vs_sdpa", TIME_RATIO_TARGET, "time"),
                                     ("memory_ratio_vs_sdpa", MEMORY_RATIO_TARGET, "peak memory")):
                target = f"EnactAttention {what} <= {limit:g}x SDPA MHSA, N={n}, fwd+bwd, {label}"
                if enact is None or enact.get(key) is None:
                    rows.append((target, f"not measured ({res.get('status', 'not run')})", "not measured"))
                else:
                    rows.append((target, f"{enact[key]:.2f}x{note}", "met" if enact[key] <= limit else "not met"))
        res = self.results.get("ops_fp32", {})
        if not res.get("rows"):
            rows.append((f"compiled ops >= {SPEEDUP_TARGET:g}x faster than the reference (steps 1-4 + segment + pool fwd+bwd)",
                         f"not measured ({res.get('status', 'not run')})", "not measured"))
        for r in res.get("rows") or []:
            rows.append((f"compiled ops >= {SPEEDUP_TARGET:g}x faster than the reference, N={r['N']}, float32",
                         f"{r['speedup']:.2f}x{note}", "met" if r["speedup"] >= SPEEDUP_TARGET else "not met"))
        return rows

    def write_summary(self, final):
        env = self.results.get("env", {}).get("env", {})
        lines = ["# ENACT GPU check" + ("" if final else " (partial: the run is still going or was cut off)"), ""]
        if env:
            gpu = f"{env.get('gpu')} (capability {env.get('capability')})" if env.get("gpu") else "no CUDA device"
            lines += [f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Python {env.get('python')}, {gpu}; "
                      f"device {self.device}{', --quick' if self.args.quick else ''}; "
                      f"{time.time() - self.t0:.0f} s so far, --budget-s {self.args.budget_s:.0f}", ""]
        lines += ["| stage | status | seconds | result |", "|---|---|---:|---|"]
        for name in STAGES:
            r = self.results.get(name) or dict(status="not run" if name in self.args.stages else "not selected", seconds="")
            text = r.get("summary") or r.get("reason") or r.get("error") or ""
            lines.append(f"| {name} | {r['status']} | {r['seconds']} | {md_cell(text)} |")
        failing = self.results.get("tests", {}).get("failing")
        if failing:
            lines += ["", "## Failing tests", ""] + [f"- `{c['name']}`: {md_cell(c['message'])}" for c in failing]
        for name in ("attention_fp32", "attention_bf16"):
            rows = self.results.get(name, {}).get("rows")
            if rows:
                lines += ["", f"## {name}: fwd+bwd per call", "",
                          "| N | variant | ms | peak MiB | SDPA kernel | M/img | t/sdpa | mem/sdpa | t/eager | mem/eager |",
                          "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
                for r in rows:
                    m = r.get("clusters_per_image")
                    ratios = " | ".join(fmt_ratio(r.get(f"{a}_ratio_vs_{b}")) for b in ("sdpa", "eager") for a in ("time", "memory"))
                    lines.append(f"| {r['N']} | {r['variant']} | {r['time_s'] * 1e3:.2f} | {r['peak_bytes'] / 2**20:.1f} | "
                                 f"{r['sdpa_kernel']} | {'-' if m is None else f'{m:.1f}'} | {ratios} |")
                unpadded = self.results[name].get("sdpa_kernel_unpadded")
                lines += [f"\nSDPA kernel MHSA would run on an unpadded batch (no mask): {unpadded}"] if unpadded else []
        for name in ("ops_fp32", "ops_bf16"):
            rows = self.results.get(name, {}).get("rows")
            if rows:
                lines += ["", f"## {name}: steps 1-4 + segment + pool fwd+bwd, compiled vs reference", "",
                          "| N | M_max | steps 1-4 ms (ext / ref) | segment ms (ext / ref) | pool ms (ext / ref) | speed-up | "
                          "peak MiB (ext / ref) | mem ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
                for r in rows:
                    t, p = r["times_ms"], r["peak_mib"]
                    pair = " | ".join(f"{t[f'{s}/compiled']:.2f} / {t[f'{s}/reference']:.2f}" if f"{s}/compiled" in t else "-"
                                      for s in ("steps", "segment", "pool"))
                    lines.append(f"| {r['N']} | {r['M_max']} | {pair} | {r['speedup']:.2f}x | "
                                 f"{p['compiled']:.1f} / {p['reference']:.1f} | {r['memory_ratio']:.2f}x |")
        targets = self.targets()
        lines += ["", "## Targets (first GPU run)", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {m} | **{v}** |" for t, m, v in targets]
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        write_json(os.path.join(self.out, "summary.json"), dict(
            final=final, device=self.device, quick=self.args.quick, elapsed_s=round(time.time() - self.t0, 1),
            stages={n: {k: v for k, v in r.items() if k != "traceback"} for n, r in self.results.items()},
            targets=[dict(target=t, measured=m, verdict=v) for t, m, v in targets]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/gpu_check", help="results folder (created)")
    p.add_argument("--budget-s", type=float, default=300.0, help="time for all stages but the detector (default 300)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="small benchmark sizes, half the stage limits (the CPU fallback)")
    p.add_argument("--skip-build", action="store_true", help="use the extension importable now")
    p.add_argument("--build-dir", default=os.path.join(ROOT, "build", "gpu-check"))
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages")
    p.add_argument("--tests", nargs="+", help="the tests stage's test files or node ids (default: cuda_test_files())")
    p.add_argument("--marker", default="cuda", help="the tests stage's pytest -m expression (default: cuda)")
    p.add_argument("--detector", choices=["auto", "on", "off"], default="auto",
                   help="auto: where a GPU is present and detectron2 imports")
    p.add_argument("--detector-budget-s", type=float, default=540.0)
    return GpuCheck(p.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
