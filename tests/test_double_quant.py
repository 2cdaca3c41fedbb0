"""Double quantization: the exact mean, the 8-bit codes, the two-rounding reconstruction."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reflora import codebooks, double_quant, nf4
from reflora.memory import bits_per_parameter


def _round_to_f32(r: Fraction) -> np.float32:
    """The float32 nearest to the rational r, ties to even, by checking the neighbours of a guess."""
    guess = np.float32(float(r))
    cands = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - r), int(np.float32(c).view(np.uint32)) & 1))


positive_f32 = st.floats(0, 2.0**127, width=32, allow_subnormal=True)


@given(
    v=hnp.arrays(np.float32, st.integers(1, 400), elements=positive_f32),
    shift=st.integers(-140, 0),
)
def test_mean_f32_is_the_exact_mean_rounded_once(v, shift):
    v = np.ldexp(v, shift).astype(np.float32)  # many magnitudes, subnormals included
    exact = sum(Fraction(float(a)) for a in v) / v.size
    assert double_quant.mean_f32(v).tobytes() == _round_to_f32(exact).tobytes()


def test_mean_f32_resolves_a_double_rounding_trap():
    # exact mean = 1 + 2**-24 + 2**-55/3: just above the midpoint between the float32 numbers 1 and
    # 1 + 2**-23, so the right answer is 1 + 2**-23. Summing in float64 drops the 2**-55 and lands exactly
    # on the midpoint, which then rounds to even: 1.0.
    v = np.array([2 + 2.0**-22, 1 - 2.0**-24, 2.0**-55], dtype=np.float32)
    naive = np.float32(v.astype(np.float64).sum() / v.size)
    assert naive == np.float32(1.0)
    assert double_quant.mean_f32(v) == np.float32(1 + 2.0**-23)


absmaxes = hnp.arrays(
    np.float32, st.integers(1, 1100), elements=st.floats(0, 1e4, width=32, allow_subnormal=False)
)


@given(absmax=absmaxes)
def test_codes_are_nearest_in_the_dynamic_map_with_ties_low(absmax):
    nested = double_quant.quantize(absmax)
    centred = absmax - nested.offset
    group = np.arange(absmax.size) // 256
    scale = nested.absmax2[group].astype(np.float64)
    scale[scale == 0] = 1
    r = centred.astype(np.float64) / scale
    values = codebooks.DYNAMIC_MAP.values.astype(np.float64)
    chosen = values[nested.absmax_q]
    # no other map value is strictly nearer, and on a tie the chosen one is the lower
    dist = np.abs(values[None, :] - r[:, None])
    best = dist.min(axis=1)
    assert np.all(np.abs(chosen - r) == best)
    assert np.all(chosen == values[np.argmax(dist == best[:, None], axis=1)])


@given(absmax=absmaxes)
def test_reconstruction_is_a_multiply_then_an_add_in_float32(absmax):
    nested = double_quant.quantize(absmax)
    prod = np.float32(1) * nested.code2[nested.absmax_q] * np.repeat(nested.absmax2, 256)[: absmax.size]
    expected = (prod + nested.offset).astype(np.float32)
    assert double_quant.dequantize(nested).tobytes() == expected.tobytes()


def test_two_roundings_differ_from_a_fused_multiply_add():
    # The rule names the order of roundings because a fused multiply-add (one rounding) gives a
    # different float32 for some blocks; count them on a realistic absmax vector.
    rng = np.random.default_rng(0)
    absmax = nf4.quantize((rng.standard_normal(64 * 20000) * 0.02).astype(np.float32)).absmax
    nested = double_quant.quantize(absmax)
    scaled = nested.code2[nested.absmax_q].astype(np.float64) * np.repeat(nested.absmax2, 256)[: absmax.size]
    fused = (scaled + np.float64(nested.offset)).astype(np.float32)  # exact product, one rounding
    two = double_quant.dequantize(nested)
    differ = np.count_nonzero(fused != two)
    assert 0 < differ < absmax.size // 5
    assert np.all(np.abs(fused.view(np.int32) - two.view(np.int32)) <= 1)  # at most one ulp apart


def test_constant_absmax_gives_a_zero_group_and_exact_reconstruction():
    absmax = np.full(300, 0.75, dtype=np.float32)
    nested = double_quant.quantize(absmax)
    assert nested.offset == np.float32(0.75)
    assert nested.absmax2.tolist() == [0.0, 0.0]
    assert np.all(nested.absmax_q == 127)
    assert np.all(double_quant.dequantize(nested) == absmax)


def test_offset_can_be_given_to_replay_another_implementation():
    absmax = np.array([0.5, 1.0, 1.5, 3.0], dtype=np.float32)
    off = np.nextafter(double_quant.mean_f32(absmax), np.float32(1))
    nested = double_quant.quantize(absmax, offset=off)
    assert nested.offset == off


def test_largest_absmax_of_each_group_is_reconstructed_exactly_in_the_code():
    # max |c| maps to +-1 of the map: 1.0 exists, -1.0 does not (the map's minimum is -0.99296874),
    # so a negative extreme is coded as -0.99296874 * absmax2.
    absmax = np.array([1.0, 1.0, 1.0, 9.0], dtype=np.float32)  # offset 3: c = -2, -2, -2, 6
    nested = double_quant.quantize(absmax)
    assert nested.absmax2.tolist() == [6.0]
    assert nested.absmax_q[3] == 255 and double_quant.dequantize(nested)[3] == 9.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_absmax_is_refused(bad):
    with pytest.raises(ValueError, match=r"absmax\[1\]"):
        double_quant.quantize(np.array([1.0, bad], dtype=np.float32))


def test_state_with_double_quant_dequantizes_through_the_rebuilt_absmax():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 129)).astype(np.float32)
    plain, dq = nf4.quantize(x, 64), nf4.quantize(x, 64, double_quant=True)
    assert np.array_equal(plain.packed, dq.packed)  # the codes do not depend on how absmax is stored
    assert dq.absmax is None and dq.nested.absmax_q.size == plain.absmax.size
    rebuilt = double_quant.dequantize(dq.nested)
    q = nf4.unpack(dq.packed, x.size)
    expected = dq.code[q] * np.repeat(rebuilt, 64)[: x.size]
    assert np.array_equal(nf4.dequantize(dq).reshape(-1), expected)


def test_bits_per_parameter():
    assert bits_per_parameter(64) == 4.5
    assert round(bits_per_parameter(64, double_quant=True), 3) == 4.127
    # the QLoRA paper's saving: 0.373 bits per parameter, about 3 GB on a 65B model
    saving = bits_per_parameter(64) - bits_per_parameter(64, double_quant=True)
    assert round(saving, 3) == 0.373 and round(saving * 65e9 / 8 / 1e9) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"offset": float("nan")}, "offset must be finite"),  # would give NaN group scales and codes 255
        ({"offset": float("inf")}, "offset must be finite"),
        ({"offset": 1e39}, "offset must be finite"),  # beyond float32
        ({"offset": -0.5}, r"offset must be finite and >= 0"),
        ({"blocksize2": 0}, "blocksize2 must be a positive int"),  # was a ZeroDivisionError
        ({"blocksize2": -256}, "blocksize2 must be a positive int"),
        ({"blocksize2": True}, "blocksize2 must be a positive int"),  # TypeError, as for blocksize
        ({"blocksize2": 256.0}, "blocksize2 must be a positive int"),
        ({"offset": "0.5"}, "offset must be a real number"),  # numpy parsed the string
    ],
    ids=repr,
)
def test_bad_arguments_are_refused(kwargs, match):
    wrong_type = isinstance(kwargs.get("blocksize2", 1), (bool, float)) or isinstance(
        kwargs.get("offset"), str
    )
    with pytest.raises(TypeError if wrong_type else ValueError, match=match):
        double_quant.quantize(np.array([0.5, 1.0, 2.0], dtype=np.float32), **kwargs)


def test_a_nested_state_refuses_an_offset_that_is_not_a_number():
    from reflora.state import NestedState

    with pytest.raises(TypeError, match=r"offset must be a real number, got '0\.5'"):  # numpy parsed it
        NestedState(np.zeros(3, np.uint8), np.zeros(1, np.float32), np.zeros(256, np.float32), "0.5", 256)


def test_negative_absmax_is_refused():
    with pytest.raises(ValueError, match=r"absmax\[2\] = -0.25; block scales must be finite and >= 0"):
        double_quant.quantize(np.array([0.5, -0.0, -0.25, 1.0], dtype=np.float32))


def _flip_bound(t: float) -> float:
    """The largest a/offset a flipped block can have when offset/absmax2 = t (docs/spec.md): with -t in the
    lower half (lo, mid] of a gap of the map, a < (1 - |mid|/t) offset; else no block flips."""
    v = codebooks.DYNAMIC_MAP.values.astype(np.float64)
    k = np.searchsorted(v, -t) - 1  # v[k] < -t <= v[k + 1]
    if k < 0:
        return 0.0
    mid = (v[k] + v[k + 1]) / 2
    return 1 - abs(mid) / t if -t <= mid else 0.0


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 700),
    scale=st.floats(-3, 0),
    outliers=st.lists(st.floats(0, 5), min_size=1, max_size=4),
    zeros=st.booleans(),
)
def test_a_scale_rebuilds_negative_only_far_below_the_offset(seed, n, scale, outliers, zeros):
    rng = np.random.default_rng(seed)
    absmax = np.abs(rng.standard_normal(n) * 10.0**scale).astype(np.float32)
    if zeros:
        absmax[rng.integers(0, n, size=3)] = 0
    absmax[rng.integers(0, n, size=len(outliers))] = 10.0 ** np.array(outliers)
    nested = double_quant.quantize(absmax)
    flipped = double_quant.negative_scales(nested)
    assert np.array_equal(flipped, np.flatnonzero(double_quant.dequantize(nested) < 0))
    off = float(nested.offset)
    for i in flipped:
        t = off / float(nested.absmax2[i // 256])
        assert absmax[i] < off / 2 and absmax[i] / off <= _flip_bound(t) + 2**-20, (i, t)


def test_negative_scales_measured_on_a_weight_with_an_outlier_column():
    # docs/spec.md's measured case: every row holds one block of absmax 50 among ordinary ones.
    W = np.random.default_rng(0).normal(0, 0.02, (1024, 4096)).astype(np.float32)
    W[:, 0] = 50
    counts = {}
    for bs in (32, 64, 128, 256):
        nested = double_quant.quantize(np.abs(W).reshape(-1, bs).max(axis=1))
        counts[bs] = double_quant.negative_scales(nested).size
        if bs == 64:
            assert (nested.offset, nested.absmax2[0]) == (np.float32(0.8323885), np.float32(49.16761))
            assert set(double_quant.dequantize(nested)[double_quant.negative_scales(nested)]) == {
                np.float32(-0.0049973726)
            }
    assert counts == {32: 0, 64: 59211, 128: 1233, 256: 0}


@pytest.mark.parametrize(("dtype", "zero_blocks", "beyond"), [("float32", 1, 255), ("float16", 4, 252),
                                                              ("bfloat16", 24, 232)])  # fmt: skip
def test_scales_rebuilt_beyond_the_dtype_are_warned_about(dtype, zero_blocks, beyond):
    """Zero blocks beside blocks of the dtype's largest value: the offset and absmax2 are near the maximum,
    and f32(code2·absmax2) + offset passes it, so finite input dequantized to inf without a word (found by
    a review; docs/spec.md). Now quantize warns, as it does for negative scales, and the torch op too."""
    import ml_dtypes

    from reflora.dtypes import as_dtype

    dt = as_dtype(dtype)
    x = np.zeros((256, 64), dtype=dt)
    x[zero_blocks:] = ml_dtypes.finfo(dt).max
    with pytest.warns(double_quant.ScaleRangeWarning, match=f"rebuilds {beyond} of 256 block scales beyond"):
        state = nf4.quantize(x, 64, double_quant=True)
    np.testing.assert_array_equal(
        double_quant.scales_out_of_range(state.nested, dt), np.arange(256 - beyond, 256)
    )
    with np.errstate(over="ignore"):
        assert np.isinf(nf4.dequantize(state).astype(np.float32)[zero_blocks:]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", double_quant.ScaleRangeWarning)
        nf4.quantize(x, 64)  # without double quantization: no warning, and finite
        nf4.quantize(np.ones((256, 64), dt), 64, double_quant=True)  # ordinary scales: none either
    pytest.importorskip("torch")
    from reflora.backends.torch import ops
    from reflora.backends.torch.quant_state import numpy_to_torch

    with pytest.warns(double_quant.ScaleRangeWarning, match=f"rebuilds {beyond} of 256 block scales beyond"):
        ops.quantize_4bit(numpy_to_torch(x), 64, double_quant=True)


def _zero_scale_matrix() -> np.ndarray:
    """One group of 256 scales: 123 of 503, 128 of 1.0 and 5 of 247. The exact mean is 247 and absmax2 =
    503 - 247 = 256; c/absmax2 = -246/256 takes the code -0.96484375 = -247/256, so the blocks of 1.0
    rebuild to f32(-247) + 247 = 0 (docs/spec.md, scales rebuilt to zero)."""
    scales = np.array([503.0] * 123 + [1.0] * 128 + [247.0] * 5, np.float32)
    return np.repeat(scales[:, None], 64, axis=1)  # (256, 64): one block a row, each block constant


def test_nonzero_blocks_whose_scale_rebuilds_to_zero_are_warned_about():
    """Found by the oracle review: a block that is not zero can rebuild its scale to exactly 0, and then
    all its elements dequantize to 0 without a word (8,192 of 16,384 here; bitsandbytes 0.50 gives the same
    offset 247 and absmax2 256, and the same zeros)."""
    x = _zero_scale_matrix()
    with pytest.warns(double_quant.ZeroScaleWarning, match=r"128 of 256 block scales to exactly 0 .*first: "
                      r"block 123, flat elements 7872 to 7935"):  # fmt: skip
        state = nf4.quantize(x, 64, double_quant=True)
    assert (state.nested.offset, state.nested.absmax2[0]) == (np.float32(247), np.float32(256))
    absmax = nf4.quantize(x, 64).absmax
    np.testing.assert_array_equal(double_quant.zero_scales(state.nested, absmax), np.arange(123, 251))
    out = nf4.dequantize(state)
    assert (out[123:251] == 0).all() and (out[:123] != 0).all()
    assert issubclass(double_quant.ZeroScaleWarning, double_quant.RebuiltScaleWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", double_quant.RebuiltScaleWarning)
        nf4.quantize(x, 64)  # without double quantization nothing is lost
        zero = x.copy()
        zero[123:251] = 0  # zero blocks rebuilding to 0 lose nothing: no warning
        assert double_quant.zero_scales(double_quant.quantize(nf4.quantize(zero, 64).absmax),
                                        nf4.quantize(zero, 64).absmax).size == 0  # fmt: skip
    with pytest.raises(ValueError, match="absmax has shape"):
        double_quant.zero_scales(state.nested, absmax[:-1])
    with pytest.raises(ValueError, match="absmax has shape"):  # a mismatch is not read as no lost scales
        double_quant.warn_lost_scales(state.nested, absmax[:-1], "float32", 64, x.size)
    pytest.importorskip("torch")
    from reflora.backends.torch import ops
    from reflora.backends.torch.quant_state import numpy_to_torch

    with pytest.warns(double_quant.ZeroScaleWarning, match="128 of 256 block scales to exactly 0"):
        ts = ops.quantize_4bit(numpy_to_torch(x), 64, double_quant=True)
    assert ts.to_state() == state


@pytest.mark.parametrize("blocksize2", [1, 7, 100, 256, 300])
def test_blocksize2_is_taken_by_quantize_and_kept_by_merge(blocksize2):
    """nf4.quantize's groups of block scales: any positive size, as double_quant.quantize takes it (torchao's
    scaler_block_size); qlora.merge re-double-quantizes with the state's own (it used 256 whatever it was)."""
    from reflora import qlora

    x = np.random.default_rng(blocksize2).standard_normal((40, 96)).astype(np.float32)
    state = nf4.quantize(x, 32, double_quant=True, blocksize2=blocksize2)
    assert state.nested == double_quant.quantize(nf4.quantize(x, 32).absmax, blocksize2)
    assert state.nested.absmax2.size == -(-120 // blocksize2)
    merged, _ = qlora.merge(state, np.ones((1, 96)) / 8, np.ones((40, 1)) / 8, 1.0)
    assert merged.nested.blocksize2 == blocksize2
    for bad in (0, -1, True, 2.5):
        with pytest.raises(
            ValueError if bad in (0, -1) else TypeError, match="blocksize2 must be a positive int"
        ):
            nf4.quantize(x, 32, double_quant=True, blocksize2=bad)
    pytest.importorskip("torch")
    from reflora.backends.torch import ops
    from reflora.backends.torch.quant_state import numpy_to_torch

    ts = ops.quantize_4bit(numpy_to_torch(x), 32, double_quant=True, blocksize2=blocksize2)
    assert ts.to_state() == state  # byte for byte, and dequantized bit for bit
    np.testing.assert_array_equal(ops.dequantize_4bit(ts).numpy(), nf4.dequantize(state))


def test_flags_must_be_bools():
    """A string is truthy: double_quant='no' double-quantized. Every flag of the oracle takes True or False
    only (numpy's bool too)."""
    from reflora import bounds, memory
    from reflora.formats import bnb

    x = np.ones((4, 32), np.float32)
    calls = {
        "double_quant": [
            lambda v: nf4.quantize(x, 32, double_quant=v),
            lambda v: bnb.quantize_state_dict({"w": x}, targets=["w"], double_quant=v),
            lambda v: memory.bits_per_parameter(64, double_quant=v),
        ],
        "flush_to_zero": [lambda v: bounds.Arithmetic(flush_to_zero=v)],
        "fused": [lambda v: bounds.Arithmetic(fused=v)],
        "fold_scaling": [lambda v: bounds.Arithmetic(fold_scaling=v)],
        "fma_absmax": [lambda v: bounds.Arithmetic(fma_absmax=v)],
        "checkpointing": [lambda v: memory.training_memory(1e9, 16, layers=8, hidden=1024, checkpointing=v)],
    }
    for name, fns in calls.items():
        for fn in fns:
            for bad in ("no", 1, None):
                with pytest.raises(TypeError, match=f"{name} must be True or False, got {bad!r}"):
                    fn(bad)
            fn(np.bool_(False))
    assert bounds.Arithmetic(fused=np.bool_(True)).fused is True  # stored as a plain bool


def test_the_mean_and_the_scales_are_of_float32_values_only():
    """mean_f32([1, NaN]) was -2.7e11; a float64 absmax of 1e-60 became 0, a complex one lost its
    imaginary part, both without a word (an audit of the public API)."""
    with pytest.raises(ValueError, match=r"values\[1\] = nan; the mean is of finite values only"):
        double_quant.mean_f32(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match=r"values\[0\] = inf"):
        double_quant.mean_f32(np.array([np.inf], np.float32))
    with pytest.raises(ValueError, match=r"absmax\[0\] = 1e-60 is not a float32 value"):
        double_quant.quantize(np.array([1e-60, 1.0]))
    for bad in (np.array([1 + 1j, 2.0]), np.array([True, False]), np.array([None, 1.0], dtype=object)):
        with pytest.raises(TypeError, match="absmax must hold real numbers"):
            double_quant.quantize(bad)
    exact = double_quant.quantize(np.array([0.5, 2.0]))  # float64 values float32 holds: as float32
    assert exact == double_quant.quantize(np.array([0.5, 2.0], np.float32))
    assert double_quant.quantize(np.array([1, 3], np.int64)) == double_quant.quantize(
        np.array([1, 3], np.float32)
    )


def test_a_scale_rebuilt_past_float32_is_inf_without_numpy_warnings():
    x = np.full((256, 64), np.finfo(np.float32).max, np.float32)
    x[:1] = 0  # docs/spec.md's array: 255 scales rebuild past float32
    with pytest.warns(double_quant.ScaleRangeWarning):
        state = nf4.quantize(x, 64, double_quant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "overflow encountered in add/multiply/cast" were raised here
        out = nf4.dequantize(state)
        assert double_quant.scales_out_of_range(state.nested, "float32").size == 255
    assert np.isinf(out[1:]).all()
