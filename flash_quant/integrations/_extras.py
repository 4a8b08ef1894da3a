"""Lazy imports of optional dependencies (the extras declared in pyproject.toml).

Nothing here imports diffusers or transformers at module import time: each integration
calls `require(...)` when it is used, and a missing package raises an ImportError that
names the extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]

#: top-level package -> the flash-quant extra that installs it
_EXTRA_OF = {
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "diffusers",
    "safetensors": "transformers",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


def require(module: str, extra: str | None = None, feature: str | None = None) -> ModuleType:
    """Import `module` (e.g. "diffusers" or "transformers.masking_utils") or raise a
    MissingExtraError naming the extra (pyproject.toml), installed from the checkout with
    `pip install '.[<extra>]'` (flash_quant is not on a package index)."""
    top = module.split(".")[0]
    extra = extra or _EXTRA_OF.get(top, top)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f"{feature} needs" if feature else "this flash_quant integration needs"
        raise MissingExtraError(
            f"{what} the optional package {top!r}, which is not installed or failed to import "
            f"({exc}). Install it from the flash_quant checkout with: pip install '.[{extra}]'"
        ) from exc
