"""The Hopper forward's machine code, checked without a GPU (issue 17.5, CI).

csrc/cuda/sm90/fwd_sm90.cu (and the fused pre-pass, prepass.cu) is compiled for sm_90a
exactly as docs/hopper.md says it compiles standalone (no torch headers), once per
session, with ptxas's report (-Xptxas
-v); the cubin is disassembled with cuobjdump (from the Triton wheel,
triton/backends/nvidia/bin, or on PATH). Asserted:

* the file defines forward kernels (entry functions whose name matches FORWARD_KERNEL),
  and each runs Q·Kᵀ on INT8 wgmma (SASS ``IGMMA.<shape>.S8.S8``);
* the 16-bit P·V instantiation (the accurate preset) has a 16-bit wgmma (``HGMMA``), and
  an 8-bit P·V instantiation (the fast preset) has only 8-bit wgmma (IGMMA / QGMMA);
* no legacy tensor-core path: no ``HMMA`` / ``IMMA`` / ``QMMA`` (mma.sync) anywhere;
* no local memory: no ``LDL`` / ``STL`` in any kernel, and ptxas reports 0 bytes of
  spill stores and loads for every entry function;
* ptxas did not serialize the wgmma (its C7518 report: a product in flight across a
  branch it deems divergent makes it wait after every wgmma), and in each 16-bit P·V
  kernel a P·V product is in flight across a whole tile's exponentials (the softmax
  overlaps the matrix products instead of waiting for them).

Without nvcc the test skips, except in CI (CI=true): there nvcc 13.0 is installed, so its
absence is a broken CI and fails. A missing kernel file fails everywhere.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "sm90" / "fwd_sm90.cu"
PREPASS_SOURCE = ROOT / "csrc" / "cuda" / "sm90" / "prepass.cu"
#: The pre-pass's kernels (entry names contain these).
PREPASS_KERNELS = ("key_block_means", "key_center", "quantize_rows", "quantize_v_kmajor")
# The standalone compile of docs/hopper.md (setup.py adds only -lineinfo and torch's flags).
NVCC_FLAGS = ["-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-Xptxas", "-v"]
#: Entry functions that are attention forward kernels (mangled names contain the identifier).
FORWARD_KERNEL = re.compile(r"fwd|forward|attn|attention", re.IGNORECASE)

INT8_WGMMA = re.compile(r"\bIGMMA\.\S*\.S8\.S8\b")
WGMMA_16BIT = re.compile(r"\bHGMMA\.")
WGMMA_8BIT = re.compile(r"\b(IGMMA|QGMMA)\.")
WGMMA_ANY = re.compile(r"\b[HIQB]GMMA\.")
LEGACY_MMA = re.compile(r"\b(HMMA|IMMA|QMMA|DMMA|BMMA)\.")
LOCAL_MEMORY = re.compile(r"\b(LDL|STL)(\.|\s)")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(what: str):
    """Fail in CI (its machine has the CUDA toolkit), skip elsewhere, naming the tool."""
    msg = f"{what}: needed to compile and disassemble {SOURCE.relative_to(ROOT)} for sm_90a"
    if _in_ci():
        pytest.fail(f"{msg} (CI=true: the CI machine has nvcc 13.0, so this is a broken setup)")
    pytest.skip(msg)


def _nvcc():
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if found is None and home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            found = os.path.join(home, "bin", "nvcc")
    return found


def _cuobjdump():
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists():
            return str(tool)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def parse_ptxas(report: str) -> dict:
    """{entry function: {"registers", "spill_stores", "spill_loads", "stack"}} from
    ptxas -v's report."""
    entries = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = entries.setdefault(m.group(1), {})
            continue
        m = re.search(r"wgmma.mma_async instructions are serialized.*function '([^']+)'", line)
        if m:  # (ptxas reports this before or after the function's own lines)
            entries.setdefault(m.group(1), {})["wgmma_serialized"] = line.strip()
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and "stack" not in current:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and "registers" not in current:
            current["registers"] = int(m.group(1))
    return entries


def parse_sass(listing: str) -> dict:
    """{function: [instruction lines]} from cuobjdump -sass."""
    functions = {}
    current = None
    for line in listing.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
        elif current is not None and re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            current.append(line.split("*/", 1)[1].split("/*", 1)[0].strip())
    return functions


