"""Studies stay out of the product (issue 16.7): the package cites no dated result file,
and research/ scripts use only the public API and change no module's state."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Modules of flash_quant a research script may import (the documented API).
PUBLIC_MODULES = ("flash_quant", "flash_quant.testing", "flash_quant.rotation", "flash_quant.config",
                  "flash_quant.nn", "flash_quant.integrations")


def test_package_cites_no_result_file():
    cited = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "flash_quant").rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if "benchmarks/results" in line]
    assert not cited, f"product code cites result files (cite docs/ instead): {cited}"


def _public(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") and m != "flash_quant" for m in PUBLIC_MODULES)


def _problems(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bound = set()  # local names bound to flash_quant modules or objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "flash_quant":
                    if not _public(a.name):
                        yield f"imports {a.name}"
                    bound.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flash_quant":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if not _public(node.module) or a.name.startswith("_"):
                    yield f"imports {full}"
                bound.add(a.asname or a.name)
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            base = t
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(t, ast.Attribute) and isinstance(base, ast.Name) and base.id in bound:
                yield f"assigns {ast.unparse(t)} (line {t.lineno})"


def test_research_scripts_use_the_public_api_only():
    scripts = sorted((ROOT / "research").glob("*.py"))
    assert scripts, "research/ holds the studies that use the public API"
    found = {str(p.relative_to(ROOT)): list(_problems(p)) for p in scripts}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_the_checker_catches_a_global_swap(tmp_path):
    """A study that swaps a product global (as benchmarks/quantize_study.py did with
    cuda.quantize.TUNING) or imports a backend module is refused."""
    bad = tmp_path / "study.py"
    bad.write_text("from flash_quant.cuda import quantize as qz\nqz.TUNING = qz.TUNING._replace(quant_warps=8)\n")
    assert list(_problems(bad)) == ["imports flash_quant.cuda.quantize", "assigns qz.TUNING (line 2)"]
    good = tmp_path / "ok.py"
    good.write_text("import flash_quant\nfrom flash_quant.testing import make_qkv\nout = flash_quant.attention\n")
    assert list(_problems(good)) == []
