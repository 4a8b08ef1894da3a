"""Loads flash_quant._C (the op schemas and the CPU / MPS kernels), after checking that it
was built against the torch release that is running.

torch's C++ ABI holds only within one release (major.minor): an extension built against
another torch either fails to load with an undefined symbol or, worse, loads and
misbehaves. setup.py records the torch it compiled against in _build_info.py; a mismatch
is refused here, before anything runs, with the command that fixes it.
"""
from __future__ import annotations

import torch

_REBUILD = ("rebuild it against the installed torch: `pip install --no-build-isolation -e .` in a "
            "checkout (or `pip install --no-build-isolation .`), or `bash scripts/setup.sh`")


def release(version: str) -> str:
    """major.minor of a torch version string ("2.14.1+cu130" -> "2.14")."""
    return ".".join(version.split("+")[0].split(".")[:2])


def check_build_torch(built: str, running: str) -> None:
    if release(built) != release(running):
        raise ImportError(
            f"flash_quant's C++ extension was built against torch {built}, but torch {running} is running; "
            f"torch's C++ ABI differs between releases: {_REBUILD}"
        )


def _load():
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:  # built by a setup.py that did not record it: nothing to compare
        TORCH_VERSION = None
    if TORCH_VERSION is not None:
        check_build_torch(TORCH_VERSION, torch.__version__)
    try:
        from . import _C
    except ImportError as err:
        raise ImportError(f"flash_quant's C++ extension (flash_quant._C) did not load ({err}); "
                          f"if it is missing or stale, {_REBUILD}") from err
    return _C


_C = _load()