def _compile(source: Path, tmp_dir: Path):
    """(ptxas report by entry, SASS by function) of one .cu file compiled for sm_90a."""
    nvcc = _nvcc()
    if nvcc is None:
        _missing("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    dump = _cuobjdump()
    if dump is None:
        _missing("cuobjdump not found (triton/backends/nvidia/bin of the Triton wheel, or PATH)")
    assert source.exists(), f"{source.relative_to(ROOT)} is missing"
    cubin = tmp_dir / (source.stem + ".cubin")
    run = subprocess.run([nvcc, *NVCC_FLAGS, "-o", str(cubin), str(source)], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, f"nvcc failed on {source.name}:\n{run.stdout}\n{run.stderr}"
    listing = subprocess.run([dump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ptxas = parse_ptxas(run.stdout + run.stderr)
    sass = parse_sass(listing)
    print("ptxas:", {name[:80]: info for name, info in ptxas.items()})
    return ptxas, sass


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """(ptxas report by entry, SASS by function) of fwd_sm90.cu: one nvcc run a session."""
    return _compile(SOURCE, tmp_path_factory.mktemp("sm90"))


@pytest.fixture(scope="session")
def prepass(tmp_path_factory):
    """The same for prepass.cu, the accurate preset's fused quantize pre-pass."""
    return _compile(PREPASS_SOURCE, tmp_path_factory.mktemp("sm90_prepass"))


def _forward_kernels(sass: dict) -> dict:
    kernels = {name: code for name, code in sass.items() if FORWARD_KERNEL.search(name)}
    assert kernels, f"no forward kernel (entry function matching {FORWARD_KERNEL.pattern!r}) in {list(sass)}"
    return kernels


def test_every_forward_kernel_uses_int8_wgmma(compiled):
    _, sass = compiled
    for name, code in _forward_kernels(sass).items():
        assert any(INT8_WGMMA.search(i) for i in code), f"{name}: no INT8 wgmma (IGMMA ... S8.S8) for Q·Kᵀ"


def test_both_pv_precisions_are_on_wgmma(compiled):
    """The presets' two P·V paths are instantiated: a kernel with 16-bit wgmma (accurate)
    and one whose every wgmma is 8-bit (fast)."""
    _, sass = compiled
    kernels = _forward_kernels(sass)
    sixteen = [n for n, c in kernels.items() if any(WGMMA_16BIT.search(i) for i in c)]
    eight = [n for n, c in kernels.items()
             if all(WGMMA_8BIT.search(i) for i in c if WGMMA_ANY.search(i)) and any(WGMMA_ANY.search(i) for i in c)]
    assert sixteen, f"no forward kernel with a 16-bit P·V wgmma (HGMMA) among {list(kernels)}"
    assert eight, f"no forward kernel with an 8-bit P·V (only IGMMA / QGMMA) among {list(kernels)}"


@pytest.mark.parametrize("d", [64, 128])
def test_each_head_dim_is_instantiated(compiled, d):
    """Tile head dims 64 and 128 (fwd_params.h kForwardHeadDims; smaller head dims run in
    them): P·V's wgmma has N = D output channels, 16-bit (HGMMA.64xDx16) and 8-bit
    (IGMMA.64xDx32)."""
    _, sass = compiled
    code = [i for c in _forward_kernels(sass).values() for i in c]
    assert any(re.search(rf"\bHGMMA\.64x{d}x16\.", i) for i in code), f"no 16-bit P·V wgmma for head dim {d}"
    assert any(re.search(rf"\bIGMMA\.64x{d}x32\.", i) for i in code), f"no 8-bit wgmma of N = {d}"


def test_no_legacy_mma(compiled):
    _, sass = compiled
    for name, code in sass.items():
        legacy = [i for i in code if LEGACY_MMA.search(i)]
        assert not legacy, f"{name}: mma.sync instructions (no wgmma path?): {legacy[:4]}"


def test_no_local_memory(compiled):
    _, sass = compiled
    for name, code in sass.items():
        local = [i for i in code if LOCAL_MEMORY.search(i)]
        assert not local, f"{name}: local-memory traffic: {local[:4]}"


def test_ptxas_reports_no_spills(compiled):
    ptxas, sass = compiled
    assert set(ptxas) >= set(_forward_kernels(sass)), f"ptxas report lacks kernels: {list(ptxas)}"
    for name, info in ptxas.items():
        assert "registers" in info and "spill_stores" in info, f"{name}: unparsed ptxas report {info}"
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{name} spills: {info}"


def test_wgmma_not_serialized(compiled):
    ptxas, _ = compiled
    for name, info in ptxas.items():
        assert "wgmma_serialized" not in info, f"{name}: {info['wgmma_serialized']}"


def test_prepass_kernels_exist_and_keep_to_registers(prepass):
    """The fused pre-pass (csrc/cuda/sm90/prepass.cu): its kernels (the fast preset's V codes
    too) are there, with no local memory (the codes kernel keeps a row's 32 values a lane
    in registers) and no spills."""
    ptxas, sass = prepass
    for kernel in PREPASS_KERNELS:
        assert any(kernel in name for name in sass), f"no {kernel} kernel in {list(sass)}"
    for name, code in sass.items():
        local = [i for i in code if LOCAL_MEMORY.search(i)]
        assert not local, f"{name}: local-memory traffic: {local[:4]}"
    for name, info in ptxas.items():
        assert info.get("spill_stores") == 0 and info.get("spill_loads") == 0, f"{name} spills: {info}"
