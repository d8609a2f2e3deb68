"""Every shell command written in README.md and docs/*.md still runs as written, as far as that can
be checked without running it: the files it names exist, `python tools/X.py` accepts its flags,
`make` targets exist, `key=value` overrides name keys of their config.  Also: the relative links of
those pages point at files (and headings) that exist.

What cannot be checked here is listed below with the reason (NOT_CHECKED: not looked at beyond the
file names; NOT_RUN: flags, files and overrides checked, the command itself needs what this machine
lacks).  A new command that falls under none of the rules fails the test: write it so that it can
be checked, or add it to these lists with a reason.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
CODE_LANGS = SHELL_LANGS | {"python", "text"}
REPO_DIRS = ("configs/", "tools/", "projects/", "tests/", "docs/", "enact_ops/", "requirements/", ".ci/")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")

# Commands not checked beyond the rules that need no running (matched as a substring of the command).
NOT_CHECKED = {
    "git clone https://github.com/IDEA-Research/detrex": "needs the network (GitHub)",
    "cd $DETREX_ROOT": "a detrex checkout, outside this repository",
    "/path/to/enact/configs/detrex/": "detrex's own tools/train_net.py (in the detrex checkout; it asserts CUDA)",
}
# Commands whose flags, files and overrides are checked but that cannot run here (matched as above).
NOT_RUN = {
    "--num-gpus 8": "needs 8 GPUs (and COCO under $DETECTRON2_DATASETS)",
    "--num-gpus 1 train.fast_dev_run": "needs a GPU (train.device=cuda) and COCO",
    "--device cuda": "needs a GPU",
    "detr-r50-e632da11.pth": "needs DETR's released checkpoint (a download)",
    "train.init_checkpoint=output/detr_r50.pth": "needs COCO and the converted DETR checkpoint",
    "make gpu-check": "meant for a GPU machine (CPU fallback tested in tests/test_gpu_check.py)",
    "FORCE_CUDA=1": "needs nvcc (CI builds the CUDA kernels with make build-cuda-check)",
    "make test-detrex": "needs a detrex checkout or source archive (CI runs it)",
    "DETREX_ROOT=$PWD/build/detrex python tools/train_net.py": "a detrex config: CUDA and COCO by default",
}
# Environment variables a command may export (read by the project, detectron2 or the configs).
KNOWN_ENV = {"DETREX_ROOT", "DETECTRON2_DATASETS", "ENACT_DATASETS", "OMP_NUM_THREADS"}
# Pages linked to that come with other work (not on every branch).
LINKED_ELSEWHERE = {"docs/mixed_precision.md": "owned and written by the mixed-precision work"}


def _blocks(page):
    """(language, text) of every fenced code block of a page."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def _commands(block):
    """A shell block's commands: continuation lines joined, comments dropped, `&&` / `;` split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        cmd = []
        for t in tokens + [";"]:
            if t in ("&&", ";", "||"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(t)
    return out


def all_commands():
    """(page, command as a string, argv list) of every shell command of README.md and docs/."""
    found = []
    for page in PAGES:
        for lang, text in _blocks(page):
            if lang in SHELL_LANGS:
                found += [(page, " ".join(argv), argv) for argv in _commands(text)]
    return found


def _strip_env(argv):
    """argv without leading VAR=value assignments."""
    i = 0
    while i < len(argv) and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[i]):
        i += 1
    return argv[i:]


def _makefile():
    text = open(os.path.join(ROOT, "Makefile")).read()
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))
    variables = dict(re.findall(r"^([A-Z_0-9]+)\s*[:?]?=\s*(.*)$", text, re.M))
    for name in re.findall(r"\$\(([A-Z_0-9]+)\)", text):  # read but not assigned, e.g. DEMO_OPTS
        variables.setdefault(name, "")
    return targets, variables


def _config_files(argv):
    """The LazyConfig files a tool command names (--config-file, or --configs paths)."""
    files = []
    for i, t in enumerate(argv):
        if t == "--config-file" and i + 1 < len(argv):
            files.append(argv[i + 1])
        if t == "--configs":
            for c in argv[i + 1:]:
                if c.startswith("-") or "=" in c:
                    break
                files.append(c if c.endswith(".py") else os.path.join("configs", c + ".py"))
    return files


def _overrides(argv):
    return [t for t in argv if OVERRIDE.match(t)]


def _repo_paths(argv):
    """Tokens (or values of key=value / --flag=value) that name a file or folder of this repository."""
    paths = []
    for t in argv:
        for part in [t] + t.split("=", 1)[1:]:
            if part.startswith(REPO_DIRS) or part in ("tests", "docs", "configs", "tools"):
                paths.append(part)
    return paths


def _matches(table, command):
    return next((reason for key, reason in table.items() if key in command), None)


# ---------------------------------------------------------------------------------------------

COMMANDS = all_commands()


def _checked_commands():
    """(page, command, argv without leading VAR=value) of every command not listed in NOT_CHECKED."""
    for page, cmd, argv in COMMANDS:
        if not _matches(NOT_CHECKED, cmd):
            yield page, cmd, _strip_env(argv)


def test_commands_found():
    assert len(COMMANDS) > 30, COMMANDS
    for page in PAGES:
        for lang, text in _blocks(page):
            assert lang in CODE_LANGS, f"{page}: a code block without a known language ({lang!r}):\n{text}"


def test_every_command_is_known():
    """Every command is one the rules below check, or is listed with a reason."""
    unknown = []
    for page, cmd, argv in _checked_commands():
        if argv[0] == "export":
            names = [a.split("=", 1)[0] for a in argv[1:]]
            if names and set(names) <= KNOWN_ENV:
                continue
        ok = (argv[:1] == ["make"]
              or argv[:2] in (["python", "-m"], ["python3", "-m"])
              or (argv[0] in ("python", "python3") and argv[1:2] and argv[1].startswith("tools/"))
              or argv[:2] == ["pip", "install"])
        if not ok:
            unknown.append(f"{page}: {cmd}")
    assert not unknown, "commands no rule checks (make them checkable or list them):\n" + "\n".join(unknown)


def test_referenced_files_exist():
    missing = []
    for page, cmd, argv in _checked_commands():
        for p in dict.fromkeys(_repo_paths(argv) + _config_files(argv)):
            if not os.path.exists(os.path.join(ROOT, p)):
                missing.append(f"{page}: {p}  ({cmd})")
        if argv[:2] == ["pip", "install"]:
            for i, t in enumerate(argv):
                if t == "-r" and not os.path.exists(os.path.join(ROOT, argv[i + 1])):
                    missing.append(f"{page}: {argv[i + 1]}  ({cmd})")
        if argv[:2] == ["python", "-m"] and argv[2] not in ("pytest", "pip"):
            module = os.path.join(ROOT, *argv[2].split("."))
            if not os.path.exists(os.path.join(module, "__main__.py")) and not os.path.exists(module + ".py"):
                missing.append(f"{page}: module {argv[2]}  ({cmd})")
    assert not missing, "files named by commands that do not exist:\n" + "\n".join(missing)


def test_make_targets_exist():
    targets, variables = _makefile()
    bad = []
    for page, cmd, argv in COMMANDS:
        argv = _strip_env(argv)
        if argv[:1] != ["make"]:
            continue
        for t in argv[1:]:
            if "=" in t:
                name = t.split("=", 1)[0]
                if name not in variables and not name.startswith(("ENACT_", "DETREX_SRC")):
                    bad.append(f"{page}: variable {name} is not read by the Makefile  ({cmd})")
            elif not t.startswith("-") and t not in targets:
                bad.append(f"{page}: no make target {t!r}  ({cmd})")
    assert not bad, "\n".join(bad)
    # .ci/run calls `make test`, and the README says so
    assert "make test\n" in open(os.path.join(ROOT, ".ci", "run")).read()
    assert any(argv == ["make", "test"] for page, _, argv in COMMANDS if page == "README.md")


# The flag check: each tool runs as __main__ in one child process with argparse's parse_args
# replaced by one that parses (a usage error exits 2, as the tool would) and then stops the tool.
_HARNESS = r"""
import argparse, io, json, os, runpy, sys, warnings
warnings.simplefilter("ignore")
class Parsed(BaseException):
    pass
