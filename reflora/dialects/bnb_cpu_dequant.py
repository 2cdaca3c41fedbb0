"""bitsandbytes 0.50's CPU ``dequantize_4bit`` on x86: its three paths, their conversions and shapes.

Part of the ``bnb-cpu`` dialect (:mod:`reflora.dialects.bnb_cpu` re-exports every name). Every value is
``f32(code[q] * absmax)`` (absmax rebuilt from a nested state by :func:`block_scales`); the paths differ in
the table, the conversion to the output dtype and the shape returned (:func:`dequantize_path`):

* ``"torch"``: bnb's pure-torch fallback, for an odd last dimension, and on an AVX-512 host for
  blocksize >= 2048. FP4 nibble 8 is +0.0; bfloat16 by torch's RNE; the state's shape.
* ``"scalar"``: the C++ kernel's scalar loop (every even last dimension on an AVX2 host). FP4 nibble 8 is
  -0.0; bfloat16 by bnb's ``float_to_bf16``; a 1-D state comes back as one row, (1, n).
* ``"avx512"``: the C++ kernel's AVX-512 loop, 16 elements at a time, when the last dimension is a
  multiple of 16 on an AVX-512 host. FP4 nibble 8 is +0.0; bfloat16 by ``vcvtneps2bf16`` (or its
  emulation on CPUs without AVX512_BF16); a 1-D state comes back (1, n). This loop reads the wrong
  absmax when blocks straddle rows (:func:`avx512_misindexed`): the dialect does not follow it there,
  it gives the values of every other path (the defect is the backend's declared deviation).

float16 output is ``_mm_cvtps_ph`` / ``_mm512_cvtps_ph`` / torch's, which agree: RNE with quieted NaN
payloads (:func:`reflora.dialects.torch_cpu.narrow_f16`). Host facts: ``host.lanes == 16`` is torch's CPU
capability "AVX512", which bnb tests for the blocksize >= 2048 fallback and which implies AVX-512F, which
its C++ kernel tests (by CPUID) for the vector loop. Not modelled: an AVX-512F CPU whose torch capability
is forced lower (``ATEN_CPU_CAPABILITY=avx2``), where the C++ vector loop runs with lanes 8.
"""

from __future__ import annotations

import math

import numpy as np

from reflora import codebooks
from reflora.dialects.torch_cpu import DEFAULT_HOST, Host, narrow_f16
from reflora.dtypes import as_dtype, bfloat16
from reflora.nf4 import unpack
from reflora.state import QuantState

__all__ = [
    "AVX512_FP4",
    "NATIVE_FP4",
    "TORCH_FALLBACK_BF16_NANS",
    "avx512_misindexed",
    "avx512_scale_index",
    "block_scales",
    "convert",
    "dequantize",
    "dequantize_path",
    "in_returned_shape",
    "nan_encodings",
    "output_shape",
    "single_byte_shim",
    "uses_native_dequantize",
]

VECTOR = 16  # floats per AVX-512 register: the vector loop's step along the last dimension
NATIVE_FP4 = np.where(np.arange(16) == 8, np.float32(-0.0), codebooks.FP4.values).astype(np.float32)
AVX512_FP4 = codebooks.FP4.values  # the vector loop's table: nibble 8 is +0.0, as in get_4bit_type
_SIGN16 = np.uint32(0x8000)
_QUIET16 = np.uint32(0x0040)


def dequantize_path(shape: tuple[int, ...], blocksize: int, host: Host = DEFAULT_HOST) -> str:
    """Which path bnb's CPU dequantize_4bit takes for a state of ``shape``: "torch", "scalar" or "avx512".

    "torch" for a 0-d shape or an odd last dimension, and on an AVX-512 host (``host.lanes == 16``) for
    blocksize >= 2048; then "avx512" on an AVX-512 host when the last dimension is a multiple of 16 (every
    blocksize is >= 16); "scalar" otherwise.
    """
    shape = tuple(shape)
    avx512 = host.lanes == 16
    if not shape or shape[-1] % 2 or (avx512 and blocksize >= 2048):
        return "torch"
    return "avx512" if avx512 and shape[-1] % VECTOR == 0 else "scalar"


def uses_native_dequantize(shape: tuple[int, ...], blocksize: int = 64, *, host: Host = DEFAULT_HOST) -> bool:
    """Whether bnb's CPU dequantize_4bit takes its C++ kernel (scalar or AVX-512 loop), not torch."""
    return dequantize_path(shape, blocksize, host) != "torch"


