"""The ``bnb-cpu`` dialect: 4-bit quantization exactly as bitsandbytes 0.50 computes it on an x86 CPU.

On the CPU, ``bitsandbytes.functional.quantize_4bit`` runs bnb's pure-torch default kernel, double
quantization runs the native C++ 8-bit quantizer, and ``dequantize_4bit`` runs the native C++ kernel
(a scalar loop on AVX2 hosts, a vector loop on AVX-512 ones) unless the last dimension is odd or, on
AVX-512, blocksize >= 2048. Each rule below differs from the canonical oracle (:mod:`reflora.nf4`) only
where it says so; tests/test_dialects_bnb_cpu.py holds every one of them to bitsandbytes bit for bit.

Quantize (``x`` widened to float32; see :func:`reflora.dialects.torch_cpu.widen_f16` for float16 NaN):

1. absmax = max |x| per block. A NaN makes it NaN: in a full block the first NaN with its sign cleared;
   in a ragged tail of one element that NaN, cleared and quieted; in a longer tail ``0xffffffff``.
   The tail's absmax is stored clamped to ``f32(1e-38)``, so an all-zero tail stores 9.99999935e-39.
2. scaled = ``x * f32(1 / max(absmax, 1e-38))`` in full blocks (a float32 reciprocal, then a float32
   product: two roundings), ``x / max(absmax, 1e-38)`` in the tail (one rounding); then clipped to [-1, 1].
3. code = number of *float32* midpoints ``f32(code[i] + code[i+1]) / 2`` strictly below scaled (ties go
   to the lower code; NaN -> 15). FP4 midpoints are taken over the sorted table and mapped back through
   bnb's argsort order, which gives positive values at most 0.0026 nibble 8 (the -0 code) and sends a
   negative tie to the more negative code.
4. Consequences: an all-zero full block stores absmax 0 with codes 7 (NF4); a NaN block has every code
   15 (NF4) or 3 (FP4); with +-inf in a block, finite elements get code 7 and +-inf get 15 (NF4).
5. Odd n: the padding scaled value is 0.0.

Double quantization: offset = torch's float32 mean (:func:`reflora.dialects.torch_cpu.mean_f32`) unless
given; c = f32(absmax - offset); then bnb's native 8-bit quantizer (:func:`quantize_8bit`).

Dequantize (:mod:`reflora.dialects.bnb_cpu_dequant`, whose names this module re-exports):
``f32(code[q] * absmax)`` (absmax rebuilt as ``f32(f32(code2[q] * absmax2) + offset)``), then the output
conversion of the path bnb takes on the host (:func:`dequantize_path`), in the shape bnb returns
(:func:`output_shape`: not always the state's).
"""

from __future__ import annotations

import math

import numpy as np

from reflora import codebooks
from reflora.codebooks import DYNAMIC_MAP
from reflora.dialects.bnb_cpu_dequant import (
    AVX512_FP4,
    NATIVE_FP4,
    TORCH_FALLBACK_BF16_NANS,
    avx512_misindexed,
    avx512_scale_index,
    block_scales,
    convert,
    dequantize,
    dequantize_path,
    in_returned_shape,
    nan_encodings,
    output_shape,
    single_byte_shim,
    uses_native_dequantize,
)
from reflora.dialects.canonical import check_offset
from reflora.dialects.torch_cpu import DEFAULT_HOST, Host, mean_f32, widen_f16
from reflora.dtypes import dtype_name
from reflora.nf4 import pack
from reflora.state import NestedState, QuantState, check_blocksize

__all__ = [
    "AVX512_FP4",
    "DESCRIPTION",
    "LUT",
    "MIDPOINTS",
    "NAME",
    "NATIVE_FP4",
    "TORCH_FALLBACK_BF16_NANS",
    "avx512_misindexed",
    "avx512_scale_index",
    "block_absmax",
    "block_scales",
    "convert",
    "dequantize",
    "dequantize_path",
    "double_quantize",
    "encode",
    "in_returned_shape",
    "lut_index",
    "nan_encodings",
    "output_shape",
    "quantize",
    "quantize_8bit",
    "single_byte_shim",
    "uses_native_dequantize",
    "widen",
]

NAME = "bnb-cpu"
DESCRIPTION = (
    "bitsandbytes 0.50 on an x86 CPU: torch default quantize_4bit kernel (float32 reciprocal and "
    "float32 midpoints), native 65536-entry LUT for double quantization, native scalar (AVX2) or vector "
    "(AVX-512) dequantize"
)