original = argparse.ArgumentParser.parse_args
def parse_and_stop(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed()
argparse.ArgumentParser.parse_args = parse_and_stop
results = []
for tool, argv in json.load(sys.stdin):
    sys.argv = [tool] + argv
    err = io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        runpy.run_path(tool, run_name="__main__")
        result = "the tool returned without parsing its command line"
    except Parsed:
        result = None
    except SystemExit as e:
        result = f"exit {e.code}: {err.getvalue().strip()[-600:]}"
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    finally:
        sys.stderr = stderr
    results.append(result)
print("RESULTS " + json.dumps(results))
"""


def _tool_commands():
    out = []
    for page, cmd, argv in _checked_commands():
        if argv[0] in ("python", "python3") and argv[1:2] and argv[1].startswith("tools/"):
            out.append((page, cmd, argv[1], argv[2:]))
    # make's recipes that call the tools (make demo, benchmark-ops, gpu-check, ...)
    targets, variables = _makefile()
    demo = [variables["DEMO_CONFIG"], variables["DEMO_OUT"]]
    out.append(("Makefile", "make demo (train_net)", "tools/train_net.py",
                ["--config-file", demo[0], f"train.output_dir={demo[1]}"]))
    for tool, extra in (("tools/visualize_enact.py", ["--num-images", "4", "--output", "x"]),
                        ("tools/enact_stats.py", ["--output", "x"])):
        out.append(("Makefile", f"make demo ({tool})", tool,
                    ["--config-file", demo[0], "--checkpoint", "x.pth", "--split", "val"] + extra))
    return out


def test_tool_flags_are_accepted():
    commands = _tool_commands()
    missing = [f"{page}: {tool}" for page, _, tool, _ in commands if not os.path.exists(os.path.join(ROOT, tool))]
    assert not missing, "\n".join(missing)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _HARNESS], cwd=ROOT, env=env, text=True, capture_output=True,
                          input=json.dumps([[tool, args] for _, _, tool, args in commands]), timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    failures = [f"{page}: {cmd}\n    {res}" for (page, cmd, _, _), res in zip(commands, json.loads(line[8:])) if res]
    assert not failures, "tool command lines their parser refuses:\n" + "\n".join(failures)


def _has_key(cfg, key):
    node = cfg
    for part in key.split("."):
        try:
            if part not in node:
                return False
        except TypeError:
            return False
        node = node[part]
    return True


def _detrex_available():
    return bool(os.environ.get("DETREX_ROOT")) and os.path.isdir(os.path.join(os.environ["DETREX_ROOT"], "projects"))


def test_config_overrides_name_existing_keys():
    from detectron2.config import LazyConfig

    targets, variables = _makefile()
    checks = []  # (page, command, config file, override)
    for page, cmd, argv in _checked_commands():
        if argv[:2] == ["make", "demo"]:
            for t in argv[2:]:
                if t.startswith("DEMO_OPTS="):
                    checks += [(page, cmd, variables["DEMO_CONFIG"], o) for o in t.split("=", 1)[1].split()]
            continue
        for cfg in _config_files(argv):
            checks += [(page, cmd, cfg, o) for o in _overrides(argv)]
    assert checks
    loaded, bad, skipped = {}, [], []
    for page, cmd, cfg, override in checks:
        if cfg.startswith("configs/detrex/") and not _detrex_available():
            skipped.append(cfg)  # a detrex config loads only with detrex (DETREX_ROOT); make test-detrex sets it
            continue
        if cfg not in loaded:
            loaded[cfg] = LazyConfig.load(os.path.join(ROOT, cfg))
        key = override.split("=", 1)[0]
        if not _has_key(loaded[cfg], key):
            bad.append(f"{page}: {cfg} has no key {key}  ({cmd})")
    assert not bad, "overrides of keys the config does not have:\n" + "\n".join(bad)


def _anchors(page):
    """GitHub's heading anchors of a page."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors = set()
    for title in re.findall(r"^#+\s+(.*)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_relative_links_resolve():
    bad = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if full in LINKED_ELSEWHERE and not os.path.exists(os.path.join(ROOT, full)):
                continue
            if not os.path.exists(os.path.join(ROOT, full)):
                bad.append(f"{page}: link to missing {target}")
            elif anchor and full.endswith(".md") and anchor not in _anchors(full):
                bad.append(f"{page}: no heading #{anchor} in {full}")
    assert not bad, "\n".join(bad)


def test_readme_is_a_guide():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the details belong in docs/"


def test_exception_lists_match_commands():
    """Every listed exception still matches a command (no stale entries)."""
    commands = [cmd for _, cmd, _ in COMMANDS]
    stale = [key for key in list(NOT_CHECKED) + list(NOT_RUN) if not any(key in c for c in commands)]
    assert not stale, f"exceptions that match no command any more: {stale}"
