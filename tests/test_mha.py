"""flash_quant.nn.MultiheadAttention against torch.nn.MultiheadAttention."""
import itertools
import logging
from unittest import mock

import pytest
import torch
from torch import nn

from flash_quant.nn import (
    MultiheadAttention,
    mha_fallback_counts,
    quantize_attention,
    reset_mha_fallback_counts,
)

E, H = 64, 2  # head dim 32
N, L, S = 2, 7, 9


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_pair(config="fp32", **kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **kw).eval()
    if ref.in_proj_bias is not None:  # torch zero-initialises biases: make them matter
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = MultiheadAttention(E, H, config=config, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def inputs(batch_first, kv_dims, seq_q=L, seq_k=S, batched=True):
    g = torch.Generator().manual_seed(1)
    kd, vd = kv_dims

    def t(s, e):
        shape = ((N, s, e) if batch_first else (s, N, e)) if batched else (s, e)
        return torch.randn(shape, generator=g)

    q = t(seq_q, E)
    return q, t(seq_k, kd), t(seq_k, vd)


def masks(kind_attn, kind_kpm, seq_q, seq_k, causal):
    g = torch.Generator().manual_seed(2)
    attn = None
    if causal:
        blocked = torch.ones(seq_q, seq_k, dtype=torch.bool).triu(1)
        attn = blocked if kind_attn == "bool" else torch.zeros(seq_q, seq_k).masked_fill(blocked, float("-inf"))
    elif kind_attn in ("bool", "bool3d"):
        shape = (seq_q, seq_k) if kind_attn == "bool" else (N * H, seq_q, seq_k)
        attn = torch.rand(shape, generator=g) < 0.3
        attn[..., 0] = False  # every query keeps a visible key (torch gives NaN otherwise)
    elif kind_attn == "float":
        attn = torch.randn(seq_q, seq_k, generator=g)
    kpm = None
    if kind_kpm is not None:
        kpm = torch.zeros(N, seq_k, dtype=torch.bool)
        kpm[1, -3:] = True
        if kind_kpm == "float":
            kpm = torch.zeros(N, seq_k).masked_fill(kpm, float("-inf"))
    return attn, kpm


CASES = [
    c
    for c in itertools.product([True, False], ["same", "kvdim"], [None, "bool", "float"], [None, "bool", "float", "bool3d"], [False, True])
    if not (c[4] and c[3] not in ("bool", "float"))  # is_causal is a hint that comes with a causal attn_mask
]


@pytest.mark.parametrize("batch_first,kv,kpm_kind,attn_kind,causal", CASES)
def test_parity_fp32(batch_first, kv, kpm_kind, attn_kind, causal):
    kw = {"batch_first": batch_first}
    if kv == "kvdim":
        kw.update(kdim=24, vdim=40)
    ours, ref = make_pair("fp32", **kw)
    seq_k = L if causal else S
    q, k, v = inputs(batch_first, (kw.get("kdim", E), kw.get("vdim", E)), L, seq_k)
    if kv == "same" and not causal:
        k = v  # exercises the shared key/value projection
    attn, kpm = masks(attn_kind, kpm_kind, L, seq_k, causal)
    args = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=False, is_causal=causal)
    out, w = ours(q, k, v, **args)
    expect, _ = ref(q, k, v, **args)
    assert w is None
    assert out.shape == expect.shape
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_fp32_and_accurate(batch_first):
    ours, ref = make_pair("fp32", batch_first=batch_first)
    x = inputs(batch_first, (E, E), L, L)[0]
    attn, kpm = masks("float", "bool", L, L, False)
    expect = ref(x, x, x, key_padding_mask=kpm, attn_mask=attn, need_weights=False)[0]
    torch.testing.assert_close(ours(x, x, x, key_padding_mask=kpm, attn_mask=attn, need_weights=False)[0], expect, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_first,kv,kpm_kind,attn_kind,causal", [c for c in CASES if c[0]][::3])
def test_parity_accurate(batch_first, kv, kpm_kind, attn_kind, causal):
    """The accurate preset (INT8 Q·Kᵀ) stays within its error: rel-L2 <= 2 %."""
    kw = {"batch_first": batch_first}
    if kv == "kvdim":
        kw.update(kdim=24, vdim=40)
    ours, ref = make_pair("accurate", **kw)
    seq_k = L if causal else S
    q, k, v = inputs(batch_first, (kw.get("kdim", E), kw.get("vdim", E)), L, seq_k)
    attn, kpm = masks(attn_kind, kpm_kind, L, seq_k, causal)
    args = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=False, is_causal=causal)
    err = rel_l2(ours(q, k, v, **args)[0], ref(q, k, v, **args)[0])
    assert err <= 0.02, err


