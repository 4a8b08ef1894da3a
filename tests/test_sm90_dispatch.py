"""flash_quant.cuda.dispatch on the CPU: which CUDA forward kernel serves a call (issue 17.3).

The device capability and the sm90 op's registration are mocked (no GPU here); the
calls are CPU tensors, and the Triton kernel runs under TRITON_INTERPRET=1. Checked: the
presets' calls pick sm90 on a mocked sm_90 with the op registered, every reason code for
the calls it does not cover, the counters and the log line once per reason, the forced
modes (environment variable read once, context manager, forced sm90 refusing what it
cannot serve), and that a routed call reaches the sm90 op with its operands re-viewed as
the op wants them (a CPU stand-in of the op computes the fp64 attention of what it got,
which must match the Triton kernel on the same call).
"""
import logging
import os
from pathlib import Path

import torch

# Triton runs interpreted on CPU tensors only where no GPU is (the flag is process-wide and
# read when kernels are defined: a GPU machine's session must keep compiled kernels). The
# decision tests run anywhere; the routing tests, which run Triton on CPU tensors, only here.
INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

from flash_quant.cuda.common import enable_interpreter_numpy_compat  # noqa: E402

if INTERPRET:
    enable_interpreter_numpy_compat()
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs Triton interpreted on CPU tensors (no GPU "
                                       "here); tests/test_sm90_gpu.py routes calls on the device")

import flash_quant.ops  # noqa: E402,F401  (loads the schemas and fake kernels)
from flash_quant.cuda import dispatch  # noqa: E402
from flash_quant.cuda.forward import dispatched_forward  # noqa: E402
from flash_quant.layout import cuda_kmajor_seq_len  # noqa: E402
from flash_quant.testing import kernel_operands, make_qkv, reference_attention  # noqa: E402


@pytest.fixture
def hopper(monkeypatch):
    """A mocked sm_90 device with the sm90 op registered; fresh dispatch state. Returns a
    dict whose 'capability' / 'registered' entries the test may change. The coverage
    tests see every covered call routed to sm90: the policies that keep INT8 P·V and the
    head dim 64 on Triton in auto mode are switched off here and tested on
    their own below."""
    state = {"capability": (9, 0), "registered": True}
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "SM90_AUTO_SKIPS_PV", ())
    monkeypatch.setattr(dispatch, "SM90_AUTO_SKIPS_TILE_HEAD_DIMS", ())
    dispatch._reset_for_tests()
    monkeypatch.setattr(dispatch, "_device_capability", lambda device: state["capability"])
    monkeypatch.setattr(dispatch, "_sm90_op_registered", lambda: state["registered"])
    yield state
    dispatch._reset_for_tests()


def kmajor(data: torch.Tensor) -> torch.Tensor:
    """The CUDA quantize's K-major storage of 8-bit per-channel data (flash_quant/layout.py):
    a (…, D, round_up(S, 16)) buffer seen as (…, S, D)."""
    s, d = data.shape[-2:]
    buf = torch.zeros(data.shape[:-2] + (d, cuda_kmajor_seq_len(s)), dtype=data.dtype)
    buf[..., :s] = data.transpose(-1, -2)
    return buf.transpose(-1, -2)[..., :s, :]


def call(recipe="accurate", b=1, hq=2, hkv=1, sq=5, skv=7, d=128, dtype=torch.bfloat16, causal=False, **over):
    """The op arguments of a preset's recipe (kernel_operands: INT8 Q per token, smoothed
    INT8 K, for "fast" INT8 V per channel stored K-major), in schema order, with
    `over` replacing arguments by name."""
    q, k, v = make_qkv(b, hq, sq, d, hkv=hkv, skv=skv, dtype=dtype)
    kw, pv = kernel_operands(q, k, v, recipe)
    if "v_data" in kw:
        kw["v_data"] = kmajor(kw["v_data"])
    a = dict(q=q, k=k, v=v, q_zero_point=None, k_zero_point=None, v_zero_point=None, v_data=None, v_scale=None,
             attn_mask=None, is_causal=causal, scale=None, pv_precision=pv)
    a.update(kw)
    a.update(over)
    return tuple(a[n] for n in dispatch._ARGS)


def code_of(args):
    return dispatch.decide(*args).code