MIN_SCALE = np.float32(1e-38)  # bnb's clamp(min=1e-38), as float32: 9.99999935e-39 (subnormal)
_TAIL_NAN = np.uint32(0xFFFFFFFF)  # what torch's vectorised all-reduce max returns for any NaN
_QUIET = np.uint32(0x00400000)
_SIGN = np.uint32(0x80000000)

# bnb sorts the FP4 table with torch.argsort; +0 (nibble 0) and the second zero (nibble 8) come out
# in this order, which decides the code of small values and negative ties.
FP4_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)


def _float32_midpoints(sorted_values: np.ndarray) -> np.ndarray:
    return (sorted_values[:-1] + sorted_values[1:]) / np.float32(2)  # float32 add, exact halving


MIDPOINTS = {
    "nf4": _float32_midpoints(codebooks.NF4.values),
    "fp4": _float32_midpoints(codebooks.FP4.values[FP4_ORDER]),
}


def widen(x: np.ndarray, host: Host = DEFAULT_HOST) -> np.ndarray:
    """float32 (n,): ``A.reshape(-1).float()`` of a float32/float16/bfloat16 array, NaN bits included."""
    flat = np.asarray(x).reshape(-1)
    if flat.dtype == np.float16:
        return widen_f16(flat, host)
    return flat.astype(np.float32)  # float32: a copy; bfloat16: a 16-bit shift, payloads kept


def _first_nan_abs(blocks: np.ndarray) -> np.ndarray:
    """uint32 (k,): bits of |first NaN| of each row of ``blocks`` (k, b); rows without NaN get 0."""
    nan = np.isnan(blocks)
    first = np.argmax(nan, axis=1)
    bits = blocks.view(np.uint32)[np.arange(blocks.shape[0]), first] & ~_SIGN
    return np.where(nan.any(axis=1), bits, np.uint32(0))


def block_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """float32 (ceil(n/blocksize),): bnb's stored absmax of the float32 (n,) ``flat`` (rule 1)."""
    n = flat.size
    full = n // blocksize
    absmax = np.empty(math.ceil(n / blocksize), dtype=np.float32)
    if full:
        blocks = flat[: full * blocksize].reshape(full, blocksize)
        with np.errstate(invalid="ignore"):
            absmax[:full] = np.abs(blocks).max(axis=1)
        has_nan = np.isnan(absmax[:full])
        absmax.view(np.uint32)[:full][has_nan] = _first_nan_abs(blocks[has_nan])
    if n % blocksize:
        tail = flat[full * blocksize :]
        if np.isnan(tail).any():
            bits = tail.view(np.uint32)[np.isnan(tail)][0] & ~_SIGN | _QUIET if tail.size == 1 else _TAIL_NAN
            absmax.view(np.uint32)[full] = bits
        else:
            absmax[full] = max(np.abs(tail).max(), MIN_SCALE)
    return absmax


