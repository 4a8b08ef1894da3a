"""FlashQuantCache: a transformers Cache of quantized K/V (issue 18 item 4), on a tiny
random-weight Llama with GQA (2 layers, 4 query / 2 kv heads, head dim 64) on CPU.

Bars (issue 18): decode logits close to SDPA over DynamicCache, at <= 0.6x (int8) /
0.35x (int4) of DynamicCache's bytes. Each model is built from a fresh config
(transformers' _from_config writes the attention implementation into the config it is
given) and fresh random weights (conftest's seed).
"""
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="needs the [transformers] extra")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig  # noqa: E402

from flash_quant.integrations import MissingExtraError  # noqa: E402
from flash_quant.integrations import hf_cache_attention, transformers_hf  # noqa: E402
from flash_quant.integrations.transformers_hf import FlashQuantCache, register, unregister  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 256

#: the issue's byte bars, against a 16-bit DynamicCache
BYTES_BAR = {"int8": 0.6, "int4": 0.35}
#: a context where both hold: the int4 cache's fixed part (a 16-bit window of k_group keys
#: and a scratch group) is paid back from max_cache_len = 677 on (head dim 64 or 128,
#: default groups; measured with QuantizedKVCache.nbytes, 2026-12-06); int8 from 30 (24 at head dim 128).
PROMPT, STEPS = 1008, 16

#: teacher-forced decode logits of a bfloat16 model, rel-L2 against the float64 model:
#: at most this many times the rel-L2 of bfloat16 SDPA over DynamicCache (measured over
#: 6 seeds: int8 1.01-1.06x, int4 3.57-3.88x)
BF16_ERROR_RATIO = {"int8": 1.5, "int4": 6.0}
#: the same with a float32 model, where the cache's quantization is the only error
#: (the issue's attention-level bars, 1 % / 5 %, applied to the logits; measured over
#: 6 seeds: int8 1.9e-3 .. 2.5e-3, int4 2.6e-2 .. 3.1e-2)
FP32_ERROR = {"int8": 1e-2, "int4": 5e-2}
#: a greedy token may differ from the reference only where the reference's top logit
#: leads the other token by less than this (logits have std ~0.3; the largest logit
#: error measured in float32 over 6 seeds: int8 3.2e-3, int4 4.3e-2)
NEAR_TIE = {"int8": 1e-2, "int4": 1e-1}


def tiny_config():
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
    )


def build(attn, state, dtype=torch.float32):
    model = LlamaForCausalLM._from_config(tiny_config(), attn_implementation=attn).eval()
    model.load_state_dict(state)
    return model.to(dtype)


@pytest.fixture(scope="module")
def name():
    # fp32 prefill: the logits then differ from SDPA's by the cache's quantization only
    registered = register("fq_cache_test", "fp32")
    yield registered
    unregister(registered)


@pytest.fixture
def weights():
    return LlamaForCausalLM._from_config(tiny_config(), attn_implementation="sdpa").state_dict()


def dynamic_nbytes(cache):
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def teacher_forced(model, ids, cache, prompt):
    """Prefill ids[:, :prompt], then one token a step: the logits of every step (B, T, V)."""
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache, use_cache=True)
        steps = [
            model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits[:, -1].double()
            for i in range(prompt, ids.shape[1])
        ]
    return torch.stack(steps, 1)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_decode_logits_close_to_sdpa_dynamic_cache_at_the_byte_bar(name, weights, precision):
    ids = torch.randint(0, VOCAB, (2, PROMPT + STEPS))
    ref = teacher_forced(build("sdpa", weights, torch.float64), ids, DynamicCache(), PROMPT)

    dynamic = DynamicCache()
    base = teacher_forced(build("sdpa", weights, torch.bfloat16), ids, dynamic, PROMPT)
    model = build(name, weights, torch.bfloat16)
    cache = FlashQuantCache(model.config, precision=precision, max_cache_len=PROMPT + STEPS)
    ours = teacher_forced(model, ids, cache, PROMPT)
    err, base_err = rel_l2(ours, ref), rel_l2(base, ref)
    assert err <= BF16_ERROR_RATIO[precision] * base_err, (precision, err, base_err)
    assert cache.get_seq_length() == PROMPT + STEPS
    assert dynamic_nbytes(dynamic) > 0
    assert cache.nbytes <= BYTES_BAR[precision] * dynamic_nbytes(dynamic), (cache.nbytes, dynamic_nbytes(dynamic))

    model32 = build(name, weights)
    cache32 = FlashQuantCache(model32.config, precision=precision, max_cache_len=PROMPT + STEPS)
    assert rel_l2(teacher_forced(model32, ids, cache32, PROMPT), ref) <= FP32_ERROR[precision]


