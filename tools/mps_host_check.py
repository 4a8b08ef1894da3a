"""Type-check csrc/mps/ops.mm (Objective-C++) on Linux.

clang in Objective-C++ mode with ARC and blocks, against the real torch headers
(ATen/mps/MPSStream.h ships in every torch wheel) and our stand-in declarations of the
Foundation / Metal / MPS API (tools/apple_standin). `-fsyntax-only`: nothing is linked or
run. A misspelled selector or property, a wrong argument type or a torch MPS call that
does not exist fails.

Also used for the Metal kernels' address-space compile (tools/metal_emu/driver.py picks a
clang through `find_clang`).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STANDIN = os.path.join(HERE, "apple_standin")
CSRC = os.path.join(ROOT, "csrc")
OPS_MM = os.path.join(CSRC, "mps", "ops.mm")

# Newest first; Debian bookworm ships 14 (as `clang++`), 15, 16 and 19.
CLANG_CANDIDATES = [f"clang++-{v}" for v in (19, 18, 17, 16, 15, 14)] + ["clang++"]

OBJCXX_FLAGS = ["-x", "objective-c++", "-std=c++17", "-fsyntax-only", "-fobjc-arc", "-fblocks",
                "-fobjc-runtime=macosx-14.0", "-Wall", "-Wextra", "-Werror"]


def clang_version(exe: str) -> Optional[int]:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    m = re.search(r"clang version (\d+)", out)
    return int(m.group(1)) if m else None


def find_clang(min_version: int = 14) -> Optional[str]:
    """Path of the newest clang++ of at least `min_version`, or None ($FQ_CLANG overrides)."""
    forced = os.environ.get("FQ_CLANG")
    candidates = [forced] if forced else CLANG_CANDIDATES
    for name in candidates:
        exe = shutil.which(name)
        if exe and (clang_version(exe) or 0) >= min_version:
            return exe
    return None


def torch_include_dirs() -> list:
    import torch.utils.cpp_extension as ce

    return ce.include_paths() + [sysconfig.get_paths()["include"]]


def generated_dir() -> str:
    """A directory holding mps/metal_source.h (ops.mm includes the build-time embedding)."""
    sys.path.insert(0, os.path.join(CSRC, "mps"))
    import embed_metal

    d = tempfile.mkdtemp(prefix="fq_mps_gen_")
    os.makedirs(os.path.join(d, "mps"))
    with open(os.path.join(d, "mps", "metal_source.h"), "w") as f:
        f.write(embed_metal.header(embed_metal.combined_source(), b""))
    return d


# The headers ops.mm includes that dominate the parse (~15 s of CPU for torch alone):
# precompiled once when several files are checked (the planted-error tests).
PCH_HEADERS = ["ATen/ATen.h", "ATen/mps/MPSStream.h", "torch/library.h", "Foundation/Foundation.h",
               "Metal/Metal.h"]


def _flags(clang: str, gen: str) -> list:
    cmd = [clang] + OBJCXX_FLAGS + ["-isystem", STANDIN, "-I", CSRC, "-I", gen]
    for d in torch_include_dirs():
        cmd += ["-isystem", d]  # torch's own warnings are not ours to fix
    return cmd


def build_pch(clang: str, gen: str) -> str:
    """Precompile PCH_HEADERS with the check's flags into `gen`; returns the .pch path."""
    hdr = os.path.join(gen, "fq_host_pch.h")
    with open(hdr, "w") as f:
        f.writelines(f"#include <{h}>\n" for h in PCH_HEADERS)
    pch = hdr + ".pch"
    cmd = [a for a in _flags(clang, gen) if a not in ("-fsyntax-only", "objective-c++")]
    cmd[cmd.index("-x") + 1:cmd.index("-x") + 1] = ["objective-c++-header"]
    r = subprocess.run(cmd + [hdr, "-o", pch], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"precompiling the torch / stand-in headers failed:\n{r.stderr[-4000:]}")
    return pch


def check_ops_mm(path: str = OPS_MM, clang: Optional[str] = None, gen_dir: Optional[str] = None,
                 pch: Optional[str] = None, extra: Sequence[str] = ()) -> Tuple[bool, str]:
    """Type-check one Objective-C++ file as ops.mm is built; returns (ok, compiler output)."""
    clang = clang or find_clang()
    if clang is None:
        raise RuntimeError("no clang++ found (apt-get install clang)")
    gen = gen_dir or generated_dir()
    cmd = _flags(clang, gen) + (["-include-pch", pch] if pch else []) + list(extra) + [path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode == 0, r.stdout + r.stderr


if __name__ == "__main__":
    ok, out = check_ops_mm()
    print(out or ("ok" if ok else "failed"))
    sys.exit(0 if ok else 1)
