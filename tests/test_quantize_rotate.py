"""flash_quant::quantize(..., rotate=True) on CPU: the op quantizes x @ H, H the
orthonormal (block-diagonal) Hadamard matrix of flash_quant.rotation.hadamard_matrix(D).

The reference is the op itself, rotate=False, applied to x @ H computed in float64 and
rounded once to float32. The kernel rotates in float32, so an element may sit on the
other side of a rounding boundary: codes may differ by one step, rarely; scales and means
agree to float32 rounding.
"""
from __future__ import annotations

import pytest
import torch

import flash_quant.ops  # noqa: F401  (schemas, CPU kernels, fake kernels, autograd)
from flash_quant.rotation import hadamard_matrix, rotate, unrotate
from flash_quant.testing import group_reduce

ops = torch.ops.flash_quant
QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
QMIN = {"int8": -128.0, "int4": -8.0}
F8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# one float8 step relative to the value (mantissa bits), and the subnormal step
F8_REL = {"fp8_e4m3": 2.0**-3, "fp8_e5m2": 2.0**-2}
F8_SUB = {"fp8_e4m3": 2.0**-9, "fp8_e5m2": 2.0**-16}
GRANS = ["per_token", "per_block", "per_head", "per_channel", "per_tensor"]
BLOCK = 16
DIMS = [16, 24, 64, 96, 128, 136, 256]  # 24, 96, 136: block-diagonal H (blocks 8, 32, 8)


def rotated_ref(x: torch.Tensor) -> torch.Tensor:
    """x @ H in float64, rounded once to float32."""
    return rotate(x.double()).float()


def make_x(shape, dtype, gen):
    # a per-channel offset (what smoothing removes) and one outlier channel
    x = torch.randn(shape, generator=gen) * 2 + torch.randn(shape[-1], generator=gen)
    x[..., 3] *= 8
    return x.to(dtype)


def int_codes(data, prec):
    if prec == "int4":
        b = data.to(torch.int32)
        lo = ((b & 15) ^ 8) - 8
        hi = (((b >> 4) & 15) ^ 8) - 8
        return torch.stack([lo, hi], -1).flatten(-2)
    return data.to(torch.int32)


def expand_rows(t, shape):
    """A group tensor broadcast to `shape` (per_block: BLOCK rows per group)."""
    if t.dim() >= 2 and 1 < t.shape[-2] != shape[-2]:
        t = t.repeat_interleave(BLOCK, -2)[..., : shape[-2], :]
    return t.expand(shape)


