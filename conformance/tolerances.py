"""The tolerance table: for every output the suite compares, its class and where the class comes from.

Four classes, and nothing hand-picked:

``EXACT``   bytes are defined: codes, packing, absmax, the nested state, metadata. Compared bit for bit.
``ULP(n)``  dequantized values: |out - expected| <= n ulps of the output dtype at the expected value,
            compared as numbers (+0 == -0; NaN matches NaN). n comes from :func:`reflora.bounds.dequant_ulps`,
            which proves n = 0 for a conforming dequantization.
``BOUND``   arithmetic: elementwise |out - ref64| <= bound, the bound derived by :mod:`reflora.bounds`
            from the backend's declared :class:`reflora.bounds.Arithmetic`
            (``backend.arithmetic(op, dtype)``).
            Where the bound is inf (a rounding may have overflowed) nothing is required.
``STAT``    statistical facts, reported as findings with a confidence bound, never a pass/fail:
            how often a dialect's codes differ from the canonical ones.

:data:`TABLE` is the single source: docs/conformance.md carries :func:`markdown_table` verbatim and a
test fails if the two drift apart. The comparison functions below raise
:class:`reflora.conformance.mismatch.Mismatch` with the numpy.testing-style message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from reflora import bounds
from reflora.conformance.mismatch import Mismatch, fmt_index, fmt_value
from reflora.dtypes import bfloat16

__all__ = [
    "BOUND",
    "EXACT",
    "STAT",
    "TABLE",
    "ULP",
    "Entry",
    "Tolerance",
    "entry",
    "expect_bits",
    "expect_bound",
    "expect_equal",
    "expect_interval",
    "expect_ulp",
    "markdown_table",
    "ulp",
]


@dataclass(frozen=True)
class Tolerance:
    """A tolerance class: kind is "EXACT", "ULP", "BOUND" or "STAT"; n the ulps of ULP(n)."""

    kind: str
    n: int = 0

    def __str__(self) -> str:
        return f"ULP({self.n})" if self.kind == "ULP" else self.kind


EXACT = Tolerance("EXACT")
BOUND = Tolerance("BOUND")
STAT = Tolerance("STAT")


def ULP(n: int) -> Tolerance:
    """ULP(n): within n units in the last place of the output dtype."""
    return Tolerance("ULP", int(n))


@dataclass(frozen=True)
class Entry:
    """One row of the table: the op, the output compared, its tolerance, the rule as a formula, and
    the document section or dialect rule the bound comes from."""

    op: str
    output: str
    tolerance: Tolerance
    rule: str
    source: str


_DQ = "docs/spec.md, Double quantization"
_Q = "docs/spec.md, 4-bit quantization"
TABLE: tuple[Entry, ...] = (
    Entry("quantize_4bit", "codes", EXACT, "every 4-bit code equals the claimed dialect's code",
          f"{_Q}: Code, Ties, Exactness; the dialect module's rules (reflora.dialects)"),
    Entry("quantize_4bit", "packed", EXACT,
          "element 2j high nibble, 2j+1 low; odd n pads the last low nibble",
          f"{_Q}: Packing, Odd n"),
    Entry("quantize_4bit", "absmax", EXACT, "float32 bits of each block's absmax equal the dialect's",
          f"{_Q}: absmax, Ragged tail, All-zero block"),
    Entry("quantize_4bit", "shape, dtype, blocksize, quant_type, code", EXACT,
          "the state describes the input it came from", "docs/spec.md, The state"),
    Entry("quantize_4bit", "nested: absmax_q, absmax2, code2, blocksize2", EXACT,
          "equal to the dialect's, given the backend's offset", f"{_DQ}: groups, codes"),
    Entry("quantize_4bit", "nested offset, dialect reflora", EXACT,
          "offset = the exact mean of absmax rounded once to float32", f"{_DQ}: offset"),
    Entry("quantize_4bit", "nested offset, other dialects", BOUND,
          "bit-equal to the dialect's own emulated mean (even inf), or else |offset - mean| <= θ·mean + "
          "η_T, θ from n+1 roundings of u32 and 1 of u_T",
          "held exactly to the dialect it claims; docs/bounds.md §3 (a float32 sum of the n block absmax "
          "values, any order) and §1 (the division and the conversion to the offset's dtype T); "
          "offset_bound()"),
    Entry("dequantize_4bit", "out", ULP(bounds.dequant_ulps("float32")),
          "dtype(f32(code[q] · absmax)): one multiply, one conversion, both correctly rounded; at 0 ulp "
          "compared bit for bit, a zero's sign included (a NaN as the dialect declares its encodings)",
          "docs/bounds.md §9 'Dequantization is exact: 0 ulp' (bounds.dequant_ulps)"),
    Entry("dequantize_4bit", "out of the backend's own state (round trip)", EXACT,
          "the backend's dequantize of its own state equals the oracle's dequantize of that state, "
          "bit for bit; a NaN may take any encoding its dialect declares (bnb-cpu's bfloat16 torch "
          "fallback: 0x7fc0 or 0xffff; torchao, bnb-cuda and the canonical rules: any NaN)",
          "docs/bounds.md §9 (0 ulp), so bits: the same state must give the same bytes"),
    Entry("dequantize_4bit", "out of a finite input's own state (cases marked require_finite)", EXACT,
          "every value finite: finite weights must not dequantize to NaN or inf, whatever the dialect",
          "the contract beside the dialect (as for non-finite input); docs/conformance.md, Special cases"),
    Entry("lora_forward", "y", BOUND, "|y - ref| <= lora_forward_bound(x, W, A, B, s, arithmetic)",
          "docs/bounds.md §6"),
    Entry("lora_backward", "grad_x, grad_A, grad_B", BOUND,
          "|grad - ref| <= lora_backward_bound(grad_y, x, W, A, B, s, arithmetic)", "docs/bounds.md §7"),
    Entry("qlora_forward", "y", BOUND, "as lora_forward with W = dequantize(state), exact in state.dtype",
          "docs/bounds.md §6; reflora.qlora (the base is dequantized bit for bit)"),
    Entry("qlora_backward", "grad_x, grad_A, grad_B", BOUND, "as lora_backward with W = dequantize(state)",
          "docs/bounds.md §7; reflora.qlora"),
    Entry("lora_merge", "merged W", BOUND, "RN(v - e) <= W' <= RN(v + e), v = W + s·B A in float64, e = the "
          "model's error before its last rounding plus v's (merge_interval)", "docs/bounds.md §8"),
    Entry("(bad input)", "raises", EXACT, "non-finite weights to quantize, and shapes that do not fit, raise",
          "docs/spec.md, Non-finite input; reflora.lora, Bad input; the Backend protocol"),
    Entry("(findings)", "dialect vs canonical: code and absmax mismatch rates", STAT,
          "rate k/n with its two-sided 95% Clopper-Pearson interval; reported, never a failure",
          "binomial exact interval (conformance/findings.py); docs/conformance.md, Findings"),
)  # fmt: skip


def entry(op: str, output: str) -> Entry:
    """The table row for ``op`` and ``output`` (KeyError if the suite compares something unlisted)."""
    for e in TABLE:
        if e.op == op and e.output == output:
            return e
    raise KeyError(f"no tolerance entry for {op} / {output}")


def markdown_table() -> str:
    """The table as Markdown: docs/conformance.md holds exactly this text."""
    lines = ["| op | output | class | rule | source |", "|---|---|---|---|---|"]
    for e in TABLE:
        rule = e.rule.replace("|", "\\|")
        lines.append(f"| {e.op} | {e.output} | {e.tolerance} | {rule} | {e.source} |")
    return "\n".join(lines)


# ---- Comparisons -----------------------------------------------------------------------------------


def _as64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    flat = int(np.flatnonzero(mask.reshape(-1))[0])
    return tuple(int(i) for i in np.unravel_index(flat, mask.shape)) if mask.ndim else ()


def _argmax(values: np.ndarray) -> tuple[int, ...]:
    flat = int(np.nanargmax(values.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, values.shape)) if values.ndim else ()


def _differences(actual: np.ndarray, expected: np.ndarray, bad: np.ndarray) -> list[str]:
    """numpy.testing's summary lines: mismatch count, max absolute and relative difference."""
    lines = [f"Mismatched elements: {int(bad.sum())} / {bad.size} ({100 * bad.mean():.3g}%)"]
    a, e = _as64(actual), _as64(expected)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.where(bad, np.abs(a - e), 0.0)
        # as numpy.testing: a difference from an expected 0 is infinitely large, relatively
        rel = np.where(bad, np.where(e != 0, diff / np.abs(e), np.where(diff > 0, np.inf, 0.0)), 0.0)
    # Over the differences that are numbers (an inf one shows as inf, as in numpy.testing); a NaN output
    # has none, and its index is the headline's.
    for what, d in (("absolute", diff), ("relative", rel)):
        if d.size and not np.isnan(d).all():
            i = _argmax(d)
            lines.append(f"Max {what} difference: {d[i]:.3g} at {fmt_index(i) or '[]'}")
    return lines


