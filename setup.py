"""Builds flash_quant's one extension, flash_quant._C, with torch's cpp_extension.

CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. MPS sources (csrc/mps/*.mm)
are added on macOS when torch has MPS, or when FORCE_MPS=1. CUDA kernels are Triton
(flash_quant/cuda/) and need no compilation here.

The C++ standard is the one the torch we build against asks for (BuildExtension adds it:
C++17 for older torch, C++20 for the torch whose headers need it), so no -std here.
torch's C++ ABI holds only within one release, so the build uses the torch release of the
environment it installs into. Without build isolation that is the torch it imports. With
build isolation (plain `pip install .`) pyproject.toml names no torch: pip first asks this
file for its build requirements (setuptools' get_requires hook, torch not importable yet),
and gets `torch==<the target environment's torch>`, or `torch>=2.6` (the newest, which pip
also installs to run with) when the target has none. The version built against is
recorded in flash_quant/_build_info.py and checked when the extension loads.
"""
import glob
import os
import subprocess
import sys
import sysconfig

from setuptools import setup

try:
    import torch
except ImportError:  # pip's isolated build environment, asked for its requirements
    torch = None

MIN_TORCH = "2.6"
ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "flash_quant", "_build_info.py")


def _release(version: str) -> str:
    """major.minor: the unit of torch's C++ ABI."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _target_env_torch():
    """Version of the torch installed where this build is going (None if none).

    Under pip's build isolation the running interpreter is the target environment's, but
    its site-packages are hidden from sys.path; sysconfig still names them."""
    from importlib import metadata

    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    for dist in metadata.distributions(path=sorted(paths)):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


def _build_torch_requirement() -> str:
    target = _target_env_torch()
    return f"torch=={target.split('+')[0]}" if target else f"torch>={MIN_TORCH}"


def _check_target_torch():
    """Safety net: the build's torch must be the target environment's release."""
    target = _target_env_torch()
    if target is None or _release(target) == _release(torch.__version__):
        return
    sys.exit(
        f"flash_quant: building against torch {torch.__version__} (pip's isolated build environment), but "
        f"the environment being installed into has torch {target}. torch's C++ ABI differs between "
        f"releases, so the extension would not load. Build against the installed torch instead:\n"
        f"    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)\n"
        f"(needs setuptools, wheel and ninja installed: pip install setuptools wheel ninja)"
    )


def _write_build_info():
    text = (
        '"""Written by setup.py: the torch this build of flash_quant._C was compiled against."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
    )
    old = open(BUILD_INFO).read() if os.path.exists(BUILD_INFO) else None
    if old != text:  # unchanged files keep their time stamp
        with open(BUILD_INFO, "w") as f:
            f.write(text)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_mps():
    if os.environ.get("FORCE_MPS", "0") == "1":
        return True
    if sys.platform != "darwin":
        return False
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_built()


def _extension():
    from torch.utils.cpp_extension import CppExtension

    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3"]  # the -std flag comes from torch (module docstring)
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


if torch is None:
    # setuptools' build_meta collects setup_requires as build requirements; pip installs
    # them into the isolated environment and runs this file again, with torch importable.
    setup(setup_requires=[_build_torch_requirement()])
else:
    from torch.utils.cpp_extension import BuildExtension

    _check_target_torch()
    _write_build_info()
    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
