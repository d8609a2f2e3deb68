"""tools/import_graph.py: the project has no import cycle, imports inside functions included."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "import_graph.py"


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=ROOT)


def test_project_has_no_import_cycle():
    result = run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 cycles" in result.stdout


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a  # inside a function\n    return a\n")
    (pkg / "c.py").write_text("import pkg.b\n")
    result = run("--base", str(tmp_path), "--edges", "pkg")
    assert result.returncode == 1
    assert "pkg.b -> pkg.a (line 2, function)" in result.stdout
    assert "cycle: pkg.a <-> pkg.b" in result.stdout
    assert "pkg.c" not in result.stdout.split("cycle:")[-1]  # c imports b, but is not on the cycle
