"""The canonical 4-bit rules of reflora.nf4, each as a property or an explicit case."""

import dataclasses
import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reflora import QuantState, codebooks, double_quant, nf4
from reflora.state import BLOCKSIZES, NestedState

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
# Binary exponents each dtype's strategy scales [-1, 1] by: into its subnormals and far up, never to inf.
EXPONENTS = {np.dtype(np.float32): (-140, 100), np.dtype(np.float16): (-20, 15), BF16: (-130, 100)}


@st.composite
def arrays(draw, min_size=1):
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    rows = draw(st.integers(1, 4), label="rows")
    cols = draw(st.integers(max(1, -(-min_size // rows)), 300), label="cols")
    shape = draw(st.sampled_from([(rows * cols,), (rows, cols), (1, rows, cols)]), label="shape")
    exponent = draw(st.integers(*EXPONENTS[dtype]), label="binary exponent of the scale")
    elements = st.floats(-1.0, 1.0, width=32, allow_subnormal=True)
    base = draw(hnp.arrays(np.float32, shape, elements=elements), label="values in [-1, 1]")
    x = np.ldexp(base, exponent).astype(np.float32)
    zero_run = draw(st.booleans(), label="zero run")
    if zero_run and x.size > 1:
        x.reshape(-1)[: x.size // 2] = 0  # an all-zero block or two
    return x.astype(dtype)


blocksizes = st.sampled_from(BLOCKSIZES)
quant_types = st.sampled_from(["nf4", "fp4"])


@given(x=arrays(), bs=blocksizes, qt=quant_types)
def test_quantize_dequantize_quantize_is_idempotent(x, bs, qt):
    s1 = nf4.quantize(x, bs, quant_type=qt)
    y = nf4.dequantize(s1)
    # Holds while the dequantized values are normal numbers of the dtype: their rounding then moves
    # x/absmax by at most 2**-8 relative, far less than any code's distance to its thresholds.
    # (test_idempotence_fails_in_subnormals shows why subnormals are excluded.)
    tiny = ml_dtypes.finfo(x.dtype).smallest_normal
    assume(np.all((y == 0) | (np.abs(y.astype(np.float32)) >= tiny)))
    assert nf4.quantize(y, bs, quant_type=qt) == s1


def test_idempotence_fails_in_subnormals():
    # float16 subnormals are multiples of 2**-24: 0.0052083*absmax = 2.0e-8 rounds to 0, code 1 -> 0.
    x = np.array([2.4e-07, 3.8e-06], dtype=np.float16)
    s1 = nf4.quantize(x, 32, quant_type="fp4")
    assert nf4.unpack(s1.packed, 2).tolist() == [1, 3]
    assert nf4.dequantize(s1)[0] == 0
    assert nf4.unpack(nf4.quantize(nf4.dequantize(s1), 32, quant_type="fp4").packed, 2).tolist() == [0, 3]


@given(x=arrays(), bs=blocksizes, qt=quant_types)
def test_error_is_at_most_half_the_widest_gap_times_absmax(x, bs, qt):
    state = nf4.quantize(x, bs, quant_type=qt)
    out = nf4.dequantize(state, dtype="float32").astype(np.float64).reshape(-1)
    flat = x.astype(np.float64).reshape(-1)
    absmax = np.repeat(state.absmax, bs)[: flat.size].astype(np.float64)
    half_gap = codebooks.widest_half_gap(codebooks.get(qt))
    # dequantization to float32 adds one rounding: half an ulp of the result, or of the smallest
    # subnormal when the result is that small
    rounding = np.maximum(np.abs(out) * 2.0**-24, 2.0**-150)
    assert np.all(np.abs(out - flat) <= half_gap * absmax + rounding)


@given(x=arrays(min_size=2), bs=blocksizes, qt=quant_types)
def test_monotone_within_a_block(x, bs, qt):
    # Sort the values of each block: codes' values must come out sorted too (absmax is unchanged).
    flat = x.reshape(-1).astype(np.float32)
    blocks = [np.sort(flat[i : i + bs]) for i in range(0, flat.size, bs)]
    y = np.concatenate(blocks).astype(x.dtype)
    out = nf4.dequantize(nf4.quantize(y, bs, quant_type=qt), dtype="float32")
    for i in range(0, flat.size, bs):
        assert np.all(np.diff(out[i : i + bs]) >= 0)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_ties_at_representable_midpoints_go_to_the_lower_value(qt):
    cb = codebooks.get(qt)
    distinct = np.unique(cb.values)
    for i, m in enumerate(cb.thresholds):
        if float(np.float32(m)) != m:
            continue  # not reachable exactly from float32 inputs
        x = np.array([1.0, m], dtype=np.float32)  # absmax 1: the second value is exactly on the midpoint
        state = nf4.quantize(x, 32, quant_type=qt)
        assert nf4.dequantize(state)[1] == distinct[i]


def test_window_between_float32_and_exact_midpoint_decides_by_the_exact_one():
    # NF4 threshold 14: exact 0.86147841811..., float32 midpoint 0.86147844791... (the next float32
    # above the exact one). That float32 value is nearer to 1.0 than to 0.7229568 in exact arithmetic,
    # though bitsandbytes, comparing with the float32 midpoint, calls it a tie and takes code 14.
    x = (codebooks.NF4.values[14] + codebooks.NF4.values[15]) / np.float32(2)  # the float32 midpoint
    assert codebooks.NF4.thresholds[14] < x
    state = nf4.quantize(np.array([1.0, x], dtype=np.float32), 64)
    assert nf4.unpack(state.packed, 2).tolist() == [15, 15]


def test_packing_puts_element_2j_in_the_high_nibble_and_pads_odd_n_with_the_zero_code():
    state = nf4.quantize(np.array([1.0, -1.0, 1.0], dtype=np.float32), 64)
    assert state.packed.tolist() == [0xF0, 0xF7]
    fp4 = nf4.quantize(np.array([1.0, -1.0, 1.0], dtype=np.float32), 64, quant_type="fp4")
    assert fp4.packed.tolist() == [0x3B, 0x30]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_blocks(dtype):
    x = np.zeros(64 + 64 + 7, dtype=dtype)
    x[64:128] = np.linspace(-1, 1, 64).astype(dtype)
    state = nf4.quantize(x, 64)
    assert state.absmax.tolist()[0] == 0.0 and state.absmax.tolist()[2] == 0.0  # full and partial
    q = nf4.unpack(state.packed, x.size)
    assert np.all(q[:64] == 7) and np.all(q[128:] == 7)
    out = nf4.dequantize(state)
    assert np.all(out[:64] == 0) and not np.any(np.signbit(out[:64].astype(np.float32)))


def test_ragged_tail_uses_only_its_own_elements():
    x = np.concatenate([np.full(64, 100.0), np.array([0.5, -0.25])]).astype(np.float32)
    state = nf4.quantize(x, 64)
    assert state.absmax.tolist() == [100.0, 0.5]
    # -0.25/0.5 = -0.5 is nearest to code 2 (-0.52507305): the tail is scaled by 0.5, not by 100
    assert nf4.dequantize(state)[64:].tolist() == [0.5, float(codebooks.NF4.values[2] * np.float32(0.5))]


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 65), (65,), (7, 5, 3), (2, 4097)])
@pytest.mark.parametrize("bs", [32, 4096])
def test_degenerate_shapes_round_trip(shape, bs):
    rng = np.random.default_rng(sum(shape) + bs)
    x = rng.standard_normal(shape).astype(np.float32)
    state = nf4.quantize(x, bs)
    n = math.prod(shape)
    assert state.shape == shape and state.packed.size == (n + 1) // 2
    assert state.absmax.size == math.ceil(n / bs)
    assert nf4.dequantize(state).shape == shape


def test_non_contiguous_input_is_quantized_as_the_array_it_shows():
    x = np.random.default_rng(0).standard_normal((70, 33)).astype(np.float32)
    view = x.T[::2]  # transposed and strided
    assert not view.flags.c_contiguous
    assert nf4.quantize(view, 64) == nf4.quantize(np.ascontiguousarray(view), 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_the_first_bad_index(dtype, bad):
    x = np.ones((3, 5), dtype=dtype)
    x[2, 1] = bad
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"index \(2, 1\) \(flat index 11\)"):
        nf4.quantize(x)


@pytest.mark.parametrize("bs", [0, 16, 63, 65, 8192, -64])
def test_blocksize_must_be_a_power_of_two_from_32_to_4096(bs):
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(np.ones(8, np.float32), bs)


@pytest.mark.parametrize("bs", [64.0, True, "64", None], ids=repr)
def test_blocksize_must_be_an_integer(bs):
    # 64.0 == 64 and True == 1: a membership test alone would take the first and misreport the second.
    with pytest.raises(TypeError, match="blocksize must be an int"):
        nf4.quantize(np.ones(8, np.float32), bs)
    state = nf4.quantize(np.ones(8, np.float32), 64)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        QuantState(state.packed, state.absmax, state.shape, state.dtype, bs, "nf4", state.code)


def test_a_numpy_integer_blocksize_is_stored_as_int():
    state = nf4.quantize(np.ones(8, np.float32), np.int64(64), double_quant=True)
    assert type(state.blocksize) is int and type(state.nested.blocksize2) is int
    assert state == nf4.quantize(np.ones(8, np.float32), 64, double_quant=True)


@pytest.mark.parametrize("x", [np.ones(4, np.float64), np.ones(4, np.int32), np.ones(4, bool)], ids=str)
def test_other_dtypes_are_refused(x):
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        nf4.quantize(x)


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(np.zeros((0, 4), np.float32))


def test_dequantize_is_one_float32_multiply_then_one_rounding():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(4096) * 3).astype(np.float32)
    state = nf4.quantize(x, 128)
    q = nf4.unpack(state.packed, x.size)
    product = state.code[q] * np.repeat(state.absmax, 128)  # float32 * float32
    for dtype in DTYPES:
        assert np.array_equal(nf4.dequantize(state, dtype), product.astype(dtype))
    assert nf4.dequantize(state).dtype == np.float32


def test_state_is_immutable_and_validated():
    state = nf4.quantize(np.ones(10, np.float32), 64)
    with pytest.raises(ValueError):
        state.packed[0] = 1
    with pytest.raises(AttributeError):
        state.blocksize = 32
    with pytest.raises(ValueError, match="packed has 4 bytes"):
        QuantState(state.packed[:4], state.absmax, (10,), np.float32, 64, "nf4", state.code)
    with pytest.raises(ValueError, match="block scales"):
        QuantState(state.packed, np.ones(2, np.float32), (10,), np.float32, 64, "nf4", state.code)


def test_equality_is_bitwise():
    x = np.random.default_rng(3).standard_normal(100).astype(np.float32)
    a, b = nf4.quantize(x), nf4.quantize(x.copy())
    assert a == b
    y = x.copy()
    y[np.argmax(np.abs(y))] *= 1.0000001  # the block's absmax moves by one ulp
    assert nf4.quantize(y) != a


@pytest.mark.parametrize("dtype", ["f4", "f2"])
def test_non_native_byte_order_is_taken_by_value(dtype):
    x = np.random.default_rng(2).standard_normal((3, 70)).astype(dtype)
    swapped = x.astype(np.dtype(dtype).newbyteorder("S"))  # the same values, bytes in the other order
    assert not swapped.dtype.isnative and np.array_equal(swapped, x)
    state = nf4.quantize(swapped, 32, double_quant=True)
    assert state == nf4.quantize(x, 32, double_quant=True) and state.dtype.isnative
    assert np.array_equal(nf4.dequantize(state), nf4.dequantize(nf4.quantize(x, 32, double_quant=True)))


def _state_args() -> dict:
    """QuantState's arguments for ten float32 values in one block of 64."""
    s = nf4.quantize(np.arange(1, 11, dtype=np.float32), 64)
    fields = ("packed", "absmax", "shape", "dtype", "blocksize", "quant_type", "code")
    return {k: getattr(s, k) for k in fields}


@pytest.mark.parametrize(
    ("shape", "error", "match"),
    [
        ((-2, -5), ValueError, "negative dimension"),  # the product, 10, would fit packed and absmax
        ((2.5, 4), TypeError, "sequence of ints"),  # int() would truncate it to (2, 4)
        ((True, 10), TypeError, "sequence of ints"),
        ("10", TypeError, "sequence of ints"),
        (10, TypeError, "sequence of ints"),
    ],
    ids=repr,
)
def test_state_shape_must_be_non_negative_ints(shape, error, match):
    with pytest.raises(error, match=match):
        QuantState(**{**_state_args(), "shape": shape})


def test_state_shape_must_have_an_element():
    empty = {"packed": np.zeros(0, np.uint8), "absmax": np.zeros(0, np.float32), "shape": (0,)}
    with pytest.raises(ValueError, match="no elements"):
        QuantState(**{**_state_args(), **empty})
    assert QuantState(**{**_state_args(), "shape": (np.int64(2), 5)}).shape == (2, 5)


def test_state_takes_a_private_copy_even_of_a_read_only_view():
    args = _state_args()
    base = args["packed"].copy()  # writable
    view = base.view()
    view.setflags(write=False)  # read-only, but its memory is still written through base
    state = QuantState(**{**args, "packed": view})
    before = nf4.dequantize(state).copy()
    base[:] = 0
    assert np.array_equal(nf4.dequantize(state), before)
    assert state.packed.tobytes() == args["packed"].tobytes() and not state.packed.flags.writeable


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_dequantize_refuses_a_scale_the_rules_cannot_store(bad):
    absmax = np.array([bad], np.float32)
    state = QuantState(**{**_state_args(), "absmax": absmax})  # a container for any implementation's scales
    with pytest.raises(ValueError, match=r"absmax\[0\] = .*finite and >= 0"):
        nf4.dequantize(state)
    dq = nf4.quantize(np.arange(1, 11, dtype=np.float32), 64, double_quant=True)
    nested = dataclasses.replace(dq.nested, absmax2=absmax)
    with pytest.raises(ValueError, match=r"nested.absmax2\[0\] = .*finite and >= 0"):
        nf4.dequantize(dataclasses.replace(dq, nested=nested))


def test_dequantize_takes_any_finite_offset():
    dq = nf4.quantize(np.arange(1, 11, dtype=np.float32), 64, double_quant=True)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match=r"nested.offset = .*must be finite"):
            nf4.dequantize(dataclasses.replace(dq, nested=dataclasses.replace(dq.nested, offset=bad)))
    # A negative offset is no rule's output, but the rebuild is defined and may give negative scales anyway.
    shifted = dataclasses.replace(dq, nested=dataclasses.replace(dq.nested, offset=-20.0))
    scale = double_quant.dequantize(shifted.nested)[0]
    assert scale < 0
    assert np.array_equal(nf4.dequantize(shifted), dq.code[nf4.unpack(dq.packed, 10)] * scale)


