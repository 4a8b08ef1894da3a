"""One support rule (issue 16.1): flash_quant/support.py answers "is this attention call
supported, and why not" for flash_quant.attention, the SDPA router and
nn.MultiheadAttention; csrc/support.h holds the same head-dim limits for C++; every
backend agrees with them; and no other file writes the numbers."""
from __future__ import annotations

import io
import logging
import re
import shutil
import sys
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flash_quant
from flash_quant import support
from flash_quant.integrations import reset_sdpa_routing_stats, route_sdpa, sdpa_routing_stats
from flash_quant.nn import MultiheadAttention

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "support.h"
#: The one Python place and the one C++ place that may write the head-dim limits.
OWNERS = {"flash_quant/support.py", "csrc/support.h"}

#: Head dims around both limits, derived from the constants (so the test follows them).
HEAD_DIMS = sorted({support.MIN_HEAD_DIM + off for off in (-8, -4, 0, 4, 8)}
                   | {support.MAX_HEAD_DIM + off for off in (-8, -4, 0, 4, 8)})


# ------------------------------------------------------------- Python and C++ agree
def _header_defines() -> dict:
    text = HEADER.read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*#\s*define\s+(FQ_\w+)\s+(\d+)\s*$", text, re.M)}


def test_header_matches_python_constants():
    assert _header_defines() == {
        "FQ_MIN_HEAD_DIM": support.MIN_HEAD_DIM,
        "FQ_MAX_HEAD_DIM": support.MAX_HEAD_DIM,
        "FQ_HEAD_DIM_MULTIPLE": support.HEAD_DIM_MULTIPLE,
    }


# ------------------------------------------------ the numbers are written in two places
_HEAD = r"(?:\b(?:D|d|Dk|head_dim)\b|\.D\b|HEAD_DIM)"
_LIMIT = rf"(?<![\w.])(?:{support.MIN_HEAD_DIM}|{support.MAX_HEAD_DIM})(?![\w.])"
_LIMIT_NAME = r"\w*(?:(?:MIN|MAX)_HEAD_DIM|HEAD_DIM_(?:MIN|MAX|MULTIPLE))\w*"
#: Ways a head-dim limit gets written down; each line of code (comments and docstrings
#: removed, message strings kept) is checked against all of them.
RULES = {
    "the maximum beside a head dim": re.compile(rf"(?=.*(?<![\w.]){support.MAX_HEAD_DIM}(?![\w.])).*{_HEAD}"),
    "a head dim compared with a limit": re.compile(rf"{_HEAD}\s*(?:<=|>=|<|>)\s*{_LIMIT}|{_LIMIT}\s*(?:<=|>=|<|>)\s*{_HEAD}"),
    "a head dim modulo the multiple": re.compile(rf"{_HEAD}\s*%\s*{support.HEAD_DIM_MULTIPLE}(?![\w.])"),
    "a head-dim limit defined": re.compile(
        rf"{_LIMIT_NAME}(?:\s*,\s*{_LIMIT_NAME})*\s*=\s*\(?\d|#\s*define\s+{_LIMIT_NAME}\s+\(?\d"
    ),
    "the range written out": re.compile(rf"(?<![\w.]){support.MIN_HEAD_DIM}\s*(?:\.\.|,|-|to)\s*{support.MAX_HEAD_DIM}(?![\w.])"),
}


def _python_code(text: str) -> dict:
    """Line number -> the line's code tokens, without comments and docstrings."""
    lines: dict = {}
    depth, statement_start = 0, True
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            statement_start = True
            continue
        if tok.type in (tokenize.NL, tokenize.COMMENT):
            continue
        if tok.type == tokenize.STRING and statement_start and depth == 0:
            continue  # a docstring (or another bare string statement): documentation
        if tok.type == tokenize.OP:
            depth += tok.string in "([{"
            depth -= tok.string in ")]}"
        statement_start = False
        lines.setdefault(tok.start[0], []).append(tok.string)
    return {n: " ".join(words) for n, words in lines.items()}


