#!/usr/bin/env bash
# Installs a clang++ of version 15 or newer and the blocks runtime, which
# tests/test_mps_host_compile.py (Objective-C++ type check of csrc/mps/ops.mm) and
# tests/test_metal_emulator.py (the Metal kernels compiled with real address spaces)
# need. Does nothing when they are already there. Debian/Ubuntu (apt-get) only;
# elsewhere it says so and those tests skip, naming what is missing.
set -euo pipefail

have_clang() {
  for v in 19 18 17 16 15; do command -v "clang++-$v" >/dev/null 2>&1 && return 0; done
  return 1
}
if have_clang && [ -e /usr/include/Block.h ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_clang.sh: no apt-get; install clang >= 15 and the blocks runtime yourself" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# Debian's plain `clang` is 14 on bookworm; the address-space compile needs 15+.
pkg=""
for v in 19 18 17 16 15; do
  if apt-cache show "clang-$v" >/dev/null 2>&1; then pkg="clang-$v"; break; fi
done
$SUDO apt-get install -y -qq --no-install-recommends ${pkg:-clang} libblocksruntime-dev >/dev/null
echo "install_clang.sh: installed ${pkg:-clang} and libblocksruntime-dev"
