"""The quantization state: everything needed to rebuild a blockwise-quantized tensor.

Names follow bitsandbytes' ``QuantState`` and its state-dict keys so that interop reads naturally:

* ``packed``     uint8 (ceil(n/2),): two 4-bit codes a byte, element 2j in the high nibble.
* ``absmax``     float32 (n_blocks,): the scale of each block, when not double-quantized.
* ``code``       float32 (16,): the 4-bit table (``quant_map`` in a state dict).
* ``nested``     the double-quantized absmax (:class:`NestedState`), or None.
* ``shape``, ``dtype``: the original tensor's shape and dtype; ``blocksize``; ``quant_type``.

Both classes are frozen and hold private read-only copies of their arrays: a state is a value, and
no array the caller keeps (or a view of it) can change it later. ``==`` compares every field bit for
bit (NaN payloads included), which is what "byte-identical" means in reflora's tests.

The constructors check structure: dtypes, sizes, ``shape`` (ints, none negative, at least one
element), ``blocksize``, ``blocksize2``. They do not check the *values* of the scales, because a state
also holds what other implementations store (a dialect's NaN absmax, :mod:`reflora.dialects`);
:func:`reflora.nf4.dequantize` refuses a non-finite or negative absmax or absmax2, a non-finite
offset and a non-finite code or code2 table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from reflora.checks import check_real
from reflora.dtypes import dtype_name

__all__ = ["BLOCKSIZES", "NestedState", "QuantState", "check_blocksize", "check_blocksize2", "check_shape"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_blocksize(blocksize: int) -> int:
    """``blocksize`` as an int: TypeError unless it is an integer (64.0 and True are not), ValueError
    unless it is one of :data:`BLOCKSIZES`."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"blocksize must be an int, one of {BLOCKSIZES}, got {blocksize!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


MAX_BLOCKSIZE2 = 2**31 - 1  # what bitsandbytes' int-typed blocksize fields hold


def check_blocksize2(blocksize2: int) -> int:
    """``blocksize2`` (absmax values a double-quantization group) as an int: TypeError unless it is an
    integer (True and 256.0 are not, as for ``blocksize``), ValueError unless it is in
    [1, MAX_BLOCKSIZE2] (2**31 − 1: 10**20 failed deep in numpy)."""
    b2 = blocksize2
    if isinstance(b2, bool) or not isinstance(b2, (int, np.integer)):
        raise TypeError(f"blocksize2 must be a positive int, got {b2!r}")
    if not 1 <= b2 <= MAX_BLOCKSIZE2:
        raise ValueError(f"blocksize2 must be a positive int of at most 2**31 - 1, got {b2!r}")
    return int(b2)


def check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` as a tuple of ints: TypeError unless it is a sequence of integers (2.7 and True are not),
    ValueError for a negative dimension or no elements (a quantized tensor has at least one)."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}")
    dims = tuple(int(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape {dims} has a negative dimension")
    if 0 in dims:
        raise ValueError(f"shape {dims} has no elements; a quantized tensor has at least one")
    return dims


def _frozen(a: np.ndarray, dtype: type, name: str, ndim: int = 1) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    # Always a private copy: a read-only array can still be a view of memory its owner writes. The copy
    # lives in an immutable bytes object, so no array over it (its .base included: an owning array's
    # setflags(write=True) was allowed) can be made writable.
    return np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@dataclass(frozen=True, eq=False)
class NestedState:
    """Double quantization of the per-block absmax (QLoRA's "quantizing the quantization constants").

    absmax_q:  uint8 (n_blocks,), an 8-bit code per absmax, in the dynamic map ``code2``.
    absmax2:   float32 (ceil(n_blocks/blocksize2),), max |absmax - offset| over each group.
    code2:     float32 (256,), the 8-bit table.
    offset:    float32 scalar, the mean that was subtracted from absmax before quantizing.
    blocksize2: int, absmax values a group (256).

    Reconstruction: absmax[i] = f32(f32(code2[absmax_q[i]] * absmax2[i // blocksize2]) + offset).
    """

    absmax_q: np.ndarray
    absmax2: np.ndarray
    code2: np.ndarray
    offset: np.float32
    blocksize2: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "absmax_q", _frozen(self.absmax_q, np.uint8, "absmax_q"))
        object.__setattr__(self, "absmax2", _frozen(self.absmax2, np.float32, "absmax2"))
        object.__setattr__(self, "code2", _frozen(self.code2, np.float32, "code2"))
        if self.code2.size != 256:
            raise ValueError(f"code2 must have 256 entries, got {self.code2.size}")
        if np.ndim(self.offset) != 0:  # an array would be applied block by block, silently
            raise ValueError(f"offset must be a scalar, got shape {np.shape(self.offset)}")
        given = check_real("offset", self.offset)  # np.float32("0.5") parses a string
        with np.errstate(over="ignore"):
            offset = np.float32(self.offset)
        if math.isfinite(given) and not np.isfinite(offset):  # 1e39 was stored as inf, with a warning
            raise ValueError(f"offset {given!r} is beyond float32's range")
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "blocksize2", check_blocksize2(self.blocksize2))
        expected = math.ceil(self.absmax_q.size / self.blocksize2)
        if self.absmax2.size != expected:
            raise ValueError(
                f"absmax2 has {self.absmax2.size} entries; {self.absmax_q.size} codes in groups of "
                f"{self.blocksize2} need {expected}"
            )

    def __reduce__(self):
        # through the constructor: pickle and copy.deepcopy give a checked state of read-only arrays
        return (type(self), (self.absmax_q, self.absmax2, self.code2, self.offset, self.blocksize2))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NestedState):
            return NotImplemented
        return (
            self.blocksize2 == other.blocksize2
            and self.offset.tobytes() == other.offset.tobytes()
            and all(_same_bits(getattr(self, k), getattr(other, k)) for k in ("absmax_q", "absmax2", "code2"))
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class QuantState:
    """A 4-bit blockwise-quantized tensor. See the module docstring for the fields."""

    packed: np.ndarray
    absmax: np.ndarray | None
    shape: tuple[int, ...]
    dtype: np.dtype
    blocksize: int
    quant_type: str
    code: np.ndarray
    nested: NestedState | None = None
    _n: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        shape = check_shape(self.shape)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        dtype_name(self.dtype)  # raises for a dtype reflora does not quantize
        object.__setattr__(self, "blocksize", check_blocksize(self.blocksize))
        if not isinstance(self.quant_type, str):  # np.array(["nf4"]) passed the membership test
            raise TypeError(f"quant_type must be the str 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.nested is not None and not isinstance(self.nested, NestedState):
            raise TypeError(f"nested must be a NestedState or None, got {type(self.nested).__name__}")
        n = math.prod(shape)
        object.__setattr__(self, "_n", n)
        object.__setattr__(self, "packed", _frozen(self.packed, np.uint8, "packed"))
        object.__setattr__(self, "code", _frozen(self.code, np.float32, "code"))
        if self.packed.size != (n + 1) // 2:
            raise ValueError(f"packed has {self.packed.size} bytes; shape {shape} needs {(n + 1) // 2}")
        if self.code.size != 16:
            raise ValueError(f"code must have 16 entries, got {self.code.size}")
        if (self.absmax is None) == (self.nested is None):
            raise ValueError("exactly one of absmax (plain) and nested (double-quantized) must be given")
        if self.absmax is not None:
            object.__setattr__(self, "absmax", _frozen(self.absmax, np.float32, "absmax"))
        n_absmax = self.absmax.size if self.absmax is not None else self.nested.absmax_q.size
        if n_absmax != self.n_blocks:
            raise ValueError(f"{n_absmax} block scales for {self.n_blocks} blocks of {self.blocksize}")

    @property
    def numel(self) -> int:
        return self._n

    @property
    def n_blocks(self) -> int:
        return math.ceil(self._n / self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    def __reduce__(self):
        # through the constructor: pickle and copy.deepcopy give a checked state of read-only arrays
        layout = (self.shape, self.dtype, self.blocksize, self.quant_type)
        return (type(self), (self.packed, self.absmax, *layout, self.code, self.nested))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        same_absmax = (self.absmax is None and other.absmax is None) or (
            self.absmax is not None and other.absmax is not None and _same_bits(self.absmax, other.absmax)
        )
        return (
            (self.shape, self.dtype, self.blocksize, self.quant_type)
            == (other.shape, other.dtype, other.blocksize, other.quant_type)
            and _same_bits(self.packed, other.packed)
            and _same_bits(self.code, other.code)
            and same_absmax
            and self.nested == other.nested
        )

    __hash__ = None  # type: ignore[assignment]
