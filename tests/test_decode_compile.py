"""The decode and append kernels (flash_quant/cuda/decode.py, kv_append.py) compile for an
sm_90 target (H100) down to a cubin, without a GPU: what TRITON_INTERPRET=1 does not check
(every global a kernel reads is a tl.constexpr, types, dot shapes, layouts, ptxas). As
test_cuda_compile.py, each launch is compiled instead of run, in a fresh interpreter
without TRITON_INTERPRET."""
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _main():
    import torch

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flash_quant.cuda import decode, kv_append
    from flash_quant.kv_cache import QuantizedKVCache
    from triton_launch import launch_signature  # (tests/, the script's directory)

    compiled = []

    def compile_instead_of_launch(fn, grid, args, meta, kernels, key):
        """flash_quant.cuda.host.launch's stand-in: compile the launch for sm_90."""
        signature, constexprs = launch_signature(fn, args, meta)
        options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
        triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
        compiled.append(fn.__name__)

    decode.launch = kv_append.launch = compile_instead_of_launch
    torch.manual_seed(0)
    d = 128
    for precision, dtype, mask in (("int8", torch.float16, None), ("int8", torch.bfloat16, "bool"),
                                   ("int4", torch.float16, "additive"), ("int4", torch.bfloat16, None),
                                   ("int8", torch.float32, None), ("int4", torch.float32, "bool")):
        cache = QuantizedKVCache(2, 2, d, 64, precision=precision, dtype=dtype)
        for t in (5, 1):  # a prefill and a decode step: both append grids
            k, v = torch.randn(2, 2, t, d, dtype=dtype), torch.randn(2, 2, t, d, dtype=dtype)
            if cache.length == 0 and precision == "int8":
                cache._set_key_statistics(k.float())
            kv_append.append_cuda(cache, k, v)
            cache.length += t
        q = torch.randn(2, 4, 3, d, dtype=dtype)
        m = {None: None, "bool": torch.rand(1, 1, 3, 6) > 0.5, "additive": torch.randn(2, 4, 3, 6)}[mask]
        for v_expand in ((0, 1) if precision == "int4" else (0,)):
            decode.decode_launch(q, *cache.kernel_buffers(), cache.length_tensor, m, None, precision,
                                 cache.k_group or 0, cache.v_group or 0,
                                 config={"num_splits": 2, "v_expand": v_expand})
    print("compiled:", " ".join(sorted(set(compiled))))


def test_decode_and_append_kernels_compile():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                         cwd=root, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    for kernel in ("_decode_split_kernel", "_decode_merge_kernel", "_append_int8_kernel",
                   "_append_v_int4_kernel", "_append_k_groups_kernel", "_append_k_window_kernel"):
        assert kernel in run.stdout.split(), run.stdout


if __name__ == "__main__":
    _main()
