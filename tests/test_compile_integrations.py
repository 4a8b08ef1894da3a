"""torch.compile(fullgraph=True) through the integrations: no graph break, eager results."""
import pytest
import torch
from torch import nn

import flash_quant  # noqa: F401  (loads the ops)
from flash_quant.nn import MultiheadAttention

HAS_CPU_BACKWARD = torch._C._dispatch_has_kernel_for_dispatch_key("flash_quant::attention_backward", "CPU")
needs_backward = pytest.mark.skipif(
    not HAS_CPU_BACKWARD, reason="flash_quant::attention_backward has no CPU kernel registered yet"
)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = MultiheadAttention(64, 2, batch_first=True, config=config)
        self.ff = nn.Linear(64, 64)

    def forward(self, x, kpm):
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        y = self.attn(x, x, x, key_padding_mask=kpm, attn_mask=causal, is_causal=True, need_weights=False)[0]
        return self.ff(torch.relu(y)) + x


def run(model, args, compiled):
    torch._dynamo.reset()
    fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    out = fn(*args)
    return out


@pytest.mark.parametrize("config", ["fp32", "accurate"])
def test_mha_forward_compiled(config):
    torch.manual_seed(0)
    model = Block(config).eval()
    x = torch.randn(2, 12, 64)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, -3:] = True
    with torch.no_grad():
        expect = model(x, kpm)
        out = run(model, (x, kpm), compiled=True)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@needs_backward
def test_mha_backward_compiled():
    torch.manual_seed(0)
    model = Block("fp32").train()
    x = torch.randn(2, 12, 64, requires_grad=True)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    grads = []
    for compiled in (False, True):
        model.zero_grad()
        x.grad = None
        run(model, (x, kpm), compiled).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def _tiny_flux():
    pytest.importorskip("diffusers", reason="needs the [diffusers] extra")
    from diffusers import FluxTransformer2DModel

    from flash_quant.integrations.diffusers_flux import apply_flux_attention

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    apply_flux_attention(model, "fp32")
    g = torch.Generator().manual_seed(1)
    side, text = 4, 6
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    inputs = (
        torch.randn(1, side * side, 16, generator=g),
        torch.randn(1, text, 32, generator=g),
        torch.randn(1, 32, generator=g),
        torch.full((1,), 0.5),
        torch.cat([torch.zeros(side * side, 1), ids.float()], dim=1),
        torch.zeros(text, 3),
    )
    return model, inputs


class FluxWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden, text, pooled, t, img_ids, txt_ids):
        return self.model(
            hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
        )[0]


def test_flux_forward_compiled():
    model, inputs = _tiny_flux()
    model = FluxWrapper(model.eval())
    with torch.no_grad():
        expect = model(*inputs)
        out = run(model, inputs, compiled=True)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@needs_backward
def test_flux_backward_compiled():
    model, inputs = _tiny_flux()
    model = FluxWrapper(model.train())
    grads = []
    for compiled in (False, True):
        model.zero_grad()
        run(model, inputs, compiled).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
