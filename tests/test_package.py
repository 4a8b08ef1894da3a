"""The package as a user meets it: fresh processes (import order, torch.load of a saved
QuantizedTensor, attributes of a plain `import flash_quant`) and the CLI's torch-free start."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str) -> subprocess.CompletedProcess:
    """Runs `script` in a new interpreter from the repository root (this checkout's package)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def saved_quantized(tmp_path_factory):
    path = tmp_path_factory.mktemp("qt") / "kv.pt"
    p = _run(f"""
        import torch, flash_quant
        torch.manual_seed(0)
        k = torch.randn(1, 2, 40, 64)
        kq = flash_quant.quantize(k, "int8", flash_quant.PerToken(), smooth=True, rotate=True)
        torch.save({{"k": kq, "ref": kq.dequantize()}}, {str(path)!r})
    """)
    assert p.returncode == 0, p.stderr
    return path


@pytest.mark.parametrize("imports", ["import flash_quant; import torch", "import torch; import flash_quant"])
def test_weights_only_load_after_plain_import(saved_quantized, imports):
    """The README's save/load pattern in a new process: nothing but `import flash_quant`
    (before or after torch) registers QuantizedTensor for torch.load(weights_only=True)."""
    p = _run(f"""
        {imports}
        blob = torch.load({str(saved_quantized)!r}, weights_only=True)
        kq = blob["k"]
        assert type(kq).__name__ == "QuantizedTensor", type(kq)
        assert kq.rotated and kq.mean is not None
        assert torch.equal(kq.dequantize(), blob["ref"])
        print("ok")
    """)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_plain_import_does_not_import_torch():
    p = _run("""
        import sys, flash_quant
        print("torch" in sys.modules)
    """)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


def test_cli_starts_without_torch():
    p = _run("""
        import sys
        from flash_quant import cli
        try:
            cli.main(["--help"])
        except SystemExit as done:
            assert done.code == 0
        cli.main(["hardware"])
        print("torch imported:", "torch" in sys.modules, file=sys.stderr)
        assert "torch" not in sys.modules
    """)
    assert p.returncode == 0, p.stderr
    assert "recommend" in p.stdout and "h100" in p.stdout.lower()


def test_subpackages_are_attributes_of_a_plain_import():
    p = _run("""
        import flash_quant
        mha = flash_quant.nn.MultiheadAttention(64, 4, batch_first=True)
        assert callable(flash_quant.integrations.route_sdpa)
        assert callable(flash_quant.integrations.transformers_hf.register)
        assert flash_quant.planning.hardware is not None
        for name in ("nn", "integrations", "planning", "ops"):
            assert name in dir(flash_quant), name
        print("ok")
    """)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


# --------------------------------------------------------------------------- examples' argument errors
def _example(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [
    ["examples/flux/generate.py", "--tiny", "--precision", "bogus"],
    ["examples/demo.py", "--device", "tpu"],
])
def test_examples_refuse_bad_arguments_without_traceback(args):
    p = _example(args)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "invalid choice" in p.stderr


@pytest.mark.parametrize("script", ["examples/demo.py", "examples/flux/generate.py"])
def test_examples_name_a_missing_cuda_device(script):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    args = [script, "--device", "cuda"] + (["--tiny"] if "flux" in script else [])
    p = _example(args)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "--device cuda" in p.stderr and "CUDA" in p.stderr


# --------------------------------------------------------------------------- docs agree with the code
def test_every_preset_is_in_the_readme_table():
    import re

    from flash_quant.config import PRESETS
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = [line for line in f if line.startswith("| `")]
    documented = set(re.findall(r"`([a-z0-9_]+)`", "".join(row.split("|")[1] for row in rows)))
    assert set(PRESETS) <= documented, sorted(set(PRESETS) - documented)


def test_op_contract_states_the_checked_head_dim_range():
    from flash_quant.support import MAX_HEAD_DIM, MIN_HEAD_DIM
    with open(os.path.join(ROOT, "docs", "op_contract.md")) as f:
        text = f.read()
    ranges = set(__import__("re").findall(r"(\d+)\.\.(\d+)", text))
    assert (str(MIN_HEAD_DIM), str(MAX_HEAD_DIM)) in ranges
    assert ranges <= {(str(MIN_HEAD_DIM), str(MAX_HEAD_DIM))}, ranges


# --------------------------------------------------------------------------- build / running torch
def test_extension_refuses_a_build_of_another_torch_release():
    from flash_quant._extension import check_build_torch, release
    assert release("2.14.1+cu130") == "2.14" and release("2.13.0") == "2.13"
    check_build_torch("2.13.0", "2.13.1+cpu")  # same release: one ABI
    with pytest.raises(ImportError, match="built against torch 2.14.1.*2.13.0.*--no-build-isolation"):
        check_build_torch("2.14.1", "2.13.0+cpu")
