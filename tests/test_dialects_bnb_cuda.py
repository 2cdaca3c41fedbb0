"""The ``bnb-cuda`` dialect's stated rules, on constructed inputs (no GPU: the rules are read from source).

Each test pins one rule of :mod:`reflora.dialects.bnb_cuda`'s docstring, and the last ones check that on
ordinary data the dialect agrees with the canonical oracle everywhere except the documented cases.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from reflora import blockwise, codebooks, dialects, nf4
from reflora.codebooks import DYNAMIC_MAP
from reflora.dialects import bnb_cpu
from reflora.dialects import bnb_cuda as cu

F32 = np.float32

# The 15 decimal literals of csrc/kernels.cu dQuantizeNF4 (facts, sorted).
CUDA_NF4_LITERALS = sorted(
    [
        0.03979014977812767, 0.3893125355243683, 0.6427869200706482, 0.8614784181118011,
        0.5016634166240692, 0.2035212516784668, 0.2920137718319893, 0.1202552504837513,
        -0.33967943489551544, -0.13791173323988914, -0.045525018125772476, -0.23460740596055984,
        -0.6106329262256622, -0.4599952697753906, -0.8480964004993439,
    ]
)  # fmt: skip


def codes_of(state) -> np.ndarray:
    return nf4.unpack(state.packed, state.numel)


def test_registry():
    assert dialects.get("bnb-cuda") is cu
    assert dialects.names() == ["reflora", "bnb-cpu", "bnb-cuda", "torchao"]
    with pytest.raises(ValueError, match="known: reflora, bnb-cpu"):
        dialects.get("bnb")


def test_nf4_thresholds_are_the_source_literals_as_float32():
    np.testing.assert_array_equal(cu.NF4_THRESHOLDS, np.array(CUDA_NF4_LITERALS, dtype=F32))


def test_fp4_thresholds_are_mostly_not_midpoints():
    magnitudes = np.unique(np.abs(codebooks.FP4.values))
    midpoints = (magnitudes[:-1] + magnitudes[1:]) / F32(2)
    same = cu.FP4_THRESHOLDS == midpoints
    assert same.tolist() == [False, True, False, False, True, False, False]


def test_8bit_search_is_exact_nearest_off_ties():
    rng = np.random.default_rng(0)
    x = (rng.uniform(-1, 1, 200_000) * np.exp(rng.uniform(-16, 0, 200_000))).astype(F32)
    np.testing.assert_array_equal(cu.search_8bit(x), DYNAMIC_MAP.encode(x.astype(np.float64)))


def test_8bit_search_ties_go_to_the_even_index():
    code = DYNAMIC_MAP.values
    mid32 = ((code[:-1] + code[1:]) * F32(0.5)).astype(F32)
    exact = (code[:-1].astype(np.float64) + code[1:]) / 2
    tie = mid32 == exact  # midpoints representable in float32 are true ties
    i = np.flatnonzero(tie)
    assert i.size > 100
    got = cu.search_8bit(mid32[tie])
    np.testing.assert_array_equal(got, np.where(i % 2 == 0, i, i + 1))
    assert (DYNAMIC_MAP.encode(exact[tie]) == i).all()  # canonical: ties to the lower index
    assert (got != i).sum() == (i % 2 == 1).sum()  # so they disagree exactly on the odd-lower ties


def test_8bit_search_special_values():
    x = np.array([np.nan, 0.0, -0.0, 1.0, -1.0, 2.0, -2.0, np.inf, -np.inf], dtype=F32)
    assert cu.search_8bit(x).tolist() == [0, 127, 127, 255, 0, 255, 0, 255, 0]


@pytest.mark.parametrize("n", [128, 100], ids=["full", "partial"])
def test_zero_blocks_take_the_nan_path(n):
    state = cu.quantize(np.zeros(n, dtype=F32), 64)
    assert (state.packed == 0).all()  # 0 * (1/0) = NaN -> code 0 (value -1.0)
    assert (state.absmax == 0).all()
    out = cu.dequantize(state)
    assert (out == 0).all() and np.signbit(out).all()  # -1.0 * 0 = -0.0


def test_nan_is_ignored_in_absmax_and_gets_code_0():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(128).astype(F32)
    x[np.argmax(np.abs(x[:64]))] = np.nan  # the block's largest element
    state = cu.quantize(x, 64)
    finite = np.nan_to_num(x, nan=0.0)
    assert state.absmax[0] == np.abs(finite[:64]).max()
    q = codes_of(state)
    assert q[np.isnan(x)].tolist() == [0]
    expected = codes_of(cu.quantize(finite, 64))
    np.testing.assert_array_equal(q[~np.isnan(x)], expected[~np.isnan(x)])


def test_all_nan_blocks():
    x = np.full(64 + 10, np.nan, dtype=F32)
    state = cu.quantize(x, 64)
    assert state.absmax[0] == -np.finfo(F32).max  # fmaxf from -FLT_MAX never moves
    assert state.absmax[1] == 0  # the ragged block's zero padding takes part
    assert (codes_of(state) == 0).all()


def test_infinities():
    x = np.array([1.0, np.inf, -2.0, -np.inf] + [0.5] * 60, dtype=F32)
    state = cu.quantize(x, 64)
    q = codes_of(state)
    assert state.absmax[0] == np.inf
    assert q[[0, 2, 4]].tolist() == [7, 7, 7]  # finite * (1/inf) = 0
    assert q[[1, 3]].tolist() == [0, 0]  # inf * 0 = NaN
    out = cu.dequantize(state)
    assert out[1] == -np.inf and out[3] == -np.inf  # code 0 is -1.0: +inf comes back -inf


def test_subnormals_flush_to_zero():
    x = np.full(64, F32(1e-40))
    state = cu.quantize(x, 64)
    assert state.absmax[0] == 0 and (codes_of(state) == 0).all()


def test_fp4_sign_and_negative_zero():
    x = np.array([1.0, -1e-4, 1e-4, -0.0, 0.25, -0.25, np.nan, 0.0], dtype=F32)
    q = codes_of(cu.quantize(x, 64, quant_type="fp4"))
    assert q.tolist() == [3, 8, 0, 0, 7, 15, 0, 0]
    out = cu.dequantize(cu.quantize(x, 64, quant_type="fp4"))
    assert np.signbit(out[1]) and out[1] == 0  # nibble 8 decodes to -0.0


def test_odd_length_pads_with_zero_times_inverse():
    x = np.array([1.0, 0.5, -0.25], dtype=F32)
    assert cu.quantize(x, 64).packed[-1] & 0x0F == 7
    assert cu.quantize(np.zeros(3, F32), 64).packed[-1] == 0  # 0 * inf = NaN -> code 0


def _explained(quotient: np.ndarray, q_a: np.ndarray, q_b: np.ndarray, values: np.ndarray, t32) -> np.ndarray:
    """For elements whose codes differ: is the exact ``quotient`` within the float32-arithmetic window?

    The dialect compares a float32 product (relative error < 2**-23 from the reciprocal and the multiply)
    with float32 thresholds t32; the canonical rule compares the exact quotient with exact midpoints t.
    Codes can only differ by one step, with the exact quotient within |t32 - t| + 2**-22 |t| of t.
    values: the sorted table; t32: float32 thresholds indexed like its gaps.
    """
    exact = (values[:-1].astype(np.float64) + values[1:]) / 2
    lower = np.minimum(q_a, q_b).astype(int)
    t = exact[lower]
    window = np.abs(t32[lower].astype(np.float64) - t) + 2.0**-22 * np.abs(t)
    return (np.abs(q_a.astype(int) - q_b) == 1) & (np.abs(quotient - t) <= window)


def test_agrees_with_canonical_except_documented_cases():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1001, 77)) * np.exp(rng.uniform(-6, 6, (1001, 1)))).astype(F32)
    mine, canon = cu.quantize(x, 64), nf4.quantize(x, 64)
    np.testing.assert_array_equal(mine.absmax, canon.absmax)  # no zero or NaN blocks here
    q_a, q_b = codes_of(mine), codes_of(canon)
    differ = np.flatnonzero(q_a != q_b)
    quotient = x.reshape(-1).astype(np.float64) / np.repeat(mine.absmax, 64)[: x.size]
    table = codebooks.NF4.values
    assert _explained(quotient[differ], q_a[differ], q_b[differ], table, cu.NF4_THRESHOLDS).all()
    # Full blocks run the same float32 arithmetic as bnb's CPU path (which only adds a clamp).
    full = x.size // 64 * 64
    np.testing.assert_array_equal(q_a[:full], codes_of(bnb_cpu.quantize(x, 64))[:full])


def test_threshold_ties_go_to_the_lower_code():
    # absmax 1: scaled == x exactly, so x on a float32 threshold is a tie.
    block = np.zeros(64, dtype=F32)
    block[0] = 1.0
    block[1:16] = cu.NF4_THRESHOLDS
    q = codes_of(cu.quantize(block, 64))
    assert q[1:16].tolist() == list(range(15))


def test_reciprocal_slack_flags_exactly_the_near_threshold_elements():
    # absmax 3: 1/3 is inexact, so x = f32(t * 3) lands within an ulp of threshold t after scaling.
    block = np.zeros(64, dtype=F32)
    block[0] = 3.0
    block[1:16] = (cu.NF4_THRESHOLDS.astype(np.float64) * 3).astype(F32)
    block[16:31] = (cu.NF4_THRESHOLDS.astype(np.float64) * 3 + 0.02).astype(F32)  # far from thresholds
    down, mid, up = cu.reciprocal_slack(block, 64)
    np.testing.assert_array_equal(mid, codes_of(cu.quantize(block, 64)))
    sensitive = (down != mid) | (up != mid)
    assert sensitive[1:16].any() and not sensitive[16:].any()
    assert (np.abs(down.astype(int) - mid) <= 1).all() and (np.abs(up.astype(int) - mid) <= 1).all()


def test_fma_is_one_correct_rounding():
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal(400).astype(F32) for _ in range(3))
    got = cu.fma_f32(a, b, c)
    for ai, bi, ci, g in zip(a, b, c, got, strict=True):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        near = F32(float(exact))  # float(exact) rounds once to float64; check the float32 neighbours
        candidates = [near, np.nextafter(near, F32(np.inf)), np.nextafter(near, F32(-np.inf))]
        best = min(
            candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.array(v).view(np.uint32)) & 1)
        )
        assert g == best, (ai, bi, ci)


def test_fused_gemm_absmax_differs_by_at_most_one_ulp():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 0.02, (512, 512)).astype(F32)
    state = cu.quantize(x, 64, double_quant=True)
    two = cu.block_scales(state)
    one = cu.block_scales(state, fma=True)
    ulps = np.abs(two.view(np.int32).astype(np.int64) - one.view(np.int32))
    assert ulps.max() <= 1 and (ulps == 1).any()


def test_double_quant_equals_canonical_except_documented_cases():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 0.02, (700, 512)).astype(F32)
    mine = cu.quantize(x, 64, double_quant=True)
    canon = nf4.quantize(x, 64, double_quant=True)
    assert mine.nested.offset == canon.nested.offset  # both the exactly rounded mean by default
    np.testing.assert_array_equal(mine.nested.absmax2, canon.nested.absmax2)
    centred = nf4.quantize(x, 64).absmax - mine.nested.offset  # float32, as both compute it
    quotient = centred.astype(np.float64) / np.repeat(mine.nested.absmax2, 256)[: centred.size]
    a, b = mine.nested.absmax_q, canon.nested.absmax_q
    differ = a != b
    code = DYNAMIC_MAP.values
    t32 = ((code[:-1] + code[1:]) * F32(0.5)).astype(F32)
    assert _explained(quotient[differ], a[differ], b[differ], code, t32).all()


def test_disagrees_with_canonical_only_inside_the_midpoint_window():
    # Quotients placed strictly between a float32 threshold and the exact midpoint: where the two rules
    # part, it must be by one code and inside that window.
    rng = np.random.default_rng(6)
    values = codebooks.NF4.values
    exact = (values[:-1].astype(np.float64) + values[1:]) / 2
    t32 = cu.NF4_THRESHOLDS.astype(np.float64)
    blocks = []
    while len(blocks) < 200:
        a, i = F32(rng.uniform(0.01, 100)), rng.integers(15)
        lo, hi = sorted((exact[i], t32[i]))
        x = F32(exact[i] * a)
        for cand in (x, np.nextafter(x, F32(np.inf)), np.nextafter(x, F32(-np.inf))):
            if lo * a < float(cand) < hi * a:  # exact: m * a has at most 49 significant bits
                block = rng.uniform(-1, 1, 64).astype(F32) * a * F32(0.9)
                block[0], block[1] = a, cand
                blocks.append(block)
    x = np.concatenate(blocks)
    q_a, q_b = codes_of(cu.quantize(x, 64)), codes_of(nf4.quantize(x, 64))
    differ = q_a != q_b
    quotient = x.astype(np.float64) / np.repeat(np.abs(x.reshape(-1, 64)).max(axis=1), 64)
    # Most planted values part (the float32 product's own rounding can carry one back across t32).
    assert differ[1::64].any()
    assert _explained(quotient[differ], q_a[differ], q_b[differ], values, cu.NF4_THRESHOLDS).all()


def test_8bit_blocks_with_ties_disagree_with_canonical_exactly_there():
    code = DYNAMIC_MAP.values
    mid32 = ((code[:-1] + code[1:]) * F32(0.5)).astype(F32)
    ties = mid32[mid32 == (code[:-1].astype(np.float64) + code[1:]) / 2]
    values = np.concatenate([[F32(1.0)], ties]).astype(F32)  # absmax2 = 1: scaled == value
    mine, _ = cu.quantize_8bit(values, 256)
    canon = blockwise.encode(
        values, blockwise.block_absmax(values, 256), 256, DYNAMIC_MAP
    )  # the canonical coder
    lower = np.searchsorted(code, values[1:]) - 1  # index just below each tie
    np.testing.assert_array_equal(mine[1:], np.where(lower % 2 == 0, lower, lower + 1))
    np.testing.assert_array_equal(canon[1:], lower)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((2,), (2,)), ((1,), (1,)), ((1, 2), (2, 1)), ((2, 1), (1, 2)), ((4,), (4,)), ((3, 5), (3, 5))],
)
def test_dequantize_returns_the_shape_bnb_returns(shape, expected):
    # functional.dequantize_4bit's shim: .t() when the packed tensor is one byte (n <= 2); on CUDA a 1-D
    # result stays 1-D (the CPU kernel's (1, n) view is not part of this path).
    x = np.arange(1, math.prod(shape) + 1, dtype=np.float32).reshape(shape)
    state = cu.quantize(x, 64)
    out = cu.dequantize(state)
    assert cu.output_shape(shape) == expected == out.shape
    codes = codes_of(state)  # the values, in the state's element order
    assert np.array_equal(out.reshape(-1), state.code[codes] * np.repeat(state.absmax, 64)[: codes.size])


def test_dequantize_where_bnb_raises_keeps_the_state_shape():
    with pytest.raises(ValueError, match=r"\.t\(\) of a 3-D tensor"):
        cu.output_shape((1, 1, 2))
    state = cu.quantize(np.ones((1, 1, 2), dtype=np.float32), 64)
    assert cu.dequantize(state).shape == (1, 1, 2)


def test_nan_bits_are_not_modelled_on_the_cpu():
    """The emulation's NaN is x86's; a GPU writes its own (PTX cvt: the canonical NaN), so any NaN."""
    state = cu.quantize(np.ones(64, np.float32), 64)
    assert cu.nan_encodings(state, "bfloat16") == "any"