def _outlier_matrix() -> np.ndarray:
    x = np.full((256, 64), 1e-3, np.float32)
    x[:, 1] = -2e-3
    x[-1, 0] = 100.0
    return x


def test_double_quant_warns_when_block_scales_rebuild_negative_and_keeps_the_bytes():
    x = _outlier_matrix()
    expected = r"255 of 256 block scales negative \(first: block 0, flat elements 0 to 63\).*without double"
    with pytest.warns(double_quant.NegativeScaleWarning, match=expected):
        state = nf4.quantize(x, 64, double_quant=True)
    # The bytes are the format's: the plain codes, and the scales double-quantized by rule.
    plain = nf4.quantize(x, 64)
    assert np.array_equal(state.packed, plain.packed) and state.nested == double_quant.quantize(plain.absmax)
    scales = nf4.block_scales(state)
    assert scales.min() == np.float32(-0.015150517) and (scales < 0).sum() == 255 and scales[-1] > 0
    np.testing.assert_allclose(nf4.dequantize(state)[0, :3], [-0.0066770, 0.0151505, -0.0066770], rtol=1e-4)


def test_a_zero_block_with_a_negative_scale_dequantizes_to_negative_zero():
    x = _outlier_matrix()
    x[:4] = 0  # four all-zero blocks; their c = -offset rounds down past -offset too
    with pytest.warns(double_quant.NegativeScaleWarning, match="255 of 256"):
        state = nf4.quantize(x, 64, double_quant=True)
    out = nf4.dequantize(state)
    assert (out[:4] == 0).all() and np.signbit(out[:4]).all()