# ------------------------------------------------------------------------ decisions
@pytest.mark.parametrize("recipe", ["accurate", "fast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 48, 64, 80, 96, 128])
def test_covered_calls_pick_sm90(hopper, recipe, dtype, causal, d):
    """Both presets' operands, GQA, Sq != Skv, causal or not, bf16 / fp16, head dims 64 and
    128 and the multiples of 16 below them (run in those tiles): sm90."""
    assert dispatch.forward_kernel(*call(recipe, dtype=dtype, causal=causal, hq=4, hkv=2, d=d)) == ("sm90", None)


def test_auto_keeps_head_dim_64_on_triton_by_measurement(hopper, monkeypatch, caplog):
    """Head dim 64 is covered but measured slower than Triton: auto mode routes it to Triton
    with a counted, INFO-logged reason; forcing sm90 runs it; head dim 128 is unaffected."""
    monkeypatch.setattr(dispatch, "SM90_AUTO_SKIPS_TILE_HEAD_DIMS", (64,))
    dispatch._reset_for_tests()
    caplog.set_level(logging.INFO, logger=dispatch.logger.name)
    kernel, reason = dispatch.forward_kernel(*call(d=64))
    assert kernel == "triton" and reason.startswith(dispatch.R_SLOWER) and "head dim 64" in reason
    dispatch.record(dispatch.decide(*call(d=64)))
    assert dispatch.fallback_counts() == {dispatch.R_SLOWER: 1}
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == dispatch.logger.name)
    with dispatch.force_kernel("sm90"):
        assert dispatch.forward_kernel(*call(d=64)) == ("sm90", None)
    assert dispatch.forward_kernel(*call(d=128)) == ("sm90", None)
    # the policy is the tile's: head dim 48 runs in the 64 tile, 96 in the 128 one
    assert dispatch.forward_kernel(*call(d=48))[0] == "triton"
    assert dispatch.forward_kernel(*call(d=96)) == ("sm90", None)


def test_tile_head_dim_matches_the_kernels_rule():
    """dispatch.sm90_tile_head_dim against fwd_params.h's tile_head_dim, read from the source."""
    text = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "sm90" / "fwd_params.h").read_text()
    assert f"kHeadDimGranule = {dispatch.SM90_HEAD_DIM_GRANULE};" in text
    tiles = ", ".join(str(t) for t in dispatch.SM90_TILE_HEAD_DIMS)
    assert f"kForwardHeadDims[] = {{{tiles}}};" in text
    expected = {16: 64, 32: 64, 48: 64, 64: 64, 80: 128, 96: 128, 112: 128, 128: 128}
    for d in range(1, 300):
        assert dispatch.sm90_tile_head_dim(d) == expected.get(d), d


def test_auto_keeps_int8_pv_on_triton_by_measurement(hopper, monkeypatch, caplog):
    """The fast preset's INT8 P·V measured slower on sm90 than on Triton (docs/hopper.md):
    auto mode routes it to Triton with a counted, INFO-logged reason; forcing sm90 still
    runs it; the accurate preset (16-bit P·V) stays on sm90."""
    monkeypatch.setattr(dispatch, "SM90_AUTO_SKIPS_PV", ("int8",))
    dispatch._reset_for_tests()
    kernel, reason = dispatch.forward_kernel(*call("fast"))
    assert kernel == "triton" and reason.startswith(dispatch.R_SLOWER + ":"), reason
    assert dispatch.forward_kernel(*call("accurate")) == ("sm90", None)
    with caplog.at_level(logging.INFO, logger="flash_quant.cuda.dispatch"):
        dispatch.record(dispatch.decide(*call("fast")))
    assert dispatch.fallback_counts() == {dispatch.R_SLOWER: 1}
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    with dispatch.force_kernel("sm90"):
        assert dispatch.forward_kernel(*call("fast")) == ("sm90", None)


def _with(recipe="accurate", **over):
    return lambda: call(recipe, **over)


def _asymmetric_q():
    q, k, v = make_qkv(1, 2, 5, 128, hkv=1, skv=7, dtype=torch.bfloat16)
    data, scale, zp, _ = flash_quant.ops.quantize(q, "int8", "per_token", 1, "asymmetric", False)
    return call(q_data=data, q_scale=scale, q_zero_point=zp)


