"""The ``bnb-cuda`` dialect: bitsandbytes 0.50's CUDA kernels, emulated from their source.

No GPU was used: every rule here is READ from csrc/kernels.cu (``kQuantizeBlockwise``,
``kQuantizeBlockwiseSmall``, ``dQuantizeNF4``, ``dQuantizeFP4``, ``dQuantize<0>``, ``kDequantizeBlockwise``)
and emulated; tests/test_dialects_bnb_cuda.py checks the emulation's stated rules on constructed inputs.

Quantize (float32 arithmetic; the build uses ``--use_fast_math``, so subnormals are flushed to zero):

1. absmax = ``fmaxf`` over |x| of the block, starting from -FLT_MAX: NaN is ignored. A ragged last
   block is padded with zeros that take part, so its absmax is at least 0; a full block of NaN keeps
   -FLT_MAX.
2. ``inv = 1 / absmax`` and ``scaled = x * inv`` (two float32 roundings). Fast math makes the reciprocal
   approximate (about 1 ulp): not modelled bit for bit, but :func:`reciprocal_slack` gives the codes
   one ulp either way, so a checker can allow exactly those.
3. NF4: a decision tree of ``scaled > threshold`` on the 15 float32 midpoints (the source's decimal
   literals are these floats): code = thresholds strictly below, ties to the lower code, NaN -> 0. No
   clamp (the end codes absorb overshoot). An all-zero block gives 0 * inf = NaN: codes 0, and
   absmax 0, which dequantizes to -0.0.
4. FP4: sign bit = ``x < 0``; magnitude by ``|scaled| > t`` over the source's seven thresholds, which
   are not all float32 midpoints (:data:`FP4_THRESHOLDS`); ties and NaN go toward zero.
5. Odd n: the padding element is 0 * inv, quantized like the others.

Double quantization: offset = the float32 mean (CUDA's reduction order is not modelled: the exactly
rounded mean is used unless ``offset=`` replays bnb's); ``c = f32(absmax - offset)``; 8-bit codes by
``dQuantize<0>``'s binary search (:func:`search_8bit`), equal to exact nearest except that a value exactly
on a float32 midpoint goes to the *even* index.

Dequantize: ``T(f32(code[q] * absmax))`` with round-to-nearest-even to T; FP4 nibble 8 is -0.0. The nested
absmax is ``f32(f32(code2[q] * absmax2) + offset)`` (training path), or with ``fma=True`` one rounding,
as the fused inference GEMM compiles it (nvcc contracts to FMA by default: an inference, not observed).
"""

from __future__ import annotations

import math

import numpy as np

from reflora import codebooks
from reflora.codebooks import DYNAMIC_MAP
from reflora.dialects.bnb_cpu import in_returned_shape, single_byte_shim
from reflora.dialects.canonical import check_offset
from reflora.double_quant import mean_f32 as exact_mean
from reflora.dtypes import as_dtype, dtype_name
from reflora.nf4 import pack, unpack
from reflora.state import NestedState, QuantState, check_blocksize

__all__ = [
    "DESCRIPTION",
    "FP4_THRESHOLDS",
    "NAME",
    "NF4_THRESHOLDS",
    "block_scales",
    "dequantize",
    "fma_f32",
    "nan_encodings",
    "output_shape",
    "quantize",
    "quantize_8bit",
    "reciprocal_slack",
    "search_8bit",
]

NAME = "bnb-cuda"
DESCRIPTION = (
    "bitsandbytes 0.50 CUDA kernels, read from source and emulated: fmaxf absmax (NaN ignored), "
    "reciprocal multiply, decision trees without clamp, 8-bit binary search with ties to even"
)

_FLT_MAX = np.finfo(np.float32).max
_TINY = np.finfo(np.float32).tiny  # smallest normal float32; below it fast math flushes to zero