def _scaled(flat: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    """float32 (n,): rule 2, x scaled by its block's absmax and clipped to [-1, 1]."""
    n = flat.size
    whole = n // blocksize * blocksize
    scale = np.maximum(absmax, MIN_SCALE)  # NaN stays NaN
    out = np.empty(n, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        inverse = np.float32(1) / scale[: whole // blocksize, None]  # (blocks, 1) float32 reciprocal
        np.multiply(flat[:whole].reshape(-1, blocksize), inverse, out=out[:whole].reshape(-1, blocksize))
        if whole < n:
            out[whole:] = flat[whole:] / scale[-1]
    return np.clip(out, np.float32(-1), np.float32(1), out=out)


def encode(scaled: np.ndarray, quant_type: str) -> np.ndarray:
    """uint8, same shape: rule 3, the code of each clipped float32 ``scaled`` value."""
    codebooks.get(quant_type)  # ValueError for an unknown quant_type
    index = np.searchsorted(MIDPOINTS[quant_type], scaled, side="left")  # NaN sorts last -> 15
    index = index.astype(np.uint8)
    return FP4_ORDER[index] if quant_type == "fp4" else index


def _check(x: np.ndarray, blocksize: int) -> np.ndarray:
    x = np.asarray(x)
    dtype_name(x.dtype)
    if x.size == 0:
        raise ValueError(f"cannot quantize an empty array (shape {x.shape})")
    check_blocksize(blocksize)
    return x


def quantize(
    x: np.ndarray,
    blocksize: int = 64,
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    offset: float | None = None,
    host: Host = DEFAULT_HOST,
) -> QuantState:
    """Quantize ``x`` to 4 bits as bitsandbytes 0.50 does on the CPU (the module's rules 1-5).

    x: float32 / float16 / bfloat16 array, any shape, non-empty; NaN and inf are accepted.
    blocksize: 32 ... 4096. quant_type: "nf4" or "fp4". double_quant: bnb's ``compress_statistics``.
    offset: the double-quantization offset to use instead of torch's float32 mean of absmax (replay a
        state bnb produced on another host). host: the torch host facts the mean depends on.
    Returns a :class:`reflora.QuantState` holding bnb's packed bytes, absmax and nested state.
    """
    check_offset(offset, double_quant)
    x = _check(x, blocksize)
    flat = widen(x, host)
    absmax = block_absmax(flat, blocksize)
    scaled = _scaled(flat, absmax, blocksize)
    if scaled.size % 2:
        scaled = np.append(scaled, np.float32(0))
    q = encode(scaled, quant_type)
    nested = double_quantize(absmax, offset=offset, host=host) if double_quant else None
    return QuantState(
        packed=pack(q, 0),  # q already has the padding code of rule 5
        absmax=None if double_quant else absmax,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=codebooks.get(quant_type).values,
        nested=nested,
    )


def _lut_inputs() -> np.ndarray:
    """float32 (65536,): the value LUT entry i stands for, ``-1 + f32(f32(2i) / 65535)``."""
    i = np.arange(65536, dtype=np.float32)
    return np.float32(-1) + (np.float32(2) * i) / np.float32(65535)


# LUT[i] = number of float32 midpoints 0.5*(code2[j] + code2[j+1]) strictly below entry i's value.
LUT = np.searchsorted(
    (np.float32(0.5) * (DYNAMIC_MAP.values[:-1] + DYNAMIC_MAP.values[1:])), _lut_inputs(), side="left"
).astype(np.uint8)


def lut_index(scaled: np.ndarray) -> np.ndarray:
    """int (same shape): ``uint16(f32(f32(f32(clamp(v) + 1) * 0.5) * 65535) + 0.5)``, NaN -> 0."""
    v = np.clip(scaled, np.float32(-1), np.float32(1))
    t = (v + np.float32(1)) * np.float32(0.5)
    r = t * np.float32(65535) + np.float32(0.5)  # two float32 roundings: the C++ is not contracted
    return np.where(np.isnan(r), 0, np.trunc(np.nan_to_num(r))).astype(np.int64)


def quantize_8bit(values: np.ndarray, blocksize: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """bnb's native CPU 8-bit blockwise quantizer with the dynamic map. values: float32 (n,).

    Returns (codes uint8 (n,), absmax2 float32 (ceil(n/blocksize),)). absmax2 = max |v| over the
    non-NaN values of each block (0 if none). A block with absmax2 0 gets codes 0. Otherwise each value
    is scaled by ``f32(1 / absmax2)`` and looked up in the 65536-entry LUT (:func:`lut_index`), so 0.0
    gets code 131 (2.125e-5), not 127, and about 0.2% of codes differ from the exact nearest value
    (measured in tests/test_bnb_agreement.py).
    """
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    n_blocks = math.ceil(v.size / blocksize)
    padded = np.zeros(n_blocks * blocksize, dtype=np.float32)  # padding never reaches the output
    padded[: v.size] = v
    blocks = padded.reshape(n_blocks, blocksize)
    absmax2 = np.where(np.isnan(blocks), np.float32(0), np.abs(blocks)).max(axis=1)  # std::max skips NaN
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        inverse = np.float32(1) / np.where(absmax2 == 0, np.float32(1), absmax2)
        codes = LUT[lut_index(blocks * inverse[:, None])]
    codes[absmax2 == 0] = 0
    return codes.reshape(-1)[: v.size], absmax2.astype(np.float32)


def double_quantize(
    absmax: np.ndarray, *, offset: float | None = None, host: Host = DEFAULT_HOST
) -> NestedState:
    """bnb's compress_statistics: offset = torch mean (or ``offset``), then :func:`quantize_8bit`."""
    off = mean_f32(absmax, host) if offset is None else np.float32(offset)
    with np.errstate(invalid="ignore", over="ignore"):
        centred = absmax - off
    absmax_q, absmax2 = quantize_8bit(centred, 256)
    return NestedState(absmax_q, absmax2, DYNAMIC_MAP.values, off, 256)