def _fp8_q():
    q, _, _ = make_qkv(1, 2, 5, 128, hkv=1, skv=7, dtype=torch.bfloat16)
    data, scale, _, _ = flash_quant.ops.quantize(q, "fp8_e4m3", "per_token", 1, "symmetric", False)
    return call(q_data=data, q_scale=scale)


def _row_major_v():
    a = list(call("fast"))
    a[dispatch._ARGS.index("v_data")] = a[dispatch._ARGS.index("v_data")].contiguous()
    return tuple(a)


def _float_q():
    return call(q_data=None, q_scale=None)


def _misaligned_q():
    """q_data whose start is one byte past a 16-byte boundary (strides fine)."""
    a = call()
    qd = a[dispatch._ARGS.index("q_data")]
    buf = torch.empty(qd.numel() + 1, dtype=torch.int8)
    moved = buf[1:].view(qd.shape)
    moved.copy_(qd)
    return call(q_data=moved, q_scale=a[dispatch._ARGS.index("q_scale")])


def _padded_v():
    """A 16-bit V whose rows are 129 elements apart (258 bytes: no TMA descriptor)."""
    a = call()
    v = a[dispatch._ARGS.index("v")]
    buf = torch.zeros(v.shape[:-1] + (129,), dtype=v.dtype)
    buf[..., :128] = v
    return call(v=buf[..., :128], k=buf[..., :128])


@pytest.mark.parametrize("make, code", [
    (_with(d=72), dispatch.R_HEAD_DIM),
    (_with(d=256), dispatch.R_HEAD_DIM),
    (_with(dtype=torch.float32), dispatch.R_DTYPE),
    (_with(attn_mask=torch.ones(5, 7, dtype=torch.bool)), dispatch.R_MASK),
    (_with("fast", pv_precision="fp8_e4m3"), dispatch.R_PV),
    (_row_major_v, dispatch.R_V),
    (_with("fast", pv_precision="none"), dispatch.R_V),  # quantized V, 16-bit P·V
    (_asymmetric_q, dispatch.R_ZERO_POINT),
    (_fp8_q, dispatch.R_QK),
    (_float_q, dispatch.R_QK),
    (_with(scale=-0.1), dispatch.R_SCALE),
    (_misaligned_q, dispatch.R_LAYOUT),
    (_padded_v, dispatch.R_LAYOUT),
], ids=["d72", "d256", "fp32", "mask", "pv_fp8", "v_row_major", "v_quant_pv16", "zero_point", "fp8_qk",
        "float_q", "negative_scale", "misaligned_q", "padded_v"])
def test_uncovered_calls_name_their_reason(hopper, make, code):
    kernel, reason = dispatch.forward_kernel(*make())
    assert kernel == "triton" and reason.startswith(code + ":"), reason


def test_alignment_counts_only_for_what_tma_reads(hopper):
    """The fast recipe reads V's codes, not its float tensor: a misaligned float V (a
    stand-in here) does not turn sm90 off; a misaligned 16-bit V (accurate) does."""
    a = call("fast")
    v = a[dispatch._ARGS.index("v")]
    buf = torch.empty(v[0, 0].numel() + 1, dtype=v.dtype)
    odd_v = buf[1:].view(v.shape[2:]).expand(v.shape)
    assert odd_v.data_ptr() % dispatch.TMA_ALIGN
    assert dispatch.forward_kernel(*call("fast", v=odd_v))[0] == "sm90"
    acc = call()
    v = acc[dispatch._ARGS.index("v")]
    buf = torch.empty(v.numel() + 8, dtype=v.dtype)
    odd_v = buf[1:v.numel() + 1].view(v.shape)
    kernel, reason = dispatch.forward_kernel(*call(v=odd_v, k=odd_v))
    assert kernel == "triton" and reason.startswith(dispatch.R_LAYOUT)


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_other_devices_use_triton(hopper, capability):
    hopper["capability"] = capability
    kernel, reason = dispatch.forward_kernel(*call("fast"))
    assert kernel == "triton" and reason.startswith(dispatch.R_DEVICE)
    assert f"sm_{capability[0]}{capability[1]}" in reason


def test_unbuilt_op_on_hopper_is_named(hopper):
    hopper["registered"] = False
    kernel, reason = dispatch.forward_kernel(*call())
    assert kernel == "triton" and reason.startswith(dispatch.R_NOT_BUILT)