NF4_THRESHOLDS = (codebooks.NF4.values[:-1] + codebooks.NF4.values[1:]) / np.float32(2)
# dQuantizeFP4's magnitude thresholds, as float32 (5 of 7 differ from the float32 midpoints).
FP4_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=np.float32
)
# Magnitude nibble for 0..7 thresholds passed: 0, 0.0625, 2, 3, 4, 6, 8, 12 (/12) in FP4's bit layout.
_FP4_MAGNITUDE = np.array([0, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)
FP4_TABLE = np.where(np.arange(16) == 8, np.float32(-0.0), codebooks.FP4.values).astype(np.float32)


def ftz(a: np.ndarray) -> np.ndarray:
    """float32 ``a`` with subnormals replaced by a zero of the same sign (fast math's flush-to-zero)."""
    a = np.asarray(a, dtype=np.float32)
    return np.where(np.abs(a) < _TINY, np.copysign(np.float32(0), a), a).astype(np.float32)


def _block_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """Rule 1: float32 (n_blocks,)."""
    n = flat.size
    n_blocks = math.ceil(n / blocksize)
    padded = np.zeros(n_blocks * blocksize, dtype=np.float32)
    padded[:n] = np.abs(flat)
    blocks = padded.reshape(n_blocks, blocksize)
    nan = np.isnan(blocks)
    absmax = np.where(nan, -_FLT_MAX, blocks).max(axis=1)
    return absmax.astype(np.float32)


def _encode(scaled: np.ndarray, quant_type: str) -> np.ndarray:
    """Rules 3-4: uint8 codes of float32 ``scaled`` (NaN -> 0)."""
    if quant_type == "nf4":
        index = np.searchsorted(NF4_THRESHOLDS, scaled, side="left")
        return np.where(np.isnan(scaled), 0, index).astype(np.uint8)
    if quant_type == "fp4":
        magnitude = np.searchsorted(FP4_THRESHOLDS, np.abs(scaled), side="left")
        magnitude = np.where(np.isnan(scaled), 0, magnitude)
        return _FP4_MAGNITUDE[magnitude] | np.where(scaled < 0, np.uint8(8), np.uint8(0))
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _scaled(flat: np.ndarray, inverse: np.ndarray, blocksize: int) -> np.ndarray:
    """float32 (n,): rule 2 (and rule 5's padding element if n is odd), given each block's ``inv``."""
    n = flat.size + flat.size % 2
    x = np.zeros(n, dtype=np.float32)
    x[: flat.size] = flat
    with np.errstate(invalid="ignore", over="ignore"):
        return ftz(x * np.repeat(inverse, blocksize)[:n])


def _inverse(absmax: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        return ftz(np.float32(1) / ftz(absmax))


def _prepare(x: np.ndarray, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    dtype_name(x.dtype)
    codebooks.get(quant_type)
    if x.size == 0:
        raise ValueError(f"cannot quantize an empty array (shape {x.shape})")
    blocksize = check_blocksize(blocksize)
    flat = ftz(x.reshape(-1).astype(np.float32))  # (float)v, flushed where fast math flushes
    return flat, ftz(_block_absmax(flat, blocksize))


def quantize(
    x: np.ndarray,
    blocksize: int = 64,
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    offset: float | None = None,
) -> QuantState:
    """Quantize ``x`` as bnb's CUDA kernels would (rules 1-5), with an IEEE reciprocal.

    x: float32 / float16 / bfloat16 array, any shape, non-empty; NaN and inf accepted.
    offset: the DQ offset to replay (default: the exactly rounded float32 mean of absmax).
    """
    check_offset(offset, double_quant)
    flat, absmax = _prepare(x, blocksize, quant_type)
    q = _encode(_scaled(flat, _inverse(absmax), blocksize), quant_type)
    nested = double_quantize(absmax, offset=offset) if double_quant else None
    return QuantState(
        packed=pack(q, 0),
        absmax=None if double_quant else absmax,
        shape=np.shape(x),
        dtype=np.asarray(x).dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=codebooks.get(quant_type).values,
        nested=nested,
    )


def reciprocal_slack(
    x: np.ndarray, blocksize: int = 64, *, quant_type: str = "nf4"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codes of every element (uint8 (n,) each) with ``inv`` one ulp down, exact, and one ulp up.

    ``--use_fast_math`` computes ``1/absmax`` to within about an ulp, and a one-ulp change crosses at
    most one threshold, so a real GPU's code for element i is one of the three. Elements where they
    differ are the only ones a checker should let differ from :func:`quantize`.
    """
    flat, absmax = _prepare(x, blocksize, quant_type)
    inverse = _inverse(absmax)
    down = np.where(np.isfinite(inverse), np.nextafter(inverse, np.float32(0)), inverse)
    up = np.where(np.isfinite(inverse), np.nextafter(inverse, np.float32(np.inf)), inverse)
    n = flat.size
    return tuple(
        _encode(_scaled(flat, inv.astype(np.float32), blocksize), quant_type)[:n]
        for inv in (down, inverse, up)
    )


def search_8bit(scaled: np.ndarray, code: np.ndarray = DYNAMIC_MAP.values) -> np.ndarray:
    """uint8, same shape: ``dQuantize<0>``'s code for float32 ``scaled`` values in a sorted 256-code table.

    A binary search from pivot 127 with steps 64 ... 1 comparing ``x > code[pivot]``, then one comparison
    with the float32 midpoint ``(neighbour + code[pivot]) * 0.5`` toward the side x lies on. The final
    pivot is always even, so an exact tie goes to the even index. NaN -> 0.
    """
    x = np.asarray(scaled, dtype=np.float32)
    pivot = np.full(x.shape, 127, dtype=np.int64)
    lower_pivot, upper_pivot = np.zeros_like(pivot), np.full_like(pivot, 255)
    lower, upper = np.full(x.shape, np.float32(-1)), np.full(x.shape, np.float32(1))
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = x > val
        lower_pivot, lower = np.where(above, pivot, lower_pivot), np.where(above, val, lower)
        upper_pivot, upper = np.where(above, upper_pivot, pivot), np.where(above, upper, val)
        pivot = np.where(above, pivot + step, pivot - step)
        val = code[pivot]
    upper = np.where(upper_pivot == 255, code[255], upper)
    lower = np.where(lower_pivot == 0, code[0], lower)
    up_mid = ((upper + val) * np.float32(0.5)).astype(np.float32)
    low_mid = ((lower + val) * np.float32(0.5)).astype(np.float32)
    go_up = (x > val) & (x > up_mid)
    go_down = ~(x > val) & (x < low_mid)
    return np.where(go_up, upper_pivot, np.where(go_down, lower_pivot, pivot)).astype(np.uint8)


def quantize_8bit(values: np.ndarray, blocksize: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``kQuantizeBlockwise`` with the dynamic map: (codes uint8 (n,), absmax2 float32 (n_blocks,))."""
    v = ftz(np.asarray(values, dtype=np.float32).reshape(-1))
    absmax2 = ftz(_block_absmax(v, blocksize))
    return search_8bit(_scaled(v, _inverse(absmax2), blocksize)[: v.size]), absmax2


def double_quantize(absmax: np.ndarray, *, offset: float | None = None) -> NestedState:
    """offset (given, or the exactly rounded mean), c = f32(absmax - offset), then :func:`quantize_8bit`."""
    if offset is not None:
        off = np.float32(offset)
    elif np.isfinite(absmax).all():
        off = exact_mean(absmax)
    else:
        off = np.float32(np.mean(absmax.astype(np.float64)))
    with np.errstate(invalid="ignore", over="ignore"):
        centred = ftz(absmax - off)
    absmax_q, absmax2 = quantize_8bit(centred, 256)
    return NestedState(absmax_q, absmax2, DYNAMIC_MAP.values, off, 256)


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a*b + c`` rounded once, as a fused multiply-add. a, b, c: float32, broadcastable.

    a*b is exact in float64 (24 + 24 bits). The float64 sum is made *round-to-odd* (move one ulp
    toward the exact sum whenever it was inexact and its last bit is even), which keeps enough
    information for the final rounding to float32 to be the correct rounding of the exact value.
    """
    p = np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)
    c64 = np.asarray(c, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c64
        bb = s - p
        err = (p - (s - bb)) + (c64 - bb)  # TwoSum: s + err == p + c exactly
        odd = (s.view(np.uint64) & 1).astype(bool)
        toward = np.nextafter(s, np.where(err > 0, np.inf, -np.inf))
        s = np.where((err != 0) & ~odd & np.isfinite(s), toward, s)
    return s.astype(np.float32)


def block_scales(state: QuantState, *, fma: bool = False) -> np.ndarray:
    """float32 (n_blocks,): absmax, or the nested reconstruction (two roundings, or one with ``fma``)."""
    if state.nested is None:
        return state.absmax
    nested = state.nested
    code2 = nested.code2[nested.absmax_q]
    absmax2 = nested.absmax2[np.arange(nested.absmax_q.size) // nested.blocksize2]
    if fma:
        return ftz(fma_f32(code2, absmax2, nested.offset))
    with np.errstate(invalid="ignore", over="ignore"):
        return ftz(ftz(code2 * absmax2) + nested.offset)


def dequantize(state: QuantState, dtype: str | np.dtype | None = None, *, fma: bool = False) -> np.ndarray:
    """``kDequantizeBlockwise``: ``T(f32(code[q] * absmax))``, RNE to T, in the shape bnb returns
    (:func:`output_shape`; ``state.shape`` where bnb raises instead, a bug the backend declares).

    fma: rebuild a nested absmax with one rounding, as the fused inference GEMM does (declared slack).
    """
    out_dtype = state.dtype if dtype is None else as_dtype(dtype)
    table = FP4_TABLE if state.quant_type == "fp4" else state.code
    values = table[unpack(state.packed, state.numel)]
    scales = np.repeat(block_scales(state, fma=fma), state.blocksize)[: state.numel]
    with np.errstate(invalid="ignore", over="ignore"):
        out = ftz(values * scales).astype(out_dtype)
    return in_returned_shape(out, state.shape, output_shape)


def nan_encodings(state: QuantState, dtype: str | np.dtype | None = None) -> str:
    """ "any": this emulation computes on the CPU, where an invalid operation's NaN is x86's 0xffc00000;
    on the GPU it is 0x7fffffff, and ``cvt`` to a 16-bit type writes that type's canonical NaN (PTX
    ISA, cvt), so the emulation models where a NaN is, not its bits."""
    return "any"


def output_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape bnb's ``functional.dequantize_4bit`` returns on CUDA for a state of ``shape``.

    The kernel writes ``shape``; then a backward-compatibility shim transposes the result when the
    packed tensor has a single row, which for bnb's own (bytes, 1) packing means one byte (n <= 2):
    a 2-D result comes back transposed, a 1-D one unchanged (``.t()`` of a 1-D tensor is itself), and
    a 3-D one raises. (The CPU kernel differs for 1-D: :func:`reflora.dialects.bnb_cpu.output_shape`.)
    """
    return single_byte_shim(tuple(shape), tuple(shape))