def test_double_quant_is_quiet_when_every_scale_rebuilds_non_negative():
    x = (np.random.default_rng(0).standard_normal((64, 4096)) * 0.02).astype(np.float32)
    x[3, 5] = 50.0  # one outlier block: here -offset/absmax2 rounds up, so nothing flips
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = nf4.quantize(x, 64, double_quant=True)
        assert (nf4.block_scales(state) >= 0).all()
        other_blocksize = nf4.quantize(_outlier_matrix(), 32, double_quant=True)  # no warning: none flips
        assert (nf4.block_scales(other_blocksize) >= 0).all()


def test_a_nested_state_takes_a_scalar_offset_only() -> None:
    # An offset array was applied block by block by block_scales, and broke dequantize and the bnb writer.
    good = nf4.quantize(np.arange(1, 513, dtype=np.float32), 64, double_quant=True).nested
    for offset in (np.array([0.5, 100.0], np.float32), np.array([0.5], np.float32)):
        with pytest.raises(ValueError, match="offset must be a scalar"):
            NestedState(good.absmax_q, good.absmax2, good.code2, offset, good.blocksize2)


def test_a_state_stays_a_value_through_pickle_and_copy() -> None:
    # After pickle.loads or copy.deepcopy the arrays were writable, and a write changed the state; on any
    # state setflags(write=True) succeeded, since each array owned its private copy.
    import copy
    import pickle

    state = nf4.quantize(np.arange(1, 513, dtype=np.float32), 64, double_quant=True)
    for other in (pickle.loads(pickle.dumps(state)), copy.deepcopy(state), copy.copy(state)):
        assert other == state
        for a in (other.packed, other.code, other.nested.absmax_q, other.nested.absmax2, other.nested.code2):
            assert not a.flags.writeable
            with pytest.raises(ValueError, match="WRITEABLE"):
                a.setflags(write=True)
            # nor through the array it views: `s.packed.base.setflags(write=True)` then a write changed
            # the state (an audit); the copy now lives in immutable bytes
            with pytest.raises(ValueError, match="WRITEABLE"):
                a.base.setflags(write=True)


