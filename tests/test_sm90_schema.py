"""The sm90 op's C++ kernel signature matches its schema (issue 17.3; runs without a GPU).

csrc/cuda/sm90/register_sm90.cpp is compiled only where the extension is built with CUDA,
and a kernel whose C++ signature does not match csrc/schema.cpp's
`_sm90_attention_forward` aborts the process when flash_quant._C loads ("Inferred
operator schema ... doesn't match"): every GPU build would fail to import. Here the
signature is read from register_sm90.cpp, given a stub body, registered for the CPU key
in a child process (the abort must not take pytest with it) after the schema is loaded,
and torch compares the two exactly as the GPU build's registration will.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTER = ROOT / "csrc" / "cuda" / "sm90" / "register_sm90.cpp"
KERNEL = re.compile(r"(std::tuple<at::Tensor,\s*at::Tensor>)\s+sm90_attention_forward\s*\(([^)]*)\)\s*\{", re.S)


def test_register_signature_matches_the_schema(tmp_path):
    pytest.importorskip("ninja")
    assert REGISTER.exists(), f"{REGISTER.relative_to(ROOT)} is missing"
    m = KERNEL.search(REGISTER.read_text())
    assert m, f"no `std::tuple<at::Tensor, at::Tensor> sm90_attention_forward(...)` in {REGISTER.name}"
    stub = tmp_path / "sm90_signature.cpp"
    stub.write_text(
        "#include <torch/library.h>\n#include <optional>\n#include <stdexcept>\n"
        f"{m.group(1)} sm90_signature({m.group(2)}) {{ throw std::runtime_error(\"stub\"); }}\n"
        "TORCH_LIBRARY_IMPL(flash_quant, CPU, m) { m.impl(\"_sm90_attention_forward\", &sm90_signature); }\n")
    script = textwrap.dedent(f"""
        import torch, flash_quant.ops
        from torch.utils.cpp_extension import load
        load(name="fq_sm90_signature", sources=[{str(stub)!r}], build_directory={str(tmp_path)!r},
             is_python_module=False, verbose=False)
        print("registered", torch._C._dispatch_has_kernel_for_dispatch_key(
            "flash_quant::_sm90_attention_forward", "CPU"))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    mismatch = [line for line in run.stderr.splitlines() if "schema" in line.lower()]
    assert run.returncode == 0 and "registered True" in run.stdout, (
        "register_sm90.cpp's signature does not register against csrc/schema.cpp:\n"
        + "\n".join(mismatch[:4] or run.stderr.splitlines()[-8:]))
