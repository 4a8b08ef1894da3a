"""Builds flash_quant's one extension, flash_quant._C, with torch's cpp_extension.

CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. MPS sources (csrc/mps/*.mm)
are added on macOS when torch has MPS, or when FORCE_MPS=1. CUDA kernels are Triton
(flash_quant/cuda/) and need no compilation here.
"""
import glob
import os
import subprocess
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_mps():
    if os.environ.get("FORCE_MPS", "0") == "1":
        return True
    if sys.platform != "darwin":
        return False
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_built()


def _extension():
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++17"]
    link_flags = []
    define_macros = []
    if sys.platform == "darwin":
        cxx_flags += ["-Xpreprocessor", "-fopenmp"] if os.environ.get("FQ_OPENMP") else []
    else:
        cxx_flags += ["-fopenmp"]
        link_flags += ["-fopenmp"]
    if _want_mps():
        # Embeds metal/*.metal into csrc/mps/metal_source.h (compiled once at run time).
        subprocess.check_call([sys.executable, os.path.join(ROOT, "csrc", "mps", "embed_metal.py")])
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "mps", "*.mm")))
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "mps", "*.cpp")))
        link_flags += ["-framework", "Metal", "-framework", "Foundation"]
        define_macros.append(("FLASH_QUANT_WITH_MPS", "1"))
        cxx_flags += ["-fobjc-arc"]
    return CppExtension(
        name="flash_quant._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        define_macros=define_macros,
        py_limited_api=False,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
