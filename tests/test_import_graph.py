"""The package's import graph has no circle (issue 16.4).

The graph is read from the source with ast, not by importing: every import statement
counts, including the ones inside functions (a deferred import still ties the modules
together, and is how ops -> cuda -> cuda.quantize -> ops hid). Only modules of the
package are nodes; `from pkg import name` points at pkg.name when that is a module,
else at pkg.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "flash_quant"
ROOT = Path(__file__).resolve().parents[1]


#: Compiled modules of the package (setup.py's extension): leaves, importing nothing of it.
EXTENSION_MODULES = {PACKAGE + "._C"}


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict:
    """Dotted module name -> (source path, is a package __init__)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def _imported(module: str, path: Path, is_package: bool, modules: dict) -> set:
    here = module.split(".") if is_package else module.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # (the compiled extension is a leaf module of its own, not the package)
                targets.add(submodule if submodule in modules or submodule in EXTENSION_MODULES else source)
    return {t for t in targets if t in modules and t != module}


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict:
    modules = package_modules(root, package)
    return {m: _imported(m, p, is_pkg, modules) for m, (p, is_pkg) in modules.items()}


def find_circle(graph: dict):
    """One circle as a list of modules [a, b, ..., a], or None."""
    state = {}  # module -> 1 while on the current path, 2 when done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_package_import_graph_has_no_circle():
    graph = import_graph()
    assert "flash_quant.ops" in graph and "flash_quant.cuda.quantize" in graph
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_checker_sees_a_deferred_circle(tmp_path):
    """The checker finds a circle closed by an import inside a function (so the test
    above can fail), and sees none in a chain."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    circle = find_circle(import_graph(tmp_path, "pkg"))
    assert circle is not None and circle[0] == circle[-1] and "pkg.a" in circle

    (pkg / "sub" / "b.py").write_text("import math\n")
    assert find_circle(import_graph(tmp_path, "pkg")) is None


@pytest.mark.parametrize("module", ["flash_quant.layout"])
def test_layout_rule_imports_nothing_of_the_package(module):
    """The K-major rule is a leaf both ops.py and cuda/quantize.py import."""
    assert import_graph()[module] == set()


def test_attention_auto_does_not_import_planning():
    """config="auto" is decided by the core (flash_quant.auto, flash_quant.outliers):
    planning (dynamic quantization, cost model, ...) stays off the attention path. Run in
    a fresh interpreter, as this test session may have imported planning already."""
    import subprocess
    import sys

    code = (
        "import sys, torch, flash_quant\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, 300, 64, generator=g) for _ in range(3))\n"
        "out = flash_quant.attention(q, k, v, config='auto')\n"
        "assert out.shape == q.shape and bool(torch.isfinite(out).all())\n"
        "print(sorted(m for m in sys.modules if m.startswith('flash_quant.planning')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", "attention(config='auto') imported " + run.stdout