# ---- from an audit of the public API's edge cases (each once passed silently or failed obscurely) ----


def test_pack_and_unpack_refuse_what_they_would_corrupt():
    codes = np.array([1, 2, 3], np.uint8)
    assert nf4.pack(codes, 7).tolist() == [0x12, 0x37]
    with pytest.raises(ValueError, match=r"q\[0\] = 16: a 4-bit code is at most 15"):
        nf4.pack(np.array([16, 1, 3], np.uint8), 7)  # was [1, 55]: 16 spilled into the next nibble
    for bad in (np.array([1, 2, 3]), np.array([[1, 2], [3, 4]], np.uint8), [1, 2]):
        with pytest.raises(TypeError, match="q must be a 1-D uint8 array of codes"):
            nf4.pack(bad, 7)
    for pad in (-1, 16, True, 7.0):
        with pytest.raises(TypeError, match="pad must be an int code"):
            nf4.pack(codes, pad)
    packed = np.array([0x12, 0x34], np.uint8)
    assert nf4.unpack(packed, 3).tolist() == [1, 2, 3] and nf4.unpack(packed.reshape(2, 1), 4).tolist() == [
        1,
        2,
        3,
        4,
    ]
    for n in (5, -1):  # 5 gave 4 codes; -1 sliced from the end
        with pytest.raises(ValueError, match="2 bytes hold 0 to 4 codes"):
            nf4.unpack(packed, n)
    with pytest.raises(TypeError, match="packed must be a uint8 array"):
        nf4.unpack(np.array([0x1FF]), 2)  # an int64 "byte" was cut to 8 bits
    with pytest.raises(TypeError, match="n must be an int"):
        nf4.unpack(packed, 2.0)


