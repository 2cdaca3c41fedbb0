"""Error bounds for LoRA arithmetic and 4-bit quantization, each derived from the arithmetic it bounds.

The conformance suite compares a backend's output ``out`` with reflora's float64 reference ``ref``
elementwise and accepts ``|out - ref| <= bound``. Every bound here is rigorous: it covers the backend's
rounding errors *and* the reference's own. docs/bounds.md writes every derivation out in full.

Notation.

* u_d: the unit roundoff of dtype d, 2^-p for p significant bits: float64 2^-53, float32 2^-24,
  float16 2^-11, bfloat16 2^-8. η_d: half the smallest positive subnormal of d.
* fl_d(v): v rounded to nearest in d, ties to even (:func:`round_to`).
* γ_n(u) = n·u / (1 - n·u), defined for n·u < 1.
* The *absolute-value expression* of a formula: the same formula with every input replaced by its
  absolute value and every subtraction by an addition (|x Wᵀ| becomes |x| |W|ᵀ).

Rounding model. For |v| below the overflow threshold of d, fl_d(v) = v(1 + δ) + η with |δ| <= u_d and
|η| <= η_d (η only matters in the subnormal range). An addition of two numbers of d needs no η: a
sum that lands in the subnormal range is exact. |v| >= :func:`overflow_threshold` rounds to ±inf, and
then no finite bound exists: the bounds return inf there.

Lemma (Higham, *Accuracy and Stability of Numerical Algorithms*, Lemma 3.1). If |δ_j| <= u and n·u < 1,
then |Π_{j<=n} (1 + δ_j) - 1| <= γ_n(u). Proof: Π <= (1 + u)^n <= 1/(1 - nu) = 1 + γ_n, and
Π >= (1 - u)^n >= 1 - nu >= 1 - γ_n. For a product with n_d factors of each dtype d,
|Π - 1| <= θ := Π_d (1 + γ_{n_d}(u_d)) - 1 (multiply the per-dtype bounds).

Counting roundings along every path. Expand each rounding of a computation from exact inputs as
above: the computed result is Σ_τ τ·Π_τ(1 + δ) + E, where τ runs over the *paths*, the terms of the
exact result written as a sum of products of inputs, Π_τ holds one factor per rounding on that path,
and E gathers the η's, each multiplied by whatever follows it. So |computed - exact| <= Σ θ_τ |τ| + |E|:
for each group of paths with the same rounding counts, θ times that group's absolute-value
expression, plus the underflow terms.

Charging a rounding against its value. The roundings of a summation are counted along its paths. A
rounding of a whole computed value v̂ (a stored intermediate, an output) is charged against the
value instead: fl(v̂) - v = (v̂ - v)(1 + δ) + δ·v + η, which costs u·|v| (plus u times v̂'s own path
error) where one more factor on every path costs u·Σ|τ|. Where v cancels, as a dot product of signed
values does, |v| is far below Σ|τ|. The roundings of the scaling s are the exception: a backend may
apply s at any point of a low-rank chain, before anything has cancelled, so they are counted along
the paths. :class:`_Tracked` does this bookkeeping operation by operation, so each LoRA bound below is
its computation model written as code; docs/bounds.md §4 states the rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from reflora import codebooks
from reflora.checks import check_flag

__all__ = [
    "REFERENCE",
    "Arithmetic",
    "code_error_bound",
    "dequant_ulps",
    "dq_absmax_error_bound",
    "final_rounding_bound",
    "fma_dequant_error",
    "gamma",
    "lora_backward_bound",
    "lora_forward_bound",
    "matmul_bound",
    "merge_bound",
    "merge_interval",
    "merge_roundtrip_bound",
    "offset_bound",
    "overflow_threshold",
    "quant_error_bound",
    "round_to",
    "rounding_bound",
    "scaled_error",
    "underflow_eta",
    "unit_roundoff",
]

_NAMES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Every bound is itself evaluated in float64, on non-negative numbers only, with fewer than 2^25
# roundings along any chain (K < 2^24 terms a sum): its relative error is below 2^-27. This factor
# turns the computed bound into an upper bound of the true one.
_SELF = 1.0 + 2.0**-20


def _dtype(d) -> np.dtype:
    dt = np.dtype(_NAMES.get(d, d) if isinstance(d, str) else d)
    if dt not in {np.dtype(t) for t in _NAMES.values()}:
        raise TypeError(f"dtype must be one of {sorted(_NAMES)}, got {dt}")
    return dt


def unit_roundoff(dtype) -> float:
    """u = 2^-p, p the significant bits: float64 2^-53, float32 2^-24, float16 2^-11, bfloat16 2^-8."""
    return 2.0 ** -(ml_dtypes.finfo(_dtype(dtype)).nmant + 1)


def underflow_eta(dtype) -> float:
    """η = half the smallest positive subnormal: the worst rounding error in the subnormal range."""
    return float(ml_dtypes.finfo(_dtype(dtype)).smallest_subnormal) / 2


def overflow_threshold(dtype) -> float:
    """The smallest |v| that rounds to inf: max + ulp(max)/2 with max = 2^(emax+1)·(1 - u) and
    ulp(max) = 2^(emax+1)·u, so 2^(emax+1)·(1 - u/2) (that tie goes to the even neighbour, inf).
    float16: 65520. For float64, whose threshold is not a float64, the largest float64 (which flags
    slightly more values than necessary, the safe side)."""
    fi = ml_dtypes.finfo(_dtype(dtype))
    if _dtype(dtype) == np.float64:
        return float(fi.max)
    return math.ldexp(1.0 - unit_roundoff(dtype) / 2, int(fi.maxexp))


def gamma(n: int, u: float) -> float:
    """γ_n(u) = n·u / (1 - n·u); ValueError when n·u >= 1, where no such bound exists."""
    if n * u >= 1:
        raise ValueError(f"no finite bound: {n} roundings of unit roundoff {u:.3g} (n·u = {n * u:.3g} >= 1)")
    return n * u / (1 - n * u)


def round_to(v: np.ndarray, dtype) -> np.ndarray:
    """fl_d(v): ``v`` rounded once to ``dtype``, to nearest with ties to even, as an array of dtype
    (±inf beyond the overflow threshold).

    numpy rounds float64 to float32 and float16 correctly. ml_dtypes converts float64 to bfloat16 by
    way of float32, which is a double rounding and wrong near ties (1 + 2^-8 + 2^-40 becomes 1). So
    for bfloat16 the float32 step rounds *to odd* (keep the nearer float32 if exact, else the odd one
    of the two neighbours): with 16 spare bits that preserves every tie decision of the last rounding.
    """
    dt = _dtype(dtype)
    v = np.asarray(v)
    with np.errstate(over="ignore"):  # overflow gives ±inf, as IEEE rounding does
        if dt != np.dtype(ml_dtypes.bfloat16) or v.dtype != np.float64:
            return v.astype(dt)
        r = v.astype(np.float32)
        inexact = np.isfinite(r) & (r.astype(np.float64) != v)
        even = (r.view(np.uint32) & 1) == 0
        toward = np.where(v > r, np.float32(np.inf), np.float32(-np.inf))
        return np.where(inexact & even, np.nextafter(r, toward), r).astype(dt)


def rounding_bound(v: np.ndarray, dtype) -> np.ndarray:
    """|fl_d(v) - v| <= u_d·|v| + η_d elementwise (float64, v's shape); inf where |v| rounds to inf.

    In the normal range the error is at most half an ulp, and an ulp is at most 2u|v|; in the
    subnormal range it is at most half the subnormal spacing, η_d. A value exactly at a midpoint
    (1 + 2^-24 in float32) attains u|v| up to a factor 1/(1 + u).
    """
    v = np.abs(np.asarray(v, dtype=np.float64))
    b = unit_roundoff(dtype) * v + underflow_eta(dtype)
    return np.where(v >= overflow_threshold(dtype), np.inf, b)


# ---- The bookkeeping: a computed quantity and what is known about its error ------------------------


@dataclass(frozen=True)
class _Fmt:
    """A rounding step: unit roundoff u (times a declared slack), the absolute error η of a rounding in
    the subnormal range, that of an addition (0 with gradual underflow), and the overflow threshold.
    dot_input: for an accumulation format, the rounding every matmul operand gets first (None: none)."""

    u: float
    eta: float
    add_eta: float
    threshold: float
    dot_input: _Fmt | None = None


def _fmt(dtype, slack: float = 1.0, flush_to_zero: bool = False) -> _Fmt:
    if isinstance(dtype, str) and dtype == "tfloat32":  # float32's exponent range, 10 fraction bits: p = 11
        u, eta, tiny = slack * 2.0**-11, slack * 2.0**-137, _tiny("float32")
        threshold = math.ldexp(1.0 - 2.0**-12, 128)
    else:
        u, eta = slack * unit_roundoff(dtype), slack * underflow_eta(dtype)
        tiny, threshold = _tiny(dtype), overflow_threshold(dtype)
    if flush_to_zero:  # a result below the smallest normal number may become 0: it errs by less than that
        return _Fmt(u, tiny, tiny, threshold)
    return _Fmt(u, eta, 0.0, threshold)


def _theta(counts: tuple[tuple[float, int], ...]) -> float:
    prod = 1.0
    for u, n in counts:
        prod *= 1 + gamma(n, u)
    return prod - 1


def _plus(a: tuple, b: tuple) -> tuple:
    merged = dict(a)
    for u, n in b:
        merged[u] = merged.get(u, 0) + n
    return tuple(sorted(merged.items()))


_U64 = 2.0**-53


@dataclass(frozen=True)
class _Tracked:
    """A computed array v̂ of exact value v, known to satisfy v̂ = R + H + L with
    R = Σ_g Σ_{τ in g} τ·Π_τ(1+δ), where

    groups: ((counts, abs_g), ...): every path τ of group g has at most n roundings of unit roundoff u
        for each (u, n) in counts, and Σ_{τ in g} |τ| <= abs_g elementwise (abs_g is the group's
        absolute-value expression); a summation's roundings are counted here, along its paths;
    eta: |H| <= eta elementwise: the underflow terms (the η's) with everything that multiplies them
        downstream;
    rel: |L| <= rel elementwise: the errors of the roundings charged against the value they round
        (:func:`_round`), with everything that multiplies them downstream. Unlike H, L scales with s
        exactly (:func:`_scale`);
    overflow: True where some rounding on the way may have overflowed (then nothing is known);
    value: v evaluated in float64 along the same operations (signed), for :meth:`magnitude`;
    depth: the most float64 roundings along any path of that evaluation (a sum of K products: K).
    """

    groups: tuple
    eta: np.ndarray
    overflow: np.ndarray
    value: np.ndarray
    rel: np.ndarray
    depth: int

    def rounded_part(self) -> np.ndarray:
        """An upper bound of |R| = |Σ τ·Π_τ(1+δ)|: Σ_g abs_g·(1 + θ_g)."""
        return sum(a * (1 + _theta(c)) for c, a in self.groups)

    def abs_bound(self) -> np.ndarray:
        """An upper bound of |v̂| from the absolute values alone; it also bounds every partial sum of
        an accumulation of v̂ in any order."""
        return self.rounded_part() + self.eta + self.rel

    def abs_sum(self) -> np.ndarray:
        """Σ_g abs_g, an upper bound of Σ_τ |τ| and so of |v|."""
        return sum(a for _, a in self.groups)

    def path_error(self) -> np.ndarray:
        """Σ_g θ(counts_g)·abs_g, an upper bound of |R - v|."""
        return sum(_theta(c) * a for c, a in self.groups)

    def _value_error(self) -> np.ndarray:
        """An upper bound of |value - v|: each path of value has at most ``depth`` float64 roundings,
        so γ_depth(u64)·Σ_g abs_g, and its underflow terms are among those of v̂ (float64's η is the
        smallest)."""
        return gamma(self.depth, _U64) * self.abs_sum() + self.eta

    def exact_bound(self) -> np.ndarray:
        """An upper bound of |v|: Σ_g abs_g, or where v cancels the smaller |value| + |value - v| (its
        own float64 evaluation is covered by the factor :meth:`error` applies to the whole bound)."""
        return np.fmin(self.abs_sum(), np.abs(self.value) + self._value_error())

    def magnitude(self) -> np.ndarray:
        """An upper bound of |v̂|: :meth:`abs_bound`, or where v cancels the smaller
        |value| + |value - v| + |v̂ - v|."""
        via_value = np.abs(self.value) + self._value_error() + self.eta + self.rel + self.path_error()
        return np.fmin(self.abs_bound(), via_value * _SELF)  # fmin: a float64 inf or NaN value is no help

    def error(self) -> np.ndarray:
        """An upper bound of |v̂ - v|: Σ_g θ(counts_g)·abs_g + eta + rel, inf where it may have overflowed."""
        e = self.path_error() + self.eta + self.rel
        return np.where(self.overflow, np.inf, e * _SELF)

    @property
    def T(self) -> _Tracked:
        groups = tuple((c, a.T) for c, a in self.groups)
        return _Tracked(groups, self.eta.T, self.overflow.T, self.value.T, self.rel.T, self.depth)

    def negated(self) -> _Tracked:  # same paths, counts and |τ|
        return dataclasses.replace(self, value=-self.value)


def _exact(v, eta=0.0) -> _Tracked:
    """An input: its value exactly, or up to ``eta`` (elementwise) where it may be read differently."""
    v = np.asarray(v, dtype=np.float64)
    a = np.abs(v)
    return _Tracked((((), a),), np.zeros_like(a) + eta, np.zeros(a.shape, dtype=bool), v, np.zeros_like(a), 0)


def _tiny(dtype) -> float:
    """The smallest positive normal number of dtype."""
    return float(ml_dtypes.finfo(_dtype(dtype)).smallest_normal)


def _spacing(v: np.ndarray, dtype) -> np.ndarray:
    """Elementwise, the distance from |v| to the next larger number of dtype (float64)."""
    fi = ml_dtypes.finfo(_dtype(dtype))
    _, e = np.frexp(np.abs(v))  # |v| = m·2^e, 0.5 <= m < 1: the spacing in that binade is 2^(e - 1 - nmant)
    return np.maximum(np.ldexp(1.0, e - 1 - int(fi.nmant)), float(fi.smallest_subnormal))


def _input(v, daz: float = 0.0, ulps: int = 0, dtype="float32", extra=None) -> _Tracked:
    """An operand (float64 holding a number of the operand dtype), exact except where a backend may read
    it differently: a dequantized weight ``ulps`` steps of ``dtype`` away (:func:`dequant_ulps`), an
    error below e = ulps·spacing(|v|) while the steps stay in |v|'s binade: the first step up is
    spacing(|v|), each further one at most the spacing at |v| + 2·ulps·spacing(|v|) (n steps can cross
    into the next binade, whose steps are twice as wide; downward steps are no wider); plus ``extra``
    where given (an elementwise error: :func:`fma_dequant_error`); and, under denormals-are-zero, a
    value that error may bring below ``daz`` (the smallest normal number of the arithmetic) read as 0,
    an error of |v|."""
    v = np.asarray(v, dtype=np.float64)
    e = np.zeros_like(v)
    if ulps:
        first = _spacing(v, dtype)
        e = first + (ulps - 1) * _spacing(np.abs(v) + 2 * ulps * first, dtype)
    if extra is not None:
        e = e + np.broadcast_to(np.asarray(extra, dtype=np.float64), v.shape)
    return _exact(v, np.where(np.abs(v) - e < daz, np.maximum(np.abs(v), e), e))


def _round(p: _Tracked, f: _Fmt, against: np.ndarray | None = None) -> _Tracked:
    """fl(v̂) = v̂(1 + δ) + η, charged against the value it rounds, not along the paths.

    With v̂ = R + H + L: fl(v̂) = R + [(1 + δ)H + η] + [(1 + δ)L + δR], and |R| <= |v| + Σ_g θ_g·abs_g
    (R - v = Σ τ(Π_τ - 1)). So the paths keep their counts, H grows by (1 + u) and gains η, and L grows
    by (1 + u) and gains u·(|v| + Σ_g θ_g·abs_g): where v cancels, u·|v| is far below the u·Σ|τ| that
    one more factor on every path would charge, and never above it.

    This assumes the rounding is of v̂ whole, from the accumulator that holds it. Where a backend rounds
    a part of it first (x Wᵀ before a bias is added), ``against`` bounds the value of that part instead.
    """
    overflow = p.overflow | (p.magnitude() >= f.threshold)
    r = (p.exact_bound() if against is None else against) + p.path_error()
    rel = p.rel * (1 + f.u) + f.u * r
    return _Tracked(p.groups, p.eta * (1 + f.u) + f.eta, overflow, p.value, rel, p.depth)


def _round_paths(p: _Tracked, f: _Fmt) -> _Tracked:
    """fl(v̂) = v̂(1 + δ) + η charged along the paths: one more factor on every path, H and L grow by
    (1 + u) and H gains η. For the roundings of the scaling, which a backend may apply at any point of
    a low-rank chain (to g or x first, where nothing has cancelled yet), so that charging them against
    the value at the end would be too little (:func:`_scale`)."""
    overflow = p.overflow | (p.magnitude() >= f.threshold)
    groups = tuple((_plus(c, ((f.u, 1),)), a) for c, a in p.groups)
    return _Tracked(groups, p.eta * (1 + f.u) + f.eta, overflow, p.value, p.rel * (1 + f.u), p.depth)


def _mul(p: _Tracked, q: _Tracked, acc: _Fmt) -> _Tracked:
    """Elementwise (broadcast) product rounded in acc. (R_p + H_p + L_p)(R_q + H_q + L_q) = R_p R_q
    + H' + L': every cross term with an H goes to H', the others (L_p R_q, L_p L_q, R_p L_q) to L',
    |R| bounded by rounded_part."""
    mp, mq = p.rounded_part(), q.rounded_part()
    groups = tuple((_plus(cp, cq), ap * aq) for cp, ap in p.groups for cq, aq in q.groups)
    eta = p.eta * (mq + q.eta + q.rel) + (mp + p.rel) * q.eta
    rel = p.rel * (mq + q.rel) + mp * q.rel
    depth = p.depth + q.depth + 1
    product = _Tracked(groups, eta, p.overflow | q.overflow, p.value * q.value, rel, depth)
    return _round(product, acc)


def _matmul(p: _Tracked, q: _Tracked, acc: _Fmt, leaves: tuple[_Tracked, ...] = ()) -> _Tracked:
    """p (n, K) @ q (K, m) accumulated in acc, in any order, with each of ``leaves`` (values of the
    result's shape, computed before: a low-rank term, a bias) one more leaf of the same sum.

    The summation is a tree over K' = K + len(leaves) leaves (:func:`matmul_bound`): a product path
    gains at most K' factors (its product's rounding and K' - 1 adders), a leaf's path at most K' - 1.
    A kernel may start its accumulator from a leaf, or add partial sums into an output that holds one:
    every order is a tree. With ``acc.dot_input`` each operand is first rounded to that format. The
    operands' H and L are multiplied as in :func:`_mul`, then by the summation's (1 + γ_K')."""
    if acc.dot_input is not None:
        p, q = _round(p, acc.dot_input), _round(q, acc.dot_input)
    k = p.eta.shape[-1]
    n = k + len(leaves)
    mp, mq = p.rounded_part(), q.rounded_part()
    groups: dict = {}
    for cp, ap in p.groups:
        for cq, aq in q.groups:
            c = _plus(_plus(cp, cq), ((acc.u, n),))
            groups[c] = groups.get(c, 0) + ap @ aq
    underflow = k * acc.eta + (n - 1) * acc.add_eta  # K products and K' - 1 additions
    grow = 1 + gamma(n, acc.u)
    eta = (p.eta @ (mq + q.eta + q.rel) + (mp + p.rel) @ q.eta + underflow) * grow
    rel = (p.rel @ (mq + q.rel) + mp @ q.rel) * grow
    # inf·0 is NaN, so an overflowed operand poisons its whole row or column, whatever it meets.
    overflow = (p.overflow.any(axis=-1, keepdims=True) | q.overflow.any(axis=0, keepdims=True)) & np.ones(
        eta.shape, dtype=bool
    )
    value, depth = p.value @ q.value, p.depth + q.depth + k
    for leaf in leaves:
        for c, a in leaf.groups:
            c = _plus(c, ((acc.u, n - 1),))
            groups[c] = groups.get(c, 0) + a
        eta = eta + leaf.eta * (1 + gamma(n - 1, acc.u))
        rel = rel + leaf.rel * (1 + gamma(n - 1, acc.u))
        overflow = overflow | leaf.overflow
        value, depth = value + leaf.value, max(depth, leaf.depth) + 1
    result = _Tracked(tuple(groups.items()), eta, overflow, value, rel, depth)
    # A partial sum may exceed the final |v| where v cancels: only abs_bound bounds them all.
    return dataclasses.replace(result, overflow=overflow | (result.abs_bound() >= acc.threshold))


def _add(p: _Tracked, q: _Tracked, acc: _Fmt) -> _Tracked:
    """v̂_p + v̂_q rounded in acc: the paths of both, then :func:`_round`."""
    groups: dict = {}
    for c, a in (*p.groups, *q.groups):
        groups[c] = groups.get(c, 0) + a
    summed = _Tracked(
        tuple(groups.items()),
        p.eta + q.eta,
        p.overflow | q.overflow,
        p.value + q.value,
        p.rel + q.rel,
        max(p.depth, q.depth) + 1,
    )
    return _round(summed, acc)


def _add_onto(p: _Tracked, q: _Tracked, k: int, acc: _Fmt) -> _Tracked:
    """[acc](v̂_p + v̂_q) where v̂_q is a sum of k terms that a kernel may accumulate onto p instead
    (``addmm(p, ...)``, a GEMM whose accumulator starts from p, split-K partial sums added into an
    output holding p): every order is a tree over the k terms and p (§3, more leaves), so p may lie
    below all k adders: k - 1 more factors on its paths, its H and L times (1 + γ_(k-1)). The last adder
    is :func:`_add`'s rounding, charged against the sum. A partial sum is bounded by abs_bound."""
    extra = max(k - 1, 0)
    if extra:
        groups = tuple((_plus(c, ((acc.u, extra),)), a) for c, a in p.groups)
        grow = 1 + gamma(extra, acc.u)
        eta = p.eta * grow + extra * acc.add_eta
        p = dataclasses.replace(p, groups=groups, eta=eta, rel=p.rel * grow)
    summed = _add(p, q, acc)
    return dataclasses.replace(summed, overflow=summed.overflow | (summed.abs_bound() >= acc.threshold))


def final_rounding_bound(error, value, dtype) -> np.ndarray:
    """Elementwise bound on |fl_d(v̂) - v| given |v̂ - v| <= ``error`` and |v| <= ``value``: float64
    of the broadcast shape, inf where the rounding may overflow.

    The last rounding of a computed result (a float32 accumulator stored as ``dtype``):
    fl(v̂) = v̂(1 + δ) + η with |δ| <= u_d, |η| <= η_d, hence
    |fl(v̂) - v| <= (1 + u_d)·error + u_d·value + η_d. Attained: v̂ = v = 1 + u_d exactly (error 0) is a
    tie that rounds to 1, an error of u_d against a bound of u_d·(1 + u_d) + η_d.
    """
    f = _fmt(dtype)
    err, val = np.asarray(error, dtype=np.float64), np.abs(np.asarray(value, dtype=np.float64))
    b = ((1 + f.u) * err + f.u * val + f.eta) * _SELF
    return np.where(val + err >= f.threshold, np.inf, b)


def matmul_bound(
    a: np.ndarray, b: np.ndarray, accumulate, *, slack: float = 1.0, flush_to_zero: bool = False
) -> np.ndarray:
    """|fl(a @ b) - a @ b| <= γ_K(u)·(|a| @ |b|) + K·η·(1 + γ_K(u)), for every summation order.

    a (..., K) and b (K, m), exact (float64 holding the operands); accumulate: the dtype that holds
    products and partial sums, u its unit roundoff (times ``slack``). Returns float64 (..., m).

    Proof. The K products p_i = fl(a_i b_i) = a_i b_i (1 + ε_i) + η_i. Any order of summation
    (recursive, reversed, pairwise, blocked, split-K with partial sums combined later, a tensor core's
    multi-input adders) is a tree whose K leaves are the p_i and whose inner nodes are adders. Model an
    adder of z_1..z_k as returning Σ z_j (1 + δ_j) with |δ_j| <= u: round to nearest satisfies it with
    one shared δ; any adder whose error is at most u·Σ|z_j| satisfies it too (put δ_j = e·sign(z_j)/Σ|z|);
    an adder that truncates satisfies it with 2u (declare slack=2). An adder of k inputs whose error is
    at most (k - 1)·u·Σ|z_j| counts as k - 1 adders (|δ_j| <= (k - 1)u, and 1 + (k - 1)u <= (1 + u)^(k-1)):
    a tensor core that truncates its aligned addends and its sum errs by less than 2(k - 1)u·Σ|z_j|,
    slack 2 (docs/bounds.md §3). A tree over K leaves merges Σ_adders (k - 1) = K - 1 times, so a leaf
    meets at most K - 1 factors, and a_i b_i carries at most K. By the Lemma,
    |fl(a·b) - a·b| <= γ_K Σ|a_i b_i| + Σ|η_i|(1 + γ_K). A fused multiply-add skips the product's
    rounding: fewer factors, same bound. Partial sums stay below the final absolute-value bound, so
    the result is inf (no bound) only where that bound reaches the overflow threshold.

    ``flush_to_zero`` (CUDA's --use_fast_math): a subnormal product or sum may become 0, an absolute
    error below the smallest normal number, and additions lose their exactness there; the underflow
    term becomes (2K - 1)·tiny·(1 + γ_K), tiny the smallest normal number of the dtype. Subnormal
    operands may be read as 0 too (denormals-are-zero): an operand below tiny carries an error of |a_i|.
    """
    daz = _tiny(accumulate) if flush_to_zero else 0.0
    pa, pb = _input(a, daz), _input(b, daz)
    return _matmul(pa, pb, _fmt(accumulate, slack, flush_to_zero)).error()


# ---- How a backend computes ------------------------------------------------------------------------

_DOT_INPUTS = ("tfloat32", "bfloat16", "float16")


@dataclass(frozen=True)
class Arithmetic:
    """How a backend computes LoRA, as the bounds model it.

    operand: the dtype the inputs are given in (x, W, A, B, bias, mask, grad_y must be representable
        in it, so they carry no rounding of their own).
    accumulate: the dtype of products, partial sums and elementwise arithmetic (fp32 for bf16 torch).
    intermediate: the dtype intermediate tensors are stored in (PEFT stores x Aᵀ in bf16 before the
        product with Bᵀ; a fused kernel that keeps it in registers has intermediate = accumulate).
    output: the dtype of the results.
    acc_slack: each rounding of the matmul unit (an accumulation step; a ``dot_input`` rounding) errs
        by at most acc_slack·u relative to the sum of the absolute values of its inputs: 1 for round
        to nearest, 2 for truncation and for a tensor core's multi-input adders (docs/bounds.md §3).
    flush_to_zero: subnormal results (of any step) may be flushed to zero and subnormal operands read
        as zero, as CUDA's fast-math mode does: every underflow error grows from half the smallest
        subnormal to the smallest normal, and an operand below the smallest normal number of
        ``accumulate`` carries an error of its own magnitude.
    fused: one accumulator per result, rounded to output once (a fused kernel's epilogue): the forward
        adds x Wᵀ, the bias and the low-rank term in ``accumulate`` and stores y once (no rounding of
        x Wᵀ + bias to output first), grad_x likewise adds g W and the masked low-rank term, and
        x ⊙ mask stays in ``accumulate``. Each result's single output rounding is charged against
        its value, as every rounding of a whole value is (:func:`_round`).
    dequant_ulps: for the QLoRA ops, how many steps of the dtype it is dequantized in (the state's;
        ``operand`` unless the bound is given another ``base_dtype``) the backend's dequantized base
        weight may lie from reflora's (:func:`dequant_ulps`; 0: bit for bit).
    fma_absmax: for the QLoRA ops, the backend rebuilds a double-quantized absmax with one fused
        multiply-add (bitsandbytes' CUDA inference kernels): its base weight may lie
        :func:`fma_dequant_error` of the state from reflora's. The bound functions take that as
        ``base_error``, which the conformance suite computes from the state it hands the backend.
    dot_input: None, or the format every operand of a matrix product is rounded to before it is
        multiplied: "tfloat32" (float32's exponent range, 10 fraction bits, u = 2^-11; Triton's default
        for float32 ``tl.dot``, cuBLAS with TF32 allowed), "bfloat16" or "float16" (autocast). One
        rounding of at most acc_slack·u (to nearest; Triton's TF32 truncates: slack 2).
    fold_scaling: the backend folds s into one adapter weight, A or B, first: [op][acc](s·A) or
        [op][acc](s·B) (vLLM and punica scale lora_b when they load it; autograd through ``A * s``). That
        rounds a weight in the operand dtype, in the subnormal range too, where s·B may become 0:
        each of A and B is then read as s applied last to a weight off by u_op·|v| + η_op/|s|.
    """

    operand: str = "float32"
    accumulate: str = "float32"
    intermediate: str = "float32"
    output: str = "float32"
    acc_slack: float = 1.0
    flush_to_zero: bool = False
    fused: bool = False
    dequant_ulps: int = 0
    dot_input: str | None = None
    fold_scaling: bool = False
    fma_absmax: bool = False

    def __post_init__(self) -> None:
        for name in ("flush_to_zero", "fused", "fold_scaling", "fma_absmax"):
            object.__setattr__(self, name, check_flag(name, getattr(self, name)))
        for name in ("operand", "accumulate", "intermediate", "output"):
            object.__setattr__(self, name, _dtype(getattr(self, name)).name)
        if not (self.acc_slack >= 1 and math.isfinite(self.acc_slack)):
            raise ValueError(f"acc_slack must be a finite number >= 1, got {self.acc_slack}")
        if not (isinstance(self.dequant_ulps, int) and self.dequant_ulps >= 0):
            raise ValueError(f"dequant_ulps must be an int >= 0, got {self.dequant_ulps!r}")
        if self.dot_input is not None:
            name = self.dot_input if self.dot_input == "tfloat32" else _dtype(self.dot_input).name
            if name not in _DOT_INPUTS:
                raise ValueError(f"dot_input must be None or one of {_DOT_INPUTS}, got {self.dot_input!r}")
            object.__setattr__(self, "dot_input", name)

    def formats(self) -> tuple[_Fmt, _Fmt, _Fmt, _Fmt]:
        """(acc, mid, op, out) rounding steps; acc carries the dot_input rounding, if any."""
        ftz = self.flush_to_zero
        acc = _fmt(self.accumulate, self.acc_slack, ftz)
        if self.dot_input is not None:
            acc = dataclasses.replace(acc, dot_input=_fmt(self.dot_input, self.acc_slack, ftz))
        return (
            acc,
            _fmt(self.intermediate, 1.0, ftz),
            _fmt(self.operand, 1.0, ftz),
            _fmt(self.output, 1.0, ftz),
        )

    def _read(self, v, ulps: int = 0) -> _Tracked:
        """An operand as this arithmetic reads it (:func:`_input`)."""
        return _input(v, _tiny(self.accumulate) if self.flush_to_zero else 0.0, ulps, self.operand)

    def _read_adapter(self, v, s: float) -> _Tracked:
        """A or B as this arithmetic reads it: exact, or under ``fold_scaling`` the weight [op](s·v)
        seen with s applied last: v off by at most u_op·|v| + η_op/|s| (|[op](s·v) - s·v| <=
        u_op·|s·v| + η_op), and overflowed where |s·v| may round past op's largest number."""
        t = self._read(v)
        if not self.fold_scaling or s == 0:  # s·v = 0 exactly
            return t
        op = _fmt(self.operand, 1.0, self.flush_to_zero)
        overflow = t.overflow | (abs(s) * np.abs(t.value) * (1 + op.u) >= op.threshold)
        # u_op·|v| scales with s (L); η_op/|s| is an underflow term (H)
        return dataclasses.replace(
            t, eta=t.eta + op.eta / abs(s), rel=t.rel + op.u * np.abs(t.value), overflow=overflow
        )

    def _read_base(self, W, base_dtype: str, base_error=None) -> _Tracked:
        """The base weight as this arithmetic reads it. A QLoRA base Ŵ is dequantized in its state's
        dtype, ``base_dtype`` (within ``dequant_ulps``·spacing(|Ŵ|) of it, spacing in base_dtype, and
        within ``base_error``, elementwise, where given: :func:`fma_dequant_error`). Where
        ``operand`` is another dtype, the backend's weight is then rounded to it once, [op](Ŵ), as a
        backend computing in the activations' dtype must (a float32 base under bfloat16 activations, a
        float16 base under bfloat16), except where that cast is exact: ``operand`` holds every number
        of ``base_dtype`` (bfloat16 or float16 under float32), or every entry of an exact Ŵ."""
        daz = _tiny(self.accumulate) if self.flush_to_zero else 0.0
        w = _input(W, daz, self.dequant_ulps, base_dtype, base_error)
        exact = base_error is None or not np.any(base_error)  # fma_dequant_error of a plain state is 0
        if not exact:
            w = dataclasses.replace(
                w, overflow=w.overflow | np.isinf(np.broadcast_to(base_error, np.shape(W)))
            )
        if base_dtype == self.operand or base_dtype in _HOLDS.get(self.operand, ()):
            return w
        if (
            exact
            and self.dequant_ulps == 0
            and np.array_equal(round_to(W, self.operand).astype(np.float64), W)
        ):
            return w
        return _round(w, _fmt(self.operand, 1.0, self.flush_to_zero))


# The dtypes every number of which a wider one holds exactly.
_HOLDS = {"float64": ("float32", "float16", "bfloat16"), "float32": ("float16", "bfloat16")}

REFERENCE = Arithmetic("float64", "float64", "float64", "float64")
"""reflora's own float64 computation (:mod:`reflora.lora`), as the bounds model it."""


def _operand(name: str, a, dtype: str) -> np.ndarray:
    a64 = np.asarray(a).astype(np.float64)
    if not np.isfinite(a64).all():
        raise ValueError(f"{name} is not finite")
    if not np.array_equal(round_to(a64, dtype).astype(np.float64), a64):
        raise ValueError(f"{name} is not representable in {dtype}, the dtype the bound takes it in")
    return a64


def _mid_store(ar: Arithmetic, mid: _Fmt) -> _Fmt | None:
    """The rounding that stores an intermediate: mid, or None for a fused kernel whose intermediates
    are accumulate-dtype numbers, which it stores as they are (re-rounding a number to its own dtype
    is exact, so no factor)."""
    return None if ar.fused and ar.intermediate == ar.accumulate else mid


def _to_mid(v: _Tracked, ar: Arithmetic, mid: _Fmt) -> _Tracked:
    """[mid](v) for v just computed in acc, or v as it is (:func:`_mid_store`)."""
    store = _mid_store(ar, mid)
    return v if store is None else _round(v, store)


# The scaling s may be applied anywhere along a low-rank chain: to x or g first, between the two
# products, or last. The rounding counts are the same wherever it is (one rounding of s, one of the
# product, one store), but the underflow terms are not: an η made before s is multiplied by |s|, and
# the η of the scaling itself by whatever follows it. The models apply s last (_scale), multiply every
# η made before by max(1, |s|), and give each earlier point of the chain where s could be applied the
# room for its rounding and its overflow (_may_scale).


def _may_scale(v: _Tracked, s: float, ar: Arithmetic) -> _Tracked:
    """v̂, a point of a low-rank chain where a backend may apply s instead of last: its rounding's η
    (in acc, then stored in mid) may arise here, and s·v̂, or a partial sum of a product with it,
    may overflow here."""
    acc, mid, _, _ = ar.formats()
    big = max(1.0, abs(s))
    overflow = v.overflow | (big * v.magnitude() >= min(acc.threshold, mid.threshold))
    overflow |= big * v.abs_bound() >= acc.threshold
    return dataclasses.replace(v, eta=v.eta + acc.eta + mid.eta, overflow=overflow)


def _scale(p: _Tracked, s: float, ar: Arithmetic, store: _Fmt | None = None) -> _Tracked:
    """[store][acc]([acc](s)·v̂), s applied last to a low-rank chain's v̂ = R + H + L, the store
    (if any) the one that holds the scaled result.

    A backend may apply s at any earlier point of the chain instead, to g or x_d before anything has
    cancelled (autograd scales g by s and stores it in the activations' dtype), so these three
    roundings are charged along the paths (:func:`_round_paths`), as they would be there: the counts are
    the same wherever s is. L is multiplied by |ŝ| (it was charged against values s scales exactly); H
    by max(1, |ŝ|) instead of |ŝ| (an underflow term may have arisen after s). A product with s applied
    earlier has partial sums up to |s| times those of v̂."""
    acc = ar.formats()[0]
    sa = _round_paths(ar._read(s), acc)
    factor = max(1.0, float(sa.magnitude()))
    groups = tuple((_plus(c, cs), a * a_s) for c, a in p.groups for cs, a_s in sa.groups)
    eta = p.eta * factor + (p.rounded_part() + p.rel) * sa.eta  # H_p·ŝ + (R_p + L_p)·H_s
    rel = p.rel * sa.rounded_part()  # L_p·R_s
    overflow = p.overflow | (factor * p.abs_bound() >= acc.threshold)
    scaled = _round_paths(_Tracked(groups, eta, overflow, p.value * s, rel, p.depth + 1), acc)
    return scaled if store is None else _round_paths(scaled, store)


def _forward_model(x, W, A, B, s, bias, mask, ar: Arithmetic, base_dtype=None, base_error=None) -> _Tracked:
    acc, mid, op, out = ar.formats()
    xt = ar._read(x)
    W_T = ar._read_base(W, base_dtype or ar.operand, base_error).T
    if mask is None:
        x_d = xt
    elif ar.fused:
        x_d = _mul(xt, ar._read(mask), acc)  # [acc](x ⊙ mask), kept in the accumulator
    else:
        x_d = _round(_mul(xt, ar._read(mask), acc), op)  # [op](x ⊙ mask)
    x_d = _may_scale(x_d, s, ar)
    A_, B_ = ar._read_adapter(A, s), ar._read_adapter(B, s)
    t = _may_scale(_to_mid(_matmul(x_d, A_.T, acc), ar, mid), s, ar)  # (N, r) = [mid](x_d Aᵀ)
    z = _to_mid(_matmul(t, B_.T, acc), ar, mid)  # (N, out) = [mid](t Bᵀ), K = r
    lora = _scale(z, s, ar, _mid_store(ar, mid))  # [mid][acc]([acc](s)·z)
    b = () if bias is None else (ar._read(bias[None, :]),)
    if ar.fused:  # one accumulator, x Wᵀ with the low-rank term and the bias as leaves of its sum
        return _round(_matmul(xt, W_T, acc, (lora, *b)), out)
    xw = _matmul(xt, W_T, acc, b)  # x Wᵀ + bias, the bias a leaf of the sum, K = in + 1
    if bias is None:
        base = _round(xw, out)  # [out](x Wᵀ)
    else:
        # torch.nn.functional.linear rounds x Wᵀ before adding the bias when x is a non-contiguous N-D
        # tensor (matmul, then add) and once when it is contiguous (addmm), whose split-K may start
        # from the bias: the bias a leaf of the sum (its adder among the K' = in + 1), a rounding to out
        # charged against |x Wᵀ| (the exact bound of value - bias) and then that adder's (1 + u_acc),
        # and a rounding of the sum to out cover both.
        x_w = dataclasses.replace(xw, value=xw.value - bias[None, :])
        first = _round(xw, out, against=x_w.exact_bound())
        first = dataclasses.replace(first, eta=first.eta * (1 + acc.u), rel=first.rel * (1 + acc.u))
        base = _round(first, out)
    # [out]([acc](base + lora)), the base below the r adders of t Bᵀ where they accumulate onto it
    return _round(_add_onto(base, lora, np.shape(B)[1], acc), out)


def lora_forward_bound(
    x,
    W,
    A,
    B,
    scaling: float,
    arith: Arithmetic,
    *,
    bias=None,
    dropout_mask=None,
    base_dtype=None,
    base_error=None,
):
    """Elementwise bound on |out - ref| for the LoRA forward: float64 of shape (..., out).

    out: a backend's y = x Wᵀ + bias + s·((x ⊙ mask) Aᵀ) Bᵀ computed as ``arith`` describes; ref:
    :func:`reflora.lora.forward` on the same inputs. Inputs as there, each representable in
    ``arith.operand``. The model (a backend may round less often, never more; [d] is one rounding):

        x_d = [op][acc](x ⊙ mask)                 t = [mid](x_d Aᵀ)   accumulated, K = in
        z   = [mid](t Bᵀ)   accumulated, K = r     l = [mid][acc]([acc](s)·z)
        b   = [out](x Wᵀ)   accumulated, K = in    with a bias, b = [out][acc]([out](x Wᵀ) + bias)
        y   = [out][acc](b + l)    b below up to r adders (z's products may accumulate onto it)

    A summation in any order (split-K too) of the K products and of terms added into the same
    accumulation (the bias, a leaf of the x Wᵀ sum, K' = in + 1; b, where z is accumulated onto it) is
    a tree over all of them (:func:`_matmul`, :func:`_add_onto`). Its roundings are counted along the
    paths (c = 1 with a bias): base terms x_k W_ik: in + r - 1 + c of acc; the bias: in + r - 1 of acc;
    LoRA terms s x_k m_k A_jk B_ij: in + r + 2 of acc (two for s and s·z) and 1 of mid (s·z's store).
    Every other rounding rounds a whole computed value and is charged against it (module docstring):
    x ⊙ mask, t, z, [out](x Wᵀ), the sum with the bias, and y's two. To first order, with θ from the
    Lemma,

        |ŷ - y| <= θ_base·|x||W|ᵀ + θ_bias·|bias| + θ_lora·|s|·(|x_d||A|ᵀ)|B|ᵀ
                   + u_mid·|s|·(|t||B|ᵀ + |z|) + u_out·(|x Wᵀ| (+ |x Wᵀ + bias|)) + (u_acc + u_out)·|y|
                   (+ (u_acc + u_op)·|s|·(|x_d||A|ᵀ)|B|ᵀ with a mask) + E,

    E the subnormal terms, which allow the scaling anywhere along the low-rank chain (each η made
    before it is multiplied by max(1, |s|)); the code carries the exact (1 + u) factors of docs/bounds.md
    §4. The bound returned is that of the backend plus that of the reference (the same model with every
    dtype float64), because |out - ref| <= |out - y| + |y - ref|.

    With ``arith.fused`` the model is one accumulator, rounded once: y = [out](x Wᵀ + l + bias)
    accumulated over K' = in + 1 + c leaves, x_d = [acc](x ⊙ mask). A kernel may start its accumulator
    from l or the bias, or add split-K partial sums into an output that holds them, so every path
    meets up to K' - 1 adders: x_k W_ik: in + 1 + c of acc; l: its own counts plus in + c; the bias:
    in + 1. The one rounding to out is charged against |y|. A declared ``dequant_ulps`` adds
    |x|·(n·spacing(|W|))ᵀ to E.

    ``base_dtype``: the dtype W is given in when it is not ``arith.operand``: a QLoRA base dequantized in
    its state's dtype under activations of another. W is then first rounded to the operand dtype,
    [op](W), one more rounding on every base path (none where the operand dtype holds every entry of
    W); a declared ``dequant_ulps`` counts steps of ``base_dtype`` (docs/bounds.md §6).

    ``base_error``: where the backend's base weight may differ from W by more than its declared steps,
    elementwise (W's shape; :func:`fma_dequant_error` for an ``arith.fma_absmax`` backend), an error of
    the input W, as ``dequant_ulps`` adds one.
    """
    from reflora import lora as _lora  # here, not at the top: reflora.lora imports this module

    check_shapes = _lora.check_shapes
    x_shape = np.shape(x)
    out_f, n_in, _ = check_shapes(x, W, A, B, bias, dropout_mask)
    op = arith.operand
    w_dtype = op if base_dtype is None else _dtype(base_dtype).name
    x64 = _operand("x", x, op).reshape(-1, n_in)
    W64, A64, B64 = _operand("W", W, w_dtype), _operand("A", A, op), _operand("B", B, op)
    b64 = None if bias is None else _operand("bias", bias, op)
    m64 = None if dropout_mask is None else _operand("dropout_mask", dropout_mask, op).reshape(-1, n_in)
    s = float(scaling)
    ref_error = _forward_model(x64, W64, A64, B64, s, b64, m64, REFERENCE).error()
    total = _forward_model(x64, W64, A64, B64, s, b64, m64, arith, w_dtype, base_error).error() + ref_error
    return total.reshape(*x_shape[:-1], out_f)


def _backward_model(g, x, W, A, B, s, mask, ar: Arithmetic, need_x: bool = True, base_dtype=None,
                    base_error=None):  # fmt: skip
    acc, mid, op, out = ar.formats()
    xt, gt = ar._read(x), ar._read(g)

    def last(v: _Tracked) -> _Tracked:  # the one [out] of grad_x, grad_A, grad_B
        return _round(v, out)

    def keep(v: _Tracked) -> _Tracked:  # x ⊙ mask and the masked low-rank term: [op], or kept in acc
        return v if ar.fused else _round(v, op)

    def keep_mid(v: _Tracked) -> _Tracked:  # a low-rank product: [mid], or kept in acc
        return v if ar.fused else _round(v, mid)

    keep_scaled = None if ar.fused else mid  # the store of a scaled result: [mid], or kept in acc

    x_d = _may_scale(xt if mask is None else keep(_mul(xt, ar._read(mask), acc)), s, ar)
    g_l = _may_scale(gt, s, ar)  # g as the low-rank chains see it: s may be applied to it first
    A_, B_ = ar._read_adapter(A, s), ar._read_adapter(B, s)
    t = _may_scale(_to_mid(_matmul(x_d, A_.T, acc), ar, mid), s, ar)  # (N, r), K = in
    u = _may_scale(_to_mid(_matmul(g_l, B_, acc), ar, mid), s, ar)  # (N, r) = g B, K = out
    # (out, r) = s·gᵀ t and (r, in) = s·uᵀ x_d, K = N; s may be applied to the stored product
    grad_B = last(_scale(_may_scale(_matmul(g_l.T, t, acc), s, ar), s, ar, keep_scaled))
    grad_A = last(_scale(_may_scale(_matmul(u.T, x_d, acc), s, ar), s, ar, keep_scaled))
    if not need_x:
        return None, grad_A.error(), grad_B.error()
    lora = _scale(keep_mid(_matmul(u, A_, acc)), s, ar, keep_scaled)  # (N, in) = s·(u A), K = r
    if mask is not None:
        lora = keep(_mul(lora, ar._read(mask), acc))
    W_ = ar._read_base(W, base_dtype or ar.operand, base_error)
    if ar.fused:  # one accumulator: g W with the low-rank term as a leaf of its sum, K' = out + 1
        grad_x = last(_matmul(gt, W_, acc, (lora,)))
    else:  # [out]([acc]([out](g W) + lora)), K = out; g W below the r adders of u A accumulated onto it
        grad_x = last(_add_onto(_round(_matmul(gt, W_, acc), out), lora, np.shape(A)[0], acc))
    return grad_x.error(), grad_A.error(), grad_B.error()


def lora_backward_bound(
    grad_y,
    x,
    W,
    A,
    B,
    scaling: float,
    arith: Arithmetic,
    *,
    dropout_mask=None,
    grad_x: bool = True,
    base_dtype=None,
    base_error=None,
):
    """Elementwise bounds (bx, bA, bB) on |out - ref| for grad_x, grad_A and grad_B (float64, in the
    shapes of x, A and B), ref being :func:`reflora.lora.backward` on the same inputs. With
    ``grad_x=False`` bx is None and the (N, out) x (out, in) products that only grad_x needs are
    skipped: grad_A and grad_B reduce over every row, so at full size they are the expensive checks.

    The model, over the N flattened rows (g = grad_y), s applied last:

        x_d = [op][acc](x ⊙ mask)        t = [mid](x_d Aᵀ), K = in     u = [mid](g B), K = out
        grad_B = [out][mid][acc]([acc](s)·gᵀ t), K = N
        grad_A = [out][mid][acc]([acc](s)·uᵀ x_d), K = N
        grad_x = [out][acc]( [out](g W) + [op][acc]([mid][acc]([acc](s)·[mid](u A)) ⊙ mask) ),  K = out, r

    These are the counts of scaling g first (reflora.lora.backward does), with the scaling's rounding
    and its store moved to the end. Counted along the paths (the summations, s, s·P and its store):
    grad_B: s g_ni x_dk A_jk, in + N + 2 of acc, 1 of mid; grad_A: s g_ni B_ij x_dk, out + N + 2 of acc,
    1 of mid; grad_x: g_ni W_ik, out + r - 1 of acc (u A's r products may accumulate onto [out](g W)),
    and s g_ni B_ij A_jk m_k, out + r + 2 of acc, 1 of mid. The absolute-value expressions are
    |s|·|g|ᵀ(|x_d||A|ᵀ), |s|·(|g||B|)ᵀ|x_d|, and |g||W| + |s|·((|g||B|)|A|) ⊙ |m|. Charged against
    their values: x ⊙ mask, t, u, u A, each result's [out], [out](g W) and grad_x's sum. To first order
    the value-charged part of grad_B is u_mid·|s|·|g|ᵀ|t| + u_out·|grad_B|, of grad_A
    u_mid·|s|·|u|ᵀ|x_d| + u_out·|grad_A| (plus (u_acc + u_op) times the expression with a mask). The
    underflow terms allow s anywhere along each chain (see :func:`lora_forward_bound`), also after the
    product gᵀt or uᵀx_d is stored.
    The bound is the backend's plus the reference's (every dtype float64).

    With ``arith.fused``: x_d = [acc](x ⊙ mask), no [mid] on the scaled results (nor on u A), and
    grad_x = [out](g W + [acc]([acc]([acc](s)·u A) ⊙ mask)) accumulated over K' = out + 1 leaves, the
    low-rank term one of them (a kernel may start its accumulator from it): g_ni W_ik has out + 1 of
    acc, the low-rank path its own counts plus out. Each gradient's one output rounding is charged
    against its value, as in :func:`lora_forward_bound`. ``base_dtype`` as there: W of another dtype
    is rounded to the operand dtype before g W; ``base_error`` as there.
    """
    from reflora import lora as _lora

    check_shapes = _lora.check_shapes
    x_shape = np.shape(x)
    out_f, n_in, _ = check_shapes(x, W, A, B, None, dropout_mask, grad_y)
    op = arith.operand
    w_dtype = op if base_dtype is None else _dtype(base_dtype).name
    g64 = _operand("grad_y", grad_y, op).reshape(-1, out_f)
    x64 = _operand("x", x, op).reshape(-1, n_in)
    W64, A64, B64 = _operand("W", W, w_dtype), _operand("A", A, op), _operand("B", B, op)
    m64 = None if dropout_mask is None else _operand("dropout_mask", dropout_mask, op).reshape(-1, n_in)
    s = float(scaling)
    ref_errors = _backward_model(g64, x64, W64, A64, B64, s, m64, REFERENCE, need_x=grad_x)
    own = _backward_model(g64, x64, W64, A64, B64, s, m64, arith, need_x=grad_x, base_dtype=w_dtype,
                          base_error=base_error)  # fmt: skip
    bx, bA, bB = (None if p is None else p + q for p, q in zip(own, ref_errors, strict=True))
    return (bx.reshape(x_shape) if grad_x else None), bA, bB


def _delta_model(A, B, s, ar: Arithmetic, fan_in_fan_out: bool) -> _Tracked:
    acc, mid, _, _ = ar.formats()
    Bt, At = _may_scale(ar._read_adapter(B, s), s, ar), _may_scale(ar._read_adapter(A, s), s, ar)
    d = _round(_matmul(Bt, At, acc), mid)  # (out, in) = [mid](B A), K = r
    d = _scale(d, s, ar, mid)  # [mid][acc]([acc](s)·B A)
    return d.T if fan_in_fan_out else d


def _merge_sum(W, A, B, s, ar: Arithmetic, fan_in_fan_out: bool) -> _Tracked:
    """[acc](W + ΔW): the merged weight before its one rounding to output; W below the r adders of B A
    where a kernel accumulates them onto it (``acc = W; acc = dot(B, A, acc)``)."""
    return _add_onto(ar._read(W), _delta_model(A, B, s, ar, fan_in_fan_out), np.shape(A)[0], ar.formats()[0])


def _merge_inputs(W, A, B, arith: Arithmetic, fan_in_fan_out: bool):
    fan_in_fan_out = check_flag("fan_in_fan_out", fan_in_fan_out)
    W64, A64, B64 = (_operand(n, a, arith.operand) for n, a in (("W", W), ("A", A), ("B", B)))
    expected = (B64.shape[0], A64.shape[1])
    if A64.shape[0] != B64.shape[1] or W64.shape != (expected[::-1] if fan_in_fan_out else expected):
        raise ValueError(
            f"W {W64.shape}, A {A64.shape}, B {B64.shape} do not fit (fan_in_fan_out={fan_in_fan_out})"
        )
    return W64, A64, B64


def _reference_merge(W) -> Arithmetic:
    """reflora.lora.merge as the model sees it: float64 arithmetic, one rounding to W's dtype."""
    w_dtype = _dtype(np.asarray(W).dtype).name
    return Arithmetic(w_dtype, "float64", "float64", w_dtype)


def merge_bound(W, A, B, scaling: float, arith: Arithmetic, *, fan_in_fan_out: bool = False) -> np.ndarray:
    """Elementwise bound on |out - ref| for a merged weight (float64, W's shape), ref being
    :func:`reflora.lora.merge` on the same W (so rounded once to W's dtype).

    Model: ΔW = [mid][acc]([acc](s)·[mid](B A)) with K = r, W' = [out][acc](W + ΔW). Along the paths:
    W_ik with r - 1 of acc (B A's products may accumulate onto it); s B_ij A_jk with r + 2 of acc and
    1 of mid. Charged against their values: [mid](B A) and W''s two. So, to first order,
    |Ŵ' - W'| <= θ_W |W| + θ_Δ |s|(|B||A|) + u_mid·|s|·|B A| + (u_acc + u_out)·|W'| + E. The reference
    is the same model with float64 for accumulate and intermediate and W's dtype as output (its one
    final rounding). Since both results are rounded, this allows about an ulp of W' (u_out·|W'| each);
    the conformance check uses the sharper :func:`merge_interval`.
    """
    W64, A64, B64 = _merge_inputs(W, A, B, arith, fan_in_fan_out)
    s = float(scaling)
    return sum(
        _round(_merge_sum(W64, A64, B64, s, ar, fan_in_fan_out), ar.formats()[3]).error()
        for ar in (arith, _reference_merge(W))
    )


def merge_interval(
    W, A, B, scaling: float, arith: Arithmetic, *, fan_in_fan_out: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): float64 arrays of W's shape, numbers of ``arith.output``, such that every merged weight
    the model allows lies in [lo, hi] elementwise; (-inf, inf) where a step before the last rounding may
    overflow, and ±inf where the last rounding may.

    The model's W' is one rounding to output of ŵ = [acc](W + ΔW) (:func:`merge_bound`'s model without
    its last [out]), |ŵ - v| <= e_b for v = W + s·B A exactly. reflora evaluates v64 =
    W + s·(B A) in float64, |v64 - v| <= e_64 (the same model in float64). So ŵ lies in
    [v64 - e, v64 + e], e = e_b + e_64, and rounding to nearest is monotone:
    RN(v64 - e) <= RN(ŵ) <= RN(v64 + e). Unlike |W' - lora.merge(W)| <= merge_bound, which compares two
    rounded values and so always allows an ulp, this allows only the roundings that some ŵ within
    the model's error can give: one value (or the two around a midpoint) when e is small.
    Under flush_to_zero the last rounding may also flush: e grows by the smallest normal number.
    """
    W64, A64, B64 = _merge_inputs(W, A, B, arith, fan_in_fan_out)
    s = float(scaling)
    mine = _merge_sum(W64, A64, B64, s, arith, fan_in_fan_out)
    v64 = mine.value  # W + (B A)·s in float64, the reference model's order
    e = mine.error() + _merge_sum(W64, A64, B64, s, REFERENCE, fan_in_fan_out).error()
    if arith.flush_to_zero:
        e = e + _tiny(arith.output)
    e = e * _SELF + _U64 * 2 * np.abs(v64)  # covers the float64 rounding of v64 ± e
    with np.errstate(invalid="ignore"):
        lo = round_to(v64 - e, arith.output).astype(np.float64)
        hi = round_to(v64 + e, arith.output).astype(np.float64)
    unknown = ~np.isfinite(e)
    return np.where(unknown, -np.inf, lo), np.where(unknown, np.inf, hi)


def merge_roundtrip_bound(
    W, A, B, scaling: float, arith: Arithmetic | None = None, *, fan_in_fan_out: bool = False
) -> np.ndarray:
    """Elementwise bound on |unmerge(merge(W)) - W| (float64, W's shape): how far merge then unmerge
    lands from the weight it started from.

    The unmerge recomputes ΔW and forms [out][acc](W' - ΔW). Its exact value is W + ΔW - ΔW = W,
    with paths W (2 + 2 roundings), +ΔW and -ΔW, so roughly

        |W'' - W| <= u_out·(|W| + |W + ΔW|) + (counted terms in u_acc and u_mid),

    which is a full unit roundoff of W when ΔW is below half an ulp: merge then unmerge is not the
    identity in low precision. Default ``arith``: reflora's own :func:`reflora.lora.merge` /
    ``unmerge`` (float64 arithmetic, output in W's dtype).
    """
    arith = arith or _reference_merge(W)
    W64, A64, B64 = _merge_inputs(W, A, B, arith, fan_in_fan_out)
    s = float(scaling)
    acc, _, _, out = arith.formats()
    merged = _round(_merge_sum(W64, A64, B64, s, arith, fan_in_fan_out), out)
    back = _round(_add(merged, _delta_model(A64, B64, s, arith, fan_in_fan_out).negated(), acc), out)
    return back.error()


# ---- Quantization ----------------------------------------------------------------------------------


def _intervals(codebook: codebooks.Codebook) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values, lower ends, upper ends) of the scaled inputs in [-1, 1] each value receives."""
    v = np.unique(codebook.values.astype(np.float64))
    lo = np.concatenate([[-1.0], codebook.thresholds])
    hi = np.concatenate([codebook.thresholds, [1.0]])
    return v, np.minimum(lo, v), np.maximum(hi, v)


def _per_value_error(codebook: codebooks.Codebook) -> tuple[np.ndarray, np.ndarray]:
    v, lo, hi = _intervals(codebook)
    return v, np.maximum(v - lo, hi - v)


def scaled_error(quant_type: str = "nf4") -> float:
    """h: the largest |v - code[q(v)]| over scaled values v in [-1, 1]: half the widest gap between
    neighbouring table values, or the distance from ±1 to the table's ends if that is larger.
    ``quant_type``: "nf4", "fp4", or "dynamic" (the 8-bit map of double quantization).
    NF4: (-0.6961928 + 1)/2 = 0.1519036, its widest gap being the lowest (NF4 has one value fewer on
    the negative side); FP4: (1 - 0.6666667)/2 = 0.1666667; dynamic map: 0.0070313."""
    book = codebooks.DYNAMIC_MAP if quant_type == "dynamic" else codebooks.get(quant_type)
    return float(_per_value_error(book)[1].max())


def _dequant_rounding(magnitude: np.ndarray, dtype) -> np.ndarray:
    """Error of dtype(f32(p)) against the exact product p, |p| <= magnitude: u32 then u_d; inf where
    the product may round past float32's overflow threshold or its float32 value past dtype's (the
    result is then ±inf: no finite bound)."""
    u32, e32 = unit_roundoff("float32"), underflow_eta("float32")
    err = u32 * magnitude + e32
    if _dtype(dtype) != np.float32:
        err = err + unit_roundoff(dtype) * (magnitude * (1 + u32) + e32) + underflow_eta(dtype)
    over = (magnitude >= overflow_threshold("float32")) | (
        magnitude * (1 + u32) + e32 >= overflow_threshold(dtype)
    )
    return np.where(over, np.inf, err)


def quant_error_bound(absmax, quant_type: str = "nf4", dtype="float32", *, absmax_error=0.0) -> np.ndarray:
    """Per block, |x - dequantize(quantize(x))| <= (h + ...)·absmax (float64, absmax's shape).

    absmax: the blocks' true absmax a (float32, (n_blocks,)); dtype: the dequantized dtype;
    absmax_error: a bound on |ã - a| for the absmax ã actually used in dequantization (0 without double
    quantization; :func:`dq_absmax_error_bound` with it).

    Derivation. The code c is the nearest table value to x/a, so |x - c·a| <= h·a (:func:`scaled_error`).
    Dequantization returns fl_d(fl_32(c·ã)): |x - c·ã| <= h·a + |c|·|a - ã| <= h·a + e_a, then the
    float32 product errs by at most u32·|c ã| + η32 <= u32·(a + e_a) + η32, and the conversion to d by
    u_d·|fl_32(c ã)| + η_d (no second rounding when d is float32). Attained up to u-terms by a value
    just inside the widest gap's midpoint. inf for a block whose product may overflow float32 or d
    (a + e_a at their thresholds; a scale rebuilt past float16's largest, say): the element is ±inf.
    """
    a = np.asarray(absmax, dtype=np.float64)
    e_a = np.asarray(absmax_error, dtype=np.float64)
    return (scaled_error(quant_type) * a + e_a + _dequant_rounding(a + e_a, dtype)) * _SELF


def code_error_bound(codes, absmax, quant_type: str = "nf4", dtype="float32") -> np.ndarray:
    """Per element, |x - dequantize(...)| <= h_q·absmax + rounding, h_q for the code q that was chosen.

    codes: uint8 4-bit codes (any shape); absmax: each element's block absmax, broadcastable to codes.
    h_q = the larger of the distances from code[q] to the ends of the interval of scaled values that
    receive q (the midpoints to its neighbours, or ±1 at the table's ends): half the adjacent gaps.
    NF4's code 0 (-1.0) has h = 0.1519, code 15 (1.0) h = 0.1385 and code 7 (0.0) h = 0.0455.
    """
    book = codebooks.get(quant_type)
    values, h = _per_value_error(book)
    h_code = h[np.searchsorted(values, book.values.astype(np.float64))]  # (16,), by code
    a = np.asarray(absmax, dtype=np.float64)
    return (h_code[np.asarray(codes)] * a + _dequant_rounding(a, dtype)) * _SELF


def dq_absmax_error_bound(absmax, absmax2, blocksize2: int = 256) -> np.ndarray:
    """Per block, |â - a| for double quantization (float64, (n_blocks,)).

    absmax: the true float32 absmax a (n_blocks,); absmax2: float32 (ceil(n_blocks/blocksize2),), the
    group scale A = max |c| over the group. Rules of :mod:`reflora.double_quant`: c = fl32(a - offset),
    code2 nearest to c/A, â = fl32(fl32(code2·A) + offset). Then
    e1 = |c - (a - offset)| <= u32·|a - offset| <= u32/(1 - u32)·A   (|c| <= A; a subtraction has no η)
    e2 = |c - code2·A| <= h2·A                                        (h2 = scaled_error("dynamic"))
    e3 = |fl32(code2·A) - code2·A| <= u32·A + η32
    e4 = the final addition's rounding, <= u32·(a + e1 + e2 + e3)
    and |â - a| <= e1 + e2 + e3 + e4. (The 8-bit code is assumed nearest; bitsandbytes' CPU
    look-up table is not, and needs its own dialect.) inf where the final addition may overflow:
    its exact sum lies within e1 + e2 + e3 of a, so where a + e1 + e2 + e3 reaches float32's overflow
    threshold â may be inf.
    """
    a = np.asarray(absmax, dtype=np.float64)
    scale = np.asarray(absmax2, dtype=np.float64)[np.arange(a.size) // blocksize2]
    u32, e32 = unit_roundoff("float32"), underflow_eta("float32")
    e1 = u32 / (1 - u32) * scale
    e2 = scaled_error("dynamic") * scale
    e3 = u32 * scale + e32
    bound = (e1 + e2 + e3 + u32 * (a + e1 + e2 + e3)) * _SELF
    return np.where(a + e1 + e2 + e3 >= overflow_threshold("float32"), np.inf, bound)


def offset_bound(absmax: np.ndarray, offset_dtype: np.dtype | str) -> tuple[float, float]:
    """(mean, bound): the exact mean of the float32 block absmax values and how far a dialect's offset
    may lie from it, |offset - mean| <= θ·mean + η_T.

    The offset of a non-canonical dialect is a float32 sum of the n values in an order of its own
    (torch's cascade, a CUDA tree), divided by n, then converted to the offset's dtype T. By
    docs/bounds.md §3 the sum errs by at most γ_n(u32)·Σ|a| (all a >= 0, so Σ|a| = n·mean); the
    division adds one rounding of u32, the conversion one of u_T (and η_T in T's subnormal range).
    With §1's product rule θ = (1 + γ_{n+1}(u32))(1 + γ_1(u_T)) - 1.
    """
    a = np.asarray(absmax, dtype=np.float64)
    n = a.size
    mean = math.fsum(a) / n  # fsum is exact before its one rounding; /n adds 2^-53 relative
    u32, u_t = unit_roundoff("float32"), unit_roundoff(offset_dtype)
    theta = (1 + gamma(n + 1, u32)) * (1 + gamma(1, u_t)) - 1
    return mean, (theta * mean + underflow_eta(offset_dtype)) * (1 + 2.0**-20) + 2.0**-52 * mean


def dequant_ulps(dtype="float32", *, fma_absmax: bool = False) -> int:
    """How many ulps of ``dtype`` a conforming dequantization may differ from the reference: 0.

    Dequantization dtype(fl32(code·absmax)) is one IEEE float32 multiply then one conversion, both
    correctly rounded and so deterministic: any backend that follows the rule matches bit for bit
    (0 ulp). A kernel that rebuilds a double-quantized absmax with a fused multiply-add does not
    follow it; how far its weight may lie is not a number of steps but :func:`fma_dequant_error`
    (declared with ``Arithmetic(fma_absmax=True)``). ``fma_absmax=True`` returned 2 (float32) or 1
    until 2026-11-25; it now raises ValueError saying so, rather than a count that does not hold.
    """
    _dtype(dtype)
    if check_flag("fma_absmax", fma_absmax):
        raise ValueError(
            "no number of steps bounds an FMA-rebuilt absmax (a block far below the offset moves by "
            "hundreds): declare Arithmetic(fma_absmax=True), whose bound is bounds.fma_dequant_error(state)"
        )
    return 0


def fma_dequant_error(state) -> np.ndarray:
    """Per element of ``nf4.dequantize(state)`` (float64, ``state.shape``): how far the weight of a kernel
    that rebuilds the double-quantized absmax with one fused multiply-add, â' = fl32(code2·A + offset),
    may lie from the reference's, which rounds the product first, â = fl32(fl32(code2·A) + offset);
    both dequantized as dtype(fl32(code·scale)), dtype the state's. 0 without double quantization.

    Derivation (docs/bounds.md §9), per block: p = code2·A (exact in float64, a product of two float32
    numbers) and s = p + offset. fl32(p) = p + e with |e| <= u32·|p| + η32, so t = fl32(p) + offset =
    s + e; â = fl32(t) errs by at most u32·|t| (an addition: no η), â' = fl32(s) by u32·|s| + η32:

        Δ = |â - â'| <= u32·(|t| + |s| + |p|) + 2·η32,   |t| <= |s| + u32·|p| + η32.

    Where |p| is far above |s| (a block far below the mean offset, in a group with a large scale) Δ
    spans many float32 steps of â. An element of code c: y = fl32(c·â), y' = fl32(c·â'),
    |y - y'| <= |c|·Δ + u32·|c|·(2|â| + Δ) + 2·η32; converted to a 16-bit dtype d, plus
    u_d·(|y| + |y'|) + 2·η_d with |y| <= (1 + u32)·|c|·|â| + η32 and |y'| <= |y| + |y - y'|.
    inf where a product may overflow float32 or d, or â is not finite.
    """
    from reflora import nf4  # here, not at the top: the oracle's modules import this one

    out = np.zeros(state.shape, dtype=np.float64)
    nested = state.nested
    if nested is None:
        return out
    u32, e32 = unit_roundoff("float32"), underflow_eta("float32")
    group = np.arange(nested.absmax_q.size) // nested.blocksize2
    product = nested.code2[nested.absmax_q].astype(np.float64) * nested.absmax2[group].astype(np.float64)
    p = np.abs(product)
    with np.errstate(over="ignore", invalid="ignore"):
        s_abs = np.abs(product + np.float64(nested.offset))
        t_abs = s_abs + u32 * p + e32
        delta = u32 * (t_abs + s_abs + p) + 2 * e32  # per block
        scale = np.abs(nf4.block_scales(state).astype(np.float64))
        n, bs = state.numel, state.blocksize
        c = np.abs(state.code.astype(np.float64)[nf4.unpack(state.packed, n)])
        d_blk, a_blk = np.repeat(delta, bs)[:n], np.repeat(scale, bs)[:n]
        err = c * d_blk + u32 * c * (2 * a_blk + d_blk) + 2 * e32
        y = (1 + u32) * c * a_blk + e32
        top = y + err  # the larger of |y| and |y'|
        if _dtype(state.dtype) != np.float32:
            err = err + unit_roundoff(state.dtype) * (y + top) + 2 * underflow_eta(state.dtype)
        over = (
            ~np.isfinite(a_blk)
            | (np.repeat(s_abs * (1 + u32) + e32, bs)[:n] >= overflow_threshold("float32"))  # â' inf
            | (c * (a_blk + d_blk) >= overflow_threshold("float32"))
            | (top >= overflow_threshold(state.dtype))
        )
    return np.where(over, np.inf, err * _SELF).reshape(state.shape)
