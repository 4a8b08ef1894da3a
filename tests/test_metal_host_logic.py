"""The MPS backend's platform-independent host logic (csrc/mps/host_logic.cpp) and the
build-time embedding of the Metal sources (csrc/mps/embed_metal.py), on Linux.

host_logic is reached through tools/metal_emu/plan_abi.cpp, compiled with g++ without
torch; the same code decides every launch of csrc/mps/ops.mm on a Mac.
"""
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "metal_emu"))
sys.path.insert(0, os.path.join(ROOT, "csrc", "mps"))
import driver  # noqa: E402
import embed_metal  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(driver.CXX) is None, reason="needs a C++ compiler")

ATTN_PARAMS_SIZE = 13 * 4 * 8 + 12 * 4
INT_FIELDS = 13 * 4 * 8  # offset of B, Hq, Hkv, Sq, Skv, D


@pytest.fixture(scope="module")
def emu():
    return driver.Emulator()


def qkv(b=1, hq=4, hkv=2, sq=10, skv=12, d=64, dtype=torch.float32):
    return torch.zeros(b, hq, sq, d, dtype=dtype), torch.zeros(b, hkv, skv, d, dtype=dtype), \
        torch.zeros(b, hkv, skv, d, dtype=dtype)


def attn_inputs(q, k, v, **kw):
    names = ["q", "k", "v", "q_data", "q_scale", "q_zero_point", "k_data", "k_scale", "k_zero_point", "k_mean",
             "v_data", "v_scale", "v_zero_point", "attn_mask", "grad_out", "out", "lse"]
    d = dict(q=q, k=k, v=v, **kw)
    return [d.get(n) for n in names]


def constants(launch):
    return {launch.const_idx[i]: launch.const_val[i] for i in range(launch.n_const)}


def test_forward_plan_grid_memory_and_arguments(emu):
    q, k, v = qkv(b=2, hq=4, hkv=2, sq=70, skv=33, d=96)
    plan = emu.plan_attention(attn_inputs(q, k, v), causal=True, scale=0.25, pv_precision="int8")
    assert plan.n_launch == 1 and plan.n_out == 2
    l = plan.launch[0]
    assert l.function == b"fq_attention_forward"
    assert list(l.grid) == [3, 4, 2] and list(l.threads) == [128, 1, 1]
    c = constants(l)
    assert c[0] == 96 and c[7] == 1 and c[5] == 1 and c[8] == 32  # head dim, causal, pv int8, block_k
    assert l.params_size == ATTN_PARAMS_SIZE
    raw = bytes(l.params[: l.params_size])
    assert struct.unpack_from("6i", raw, INT_FIELDS) == (2, 4, 2, 70, 33, 96)
    assert struct.unpack_from("f", raw, INT_FIELDS + 40)[0] == pytest.approx(0.25)
    # q's strides in elements, (B, H, S, D) order
    assert struct.unpack_from("4q", raw, 0) == tuple(q.stride())
    out = [plan.out[i] for i in range(2)]
    assert [out[0].sizes[i] for i in range(4)] == [2, 4, 70, 96] and [out[1].sizes[i] for i in range(3)] == [2, 4, 70]


# Apple's limits (Metal feature set tables, Apple GPU family 7+): 32 KiB of threadgroup
# memory and 1024 threads per threadgroup; the simdgroup width is 32 and every kernel here
# assumes whole simdgroups. A pipeline's maxTotalThreadsPerThreadgroup can be lower than
# 1024 when the kernel uses many registers (only a Mac reports it; ops.mm checks it when
# it builds the pipeline): the attention kernels, which hold head_dim / 4 floats of Q and
# O per thread, stay at or below THREADS_REGISTER_HEADROOM to keep a margin.
MAX_TG_MEM_BYTES = 32 * 1024
MAX_THREADS_PER_TG = 1024
SIMD_WIDTH = 32
THREADS_REGISTER_HEADROOM = 256


def _assert_within_apple_limits(plan, attention):
    for i in range(plan.n_launch):
        l = plan.launch[i]
        name = l.function.decode()
        threads = l.threads[0] * l.threads[1] * l.threads[2]
        assert l.tg_mem <= MAX_TG_MEM_BYTES, (name, l.tg_mem)
        assert 0 < threads <= MAX_THREADS_PER_TG and threads % SIMD_WIDTH == 0, (name, list(l.threads))
        if attention:
            assert threads <= THREADS_REGISTER_HEADROOM, (name, threads)