def expect_equal(op: str, output: str, actual: Any, expected: Any, context: dict, why: str = "EXACT") -> None:
    """A whole-output fact (a shape, a dtype, a field): EXACT equality."""
    if actual != expected:
        raise Mismatch(op, output, None, str(actual), str(expected), why, context)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a).reshape(np.shape(a))  # ascontiguousarray makes a 0-d array 1-d
    if a.dtype.kind == "f" or a.dtype == bfloat16:
        return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])
    return a


def _show(v: Any, dtype: np.dtype) -> str:
    if dtype.kind in "iub":
        return fmt_value(v)
    bits = int(
        np.asarray(v, dtype=dtype)
        .reshape(1)
        .view({2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize])[0]
    )
    return f"{fmt_value(v)} (0x{bits:0{2 * dtype.itemsize}x})"


def expect_bits(
    op: str,
    output: str,
    actual: np.ndarray,
    expected: np.ndarray,
    context: dict,
    *,
    detail: Callable[[tuple[int, ...]], str] | None = None,
    nan_bits: tuple[int, ...] | str | None = None,
) -> None:
    """EXACT for arrays: same dtype, shape and bytes. ``detail(index)`` adds a line explaining the first
    mismatching element (the input value, its block, ...). ``nan_bits``: where ``expected`` is a NaN, the
    encodings the dialect declares possible (a tuple of bit patterns, or "any" for every NaN) instead of
    its own; None (the default) holds NaNs to their bits like everything else."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    expect_equal(op, f"{output}.dtype", str(actual.dtype), str(expected.dtype), context)
    expect_equal(op, f"{output}.shape", tuple(actual.shape), tuple(expected.shape), context)
    bad = _bits(actual) != _bits(expected)
    if nan_bits is not None and bad.any():
        with np.errstate(invalid="ignore"):
            either_nan = np.isnan(_as64(expected)) & np.isnan(_as64(actual))
        if nan_bits != "any":
            either_nan &= np.isin(_bits(actual), np.asarray(nan_bits, dtype=_bits(actual).dtype))
        bad &= ~either_nan
    if not bad.any():
        return
    i = _first(bad)
    summary = _differences(actual, expected, bad)
    if detail is not None:
        summary.insert(0, detail(i))
    raise Mismatch(op, output, i, _show(actual[i], actual.dtype), _show(expected[i], expected.dtype),
                   "EXACT", context, summary)  # fmt: skip


def ulp(values: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """float64, values' shape: the spacing of ``dtype`` at each |value| (the subnormal spacing at 0)."""
    fi = ml_dtypes.finfo(np.dtype(bfloat16 if dtype == "bfloat16" else dtype))
    v = np.abs(_as64(values))
    _, e = np.frexp(np.where(np.isfinite(v) & (v > 0), v, 1.0))  # v = m·2^e, 0.5 <= m < 1
    return np.maximum(np.ldexp(1.0, e - 1 - int(fi.nmant)), float(fi.smallest_subnormal))


