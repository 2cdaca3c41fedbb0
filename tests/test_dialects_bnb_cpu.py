"""The ``bnb-cpu`` dialect against bitsandbytes 0.50 on this CPU, bit for bit.

Every comparison is of bits: packed bytes, absmax (NaN payloads included), the double-quantization
offset, codes and absmax2, and dequantized values, for float32/float16/bfloat16, NF4/FP4, every
blocksize, ragged/odd/prime shapes, and adversarial values, on AVX2 and AVX-512 x86 hosts (each path bnb's
dequantize takes on this host). Three things are compared differently, each for a stated reason: NaN
*bits* from bnb's torch fallback dequantize in bfloat16 (0x7fc0 when torch.compile ran, 0xffff when it
ran eagerly; which one depends on the process's history); the dequantize of states whose blocks straddle
rows on an AVX-512 host, where bnb's vector loop reads the wrong absmax (a bnb defect the dialect does
not follow: bnb must equal the dialect on every correctly indexed element and the defect's model on all);
and the native dequantize on hosts other than x86 AVX2/AVX-512 (a NEON path, read but not modelled).
"""

from __future__ import annotations

import dataclasses
import itertools
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

from reflora import codebooks, dialects, nf4  # noqa: E402
from reflora.backends._tensors import cpu_host  # noqa: E402
from reflora.dialects import bnb_cpu  # noqa: E402
from reflora.dialects.torch_cpu import Host  # noqa: E402
from reflora.state import BLOCKSIZES, QuantState  # noqa: E402

DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
CAPABILITY = torch.backends.cpu.get_cpu_capability()
AVX512_BF16 = bnb_f.has_avx512bf16()  # the C++ vector loop converts to bfloat16 with vcvtneps2bf16
HOST = cpu_host(avx512_bf16=AVX512_BF16)
AVX512 = HOST.lanes == 16
NATIVE_MODELLED = CAPABILITY in ("AVX2", "AVX512")  # the dialect models bnb's C++ dequantize on x86
NOT_AVX512 = f"bnb's AVX-512 dequantize loop runs only on AVX-512 hosts (torch capability here: {CAPABILITY})"
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
    path = bnb_cpu.dequantize_path(x.shape, blocksize, HOST)
    if path != "torch" and not NATIVE_MODELLED:
        return
    try:
        expected_shape = bnb_cpu.output_shape(x.shape, blocksize, host=HOST)
    except ValueError:  # the dialect says bnb cannot dequantize this shape: it must fail too
        with pytest.raises(RuntimeError):
            bnb_f.dequantize_4bit(packed, qs)
        return
    out = bnb_f.dequantize_4bit(packed, qs)
    assert tuple(out.shape) == expected_shape, ctx
    mine = bnb_cpu.dequantize(state, host=HOST)
    if AVX512 and bnb_cpu.avx512_misindexed(x.shape, blocksize):
        right = bnb_cpu.avx512_scale_index(x.shape, blocksize) == np.arange(x.size) // blocksize
        assert not right.all(), ctx  # the predicate's definition
        assert_bits("dequantized, correctly indexed elements", bits(mine)[right], bits(out)[right], ctx)
        assert_bits("dequantized, bnb's AVX-512 misindexing", avx512_as_bnb_runs(state), out, ctx)
        return
    fallback_bf16 = bnb_cpu.nan_encodings(state, host=HOST) is not None
    assert_bits("dequantized", mine, out, ctx, nan_bits_free=fallback_bf16)


def avx512_as_bnb_runs(state) -> np.ndarray:
    """bnb's AVX-512 loop as it runs, defect included: the dialect's table and conversion for that loop,
    each element scaled by the absmax bnb reads (``bnb_cpu.avx512_scale_index``), not its block's."""
    scales = bnb_cpu.block_scales(state)[bnb_cpu.avx512_scale_index(state.shape, state.blocksize)]
    code = bnb_cpu.AVX512_FP4 if state.quant_type == "fp4" else state.code
    with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf and overflow, as the dialect allows
        values = code[nf4.unpack(state.packed, state.numel)] * scales
    out = bnb_cpu.convert(values, state.dtype, "avx512", avx512_bf16=AVX512_BF16)
    return out.reshape(bnb_cpu.output_shape(state.shape, state.blocksize, host=HOST))


def normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    scale = np.exp(rng.uniform(-8, 4))
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


