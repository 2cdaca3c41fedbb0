"""4-bit blockwise quantization: NF4 (QLoRA's NormalFloat) and FP4, as bitsandbytes stores them.

Notation: ``x`` the input of any shape with n elements, ``blocksize`` elements a block, ``absmax`` the
float32 scale of each block, ``code`` the 16-entry table (:mod:`reflora.codebooks`), ``q`` the 4-bit
codes, ``packed`` two codes a byte.

The canonical rules, each a guarantee of :func:`quantize` and :func:`dequantize`:

* **Input.** float32, float16 or bfloat16, any shape, at least one element, in either byte order (a
  big-endian array is taken by value: the same codes as the native array). Blocks run over the
  row-major flattening of the logical array, whatever its strides (a transposed view is quantized as
  the matrix it shows, not as its memory).
* **Non-finite input** (NaN, +inf, -inf) raises ValueError naming the first bad index. No output is
  ever produced from it.
* **blocksize** is one of 32, 64, 128, ..., 4096; another integer raises ValueError, a non-integer
  (64.0, True) TypeError.
* **absmax**, **zero blocks** and the **ragged tail**: :mod:`reflora.blockwise`.
* **Code**: the nearest table value to x/absmax in exact arithmetic, a tie going to the lower value
  (for NF4, the lower code); :mod:`reflora.codebooks`.
* **Packing**: element 2j in the high nibble, element 2j+1 in the low nibble; an odd n pads the last
  low nibble with the zero code (7 for NF4, 0 for FP4).
* **Dequantize**: ``out = dtype(f32(code[q] * absmax))``: one float32 multiply, then one
  round-to-nearest-even conversion to the output dtype. A zero block gives +0.0 (-0.0 where double
  quantization rebuilds its scale negative). (Converting a float32
  state to float16 may overflow to inf, as any such conversion does.)
* **Double quantization** of absmax: :mod:`reflora.double_quant`. Some block scales can rebuild
  negative (its rule 5), flipping those blocks' signs: :func:`quantize` then warns with
  :class:`reflora.double_quant.NegativeScaleWarning`, and the bytes stay what the format computes. Some
  can rebuild to exactly 0 for a block that is not zero (every element then dequantizes to 0):
  :class:`reflora.double_quant.ZeroScaleWarning`. Some can rebuild beyond the dtype's largest value, so
  that finite input dequantizes to inf: :class:`reflora.double_quant.ScaleRangeWarning`. In each case
  the bytes stay as computed.
"""

from __future__ import annotations

import numpy as np

from reflora import blockwise, codebooks
from reflora.checks import check_flag
from reflora.double_quant import BLOCKSIZE2, warn_lost_scales
from reflora.double_quant import dequantize as dequantize_absmax
from reflora.double_quant import quantize as quantize_absmax
from reflora.dtypes import as_dtype, dtype_name
from reflora.state import QuantState, check_blocksize, check_blocksize2

__all__ = ["block_scales", "check_input", "dequantize", "pack", "quantize", "unpack"]


def check_input(x: np.ndarray) -> np.ndarray:
    """``x`` as a numpy array in native byte order after checking the input rules; raises TypeError or
    ValueError."""
    x = np.asarray(x)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # the same values, in the byte order numpy computes in
    dtype_name(x.dtype)  # TypeError unless float32 / float16 / bfloat16
    if x.size == 0:
        raise ValueError(f"cannot quantize an empty array (shape {x.shape})")
    finite = np.isfinite(x.astype(np.float32, copy=False))
    if not finite.all():
        flat = int(np.flatnonzero(~finite.reshape(-1))[0])
        where = np.unravel_index(flat, x.shape) if x.ndim else ()
        value = float(x.reshape(-1)[flat])
        raise ValueError(
            f"input is not finite at index {tuple(int(i) for i in where)} (flat index {flat}): {value}; "
            "NaN and inf have no 4-bit code"
        )
    return x


