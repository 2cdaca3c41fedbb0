"""The oracle's speed on a real-sized matrix, side by side with bitsandbytes' CPU path in the same run.

    python -m pytest benchmarks/test_oracle_speed.py --benchmark-only \
        --benchmark-json benchmarks/results/oracle-cpu.json

Targets (issue #2): reflora's NF4 quantize at least as fast as bitsandbytes' ``quantize_4bit``, and its
dequantize at least half as fast as bitsandbytes' native kernel. Medians are compared, never asserted:
a benchmark reports, it does not pass or fail on time.
"""

import numpy as np
import pytest

from reflora import nf4

SHAPE = (4096, 11008)  # a Llama-7B MLP weight


@pytest.fixture(scope="module")
def weight():
    return (np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32) * 0.02).astype(np.float32)


@pytest.fixture(scope="module")
def bnb(weight):
    torch = pytest.importorskip("torch", reason="torch is needed for the bitsandbytes side")
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    return F, torch.from_numpy(weight)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.benchmark(group="quantize")
def test_quantize_reflora(benchmark, weight, double_quant):
    benchmark.pedantic(nf4.quantize, (weight, 64), {"double_quant": double_quant}, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.benchmark(group="quantize")
def test_quantize_bitsandbytes(benchmark, bnb, double_quant):
    F, w = bnb
    kwargs = {"blocksize": 64, "quant_type": "nf4", "compress_statistics": double_quant}
    benchmark.pedantic(F.quantize_4bit, (w,), kwargs, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.benchmark(group="dequantize")
def test_dequantize_reflora(benchmark, weight, double_quant):
    state = nf4.quantize(weight, 64, double_quant=double_quant)
    benchmark.pedantic(nf4.dequantize, (state,), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.benchmark(group="dequantize")
def test_dequantize_bitsandbytes(benchmark, bnb, double_quant):
    F, w = bnb
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    benchmark.pedantic(F.dequantize_4bit, (q, st), rounds=10, warmup_rounds=2)