def _assert_same_greedy(new, ref_new, ref_logits, tol):
    """Generated tokens (B, T) equal the reference's up to the first step where the
    reference's own logits (B, T, V) rank our token within `tol` of its choice (a near
    tie: beyond it the sequences legitimately part)."""
    assert new.shape == ref_new.shape and new.shape[1] > 0
    for row in range(new.shape[0]):
        differ = (new[row] != ref_new[row]).nonzero()
        if len(differ):
            step = differ[0].item()
            logits = ref_logits[row, step]
            gap = (logits[ref_new[row, step]] - logits[new[row, step]]).item()
            assert gap <= tol, f"row {row} parts from the reference at step {step} where its lead is {gap:.3g}"


def _generate(model, ids, mask, new_tokens, cache=None):
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache,
            return_dict_in_generate=True, output_logits=True,
            # every run generates all its tokens: a random model may pick EOS early in one
            # run and not in the other (a CI run of 2026-12-06 stopped one after 1 token)
            min_new_tokens=new_tokens,
        )
    return out.sequences, torch.stack(out.logits, 1).double()


def left_padded_batch(lengths):
    """Prompts of the given lengths, left-padded to the longest: (ids, mask, [prompt_i])."""
    width = max(lengths)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in lengths]
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask, prompts


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_greedy_generate_matches_sdpa_dynamic_cache(name, weights, precision):
    new_tokens = 12
    ids, mask, _ = left_padded_batch([80, 64])
    ref_tokens, ref_logits = _generate(build("sdpa", weights), ids, mask, new_tokens)
    model = build(name, weights)
    cache = FlashQuantCache(model.config, precision=precision, max_cache_len=ids.shape[1] + new_tokens)
    tokens, _ = _generate(model, ids, mask, new_tokens, cache)
    width = ids.shape[1]
    _assert_same_greedy(tokens[:, width:], ref_tokens[:, width:], ref_logits, NEAR_TIE[precision])
    assert cache.get_seq_length() == ids.shape[1] + new_tokens - 1  # the last token is not fed back


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_batched_left_padded_generate_equals_per_sequence(name, weights, precision):
    """Padding is masked: each row of a left-padded batch generates what it does alone
    (its own cache; only the quantization groups differ, so near ties may part)."""
    new_tokens = 10
    ids, mask, prompts = left_padded_batch([72, 50, 61])
    model = build(name, weights)
    width = ids.shape[1]
    batched, batched_logits = _generate(
        model, ids, mask, new_tokens, FlashQuantCache(model.config, precision=precision, max_cache_len=width + new_tokens)
    )
    for row, prompt in enumerate(prompts):
        alone_cache = FlashQuantCache(model.config, precision=precision, max_cache_len=len(prompt) + new_tokens)
        alone, alone_logits = _generate(model, prompt[None], None, new_tokens, alone_cache)
        _assert_same_greedy(batched[row:row + 1, width:], alone[:, len(prompt):], alone_logits, NEAR_TIE[precision])
        # while the tokens agree, so do the logits (first step: same prompt, both quantized)
        assert rel_l2(batched_logits[row, 0], alone_logits[0, 0]) <= FP32_ERROR[precision]


