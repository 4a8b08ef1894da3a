"""The Triton signature of one kernel launch, for the tests that compile launches instead
of running them (test_cuda_compile.py, test_decode_compile.py). Imported only inside their
fresh interpreters, where TRITON_INTERPRET is unset."""
import torch

#: Triton's pointer element names of the tensor dtypes the kernels take.
POINTER_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8",
    torch.int32: "i32", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5",
}
SCALAR_TYPES = {bool: "i1", int: "i32", float: "fp32"}


def launch_signature(fn, args, meta):
    """(signature, constexprs) of launching the @triton.jit `fn` with positional `args` and
    the constexpr values in `meta`, as triton.compiler.ASTSource takes them."""
    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", meta[p.name]
        elif isinstance(args[i], torch.Tensor):
            signature[p.name] = "*" + POINTER_TYPES[args[i].dtype]
        else:
            signature[p.name] = SCALAR_TYPES[type(args[i])]
    return signature, constexprs
