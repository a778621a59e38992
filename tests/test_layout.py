"""The floor plan holds: the product imports nothing from the benchmark drivers, no module
imports itself through others, and the product runs without the ``[bench]`` extra."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as (setup.py's package_dir)
ROOTS = {
    "engine": "dccsign",
    "native": "dccsign.native",
    "protocol": "dccsign.protocol",
    "bench/drivers": "dccsign.bench",
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in ROOTS.items():
        base = REPO / folder
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _package_of(name: str, path: Path) -> str:
    """The package that relative imports in module *name* (file *path*) start from."""
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` in *package* imports from."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that module *name* imports, at any depth of its code."""
    package = _package_of(name, path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = _from_module(node, package)
            candidates = [f"{base}.{a.name}" for a in node.names]
            # A package's __init__ taking its own submodules (``from . import events``)
            # names itself as the base: that is not an import of itself.
            if base != name or not node.level:
                candidates.append(base)
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known)
    return found


MODULES = _modules()
GRAPH = {name: _imports(name, path, set(MODULES)) for name, path in MODULES.items()}


def test_the_tree_is_read() -> None:
    # Guards the two tests below against passing on an empty or misread tree.
    assert {"dccsign.server.server", "dccsign.keyd.service", "dccsign.bench.loadgen"} <= set(GRAPH)
    assert "dccsign.server.dispatch" in GRAPH["dccsign.server.server"]


def test_the_product_imports_nothing_from_the_benchmark_drivers() -> None:
    product = [n for n in GRAPH if not n.startswith("dccsign.bench")]
    offenders = {n: sorted(m for m in GRAPH[n] if m.startswith("dccsign.bench")) for n in product}
    assert {n: m for n, m in offenders.items() if m} == {}


def test_no_import_circles() -> None:
    # Tarjan's strongly connected components: a component of more than one module (or a
    # module importing itself) is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in GRAPH[v]:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert circles == []


#: Runs with the [bench] extra's libraries made unimportable, as on a machine without it.
WITHOUT_BENCH_EXTRA = textwrap.dedent("""
    import importlib.abc, sys

    class NoBenchExtra(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hdrh", "matplotlib"):
                raise ImportError(f"{name} is not installed (test)")
            return None

    sys.meta_path.insert(0, NoBenchExtra())
    import runpy
    sys.argv = ["dccsign", *sys.argv[1:]]
    runpy.run_module("dccsign", run_name="__main__")
""")


def _without_extra(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_BENCH_EXTRA, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("argv", [("--help",), ("serve", "--help"), ("keyd", "--help")])
def test_the_product_runs_without_the_bench_extra(argv: tuple[str, ...]) -> None:
    done = _without_extra(*argv)
    assert done.returncode == 0, done.stderr
    assert "usage: dccsign" in done.stdout


def test_bench_load_without_the_extra_says_what_to_install() -> None:
    done = _without_extra("bench", "load", "--server", "unix:/nonexistent")
    assert done.returncode == 2, done.stderr
    assert "hdrhistogram" in done.stderr and "dccsign[bench]" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_product_module_imports_without_the_bench_extra() -> None:
    product = sorted(
        n for n in MODULES if not n.startswith("dccsign.bench") and not n.endswith("__main__")
    )
    code = WITHOUT_BENCH_EXTRA.split("import runpy")[0] + textwrap.dedent("""
        import importlib
        for name in sys.argv[1:]:
            importlib.import_module(name)
        print("imported", len(sys.argv) - 1)
    """)
    done = subprocess.run(
        [sys.executable, "-c", code, *product], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["imported", str(len(product))]


def _room(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def test_no_room_reaches_into_another_rooms_private_names() -> None:
    """A room uses another's public names only: no ``_module`` and no ``_name`` across
    rooms (a room being a package under dccsign, or a top-level module of it)."""
    offenders = []
    for name, path in MODULES.items():
        package = _package_of(name, path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
                continue
            base = _from_module(node, package)
            if not base.startswith("dccsign"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                if _room(target) == _room(name):
                    continue
                private_module = any(p.startswith("_") for p in target.split(".")[1:])
                if private_module or alias.name.startswith("_"):
                    offenders.append(f"{name}: from {base} import {alias.name}")
    assert offenders == []
