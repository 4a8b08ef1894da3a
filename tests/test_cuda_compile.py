"""The CUDA backend's attention kernels pass Triton's compiler front end, without a GPU.

TRITON_INTERPRET=1 (test_cuda_interpret.py, test_cuda_backward_interpret.py) runs the
kernels' Python, and so does not check what only the compiler checks: e.g. that every
global a @triton.jit function reads is a tl.constexpr (the named kernel modes of
flash_quant/cuda are flash_quant.cuda.common.KernelConstant for that reason; a plain int
global passes the interpreter and fails on a GPU). Here each launch of a set of forward
and backward calls, covering every Q·Kᵀ mode, P·V mode, mask kind and operand kind, is
compiled from its AST to Triton IR for an sm_90 target instead of being run.

The compiler sees a module as the interpreter left it (triton.jit reads TRITON_INTERPRET
when a kernel is defined, and the interpreter tests set it for the whole process): the
compilation runs in a fresh interpreter without it.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

# (found, not imported: this process must not define any kernel before the interpreter
# tests set TRITON_INTERPRET)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _compile_instead_of_launch(fn, grid, args, meta, kernels, key):
    """flash_quant.cuda.host.launch's stand-in: compile fn's launch to Triton IR."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton_launch import launch_signature  # (tests/, the script's directory)

    signature, constexprs = launch_signature(fn, args, meta)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": meta.get("num_warps", 4)})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    ASTSource(fn, signature, constexprs).make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    COMPILED.append(fn.__name__)


COMPILED = []


def _main():
    import torch

    from flash_quant import ops
    from flash_quant.cuda import autotune, backward, forward, host

    host.launch = _compile_instead_of_launch
    torch.manual_seed(0)
    # head dim 64: Triton's 8-bit dots need K >= 32, which the INT4 Q·Kᵀ (D / 2 packed
    # columns) does not meet at D <= 32
    q, k, v = (torch.randn(1, 2, 32, 64) for _ in range(3))

    def quantized(x, precision, strategy="symmetric", granularity="per_token", smooth=False):
        data, scale, zero_point, mean = ops.quantize(x, precision, granularity, 1, strategy, smooth)
        return data, scale, zero_point if strategy == "asymmetric" else None, mean if smooth else None

    masks = {"none": None, "bool": torch.rand(1, 1, 32, 32) > 0.3, "additive": torch.randn(1, 1, 32, 32)}
    calls = [  # (Q/K precision, strategy), (V precision, granularity), pv_precision, mask, causal
        ((None, None), (None, None), "none", "none", False),  # QK_GENERIC, PV_16BIT
        (("int8", "symmetric"), ("int8", "per_channel"), "int8", "bool", True),  # QK_INT8, PV_INT8_DOT
        (("int4", "symmetric"), ("int8", "per_token"), "int8", "additive", False),  # QK_INT4, PV_INT8_ROUNDED
        (("fp8_e4m3", "symmetric"), ("fp8_e4m3", "per_channel"), "fp8_e4m3", "none", False),  # QK_FP8, PV_FP8_DOT
        (("int8", "asymmetric"), ("int4", "per_token"), "fp8_e4m3", "additive", True),  # QK_GENERIC, PV_FP8_ROUNDED
    ]
    for (qk_precision, strategy), (v_precision, v_granularity), pv, mask, causal in calls:
        kw = {}
        if qk_precision is not None:
            kw.update(zip(("q_data", "q_scale", "q_zero_point"), quantized(q, qk_precision, strategy)[:3]))
            kw.update(zip(("k_data", "k_scale", "k_zero_point", "k_mean"),
                          quantized(k, qk_precision, strategy, smooth=True)))
        if v_precision is not None:
            kw.update(zip(("v_data", "v_scale"), quantized(v, v_precision, granularity=v_granularity)[:2]))
        forward.attention_forward_launch(q.half(), k.half(), v.half(), **kw, attn_mask=masks[mask],
                                         is_causal=causal, pv_precision=pv, config=autotune.Config(32, 32, 4, 2))
        if pv == "none" or v_granularity == "per_token":
            out, lse, grad = torch.randn(1, 2, 32, 64).half(), torch.randn(1, 2, 32), torch.randn(1, 2, 32, 64).half()
            backward.attention_backward_triton(grad, q.half(), k.half(), v.half(), out, lse, **kw,
                                               attn_mask=masks[mask], is_causal=causal)
    print("compiled from", os.path.dirname(forward.__file__) + ":", " ".join(COMPILED))


def test_attention_kernels_compile_for_every_mode():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))  # this checkout's package
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=root,
                         check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    compiled = run.stdout.split()
    for kernel in ("_attn_fwd_kernel", "_bwd_preprocess", "_bwd_dq", "_bwd_dkdv"):
        assert kernel in compiled, run.stdout


if __name__ == "__main__":
    _main()
