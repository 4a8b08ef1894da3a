"""HF transformers AttentionInterface registration (tiny random-weight Llama, CPU)."""
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="needs the [transformers] extra")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from flash_quant.integrations import MissingExtraError  # noqa: E402
from flash_quant.integrations.transformers_hf import register, unregister  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(attn, seed=0, **kw):
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **kw,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def names():
    registered = [register("fq_test_fp32", "fp32"), register("fq_test_accurate", "accurate")]
    yield registered
    for n in registered:
        unregister(n)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    return ids, mask


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_registered_in_both_interfaces(names):
    for n in names:
        assert n in ALL_ATTENTION_FUNCTIONS and n in ALL_MASK_ATTENTION_FUNCTIONS


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_sdpa(names, padded):
    ref = tiny("sdpa")
    ids, mask = batch()
    mask = mask if padded else None
    keep = mask.bool() if padded else torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        expect = ref(ids, attention_mask=mask).logits
        fp32 = tiny("fq_test_fp32")
        fp32.load_state_dict(ref.state_dict())
        torch.testing.assert_close(fp32(ids, attention_mask=mask).logits[keep], expect[keep], atol=1e-4, rtol=1e-4)
        acc = tiny("fq_test_accurate")
        acc.load_state_dict(ref.state_dict())
        assert cosine(acc(ids, attention_mask=mask).logits[keep], expect[keep]) >= 0.99


def test_generate_with_cache_matches_sdpa(names):
    """Prefill (causal, GQA) then one-token decode steps against the KV cache."""
    ref = tiny("sdpa")
    fq = tiny("fq_test_fp32")
    fq.load_state_dict(ref.state_dict())
    ids, mask = batch()
    with torch.no_grad():
        a = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        b = fq.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_set_attn_implementation_switches(names):
    model = tiny("sdpa")
    ids, _ = batch()
    with torch.no_grad():
        expect = model(ids).logits
        model.set_attn_implementation("fq_test_fp32")
        assert model.config._attn_implementation == "fq_test_fp32"
        torch.testing.assert_close(model(ids).logits, expect, atol=1e-4, rtol=1e-4)


def test_training_dropout_is_a_clear_error(names):
    model = tiny("fq_test_fp32", attention_dropout=0.1).train()
    ids, _ = batch()
    with pytest.raises(ValueError, match="no dropout"):
        model(ids)


def test_names_with_flash_refused():
    with pytest.raises(ValueError, match="contains 'flash'"):
        register("flash_quant")
    with pytest.raises(ValueError, match="reserved"):
        register("sdpa")


def test_missing_transformers_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name == "transformers" or name.startswith("transformers."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"pip install '\.\[transformers\]'"):
        register("fq_never")


def test_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("hf_llama", ROOT / "examples" / "hf_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cos = mod.main(["--seq", "32", "--new-tokens", "3"])
    assert cos >= 0.99
    assert "logits cosine" in capsys.readouterr().out
