"""Builds flash_quant's one extension, flash_quant._C, with torch's cpp_extension.

CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. MPS sources (csrc/mps/*.mm)
are added on macOS when torch has MPS, or when FORCE_MPS=1. Most CUDA kernels are Triton
(flash_quant/cuda/) and need no compilation here; the Hopper forward (issue 17) is CUDA
C++: csrc/cuda/sm90/*.cu and register_sm90.cpp are compiled for sm_90a only (the wgmma
and TMA instructions exist on no other architecture) when the torch we build against has
CUDA (torch.version.cuda) and nvcc is found (torch's CUDA_HOME). Otherwise the extension
is built without them, setup.py says so in one line, and flash_quant.cuda.dispatch serves
every CUDA call with Triton. FLASH_QUANT_SM90=0 leaves them out on purpose. Whether they
were compiled is recorded as SM90_KERNELS in flash_quant/_build_info.py. Compile jobs run
in parallel through ninja: MAX_JOBS=N caps them (torch's cpp_extension reads it).

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


def _write_build_info(sm90: bool, why_not):
    text = (
        '"""Written by setup.py: the torch this build of flash_quant._C was compiled against,\n'
        'and whether the Hopper (sm_90a) CUDA C++ kernels were compiled into it (else why not)."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"SM90_KERNELS = {sm90!r}\n"
        f"SM90_NOT_BUILT_BECAUSE = {why_not!r}\n"
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


SM90_DIR = os.path.join(ROOT, "csrc", "cuda", "sm90")
# nvcc flags of the sm90 sources. One architecture: sm_90a's wgmma / setmaxnreg / TMA
# multicast exist only there (the "a" target is not forward compatible), and an explicit
# -gencode keeps torch from adding TORCH_CUDA_ARCH_LIST's. -std=c++17: fwd_sm90.cu includes
# no torch header and must compile the same way standalone (tests/test_sm90_sass.py). No
# --use_fast_math: exp2 and the divisions stay IEEE unless a measurement says otherwise.
# torch adds -D__CUDA_NO_HALF*_OPERATORS__ / _CONVERSIONS__ to every nvcc line; the
# -U undoes them so the extension compiles the kernel exactly as the standalone command.
SM90_NVCC_FLAGS = [
    "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-lineinfo",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
]


def _sm90_sources():
    """(sources, why not): the sm90 sources when they are to be compiled, else ([], reason)."""
    if os.environ.get("FLASH_QUANT_SM90", "1") == "0":
        return [], "FLASH_QUANT_SM90=0"
    if not torch.version.cuda:
        return [], f"torch {torch.__version__} has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        return [], "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    cu = glob.glob(os.path.join(SM90_DIR, "*.cu"))
    register = os.path.join(SM90_DIR, "register_sm90.cpp")
    if not cu or not os.path.exists(register):
        return [], f"no kernel sources in {os.path.relpath(SM90_DIR, ROOT)}"
    return _rel(cu + [register]), None


def _extension(sm90_sources):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

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
    compile_args = {"cxx": cxx_flags}
    make = CppExtension
    if sm90_sources:
        sources += sm90_sources
        compile_args["nvcc"] = SM90_NVCC_FLAGS
        define_macros.append(("FLASH_QUANT_WITH_SM90", "1"))
        make = CUDAExtension
    return make(
        name="flash_quant._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=compile_args,
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
    _sm90, _why_not = _sm90_sources()
    print("flash_quant: Hopper sm_90a CUDA kernels: " + (
        f"compiled ({len(_sm90)} sources)" if _sm90 else f"not built ({_why_not}); CUDA calls use Triton"))
    _write_build_info(bool(_sm90), _why_not)
    setup(
        ext_modules=[_extension(_sm90)],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