# Ragged, odd, prime, one-element, 3-D and every dequantize path: the torch fallback (odd n), the C++
# scalar loop, and on AVX-512 hosts its vector loop (rows of a multiple of 16), both with rows of whole
# blocks and with blocks straddling rows ((33, 64) at blocksize >= 128: bnb's misindexing).
SHAPES = [(1,), (2,), (3,), (2, 1), (1, 2), (8,), (7, 13), (1009,), (3, 5, 8), (4133,), (2, 2051)]
SHAPES += [(33, 64), (3, 1024)]


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
    if x.size % 64 == 0:
        layouts.append(x.reshape(-1, 64))  # rows of whole blocks: the AVX-512 loop on such hosts
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
@pytest.mark.parametrize("blocksize", [64, 2048])  # 2048: the torch fallback on an AVX-512 host
def test_output_shape(shape, blocksize):
    x = np.arange(1, math.prod(shape) + 1, dtype=np.float32).reshape(shape)
    packed, qs = bnb_f.quantize_4bit(to_torch(x), blocksize=blocksize, quant_type="nf4")
    out = bnb_f.dequantize_4bit(packed, qs)
    assert tuple(out.shape) == bnb_cpu.output_shape(shape, blocksize, host=HOST)
    mine = bnb_cpu.dequantize(bnb_cpu.quantize(x, blocksize), host=HOST)  # bnb's shape, in bnb's order
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
    """bnb's torch fallback as bnb runs it (torch.compile on): values exact, bf16 NaN 0x7fc0 or 0xffff.
    An odd last dimension takes it on every host, blocksize 2048 on an AVX-512 host."""
    torch._dynamo.config.disable = False
    try:
        for dtype, (shape, blocksize) in itertools.product(DTYPES, [((5, 13), 64), ((4, 16), 2048)]):
            x = normal(np.random.default_rng(3), shape, dtype)
            x[1, 2] = np.nan
            packed, qs = bnb_f.quantize_4bit(to_torch(x), blocksize=blocksize, quant_type="nf4")
            out = bnb_f.dequantize_4bit(packed, qs)
            state = bnb_cpu.quantize(x, blocksize)
            mine = bnb_cpu.dequantize(state, host=HOST)
            free = bnb_cpu.nan_encodings(state, host=HOST) is not None
            assert_bits("dequantized", mine, out, f"compiled {dtype} {shape}", nan_bits_free=free)
            if free:
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


# --- the dequantize paths: AVX-512 vector loop, scalar loop, torch fallback -------------------------

TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    BF16: torch.bfloat16,
}


def given_state(codes: np.ndarray, absmax: np.ndarray, shape, blocksize: int, quant_type: str, dtype):
    """A plain state with the given codes (uint8, one per element) and float32 absmax."""
    return QuantState(
        nf4.pack(codes, 0), absmax, shape, dtype, blocksize, quant_type, codebooks.get(quant_type).values
    )


def bnb_dequantize(state) -> torch.Tensor:
    """bnb's functional.dequantize_4bit of a plain dialect state (its bytes and absmax, as bnb keeps them)."""
    qs = bnb_f.QuantState(
        absmax=torch.from_numpy(state.absmax.copy()),
        shape=torch.Size(state.shape),
        code=bnb_f.get_4bit_type(state.quant_type, device="cpu"),
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=TORCH_DTYPES[state.dtype],
    )
    return bnb_f.dequantize_4bit(torch.from_numpy(state.packed.reshape(-1, 1).copy()), qs)


# float32 absmax bits -> bfloat16 bits of 1.0 * absmax from the AVX-512 loop, (with AVX512_BF16, without).
AVX512_BF16_CASES = {
    0x7FC00000: (0x7FC0, 0xFFFF),  # quiet NaN: sign and top bits / every NaN 0xffff
    0xFFC00000: (0xFFC0, 0xFFFF),
    0x7F800001: (0x7FC0, 0xFFFF),  # signalling NaN, quieted by the multiply
    0xFF80FFFF: (0xFFC0, 0xFFFF),  # payload below the top half: dropped, not rounded
    0xFFFFFFFF: (0xFFFF, 0xFFFF),  # a NaN tail's absmax: stays NaN (the scalar loop wraps it to +0.0)
    0x7F800000: (0x7F80, 0x7F80),
    0xFF800000: (0xFF80, 0xFF80),
    0x7F7FFFFF: (0x7F80, 0x7F80),  # float32 max rounds to inf
    0x3F808000: (0x3F80, 0x3F80),  # ties to even: down
    0x3F818000: (0x3F82, 0x3F82),  # ties to even: up
    0x3F808001: (0x3F81, 0x3F81),
    0x00800000: (0x0080, 0x0080),  # smallest normal
    0x007FFFFF: (0x0000, 0x0080),  # subnormals: zero of their sign with AVX512_BF16, rounded without
    0x80018000: (0x8000, 0x8002),
    0x00000001: (0x0000, 0x0000),
}


