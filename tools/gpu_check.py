#!/usr/bin/env python
"""The prepared GPU check: build, op and module checks, benchmarks and the issue's targets in one
run that needs nothing but torch, a C++ compiler and (for CUDA) nvcc -- no detectron2, no pytest,
no package registry.

Stages, each written under --out as soon as it finishes (<stage>.json, one line of stages.md,
and summary.md / summary.json rewritten), so a run cut off midway still leaves its figures:

  env              torch, CUDA, GPU name and capability, nvcc, compiler, what imports
  build            enact_ops for the present GPU's architecture only (TORCH_CUDA_ARCH_LIST from
                   torch.cuda.get_device_capability, FORCE_CUDA=1) into --build-dir, then loaded
                   the way `make build-cuda-check` loads build/cuda-lib; later stages import it
                   through $ENACT_OPS_EXTENSION
  checks           without pytest: every compiled op against the pure-PyTorch reference (values
                   and gradients, segment_softmax_pool_backward_sum included, float64 gradcheck),
                   EnactAttention on CUDA against CPU (same clusters, close outputs and
                   gradients), the fused path taken, TF32 on -> the same clusters, the bound
                   checks (host errors; device-side assertions in a child process on CUDA)
  attention_fp32   tools/benchmark_attention.py: ENACT vs MHSA (SDPA with the kernel it ran, and
  attention_bf16   eager), fwd+bwd time and peak memory, float32 and AMP bf16
  ops_fp32         tools/benchmark_ops.py: compiled kernels vs the reference, float32 / bfloat16
  ops_bf16
  detector         tools/benchmark.py at the paper's setting -- only where detectron2 imports
                   and a GPU is present (--detector on forces it); outside --budget-s

Every stage runs its work in a child process under a time limit (the stage's own, and what is
left of --budget-s for all stages but the detector), catches its errors (status "failed" with
the traceback) and the run goes on.  On a machine without CUDA it falls back: the build is
skipped (the installed extension is used), the checks run on CPU and --quick benchmarks run at
small sizes.  summary.md ends with the targets of the first GPU run (issue 16), met or not:
EnactAttention at N = 3400 no slower than SDPA MHSA and at most 0.7x its peak memory (fwd+bwd,
B = 8, C = 256); compiled ops at least 3x faster than the reference.

    python tools/gpu_check.py --out output/gpu_check              # on the GPU machine
    python tools/gpu_check.py --out /tmp/gc --quick --device cpu  # the CPU fallback, ~1 min
"""
import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

EXTENSION_ENV = "ENACT_OPS_EXTENSION"  # enact_ops.ops reads it (kept equal there)
STAGES = ("env", "build", "checks", "attention_fp32", "ops_fp32", "attention_bf16", "ops_bf16", "detector")
# per-stage time limits in seconds (full run on a GPU; --quick divides them)
LIMITS = dict(env=60, build=240, checks=120, attention_fp32=120, ops_fp32=75, attention_bf16=90, ops_bf16=60)
MIN_STAGE_S = 10  # a stage with less of the budget left is skipped
TARGET_N = 3400
SPEEDUP_TARGET = 3.0
TIME_RATIO_TARGET = 1.0
MEMORY_RATIO_TARGET = 0.7
OK, FAILED, SKIPPED, TIMEOUT = "ok", "failed", "skipped", "timeout"


# ---------------------------------------------------------------------------------------------
# small helpers (torch only)
# ---------------------------------------------------------------------------------------------
def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tail(text, lines=25):
    return "\n".join((text or "").strip().splitlines()[-lines:])


class StageError(RuntimeError):
    """A stage's command failed; the message holds the tail of its output."""


def run_command(cmd, timeout, log_path, env=None, cwd=ROOT):
    """Run cmd (its own process group) with its output in log_path; TimeoutExpired after timeout
    seconds (the whole group killed), StageError on a non-zero exit."""
    full_env = dict(os.environ, **(env or {}))
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=full_env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


