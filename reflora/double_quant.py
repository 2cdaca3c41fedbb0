"""Double quantization: storing the per-block absmax in 8 bits instead of 32 (QLoRA, section 3).

With blocks of 64, a float32 absmax costs 32/64 = 0.5 bits per parameter. Double quantization
quantizes those absmax values again, blockwise, with an 8-bit code, bringing the cost to
8/64 + 32/(64*256) = 0.127 bits per parameter.

Rules (names as in :class:`reflora.state.NestedState`):

1. ``offset`` = the mean of absmax, rounded once to float32 (:func:`mean_f32`). absmax values are all
   positive, so subtracting the mean centres them and lets a *signed* code spend its range well.
2. ``c = f32(absmax - offset)``, one float32 subtraction per value.
3. c is quantized blockwise (:mod:`reflora.blockwise`) in groups of ``blocksize2`` = 256 with
   bitsandbytes' signed dynamic map (:data:`reflora.codebooks.DYNAMIC_MAP`): ``absmax2`` = max |c| per
   group, ``absmax_q`` = nearest map value to c/absmax2, ties to the lower index. A group whose c are
   all zero has absmax2 = 0 and codes 127 (the map's 0.0).
4. Reconstruction: ``absmax = f32(f32(code2[absmax_q] * absmax2) + offset)``: a float32 multiply,
   then a float32 add, two roundings in that order (a fused multiply-add would round once: one ulp
   away on a few % of blocks of a normal weight, many ulps on a block far below the offset in a group
   with a large absmax2; :func:`reflora.bounds.fma_dequant_error`).
5. A rebuilt absmax can be **negative** (no clamp, as in bitsandbytes), and the block then dequantizes
   with every sign flipped. It is negative only if code2[absmax_q] * absmax2 < -offset exactly (the
   multiply's rounding can at most bring it to 0). Since c >= -offset, the 8-bit code must then round
   c/absmax2 *down* by more than (c + offset)/absmax2, which is the block's own absmax a in units of
   absmax2. Rounding moves a value by at most half a gap of the map, a fraction of the value, so only a
   block with a < offset/2 can flip (a < 0.099 * offset when offset/absmax2 is in [0.01, 0.1)), and only
   in a group with absmax2 > offset / 0.99296874 (code2's most negative value is -0.99296874, so
   code2[q] * absmax2 >= -offset otherwise): one holding an outlier scale. :func:`negative_scales`
   finds such blocks; :func:`reflora.nf4.quantize` warns with :class:`NegativeScaleWarning`.
   docs/spec.md ("Negative rebuilt scales") has the derivation and measured cases.
6. A rebuilt absmax can also be exactly **zero** for a block that is not: when f32(code2 * absmax2) is
   exactly -offset. Every element of that block then dequantizes to 0. (Measured: 123 scales of 503,
   128 of 1.0 and 5 of 247 have the exact mean 247 and absmax2 = 256, and -246/256 takes the code
   -0.96484375 = -247/256, so the 128 blocks of 1.0 rebuild to 0.) :func:`zero_scales` finds them;
   quantize warns with :class:`ZeroScaleWarning`.
7. A rebuilt absmax can be beyond the largest value of the weight's dtype (:func:`scales_out_of_range`):
   elements at that scale dequantize to inf from finite input; :class:`ScaleRangeWarning`.

:func:`warn_lost_scales` issues the three warnings (rules 5 to 7) for :func:`reflora.nf4.quantize`
and the torch backend alike.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from reflora import blockwise
from reflora.checks import check_real
from reflora.codebooks import DYNAMIC_MAP
from reflora.dtypes import as_dtype
from reflora.state import NestedState, check_blocksize2

__all__ = [
    "NegativeScaleWarning",
    "RebuiltScaleWarning",
    "ScaleRangeWarning",
    "ZeroScaleWarning",
    "dequantize",
    "mean_f32",
    "negative_scales",
    "quantize",
    "scales_out_of_range",
    "warn_lost_scales",
    "zero_scales",
]

BLOCKSIZE2 = 256


class RebuiltScaleWarning(RuntimeWarning):
    """Double quantization rebuilt some block scales so that those blocks lose their values: the base
    of :class:`NegativeScaleWarning`, :class:`ZeroScaleWarning` and :class:`ScaleRangeWarning`. The
    bytes are what the format computes; the warning makes the loss visible."""


class NegativeScaleWarning(RebuiltScaleWarning):
    """Double quantization rebuilt some block scales below zero (rule 5): those blocks dequantize with
    their signs flipped. The bytes are what the format computes; the warning makes the loss visible."""


class ZeroScaleWarning(RebuiltScaleWarning):
    """Double quantization rebuilt the scale of some blocks that are not all zero to exactly 0 (rule 6):
    every element of those blocks dequantizes to 0."""


class ScaleRangeWarning(RebuiltScaleWarning):
    """Double quantization rebuilt some block scales beyond the largest value of the weight's dtype:
    elements at those scales dequantize to ±inf (and a zero element to NaN where the float32 scale is
    itself infinite), from finite input. The bytes are what the format computes; the warning makes the
    loss visible (docs/spec.md, rebuilt scales beyond the dtype's range)."""


def mean_f32(values: np.ndarray) -> np.float32:
    """The exact mean of float32 ``values`` (1-D, non-empty, finite), rounded once to float32.

    Sums in floating point depend on their order; this one does not. Each float32 is m * 2**e with an
    integer m of at most 24 bits, so the sum is an exact (big) integer times 2**e_min. The division by
    n is then done in integers with *round-to-odd* at 53 bits (truncate, and set the last bit if
    anything was cut off); rounding that to float32 (24 bits) is then a single correct rounding of the
    exact mean, because round-to-odd keeps the information a later rounding to fewer bits needs.
    """
    v = _float32_values("values", values).astype(np.float64)
    if v.size == 0:
        raise ValueError("mean of an empty array")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:  # a NaN or inf went into the integer sum as garbage (-2.7e11 for [1, NaN])
        raise ValueError(f"values[{int(bad[0])}] = {v[bad[0]]}; the mean is of finite values only")
    mant, exp = np.frexp(v)  # v = mant * 2**exp, 0.5 <= |mant| < 1 (or 0)
    ints = (mant * 2.0**24).astype(np.int64)  # exact: float32 has 24 significant bits
    exps = exp.astype(np.int64) - 24
    e_min = int(exps.min())
    total = 0
    for e in np.unique(exps):
        total += int(ints[exps == e].sum()) << (int(e) - e_min)  # int64 sum: |ints| < 2**24, n < 2**39
    if total == 0:
        return np.float32(0.0)
    sign, num, den = (-1 if total < 0 else 1), abs(total), v.size
    # Scale so that the integer quotient q lies in [2**51, 2**53): exact as a float64, and far more
    # than the 24 + 2 bits round-to-odd needs. Then round to odd.
    shift = 52 - (num.bit_length() - den.bit_length())
    q, r = divmod(num << shift if shift >= 0 else num, den if shift >= 0 else den << -shift)
    q |= 1 if r else 0
    return np.float32(sign * math.ldexp(float(q), e_min - shift))  # float(q) is exact: q < 2**53


def _float32_values(name: str, values) -> np.ndarray:
    """``values`` as float32, refusing what a cast would change: TypeError for a dtype that is not a
    real number (complex, bool, object, strings), ValueError for a value float32 cannot hold exactly
    (a float64 1e-60 became 0 without a word)."""
    a = np.asarray(values)
    if a.dtype == np.float32:
        return a
    if a.dtype.kind not in "fiu" and a.dtype != as_dtype("bfloat16"):
        raise TypeError(f"{name} must hold real numbers (float32), got dtype {a.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        f = a.astype(np.float32)
        wide = a.astype(np.float64)
        changed = (f.astype(np.float64) != wide) & ~(np.isnan(f) & np.isnan(wide))
    bad = np.flatnonzero(changed.reshape(-1))
    if bad.size:
        i = tuple(int(k) for k in np.unravel_index(int(bad[0]), a.shape))
        raise ValueError(f"{name}{list(i)} = {a[i]} is not a float32 value; {name} is float32")
    return f


def quantize(absmax: np.ndarray, blocksize2: int = BLOCKSIZE2, *, offset: float | None = None) -> NestedState:
    """Double-quantize ``absmax`` (float32 (n_blocks,), finite, >= 0). Returns a :class:`NestedState`.

    blocksize2: absmax values a group, a positive int (256, as bitsandbytes uses).
    offset: replaces the exact mean of rule 1 when given; use it to replay another implementation's
    state (bitsandbytes takes a float32 torch mean, which can differ from the exact one by an ulp). It
    must be finite and >= 0 in float32, as any mean of block scales is.

    Raises ValueError for an empty or non-1-D absmax, a non-finite or negative absmax value or one
    float32 cannot hold exactly (naming the first), a blocksize2 out of range or a bad offset; TypeError
    for an absmax that does not hold real numbers (complex, bool, object) and for a blocksize2 or
    offset of the wrong type. Scales that rebuild negative (rule 5) are returned as computed;
    :func:`negative_scales` lists them.
    """
    absmax = _float32_values("absmax", absmax)
    if absmax.ndim != 1 or absmax.size == 0:
        raise ValueError(f"absmax must be a non-empty 1-D array, got shape {absmax.shape}")
    bad = np.flatnonzero(~(np.isfinite(absmax) & (absmax >= 0)))
    if bad.size:
        raise ValueError(f"absmax[{int(bad[0])}] = {absmax[bad[0]]}; block scales must be finite and >= 0")
    blocksize2 = check_blocksize2(blocksize2)
    if offset is None:
        off = mean_f32(absmax)
    else:
        check_real("offset", offset)
        with np.errstate(over="ignore"):  # an offset beyond float32's range is refused just below
            off = np.float32(offset)
        if not (np.isfinite(off) and off >= 0):
            raise ValueError(f"offset must be finite and >= 0 in float32, got {offset!r}")
    centred = absmax - off  # float32 - float32: one rounding per value
    absmax2 = blockwise.block_absmax(centred, blocksize2)
    absmax_q = blockwise.encode(centred, absmax2, blocksize2, DYNAMIC_MAP)
    return NestedState(absmax_q, absmax2, DYNAMIC_MAP.values, off, blocksize2)


def dequantize(nested: NestedState) -> np.ndarray:
    """float32 (n_blocks,): the absmax values rebuilt by rule 4."""
    group = np.arange(nested.absmax_q.size) // nested.blocksize2
    scaled = nested.code2[nested.absmax_q] * nested.absmax2[group]  # float32 * float32 -> float32
    with np.errstate(over="ignore"):  # a rebuild past float32 is inf, as documented (ScaleRangeWarning)
        return scaled + nested.offset  # float32 + float32 scalar -> float32, a second rounding


def negative_scales(nested: NestedState) -> np.ndarray:
    """int64 (k,): the blocks whose absmax :func:`dequantize` rebuilds below zero (rule 5), ascending."""
    return _negative(dequantize(nested))


def _negative(rebuilt: np.ndarray) -> np.ndarray:
    return np.flatnonzero(rebuilt < 0)


def zero_scales(nested: NestedState, absmax: np.ndarray) -> np.ndarray:
    """int64 (k,): the blocks whose scale ``absmax`` (float32 (n_blocks,), what was double-quantized)
    is above 0 but rebuilds to exactly 0 (rule 6), ascending."""
    return _zero(dequantize(nested), _matching(nested, absmax))


def _matching(nested: NestedState, absmax: np.ndarray) -> np.ndarray:
    absmax = np.asarray(absmax)
    if absmax.shape != nested.absmax_q.shape:
        raise ValueError(f"absmax has shape {absmax.shape}, the nested state {nested.absmax_q.shape}")
    return absmax


def _zero(rebuilt: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    return np.flatnonzero((rebuilt == 0) & (absmax > 0))


def scales_out_of_range(nested: NestedState, dtype) -> np.ndarray:
    """int64 (k,): the blocks whose rebuilt absmax is not finite in ``dtype`` (float32, float16 or
    bfloat16), ascending. A block's largest element has code ±1, so it dequantizes to exactly the
    rebuilt scale in ``dtype``: here ±inf."""
    return _out_of_range(dequantize(nested), dtype)


def _out_of_range(rebuilt: np.ndarray, dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.flatnonzero(~np.isfinite(rebuilt.astype(as_dtype(dtype))))


def warn_lost_scales(
    nested: NestedState, absmax: np.ndarray, dtype, blocksize: int, n: int, *, stacklevel: int = 3
) -> None:
    """Warn about every kind of block the rebuild of ``nested`` loses (rules 5 to 7), one warning a kind:
    :class:`NegativeScaleWarning`, :class:`ZeroScaleWarning`, :class:`ScaleRangeWarning`, each with the
    count and the first block. absmax: the float32 scales that were double-quantized; dtype: the
    weight's (float32, float16 or bfloat16); blocksize and n: the weight's, to name elements.
    stacklevel: as for :func:`warnings.warn`, counted from this function (3: the caller's caller)."""
    total, name = nested.absmax_q.size, as_dtype(dtype).name
    absmax = _matching(nested, absmax)
    with np.errstate(over="ignore"):  # a rebuild past float32 is what ScaleRangeWarning reports
        rebuilt = dequantize(nested)  # once for the three rules
        found = (
            (_negative(rebuilt), NegativeScaleWarning, "negative",
             "those blocks dequantize with their signs flipped. It happens to scales far below the mean "
             "in a group whose largest is far above it (docs/spec.md, negative rebuilt scales). To keep "
             "every sign, quantize without double quantization, or try a smaller blocksize (it moves "
             "offset/absmax2; check that this warning is gone)."),
            (_zero(rebuilt, absmax), ZeroScaleWarning, "to exactly 0 where the block is not zero",
             "every element of those blocks dequantizes to 0 (docs/spec.md, scales rebuilt to zero). "
             "Quantize without double quantization to keep them."),
            (_out_of_range(rebuilt, dtype), ScaleRangeWarning, f"beyond the largest {name}",
             "elements at those scales dequantize to inf from finite input (docs/spec.md, rebuilt scales "
             "beyond the dtype's range). Quantize without double quantization to keep them finite."),
        )  # fmt: skip
    for blocks, category, how, effect in found:
        if blocks.size:
            first = int(blocks[0])
            last = min(n, (first + 1) * blocksize) - 1
            where = f"first: block {first}, flat elements {first * blocksize} to {last}"
            message = f"double quantization rebuilds {blocks.size} of {total} block scales {how} ({where}); "
            message += effect
            warnings.warn(category(message), stacklevel=stacklevel)