@pytest.mark.skipif(not AVX512, reason=NOT_AVX512)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avx512_conversion(dtype):
    """The vector loop's conversions, CONFIRMED on special values: bnb equals the dialect bit for bit, and
    its bfloat16 bits are the stated ones (vcvtneps2bf16: subnormals flushed, NaN quieted, not wrapped)."""
    inputs = np.array(list(AVX512_BF16_CASES), dtype=np.uint32)
    codes = np.full(inputs.size * 32, 15, dtype=np.uint8)  # NF4 15 is 1.0: the value is the absmax
    state = given_state(codes, inputs.view(np.float32), (codes.size,), 32, "nf4", dtype)
    assert bnb_cpu.dequantize_path(state.shape, 32, HOST) == "avx512"
    out = bnb_dequantize(state)
    assert_bits("dequantized", bnb_cpu.dequantize(state, host=HOST), out, str(dtype))
    if dtype == BF16:
        column = 0 if AVX512_BF16 else 1
        assert bits(out)[::32].tolist() == [v[column] for v in AVX512_BF16_CASES.values()]
        other = bnb_cpu.dequantize(
            state, host=dataclasses.replace(HOST, avx512_bf16=not AVX512_BF16)
        )  # the other CPU (READ)
        assert bits(other)[::32].tolist() == [v[1 - column] for v in AVX512_BF16_CASES.values()]


@pytest.mark.parametrize(
    ("shape", "blocksize"), [((32,), 32), ((34,), 32), ((33,), 32), ((32,), 2048), ((3, 16), 64)], ids=str
)
def test_fp4_zero_code_sign_by_path(shape, blocksize):
    """FP4 nibble 8 is -0.0 in the C++ scalar loop, +0.0 in the AVX-512 loop and the torch fallback."""
    codes = np.full(math.prod(shape), 8, dtype=np.uint8)
    state = given_state(
        codes, np.ones(math.ceil(codes.size / blocksize), np.float32), shape, blocksize, "fp4", F32
    )
    out = bnb_dequantize(state)
    scalar = bnb_cpu.dequantize_path(shape, blocksize, HOST) == "scalar"
    assert set(bits(out).tolist()) == {0x80000000 if scalar else 0}
    assert_bits("dequantized", bnb_cpu.dequantize(state, host=HOST), out, f"{shape}, bs {blocksize}")


def test_avx512_misindexed_is_the_index_rule():
    """The predicate's closed form equals its definition (some element's AVX-512 scale index is not its
    block) on every shape the vector loop takes up to 11 x 640 and a few 3-D ones; False off that loop."""
    shapes = [(m, n) for m in range(1, 12) for n in range(2, 642, 2)] + [(2, 3, 16), (3, 1, 48), (1, 1, 96)]
    count = 0
    for shape, blocksize in itertools.product(shapes, BLOCKSIZES):
        on_loop = bnb_cpu.dequantize_path(shape, blocksize, Host(lanes=16)) == "avx512"
        index = bnb_cpu.avx512_scale_index(shape, blocksize)
        wrong = on_loop and bool((index != np.arange(math.prod(shape)) // blocksize).any())
        assert bnb_cpu.avx512_misindexed(shape, blocksize) == wrong, (shape, blocksize)
        count += wrong
    assert count > 1000  # the definition is not vacuous


MISINDEXED = [((9, 16), 64), ((3, 48), 32), ((8, 32), 64), ((2, 3, 48), 32), ((33, 64), 128), ((5, 1040), 64)]
INDEXED = [((2, 16), 64), ((4, 64), 64), ((1, 80), 32), ((3, 2, 32), 32), ((5, 1024), 256), ((6, 10), 32)]


@pytest.mark.skipif(not AVX512, reason=NOT_AVX512)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avx512_misindexing_defect(dtype, quant_type):
    """bnb's AVX-512 loop gives element (r, c) of m rows of n the absmax ``r * (n // bs) + c // bs``, not
    its block's ``(r * n + c) // bs``: where that differs (``bnb_cpu.avx512_misindexed``) bnb equals that
    model bit for bit and differs from the dialect; everywhere else bnb equals the dialect bit for bit."""
    rng = np.random.default_rng(41)
    for shape, blocksize in MISINDEXED + INDEXED:
        ctx = f"{shape}, bs {blocksize}, {quant_type}, {dtype}"
        x = normal(rng, shape, dtype)
        state = bnb_cpu.quantize(x, blocksize, quant_type=quant_type, host=HOST)
        out = bnb_dequantize(state)
        mine = bnb_cpu.dequantize(state, host=HOST)
        if (shape, blocksize) in INDEXED:
            assert not bnb_cpu.avx512_misindexed(shape, blocksize), ctx
            assert_bits("dequantized", mine, out, ctx)
            continue
        assert bnb_cpu.avx512_misindexed(shape, blocksize), ctx
        assert_bits("dequantized, bnb's AVX-512 misindexing", avx512_as_bnb_runs(state), out, ctx)
        wrong = bits(mine) != bits(out)
        right = bnb_cpu.avx512_scale_index(shape, blocksize) == np.arange(x.size) // blocksize
        assert not (wrong & right).any() and wrong.sum() > x.size // 4, ctx
        print(
            f"[{ctx}] {(~right).sum()}/{x.size} elements misindexed, {wrong.sum()} of them dequantized wrong"
        )


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