def expect_ulp(op: str, output: str, actual: np.ndarray, expected: np.ndarray, n: int, context: dict) -> None:
    """ULP(n): same dtype and shape; |actual - expected| <= n ulps of the dtype at expected, as numbers
    (+0 == -0, NaN matches NaN, inf matches the same inf)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    expect_equal(op, f"{output}.shape", tuple(actual.shape), tuple(expected.shape), context)
    a, e = _as64(actual), _as64(expected)
    with np.errstate(invalid="ignore"):
        close = (a == e) | (np.isnan(a) & np.isnan(e))
        if n:
            close |= np.isfinite(a) & np.isfinite(e) & (np.abs(a - e) <= n * ulp(e, expected.dtype))
    bad = ~close
    if not bad.any():
        # values first (they name an index), then the dtype they must come in
        expect_equal(op, f"{output}.dtype", str(actual.dtype), str(expected.dtype), context)
        return
    i = _first(bad)
    step = n * float(ulp(e[i], expected.dtype))
    why = f"|Δ| = {abs(a[i] - e[i]):.3g} > ULP({n}) = {step:.3g}"
    raise Mismatch(op, output, i, fmt_value(a[i]), fmt_value(e[i]), why, context,
                   _differences(actual, expected, bad))  # fmt: skip


def _float_like(op: str, output: str, actual, reference, context: dict) -> None:
    """Mismatch unless ``actual`` is a float array of ``reference``'s shape (what a BOUND compares)."""
    actual = np.asarray(actual)
    if actual.dtype.kind != "f" and actual.dtype != bfloat16:
        raise Mismatch(op, f"{output}.dtype", None, str(actual.dtype), "a float dtype", "BOUND", context)
    expect_equal(op, f"{output}.shape", tuple(actual.shape), tuple(np.shape(reference)), context)