def _c_code(text: str) -> dict:
    """Line number -> the line without // and /* */ comments (string literals kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        else:
            out.append(c)
            i += 1
    return dict(enumerate("".join(out).splitlines(), 1))


def head_dim_limits_in(path: Path, text: str) -> list:
    code = _python_code(text) if path.suffix == ".py" else _c_code(text)
    return [f"{n}: [{rule}] {line.strip()}" for n, line in sorted(code.items())
            for rule, pattern in RULES.items() if pattern.search(line)]


def _sources():
    yield from (ROOT / "flash_quant").rglob("*.py")
    for folder in ("csrc", "metal"):
        for ext in ("h", "cpp", "mm", "metal"):
            yield from (p for p in (ROOT / folder).rglob(f"*.{ext}") if p.name != "metal_source.h")  # generated


def test_head_dim_limits_written_in_one_python_and_one_cpp_place():
    found = {}
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        hits = head_dim_limits_in(path, path.read_text())
        if rel in OWNERS:
            assert hits, f"{rel} no longer defines the head-dim limits (the checker would miss copies)"
        elif hits:
            found[rel] = hits
    assert not found, f"head-dim limits written outside {sorted(OWNERS)} (import / include them): {found}"


@pytest.mark.parametrize("path, line", [
    ("_checks.py", "MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256"),
    ("forward.py", "    if not (16 <= D <= 256) or D % 8:"),
    ("forward.py", '    raise ValueError(f"head dim {D} must be a multiple of {M} in [16, 256]")'),
    ("multihead_attention.py", "        if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM) or head_dim % 8:"),
    ("attention_common.cpp", "  TORCH_CHECK(d.D >= 16 && d.D <= 256 && d.D % 8 == 0, op, \"head dim\");"),
    ("host_logic.cpp", "  if (s.D < 16 || s.D > FQ_MAX_HEAD_DIM || s.D % 8)"),
    ("fq_params.h", "#define FQ_MAX_HEAD_DIM 256"),
    ("ops.mm", '  fail("head dim must be in 16..256");'),
])
def test_the_checker_catches_copies(path, line):
    """The old copies of the rule (as they were in each file) are found ..."""
    assert head_dim_limits_in(Path(path), line + "\n")


@pytest.mark.parametrize("path, text", [
    ("a.py", '"""Docstring: head dim 16..256, D <= 256."""\nx = 1  # head dim D <= 256\n'),
    ("a.py", "def f(d):\n    '''head dim d < 16'''\n    return max(16, next_pow2(d))\n"),
    ("a.cpp", "// head dim D <= 256\nint x = 1; /* D % 8 and\n 16..256 */\nint dp = (D + 15) / 16 * 16;\n"),
])
def test_the_checker_ignores_comments_and_tile_padding(path, text):
    """... and comments, docstrings and tile paddings to 16 are not."""
    assert not head_dim_limits_in(Path(path), text)


# --------------------------------------------------- every backend applies the same rule
def _qkv(d, s=3, b=1, h=2):
    g = torch.Generator().manual_seed(d)
    return tuple(torch.randn(b, h, s, d, generator=g) for _ in range(3))


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_python_entry_points_agree_on_head_dims(d):
    ok = support.head_dim_supported(d)
    q, k, v = _qkv(d)
    reason = support.why_unsupported(q, k, v)
    assert (reason is None) == ok and (ok or reason.code == "head_dim")
    if ok:
        flash_quant.attention(q, k, v, config="fp32")
    else:
        with pytest.raises(ValueError, match=f"head dim {d} is not supported"):
            flash_quant.attention(q, k, v, config="fp32")
    if ok:
        MultiheadAttention(2 * d, 2)
    else:
        with pytest.raises(ValueError, match="head dim"):
            MultiheadAttention(2 * d, 2)
    reset_sdpa_routing_stats()
    with route_sdpa("fp32"):
        F.scaled_dot_product_attention(q, k, v)
    assert sdpa_routing_stats() == ({"routed": 1, "fallback": {}} if ok else {"routed": 0, "fallback": {"head_dim": 1}})


@pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("flash_quant::attention_forward", "CPU"),
                    reason="no CPU kernel built")
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_cpu_kernel_agrees_on_head_dims(d):
    q, k, v = _qkv(d)
    args = (q, k, v, *(None,) * 10, None, False, None, "none")
    if support.head_dim_supported(d):
        torch.ops.flash_quant.attention_forward(*args)
    else:
        with pytest.raises(RuntimeError, match="head dim"):
            torch.ops.flash_quant.attention_forward(*args)


def test_mps_host_logic_agrees_on_head_dims():
    sys.path.insert(0, str(ROOT / "tools" / "metal_emu"))
    import driver

    if shutil.which(driver.CXX) is None:
        pytest.skip("needs a C++ compiler")
    emu = driver.Emulator()
    names = ["q", "k", "v", "q_data", "q_scale", "q_zero_point", "k_data", "k_scale", "k_zero_point", "k_mean",
             "v_data", "v_scale", "v_zero_point", "attn_mask", "grad_out", "out", "lse"]
    for d in HEAD_DIMS:
        q, k, v = _qkv(d)
        inputs = [dict(q=q, k=k, v=v).get(n) for n in names]
        if support.head_dim_supported(d):
            emu.plan_attention(inputs, False, None, "none")
        else:
            with pytest.raises(driver.PlanError, match="head dim"):
                emu.plan_attention(inputs, False, None, "none")


def test_cuda_backends_agree_on_head_dims():
    pytest.importorskip("triton")
    from flash_quant.cuda import backward, forward

    for d in HEAD_DIMS:
        q, k, v = _qkv(d)
        empty = q[:, :, :0]
        if support.head_dim_supported(d):
            # a supported head dim passes on to the next check (an empty query), never launching
            with pytest.raises(ValueError, match="empty"):
                forward.plan(empty, k, v)
        else:
            with pytest.raises(ValueError, match=f"head dim {d}"):
                forward.plan(empty, k, v)
            lse = torch.zeros(q.shape[:3])
            with pytest.raises(ValueError, match=f"head dim {d}"):
                backward.attention_backward_triton(q, q, k, v, q, lse)


# ------------------------------------- flash_quant.attention and the router: one answer
CALLS = {
    "dropout": lambda q, k, v: ((q, k, v), {"dropout_p": 0.1}),
    "rank": lambda q, k, v: ((q[0], k[0], v[0]), {}),
    "dtype": lambda q, k, v: ((q, k, v.double()), {}),
    "head_dim": lambda q, k, v: ((q, k, v[..., :16]), {}),
    "shape": lambda q, k, v: ((q, k[:, :1], v[:, :1]), {}),
    "scale": lambda q, k, v: ((q, k, v), {"scale": float("inf")}),
    "mask": lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(8, 8, dtype=torch.int32)}),
    # a mask with a larger batch than the scores broadcasts *with* them, not *to* them:
    # flash_quant.attention let it through to the op (which failed after quantizing);
    # the router sent it to torch. Both refuse it now, before any kernel.
    "mask_batch": lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(3, 1, 8, 8, dtype=torch.bool)}),
}


@pytest.mark.parametrize("case", sorted(CALLS))
def test_attention_and_router_refuse_the_same_calls(monkeypatch, case, caplog):
    args, kw = CALLS[case](*_qkv(32, s=8))
    reason = support.why_unsupported(*args, **kw)
    assert reason is not None and reason.code == case.split("_batch")[0]

    reset_sdpa_routing_stats()
    with caplog.at_level(logging.WARNING, logger="flash_quant.integrations.sdpa_routing"), route_sdpa("fp32"):
        try:
            F.scaled_dot_product_attention(*args, **kw)
        except RuntimeError:
            pass  # torch refuses some of these too; routed they would not get there
    assert sdpa_routing_stats() == {"routed": 0, "fallback": {reason.code: 1}}
    assert any(reason.message in r.getMessage() for r in caplog.records)

    def forbidden(*a, **k):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(flash_quant.ops, "attention_forward", forbidden)
    monkeypatch.setattr(flash_quant.ops, "quantize", forbidden)
    with pytest.raises(reason.error, match=re.escape(reason.message)):
        flash_quant.attention(*args, **kw, config="accurate")


def test_router_only_rules():
    """Tensor subclasses and devices without a kernel are refused only where asked (the
    router hands the call to torch instead; flash_quant.attention leaves them to the
    dispatcher, and must accept the tensor subclasses torch.compile traces with)."""
    q, k, v = _qkv(32)

    class Sub(torch.Tensor):
        pass

    sub = q.as_subclass(Sub)
    assert support.why_unsupported(sub, k, v) is None
    assert support.why_unsupported(sub, k, v, plain_tensors_only=True).code == "tensor_type"
    meta = tuple(t.to("meta") for t in (q, k, v))
    assert support.why_unsupported(*meta) is None
    reason = support.why_unsupported(*meta, need_kernel=True)
    assert reason.code == "device" and "meta" in reason.message

