"""benchmarks/bench_attention.py marks rows that did not compute what they claim (CPU: the
rule only; the benchmark itself runs on a GPU)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_plausible_row_is_a_result(bench):
    assert bench.not_a_result(dict(ms=0.46, tflops=562.0, rel_l2=0.0097)) is None
    assert bench.not_a_result(dict(ms=0.1, tflops=5.0)) is None  # (no accuracy: quantize rows)


def test_a_rate_past_any_tensor_core_peak_is_a_failed_launch(bench):
    # SageAttention2 at 1x32x16384x128 on an H200 (session 8): 0.905 ms
    why = bench.not_a_result(dict(ms=0.905, tflops=4860.5, rel_l2=0.039))
    assert why is not None and "failed launch" in why


def test_a_wrong_output_is_not_a_result(bench):
    # SageAttention2's GQA row in the same run: rel-L2 112 %
    why = bench.not_a_result(dict(ms=0.827, tflops=664.9, rel_l2=1.12))
    assert why is not None and "wrong output" in why
