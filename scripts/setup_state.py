"""What scripts/setup.sh still has to do, so that a second run does nothing (seconds).

  python scripts/setup_state.py missing EXTRA[,EXTRA...]
      prints, one per line, the requirements of pyproject.toml ([project] dependencies,
      [build-system] requires and the named extras) that this environment does not meet
  python scripts/setup_state.py extension
      exit 0 when flash_quant/_C*.so is up to date: newer than every source under csrc/
      and metal/ and than setup.py, and built against the running torch release; else
      prints why and exits 1
  python scripts/setup_state.py installed
      exit 0 when the flash-quant distribution is installed from this checkout (editable)

Uses only the standard library plus pip's vendored TOML and packaging (present wherever
pip is), so it runs before anything is installed.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from importlib import metadata

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = "flash-quant"
SOURCE_DIRS = ("csrc", "metal")
GENERATED = {os.path.join("csrc", "mps", "metal_source.h")}  # written by the build itself


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def requirements(extras) -> list:
    """Requirement strings of the project, its build and `extras`, self-references expanded."""
    data = _pyproject()
    optional = data["project"].get("optional-dependencies", {})
    out = list(data["project"].get("dependencies", [])) + list(data["build-system"]["requires"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"setup_state: no extra {extra!r} in pyproject.toml (have: {', '.join(optional)})")
        seen.add(extra)
        for line in optional[extra]:
            req = Requirement(line)
            if req.name.lower().replace("_", "-") == PROJECT:
                todo.extend(req.extras)
            else:
                out.append(line)
    return list(dict.fromkeys(out))  # an extra may repeat another's requirement


def _met(line: str) -> bool:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        return True  # not for this platform
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def _newest_source() -> tuple:
    paths = [os.path.join(ROOT, "setup.py")]
    for d in SOURCE_DIRS:
        paths += [p for p in glob.glob(os.path.join(ROOT, d, "**", "*"), recursive=True) if os.path.isfile(p)]
    paths = [p for p in paths if os.path.relpath(p, ROOT) not in GENERATED]
    return max((os.path.getmtime(p), p) for p in paths)


def extension_state() -> str:
    """'' when up to date, else the reason a build is needed."""
    built = glob.glob(os.path.join(ROOT, "flash_quant", "_C*.so")) + glob.glob(os.path.join(ROOT, "flash_quant", "_C*.pyd"))
    if not built:
        return "flash_quant/_C is not built"
    so_time = max(os.path.getmtime(p) for p in built)
    newest, path = _newest_source()
    if newest > so_time:
        return f"{os.path.relpath(path, ROOT)} is newer than the built extension"
    info = os.path.join(ROOT, "flash_quant", "_build_info.py")
    if not os.path.exists(info):
        return "the build records no torch version (built by an older setup.py)"
    recorded = re.search(r"TORCH_VERSION = '([^']*)'", open(info).read())
    try:
        running = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "torch is not installed"
    release = lambda v: ".".join(v.split("+")[0].split(".")[:2])  # noqa: E731
    if not recorded or release(recorded.group(1)) != release(running):
        return f"built against torch {recorded.group(1) if recorded else '?'}, torch {running} is installed"
    return ""


def installed_here() -> bool:
    try:
        dist = metadata.distribution(PROJECT)
    except metadata.PackageNotFoundError:
        return False
    url = dist.read_text("direct_url.json")
    if not url:
        return False
    info = json.loads(url)
    here = "file://" + ROOT
    return info.get("dir_info", {}).get("editable", False) and info.get("url", "").rstrip("/") == here


def main(argv) -> int:
    if len(argv) >= 1 and argv[0] == "missing":
        extras = [e for e in (argv[1] if len(argv) > 1 else "").split(",") if e]
        for line in requirements(extras):
            if not _met(line):
                print(line)
        return 0
    if argv == ["extension"]:
        why = extension_state()
        if why:
            print(why)
        return 1 if why else 0
    if argv == ["installed"]:
        return 0 if installed_here() else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