def assert_matches_rotated_reference(x, prec, gran, strat, smooth):
    got = ops.quantize(x, prec, gran, BLOCK, strat, smooth, True)
    ref = ops.quantize(rotated_ref(x), prec, gran, BLOCK, strat, smooth, False)
    d, s, z, m = got
    rd, rs, rz, rm = ref
    what = f"{tuple(x.shape)} {x.dtype} {prec} {gran} {strat} smooth={smooth}"
    assert d.shape == rd.shape and d.dtype == rd.dtype and s.shape == rs.shape and m.shape == rm.shape, what
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0, msg=lambda e: f"{what}: scale {e}")
    if smooth:
        # relative to the values' magnitude: a mean near 0 has no relative precision
        torch.testing.assert_close(m, rm, rtol=1e-5, atol=1e-5 * rm.abs().max().item(),
                                   msg=lambda e: f"{what}: mean {e}")
    else:
        assert m.numel() == 0
    n = x.numel()
    # rounding boundaries (exact ties are common for bf16 inputs): a few elements only
    allowed = max(8, n // 200)
    if prec in F8:
        a, b = d.float(), rd.float()  # in units of the (equal up to rounding) scales
        one_step = F8_REL[prec] * torch.maximum(a.abs(), b.abs()) + F8_SUB[prec]
        assert bool(((a - b).abs() <= one_step).all()), f"{what}: fp8 values more than one step apart"
        assert int((a != b).sum()) <= allowed, f"{what}: {int((a != b).sum())} of {n} fp8 values differ"
    else:
        dz = (z - rz).abs()
        assert int(dz.max()) <= 1 and int((dz != 0).sum()) <= max(1, z.numel() // 100), what
        # centered codes: a zero point one off shifts its whole group by one code
        ca = int_codes(d, prec) - expand_rows(z, x.shape)
        cb = int_codes(rd, prec) - expand_rows(rz, x.shape)
        diff = (ca - cb).abs()
        assert int(diff.max()) <= 1, f"{what}: codes differ by {int(diff.max())}"
        assert int((diff != 0).sum()) <= allowed, f"{what}: {int((diff != 0).sum())} of {n} codes differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prec", ["int8", "int4", "fp8_e4m3"])
@pytest.mark.parametrize("D", DIMS)
def test_rotate_equals_quantizing_rotated_input(D, prec, dtype):
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    strategies = ["symmetric"] + (["asymmetric"] if prec in QMIN else [])
    for shape in [(37, D), (3, 21, D), (2, 2, 19, D)]:
        x = make_x(shape, dtype, gen)
        for gran in GRANS:
            if gran == "per_head" and len(shape) < 3:
                continue
            for smooth in (False, True):
                for strat in strategies:
                    assert_matches_rotated_reference(x, prec, gran, strat, smooth)


def test_rotate_is_not_ignored():
    """The comparison above would fail if the kernel ignored rotate (outputs differ)."""
    x = make_x((4, 9, 64), torch.float32, torch.Generator().manual_seed(0))
    d, s, z, m = ops.quantize(x, "int8", "per_token", 1, "symmetric", True, True)
    d0, s0, z0, m0 = ops.quantize(x, "int8", "per_token", 1, "symmetric", True, False)
    assert not torch.allclose(s, s0, rtol=1e-3) and not torch.allclose(m, m0, atol=1e-3)
    # the default is rotate=False
    for a, b in zip(ops.quantize(x, "int8", "per_token", 1, "symmetric", True), (d0, s0, z0, m0)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("D", [8, 24, 40, 64, 96])
def test_rotation_matrix_sign_pattern_and_blocks(D):
    """x = I: per_channel int8 codes of H are exactly 127 * sign(H) (entries are ±1/sqrt(b)
    inside the blocks, 0 outside), which pins the Sylvester sign convention and the
    block-diagonal layout."""
    h = hadamard_matrix(D, dtype=torch.float64)
    block = D & -D
    d, s, z, _ = ops.quantize(torch.eye(D), "int8", "per_channel", 1, "symmetric", False, True)
    assert torch.equal(d.to(torch.int64), (127 * torch.sign(h)).to(torch.int64))
    torch.testing.assert_close(s, torch.full((1, D), block**-0.5 / 127), rtol=1e-6, atol=0)
    # Sylvester: H_2n = [[H, H], [H, -H]], so the first row and column are all positive
    assert bool((d[0, :block] == 127).all()) and bool((d[:block, 0] == 127).all())
    assert d[block - 1, block - 1].item() == (127 if bin(block - 1).count("1") % 2 == 0 else -127)


def test_rank1_noncontiguous_and_dequantize_round_trip():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(48, generator=gen)
    assert_matches_rotated_reference(v, "int8", "per_token", "symmetric", False)
    assert_matches_rotated_reference(v, "int8", "per_tensor", "symmetric", False)
    xt = torch.randn(2, 40, 7, generator=gen).transpose(-1, -2)  # (2, 7, 40), strided
    assert not xt.is_contiguous()
    for gran in GRANS:
        assert_matches_rotated_reference(xt, "int8", gran, "symmetric", True)
    # dequantize gives the rotated values (within half a step); unrotate recovers x
    x = torch.randn(3, 11, 96, generator=gen)
    d, s, z, m = ops.quantize(x, "int8", "per_token", 1, "symmetric", True, True)
    y = ops.dequantize(d, s, z, m, "int8", 1, torch.float32)
    assert bool(((y - rotated_ref(x)).abs() <= s * 0.5 * (1 + 1e-4) + 1e-6).all())
    assert (unrotate(y) - x).abs().max() < 0.02 * x.abs().max()


def test_rotation_overflow_raises():
    """Finite x whose rotation overflows float32 is caught like a non-finite x (the bad
    argument cases with rotate=True: test_cpu_kernels.py::test_quantize_errors)."""
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.quantize(torch.full((2, 4), 3e38), "int8", "per_tensor", 1, "symmetric", False, True)



@pytest.mark.parametrize(
    "prec,gran,bs,strat,smooth",
    [
        ("int8", "per_token", 1, "symmetric", True),
        ("int4", "per_block", 4, "asymmetric", False),
        ("fp8_e4m3", "per_channel", 1, "symmetric", True),
        ("int8", "per_head", 1, "symmetric", False),
    ],
)
def test_opcheck_rotate(prec, gran, bs, strat, smooth):
    x = torch.randn(2, 3, 10, 24)
    args = (x, prec, gran, bs, strat, smooth, True)
    torch.library.opcheck(ops.quantize.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                      "test_aot_dispatch_dynamic"))
    # (the aot tests sum every output for a backward, which fails on the integer data
    # output when x requires grad: the autograd registration is checked on its own)
    torch.library.opcheck(ops.quantize.default, (x.requires_grad_(),) + args[1:],
                          test_utils=("test_autograd_registration",))
    # the fake kernel agrees on shapes and dtypes with rotate given as a keyword too
    from torch._subclasses.fake_tensor import FakeTensorMode
    xd = x.detach()
    with FakeTensorMode() as mode:
        fake = ops.quantize(mode.from_tensor(xd), prec, gran, bs, strat, smooth, rotate=True)
    real = ops.quantize(xd, prec, gran, bs, strat, smooth, rotate=True)
    for f, r in zip(fake, real):
        assert f.shape == r.shape and f.dtype == r.dtype


# ------------------------------------------------------------------------------ autograd


def ref_stats(x64, prec, gran, bs, strat, smooth):
    """scale and mean of quantize(x, rotate=True) as plain float64 torch ops."""
    y = x64 @ hadamard_matrix(x64.shape[-1], dtype=torch.float64)
    mean = y.mean(-2, keepdim=True)
    if smooth:
        y = y - mean
    if strat == "asymmetric":
        hi = group_reduce(y, gran, bs, torch.amax).clamp_min(0)
        lo = group_reduce(y, gran, bs, torch.amin).clamp_max(0)
        scale = (hi - lo) / (QMAX[prec] - QMIN[prec])
    else:
        scale = group_reduce(y.abs(), gran, bs, torch.amax) / QMAX[prec]
    return scale, mean


@pytest.mark.parametrize("D", [16, 24])
def test_mean_gradient_is_exact(D):
    """mean(x @ H) is linear: its gradient is (w / S) @ Hᵀ, whatever the quantization."""
    x = torch.randn(2, 7, D, requires_grad=True)
    _, _, _, m = ops.quantize(x, "int8", "per_token", 1, "symmetric", True, True)
    w = torch.randn_like(m)
    (g,) = torch.autograd.grad((m * w).sum(), x)
    h = hadamard_matrix(D, dtype=torch.float64)
    expected = ((w.double() / x.shape[-2]).expand(x.shape) @ h.t()).float()
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-7)
    # ignoring the rotation would give the unrotated (w / S): not this
    assert not torch.allclose(g, (w / x.shape[-2]).expand(x.shape), atol=1e-3)
    # the forward value too
    _, ref_m = ref_stats(x.detach().double(), "int8", "per_token", 1, "symmetric", True)
    torch.testing.assert_close(m.double(), ref_m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D", [16, 24, 64])
@pytest.mark.parametrize(
    "prec,strat",
    [("int8", "symmetric"), ("int4", "asymmetric"), ("fp8_e4m3", "symmetric")],
)
def test_scale_and_mean_gradients_match_plain_torch(D, prec, strat):
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    for gran in GRANS:
        for smooth in (False, True):
            x = make_x((2, 3, 13, D), torch.float32, gen).requires_grad_()
            _, s, _, m = ops.quantize(x, prec, gran, 4, strat, smooth, True)
            ws, wm = torch.randn(s.shape, generator=gen), torch.randn(m.shape, generator=gen)
            (g,) = torch.autograd.grad((s * ws).sum() + (m * wm).sum(), x)
            x64 = x.detach().double().requires_grad_()
            rs, rm = ref_stats(x64, prec, gran, 4, strat, smooth)
            torch.testing.assert_close(s.double(), rs.detach(), rtol=1e-5, atol=0)
            loss = (rs * ws.double()).sum() + ((rm * wm.double()).sum() if smooth else 0)
            (rg,) = torch.autograd.grad(loss, x64)
            torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-6,
                                       msg=lambda e: f"{gran} smooth={smooth}: {e}")


def test_gradient_dtype_and_default_rotate_false():
    x = torch.randn(2, 9, 24, dtype=torch.bfloat16, requires_grad=True)
    _, s, _, m = ops.quantize(x, "int8", "per_token", 1, "symmetric", True, True)
    (g,) = torch.autograd.grad(s.sum() + m.sum(), x)
    assert g.dtype == torch.bfloat16 and g.shape == x.shape
    # rotate omitted (the default) still differentiates, without the rotation
    x = torch.randn(2, 9, 24, requires_grad=True)
    _, _, _, m = ops.quantize(x, "int8", "per_token", 1, "symmetric", True)
    (g,) = torch.autograd.grad(m.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 1 / 9))
