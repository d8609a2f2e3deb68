#!/usr/bin/env python
"""The project's import graph, with the imports inside functions, and its cycles.

Reads every ``.py`` file of the given packages (default: ``enact_ops``, ``projects``, ``tools``,
``configs``) as source (``ast``; nothing is imported or run) and draws an edge A -> B for each
``import B`` / ``from B import x`` in module A, at module level or inside a function or class
(``from pkg import sub`` counts as an edge to the module ``pkg.sub`` when it is one).  Imports of
modules outside the project are left out.  Cycles are the strongly connected components with
more than one module, or a module importing itself.

    python tools/import_graph.py                 # summary; exit status 1 if there is a cycle
    python tools/import_graph.py --edges         # also every edge, "A -> B (line, where)"

A package's ``__init__`` that imports its own submodules is not a cycle with them (Python runs
the ``__init__`` first either way), so the implicit import of a parent package is not an edge.
"""
import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

DEFAULT_ROOTS = ("enact_ops", "projects", "tools", "configs")
Edges = Dict[str, List[Tuple[str, int, str]]]  # module -> [(imported module, line, "module" | "function")]


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def find_modules(base: Path, roots) -> Dict[str, Path]:
    """{dotted module name: file} for every .py file under the roots."""
    modules = {}
    for root in roots:
        for path in sorted((base / root).rglob("*.py")):
            modules[module_name(path, base)] = path
    return modules


def compiled_modules(base: Path, roots) -> Set[str]:
    """Dotted names of the compiled extensions under the roots (``enact_ops._C``): not source."""
    names = set()
    for root in roots:
        for path in (base / root).rglob("*"):
            if path.suffix in (".so", ".pyd"):
                parts = path.relative_to(base).parts
                names.add(".".join(parts[:-1] + (path.name.split(".")[0],)))
    return names


def _resolve(name: str, package: str, level: int) -> str:
    """The absolute module name of ``from <level dots><name> import ...`` in ``package``."""
    if level == 0:
        return name
    parts = package.split(".")
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(p for p in parts + ([name] if name else []) if p)


def imports_of(module: str, path: Path, modules: Dict[str, Path], compiled=frozenset()) -> List[Tuple[str, int, str]]:
    """The project modules ``module`` imports, with the line and whether inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else where
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child.module or "", package, child.level)
                names = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" not in compiled]
                targets = sorted({name if name in modules else base for name in names})
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module attribute
                    target = target.rpartition(".")[0]
                if target:
                    found.append((target, child.lineno, where))
            visit(child, inner)

    visit(tree, "module")
    return found


def build_graph(base: Path, roots=DEFAULT_ROOTS) -> Edges:
    modules = find_modules(base, roots)
    compiled = compiled_modules(base, roots)
    return {m: imports_of(m, p, modules, compiled) for m, p in modules.items()}


def cycles(edges: Edges) -> List[List[str]]:
    """Strongly connected components with a cycle (Tarjan's algorithm, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted({t for t, _, _ in edges[start]})))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted({t for t, _, _ in edges.get(child, [])}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                self_loop = any(t == node for t, _, _ in edges.get(node, []))
                if len(component) > 1 or self_loop:
                    found.append(sorted(component))
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="*", default=list(DEFAULT_ROOTS), help="packages / folders to read")
    p.add_argument("--base", default=str(Path(__file__).resolve().parents[1]), help="the repository root")
    p.add_argument("--edges", action="store_true", help="print every edge")
    args = p.parse_args(argv)
    edges = build_graph(Path(args.base), args.roots)
    count = sum(len(v) for v in edges.values())
    inner = sum(1 for v in edges.values() for _, _, where in v if where == "function")
    if args.edges:
        for module in sorted(edges):
            for target, line, where in edges[module]:
                print(f"{module} -> {target} (line {line}, {where})")
    found = cycles(edges)
    print(f"{len(edges)} modules, {count} project imports ({inner} inside functions), {len(found)} cycles")
    for component in found:
        print("cycle: " + " <-> ".join(component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
