"""The ``reflora`` dialect: the canonical oracle itself, behind the common dialect interface.

:func:`quantize` and :func:`dequantize` are :func:`reflora.nf4.quantize` and :func:`reflora.nf4.dequantize`
with one addition, ``offset=``: the double-quantization offset to use instead of the exactly rounded
mean, so that a state another implementation produced (bnb takes a float32 torch mean, which can differ
from the exact one by an ulp) can be replayed and compared code for code. Non-finite input raises, as
the canonical rules say.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reflora import nf4
from reflora.double_quant import BLOCKSIZE2
from reflora.double_quant import quantize as quantize_absmax
from reflora.state import QuantState

__all__ = ["DESCRIPTION", "NAME", "check_offset", "dequantize", "nan_encodings", "quantize"]

NAME = "reflora"
DESCRIPTION = "the canonical oracle: exact-arithmetic nearest value, ties low, exactly rounded DQ mean"


def quantize(
    x: np.ndarray,
    blocksize: int = 64,
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    offset: float | None = None,
    blocksize2: int = BLOCKSIZE2,
) -> QuantState:
    """:func:`reflora.nf4.quantize`, with ``offset`` replacing the DQ mean when given (needs double_quant);
    blocksize2: the block scales a double-quantization group (256 unless given)."""
    check_offset(offset, double_quant)
    dq = double_quant and offset is None
    state = nf4.quantize(x, blocksize, quant_type=quant_type, double_quant=dq, blocksize2=blocksize2)
    if offset is None:
        return state
    nested = quantize_absmax(state.absmax, blocksize2, offset=offset)
    return dataclasses.replace(state, absmax=None, nested=nested)


def dequantize(state: QuantState, dtype: str | np.dtype | None = None) -> np.ndarray:
    """:func:`reflora.nf4.dequantize`: ``dtype(f32(code[q] * absmax))`` in ``state.shape``."""
    return nf4.dequantize(state, dtype)


def nan_encodings(state: QuantState, dtype: str | np.dtype | None = None) -> str:
    """ "any": the rules say where a dequantized value is NaN (only where a zero code meets a scale
    double quantization rebuilt to inf: 0 · inf, docs/spec.md) but not its bits. IEEE 754 leaves the
    NaN an invalid operation makes to the platform (x86: 0xffc00000; CUDA: 0x7fffffff), and 16-bit
    conversions of it differ too (numpy and ml_dtypes keep the sign: bfloat16 0xffc0; torch's CPU
    bfloat16 conversion writes 0xffff). Found by the audit profile on reflora's own torch backend."""
    return "any"


def check_offset(offset: float | None, double_quant: bool) -> None:
    """ValueError for an ``offset`` without ``double_quant`` (every dialect's ``quantize`` takes the same
    arguments and refuses this the same way, rather than ignoring the offset)."""
    if offset is not None and not double_quant:
        raise ValueError("offset is the double-quantization offset; it needs double_quant=True")