def expect_bound(
    op: str,
    output: str,
    actual: np.ndarray,
    reference: np.ndarray,
    bound: np.ndarray,
    context: dict,
    source: str,
) -> None:
    """BOUND: same shape; wherever ``bound`` is finite, ``actual`` is finite and
    |actual - reference| <= bound (float64 arithmetic on float64 copies; the bound already includes
    the reference's own rounding errors)."""
    _float_like(op, output, actual, reference, context)
    a, r, b = _as64(actual), _as64(reference), _as64(bound)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - r)
        bad = np.isfinite(b) & ~(diff <= b)  # NaN differences fail
    if not bad.any():
        return
    i = _first(bad)
    why = f"|Δ| = {diff[i]:.3g} > BOUND = {b[i]:.3g}, {source}"
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(bad, diff / np.where(b > 0, b, np.inf), 0.0)
    summary = _differences(a, r, bad)
    if np.isfinite(ratio).all():
        j = _argmax(ratio)
        summary.append(f"Max |Δ| / bound: {ratio[j]:.3g} at {fmt_index(j) or '[]'}")
    raise Mismatch(op, output, i, fmt_value(a[i]), fmt_value(r[i]), why, context, summary)


def expect_interval(
    op: str,
    output: str,
    actual: np.ndarray,
    reference: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    context: dict,
    source: str,
) -> None:
    """BOUND as an interval: same shape; wherever [lo, hi] is not (-inf, inf), ``actual`` lies in it
    (a NaN never does). ``reference`` (reflora's own result) is what a failure shows as expected; lo and
    hi come from the unrounded float64 value and the model's error before its last rounding
    (:func:`reflora.bounds.merge_interval`), so they allow no ulp that the model does not."""
    _float_like(op, output, actual, reference, context)
    a, r, lo, hi = _as64(actual), _as64(reference), _as64(lo), _as64(hi)
    with np.errstate(invalid="ignore"):
        known = ~(np.isneginf(lo) & np.isposinf(hi))
        bad = known & ~((lo <= a) & (a <= hi))  # NaN fails
    if not bad.any():
        return
    i = _first(bad)
    why = f"outside [{fmt_value(lo[i])}, {fmt_value(hi[i])}], {source}"
    raise Mismatch(op, output, i, fmt_value(a[i]), fmt_value(r[i]), why, context, _differences(a, r, bad))
