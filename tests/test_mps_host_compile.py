"""csrc/mps/ops.mm, the Objective-C++ host code of the Apple backend, compiled on Linux.

No Mac is needed to catch a misspelled Metal selector or a torch MPS call that does not
exist: clang type-checks ops.mm in Objective-C++ mode with ARC and blocks against the real
torch headers and our stand-in declarations of Apple's API (tools/apple_standin,
tools/mps_host_check.py). The planted-error tests prove the check can fail. The
rethrow helper that ops.mm runs its dispatch_sync block through is compiled with
-fblocks and run against a dispatch_sync that, like libdispatch, terminates the process
when a block throws.

CI (.ci/run) installs clang and libblocksruntime-dev and sets FQ_REQUIRE_CLANG=1, so
these tests run there; elsewhere they skip, with the reason, when clang is missing.
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import mps_host_check as hc  # noqa: E402

CLANG = hc.find_clang()
REQUIRED = os.environ.get("FQ_REQUIRE_CLANG") == "1"


def _need_clang():
    if CLANG is None:
        if REQUIRED:
            pytest.fail("FQ_REQUIRE_CLANG=1 but no clang++ was found (scripts/install_clang.sh installs it)")
        pytest.skip("no clang++ on this machine (apt-get install clang): ops.mm cannot be type-checked")


# Planted errors: (what, text in ops.mm, replacement, expected in the compiler output).
PLANTED = {
    "metal_selector": ("[enc setComputePipelineState:psos[i]]", "[enc setComputePipelineStat:psos[i]]",
                       "setComputePipelineStat"),
    "torch_mps_call": ("stream->commandEncoder()", "stream->computeEncoder()", "computeEncoder"),
    "metal_property": ("pso.maxTotalThreadsPerThreadgroup >=", "pso.maxThreadsPerThreadgroup >=",
                       "maxThreadsPerThreadgroup"),
}


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """ops.mm and each planted copy, type-checked against one precompiled header."""
    _need_clang()
    gen = hc.generated_dir()
    with open(hc.OPS_MM) as f:
        source = f.read()
    paths = {"ops.mm": hc.OPS_MM}
    d = tmp_path_factory.mktemp("planted")
    for name, (old, new, _) in PLANTED.items():
        assert source.count(old) == 1, f"planted error {name}: {old!r} is no longer in ops.mm"
        p = d / f"{name}.mm"
        p.write_text(source.replace(old, new))
        paths[name] = str(p)
    pch = hc.build_pch(CLANG, gen)  # the torch headers once, not once per file
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(hc.check_ops_mm, p, CLANG, gen, pch) for k, p in paths.items()}
        results = {k: f.result() for k, f in futures.items()}
    shutil.rmtree(gen, ignore_errors=True)
    return results


def test_ops_mm_type_checks(checks):
    ok, out = checks["ops.mm"]
    assert ok, out


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_error_fails_the_check(checks, name):
    ok, out = checks[name]
    assert not ok and PLANTED[name][2] in out and "error" in out, out


def test_ops_mm_rethrows_and_uses_the_stream_device():
    with open(hc.OPS_MM) as f:
        src = f.read()
    # Every block dispatched on the stream's queue goes through the rethrowing helper.
    assert "dispatch_sync(" not in src.replace("dispatch_sync_rethrowing(", "")
    assert "dispatch_sync_rethrowing(stream->queue()" in src
    # The Metal device is the stream's, not whatever MTLCreateSystemDefaultDevice returns.
    assert "MTLCreateSystemDefaultDevice" not in src and "stream->device()" in src


RETHROW_PROGRAM = r"""
#include <cstdio>
#include <stdexcept>
#include "mps/dispatch_rethrow.h"

// libdispatch calls a block from C frames that end the process on an exception.
static void call_block(dispatch_block_t block) noexcept { block(); }
extern "C" void dispatch_sync(dispatch_queue_t, dispatch_block_t block) { call_block(block); }

int main() {
  try {
#ifdef FQ_RAW_DISPATCH
    dispatch_sync(nullptr, ^() { throw std::runtime_error("encoder failed"); });
#else
    flash_quant::mps::dispatch_sync_rethrowing(nullptr, ^() { throw std::runtime_error("encoder failed"); });
#endif
  } catch (const std::exception& e) {
    std::printf("caught: %s\n", e.what());
    return 0;
  }
  return 3;
}
"""


@pytest.mark.parametrize("raw", [False, True], ids=["rethrowing", "raw_dispatch_sync"])
def test_exception_in_dispatched_block_reaches_the_caller(tmp_path, raw):
    _need_clang()
    src = tmp_path / "rethrow.cpp"
    src.write_text(RETHROW_PROGRAM)
    exe = tmp_path / "rethrow"
    cmd = [CLANG, "-std=c++17", "-fblocks", "-isystem", hc.STANDIN, "-I", hc.CSRC, str(src), "-o", str(exe),
           "-lBlocksRuntime"] + (["-DFQ_RAW_DISPATCH"] if raw else [])
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0 and "BlocksRuntime" in build.stderr and not REQUIRED:
        pytest.skip("libBlocksRuntime is missing (apt-get install libblocksruntime-dev)")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    if raw:  # what ops.mm did before: the process dies
        assert run.returncode != 0 and "caught" not in run.stdout
    else:
        assert run.returncode == 0 and run.stdout == "caught: encoder failed\n", (run.returncode, run.stdout)
