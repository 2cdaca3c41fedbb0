"""Findings: how the dialect a backend claims departs from the canonical rules, measured, never hidden.

A backend is held exactly to its dialect; whether that dialect agrees with reflora's canonical rules is
a separate question, and the answer is reported beside the pass/fail verdict, not folded into it.
For every input the quantize property draws (that the dialect accepts) and for a fixed natural sample
(an N(0, 0.02) weight, the profile's ``natural_elements`` elements, per dtype, blocksize 64, with and
without double quantization), the dialect's state is compared with the canonical one:

* 4-bit codes that differ (count, rate over elements, and over draws);
* block scales that differ (after double quantization, the rebuilt absmax);
* the largest |dequantized difference|, also relative to the block's absmax;
* dequantized outputs whose shape is not the state's (bnb-cpu returns a 1-D even-length state as one row,
  and transposes one of at most 2 elements), with the first few (state shape -> returned shape).

Rates are STAT entries of the tolerance table: each comes with its two-sided 95% Clopper-Pearson
interval. The interval treats elements as independent trials, which the natural sample's i.i.d. values
justify; the drawn inputs are adversarial by design (ties, thresholds, zero blocks), so their rates
describe the suite's draws, not real weights, and the report says which is which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from reflora import nf4
from reflora.conformance.bundle import Inputs
from reflora.conformance.dialect import Dialect

__all__ = ["Findings", "Tally", "clopper_pearson"]


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    i = np.arange(k + 1, dtype=np.float64)
    log_fact_i = np.concatenate([[0.0], np.cumsum(np.log(i[1:]))])  # log i!
    log_fact_rest = math.lgamma(n + 1) - np.concatenate([[0.0], np.cumsum(np.log(n - i[:-1]))])  # log (n-i)!
    logs = math.lgamma(n + 1) - log_fact_i - log_fact_rest + i * math.log(p) + (n - i) * math.log1p(-p)
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval for a binomial rate k/n: (lo, hi) with P(X >= k | lo) = α/2 and
    P(X <= k | hi) = α/2, found by bisection (60 halvings: far below any rate printed)."""
    if n <= 0:
        return 0.0, 1.0
    alpha = (1 - confidence) / 2

    def solve(f, target: float) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
        return (lo + hi) / 2

    upper = 1.0 if k >= n else solve(lambda p: _binom_cdf(k, n, p), alpha)
    lower = 0.0 if k == 0 else solve(lambda p: -(1 - _binom_cdf(k - 1, n, p)), -alpha)
    return lower, upper


@dataclass
class Tally:
    """Counts for one dialect, sample (drawn or natural) and dtype."""

    draws: int = 0
    draws_differing: int = 0
    elements: int = 0
    codes_differing: int = 0
    blocks: int = 0
    scales_differing: int = 0
    max_abs_difference: float = 0.0
    max_rel_to_absmax: float = 0.0
    shapes_differing: int = 0
    shape_examples: list[str] = field(default_factory=list)  # "(4,) -> (1, 4)", the first few distinct

    def add(
        self, dialect: Dialect, x: np.ndarray, blocksize: int, quant_type: str, double_quant: bool, native
    ):
        canonical = nf4.quantize(x, blocksize, quant_type=quant_type, double_quant=double_quant)
        theirs = dialect.as_quant_state(native)
        n = x.size
        codes = nf4.unpack(theirs.packed, n) != nf4.unpack(canonical.packed, n)
        s_theirs, s_ours = nf4.block_scales(theirs), nf4.block_scales(canonical)
        scales = s_theirs.view(np.uint32) != s_ours.view(np.uint32)
        out = np.asarray(dialect.dequantize(native))
        if out.shape != x.shape:
            self.shapes_differing += 1
            example = f"{x.shape} -> {out.shape}"
            if len(self.shape_examples) < 3 and example not in self.shape_examples:
                self.shape_examples.append(example)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(
                out.astype(np.float64).reshape(-1) - nf4.dequantize(canonical).astype(np.float64).reshape(-1)
            )
        per_block = np.repeat(s_ours.astype(np.float64), blocksize)[:n]
        self.draws += 1
        self.draws_differing += int(codes.any() or scales.any())
        self.elements += n
        self.codes_differing += int(codes.sum())
        self.blocks += s_ours.size
        self.scales_differing += int(scales.sum())
        if n and np.isfinite(diff).all():
            self.max_abs_difference = max(self.max_abs_difference, float(diff.max()))
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = np.where(per_block > 0, diff / per_block, 0.0)
            self.max_rel_to_absmax = max(self.max_rel_to_absmax, float(rel.max()))

    def summary(self) -> dict:
        d = asdict(self)
        d["code_rate"] = self.codes_differing / self.elements if self.elements else 0.0
        d["code_rate_95"] = clopper_pearson(self.codes_differing, self.elements)
        d["scale_rate"] = self.scales_differing / self.blocks if self.blocks else 0.0
        d["scale_rate_95"] = clopper_pearson(self.scales_differing, self.blocks)
        return d


