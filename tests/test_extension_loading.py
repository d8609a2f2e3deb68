"""No silent fallback: how enact_ops reports an extension that is missing or does not load
(a warning naming the file and the error, `python -m enact_ops`, $ENACT_REQUIRE_COMPILED), and
the torch version check."""
import os
import re
import subprocess
import sys

import pytest

import enact_ops
from enact_ops.torch_version import MIN_TORCH, check_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code_or_args, env_extra, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("ENACT_OPS_EXTENSION", "ENACT_REQUIRE_COMPILED")}
    env.update(env_extra)
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def broken_extension(tmp_path):
    path = tmp_path / "_C.cpython-310-x86_64-linux-gnu.so"
    path.write_bytes(b"not an ELF file")
    return str(path)


def test_unloadable_extension_warns_once_naming_file_and_error(broken_extension):
    code = ("import warnings, torch\n"
            "import enact_ops\n"
            "from enact_ops import segment_runs\n"
            "seg = segment_runs(torch.tensor([[True, False, False]]))\n"  # auto: the reference, warned at import
            "print('clusters', seg.num_clusters.tolist())")
    r = _python(code, {"ENACT_OPS_EXTENSION": broken_extension})
    assert r.returncode == 0, r.stderr
    assert "clusters [2]" in r.stdout
    assert r.stderr.count(f"the compiled extension {broken_extension} failed to load (ImportError") == 1
    assert "pip install --no-build-isolation -e ." in r.stderr


def test_require_compiled_makes_a_missing_kernel_an_error(broken_extension):
    code = ("import torch, enact_ops\n"
            "sign = torch.tensor([[True, False, False]])\n"
            "print('reference', enact_ops.segment_runs(sign, backend='reference').num_clusters.tolist())\n"
            "enact_ops.segment_runs(sign)")
    r = _python(code, {"ENACT_OPS_EXTENSION": broken_extension, "ENACT_REQUIRE_COMPILED": "1"})
    assert r.returncode != 0 and "reference [2]" in r.stdout  # an explicit backend="reference" stays allowed
    assert "RuntimeError: enact_ops: $ENACT_REQUIRE_COMPILED=1 but the extension is not loadable" in r.stderr
    assert broken_extension in r.stderr


def test_extension_env_that_is_not_a_file(tmp_path):
    r = _python(["-m", "enact_ops"], {"ENACT_OPS_EXTENSION": str(tmp_path / "missing.so")})
    assert r.returncode == 1
    assert f"$ENACT_OPS_EXTENSION={tmp_path / 'missing.so'} is not a file" in r.stdout + r.stderr


@pytest.mark.skipif(not enact_ops.compiled_available("cpu"), reason="enact_ops._C is not built")
def test_module_main_reports_the_build():
    r = _python(["-m", "enact_ops"], {})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {k.strip(): v for k, v in (line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)}
    assert lines["loaded"].strip() == "yes" and lines["CPU kernels"].strip() == "yes"
    assert lines["torch"].strip().startswith(enact_ops.extension_status()["torch"])
    assert lines["built for torch"].strip() == enact_ops.extension_status()["torch"]


def test_unloadable_extension_reported_by_module_main(broken_extension):
    r = _python(["-m", "enact_ops"], {"ENACT_OPS_EXTENSION": broken_extension})
    assert r.returncode == 1
    assert "loaded: no (ImportError" in r.stdout and "pure-PyTorch reference" in r.stdout


def test_pytest_under_require_compiled_fails_when_the_extension_does_not_load(broken_extension, tmp_path):
    r = _python(["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "test_box_ops.py")],
                {"ENACT_OPS_EXTENSION": broken_extension, "ENACT_REQUIRE_COMPILED": "1"})
    assert r.returncode != 0
    assert "ENACT_REQUIRE_COMPILED is set but the enact_ops extension did not load" in r.stdout + r.stderr


@pytest.mark.parametrize("version", ["2.4.1", "2.3.0+cu121", "1.13.1"])
def test_torch_version_check_names_the_required_version(version):
    with pytest.raises(ImportError, match=rf"enact needs torch >= {re.escape(MIN_TORCH)} .*found torch {re.escape(version)}:"):
        check_torch(version)


@pytest.mark.parametrize("version", [MIN_TORCH + ".0", "2.14.1+cu130", "3.0.0"])
def test_torch_version_check_accepts_newer(version):
    check_torch(version)
