"""Where planning data is read and written: the shipped files and the user's own.

The package's planning/data/ is read-only (an installed package may not be writable, and a
checkout's copies are tracked files). `flash-quant calibrate` and `measure-errors` write to
the user data directory; lookups read the user's file first, then the shipped one, so a
calibration made on this machine takes precedence over the one that ships.

User data directory: $FLASH_QUANT_DATA_DIR if set, else $XDG_DATA_HOME/flash_quant, else
~/.local/share/flash_quant (%LOCALAPPDATA%\\flash_quant on Windows). Torch-free.
"""
from __future__ import annotations

import os
from typing import Optional

from .hardware import DATA_DIR

__all__ = ["SHIPPED_DIR", "user_data_dir", "find_data_file", "user_data_path"]

#: The data that ships with the package (read only).
SHIPPED_DIR = DATA_DIR
_APP = "flash_quant"
_ENV_OVERRIDE = "FLASH_QUANT_DATA_DIR"


def user_data_dir() -> str:
    """The directory calibrate / measure-errors write to (not created here)."""
    explicit = os.environ.get(_ENV_OVERRIDE)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return os.path.join(os.environ["LOCALAPPDATA"], _APP)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, _APP)


def user_data_path(name: str) -> str:
    """Where the user's copy of data file `name` is written (its directory is created)."""
    directory = user_data_dir()
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, name)


def find_data_file(name: str) -> Optional[str]:
    """The user's `name` if present, else the shipped one, else None."""
    for directory in (user_data_dir(), SHIPPED_DIR):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None