def test_decode_steps_read_the_codes_through_decode_attention(name, weights, monkeypatch):
    """Every decode step of every layer goes to decode_attention (the cache's codes), never
    to a dense attention over a dequantized copy; a prefill into the empty cache runs dense
    attention on the new 16-bit K/V only."""
    decode_calls, dense_calls = [], []
    real_decode, real_dense = hf_cache_attention.decode_attention, transformers_hf._fq_attention

    def spy_decode(q, cache, attn_mask=None, scale=None):
        decode_calls.append((q.shape[2], cache.length))
        return real_decode(q, cache, attn_mask=attn_mask, scale=scale)

    def spy_dense(q, k, v, **kw):
        dense_calls.append((q.shape[2], k.shape[2]))
        return real_dense(q, k, v, **kw)

    monkeypatch.setattr(hf_cache_attention, "decode_attention", spy_decode)
    monkeypatch.setattr(transformers_hf, "_fq_attention", spy_dense)
    model = build(name, weights)
    ids, mask, _ = left_padded_batch([40, 33])
    cache = FlashQuantCache(model.config, precision="int4", max_cache_len=48)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, past_key_values=cache)
    layers = tiny_config().num_hidden_layers
    assert dense_calls == [(40, 40)] * layers
    assert decode_calls == [(1, 40 + step) for step in range(1, 5) for _ in range(layers)]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_query_blocks_after_the_prompt(name, weights, precision, monkeypatch):
    """Chunks after a prefill: 5 queries (speculative verification: decode_attention,
    bottom-right causal) and 20 (a later prefill chunk: one dequantized copy), then a
    decode step; logits against SDPA over DynamicCache fed the same chunks."""
    dequantized = []
    real = hf_cache_attention.attention_over_cache

    def spy(layer, query, *args):
        if query.shape[2] > hf_cache_attention.DECODE_MAX_QUERIES and layer.get_seq_length() > query.shape[2]:
            dequantized.append(query.shape[2])
        return real(layer, query, *args)

    monkeypatch.setattr(transformers_hf, "attention_over_cache", spy)
    ids = torch.randint(0, VOCAB, (2, 126))
    chunks = [(0, 100), (100, 105), (105, 125), (125, 126)]

    def run(model, cache):
        with torch.no_grad():
            return torch.cat([model(ids[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in chunks], 1)

    ref = run(build("sdpa", weights, torch.float64), DynamicCache())
    model = build(name, weights)
    ours = run(model, FlashQuantCache(model.config, precision=precision, max_cache_len=126))
    assert dequantized == [20] * tiny_config().num_hidden_layers
    assert rel_l2(ours[:, 100:], ref[:, 100:]) <= FP32_ERROR[precision]
    torch.testing.assert_close(ours[:, :100], ref[:, :100].float(), atol=1e-4, rtol=1e-4)  # prefill: exact K/V


@pytest.mark.parametrize("q_len", [5, 20])
def test_query_blocks_without_a_mask_are_bottom_right_causal(q_len):
    """Without a mask (a caller other than transformers' masking), queries after cached
    tokens are the newest ones: against fp64 attention over the dequantized cache."""
    import flash_quant
    from flash_quant.decode import reference_attention
    from flash_quant.integrations.transformers_cache import FlashQuantLayer

    layer = FlashQuantLayer(64, "int4")
    layer.update(torch.randn(2, 2, 30, 64), torch.randn(2, 2, 30, 64))
    layer.mark_read()
    k, v = torch.randn(2, 2, q_len, 64), torch.randn(2, 2, q_len, 64)
    key, value = layer.update(k, v)
    q = torch.randn(2, 4, q_len, 64)

    def dense(q, k, v, mask, causal):
        return flash_quant.attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True, config="fp32")

    out = hf_cache_attention.attention_over_cache(layer, q, key, value, None, True, None, dense)
    k_all, v_all = layer.quantized.dequantize()
    expect = reference_attention(q, k_all, v_all, None, None, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)


def test_another_attention_is_refused_after_the_exact_prefill(weights):
    """SDPA would see only the new tokens of a FlashQuantCache: its prefill (all keys new)
    is right, the next step is refused with the fix."""
    model = build("sdpa", weights)
    ids = torch.randint(0, VOCAB, (1, 12))
    cache = FlashQuantCache(model.config, precision="int8", max_cache_len=16)
    with torch.no_grad():
        first = model(ids, past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(first, model(ids).logits)
        with pytest.raises(RuntimeError, match=r"register\(\)"):
            model(ids[:, :1], past_key_values=cache, use_cache=True)


def test_bad_arguments_are_clear_errors(name, weights):
    cfg = tiny_config()
    with pytest.raises(ValueError, match="max_cache_len"):
        FlashQuantCache(cfg, precision="int8")
    with pytest.raises(ValueError, match="max_cache_len"):
        FlashQuantCache(cfg, precision="int8", max_cache_len=0)
    with pytest.raises(ValueError, match="precision"):
        FlashQuantCache(cfg, precision="int2", max_cache_len=8)
    sliding = MistralConfig(num_hidden_layers=2, sliding_window=16, hidden_size=64, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="sliding_attention"):
        FlashQuantCache(sliding, precision="int8", max_cache_len=8)
    model = build(name, weights)
    cache = FlashQuantCache(model.config, precision="int8", max_cache_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len=8"):
        model(torch.randint(0, VOCAB, (1, 9)), past_key_values=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(-1)


def test_reset_and_reorder(name, weights):
    model = build(name, weights)
    ids = torch.randint(0, VOCAB, (2, 20))
    cache = FlashQuantCache(model.config, precision="int8", max_cache_len=24)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
        cache.reset()
        assert cache.get_seq_length() == 0
        model(ids.flip(0), past_key_values=cache, use_cache=True)
        cache.reorder_cache(torch.tensor([1, 0]))
        again = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(again, step)


def test_missing_transformers_names_the_extra(monkeypatch):
    for mod in list(sys.modules):
        if mod == "transformers" or mod.startswith("transformers.") or mod.endswith("integrations.transformers_cache"):
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"pip install '\.\[transformers\]'"):
        transformers_hf.FlashQuantCache


def test_example_kv_cache_runs(capsys):
    spec = importlib.util.spec_from_file_location("hf_llama", ROOT / "examples" / "hf_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--seq", "24", "--new-tokens", "4", "--kv-cache", "int4"])
    out = capsys.readouterr().out
    assert "FlashQuantCache int4" in out and "DynamicCache" in out and "tokens/s" in out
