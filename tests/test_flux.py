"""diffusers Flux attention through flash_quant (tiny random-weight models, CPU)."""
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("diffusers", reason="needs the [diffusers] extra")

from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor  # noqa: E402

from flash_quant.integrations import MissingExtraError  # noqa: E402
from flash_quant.integrations.diffusers_flux import (  # noqa: E402
    FluxQuantAttnProcessor,
    apply_flux_attention,
    remove_flux_attention,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT, SIDE = 12, 8  # 12 text tokens, 8x8 = 64 image tokens


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    ).eval()


def tiny_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(SIDE * SIDE, 1), ids.float()], dim=1)
    return dict(
        hidden_states=torch.randn(batch, SIDE * SIDE, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT, 3),
        return_dict=False,
    )


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("fuse_prologue", [True, False])
def test_fp32_matches_sdpa_processor(fuse_prologue):
    model, x = tiny_transformer(), tiny_inputs()
    with torch.no_grad():
        expect = model(**x)[0]
        report = apply_flux_attention(model, "fp32", fuse_prologue=fuse_prologue)
        out = model(**x)[0]
    assert len(report.joint) == 1 and len(report.single) == 2 and not report.skipped
    assert all(isinstance(p, FluxQuantAttnProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)
    counts = model.transformer_blocks[0].attn.processor.prologue_counts
    assert counts == ({"fused": 3} if fuse_prologue else {"diffusers: fuse_prologue=False": 3})
    assert remove_flux_attention(model) == 3
    assert all(type(p) is FluxAttnProcessor for p in model.attn_processors.values())


@pytest.mark.parametrize("preset", ["accurate", "fast", "int4"])
def test_quantized_close_to_sdpa(preset):
    model, x = tiny_transformer(), tiny_inputs()
    with torch.no_grad():
        expect = model(**x)[0]
        apply_flux_attention(model, preset)
        out = model(**x)[0]
    assert cosine(out, expect) >= (0.99 if preset != "int4" else 0.95)


def test_per_stream_configs_and_custom_processor_kept():
    model = tiny_transformer()

    class Custom(FluxAttnProcessor):
        pass

    model.single_transformer_blocks[1].attn.set_processor(Custom())
    report = apply_flux_attention(model, "fast", single_config="fp32")
    assert report.skipped == [("single_transformer_blocks.1.attn", "custom processor Custom kept")]
    assert model.transformer_blocks[0].attn.processor.config == "fast"
    assert model.single_transformer_blocks[0].attn.processor.config == "fp32"


def test_text_padding_mask_matches_sdpa():
    model, x = tiny_transformer(), tiny_inputs()
    mask = torch.ones(2, TEXT + SIDE * SIDE, dtype=torch.bool)
    mask[1, 8:TEXT] = False  # last 4 text tokens of sample 1 are padding
    x["joint_attention_kwargs"] = {"attention_mask": mask}
    with torch.no_grad():
        expect = model(**x)[0]
        apply_flux_attention(model, "fp32")
        out = model(**x)[0]
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        FluxQuantAttnProcessor("int3")
    with pytest.raises(ValueError, match="no Flux attention module"):
        apply_flux_attention(torch.nn.Linear(2, 2))


def test_missing_diffusers_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name == "diffusers" or name.startswith("diffusers."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install '\.\[diffusers\]'"):
        apply_flux_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ImportError, match=r"pip install '\.\[diffusers\]'"):
        FluxQuantAttnProcessor()


def test_tiny_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("flux_generate", ROOT / "examples" / "flux" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tiny.png"
    image = mod.main(["--tiny", "--precision", "int8", "--steps", "2", "--device", "cpu", "--output", str(out)])
    text = capsys.readouterr().out
    assert out.exists() and (tmp_path / "tiny_sdpa.png").exists()
    assert image.size == (64, 64)
    assert "[sdpa]" in text and "[flash_quant accurate]" in text and "1 joint + 2 single-stream" in text


def test_fused_prologue_bf16_and_unfusable_block_counted(caplog):
    """bf16: the fused prologue (one rounding) against diffusers' steps (three); a block
    whose QK norm is not an RMSNorm takes diffusers' steps, counted and logged once."""
    model, x = tiny_transformer().to(torch.bfloat16), tiny_inputs()
    x = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and "ids" not in k else v)
         for k, v in x.items()}
    with torch.no_grad():
        apply_flux_attention(model, "bf16", fuse_prologue=False)
        unfused = model(**x)[0]
        apply_flux_attention(model, "bf16")
        fused = model(**x)[0]
        assert cosine(fused, unfused) > 0.9999
        attn = model.single_transformer_blocks[1].attn
        attn.norm_q = torch.nn.LayerNorm(32, elementwise_affine=False)
        model(**x)
        model(**x)
    counts = attn.processor.prologue_counts
    assert counts["diffusers: QK norms are not RMSNorms with one eps and no bias"] == 2
    assert sum("not fused" in r.message for r in caplog.records) == 1