class Findings:
    """Tallies of one dialect against canonical, by (sample, dtype); sample is "drawn" or "natural"."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.tallies: dict[tuple[str, str], Tally] = {}

    def record(self, inputs: Inputs, x: np.ndarray, native) -> None:
        """Add one drawn input the dialect quantized to ``native`` (called by the quantize check)."""
        p = inputs.params
        if self.dialect.canonical or not np.isfinite(x.astype(np.float32)).all():
            return
        tally = self.tallies.setdefault(("drawn", inputs.dtype), Tally())
        tally.add(self.dialect, x, p["blocksize"], p["quant_type"], p["double_quant"], native)

    def natural(self, elements: int, dtypes: tuple[str, ...]) -> None:
        """Measure the natural sample: N(0, 0.02), ``elements`` values, blocksize 64, nf4, with and
        without double quantization (where the dialect accepts them)."""
        if self.dialect.canonical:
            return
        from reflora.dtypes import as_dtype

        rows = max(1, elements // 1024)
        w = np.random.default_rng(20240601).standard_normal((rows, 1024)) * 0.02
        for dtype in dtypes:
            x = w.astype(np.float32).astype(as_dtype(dtype))
            for dq in (False, True):
                try:
                    native = self.dialect.quantize(x, 64, "nf4", dq)
                except (ValueError, TypeError, AssertionError):
                    continue
                self.tallies.setdefault(("natural", dtype), Tally()).add(
                    self.dialect, x, 64, "nf4", dq, native
                )

    def as_list(self) -> list[dict]:
        """One dict per (sample, dtype), with rates and intervals: for JSON and the reports."""
        return [
            {"dialect": self.dialect.name, "sample": sample, "dtype": dtype, **tally.summary()}
            for (sample, dtype), tally in sorted(self.tallies.items())
        ]

    def lines(self) -> list[str]:
        """Human-readable lines, one per (sample, dtype)."""
        if self.dialect.canonical:
            return ["dialect reflora is the canonical one: nothing to report"]
        out = []
        for f in self.as_list():
            lo, hi = f["code_rate_95"]
            out.append(
                f"{f['sample']:>7} {f['dtype']:<8} codes differ {f['codes_differing']}/{f['elements']} "
                f"({f['code_rate']:.3g}, 95% CI [{lo:.2g}, {hi:.2g}]) in {f['draws_differing']}/{f['draws']} "
                f"draws; scales differ {f['scales_differing']}/{f['blocks']}; max |Δ dequant| "
                f"{f['max_abs_difference']:.3g} ({f['max_rel_to_absmax']:.3g} of the block absmax)"
                + _shapes_text(f)
            )
        return out


def _shapes_text(f: dict) -> str:
    """'; dequantized shape is not the state's in k/n draws: (4,) -> (1, 4), ...', or '' when none."""
    if not f["shapes_differing"]:
        return ""
    return (f"; dequantized shape is not the state's in {f['shapes_differing']}/{f['draws']} draws: "
            + ", ".join(f["shape_examples"]))  # fmt: skip
