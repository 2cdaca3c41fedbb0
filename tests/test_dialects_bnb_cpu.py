"""The ``bnb-cpu`` dialect against bitsandbytes 0.50 on this CPU, bit for bit.

Every comparison is of bits: packed bytes, absmax (NaN payloads included), the double-quantization
offset, codes and absmax2, and dequantized values, for float32/float16/bfloat16, NF4/FP4, every
blocksize, ragged/odd/prime shapes, and adversarial values. Two things are compared more loosely, each
for a stated reason: NaN *bits* from bnb's torch fallback dequantize in bfloat16 (0x7fc0 when
torch.compile ran, 0xffff when it ran eagerly; which one depends on the process's history), and the
native dequantize on hosts other than AVX2 x86 (a different C++ path, read but not modelled).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="comparing with bitsandbytes needs torch")
bnb_f = pytest.importorskip(
    "bitsandbytes.functional", reason="the bnb-cpu dialect is checked against bitsandbytes itself"
)
from bnb_helpers import BF16, bits, eager_bnb, to_torch  # noqa: E402, F401  (eager_bnb: autouse)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from reflora import codebooks, dialects  # noqa: E402
from reflora.dialects import bnb_cpu  # noqa: E402
from reflora.dialects.torch_cpu import Host  # noqa: E402
from reflora.state import BLOCKSIZES  # noqa: E402

DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
CAPABILITY = torch.backends.cpu.get_cpu_capability()
HOST = Host(lanes=16 if CAPABILITY.startswith("AVX512") else 8, threads=torch.get_num_threads())
NATIVE_MODELLED = CAPABILITY == "AVX2"  # the dialect models bnb's scalar C++ dequantize (AVX2 hosts)
F32 = np.float32


def assert_bits(name: str, got, want, ctx: str, nan_bits_free: bool = False) -> None:
    g, w = bits(got), bits(want)
    assert g.shape == w.shape, f"{name}: shape {g.shape} != bnb {w.shape} [{ctx}]"
    same = g == w
    if nan_bits_free:  # compare NaN-ness only where both are NaN (see module docstring)
        fg = np.asarray(got, dtype=np.float32).reshape(-1)
        fw = (want.float() if isinstance(want, torch.Tensor) else np.asarray(want, np.float32)).reshape(-1)
        same |= np.isnan(fg) & np.isnan(np.asarray(fw))
    if not same.all():
        i = np.flatnonzero(~same)
        raise AssertionError(
            f"{name}: {i.size}/{g.size} elements differ from bitsandbytes, first at {i[0]}: "
            f"dialect 0x{int(g[i[0]]):x}, bnb 0x{int(w[i[0]]):x} [{ctx}]"
        )


def check_against_bnb(x: np.ndarray, blocksize: int, quant_type: str, double_quant: bool) -> None:
    """Quantize and dequantize with bnb and with the dialect; assert every field bit for bit."""
    ctx = f"dtype={x.dtype}, shape={x.shape}, blocksize={blocksize}, {quant_type}, dq={double_quant}"
    packed, qs = bnb_f.quantize_4bit(
        to_torch(x), blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    state = bnb_cpu.quantize(x, blocksize, quant_type=quant_type, double_quant=double_quant, host=HOST)
    assert packed.shape == ((x.size + 1) // 2, 1), ctx
    assert_bits("packed", state.packed, packed, ctx)
    assert_bits("code", state.code, qs.code, ctx)
    if double_quant:
        assert_bits(
            "offset (torch mean emulated)", np.array([state.nested.offset]), qs.offset.reshape(1), ctx
        )
        assert_bits("absmax_q", state.nested.absmax_q, qs.absmax, ctx)
        assert_bits("absmax2", state.nested.absmax2, qs.state2.absmax, ctx)
        assert_bits("code2", state.nested.code2, qs.state2.code, ctx)
    else:
        assert_bits("absmax", state.absmax, qs.absmax, ctx)
    native = bnb_cpu.uses_native_dequantize(x.shape)
    if native and not NATIVE_MODELLED:
        return
    try:
        expected_shape = bnb_cpu.output_shape(x.shape)
    except ValueError:  # the dialect says bnb cannot dequantize this shape: it must fail too
        with pytest.raises(RuntimeError):
            bnb_f.dequantize_4bit(packed, qs)
        return
    out = bnb_f.dequantize_4bit(packed, qs)
    assert tuple(out.shape) == expected_shape, ctx
    fallback_bf16 = not native and x.dtype == BF16
    assert_bits("dequantized", bnb_cpu.dequantize(state), out, ctx, nan_bits_free=fallback_bf16)


def normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    scale = np.exp(rng.uniform(-8, 4))
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


# Ragged, odd, prime, one-element, 3-D and native/fallback dequantize layouts.
SHAPES = [(1,), (2,), (3,), (2, 1), (1, 2), (8,), (7, 13), (33, 64), (1009,), (3, 5, 8), (4133,), (2, 2051)]


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_grid(dtype, quant_type, blocksize):
    rng = np.random.default_rng(blocksize * 7 + len(quant_type) + dtype.itemsize)
    for shape in SHAPES:
        for double_quant in (False, True):
            check_against_bnb(normal(rng, shape, dtype), blocksize, quant_type, double_quant)


def test_registry_exposes_the_dialect():
    assert dialects.get("bnb-cpu") is bnb_cpu
    assert bnb_cpu.NAME == "bnb-cpu" and bnb_cpu.DESCRIPTION


def _threshold_blocks(quant_type: str, scale: np.float32) -> np.ndarray:
    """Blocks of 64 with absmax ``scale``: each float32 midpoint times scale, +-1 ulp, and negated."""
    mids = bnb_cpu.MIDPOINTS[quant_type]
    blocks = []
    for m in np.concatenate([mids, np.nextafter(mids, F32(2)), np.nextafter(mids, F32(-2))]):
        block = np.zeros(64, dtype=np.float32)
        v = F32(m * scale)
        block[:6] = [scale, v, np.nextafter(v, F32(np.inf)), np.nextafter(v, F32(-np.inf)), -v, -scale]
        blocks.append(block)
    return np.concatenate(blocks)


def _between_midpoints(quant_type: str, rng: np.random.Generator, count: int = 64) -> np.ndarray:
    """Blocks whose x/absmax lies strictly between a float32 midpoint and the exact midpoint.

    m*a is exact in float64 (at most 25 + 24 significant bits), so ``x`` vs ``m*a`` decides exactly.
    """
    values = np.unique(codebooks.get(quant_type).values)  # distinct, ascending
    exact = (values[:-1].astype(np.float64) + values[1:]) / 2
    m32 = ((values[:-1] + values[1:]) / F32(2)).astype(np.float64)
    found = []
    while len(found) < count:
        a = F32(rng.uniform(0.01, 100))
        i = rng.integers(len(exact))
        lo, hi = sorted((exact[i], m32[i]))
        if lo == hi:
            continue
        x = F32(exact[i] * a)
        for cand in (x, *(np.nextafter(x, F32(s * np.inf)) for s in (1, -1))):
            if lo * a < float(cand) < hi * a:
                block = np.zeros(64, dtype=np.float32)
                block[0], block[1] = a, cand
                found.append(block)
    return np.concatenate(found)


def _adversarial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20260)
    nan, inf = F32(np.nan), F32(np.inf)
    cases: dict[str, np.ndarray] = {}

    def base(n: int) -> np.ndarray:
        return rng.standard_normal(n).astype(np.float32)

    x = base(197)
    x[3] = nan
    cases["nan in a full block"] = x
    x = base(197)
    x[193] = nan
    cases["nan in a ragged tail of 5"] = x
    x = base(193)
    x[192] = -nan
    cases["negative nan as a tail of 1"] = x
    x = base(128)
    x[5], x[9] = nan, -nan
    cases["two nans in a block"] = x
    x = base(197)
    x[7] = inf
    cases["+inf"] = x
    x = base(197)
    x[7], x[194] = -inf, inf
    cases["-inf and +inf in the tail"] = x
    x = base(198)
    x[64:128] = 0
    x[192:] = 0
    cases["all-zero full and partial blocks"] = x
    x = base(198)
    x[64:128] *= F32(1e-40)
    x[192:] *= F32(1e-44)
    cases["subnormal blocks"] = x
    x = np.zeros(256, dtype=np.float32)
    x[-1] = F32(1.4e-45)
    cases["smallest subnormal"] = x
    x = base(198) * F32(1e-6)
    cases["float16 subnormal range"] = x
    x = np.full(134, F32(65504))
    x[::5] *= -1
    x[7] = F32(65519.996)  # rounds to float16 max, one ulp more overflows
    cases["near float16 max"] = x
    x = np.full(134, F32(3.4e38))
    x[::3] *= -1
    cases["near float32 max"] = x
    x = base(198)
    x[64:128] *= F32(1e37)
    cases["huge block"] = x
    for qt in ("nf4", "fp4"):
        for scale in (F32(1), F32(0.3), F32(7.77), F32(1e-3)):
            cases[f"{qt} thresholds x {scale}"] = _threshold_blocks(qt, scale)
        cases[f"{qt} between float32 and exact midpoints"] = _between_midpoints(qt, rng)
    return cases


ADVERSARIAL = _adversarial()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial(name, dtype, double_quant):
    with np.errstate(over="ignore"):  # float32 max overflows float16 to inf, on purpose
        x = ADVERSARIAL[name].astype(dtype)
    layouts = [x, x.reshape(-1, 2) if x.size % 2 == 0 else x.reshape(-1, 1)]  # native and fallback
    for quant_type in ("nf4", "fp4"):
        for blocksize in (32, 64):
            for layout in layouts:
                check_against_bnb(layout, blocksize, quant_type, double_quant)


def test_float16_nan_payloads_follow_torch_vector_and_scalar_loops():
    # torch widens float16 NaN in its vector loop with the payload kept, in the scalar tail as 0x7fffffff.
    h = normal(np.random.default_rng(5), (8 * 9 + 5,), np.dtype(np.float16))
    h.view(np.uint16)[[0, 40, 75]] = [0x7E01, 0xFC01, 0x7C05]  # quiet, signalling, signalling
    for blocksize in (32, 64):
        check_against_bnb(h, blocksize, "nf4", False)
        check_against_bnb(h, blocksize, "nf4", True)


def test_nan_block_codes_and_dequantize_quirks():
    # Stated rules, checked on bnb directly so that a bnb change shows up here with a clear message.
    x = np.array([1.0, np.nan, -2.0, 0.5, 3.0, -1.0], dtype=np.float32)
    state = bnb_cpu.quantize(x, 32)
    assert bits(state.absmax)[0] == 0xFFFFFFFF  # a NaN in a ragged tail of 6
    assert state.packed.tolist() == [0xFF] * 3  # every code of the block is 15
    assert bnb_cpu.quantize(x, 32, quant_type="fp4").packed.tolist() == [0x33] * 3
    out = bnb_cpu.dequantize(bnb_cpu.quantize(x.astype(BF16), 32))
    assert bits(out).tolist() == [0] * 6  # native float_to_bf16(0xffffffff) wraps to +0.0
    ninf = bnb_cpu.dequantize(bnb_cpu.quantize(np.array([-np.inf, 1.0], dtype=np.float32), 32))
    assert ninf[0] == np.inf  # -inf gets code 15 and comes back +inf
    check_against_bnb(x.astype(BF16), 32, "nf4", False)


@pytest.mark.parametrize(
    "shape", [(1,), (2,), (3,), (6,), (1, 2), (2, 1), (1, 1), (4, 6), (3, 5), (2, 2, 4)], ids=str
)
def test_output_shape(shape):
    x = np.arange(1, math.prod(shape) + 1, dtype=np.float32).reshape(shape)
    packed, qs = bnb_f.quantize_4bit(to_torch(x), blocksize=64, quant_type="nf4")
    out = bnb_f.dequantize_4bit(packed, qs)
    assert tuple(out.shape) == bnb_cpu.output_shape(shape)
    mine = bnb_cpu.dequantize(bnb_cpu.quantize(x, 64))  # the dialect returns bnb's shape, in bnb's order
    assert mine.shape == tuple(out.shape) and (mine == out.numpy()).all()


@pytest.mark.parametrize(("shape", "error"), [((1, 1, 2), RuntimeError), ((), IndexError)], ids=str)
def test_output_shape_where_bnb_fails(shape, error):
    x = np.ones(shape, dtype=np.float32)
    packed, qs = bnb_f.quantize_4bit(to_torch(x), blocksize=64, quant_type="nf4")
    with pytest.raises(error):
        bnb_f.dequantize_4bit(packed, qs)
    with pytest.raises(ValueError, match="bitsandbytes fails"):
        bnb_cpu.output_shape(shape)
    assert bnb_cpu.dequantize(bnb_cpu.quantize(x, 64)).shape == shape  # the dialect itself does not


def test_compiled_fallback_dequantize():
    """bnb's torch fallback as bnb runs it (torch.compile on): values exact, bf16 NaN 0x7fc0 or 0xffff."""
    torch._dynamo.config.disable = False
    try:
        for dtype in DTYPES:
            x = normal(np.random.default_rng(3), (5, 13), dtype)
            x[1, 2] = np.nan
            packed, qs = bnb_f.quantize_4bit(to_torch(x), blocksize=64, quant_type="nf4")
            out = bnb_f.dequantize_4bit(packed, qs)
            mine = bnb_cpu.dequantize(bnb_cpu.quantize(x, 64))
            assert_bits("dequantized", mine, out, f"compiled {dtype}", nan_bits_free=dtype == BF16)
            if dtype == BF16:
                nan_bits = set(bits(out)[np.isnan(out.float().numpy().reshape(-1))].tolist())
                assert nan_bits <= {0x7FC0, 0xFFFF}, nan_bits
    finally:
        torch._dynamo.config.disable = True


