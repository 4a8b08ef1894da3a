"""Non-finite inputs on the unquantized presets give SDPA's result (docs/op_contract.md,
"Non-finite values"): the same NaN / inf pattern as torch's math SDPA backend in float64,
in the output, the lse and the three gradients, on every CPU instruction set (each in
its own process: the tile primitives are chosen once per process).

Before this, the AVX2 / AVX-512 kernels dropped a NaN key and treated a NaN mask entry
as masked, and the portable ones turned a NaN query row into zeros.
"""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_quant

NAN, INF = float("nan"), float("inf")
B, H, S, D = 1, 2, 96, 32  # S > one 64-key tile: the causal tile skip and the padding matter
PRESETS = ("fp32", "fp16", "bf16")
ISAS = ("generic", "avx2", "best")  # "best": AVX-512 VNNI where the CPU has it
# Finite entries against the float64 reference, relative to the reference's largest.
FINITE_TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}


@functools.lru_cache(maxsize=None)
def _seed():
    """Fresh inputs each run (drawn from conftest's per-test seed, printed on failure),
    one seed shared by this process and the per-ISA subprocesses."""
    return int(torch.randint(2**31 - 1, ()))


def _base(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g) for _ in range(3)]


def _bool_mask():
    return torch.ones(S, S, dtype=torch.bool)


def _float_mask():
    return torch.zeros(S, S)


def _case(name, seed):
    """(q, k, v, attn_mask, is_causal) of one named case: the non-finite entries at fixed
    places, the rest random from `seed`."""
    q, k, v = _base(seed)
    mask, causal = None, False
    if name == "nan_q":
        q[0, 0, 5, 3] = NAN
    elif name == "nan_q_causal":
        q[0, 1, 70, 0] = NAN
        causal = True
    elif name == "nan_k":
        k[0, 1, 70, 0] = NAN
    elif name == "nan_k_causal":  # after every row of the first query tile
        k[0, 0, 90, 1] = NAN
        causal = True
    elif name == "nan_k_bool_masked":  # SDPA adds the bool mask's -inf: NaN stays NaN
        k[0, 0, 70, 2] = NAN
        mask = _bool_mask()
        mask[:, 70] = False
    elif name == "nan_v":
        v[0, 0, 20, 4] = NAN
    elif name == "nan_v_causal":
        v[0, 1, 90, 4] = NAN
        causal = True
    elif name == "nan_float_mask":
        mask = _float_mask()
        mask[5, 10] = NAN
    elif name == "posinf_float_mask":
        mask = _float_mask()
        mask[7, 3] = INF
    elif name == "posinf_k":  # +inf score where q > 0 (row NaN), -inf where q < 0
        k[0, 0, 40, 2] = INF
    elif name == "neginf_q":
        q[0, 1, 8, 2] = -INF
    elif name == "posinf_v":
        v[0, 0, 30, 1] = INF
    elif name == "masked_row":  # every key masked: zeros
        mask = _bool_mask()
        mask[3] = False
    elif name == "masked_row_float":
        mask = _float_mask()
        mask[3] = -INF
    elif name == "masked_row_nan_v":  # its P = 0 still meets V: 0 * NaN
        mask = _bool_mask()
        mask[3] = False
        v[0, 0, 50, 0] = NAN
    else:
        raise KeyError(name)
    return q, k, v, mask, causal


CASES = ("nan_q", "nan_q_causal", "nan_k", "nan_k_causal", "nan_k_bool_masked", "nan_v", "nan_v_causal",
         "nan_float_mask", "posinf_float_mask", "posinf_k", "neginf_q", "posinf_v", "masked_row",
         "masked_row_float", "masked_row_nan_v")


def _grad_out(seed):
    return torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(seed + 1))


def run_flash_quant(name, preset, seed):
    """(out, lse, dq, dk, dv) of flash_quant on case `name` with `preset`."""
    q, k, v, mask, causal = _case(name, seed)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = flash_quant.attention_with_lse(q, k, v, attn_mask=mask, is_causal=causal, config=preset)
    out.backward(_grad_out(seed))
    return [t.detach().float() for t in (out, lse, q.grad, k.grad, v.grad)]


