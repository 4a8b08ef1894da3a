"""Routing F.scaled_dot_product_attention to flash_quant."""
import logging

import pytest
import torch
import torch.nn.functional as F

from flash_quant.integrations import (
    disable_sdpa_routing,
    enable_sdpa_routing,
    reset_sdpa_routing_stats,
    route_sdpa,
    sdpa_routing_enabled,
    sdpa_routing_stats,
)

ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def clean():
    reset_sdpa_routing_stats()
    yield
    disable_sdpa_routing()
    assert F.scaled_dot_product_attention is ORIGINAL


def qkv(b=2, h=4, s=24, d=32, dtype=torch.float32, hk=None):
    g = torch.Generator().manual_seed(0)
    hk = hk or h
    return (
        torch.randn(b, h, s, d, generator=g, dtype=dtype),
        torch.randn(b, hk, s, d, generator=g, dtype=dtype),
        torch.randn(b, hk, s, d, generator=g, dtype=dtype),
    )


def test_not_on_by_import_and_restored_exactly():
    import flash_quant.integrations  # noqa: F401

    assert F.scaled_dot_product_attention is ORIGINAL and not sdpa_routing_enabled()
    with route_sdpa("fp32"):
        assert F.scaled_dot_product_attention is not ORIGINAL and sdpa_routing_enabled()
        with route_sdpa("accurate"):  # nests
            assert sdpa_routing_enabled()
        assert sdpa_routing_enabled()
    assert F.scaled_dot_product_attention is ORIGINAL
    enable_sdpa_routing("fp32")
    enable_sdpa_routing("fp32")  # idempotent
    disable_sdpa_routing()
    assert F.scaled_dot_product_attention is ORIGINAL


def test_restored_after_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with route_sdpa("fp32"):
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL


def test_routed_matches_sdpa():
    q, k, v = qkv()
    mask = torch.rand(2, 1, 24, 24) > 0.2
    mask[..., 0] = True
    expect = ORIGINAL(q, k, v, attn_mask=mask)
    expect_causal = ORIGINAL(q, k, v, is_causal=True)
    with route_sdpa("fp32"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out_causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=None)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_causal, expect_causal, atol=2e-5, rtol=1e-4)
    assert sdpa_routing_stats() == {"routed": 2, "fallback": {}}


def test_routed_gqa_and_accurate():
    q, k, v = qkv(h=8, hk=2)
    expect = ORIGINAL(q, k, v, enable_gqa=True)
    with route_sdpa("accurate"):
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    err = ((out - expect).norm() / expect.norm()).item()
    assert err < 0.02, err
    assert sdpa_routing_stats()["routed"] == 1


def test_module_calling_sdpa_is_routed():
    """A model that calls F.scaled_dot_product_attention at run time (here torch's own
    nn.MultiheadAttention) goes through flash_quant and keeps its results."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 2, batch_first=True)
    x = torch.randn(2, 10, 64, requires_grad=True)
    expect = mha(x, x, x, need_weights=False)[0]
    with route_sdpa("fp32"):
        out = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    assert sdpa_routing_stats()["routed"] == 1


FALLBACKS = {
    "dropout": lambda: (qkv(), {"dropout_p": 0.1}),
    "rank": lambda: ((torch.randn(4, 8, 32),) * 3, {}),
    "dtype": lambda: ((torch.randn(1, 2, 8, 32, dtype=torch.float64),) * 3, {}),
    "head_dim": lambda: ((torch.randn(1, 2, 8, 12),) * 3, {}),
    "mask": lambda: (qkv(), {"attn_mask": torch.ones(24, 24, dtype=torch.bool), "is_causal": False, "_int": True}),
}


@pytest.mark.parametrize("reason", sorted(FALLBACKS))
def test_fallbacks_visible(reason, caplog):
    args, kw = FALLBACKS[reason]()
    if kw.pop("_int", False):
        kw["attn_mask"] = kw["attn_mask"].to(torch.int32)  # neither bool nor float
    if reason == "dropout":
        torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="flash_quant.integrations.sdpa_routing"):
        with route_sdpa("fp32"):
            for _ in range(2):
                try:
                    out = F.scaled_dot_product_attention(*args, **kw)
                except RuntimeError:
                    out = None  # the original rejects it too (int mask): that is its answer
    stats = sdpa_routing_stats()
    assert stats["routed"] == 0
    assert stats["fallback"] == {reason: 2}
    assert sum(f"[{reason}]" in r.getMessage() for r in caplog.records) == 1  # logged once
    if reason in ("rank", "dtype", "head_dim"):
        torch.testing.assert_close(out, ORIGINAL(*args, **kw))


def test_causal_with_mask_both_apply():
    q, k, v = qkv()
    mask = torch.rand(24, 24, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    expect = ORIGINAL(q, k, v, attn_mask=mask & torch.ones(24, 24, dtype=torch.bool).tril())
    with route_sdpa("fp32"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    assert sdpa_routing_stats() == {"routed": 1, "fallback": {}}


def test_bad_config_rejected_at_enable():
    with pytest.raises(ValueError, match="unknown preset"):
        enable_sdpa_routing("int3")
    assert F.scaled_dot_product_attention is ORIGINAL


def test_disable_refuses_to_drop_foreign_patch():
    enable_sdpa_routing("fp32")
    foreign = lambda *a, **k: None  # noqa: E731
    F.scaled_dot_product_attention = foreign
    try:
        with pytest.raises(RuntimeError, match="replaced by other code"):
            disable_sdpa_routing()
    finally:
        from flash_quant.integrations import sdpa_routing

        F.scaled_dot_product_attention = sdpa_routing._routed_sdpa
    disable_sdpa_routing()


def test_compiled_routing_no_graph_break():
    q, k, v = qkv(s=16)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    expect = f(q, k, v)
    with route_sdpa("fp32"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    assert sdpa_routing_stats()["routed"] >= 1