@pytest.mark.parametrize("d", list(range(16, 257, 8)))
def test_budgets_fit_apple_limits_every_head_dim(emu, d):
    q, k, v = qkv(d=d, sq=5, skv=5)
    lse = torch.zeros(1, 4, 5)
    for causal in (False, True):
        for pv in ("none", "int8"):
            _assert_within_apple_limits(emu.plan_attention(attn_inputs(q, k, v), causal, None, pv), True)
        bwd = emu.plan_attention(attn_inputs(q, k, v, grad_out=q, out=q, lse=lse), causal, None, "none",
                                 backward=True)
        _assert_within_apple_limits(bwd, True)
    # Quantized operands (INT8 Q / K, INT4 V) take the same kernel with other staging.
    q8, k8 = torch.zeros(q.shape, dtype=torch.int8), torch.zeros(k.shape, dtype=torch.int8)
    v4 = torch.zeros(*v.shape[:-1], d // 2, dtype=torch.uint8)
    quant = dict(q_data=q8, q_scale=torch.ones(1, 4, 5, 1), k_data=k8, k_scale=torch.ones(1, 2, 5, 1),
                 v_data=v4, v_scale=torch.ones(1, 2, 5, 1))
    _assert_within_apple_limits(emu.plan_attention(attn_inputs(q, k, v, **quant), False, None, "none"), True)
    for gran in ("per_token", "per_channel", "per_tensor"):
        x = torch.zeros(1, 2, 7, d)
        _assert_within_apple_limits(emu.plan_quantize(x, "int8", gran, 1, "symmetric", True), False)


def test_pipeline_keys_distinguish_specialisations(emu):
    q, k, v = qkv()
    keys = set()
    for causal in (False, True):
        for dtype in (torch.float32, torch.float16):
            qq, kk, vv = (t.to(dtype) for t in (q, k, v))
            plan = emu.plan_attention(attn_inputs(qq, kk, vv), causal, None, "none")
            keys.add(plan.launch[0].key)
    assert len(keys) == 4
    q8 = torch.zeros(q.shape, dtype=torch.int8)
    plan = emu.plan_attention(attn_inputs(q, k, v, q_data=q8, q_scale=torch.ones(1, 4, 10, 1)), False, None, "none")
    assert plan.launch[0].key not in keys
    binds = {plan.launch[0].bind_slot[i]: plan.launch[0].bind_src[i] for i in range(plan.launch[0].n_bind)}
    assert binds[0] == 3 and binds[1] == 4 and binds[2] == driver.UNBOUND  # q_data, q_scale, no zero point
    assert binds[3] == 1  # k itself


@pytest.mark.parametrize("change,message", [
    (dict(hq=3, hkv=2), "multiple of Hkv"),
    (dict(d=20), "head dim"),
    (dict(d=264), "head dim"),
    (dict(dtype=torch.float64), "q must be float32"),
])
def test_forward_shape_errors_name_the_argument(emu, change, message):
    q, k, v = qkv(**change)
    with pytest.raises(driver.PlanError, match=message):
        emu.plan_attention(attn_inputs(q, k, v), False, None, "none")


def test_operand_errors_name_the_argument(emu):
    q, k, v = qkv()
    cases = [
        (dict(q_data=torch.zeros(q.shape, dtype=torch.int8), q_scale=torch.ones(1, 4, 10, 64)), "q_scale"),
        (dict(q_data=torch.zeros(q.shape, dtype=torch.int8)), "q_scale is required"),
        (dict(k_data=torch.zeros(k.shape, dtype=torch.int16), k_scale=torch.ones(1, 2, 12, 1)), "k_data must be"),
        (dict(k_data=torch.zeros(1, 2, 12, 64, dtype=torch.uint8), k_scale=torch.ones(1, 2, 12, 1)), "k_data must have shape"),
        (dict(v_data=torch.zeros(v.shape, dtype=torch.float8_e4m3fn), v_scale=torch.ones(1, 2, 1, 64),
              v_zero_point=torch.zeros(1, 2, 1, 64, dtype=torch.int32)), "v_zero_point is not allowed"),
        (dict(attn_mask=torch.zeros(10, 12, dtype=torch.float64)), "attn_mask must be"),
        (dict(attn_mask=torch.zeros(3, 12, dtype=torch.bool)), "attn_mask of shape"),
        (dict(k_mean=torch.zeros(1, 2, 1, 32)), "k_mean"),
    ]
    for kw, message in cases:
        with pytest.raises(driver.PlanError, match=message):
            emu.plan_attention(attn_inputs(q, k, v, **kw), False, None, "none")
    with pytest.raises(driver.PlanError, match="pv_precision"):
        emu.plan_attention(attn_inputs(q, k, v), False, None, "int4")


def test_backward_plan(emu):
    q, k, v = qkv(sq=40, skv=70)
    lse = torch.zeros(1, 4, 40)
    plan = emu.plan_attention(attn_inputs(q, k, v, grad_out=q, out=q, lse=lse), True, None, "none", backward=True)
    names = [plan.launch[i].function for i in range(plan.n_launch)]
    assert names == [b"fq_attention_backward_prep", b"fq_attention_backward_dq", b"fq_attention_backward_dkdv"]
    assert list(plan.launch[1].grid) == [2, 4, 1] and list(plan.launch[2].grid) == [3, 2, 1]
    with pytest.raises(driver.PlanError, match="lse must be"):
        emu.plan_attention(attn_inputs(q, k, v, grad_out=q, out=q, lse=torch.zeros(1, 4, 41)), True, None, "none",
                           backward=True)


def test_quantize_plan_and_errors(emu):
    x = torch.zeros(2, 3, 10, 16)
    plan = emu.plan_quantize(x, "int4", "per_block", 4, "asymmetric", True)
    names = [plan.launch[i].function for i in range(plan.n_launch)]
    assert names == [b"fq_quantize_mean", b"fq_quantize_reduce", b"fq_quantize_apply"]
    assert plan.launch[1].grid[0] == 2 * 3 * 3  # groups: 6 slices x ceil(10 / 4) blocks
    shapes = [[plan.out[i].sizes[k] for k in range(plan.out[i].rank)] for i in range(4)]
    assert shapes == [[2, 3, 10, 8], [2, 3, 3, 1], [2, 3, 3, 1], [2, 3, 1, 16]]
    for args, message in [
        (("fp8_e4m3", "per_token", 1, "asymmetric", False), "asymmetric"),
        (("int8", "per_token", 1, "legacy", False), "legacy"),
        (("int3", "per_token", 1, "symmetric", False), "precision"),
        (("int8", "per_row", 1, "symmetric", False), "granularity"),
        (("int8", "per_block", 0, "symmetric", False), "block_size"),
    ]:
        with pytest.raises(driver.PlanError, match=message):
            emu.plan_quantize(x, *args)
    with pytest.raises(driver.PlanError, match="even"):
        emu.plan_quantize(torch.zeros(4, 7), "int4", "per_token", 1, "symmetric", False)
    with pytest.raises(driver.PlanError, match="contiguous"):
        emu.plan_quantize(x.transpose(-1, -2), "int8", "per_token", 1, "symmetric", False)


def test_dequantize_plan_errors(emu):
    data = torch.zeros(2, 6, 8, dtype=torch.int8)
    with pytest.raises(driver.PlanError, match="row groups"):
        emu.plan_dequantize(data, torch.ones(2, 4, 1), torch.zeros(2, 4, 1, dtype=torch.int32), torch.empty(0),
                            "int8", 4, torch.float32)
    with pytest.raises(driver.PlanError, match="data must be uint8"):
        emu.plan_dequantize(data, torch.ones(1), torch.zeros(1, dtype=torch.int32), torch.empty(0), "int4", 1,
                            torch.float32)


def test_embedded_source_is_one_translation_unit(tmp_path):
    src = embed_metal.combined_source()
    for name in ("fq_attention_forward", "fq_attention_backward_dkdv", "fq_quantize_apply", "fq_dequantize"):
        assert f"kernel void {name}(" in src
    assert '#include "' not in src and "#pragma once" not in src
    unit = tmp_path / "all.metal"
    unit.write_text(src)
    ok, err = driver.syntax_check(str(unit))
    assert ok, err
    # The generated header reproduces the source byte for byte.
    hdr = tmp_path / "metal_source.h"
    hdr.write_text(embed_metal.header(src, b""))
    prog = tmp_path / "dump.cpp"
    prog.write_text(f'#include "{hdr}"\n#include <cstdio>\n'
                    "int main() { std::fputs(fq_metal_source, stdout); return fq_metal_lib_size != 0; }\n")
    exe = tmp_path / "dump"
    subprocess.run([driver.CXX, "-std=c++17", str(prog), "-o", str(exe)], check=True)
    assert subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout == src