def test_dequantize_refuses_a_non_finite_table_and_anything_but_a_state():
    x = np.linspace(-1, 1, 96, dtype=np.float32)
    plain, dq = nf4.quantize(x, 32), nf4.quantize(x, 32, double_quant=True)
    with pytest.raises(ValueError, match=r"code\[0\] = nan: a code table must be finite"):
        nf4.dequantize(dataclasses.replace(plain, code=np.full(16, np.nan, np.float32)))
    bad2 = dataclasses.replace(dq.nested, code2=np.full(256, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"nested\.code2\[0\] = nan"):
        nf4.dequantize(dataclasses.replace(dq, nested=bad2))
    for f in (nf4.dequantize, nf4.block_scales):
        with pytest.raises(TypeError, match=r"state must be a reflora\.QuantState, got ndarray"):
            f(x)
    with pytest.raises(TypeError, match="quant_type must be the str"):
        dataclasses.replace(plain, quant_type=np.array(["nf4"]))
    with pytest.raises(TypeError, match="nested must be a NestedState or None, got dict"):
        dataclasses.replace(dq, nested={"absmax_q": 1})
    with pytest.raises(ValueError, match="offset 1e\\+39 is beyond float32's range"):
        dataclasses.replace(dq.nested, offset=1e39)  # was stored as inf, with a numpy warning
    with pytest.raises(ValueError, match="blocksize2 must be a positive int of at most 2\\*\\*31 - 1"):
        nf4.quantize(x, 32, double_quant=True, blocksize2=10**20)  # was "Maximum allowed dimension exceeded"


def test_output_dtypes_are_read_as_numpy_reads_them():
    state = nf4.quantize(np.linspace(-1, 1, 64, dtype=np.float32), 64)
    for name in ("f4", "<f4", ">f4", np.float32, np.dtype(">f4")):
        out = nf4.dequantize(state, name)
        assert out.dtype == np.float32 and out.dtype.byteorder in "=|"
    for d in ("float64", np.float64):  # the same refusal, whichever way it is named
        with pytest.raises(TypeError, match="reflora works in float32, float16 and bfloat16, not float64"):
            nf4.dequantize(state, d)
    with pytest.raises(ValueError, match="dtype must be one of"):
        nf4.dequantize(state, "f44")
