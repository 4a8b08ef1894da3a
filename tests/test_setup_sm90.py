"""setup.py's choice of the Hopper sources (issue 17.4), without compiling anything.

setup.py is run with setuptools.setup replaced by a recorder and the build-info file
redirected to a temporary one; torch.version.cuda, CUDA_HOME and the sources present are
set per case. With CUDA and nvcc: a CUDAExtension with csrc/cuda/sm90/*.cu and
register_sm90.cpp, compiled for sm_90a only (-gencode=arch=compute_90a,code=sm_90a, which
also keeps torch from adding TORCH_CUDA_ARCH_LIST's), -O3 -std=c++17 -lineinfo, no
--use_fast_math. Otherwise: a CppExtension without them, one line saying why, and
SM90_KERNELS = False with the reason in _build_info.py.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import setuptools
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_setup(monkeypatch, tmp_path, capsys):
    """Runs setup.py in a copy of the checkout's layout whose csrc/cuda/sm90 holds the
    given files; returns (the recorded setup() keywords, printed text, build info)."""

    def run(cuda_version, cuda_home, sm90_files=("fwd_sm90.cu", "register_sm90.cpp"), env=None):
        root = tmp_path / "checkout"
        (root / "flash_quant").mkdir(parents=True)
        for sub in ("csrc", "csrc/cpu"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            for f in (ROOT / sub).glob("*.cpp"):
                (root / sub / f.name).write_text("")
        sm90 = root / "csrc" / "cuda" / "sm90"
        sm90.mkdir(parents=True)
        for name in sm90_files:
            (sm90 / name).write_text("")
        (root / "setup.py").write_text((ROOT / "setup.py").read_text())
        recorded = {}
        monkeypatch.setattr(setuptools, "setup", lambda **kw: recorded.update(kw))
        monkeypatch.setattr(torch.version, "cuda", cuda_version)
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
        monkeypatch.delenv("FLASH_QUANT_SM90", raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "argv", ["setup.py", "build_ext"])
        runpy.run_path(str(root / "setup.py"), run_name="__main__")
        info = {}
        exec((root / "flash_quant" / "_build_info.py").read_text(), info)
        return recorded, capsys.readouterr().out, info

    return run


@pytest.fixture
def fake_nvcc(tmp_path):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    return str(home)


def _ext(recorded):
    (ext,) = recorded["ext_modules"]
    return ext


def test_cuda_torch_and_nvcc_compile_the_sm90_sources(run_setup, fake_nvcc):
    recorded, out, info = run_setup("13.0", fake_nvcc)
    ext = _ext(recorded)
    assert "csrc/cuda/sm90/fwd_sm90.cu" in ext.sources and "csrc/cuda/sm90/register_sm90.cpp" in ext.sources
    nvcc = ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in nvcc and sum("arch" in f for f in nvcc) == 1
    assert {"-O3", "-std=c++17", "-lineinfo"} <= set(nvcc) and "--use_fast_math" not in nvcc
    assert ("FLASH_QUANT_WITH_SM90", "1") in ext.define_macros
    assert any("cudart" in lib for lib in ext.libraries)  # a CUDAExtension links the CUDA runtime
    assert "compiled (2 sources)" in out
    assert info["SM90_KERNELS"] is True and info["SM90_NOT_BUILT_BECAUSE"] is None


@pytest.mark.parametrize("case, expect", [
    ("cpu_torch", "has no CUDA"),
    ("no_nvcc", "nvcc not found"),
    ("no_sources", "no kernel sources"),
    ("opted_out", "FLASH_QUANT_SM90=0"),
])
def test_otherwise_the_extension_builds_without_them_and_says_why(run_setup, fake_nvcc, tmp_path, case, expect):
    args = dict(cuda_version="13.0", cuda_home=fake_nvcc)
    if case == "cpu_torch":
        args["cuda_version"] = None
    elif case == "no_nvcc":
        args["cuda_home"] = str(tmp_path / "nowhere")
    elif case == "no_sources":
        args["sm90_files"] = ()
    else:
        args["env"] = {"FLASH_QUANT_SM90": "0"}
    recorded, out, info = run_setup(**args)
    ext = _ext(recorded)
    assert not any("sm90" in s for s in ext.sources) and "nvcc" not in ext.extra_compile_args
    lines = [line for line in out.splitlines() if "sm_90a" in line]
    assert len(lines) == 1 and "not built" in lines[0] and expect in lines[0], out
    assert info["SM90_KERNELS"] is False and expect in info["SM90_NOT_BUILT_BECAUSE"]