def block_scales(state: QuantState) -> np.ndarray:
    """float32 (n_blocks,): absmax, or ``f32(f32(code2[q] * absmax2) + offset)`` when nested."""
    if state.nested is None:
        return state.absmax
    nested = state.nested
    group = np.arange(nested.absmax_q.size) // nested.blocksize2
    with np.errstate(invalid="ignore", over="ignore"):
        return nested.code2[nested.absmax_q] * nested.absmax2[group] + nested.offset


def _native_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16: bnb's C++ ``float_to_bf16``: add 0x7fff plus the kept lsb, keep the top 16 bits.

    Round-to-nearest-even for numbers, but with no NaN guard: 0xffffffff wraps to +0.0 and a NaN
    whose low half is large enough carries into the exponent or sign.
    """
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)  # uint32 arithmetic wraps, as in C++
    return (rounded >> 16).astype(np.uint16).view(bfloat16)


def _avx512_bf16(x: np.ndarray, avx512_bf16: bool) -> np.ndarray:
    """bfloat16: the vector loop's ``cvt_fp32_to_bf16``. Numbers round to nearest even in both forms.

    With AVX512_BF16 (``vcvtneps2bf16``): a float32 subnormal becomes the zero of its sign, and a NaN
    keeps its sign and top 16 bits with the quiet bit set. Without it (bnb's integer emulation): float32
    subnormals round like other numbers and every NaN becomes 0xffff.
    """
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    out = _native_bf16(x).view(np.uint16).astype(np.uint32)
    nan = np.isnan(x)
    if avx512_bf16:
        subnormal = (bits & np.uint32(0x7F800000)) == 0
        out = np.where(subnormal, (bits >> 16) & _SIGN16, out)
        out = np.where(nan, (bits >> 16) | _QUIET16, out)
    else:
        out = np.where(nan, np.uint32(0xFFFF), out)
    return out.astype(np.uint16).view(bfloat16)


def _torch_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16: the compiled torch fallback's conversion (RNE; every NaN becomes 0x7fc0)."""
    out = np.asarray(x, dtype=np.float32).astype(bfloat16)
    out.view(np.uint16)[np.isnan(x)] = 0x7FC0
    return out


def convert(values: np.ndarray, dtype: str | np.dtype, path: str, *, avx512_bf16: bool = False) -> np.ndarray:
    """float32 ``values`` (any shape) converted to ``dtype`` as bnb's dequantize ``path`` converts them.

    float32: unchanged. float16: RNE with quieted NaN payloads on every path. bfloat16: "scalar"
    :func:`_native_bf16`, "avx512" :func:`_avx512_bf16` (``avx512_bf16``: the CPU has AVX512_BF16, as
    ``bitsandbytes.functional.has_avx512bf16()`` reports), "torch" :func:`_torch_bf16`.
    """
    out_dtype = as_dtype(dtype)
    if out_dtype == np.float16:
        return narrow_f16(values)
    if out_dtype != bfloat16:
        return values
    if path == "scalar":
        return _native_bf16(values)
    if path == "avx512":
        return _avx512_bf16(values, avx512_bf16)
    return _torch_bf16(values)


def dequantize(
    state: QuantState,
    dtype: str | np.dtype | None = None,
    *,
    host: Host = DEFAULT_HOST,
) -> np.ndarray:
    """bnb's ``dequantize_4bit`` on the CPU of ``host``: values, bits and the shape it returns.

    dtype: output dtype, default ``state.dtype``. ``host.avx512_bf16``: the CPU has AVX512_BF16 (read only
    on the AVX-512 path). Every value is ``f32(code[q] * absmax[i // blocksize])`` for element ``i`` in the
    state's order, with the table and conversion of the path bnb takes (:func:`dequantize_path`,
    :func:`convert`); FP4 nibble 8 is -0.0 on the scalar path, +0.0 on the others. Where bnb's AVX-512 loop
    reads another block's absmax (:func:`avx512_misindexed`) the dialect still uses the element's own.

    Shape: :func:`output_shape`, the elements in the state's order. Where bnb raises instead (a 3-D state
    of <= 2 elements), ``state.shape``: raising on a valid state is not a rule of the dialect but a bug of
    the library (declared by the backend).
    """
    out_dtype = state.dtype if dtype is None else as_dtype(dtype)
    n, bs = state.numel, state.blocksize
    path = dequantize_path(state.shape, bs, host)
    code = NATIVE_FP4 if state.quant_type == "fp4" and path == "scalar" else state.code
    values = code[unpack(state.packed, n)]
    with np.errstate(invalid="ignore", over="ignore"):
        values = values * np.repeat(block_scales(state), bs)[:n]  # float32 * float32, one rounding
    out = convert(values, out_dtype, path, avx512_bf16=host.avx512_bf16)
    return in_returned_shape(out, state.shape, lambda shape: output_shape(shape, bs, host=host))


TORCH_FALLBACK_BF16_NANS = (0x7FC0, 0xFFFF)
"""The bfloat16 NaNs of the torch fallback dequantize: torch.compile's kernel writes 0x7fc0, eager torch
(after the recompile limit, or when compilation fails) 0xffff; which one depends on the process's history."""


def nan_encodings(
    state: QuantState, dtype: str | np.dtype | None = None, *, host: Host = DEFAULT_HOST
) -> tuple[int, ...] | None:
    """The NaN bit patterns bnb may write where :func:`dequantize` writes a NaN, when there are several:
    :data:`TORCH_FALLBACK_BF16_NANS` for bfloat16 output through the torch fallback (docs/dialects.md,
    declared deviations of bnb-cpu); None where the bits are exactly :func:`dequantize`'s."""
    out_dtype = state.dtype if dtype is None else as_dtype(dtype)
    if out_dtype == bfloat16 and dequantize_path(state.shape, state.blocksize, host) == "torch":
        return TORCH_FALLBACK_BF16_NANS
    return None


def avx512_scale_index(shape: tuple[int, ...], blocksize: int) -> np.ndarray:
    """int64 (numel,): the absmax index bnb's AVX-512 loop multiplies each element by, in state order.

    The loop views the state as m = prod(shape[:-1]) rows of n = shape[-1] (a 1-D state is one row) and
    gives element (r, c) ``absmax[r * (n // blocksize) + c // blocksize]``; its block is
    ``(r * n + c) // blocksize``. The dialect does not use this index: it describes bnb's defect.
    """
    n = shape[-1]
    row, col = np.divmod(np.arange(math.prod(shape), dtype=np.int64), n)
    return row * (n // blocksize) + col // blocksize


def avx512_misindexed(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether bnb's AVX-512 loop dequantizes a state of ``shape`` with a wrong absmax somewhere.

    True exactly when an AVX-512 host takes the vector loop (:func:`dequantize_path`) and some element's
    :func:`avx512_scale_index` differs from its block. With m rows of n = q * blocksize + s, row r's
    elements fall in blocks ``r * q + (r * s + c) // blocksize`` but get ``r * q + c // blocksize``; for
    r >= 1 and s > 0 the first column where they differ is ``max(0, blocksize - r * s)``, which exists
    when ``r * s + n > blocksize``. So: vector loop, m >= 2, s > 0 and ``(m - 1) * s + n > blocksize``.
    Whether the values then differ depends on the data (two blocks may share an absmax).
    """
    shape = tuple(shape)
    if dequantize_path(shape, blocksize, Host(lanes=16)) != "avx512":
        return False
    rows, n = math.prod(shape[:-1]), shape[-1]
    s = n % blocksize
    return rows >= 2 and s > 0 and (rows - 1) * s + n > blocksize


def output_shape(
    shape: tuple[int, ...], blocksize: int = 64, *, host: Host = DEFAULT_HOST
) -> tuple[int, ...]:
    """The shape bnb's CPU ``dequantize_4bit`` returns for a state of ``shape`` (values: :func:`dequantize`).

    The C++ kernel views a 1-D tensor as one row, so an even-length 1-D tensor comes back (1, n) unless
    the torch fallback runs (:func:`dequantize_path`; it returns the state's shape); and when the packed
    tensor has a single row (n <= 2) bnb transposes its result.
    """
    shape = tuple(shape)
    if not shape:
        raise ValueError("bitsandbytes fails to dequantize a 0-d tensor (it indexes shape[-1])")
    native = uses_native_dequantize(shape, blocksize, host=host)
    out = (1, shape[0]) if len(shape) == 1 and native else shape
    return single_byte_shim(shape, out)


def single_byte_shim(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``functional.dequantize_4bit`` (any device) returns for a state of ``shape`` whose kernel
    wrote ``out``: when the packed tensor has a single row, which for bnb's own (bytes, 1) packing
    means one byte (n <= 2), it calls ``.t()`` on the result, which reverses a 2-D shape, leaves a 1-D
    one and raises ValueError (as bnb does) for more dimensions."""
    if (math.prod(shape) + 1) // 2 != 1:
        return out
    if len(out) > 2:
        raise ValueError(f"bitsandbytes fails to dequantize shape {shape}: .t() of a {len(out)}-D tensor")
    return out[::-1]


def in_returned_shape(values: np.ndarray, shape: tuple[int, ...], output_shape) -> np.ndarray:
    """``values`` (a state of ``shape``, in its element order) in the shape ``output_shape(shape)`` says
    bnb returns; in ``shape`` itself where bnb raises instead (raising on a valid state is not a rule of
    a dialect but a bug of the library, which the backend declares)."""
    try:
        return values.reshape(output_shape(shape))
    except ValueError:
        return values.reshape(shape)