def test_8bit_lut_quantizer_at_every_bin_edge():
    # Values on, just above and just below each of the 65535 LUT bin edges, in blocks whose absmax is 1.
    k = np.arange(65535)
    edges = (2 * (k + 0.5) / 65535 - 1).astype(np.float32)
    values = np.concatenate([edges, np.nextafter(edges, F32(2)), np.nextafter(edges, F32(-2))])
    values = values[np.abs(values) <= 1]
    pad = -values.size % 255
    blocks = np.concatenate([values, np.zeros(pad, dtype=np.float32)]).reshape(-1, 255)
    x = np.concatenate([np.ones((blocks.shape[0], 1), dtype=np.float32), blocks], axis=1).reshape(-1)
    codes, qs = bnb_f.quantize_blockwise(to_torch(x), blocksize=256)
    mine, absmax2 = bnb_cpu.quantize_8bit(x, 256)
    assert_bits("8-bit codes", mine, codes, "LUT bin edges")
    assert_bits("absmax2", absmax2, qs.absmax, "LUT bin edges")
    assert mine[x.tolist().index(0.0)] == 131  # 0.0 lands in bin 32768, whose nearest code is 2.125e-5


def test_double_quant_replays_a_given_offset():
    x = normal(np.random.default_rng(11), (77, 64), np.dtype(np.float32))
    _, qs = bnb_f.quantize_4bit(to_torch(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    off = F32(qs.offset.item()) * F32(1.0000001)  # a different offset must be used as given
    state = bnb_cpu.quantize(x, 64, double_quant=True, offset=off)
    assert state.nested.offset == off
    ref_q, _ = bnb_f.quantize_blockwise(
        to_torch(bnb_cpu.block_absmax(x.reshape(-1), 64) - off), blocksize=256
    )
    assert_bits("absmax_q", state.nested.absmax_q, ref_q, "given offset")


# --- hypothesis: random arrays salted with special values ------------------------------------------

SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-45, 3.4e38, 1.0, -1.0, 65504.0, 1e-8]


@st.composite
def salted_arrays(draw):
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="shape"))
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    x = normal(np.random.default_rng(seed), shape, np.dtype(np.float32)).reshape(-1)
    salt = draw(
        st.lists(
            st.tuples(
                st.integers(0, x.size - 1),
                st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=False)),
            ),
            max_size=4,
        ),
        label="salt",
    )
    for i, v in salt:
        x[i] = v
    with np.errstate(over="ignore"):
        return x.astype(dtype).reshape(shape)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=salted_arrays(),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
)
def test_hypothesis_against_bnb(x, blocksize, quant_type, double_quant):
    check_against_bnb(x, blocksize, quant_type, double_quant)