# ---------------------------------------------------------------------------------------------
# the stages (run in the parent; heavy work in child processes)
# ---------------------------------------------------------------------------------------------
class GpuCheck:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.t0 = time.time()
        self.results = {}
        self.device = self._resolve_device(args.device)
        self.child_env = {}
        if os.environ.get(EXTENSION_ENV):
            self.child_env[EXTENSION_ENV] = os.environ[EXTENSION_ENV]
        with open(os.path.join(self.out, "stages.md"), "w") as f:
            f.write("| stage | status | seconds | result |\n|---|---|---:|---|\n")

    @staticmethod
    def _resolve_device(device):
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False")
        return device

    @property
    def cuda(self):
        return self.device == "cuda"

    def remaining(self):
        return self.args.budget_s - (time.time() - self.t0)

    def scale(self, seconds):
        return seconds / 2 if self.args.quick else seconds

    # -- running one stage -------------------------------------------------------------------
    def stage(self, name, fn, limit=None, in_budget=True):
        if name not in self.args.stages:
            return
        start = time.time()
        limit = self.scale(LIMITS.get(name, 60)) if limit is None else limit
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
            fill = getattr(self, f"_figures_{name}", None)
            if fill is not None and result.get("status") in (OK, FAILED, TIMEOUT):
                try:  # whatever the child left, even when cut off
                    fill(result)
                except Exception:  # noqa: BLE001
                    result.setdefault("figures_error", traceback.format_exc())
        result = dict(stage=name, seconds=round(time.time() - start, 1), **result)
        self.results[name] = result
        write_json(os.path.join(self.out, f"{name}.json"), result)
        line = result.get("summary") or result.get("reason") or result.get("error") or ""
        with open(os.path.join(self.out, "stages.md"), "a") as f:
            f.write(f"| {name} | {result['status']} | {result['seconds']:.1f} | {md_cell(line)} |\n")
        print(f"[gpu_check] {name}: {result['status']} ({result['seconds']:.1f} s) {line.splitlines()[0] if line else ''}",
              flush=True)
        self.write_summary(final=False)

    # -- a: environment ------------------------------------------------------------------------
    def run_env(self, timeout):
        info = dict(
            python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
            torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), device=self.device,
            cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
            nvcc=command_version([nvcc_path(), "--version"]), cxx=command_version(["c++", "--version"]),
            ninja=shutil.which("ninja") is not None,
            setuptools=importable("setuptools"), detectron2=importable("detectron2"), numpy=importable("numpy"),
            quick=self.args.quick, budget_s=self.args.budget_s,
        )
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            info.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}",
                        gpu_count=torch.cuda.device_count(),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        gpu = f"{info['gpu']} (sm_{info['capability'].replace('.', '')})" if "gpu" in info else "no CUDA device"
        summary = (f"torch {info['torch']} (CUDA {info['torch_cuda']}), Python {info['python']}, {gpu}, "
                   f"nvcc: {info['nvcc']}")
        return dict(status=OK, summary=summary, env=info)

    # -- b: build ------------------------------------------------------------------------------
    def run_build(self, timeout):
        if not self.cuda:
            return dict(status=SKIPPED, reason=f"device is CPU ({'--device cpu' if torch.cuda.is_available() else 'no CUDA device'}): "
                        f"nothing to build for a GPU; the CPU stages use the installed extension ({installed_extension()})")
        if self.args.skip_build:
            return dict(status=SKIPPED, reason=f"--skip-build: the stages use the extension importable now ({installed_extension()})")
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
        build = os.path.abspath(self.args.build_dir)
        lib, temp = os.path.join(build, "lib"), os.path.join(build, "temp")
        shutil.rmtree(lib, ignore_errors=True)
        env = dict(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=os.environ.get("MAX_JOBS") or str(os.cpu_count() or 4))
        home = cuda_home()
        if home:
            env["CUDA_HOME"] = home
        t = time.time()
        run_command([sys.executable, "setup.py", "-q", "build_ext", "--build-temp", temp, "--build-lib", lib],
                    timeout, os.path.join(self.logs, "build.log"), env=env)
        built = [os.path.join(dp, f) for dp, _, fs in os.walk(lib) for f in fs if f.startswith("_C") and f.endswith(".so")]
        if len(built) != 1:
            raise StageError(f"expected one enact_ops/_C*.so under {lib}, found {built}")
        compile_s = time.time() - t
        probe = ("import torch, enact_ops; from enact_ops import ops; "
                 "assert ops._C is not None, ops._IMPORT_ERROR; assert ops._C.with_cuda, 'built without CUDA'; "
                 "assert enact_ops.compiled_available('cuda'); "
                 "assert hasattr(torch.ops.enact_ops, 'segment_softmax_pool_backward_sum'); print(ops._C.__file__)")
        loaded = run_command([sys.executable, "-c", probe], max(timeout - compile_s, MIN_STAGE_S),
                             os.path.join(self.logs, "build_load.log"), env={EXTENSION_ENV: built[0]})
        self.child_env[EXTENSION_ENV] = built[0]
        return dict(status=OK, summary=f"sm_{arch.replace('.', '')} only, {compile_s:.0f} s, loaded from {built[0]}",
                    arch=arch, extension=built[0], compile_s=round(compile_s, 1), load_output=tail(loaded, 3))

    # -- c: op and module checks ---------------------------------------------------------------
    def run_checks(self, timeout):
        path = os.path.join(self.out, "checks_detail.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "checks", "--device", self.device,
               "--out", self.out] + (["--quick"] if self.args.quick else [])
        status, error = OK, None
        try:
            run_command(cmd, timeout, os.path.join(self.logs, "checks.log"), env=self.child_env)
        except StageError as e:  # failed checks (exit 1) or a crash: the detail says which
            status, error = FAILED, str(e)
        except subprocess.TimeoutExpired:
            status, error = TIMEOUT, f"cut off after {timeout:.0f} s; the checks done by then are listed"
        detail = read_json(path) or {"checks": []}
        checks = detail["checks"]
        counts = {s: sum(c["status"] == s for c in checks) for s in (OK, FAILED, SKIPPED)}
        failed = [c["name"] for c in checks if c["status"] == FAILED]
        summary = f"{counts[OK]} ok, {counts[FAILED]} failed, {counts[SKIPPED]} skipped on {self.device}"
        if failed:
            summary += "; failed: " + ", ".join(failed)
        if status == OK and failed:
            status = FAILED
        result = dict(status=status, summary=summary, checks=checks, extension=detail.get("extension"))
        if error:
            result["error"] = error
        return result

    # -- d: benchmarks -------------------------------------------------------------------------
    def _attention(self, amp, timeout):
        a = self.args
        name = f"attention_{'fp32' if amp == 'none' else amp}"
        path = os.path.join(self.out, f"{name}.bench.json")
        if a.quick:
            sizes = ["--batch", "2", "--channels", "32", "--heads", "4", "--seq-lens", "256", "--repeats", "1"]
            variants = ["mhsa-sdpa", "mhsa-eager", "enact-sdpa"] if amp == "none" else ["mhsa-sdpa", "enact-sdpa"]
        else:
            sizes = ["--batch", "8", "--channels", "256", "--heads", "8", "--seq-lens", "850", str(TARGET_N), "--repeats", "5"]
            variants = ["mhsa-sdpa", "mhsa-eager", "enact-sdpa", "enact-eager"] if amp == "none" else \
                ["mhsa-sdpa", "mhsa-eager", "enact-sdpa"]
        cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark_attention.py"), "--device", self.device,
               "--amp", amp, "--out", path, "--variants", *variants, *sizes]
        run_command(cmd, timeout, os.path.join(self.logs, f"{name}.log"), env=self.child_env)
        return dict(status=OK, bench_json=path)

    def _ops(self, dtype, timeout):
        a = self.args
        path = os.path.join(self.out, f"ops_{dtype}.bench.json".replace("float32", "fp32").replace("bfloat16", "bf16"))
        sizes = (["--batch", "2", "--channels", "32", "--seq-lens", "256", "--repeats", "1"] if a.quick else
                 ["--batch", "8", "--channels", "256", "--seq-lens", "850", str(TARGET_N), "--repeats", "10"])
        cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark_ops.py"), "--device", self.device,
               "--dtype", dtype, "--out", path, *sizes]
        run_command(cmd, timeout, os.path.join(self.logs, os.path.basename(path).replace(".bench.json", ".log")),
                    env=self.child_env)
        return dict(status=OK, bench_json=path)

    def run_attention_fp32(self, timeout):
        return self._attention("none", timeout)

    def run_attention_bf16(self, timeout):
        return self._attention("bf16", timeout)

    def run_ops_fp32(self, timeout):
        return self._ops("float32", timeout)

    def run_ops_bf16(self, timeout):
        if self.args.quick:
            return dict(status=SKIPPED, reason="--quick: the bfloat16 op benchmark runs in full runs only")
        return self._ops("bfloat16", timeout)

    def _figures_attention(self, result, name):
        data = read_json(os.path.join(self.out, f"{name}.bench.json"))
        if not data:
            return
        rows = [{k: r.get(k) for k in ("N", "variant", "time_s", "peak_bytes", "sdpa_kernel", "clusters_per_image",
                                       "time_ratio_vs_sdpa", "memory_ratio_vs_sdpa", "time_ratio_vs_eager",
                                       "memory_ratio_vs_eager")} for r in data["rows"]]
        result["rows"] = rows
        result["device_name"] = data.get("device_name")
        top = max(r["N"] for r in rows)
        enact = next((r for r in rows if r["N"] == top and r["variant"] == "enact-sdpa"), None)
        mhsa = next((r for r in rows if r["N"] == top and r["variant"] == "mhsa-sdpa"), None)
        if enact and mhsa:
            result["summary"] = (f"N={top}: enact-sdpa {enact['time_s'] * 1e3:.1f} ms / {enact['peak_bytes'] / 2**20:.0f} MiB = "
                                 f"{fmt_ratio(enact.get('time_ratio_vs_sdpa'))} time, {fmt_ratio(enact.get('memory_ratio_vs_sdpa'))} "
                                 f"memory of mhsa-sdpa ({mhsa['sdpa_kernel']})")
        if self.cuda:  # what MHSA would run on an unpadded batch (the benchmark pads half the batch)
            result["sdpa_kernel_unpadded"] = unpadded_sdpa_kernel(name, self.args)

    def _figures_attention_fp32(self, result):
        self._figures_attention(result, "attention_fp32")

    def _figures_attention_bf16(self, result):
        self._figures_attention(result, "attention_bf16")

    def _figures_ops(self, result, name):
        data = read_json(os.path.join(self.out, f"{name}.bench.json"))
        if not data:
            return
        result["rows"] = [dict(N=r["N"], M_max=r["M_max"], speedup=r["speedup"], memory_ratio=r["memory_ratio"],
                               times_ms={k: v * 1e3 for k, v in r["times_s"].items()},
                               peak_mib={k: v / 2**20 for k, v in r["peak_bytes"].items()}) for r in data["rows"]]
        result["summary"] = "; ".join(f"N={r['N']}: {r['speedup']:.2f}x faster, {r['memory_ratio']:.2f}x memory"
                                      for r in result["rows"])

    def _figures_ops_fp32(self, result):
        self._figures_ops(result, "ops_fp32")

    def _figures_ops_bf16(self, result):
        self._figures_ops(result, "ops_bf16")

    # -- e: the detector benchmark -------------------------------------------------------------
    def run_detector(self, timeout):
        mode = self.args.detector
        if mode == "off":
            return dict(status=SKIPPED, reason="--detector off")
        if mode == "auto" and not self.cuda:
            return dict(status=SKIPPED, reason="no CUDA device: the paper's setting (8 images of 800 x 1333, "
                        "three detectors) is a GPU run (--detector on forces it)")
        try:
            run_command([sys.executable, "-c", "import detectron2"], 120, os.path.join(self.logs, "detector_import.log"),
                        env=self.child_env)
        except StageError as e:
            return dict(status=SKIPPED, reason=f"detectron2 does not import: {tail(str(e), 1)}")
        md, js = os.path.join(self.out, "detector.md"), os.path.join(self.out, "detector.bench.json")
        cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--device", self.device,
               "--out-md", md, "--out-json", js]
        if self.args.quick:
            cmd += ["--batch", "1", "--size", "256", "384", "--repeats", "1"]
        run_command(cmd, timeout, os.path.join(self.logs, "detector.log"), env=self.child_env)
        return dict(status=OK, summary=f"paper's setting{' (quick sizes)' if self.args.quick else ''}: see detector.md",
                    markdown=md, bench_json=js)

    # -- the whole run ---------------------------------------------------------------------------
    def run(self):
        self.stage("env", self.run_env)
        self.stage("build", self.run_build)
        self.stage("checks", self.run_checks)
        self.stage("attention_fp32", self.run_attention_fp32)
        self.stage("ops_fp32", self.run_ops_fp32)
        self.stage("attention_bf16", self.run_attention_bf16)
        self.stage("ops_bf16", self.run_ops_bf16)
        self.stage("detector", self.run_detector, limit=self.args.detector_budget_s, in_budget=False)
        self.write_summary(final=True)
        print(open(os.path.join(self.out, "summary.md")).read())
        bad = [n for n, r in self.results.items() if r["status"] in (FAILED, TIMEOUT)]
        return 1 if bad else 0

    # -- summary -----------------------------------------------------------------------------------
    def targets(self):
        """[(target, measured, verdict)] for issue 16's targets of the first GPU run."""
        rows = []
        full = self.cuda and not self.args.quick
        note = "" if full else f" (on {self.device}{', --quick sizes' if self.args.quick else ''}: not the target's setting)"
        for name, label in (("attention_fp32", "float32"), ("attention_bf16", "AMP bf16")):
            res = self.results.get(name, {})
            data = res.get("rows") or []
            ns = sorted({r["N"] for r in data})
            n = TARGET_N if TARGET_N in ns else (ns[-1] if ns else None)
            enact = next((r for r in data if r["N"] == n and r["variant"] == "enact-sdpa"), None)
            where = f"N={n}" if n is not None else f"N={TARGET_N}"
            for key, limit, what in (("time_ratio_vs_sdpa", TIME_RATIO_TARGET, "time"),
                                     ("memory_ratio_vs_sdpa", MEMORY_RATIO_TARGET, "peak memory")):
                target = f"EnactAttention {what} <= {limit:g}x SDPA MHSA, {where}, fwd+bwd, {label}"
                if enact is None or enact.get(key) is None:
                    rows.append((target, f"not measured ({res.get('status', 'not run')})", "not measured"))
                else:
                    v = enact[key]
                    rows.append((target, f"{v:.2f}x{note}", "met" if v <= limit else "not met"))
        res = self.results.get("ops_fp32", {})
        data = res.get("rows") or []
        if not data:
            rows.append((f"compiled ops >= {SPEEDUP_TARGET:g}x faster than the reference (steps 1-4 + segment + pool fwd+bwd)",
                         f"not measured ({res.get('status', 'not run')})", "not measured"))
        for r in data:
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
            r = self.results.get(name)
            if r is None:
                status = "not run" if name in self.args.stages else "not selected"
                lines.append(f"| {name} | {status} | | |")
            else:
                text = r.get("summary") or r.get("reason") or r.get("error") or ""
                lines.append(f"| {name} | {r['status']} | {r['seconds']:.1f} | {md_cell(text)} |")
        for name in ("attention_fp32", "attention_bf16"):
            rows = self.results.get(name, {}).get("rows")
            if rows:
                lines += ["", f"## {name}: fwd+bwd per call", "",
                          "| N | variant | ms | peak MiB | SDPA kernel | M/img | t/sdpa | mem/sdpa | t/eager | mem/eager |",
                          "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
                for r in rows:
                    m = r.get("clusters_per_image")
                    lines.append(f"| {r['N']} | {r['variant']} | {r['time_s'] * 1e3:.2f} | {r['peak_bytes'] / 2**20:.1f} | "
                                 f"{r['sdpa_kernel']} | {'-' if m is None else f'{m:.1f}'} | {fmt_ratio(r.get('time_ratio_vs_sdpa'))} | "
                                 f"{fmt_ratio(r.get('memory_ratio_vs_sdpa'))} | {fmt_ratio(r.get('time_ratio_vs_eager'))} | "
                                 f"{fmt_ratio(r.get('memory_ratio_vs_eager'))} |")
                unpadded = self.results[name].get("sdpa_kernel_unpadded")
                if unpadded:
                    lines.append(f"\nSDPA kernel MHSA would run on an unpadded batch (no mask): {unpadded}")
        for name in ("ops_fp32", "ops_bf16"):
            rows = self.results.get(name, {}).get("rows")
            if rows:
                lines += ["", f"## {name}: steps 1-4 + segment + pool fwd+bwd, compiled vs reference", "",
                          "| N | M_max | steps 1-4 ms (ext / ref) | segment ms (ext / ref) | pool ms (ext / ref) | speed-up | "
                          "peak MiB (ext / ref) | mem ratio |",
                          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
                for r in rows:
                    t, p = r["times_ms"], r["peak_mib"]
                    steps = (f"{t['steps/compiled']:.2f} / {t['steps/reference']:.2f}" if "steps/compiled" in t else "-")
                    lines.append(f"| {r['N']} | {r['M_max']} | {steps} | {t['segment/compiled']:.2f} / {t['segment/reference']:.2f} | "
                                 f"{t['pool/compiled']:.2f} / {t['pool/reference']:.2f} | {r['speedup']:.2f}x | "
                                 f"{p['compiled']:.1f} / {p['reference']:.1f} | {r['memory_ratio']:.2f}x |")
        targets = self.targets()
        lines += ["", "## Targets (issue 16, first GPU run)", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {m} | **{v}** |" for t, m, v in targets]
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        write_json(os.path.join(self.out, "summary.json"), dict(
            final=final, device=self.device, quick=self.args.quick, elapsed_s=round(time.time() - self.t0, 1),
            stages={n: {k: v for k, v in r.items() if k not in ("traceback",)} for n, r in self.results.items()},
            targets=[dict(target=t, measured=m, verdict=v) for t, m, v in targets]))


def importable(name):
    """Whether a module is found (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def md_cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")[:300]


def cuda_home():
    """The CUDA toolkit to build with: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or the folder above
    the bin/ of the nvcc on PATH (when that folder has bin/nvcc itself: /usr/local/bin/nvcc may be
    a wrapper script), None if none is found."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and (
                os.path.isdir(os.path.join(home, "lib64")) or os.path.isdir(os.path.join(home, "lib"))):
            return home
    return None


def nvcc_path():
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else (shutil.which("nvcc") or "nvcc")


def installed_extension():
    """Where enact_ops._C would come from, without importing it into this process."""
    if os.environ.get(EXTENSION_ENV):
        return f"${EXTENSION_ENV}={os.environ[EXTENSION_ENV]}"
    import glob
    import sysconfig

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    spec = importlib.util.find_spec("enact_ops") if importable("enact_ops") else None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in glob.glob(os.path.join(folder, "_C*" + suffix)):
            return f"enact_ops._C at {path}"
    return "enact_ops._C not built for this Python: reference backend only"


def unpadded_sdpa_kernel(name, args):
    from projects.enact.benchmark.utils import sdpa_backend

    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    batch, heads, d = (2, 4, 8) if args.quick else (8, 8, 32)
    n = 256 if args.quick else TARGET_N
    q = torch.randn(batch, heads, n, d, device="cuda", dtype=dtype)
    return sdpa_backend(q, q, q, None)


# ---------------------------------------------------------------------------------------------
# child: the op and module checks (no pytest)
# ---------------------------------------------------------------------------------------------
class Skip(Exception):
    """A check that does not apply here (its message says why)."""


class CheckLog:
    def __init__(self, path, device, extension):
        self.path, self.device = path, device
        self.data = dict(device=device, extension=extension, checks=[])
        write_json(self.path, self.data)

    def run(self, name, fn):
        start = time.time()
        try:
            entry = dict(status=OK, **(fn() or {}))
        except Skip as e:
            entry = dict(status=SKIPPED, reason=str(e))
        except Exception as e:  # noqa: BLE001
            entry = dict(status=FAILED, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        entry = dict(name=name, seconds=round(time.time() - start, 2), **entry)
        self.data["checks"].append(entry)
        write_json(self.path, self.data)
        print(f"  {name}: {entry['status']} ({entry['seconds']} s) {entry.get('reason') or entry.get('error') or ''}",
              flush=True)


def _batch(B, N, C, device, dtype=torch.float64, pad_rows=(), all_pad_rows=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    sign = torch.rand(B, N, generator=g) > 0.5
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in pad_rows:
        mask[b] = torch.rand(N, generator=g) < 0.3
    for b in all_pad_rows:
        mask[b] = True
    scores = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, N, C, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, N, C + 3, generator=g, dtype=torch.float64).to(dtype)
    return [t.to(device) for t in (sign, mask, scores, k, v)]


def _max_diff(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def child_checks(args):
    import enact_ops
    from enact_ops import ops as enact_ops_impl

    device = torch.device(args.device)
    ext = getattr(enact_ops_impl._C, "__file__", None) or f"not loaded ({enact_ops_impl._IMPORT_ERROR})"
    log = CheckLog(os.path.join(os.path.abspath(args.out), "checks_detail.json"), str(device), ext)
    compiled = enact_ops.compiled_available(device)
    quick = args.quick

    def need_compiled():
        if not compiled:
            raise Skip(f"enact_ops is not built for {device} ({ext})")

    shapes = [(1, 1, 4), (2, 7, 3), (3, 33, 8), (4, 129, 16), (2, 1000, 5)] + ([] if quick else [(8, 3400, 32), (2, 20000, 4)])

    def segmentation():
        need_compiled()
        cases = 0
        for B, N, C in shapes:
            sign, mask, *_ = _batch(B, N, C, device, pad_rows=range(0, B, 2), all_pad_rows=[B - 1] if B > 2 else [])
            ours = enact_ops.segment_runs(sign, mask, backend="compiled")
            ref = enact_ops.segment_runs(sign, mask, backend="reference")
            for field, x, y in zip(ours._fields, ours, ref):
                if not torch.equal(x.cpu(), y.cpu()):
                    raise AssertionError(f"segment_runs {field} differs from the reference at (B, N) = ({B}, {N})")
            for chunk in (1, 3, 8, 50):
                ours = enact_ops.segment_uniform(mask, chunk, backend="compiled")
                ref = enact_ops.segment_uniform(mask, chunk, backend="reference")
                for field, x, y in zip(ours._fields, ours, ref):
                    if not torch.equal(x.cpu(), y.cpu()):
                        raise AssertionError(f"segment_uniform {field} differs (B, N, L) = ({B}, {N}, {chunk})")
            cases += 5
        return dict(cases=cases, detail="segment_runs and segment_uniform equal the reference field by field")

    def pool(dtype, tol):
        def check():
            need_compiled()
            worst = {}
            for B, N, C in shapes:
                for mode in ("runs", "uniform"):
                    sign, mask, scores, k, v = _batch(B, N, C, device, torch.float64, pad_rows=[0],
                                                      all_pad_rows=[1] if B > 1 else [])
                    seg = enact_ops.segment_runs(sign, mask) if mode == "runs" else enact_ops.segment_uniform(mask, 4)
                    got = {}
                    for backend in ("compiled", "reference"):
                        feats_dtype = dtype if backend == "compiled" else (torch.float64 if dtype == torch.float64 else torch.float32)
                        s = scores.to(torch.float64 if dtype == torch.float64 else torch.float32).clone().requires_grad_()
                        kk, vv = (t.to(feats_dtype).clone().requires_grad_() for t in (k, v))
                        pooled, weights, _ = enact_ops.segment_softmax_pool(s, [kk, vv], seg, backend=backend)
                        grads = [torch.linspace(-1, 1, p.shape[-1], dtype=p.dtype, device=p.device).expand_as(p) for p in pooled]
                        torch.autograd.backward(pooled, grads)
                        got[backend] = dict(pooled_k=pooled[0], pooled_v=pooled[1], weights=weights,
                                            grad_scores=s.grad, grad_k=kk.grad, grad_v=vv.grad)
                    for key, x in got["compiled"].items():
                        y = got["reference"][key]
                        d = _max_diff(x, y)
                        scale = max(1.0, float(y.double().abs().max()) if y.numel() else 1.0)
                        worst[key] = max(worst.get(key, 0.0), d)
                        if d > tol * scale:
                            raise AssertionError(f"{key} differs by {d:.3g} (tolerance {tol * scale:.3g}) at "
                                                 f"(B, N, C) = ({B}, {N}, {C}), mode {mode}")
            return dict(max_abs_diff=worst, tolerance=tol)
        return check

    def information():
        """enact_ops.smoothed_information (steps 1-4, one kernel per direction) against the
        module's readable functions on the same device: float64 to 1e-9 with equal signs and row
        sizes; float32 with at most 2 signs per row differing (at near-zero curvature); gradients."""
        need_compiled()
        from projects.enact.modeling.enact import gaussian_kernel, self_information, smoothed_information

        worst = {}
        sizes = [(2, 7), (3, 129), (4, 1000)] + ([] if quick else [(8, 3400), (2, 20000)])
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
            for B, N in sizes:
                g = torch.Generator().manual_seed(N)
                logits = torch.randn(B, N, generator=g, dtype=dtype).to(device)
                mask = torch.zeros(B, N, dtype=torch.bool)
                mask[0, int(N * 0.8):] = True  # right / bottom padding
                mask[-1, ::7] = True  # scattered pads
                mask = mask.to(device)
                valid = ~mask
                taps = gaussian_kernel(5, 15, dtype, device)
                grad = torch.randn(B, N, generator=g, dtype=dtype).to(device)
                l1, l2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
                got = enact_ops.smoothed_information(l1, taps, mask, backend="compiled")
                ref_smoothed, ref_sign = smoothed_information(self_information(l2, valid), valid, taps)
                (g1,) = torch.autograd.grad(got.smoothed, l1, grad)
                (g2,) = torch.autograd.grad(ref_smoothed, l2, grad)
                for key, x, y in (("smoothed", got.smoothed, ref_smoothed), ("grad_logits", g1, g2)):
                    d = _max_diff(x, y) / max(float(y.abs().max()), 1e-30)
                    worst[f"{key}_{str(dtype)[6:]}_rel"] = max(worst.get(f"{key}_{str(dtype)[6:]}_rel", 0.0), d)
                    if d > tol:
                        raise AssertionError(f"{key} differs by {d:.3g} relative at (B, N) = ({B}, {N}), {dtype}")
                differ = int((got.sign != ref_sign).sum(1).max())
                if differ > (0 if dtype == torch.float64 else 2):
                    raise AssertionError(f"{differ} curvature signs differ in a row at (B, N) = ({B}, {N}), {dtype}")
                if got.lengths.tolist() != valid.sum(1).tolist():
                    raise AssertionError(f"row lengths differ at (B, N) = ({B}, {N})")
                if dtype == torch.float64 and got.runs.tolist() != enact_ops.segmentation.count_runs(ref_sign, valid).tolist():
                    raise AssertionError(f"run counts differ at (B, N) = ({B}, {N})")
        return dict(max_rel_diff=worst, sizes=sizes)

    def backward_sum():
        need_compiled()
        worst = 0.0
        for mode in ("runs", "uniform"):
            for seq_first in (False, True):
                sign, mask, scores, k, _ = _batch(3, 57 if quick else 850, 8, device, pad_rows=[0], all_pad_rows=[2], seed=5)
                v = torch.randn_like(k)
                seg = enact_ops.segment_runs(sign, mask) if mode == "runs" else enact_ops.segment_uniform(mask, 4)
                if seq_first:
                    k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (k, v))
                s, kk, vv = (t.detach().clone().requires_grad_() for t in (scores, k, v))
                pooled, weights, _ = enact_ops.segment_softmax_pool(s, [kk, vv], seg, backend="reference")
                g = [torch.randn_like(p) for p in pooled]
                torch.autograd.backward(pooled, g)
                grad_scores, grad_sum = enact_ops.ops.segment_softmax_pool_backward_sum(g, [k, v], weights.detach(), seg)
                for name, x, y in (("grad_scores", grad_scores, s.grad), ("grad_sum", grad_sum, kk.grad + vv.grad)):
                    d = _max_diff(x, y)
                    worst = max(worst, d)
                    if d > 1e-9:
                        raise AssertionError(f"segment_softmax_pool_backward_sum {name} differs from the reference "
                                             f"by {d:.3g} (mode {mode}, seq_first {seq_first})")
        return dict(max_abs_diff=worst, detail="float64, against the reference's gradients of keys + values")

    def gradcheck():
        need_compiled()
        sign, mask, scores, k, v = _batch(3, 13, 4, device, pad_rows=[1], seed=3)
        seg = enact_ops.segment_runs(sign, mask)
        inputs = tuple(t.clone().requires_grad_() for t in (scores, k, v))
        ok = torch.autograd.gradcheck(
            lambda s, kk, vv: tuple(enact_ops.segment_softmax_pool(s, [kk, vv], seg, backend="compiled")[0]), inputs)
        assert ok
        return dict(detail="float64 gradcheck of segment_softmax_pool (compiled)")

    def bound_errors():
        need_compiled()
        sign, mask, scores, k, _ = _batch(2, 9, 4, device)
        seg = enact_ops.segment_runs(sign, mask)
        op = torch.ops.enact_ops
        args_ = (seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets)
        expect = [
            ("max_clusters too small", lambda: op.segment_softmax_pool_forward(scores, [k], *args_, 1), "max_clusters"),
            ("float16 scores", lambda: op.segment_softmax_pool_forward(scores.half(), [k], *args_, 9), "float32 or float64"),
            ("row_offsets of the wrong length", lambda: op.segment_softmax_pool_forward(
                scores, [k], seg.tokens, seg.seg_starts, seg.seg_batch, seg.row_offsets[:-1], 9), "row_offsets"),
            ("grad_pooled of the wrong width", lambda: op.segment_softmax_pool_backward_sum(
                [torch.zeros(2, seg.max_clusters, 3, dtype=k.dtype, device=device)], [k], scores, *args_), "grad_pooled"),
        ]
        if device.type == "cpu":  # index values: host checks on CPU (device-side assertions on CUDA)
            bad = seg.tokens.clone()
            bad[-1] = 18
            expect.append(("token index out of range", lambda: op.segment_softmax_pool_forward(
                scores, [k], bad, *args_[1:], seg.max_clusters), "is not a token of row"))
            expect.append(("grad_pooled without a slot per cluster", lambda: op.segment_softmax_pool_backward_sum(
                [torch.zeros(2, 1, 4, dtype=k.dtype)], [k], scores, *args_), "cluster slots"))
        raised = []
        for what, fn, pattern in expect:
            try:
                fn()
            except RuntimeError as e:
                if pattern not in str(e):
                    raise AssertionError(f"{what}: the error does not say {pattern!r}: {e}") from e
                raised.append(what)
                continue
            raise AssertionError(f"{what}: no error raised")
        return dict(raised=raised)

    def device_assert():
        if device.type != "cuda":
            raise Skip("device-side assertions exist on CUDA only (CPU: host checks, see bound_errors)")
        need_compiled()
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "assert-probe", "--device", "cuda", "--out", args.out]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        text = proc.stdout + proc.stderr
        if proc.returncode == 0 or "PROBE-NOT-REACHED" in text:
            raise AssertionError(f"an out-of-range token index was not caught (exit {proc.returncode}):\n{tail(text)}")
        if not any(s in text for s in ("device-side assert", "Assertion", "CUDA error")):
            raise AssertionError(f"the child failed, but not by a device-side assertion:\n{tail(text)}")
        return dict(detail="an out-of-range token index stops the kernel with a device-side assertion",
                    child_output=tail(text, 4))

    def module_agreement():
        from projects.enact import EnactAttention

        C, heads = (32, 4) if quick else (256, 8)
        N = 256 if quick else 850
        torch.manual_seed(0)
        m = EnactAttention(C, heads).train()
        x = torch.randn(N, 2, C)
        pos = torch.randn_like(x)
        mask = torch.zeros(2, N, dtype=torch.bool)
        mask[1, int(N * 0.9):] = True
        if device.type == "cuda":
            other, label = ("cpu", "auto"), "CUDA vs CPU"
            this = (str(device), "auto")
        else:
            need_compiled()
            other, label = ("cpu", "reference"), "compiled vs reference (CPU)"
            this = ("cpu", "compiled")
        got = {}
        for dev, backend in (this, other):
            mm = EnactAttention(C, heads, backend=backend).to(dev).train()
            mm.load_state_dict(m.state_dict())
            xi = x.to(dev).clone().requires_grad_()
            out = mm(xi, query_pos=pos.to(dev), key_padding_mask=mask.to(dev))
            out.pow(2).mean().backward()
            with torch.no_grad():
                kv = (x + pos).transpose(0, 1).to(dev), x.transpose(0, 1).to(dev)
                clusters = mm.clustering(kv[0], kv[1], mask.to(dev)).cluster_ids
            got[dev + "/" + backend] = dict(out=out.detach().cpu(), grad_x=xi.grad.cpu(), clusters=clusters.cpu(),
                                            grad_w_prob=mm.clustering.w_prob.weight.grad.cpu())
        a, b = got.values()
        differing = int((a["clusters"] != b["clusters"]).sum())
        result = dict(comparison=label, N=N, C=C, clusters_differing_tokens=differing,
                      clusters_per_image=float((a["clusters"].max(1).values + 1).float().mean()),
                      max_abs_diff={k: _max_diff(a[k], b[k]) for k in ("out", "grad_x", "grad_w_prob")})
        if differing:
            raise AssertionError(f"{label}: {differing} tokens in different clusters")
        for key, tol in (("out", 1e-4), ("grad_x", 1e-4), ("grad_w_prob", 1e-3)):
            scale = max(1.0, float(b[key].abs().max()))
            if result["max_abs_diff"][key] > tol * scale:
                raise AssertionError(f"{label}: {key} differs by {result['max_abs_diff'][key]:.3g}")
        return result

    def fused_path():
        need_compiled()
        from torch.utils._python_dispatch import TorchDispatchMode
        from projects.enact import EnactAttention

        class OpNames(TorchDispatchMode):  # the enact_ops operators dispatch sees, by name
            def __init__(self):
                super().__init__()
                self.names = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if name.startswith("enact_ops."):
                    self.names.append(name.split(".", 1)[1])
                return func(*args, **(kwargs or {}))

        expected = (["smoothed_information", "segment_runs", "pool_shared_key_value"],
                    ["segment_softmax_pool_backward_sum", "smoothed_information_backward"])
        amp_dtype = torch.bfloat16
        for amp in (False, True):
            torch.manual_seed(0)
            m = EnactAttention(16, 4).to(device)
            x = torch.randn(30, 2, 16, device=device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp), OpNames() as fwd:
                out = m(x, query_pos=torch.randn_like(x))
            with OpNames() as bwd:
                out.float().sum().backward()
            if (fwd.names, bwd.names) != expected:
                raise AssertionError(f"a training step{' under bf16 autocast' if amp else ''} ran {fwd.names} "
                                     f"forward and {bwd.names} backward (expected {expected[0]} and {expected[1]})")
        return dict(detail="EnactAttention's training step (float32 and bf16 autocast) runs "
                           "smoothed_information, segment_runs, pool_shared_key_value; backward its two kernels")

    def tf32():
        if device.type != "cuda":
            raise Skip("TF32 exists on CUDA only")
        from projects.enact import EnactClustering

        torch.manual_seed(0)
        m = EnactClustering(256, sigma=5).cuda()
        key = torch.randn(4, 3400, 256, device="cuda")
        value = torch.randn_like(key)
        exact, fast = with_tf32(False, m, key, value), with_tf32(True, m, key, value)
        differing = int((exact.cluster_ids != fast.cluster_ids).sum())
        if differing:
            raise AssertionError(f"TF32 on moves {differing} tokens to other clusters")
        if not torch.equal(exact.weights, fast.weights):
            raise AssertionError(f"TF32 on changes the pooling weights by {_max_diff(exact.weights, fast.weights):.3g}")
        return dict(max_abs_diff_pooled_key=_max_diff(exact.key, fast.key), detail="same clusters and weights")

    log.run("segmentation_vs_reference", segmentation)
    log.run("pool_float64_vs_reference", pool(torch.float64, 1e-9))
    log.run("pool_float32_vs_reference", pool(torch.float32, 1e-5))
    log.run("pool_bfloat16_vs_float32_reference", pool(torch.bfloat16, 3e-2))
    log.run("steps_1_4_vs_readable_path", information)
    log.run("backward_sum_vs_reference", backward_sum)
    log.run("gradcheck_float64", gradcheck)
    log.run("bound_errors", bound_errors)
    log.run("device_assertions", device_assert)
    log.run("enact_attention_agreement", module_agreement)
    log.run("fused_path_taken", fused_path)
    log.run("tf32_same_clusters", tf32)
    failed = [c["name"] for c in log.data["checks"] if c["status"] == FAILED]
    return 1 if failed else 0


def with_tf32(on, fn, *args):
    """fn(*args) with TF32 on or off for CUDA matmuls and cuDNN convolutions (torch's
    fp32_precision settings where this torch has them, else allow_tf32), settings restored."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(conv, "conv", None), "fp32_precision"):
        objs, attr, value = (matmul, conv.conv), "fp32_precision", "tf32" if on else "ieee"
    else:
        objs, attr, value = (matmul, conv), "allow_tf32", on
    saved = [getattr(o, attr) for o in objs]
    try:
        for o in objs:
            setattr(o, attr, value)
        return fn(*args)
    finally:
        for o, v in zip(objs, saved):
            setattr(o, attr, v)


def child_assert_probe(args):
    """Runs an out-of-range token index through the CUDA kernel; a correct build dies of a
    device-side assertion before PROBE-NOT-REACHED is printed."""
    import enact_ops

    sign, mask, scores, k, _ = _batch(2, 9, 4, "cuda", torch.float32)
    seg = enact_ops.segment_runs(sign, mask)
    bad = seg.tokens.clone()
    bad[-1] = 10**6
    torch.ops.enact_ops.segment_softmax_pool_forward(scores, [k], bad, seg.seg_starts, seg.seg_batch,
                                                     seg.row_offsets, seg.max_clusters)
    torch.cuda.synchronize()
    print("PROBE-NOT-REACHED")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/gpu_check", help="results folder (created)")
    p.add_argument("--budget-s", type=float, default=300.0, help="time for all stages but the detector (default 300)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="small benchmark sizes (the CPU fallback)")
    p.add_argument("--skip-build", action="store_true", help="use the extension importable now")
    p.add_argument("--build-dir", default=os.path.join(ROOT, "build", "gpu-check"))
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages")
    p.add_argument("--detector", choices=["auto", "on", "off"], default="auto",
                   help="auto: where a GPU is present and detectron2 imports")
    p.add_argument("--detector-budget-s", type=float, default=540.0)
    p.add_argument("--child", choices=["checks", "assert-probe"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "checks":
        return child_checks(args)
    if args.child == "assert-probe":
        return child_assert_probe(args)
    return GpuCheck(args).run()


if __name__ == "__main__":
    sys.exit(main())