def test_capability_is_read_per_device_index(monkeypatch):
    """A non-zero device index asks for its own capability (a mixed machine: cuda:1 Hopper)."""
    dispatch._reset_for_tests()
    asked = []

    def capability(idx):
        asked.append(idx)
        return {0: (8, 0), 1: (9, 0)}[idx]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert dispatch._device_capability(torch.device("cuda", 1)) == (9, 0)
    assert dispatch._device_capability(torch.device("cuda", 0)) == (8, 0)
    assert dispatch._device_capability(torch.device("cuda", 1)) == (9, 0)
    assert asked == [1, 0]  # cached per index
    dispatch._reset_for_tests()


def test_bad_arguments_raise_the_ops_error_whatever_the_mode(hopper):
    """Validation (forward.plan) runs before the decision: forced sm90 or not, a bad call
    gets the op's error naming the argument, not a dispatch message."""
    args = list(call())
    args[dispatch._ARGS.index("k_data")] = args[dispatch._ARGS.index("k_data")][..., :3, :]
    for m in dispatch.MODES:
        with dispatch.force_kernel(m), pytest.raises(ValueError, match="k_data has shape"):
            dispatch.decide(*args)


# ------------------------------------------------------------------------ modes
def test_environment_variable_is_read_once(hopper, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.forward_kernel(*call())[0] == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")  # later changes are not read
    assert dispatch.mode() == "triton" and dispatch.forward_kernel(*call())[0] == "triton"
    dispatch._reset_for_tests()
    assert dispatch.mode() == "auto"


def test_bad_environment_value_is_refused(hopper, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.mode()


def test_force_kernel_context_wins_and_restores(hopper, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    args = call("fast")
    with dispatch.force_kernel("auto"):
        assert dispatch.forward_kernel(*args) == ("sm90", None)
        with dispatch.force_kernel("triton"):
            kernel, reason = dispatch.forward_kernel(*args)
            assert kernel == "triton" and reason.startswith(dispatch.R_FORCED)
        assert dispatch.forward_kernel(*args)[0] == "sm90"
    assert dispatch.forward_kernel(*args)[0] == "triton"  # the variable again
    with pytest.raises(ValueError, match="force_kernel"):
        with dispatch.force_kernel("fastest"):
            pass


def test_forced_sm90_refuses_what_it_cannot_serve(hopper):
    with dispatch.force_kernel("sm90"):
        assert dispatch.forward_kernel(*call()) == ("sm90", None)
        with pytest.raises(ValueError, match="sm90 kernel was forced.*head_dim"):
            dispatch.forward_kernel(*call(d=72))
        hopper["capability"] = (8, 0)
        dispatch._DECISIONS.clear()
        with pytest.raises(ValueError, match="sm90 kernel was forced.*device_not_sm90"):
            dispatch.forward_kernel(*call())


def test_decisions_are_cached_per_signature(hopper):
    args = call("fast")
    dispatch.decide(*args)
    misses = dispatch._DECISIONS.misses
    dispatch.decide(*call("fast"))  # fresh tensors, same signature
    assert dispatch._DECISIONS.misses == misses
    with dispatch.force_kernel("triton"):  # the mode is part of the key
        assert dispatch.decide(*args).kernel == "triton"


# ------------------------------------------------------------------- counters, log
def test_fallbacks_are_counted_and_logged_once_per_reason(hopper, caplog):
    caplog.set_level(logging.INFO, logger=dispatch.logger.name)
    d72 = dispatch.decide(*call(d=72))
    for _ in range(3):
        dispatch.record(d72)
    dispatch.record(dispatch.decide(*call(attn_mask=torch.ones(5, 7, dtype=torch.bool))))
    dispatch.record(dispatch.decide(*call()))  # sm90: no fallback
    with dispatch.force_kernel("triton"):
        dispatch.record(dispatch.decide(*call()))  # forced: not a fallback
    assert dispatch.fallback_counts() == {dispatch.R_HEAD_DIM: 3, dispatch.R_MASK: 1}
    lines = [r for r in caplog.records if r.name == dispatch.logger.name]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)
    assert "head_dim" in lines[0].getMessage() and "mask" in lines[1].getMessage()
    dispatch.reset_fallback_counts()
    assert dispatch.fallback_counts() == {}


def test_non_hopper_fallback_logs_at_info(hopper, caplog):
    caplog.set_level(logging.INFO, logger=dispatch.logger.name)
    hopper["capability"] = (8, 0)
    dispatch.record(dispatch.decide(*call()))
    (line,) = [r for r in caplog.records if r.name == dispatch.logger.name]
    assert line.levelno == logging.INFO and dispatch.fallback_counts() == {dispatch.R_DEVICE: 1}


# ------------------------------------------------------------------------- routing
def _dequantized(a):
    """q, k, v, lse offset of the sm90 op's arguments, in float64 (what the op must compute)."""
    q_data, q_scale, k_data, k_scale, k_mean, v, v_data, v_scale, nonfinite, is_causal, scale = a
    q = q_data.double() * q_scale.double()[..., None]
    k = k_data.double() * k_scale.double()[..., None]
    vv = v.double() if v_data is None else v_data.double() * v_scale.double()[:, :, None, :]
    return q, k, vv


@pytest.fixture
def sm90_on_cpu(hopper):
    """The sm90 op given a CPU kernel (the fp64 attention of its arguments); records each
    call's arguments."""
    got = []
    lib = torch.library.Library("flash_quant", "IMPL")

    def kernel(*a):
        got.append(a)
        q, k, v = _dequantized(a)
        out, lse = reference_attention(q, k, v, is_causal=a[9], scale=a[10], return_lse=True)
        if a[4] is not None:  # smoothing: lse of the unsmoothed scores (schema.cpp)
            hq, hkv = q.shape[1], a[4].shape[1]
            km = a[4].double().repeat_interleave(hq // hkv, dim=1)
            lse = lse + a[10] * torch.einsum("bhsd,bhd->bhs", q, km)
        return out.to(a[5].dtype), lse.float()

    lib.impl("_sm90_attention_forward", kernel, "CPU")
    yield got
    lib._destroy()


@needs_interpreter
@pytest.mark.parametrize("recipe", ["accurate", "fast"])
@pytest.mark.parametrize("causal", [False, True])
def test_routed_call_reaches_the_op_with_its_operands_reviewed(sm90_on_cpu, recipe, causal):
    """dispatched_forward hands a covered call to the sm90 op with (B, H, S) row scales,
    k_mean (B, Hkv, D), v_scale (B, Hkv, D) and the K-major V codes; what the op computes
    from them equals the Triton kernel's result on the same call (GQA, Sq != Skv)."""
    args = call(recipe, b=2, hq=4, hkv=2, sq=9, skv=21, causal=causal)
    out, lse = dispatched_forward(*args)
    (a,) = sm90_on_cpu
    assert a[1].shape == (2, 4, 9) and a[3].shape == (2, 2, 21) and a[4].shape == (2, 2, 128)
    if recipe == "fast":
        assert a[6].stride(-2) == 1 and a[7].shape == (2, 2, 128)
    else:
        assert a[6] is None and a[7] is None
    assert a[9] is causal and a[10] == pytest.approx(128 ** -0.5)
    # the per-head non-finite flag: for causal calls with a 16-bit V only (quantized V is finite)
    if causal and recipe == "accurate":
        assert a[8].dtype == torch.int32 and a[8].shape == (2, 4) and not a[8].any()
    else:
        assert a[8] is None
    with dispatch.force_kernel("triton"):
        ref_out, ref_lse = dispatched_forward(*args)
    assert len(sm90_on_cpu) == 1  # triton served the forced call
    assert out.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=0)
    # (the fast recipe's Triton kernel quantizes P to int8 per tile: ~1 % apart)
    tol = 0.03 if recipe == "fast" else 0.01
    assert (out.double() - ref_out.double()).norm() <= tol * ref_out.double().norm()


@needs_interpreter
def test_causal_call_flags_heads_whose_v_is_not_finite(sm90_on_cpu):
    """A NaN in kv head 1's V (GQA 4 / 2): query heads 2 and 3 get the flag that turns
    causal tile skipping off; the others keep it."""
    args = list(call(b=1, hq=4, hkv=2, sq=9, skv=9, causal=True))
    v = args[dispatch._ARGS.index("v")].clone()
    v[0, 1, 5, 7] = float("nan")
    args[dispatch._ARGS.index("v")] = v
    dispatched_forward(*args)
    (a,) = sm90_on_cpu
    assert a[8].tolist() == [[0, 0, 1, 1]]


@needs_interpreter
def test_uncovered_call_runs_triton_and_counts(sm90_on_cpu):
    out, lse = dispatched_forward(*call(d=72))
    assert sm90_on_cpu == [] and out.shape == (1, 2, 5, 72)
    assert dispatch.fallback_counts() == {dispatch.R_HEAD_DIM: 1}


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out, lse = torch.ops.flash_quant._sm90_attention_forward(
            torch.empty(2, 8, 33, 128, dtype=torch.int8), torch.empty(2, 8, 33),
            torch.empty(2, 2, 40, 128, dtype=torch.int8), torch.empty(2, 2, 40), None,
            torch.empty(2, 2, 40, 128, dtype=torch.float16), None, None, None, True, 0.1)
    assert out.shape == (2, 8, 33, 128) and out.dtype == torch.float16
    assert lse.shape == (2, 8, 33) and lse.dtype == torch.float32


def test_which_kernel_names_the_device_off_cuda():
    """flash_quant.which_kernel on CPU tensors: the CPU backend, whatever the preset."""
    import flash_quant

    q, k, v = make_qkv(1, 2, 9, 128, dtype=torch.bfloat16)
    for preset in ("accurate", "fast", "bf16"):
        assert flash_quant.which_kernel(q, k, v, config=preset, is_causal=True) == ("cpu", None)
    out = flash_quant.attention(q, k, v, config="fast", is_causal=True)  # (the refactored call path)
    assert out.shape == q.shape and out.dtype == q.dtype


# ------------------------------------------------------- the fused accurate preset (one op)
@pytest.fixture
def fused_hopper(hopper, monkeypatch):
    """`hopper`, with the fused op's CUDA kernel registered too."""
    hopper["fused"] = True
    monkeypatch.setattr(dispatch, "_fused_op_registered", lambda: hopper["fused"])
    return hopper


def fused_args(b=1, hq=2, hkv=1, sq=17, skv=17, d=128, dtype=torch.bfloat16, **over):
    q, k, v = make_qkv(b, hq, sq, d, hkv=hkv, skv=skv, dtype=dtype)
    a = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=hkv != hq)
    a.update(over)
    return a


def test_fused_covers_the_plain_accurate_call(fused_hopper):
    a = fused_args()
    assert dispatch.fused_sm90(**a) == pytest.approx(128 ** -0.5)
    assert dispatch.fused_sm90(**dict(a, scale=0.25, is_causal=True)) == 0.25  # causal, Sq == Skv
    assert dispatch.fused_sm90(**fused_args(hq=8, hkv=2, sq=5, skv=3, dtype=torch.float16, is_causal=True)) \
        is not None  # GQA; causal with Sq > Skv: every key is seen by some row
    hits = dispatch._FUSED.hits
    dispatch.fused_sm90(**a)
    assert dispatch._FUSED.hits == hits + 1  # the per-signature part is cached


def _strided(x, extra):
    """x with `extra` unused channels after each row (a view of a wider buffer)."""
    buf = torch.zeros(x.shape[:-1] + (x.shape[-1] + extra,), dtype=x.dtype)
    buf[..., : x.shape[-1]] = x
    return buf[..., : x.shape[-1]]


@pytest.mark.parametrize("case", ["mask", "dropout", "grad", "causal_fewer_queries", "head_dim_64", "float32",
                                  "row_stride", "misaligned", "forced_triton", "not_sm90", "not_built",
                                  "gqa_without_flag", "key_value_shapes"])
def test_fused_declines(fused_hopper, case):
    """Each call the fused op does not cover goes the general path (None here)."""
    a = fused_args()
    q = a["query"]
    if case == "mask":
        a["attn_mask"] = torch.ones(17, 17, dtype=torch.bool)
    elif case == "dropout":
        a["dropout_p"] = 0.1
    elif case == "grad":
        a["query"] = q.requires_grad_()
    elif case == "causal_fewer_queries":
        a = fused_args(sq=5, skv=17, is_causal=True)
    elif case == "head_dim_64":
        a = fused_args(d=64)
    elif case == "float32":
        a = fused_args(dtype=torch.float32)
    elif case == "row_stride":
        a["key"] = _strided(a["key"], 4)  # 132-element rows: not 16-byte vectors
    elif case == "misaligned":
        a["value"] = torch.zeros(a["value"].numel() + 1, dtype=a["value"].dtype)[1:].view_as(a["value"])
    elif case == "forced_triton":
        with dispatch.force_kernel("triton"):
            assert dispatch.fused_sm90(**a) is None
        return
    elif case == "not_sm90":
        fused_hopper["capability"] = (8, 0)
    elif case == "not_built":
        fused_hopper["fused"] = False
    elif case == "gqa_without_flag":
        a = fused_args(hq=4, hkv=2, enable_gqa=False)
    elif case == "key_value_shapes":
        a["value"] = a["value"][..., :5, :]
    assert dispatch.fused_sm90(**a) is None, case


def test_fused_fast_preset_follows_the_int8_pv_policy(fused_hopper, monkeypatch):
    """The fast preset (pv_int8) takes the fused op where its INT8 P·V would run on sm90
    (sm90 forced, or SM90_AUTO_SKIPS_PV lifted) and, while that policy keeps INT8 P·V on
    Triton, by SM90_FUSED_TAKES_FAST; "triton" forced never; the accurate preset always."""
    a = fused_args()
    monkeypatch.setattr(dispatch, "SM90_AUTO_SKIPS_PV", ("int8",))
    assert dispatch.fused_sm90(**a, pv_int8=True) == pytest.approx(128 ** -0.5)
    monkeypatch.setattr(dispatch, "SM90_FUSED_TAKES_FAST", False)
    assert dispatch.fused_sm90(**a, pv_int8=True) is None
    assert dispatch.fused_sm90(**a) is not None
    with dispatch.force_kernel("sm90"):
        assert dispatch.fused_sm90(**a, pv_int8=True) == pytest.approx(128 ** -0.5)
    with dispatch.force_kernel("triton"):
        assert dispatch.fused_sm90(**a, pv_int8=True) is None
    monkeypatch.setattr(dispatch, "SM90_AUTO_SKIPS_PV", ())
    assert dispatch.fused_sm90(**a, pv_int8=True) == pytest.approx(128 ** -0.5)


def test_functional_sends_each_preset_to_its_fused_op(fused_hopper, monkeypatch):
    """flash_quant.attention's early exit: "accurate" (default, name or object) asks for the
    16-bit P·V op, "fast" (name or object) for pv_int8, other configs never."""
    from flash_quant import functional

    asked = []
    monkeypatch.setattr(dispatch, "fused_sm90", lambda *args: asked.append(args[-1]) or None)
    monkeypatch.setattr(functional, "_CUDA_DISPATCH", [dispatch])
    a = fused_args()
    args = (a["query"], a["key"], a["value"], None, 0.0, False, None, False)
    for config, want in (("accurate", False), (None, False), (functional._ACCURATE, False), ("fast", True),
                         (functional._FAST, True), ("int4", None), ("fp16", None)):
        asked.clear()
        assert functional._fused_sm90(*args, config) is None
        assert asked == ([] if want is None else [want]), config


def test_which_kernel_names_the_fused_op(fused_hopper, monkeypatch):
    """which_kernel answers for what attention(...) runs: the accurate and the fast preset at
    head dim 128 run as the one fused sm90 op, also where the op-level policy would keep the
    fast preset's INT8 P·V on Triton (SM90_FUSED_TAKES_FAST); a call the fused op declines
    (a mask) gets the op-level answer (here the tensors' own device: they are CPU tensors)."""
    from flash_quant import functional

    monkeypatch.setattr(functional, "_is_cuda_tensor", lambda t: True)  # (CPU tensors, mocked Hopper)
    monkeypatch.setattr(dispatch, "SM90_AUTO_SKIPS_PV", ("int8",))
    monkeypatch.setattr(dispatch, "SM90_FUSED_TAKES_FAST", True)
    a = fused_args()
    q, k, v = a["query"], a["key"], a["value"]
    for preset in ("accurate", "fast"):
        assert flash_quant.which_kernel(q, k, v, config=preset, enable_gqa=True) == ("sm90", None), preset
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    assert flash_quant.which_kernel(q, k, v, attn_mask=mask, config="accurate", enable_gqa=True) == ("cpu", None)


def test_fused_grad_needs_grad_mode(fused_hopper):
    """A call on tensors that require grad is fused only where no graph is recorded."""
    a = fused_args()
    a["key"].requires_grad_()
    assert dispatch.fused_sm90(**a) is None
    with torch.no_grad():
        assert dispatch.fused_sm90(**a) is not None