def reference(name, preset, seed):
    """(out, lse, dq, dk, dv) of torch's math SDPA in float64 on the preset's rounding of
    the inputs; lse = m + log(sum(exp(s - m))) in IEEE arithmetic (-inf for a row whose
    scores are all -inf)."""
    q, k, v, mask, causal = _case(name, seed)
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[preset]
    q, k, v = (t.to(dt).double().requires_grad_(True) for t in (q, k, v))
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m64, is_causal=causal)
    out.backward(_grad_out(seed).double())
    with torch.no_grad():
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        if causal:
            s = s + torch.zeros(S, S, dtype=torch.float64).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -INF)
        if m64 is not None:
            s = s + (torch.zeros(S, S, dtype=torch.float64).masked_fill(~m64, -INF) if m64.dtype == torch.bool else m64)
        mx = s.amax(-1, keepdim=True)  # amax propagates NaN
        dead = (mx == -INF).squeeze(-1)
        lse = (mx + torch.log(torch.exp(s - mx).sum(-1, keepdim=True))).squeeze(-1)
        lse = lse.masked_fill(dead, -INF)
    return [out.detach(), lse, q.grad, k.grad, v.grad]


_ISA_SCRIPT = r"""
import sys, torch
sys.path[:0] = [%r, %r]  # this flash_quant (repository root), then the tests
import test_nan_semantics as t
seed = int(sys.argv[2])
torch.save({(c, p): t.run_flash_quant(c, p, seed) for c in t.CASES for p in t.PRESETS}, sys.argv[1])
"""


@functools.lru_cache(maxsize=None)
def _isa_results(isa, seed):
    """Every case × preset computed in a subprocess with FLASH_QUANT_CPU_ISA=isa."""
    env = dict(os.environ)
    env.pop("FLASH_QUANT_CPU_ISA", None)
    if isa != "best":
        env["FLASH_QUANT_CPU_ISA"] = isa
    tests = os.path.dirname(os.path.abspath(__file__))
    script = _ISA_SCRIPT % (os.path.dirname(tests), tests)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res.pt")
        p = subprocess.run([sys.executable, "-c", script, path, str(seed)], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        return torch.load(path)


def assert_same_pattern(got, ref, preset, what):
    """NaN, +inf and -inf at the same places; the finite entries close."""
    for test, label in ((torch.isnan, "NaN"), (torch.isposinf, "+inf"), (torch.isneginf, "-inf")):
        g, r = test(got), test(ref)
        assert torch.equal(g, r), (
            f"{what}: {label} pattern differs from SDPA at {int((g != r).sum())} entries "
            f"(flash_quant {int(g.sum())}, SDPA {int(r.sum())})")
    fin = torch.isfinite(ref)
    if fin.any():
        err = (got[fin].double() - ref[fin]).abs().max().item()
        assert err <= FINITE_TOL[preset] * (1 + ref[fin].abs().max().item()), f"{what}: finite entries off by {err}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", CASES)
def test_cpu_non_finite_matches_sdpa(name, preset, isa):
    got = _isa_results(isa, _seed())[(name, preset)]
    ref = reference(name, preset, _seed())
    for g, r, what in zip(got, ref, ("out", "lse", "dq", "dk", "dv")):
        assert_same_pattern(g, r, preset, f"{name}/{preset}/{isa} {what}")


def test_reference_cases_are_non_finite():
    """Guard on the cases themselves: each one but the masked-row ones puts a NaN or inf
    into SDPA's output or gradients, so the pattern checks above check something."""
    for name in CASES:
        ref = reference(name, "fp32", _seed())
        if name in ("masked_row", "masked_row_float"):
            assert (ref[0][0, 0, 3] == 0).all() and all(torch.isfinite(t).all() for t in ref[2:])
        else:
            assert any(not torch.isfinite(t).all() for t in ref), name


@pytest.mark.parametrize("preset", ("accurate", "fast", "int4", "fp8"))
@pytest.mark.parametrize("where", ("q", "k"))
@pytest.mark.parametrize("bad", (NAN, INF))
def test_quantized_presets_refuse_non_finite_qk(preset, where, bad):
    """Quantized presets keep their clear error: a scale cannot be taken of inf / NaN."""
    q, k, v = _base(_seed())
    (q if where == "q" else k)[0, 0, 3, 1] = bad
    with pytest.raises((RuntimeError, ValueError), match="non-finite"):
        flash_quant.attention(q, k, v, config=preset)
