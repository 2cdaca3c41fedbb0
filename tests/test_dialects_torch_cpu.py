"""torch's CPU float arithmetic as :mod:`reflora.dialects.torch_cpu` emulates it, against torch itself.

The emulation of ``Tensor.sum``/``Tensor.mean`` is kept only because it is exact on every case tried
here (random lengths across the vector, cascade and thread boundaries, NaN payload order). The test
also measures how often the *exactly rounded* mean would have matched torch instead, which is why
the dialects do not simply use it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the emulation is checked against torch itself")

from reflora.backends._tensors import cpu_host  # noqa: E402
from reflora.dialects.torch_cpu import Host, mean_f32, narrow_f16, sum_f32, thread_ranges, widen_f16  # noqa: E402
from reflora.double_quant import mean_f32 as exact_mean  # noqa: E402

HOST = cpu_host()
LENGTHS = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 127, 129, 255, 257, 512, 513, 1000, 4096, 9216]


def bits32(v) -> int:
    return int(np.asarray(v, dtype=np.float32).reshape(1).view(np.uint32)[0])


def test_sum_and_mean_are_bit_exact_and_exact_mean_is_not():
    rng = np.random.default_rng(0)
    exact_hits = 0
    cases = 0
    for n in LENGTHS:
        for _ in range(8):
            x = (np.abs(rng.normal(0, 0.02, n)) * rng.uniform(0.5, 2)).astype(np.float32)
            t = torch.from_numpy(x)
            assert bits32(sum_f32(x, HOST)) == bits32(t.sum().numpy()), n
            assert bits32(mean_f32(x, HOST)) == bits32(t.mean().numpy()), n
            exact_hits += exact_mean(x) == t.mean().item()
            cases += 1
    print(
        f"\n[torch CPU mean] emulation exact {cases}/{cases}; exactly rounded mean equal {exact_hits}/{cases}"
    )


@pytest.mark.parametrize("n", [32768, 40001, 100_000, 704_512])
def test_sum_splits_over_threads_like_torch(n):
    x = np.abs(np.random.default_rng(n).normal(0, 0.02, n)).astype(np.float32)
    assert bits32(sum_f32(x, HOST)) == bits32(torch.from_numpy(x).sum().numpy())
    if HOST.threads > 1 and n > 2 * 32768:  # the per-thread path really ran
        assert len(thread_ranges(n, HOST)) > 1


def test_nan_payload_order():
    rng = np.random.default_rng(1)
    for _ in range(400):
        n = int(rng.choice(LENGTHS[1:]))
        x = rng.normal(size=n).astype(np.float32)
        for _ in range(int(rng.integers(2, 5))):  # distinct payloads: which one survives is the test
            payload = 0x7FC00000 + int(rng.integers(1, 1000)) | (0x80000000 if rng.random() < 0.3 else 0)
            x.view(np.uint32)[rng.integers(n)] = payload
        if rng.random() < 0.2:
            x[rng.integers(n)] = np.inf
        assert bits32(sum_f32(x, HOST)) == bits32(torch.from_numpy(x).sum().numpy()), x.view(np.uint32)


@pytest.mark.parametrize("n", [4, 31, 33, 100, 1000])
def test_widen_f16_nan_bits(n):
    h = np.random.default_rng(n).normal(size=n).astype(np.float16)
    h.view(np.uint16)[:: max(1, n // 7)] = 0x7E01
    h.view(np.uint16)[n - 1] = 0xFC05  # a signalling NaN in the scalar tail (when n % lanes != 0)
    want = torch.from_numpy(h).float().numpy().view(np.uint32)
    np.testing.assert_array_equal(widen_f16(h, HOST).view(np.uint32), want)


def test_narrow_f16_matches_torch_including_nan_and_overflow():
    bits = np.array([0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FC00ABC, 0x7FBFFFFF], dtype=np.uint32)
    x = np.concatenate([bits.view(np.float32), np.random.default_rng(2).normal(size=100).astype(np.float32)])
    x = np.concatenate([x, np.array([65520.0, -65519.0, 1e-8, 6e-8, 3.4e38], dtype=np.float32)])
    want = torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(narrow_f16(x).view(np.uint16), want)


def test_host_validation():
    with pytest.raises(ValueError):
        Host(lanes=3)
    with pytest.raises(ValueError):
        Host(threads=0)
    with pytest.raises(ValueError):
        mean_f32(np.array([], dtype=np.float32))