def test_accurate_longer_sequence():
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(128, 4, batch_first=True).eval()
    ours = MultiheadAttention.from_float(ref, "accurate")
    x = torch.randn(2, 200, 128)
    err = rel_l2(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])
    assert err <= 0.02, err


@pytest.mark.parametrize("average", [True, False])
def test_need_weights(average, caplog):
    reset_mha_fallback_counts()
    ours, ref = make_pair("fp32", batch_first=True)
    q, k, v = inputs(True, (E, E))
    attn, kpm = masks("bool", "bool", L, S, False)
    with caplog.at_level(logging.WARNING, logger="flash_quant.nn.multihead_attention"):
        out, w = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=average)
        ours(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=average)
    expect, w_ref = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=average)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    assert w.shape == w_ref.shape == ((N, L, S) if average else (N, H, L, S))
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-4)
    assert mha_fallback_counts() == {"need_weights": 2}
    assert sum("need_weights" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_unbatched_and_bias_kv_zero_attn():
    ours, ref = make_pair("fp32", add_bias_kv=True, add_zero_attn=True)
    q, k, v = inputs(False, (E, E), batched=False)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-2:] = True
    attn = torch.randn(H, L, S)  # unbatched 3-D mask: (heads, L, S)
    args = dict(key_padding_mask=kpm, attn_mask=attn)
    out, w = ours(q, k, v, **args)
    expect, w_ref = ref(q, k, v, **args)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-4)
    assert w.shape == (L, S + 2)


def test_state_dict_both_ways():
    for kw in ({}, {"kdim": 24, "vdim": 40}, {"bias": False}, {"add_bias_kv": True}):
        torch.manual_seed(0)
        ref = nn.MultiheadAttention(E, H, **kw)
        ours = MultiheadAttention(E, H, **kw)
        assert list(ours.state_dict()) == list(ref.state_dict()), kw
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        ours.load_state_dict(ref.state_dict())
        back = nn.MultiheadAttention(E, H, **kw)
        back.load_state_dict(ours.state_dict())
        for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), name


def test_from_float_shares_parameters():
    ref = nn.MultiheadAttention(E, H, kdim=24, vdim=40, batch_first=True, dropout=0.1).train()
    ours = MultiheadAttention.from_float(ref, "fp32")
    assert ours.training and ours.dropout == 0.1 and ours.batch_first and ours.kdim == 24
    assert ours.q_proj_weight is ref.q_proj_weight and ours.out_proj.weight is ref.out_proj.weight
    ours.eval(), ref.eval()
    q, k, v = inputs(True, (24, 40))
    torch.testing.assert_close(ours(q, k, v, need_weights=False)[0], ref(q, k, v, need_weights=False)[0], atol=2e-5, rtol=1e-4)


def test_dropout_training_takes_visible_slow_path():
    reset_mha_fallback_counts()
    ours, ref = make_pair("fp32", dropout=0.5, batch_first=True)
    q, k, v = inputs(True, (E, E))
    ours.train()
    torch.manual_seed(5)
    a = ours(q, k, v, need_weights=False)[0]
    torch.manual_seed(6)
    b = ours(q, k, v, need_weights=False)[0]
    assert not torch.allclose(a, b)  # dropout is applied
    assert mha_fallback_counts() == {"dropout": 2}
    ours.eval()  # eval: no dropout, flash_quant path, matches torch
    torch.testing.assert_close(ours(q, k, v, need_weights=False)[0], ref(q, k, v, need_weights=False)[0], atol=2e-5, rtol=1e-4)
    assert mha_fallback_counts() == {"dropout": 2}


def test_backward_matches_torch():
    ours, ref = make_pair("fp32", batch_first=True)
    q, k, v = inputs(True, (E, E))
    attn, kpm = masks("bool", "bool", L, S, False)
    ours(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=False)[0].square().sum().backward()
    ref(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=False)[0].square().sum().backward()
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_construction_errors():
    with pytest.raises(ValueError, match="head dim"):
        MultiheadAttention(36, 3)  # head dim 12
    with pytest.raises(ValueError, match="head dim"):
        MultiheadAttention(4 * 260, 4)  # head dim 260
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(64, 3)
    with pytest.raises(ValueError, match="unknown preset"):
        MultiheadAttention(64, 2, config="int3")


