"""One source for the numbers of each precision (issue 16, item 2).

flash_quant/config.py's Precision table holds qmin / qmax / bits / storage dtype for Python;
csrc/precision.h holds the same numbers for the C++ CPU kernels, the MPS host code and the
Metal kernels. These tests check that the two agree, that they agree with torch's own
dtypes, that the old tables are derived from them, and that no other product file writes
the limits 127. / 448 / 57344 itself.
"""
from __future__ import annotations

import io
import pathlib
import re
import tokenize

import pytest
import torch

from flash_quant import ops
from flash_quant.config import QUANTIZED_PRECISIONS, Precision
from flash_quant.planning import dynamic, formats

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "precision.h"
QUANTIZED = [Precision(p) for p in QUANTIZED_PRECISIONS]


def header_macros(path: pathlib.Path = HEADER) -> dict:
    """#define NAME value of the header, values parsed as numbers (a trailing f dropped)."""
    out = {}
    for m in re.finditer(r"^#define\s+(FQ_\w+)\s+\(?(-?[\d.]+)f?\)?\s*$", path.read_text(), re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def test_header_matches_the_python_table():
    h = header_macros()
    assert (h["FQ_INT8_QMIN"], h["FQ_INT8_QMAX"]) == (Precision.INT8.qmin, Precision.INT8.qmax)
    assert (h["FQ_INT4_QMIN"], h["FQ_INT4_QMAX"]) == (Precision.INT4.qmin, Precision.INT4.qmax)
    assert h["FQ_FP8_E4M3_MAX"] == Precision.FP8_E4M3.qmax == -Precision.FP8_E4M3.qmin
    assert h["FQ_FP8_E5M2_MAX"] == Precision.FP8_E5M2.qmax == -Precision.FP8_E5M2.qmin
    assert h["FQ_INT4_PER_BYTE"] == Precision.INT4.packed_per_byte
    # every number of the header is checked above
    assert set(h) == {"FQ_INT8_QMIN", "FQ_INT8_QMAX", "FQ_INT4_QMIN", "FQ_INT4_QMAX", "FQ_FP8_E4M3_MAX",
                      "FQ_FP8_E5M2_MAX", "FQ_INT4_PER_BYTE"}


@pytest.mark.parametrize("p", QUANTIZED, ids=lambda p: p.value)
def test_table_matches_torch_dtypes(p):
    dt = p.storage_dtype
    assert p.bits * p.packed_per_byte == torch.empty((), dtype=dt).element_size() * 8
    if p.is_integer:
        assert (p.qmin, p.qmax) == (-(2 ** (p.bits - 1)), 2 ** (p.bits - 1) - 1)
        if p.packed_per_byte == 1:
            assert (p.qmin, p.qmax) == (torch.iinfo(dt).min, torch.iinfo(dt).max)
    else:
        assert (p.qmin, p.qmax) == (-torch.finfo(dt).max, torch.finfo(dt).max)


def test_unquantized_precisions_have_no_code_range():
    assert [p.bits for p in (Precision.FP16, Precision.BF16, Precision.FP32)] == [16, 16, 32]
    for p in (Precision.FP16, Precision.BF16, Precision.FP32):
        with pytest.raises(ValueError, match="not quantized"):
            p.qmax
    assert set(QUANTIZED_PRECISIONS) == {p.value for p in Precision if p.is_quantized}


def test_old_tables_are_read_from_precision():
    assert ops.QMAX == {p.value: p.qmax for p in QUANTIZED}
    assert ops.DATA_DTYPES == {p.value: p.storage_dtype for p in QUANTIZED}
    assert dynamic.QMAX is ops.QMAX and dynamic.PRECISIONS == QUANTIZED_PRECISIONS
    for p in QUANTIZED:
        info = formats.format_info(p.value)
        assert (info.bits, info.max_value) == (p.bits, p.qmax)
    cq = pytest.importorskip("flash_quant.cuda.quantize")
    assert {k: v[1:] for k, v in cq.PRECISIONS.items()} == {p.value: (p.qmin, p.qmax, p.storage_dtype)
                                                            for p in QUANTIZED}


# ------------------------------------------------------------------ nobody else writes them
# A precision limit as a number: 127 as a float (127.0, 127.f, 127.0f; the integer 127 is
# also the fp32 exponent bias), 448 and 57344 in any spelling.
_LIMIT = re.compile(r"(?<![\w.])(?:127\.0*f?|448(?:\.0*)?f?|57344(?:\.0*)?f?)(?![\w.])")
# Where the numbers are written on purpose: the two tables, and one named constant that
# happens to equal 127 (E8M0's exponent bias, not a limit of a flash_quant precision).
_ALLOWED = {
    "flash_quant/config.py": None,
    "csrc/precision.h": None,
    "flash_quant/planning/dynamic.py": {"_E8M0_BIAS = 127.0"},
}


def _python_numbers(text: str):
    """(line, number token) of the code, comments and strings (docstrings) excluded."""
    return [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type == tokenize.NUMBER]


def _c_numbers(text: str):
    """(line, literal) of C++ / Metal code, comments and string literals excluded."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        code = re.sub(r'"(?:\\.|[^"\\])*"', '""', line.split("//")[0])
        out += [(i, m.group(0)) for m in _LIMIT.finditer(code)]
    return out


def limit_literals(root: pathlib.Path):
    """'path:line: text' of each precision limit written outside the allowed places."""
    files = list(root.glob("flash_quant/**/*.py")) + [p for d in ("csrc", "metal") for p in (root / d).rglob("*")
                                                      if p.suffix in (".h", ".cpp", ".cu", ".cuh", ".mm", ".metal")]
    found = []
    for path in sorted(files):
        rel = path.relative_to(root).as_posix()
        if rel == "csrc/mps/metal_source.h" or (rel in _ALLOWED and _ALLOWED[rel] is None):
            continue  # metal_source.h: generated from metal/ at build time
        text = path.read_text()
        lines = text.splitlines()
        hits = _python_numbers(text) if path.suffix == ".py" else _c_numbers(text)
        for line, lit in hits:
            src = lines[line - 1].strip()
            if _LIMIT.fullmatch(lit) and src not in _ALLOWED.get(rel, ()):
                found.append(f"{rel}:{line}: {src}")
    return found


def test_no_other_file_writes_a_precision_limit():
    found = limit_literals(ROOT)
    assert not found, "precision limits written outside flash_quant/config.py and csrc/precision.h:\n" + \
        "\n".join(found)


def test_the_scan_sees_code_but_not_comments(tmp_path):
    (tmp_path / "flash_quant").mkdir()
    (tmp_path / "metal").mkdir()
    (tmp_path / "flash_quant" / "m.py").write_text('"""scale = absmax / 127."""\n# max 448\nx = 448.0\n')
    (tmp_path / "metal" / "k.metal").write_text("// 127.0f\n/* 57344 */ float a = 127.0f; int b = 127;\n")
    assert limit_literals(tmp_path) == ["flash_quant/m.py:3: x = 448.0",
                                        "metal/k.metal:2: /* 57344 */ float a = 127.0f; int b = 127;"]