def pack(q: np.ndarray, pad: int) -> np.ndarray:
    """uint8 (ceil(n/2),): codes q (uint8 (n,)) two a byte, element 2j high; an odd n pads with ``pad``.

    TypeError unless q is a 1-D uint8 array and pad an int; ValueError for a code or pad above 15 (naming
    the first code): a code of 16 corrupted its neighbour's nibble without a word."""
    if not isinstance(q, np.ndarray) or q.dtype != np.uint8 or q.ndim != 1:
        what = f"{q.dtype} array of shape {q.shape}" if isinstance(q, np.ndarray) else type(q).__name__
        raise TypeError(f"q must be a 1-D uint8 array of codes, got a {what}")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad <= 15:
        raise TypeError(f"pad must be an int code in [0, 15], got {pad!r}")
    bad = np.flatnonzero(q > 15)
    if bad.size:
        raise ValueError(f"q[{int(bad[0])}] = {int(q[bad[0]])}: a 4-bit code is at most 15")
    return _pack(q, pad)


def _pack(q: np.ndarray, pad: int) -> np.ndarray:
    """:func:`pack` without its checks, for codes the quantizer made."""
    if q.size % 2:
        q = np.append(q, np.uint8(pad))
    return (q[0::2] << 4) | q[1::2]


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 (n,): the codes of :func:`pack`, in element order, without the padding nibble.

    packed: uint8 bytes, read in row-major order whatever their shape (bitsandbytes stores (k, 1));
    TypeError for another dtype (an int64 "byte" was silently cut to 8 bits). n: an int in
    [0, 2·packed.size], else ValueError (a negative n sliced from the end; a larger one returned fewer
    codes than asked for)."""
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        what = f"{packed.dtype} array" if isinstance(packed, np.ndarray) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 array of bytes, got a {what}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {n!r}")
    if not 0 <= n <= 2 * packed.size:
        raise ValueError(f"n = {n}: {packed.size} bytes hold 0 to {2 * packed.size} codes")
    flat = packed.reshape(-1)
    q = np.empty(flat.size * 2, dtype=np.uint8)
    q[0::2] = flat >> 4
    q[1::2] = flat & 0x0F
    return q[:n]


def quantize(
    x: np.ndarray,
    blocksize: int = 64,
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize2: int = BLOCKSIZE2,
) -> QuantState:
    """Quantize ``x`` to 4 bits, blockwise, by the module's rules.

    x: float32 / float16 / ml_dtypes.bfloat16 array, any shape, finite, non-empty.
    blocksize: elements per block, one of 32 ... 4096 (default 64, as Hugging Face always uses).
    quant_type: "nf4" or "fp4".
    double_quant: also quantize the block scales (:mod:`reflora.double_quant`), True or False.
    blocksize2: block scales a double-quantization group, a positive int (default 256, as bitsandbytes
    and Hugging Face use; torchao's ``scaler_block_size``); used only with double_quant.

    Returns a :class:`reflora.QuantState` whose ``dtype`` (in native byte order) and ``shape`` are those
    of ``x``. With double_quant, warns (:func:`reflora.double_quant.warn_lost_scales`)
    :class:`~reflora.double_quant.NegativeScaleWarning` when some block scales rebuild negative,
    :class:`~reflora.double_quant.ZeroScaleWarning` when a block that is not zero gets a scale of exactly
    0, and :class:`~reflora.double_quant.ScaleRangeWarning` when some rebuild beyond the dtype's largest
    value (those elements dequantize to inf); the state is returned as computed.
    """
    x = check_input(x)
    blocksize = check_blocksize(blocksize)
    double_quant = check_flag("double_quant", double_quant)
    blocksize2 = check_blocksize2(blocksize2)
    codebook = codebooks.get(quant_type)
    flat = x.reshape(-1).astype(np.float32, copy=False)  # logical row-major order; exact widening
    absmax = blockwise.block_absmax(flat, blocksize)
    q = blockwise.encode(flat, absmax, blocksize, codebook)
    nested = quantize_absmax(absmax, blocksize2) if double_quant else None
    if nested is not None:
        warn_lost_scales(nested, absmax, x.dtype, blocksize, flat.size)
    return QuantState(
        packed=_pack(q, codebook.zero_code),
        absmax=None if double_quant else absmax,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=codebook.values,
        nested=nested,
    )


def block_scales(state: QuantState) -> np.ndarray:
    """float32 (n_blocks,): the absmax of each block, rebuilt from the nested state if double-quantized.
    TypeError for anything but a :class:`QuantState`."""
    _require_state(state)
    return state.absmax if state.nested is None else dequantize_absmax(state.nested)


def _require_state(state: QuantState) -> None:
    if not isinstance(state, QuantState):  # an ndarray failed with "no attribute 'nested'"
        raise TypeError(f"state must be a reflora.QuantState, got {type(state).__name__}")


def _check_scales(state: QuantState) -> None:
    _require_state(state)
    tables = {"code": state.code}
    if state.nested is not None:
        tables["nested.code2"] = state.nested.code2
    for name, table in tables.items():
        bad = np.flatnonzero(~np.isfinite(table))
        if bad.size:  # a NaN table dequantized everything to NaN without a word
            raise ValueError(f"{name}[{int(bad[0])}] = {table[bad[0]]}: a code table must be finite")
    if state.nested is None:
        stored = {"absmax": state.absmax}
    else:
        stored = {"nested.absmax2": state.nested.absmax2}
        if not np.isfinite(state.nested.offset):
            raise ValueError(f"nested.offset = {state.nested.offset}: the offset must be finite")
    for name, a in stored.items():
        bad = np.flatnonzero(~(np.isfinite(a) & (a >= 0)))
        if bad.size:
            raise ValueError(
                f"{name}[{int(bad[0])}] = {a[bad[0]]}: a stored scale must be finite and >= 0 (the canonical "
                "rules never store another)"
            )


def dequantize(state: QuantState, dtype: str | np.dtype | None = None) -> np.ndarray:
    """The tensor a :class:`QuantState` stands for: ``dtype(f32(code[q] * absmax))``.

    dtype: the output dtype ("float32", "float16", "bfloat16" or a numpy dtype); default ``state.dtype``.
    Returns an array of ``state.shape``.

    The stored scales must be finite, and absmax (or absmax2) >= 0 as the canonical rules store them,
    and the code tables finite, else ValueError naming the first bad one; TypeError for anything but a
    :class:`QuantState`. (A state can hold other values, such as a dialect's NaN
    absmax: :mod:`reflora.dialects` dequantizes those.) Any finite offset is used as stored, and a
    double-quantized scale that rebuilds negative, or beyond the output dtype's largest value (giving
    ±inf, :func:`reflora.double_quant.scales_out_of_range`), is used as rebuilt.
    """
    _check_scales(state)
    out_dtype = state.dtype if dtype is None else as_dtype(dtype)
    n, bs = state.numel, state.blocksize
    # A byte decodes to two table values at once: pairs[b] = (code[b >> 4], code[b & 15]).
    pairs = np.stack([np.repeat(state.code, 16), np.tile(state.code, 16)], axis=1)
    values = np.take(pairs, state.packed, axis=0).reshape(-1)[:n]  # float32 (n,)
    absmax = block_scales(state)
    whole = n // bs * bs
    block_view = values[:whole].reshape(-1, bs)  # (blocks, bs) *= (blocks, 1), in float32
    # A scale rebuilt past the dtype gives ±inf, and NaN where it meets a zero code: documented
    # (docs/spec.md) and warned about when quantizing, so numpy's own warnings are not repeated here.
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(block_view, absmax[: whole // bs, None], out=block_view)
        values[whole:] *= absmax[-1]
        return values.astype(out_dtype, copy=False).reshape(state.shape)