def test_forward_errors():
    m = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(L, L + 1), need_weights=False)
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.int64), need_weights=False)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_layers(norm_first):
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(E, H, dim_feedforward=96, batch_first=True, norm_first=norm_first).eval()
    dec = nn.TransformerDecoderLayer(E, H, dim_feedforward=96, batch_first=True, norm_first=norm_first).eval()
    model = nn.ModuleDict({"enc": enc, "dec": dec})
    import copy

    ref = copy.deepcopy(model)
    report = quantize_attention(model, "fp32")
    assert sorted(report.replaced) == ["dec.multihead_attn", "dec.self_attn", "enc.self_attn"]
    src, tgt = torch.randn(N, S, E), torch.randn(N, L, E)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    calls = []
    real_forward = MultiheadAttention.forward

    def spy(self, *a, **kw):
        calls.append(kw.get("need_weights"))
        return real_forward(self, *a, **kw)

    with torch.no_grad(), mock.patch.object(MultiheadAttention, "forward", spy):
        mem = model["enc"](src, src_key_padding_mask=kpm)  # eval + no_grad: torch's fused fast path
        out = model["dec"](tgt, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kpm)
    assert calls == [False, False, False]  # our module ran, never the fused path
    with torch.no_grad():
        mem_ref = ref["enc"](src, src_key_padding_mask=kpm)
        out_ref = ref["dec"](tgt, mem_ref, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kpm)
    # torch's fast path zeroes padded rows of the encoder output (nested tensors); compare the rest
    keep = ~kpm
    torch.testing.assert_close(mem[keep], mem_ref[keep], atol=5e-5, rtol=1e-4)
    with torch.no_grad():
        out_ref = ref["dec"](tgt, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kpm)
    torch.testing.assert_close(out, out_ref, atol=5e-5, rtol=1e-4)


def test_quantize_attention_full_transformer():
    torch.manual_seed(0)
    model = nn.Transformer(E, H, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=96, batch_first=True).eval()
    import copy

    ref = copy.deepcopy(model)
    report = quantize_attention(model, "fp32")
    assert len(report.replaced) == 2 + 2 and not report.skipped
    assert any("use_nested_tensor" in n for n in report.notes)
    assert "replaced 4" in str(report)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    src, tgt = torch.randn(N, S, E), torch.randn(N, L, E)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    torch.testing.assert_close(model(src, tgt, tgt_mask=mask), ref(src, tgt, tgt_mask=mask), atol=5e-5, rtol=1e-4)


def test_quantize_attention_unsupported_and_shared():
    shared = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": shared, "b": shared, "bad": nn.MultiheadAttention(36, 3)})
    with pytest.raises(ValueError, match="cannot convert bad"):
        quantize_attention(model, "fp32")
    model = nn.ModuleDict({"a": shared, "b": shared, "bad": nn.MultiheadAttention(36, 3)})
    report = quantize_attention(model, "fp32", on_unsupported="skip")
    assert report.replaced == ["a", "b"] and report.skipped[0][0] == "bad"
    assert model["a"] is model["b"] and isinstance(model["a"], MultiheadAttention)
    assert type(model["bad"]) is nn.MultiheadAttention
    with pytest.raises(TypeError, match="from_float"):
        quantize_attention(nn.MultiheadAttention(E, H))


def test_fully_masked_rows_match_torch_need_weights_false():
    """The docstring's claim, checked against the installed torch: a query row with every
    key masked gives zeros here, as torch's need_weights=False (SDPA) path does; torch's
    need_weights=True path gives NaN."""
    ours, ref = make_pair("fp32", batch_first=True)
    q, k, v = inputs(True, (E, E))
    mask = torch.zeros(L, S, dtype=torch.bool)
    mask[3] = True  # True = not allowed: row 3 sees no key
    with torch.no_grad():
        got, _ = ours(q, k, v, attn_mask=mask, need_weights=False)
        want, _ = ref(q, k, v, attn_mask=mask, need_weights=False)
        weighted, _ = ref(q, k, v, attn_mask=mask, need_weights=True)
    bias_only = ref.out_proj.bias.expand_as(want[:, 3])  # out_proj of a zero attention row
    torch.testing.assert_close(want[:, 3], bias_only)
    assert torch.isnan(weighted[:, 3]).all()
    torch.testing.assert_close(got[:, 3], bias_only)
    assert rel_l2(got, want) < 1e-5
