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
expression, plus the underflow terms. :class:`_Tracked` does this bookkeeping operation by operation,
so each LoRA bound below is its computation model written as code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from reflora import codebooks

__all__ = [
    "REFERENCE",
    "Arithmetic",
    "code_error_bound",
    "dequant_ulps",
    "dq_absmax_error_bound",
    "final_rounding_bound",
    "gamma",
    "lora_backward_bound",
    "lora_forward_bound",
    "matmul_bound",
    "merge_bound",
    "merge_roundtrip_bound",
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
    the subnormal range, that of an addition (0 with gradual underflow), and the overflow threshold."""

    u: float
    eta: float
    add_eta: float
    threshold: float


def _fmt(dtype, slack: float = 1.0, flush_to_zero: bool = False) -> _Fmt:
    u, threshold = slack * unit_roundoff(dtype), overflow_threshold(dtype)
    if flush_to_zero:  # a result below the smallest normal number may become 0: it errs by less than that
        tiny = float(ml_dtypes.finfo(_dtype(dtype)).smallest_normal)
        return _Fmt(u, tiny, tiny, threshold)
    return _Fmt(u, slack * underflow_eta(dtype), 0.0, threshold)


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


@dataclass(frozen=True)
class _Tracked:
    """A computed array v̂ of exact value v, known to satisfy v̂ = Σ_g Σ_{τ in g} τ·Π_τ(1+δ) + E with

    groups: ((counts, abs_g), ...): every path τ of group g has at most n roundings of unit roundoff u
        for each (u, n) in counts, and Σ_{τ in g} |τ| <= abs_g elementwise (abs_g is the group's
        absolute-value expression);
    eta: |E| <= eta elementwise (subnormal errors with everything that multiplies them downstream);
    overflow: True where some rounding on the way may have overflowed (then nothing is known).
    """

    groups: tuple
    eta: np.ndarray
    overflow: np.ndarray

    def magnitude(self) -> np.ndarray:
        """An upper bound of |v̂|."""
        return sum(a * (1 + _theta(c)) for c, a in self.groups) + self.eta

    def error(self) -> np.ndarray:
        """An upper bound of |v̂ - v|: Σ_g θ(counts_g)·abs_g + eta, inf where it may have overflowed."""
        e = sum(_theta(c) * a for c, a in self.groups) + self.eta
        return np.where(self.overflow, np.inf, e * _SELF)

    @property
    def T(self) -> _Tracked:
        return _Tracked(tuple((c, a.T) for c, a in self.groups), self.eta.T, self.overflow.T)

    def negated(self) -> _Tracked:
        return self  # -v̂ has the same paths, counts and absolute values


def _exact(v) -> _Tracked:
    v = np.abs(np.asarray(v, dtype=np.float64))
    return _Tracked((((), v),), np.zeros_like(v), np.zeros(v.shape, dtype=bool))


def _round(p: _Tracked, f: _Fmt) -> _Tracked:
    """fl(v̂) = v̂(1 + δ) + η: one more factor on every path, E grows by (1 + u) and gains η."""
    overflow = p.overflow | (p.magnitude() >= f.threshold)
    groups = tuple((_plus(c, ((f.u, 1),)), a) for c, a in p.groups)
    return _Tracked(groups, p.eta * (1 + f.u) + f.eta, overflow)


def _mul(p: _Tracked, q: _Tracked, acc: _Fmt) -> _Tracked:
    """Elementwise (broadcast) product rounded in acc. (R_p + E_p)(R_q + E_q) = R_p R_q + E', with
    |E'| <= E_p·|R_q| + |R_p|·E_q + E_p·E_q and |R| bounded by magnitude - eta."""
    mp, mq = p.magnitude() - p.eta, q.magnitude() - q.eta
    groups = tuple((_plus(cp, cq), ap * aq) for cp, ap in p.groups for cq, aq in q.groups)
    eta = p.eta * mq + mp * q.eta + p.eta * q.eta
    return _round(_Tracked(groups, eta, p.overflow | q.overflow), acc)


def _matmul(p: _Tracked, q: _Tracked, acc: _Fmt) -> _Tracked:
    """p (n, K) @ q (K, m) accumulated in acc, in any order: K products each rounded, summed by a
    binary tree of K - 1 additions, so every path gains at most K factors (:func:`matmul_bound`)."""
    k = p.eta.shape[-1]
    mp, mq = p.magnitude() - p.eta, q.magnitude() - q.eta
    groups = tuple(
        (_plus(_plus(cp, cq), ((acc.u, k),)), ap @ aq) for cp, ap in p.groups for cq, aq in q.groups
    )
    underflow = k * acc.eta + max(k - 1, 0) * acc.add_eta  # K products and K - 1 additions
    eta = (p.eta @ mq + mp @ q.eta + p.eta @ q.eta + underflow) * (1 + gamma(k, acc.u))
    # inf·0 is NaN, so an overflowed operand poisons its whole row or column, whatever it meets.
    overflow = (p.overflow.any(axis=-1, keepdims=True) | q.overflow.any(axis=0, keepdims=True)) & np.ones(
        eta.shape, dtype=bool
    )
    result = _Tracked(groups, eta, overflow)
    return _Tracked(groups, eta, overflow | (result.magnitude() >= acc.threshold))


def _add(p: _Tracked, q: _Tracked, acc: _Fmt) -> _Tracked:
    """v̂_p + v̂_q rounded in acc: the paths of both, one more factor each."""
    groups: dict = {}
    for c, a in (*p.groups, *q.groups):
        groups[c] = groups.get(c, 0) + a
    return _round(_Tracked(tuple(groups.items()), p.eta + q.eta, p.overflow | q.overflow), acc)


def _final(p: _Tracked, f: _Fmt, value: np.ndarray) -> _Tracked:
    """fl(v̂), the last rounding of a result, bounded relative to the exact value instead of per path.

    fl(v̂) = v̂(1 + δ) + η, so fl(v̂) - v = (v̂ - v)(1 + δ) + δ·v + η and
    |fl(v̂) - v| <= (1 + u)·|v̂ - v| + u·|v| + η, ``value`` bounding |v| elementwise. Every group is
    carried on scaled by (1 + u) with its counts unchanged, and u·|v| + η joins E. Where v cancels,
    u·|v| is far below the per-path u·Σ|τ| of :func:`_round`; magnitude() stays an upper bound of |fl(v̂)|.
    """
    overflow = p.overflow | (p.magnitude() >= f.threshold)
    groups = tuple((c, a * (1 + f.u)) for c, a in p.groups)
    return _Tracked(groups, p.eta * (1 + f.u) + f.u * value + f.eta, overflow)


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
    an adder that truncates satisfies it with 2u (declare slack=2). Every adder merges at least two
    subtrees, so a leaf lies below at most K - 1 adders, and a_i b_i carries at most K factors. By the
    Lemma, |fl(a·b) - a·b| <= γ_K Σ|a_i b_i| + Σ|η_i|(1 + γ_K). A fused multiply-add skips the product's
    rounding: fewer factors, same bound. Partial sums stay below the final absolute-value bound, so
    the result is inf (no bound) only where that bound reaches the overflow threshold.

    ``flush_to_zero`` (CUDA's --use_fast_math): a subnormal product or sum may become 0, an absolute
    error below the smallest normal number, and additions lose their exactness there; the underflow
    term becomes (2K - 1)·tiny·(1 + γ_K), tiny the smallest normal number of the dtype.
    """
    pa, pb = _exact(np.asarray(a, dtype=np.float64)), _exact(np.asarray(b, dtype=np.float64))
    return _matmul(pa, pb, _fmt(accumulate, slack, flush_to_zero)).error()


# ---- How a backend computes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Arithmetic:
    """How a backend computes LoRA, as the bounds model it.

    operand: the dtype the inputs are given in (x, W, A, B, bias, mask, grad_y must be representable
        in it, so they carry no rounding of their own).
    accumulate: the dtype of products, partial sums and elementwise arithmetic (fp32 for bf16 torch).
    intermediate: the dtype intermediate tensors are stored in (PEFT stores x Aᵀ in bf16 before the
        product with Bᵀ; a fused kernel that keeps it in registers has intermediate = accumulate).
    output: the dtype of the results.
    acc_slack: each accumulation step errs by at most acc_slack·u_accumulate relative to the sum of
        the absolute values of its inputs: 1 for round to nearest, 2 for truncation.
    flush_to_zero: subnormal results (of any step) may be flushed to zero, as CUDA's fast-math mode
        does: every underflow error grows from half the smallest subnormal to the smallest normal.
    fused: one accumulator per result, rounded to output once (a fused kernel's epilogue): the forward
        adds x Wᵀ, the bias and the low-rank term in ``accumulate`` and stores y once (no rounding of
        x Wᵀ + bias to output first), grad_x likewise adds g W and the masked low-rank term, and
        x ⊙ mask stays in ``accumulate``. Each result's single output rounding is then bounded
        relative to the exact value (:func:`final_rounding_bound`), not per path.
    """

    operand: str = "float32"
    accumulate: str = "float32"
    intermediate: str = "float32"
    output: str = "float32"
    acc_slack: float = 1.0
    flush_to_zero: bool = False
    fused: bool = False

    def __post_init__(self) -> None:
        for name in ("operand", "accumulate", "intermediate", "output"):
            object.__setattr__(self, name, _dtype(getattr(self, name)).name)
        if not (self.acc_slack >= 1 and math.isfinite(self.acc_slack)):
            raise ValueError(f"acc_slack must be a finite number >= 1, got {self.acc_slack}")

    def formats(self) -> tuple[_Fmt, _Fmt, _Fmt, _Fmt]:
        """(acc, mid, op, out) rounding steps."""
        ftz = self.flush_to_zero
        acc = _fmt(self.accumulate, self.acc_slack, ftz)
        return (
            acc,
            _fmt(self.intermediate, 1.0, ftz),
            _fmt(self.operand, 1.0, ftz),
            _fmt(self.output, 1.0, ftz),
        )


REFERENCE = Arithmetic("float64", "float64", "float64", "float64")
"""reflora's own float64 computation (:mod:`reflora.lora`), as the bounds model it."""


def _operand(name: str, a, dtype: str) -> np.ndarray:
    a64 = np.asarray(a).astype(np.float64)
    if not np.isfinite(a64).all():
        raise ValueError(f"{name} is not finite")
    if not np.array_equal(round_to(a64, dtype).astype(np.float64), a64):
        raise ValueError(f"{name} is not representable in the operand dtype {dtype}; the bound assumes it is")
    return a64


def _to_mid(v: _Tracked, ar: Arithmetic, mid: _Fmt) -> _Tracked:
    """[mid](v) for v just computed in acc. A fused kernel whose intermediates are accumulate-dtype
    numbers stores them as they are: re-rounding a number to its own dtype is exact, so no factor."""
    return v if ar.fused and ar.intermediate == ar.accumulate else _round(v, mid)


def _forward_model(x, W, A, B, s, bias, mask, ar: Arithmetic, value=None) -> _Tracked:
    acc, mid, op, out = ar.formats()
    xt = _exact(x)
    if mask is None:
        x_d = xt
    elif ar.fused:
        x_d = _mul(xt, _exact(mask), acc)  # [acc](x ⊙ mask), kept in the accumulator
    else:
        x_d = _round(_mul(xt, _exact(mask), acc), op)  # [op](x ⊙ mask)
    t = _to_mid(_matmul(x_d, _exact(A.T), acc), ar, mid)  # (N, r) = [mid](x_d Aᵀ), K = in
    z = _to_mid(_matmul(t, _exact(B.T), acc), ar, mid)  # (N, out) = [mid](t Bᵀ), K = r
    lora = _to_mid(_mul(z, _round(_exact(s), acc), acc), ar, mid)  # [mid]([acc](s)·z)
    if ar.fused:  # one accumulator: [out]([acc]([acc](x Wᵀ + lora) + bias)), the rounding relative to |y|
        b = np.zeros(W.shape[0]) if bias is None else bias
        y = _add(_add(_matmul(xt, _exact(W.T), acc), lora, acc), _exact(b[None, :]), acc)
        return _final(y, out, value)
    base = _round(_matmul(xt, _exact(W.T), acc), out)  # [out](x Wᵀ), K = in
    if bias is not None:
        # [out]([acc](b + bias)): torch.nn.functional.linear rounds x Wᵀ before adding the bias when x
        # is a non-contiguous N-D tensor (matmul, then add), and once when it is contiguous (addmm).
        # Two roundings cover both, since a backend may round less often than its model.
        base = _round(_add(base, _exact(bias[None, :]), acc), out)
    return _round(_add(base, lora, acc), out)  # [out]([acc](base + lora))


def lora_forward_bound(x, W, A, B, scaling: float, arith: Arithmetic, *, bias=None, dropout_mask=None):
    """Elementwise bound on |out - ref| for the LoRA forward: float64 of shape (..., out).

    out: a backend's y = x Wᵀ + bias + s·((x ⊙ mask) Aᵀ) Bᵀ computed as ``arith`` describes; ref:
    :func:`reflora.lora.forward` on the same inputs. Inputs as there, each representable in
    ``arith.operand``. The model (a backend may round less often, never more; [d] is one rounding):

        x_d = [op][acc](x ⊙ mask)                 t = [mid](x_d Aᵀ)   accumulated, K = in
        z   = [mid](t Bᵀ)   accumulated, K = r     l = [mid][acc]([acc](s)·z)
        b   = [out](x Wᵀ)   accumulated, K = in    then, with a bias, b = [out][acc](b + bias)
        y   = [out][acc](b + l)

    (torch's linear adds the bias after rounding x Wᵀ for a non-contiguous N-D x, before it for a
    contiguous one: the model has both roundings.) Paths and their roundings: base terms x_k W_ik:
    in + 1 of acc and 2 of out, one more of each with a bias; the bias: 2 of acc, 2 of out; LoRA terms
    s x_k m_k A_jk B_ij: in + r + 3 of acc (+1 with a mask), 3 of mid, 1 of out (+1 of op with a
    mask). Hence, with θ from the Lemma,

        |ŷ - y| <= θ_base·|x||W|ᵀ + θ_bias·|bias| + θ_lora·|s|·(|x_d||A|ᵀ)|B|ᵀ + E,

    E the subnormal terms. The bound returned is that of the backend plus that of the reference
    (the same model with every dtype float64), because |out - ref| <= |out - y| + |y - ref|.

    With ``arith.fused`` the model is one accumulator, rounded once:
    y = [out]([acc]([acc](x Wᵀ + l) + bias)) with x_d = [acc](x ⊙ mask) and no [out] on x Wᵀ; the last
    rounding contributes u_out·|y| (:func:`final_rounding_bound`, |y| <= |ref| + the reference's
    bound) instead of u_out on every path, and every path keeps the counts above minus its [out]
    roundings.
    """
    from reflora import lora as _lora  # here, not at the top: reflora.lora imports this module

    check_shapes = _lora.check_shapes
    x_shape = np.shape(x)
    out_f, n_in, _ = check_shapes(x, W, A, B, bias, dropout_mask)
    op = arith.operand
    x64 = _operand("x", x, op).reshape(-1, n_in)
    W64, A64, B64 = _operand("W", W, op), _operand("A", A, op), _operand("B", B, op)
    b64 = None if bias is None else _operand("bias", bias, op)
    m64 = None if dropout_mask is None else _operand("dropout_mask", dropout_mask, op).reshape(-1, n_in)
    s = float(scaling)
    ref_error = _forward_model(x64, W64, A64, B64, s, b64, m64, REFERENCE).error()
    value = None
    if arith.fused:  # |y| <= |ref| + the reference's error, ref = reflora.lora.forward
        value = np.abs(_lora.forward(x64, W64, A64, B64, s, bias=b64, dropout_mask=m64)) + ref_error
    total = _forward_model(x64, W64, A64, B64, s, b64, m64, arith, value).error() + ref_error
    return total.reshape(*x_shape[:-1], out_f)


def _backward_model(g, x, W, A, B, s, mask, ar: Arithmetic, values=None, need_x: bool = True):
    acc, mid, op, out = ar.formats()
    xt, gt = _exact(x), _exact(g)

    def last(v: _Tracked, i: int) -> _Tracked:  # the one [out] of grad_x (0), grad_A (1), grad_B (2)
        return _final(v, out, values[i]) if ar.fused else _round(v, out)

    def keep(v: _Tracked) -> _Tracked:  # x ⊙ mask and the masked low-rank term: [op], or kept in acc
        return v if ar.fused else _round(v, op)

    def keep_mid(v: _Tracked) -> _Tracked:  # s·g: stored in mid, or kept in acc
        return v if ar.fused else _round(v, mid)

    x_d = xt if mask is None else keep(_mul(xt, _exact(mask), acc))
    t = _to_mid(_matmul(x_d, _exact(A.T), acc), ar, mid)  # (N, r), K = in
    s_acc = _round(_exact(s), acc)
    if ar.fused:
        # The kernels apply the scaling last, to each accumulated product: the same number of roundings
        # as scaling g first, but a subnormal rounding inside a product is then multiplied by |s|, which
        # the underflow terms must carry (scaling first would under-count them when |s| > 1).
        grad_t = _to_mid(_matmul(gt, _exact(B), acc), ar, mid)  # (N, r) = g B, unscaled, K = out
        grad_B = last(_mul(_matmul(gt.T, t, acc), s_acc, acc), 2)  # (out, r) = [acc](s·gᵀ t), K = N
        grad_A = last(_mul(_matmul(grad_t.T, x_d, acc), s_acc, acc), 1)  # (r, in) = s·(g B)ᵀ x_d
        if not need_x:
            return None, grad_A.error(), grad_B.error()
        base = _matmul(gt, _exact(W), acc)  # (N, in) = g W, K = out, kept in the accumulator
        lora = _mul(_matmul(grad_t, _exact(A), acc), s_acc, acc)  # (N, in) = [acc](s·(g B) A), K = r
    else:
        g_s = keep_mid(_mul(gt, s_acc, acc))  # (N, out) = [mid][acc](s·g)
        grad_B = last(_matmul(g_s.T, t, acc), 2)  # (out, r), K = N
        grad_t = _to_mid(_matmul(g_s, _exact(B), acc), ar, mid)  # (N, r), K = out
        grad_A = last(_matmul(grad_t.T, x_d, acc), 1)  # (r, in), K = N
        if not need_x:
            return None, grad_A.error(), grad_B.error()
        base = _round(_matmul(gt, _exact(W), acc), out)  # [out](g W), K = out
        lora = _to_mid(_matmul(grad_t, _exact(A), acc), ar, mid)  # (N, in) = [mid](grad_t A), K = r
    if mask is not None:
        lora = keep(_mul(lora, _exact(mask), acc))
    grad_x = last(_add(base, lora, acc), 0)
    return grad_x.error(), grad_A.error(), grad_B.error()


def lora_backward_bound(
    grad_y, x, W, A, B, scaling: float, arith: Arithmetic, *, dropout_mask=None, grad_x: bool = True
):
    """Elementwise bounds (bx, bA, bB) on |out - ref| for grad_x, grad_A and grad_B (float64, in the
    shapes of x, A and B), ref being :func:`reflora.lora.backward` on the same inputs. With
    ``grad_x=False`` bx is None and the (N, out) x (out, in) products that only grad_x needs are
    skipped: grad_A and grad_B reduce over every row, so at full size they are the expensive checks.

    The model, over the N flattened rows (g = grad_y):

        x_d = [op][acc](x ⊙ mask)        t = [mid](x_d Aᵀ), K = in     g_s = [mid][acc]([acc](s)·g)
        grad_B = [out](g_sᵀ t), K = N     grad_t = [mid](g_s B), K = out
        grad_A = [out](grad_tᵀ x_d), K = N
        grad_x = [out][acc]( [out](g W) + [op][acc]([mid](grad_t A) ⊙ mask) ),  K = out and r

    Paths (the "+1"s apply with a mask): grad_B: s g_ni x_dk A_jk, with in + N + 2 (+1) of acc,
    2 of mid, 1 of out (+1 of op); grad_A: s g_ni B_ij x_dk, with out + N + 2 (+1) of acc, 2 of mid,
    1 of out (+1 of op);
    grad_x: g_ni W_ik with out + 1 of acc and 2 of out, and s g_ni B_ij A_jk m_k with
    out + r + 3 (+1) of acc, 3 of mid, 1 of out (+1 of op). The absolute-value expressions are
    |s|·|g|ᵀ(|x_d||A|ᵀ), |s|·(|g||B|)ᵀ|x_d|, and |g||W| + |s|·((|g||B|)|A|) ⊙ |m|.
    The bound is the backend's plus the reference's (every dtype float64).

    With ``arith.fused`` the scaling comes last, as the kernels apply it: x_d = [acc](x ⊙ mask),
    u = [mid](g B), grad_B = [out][acc]([acc](s)·gᵀ t), grad_A = [out][acc]([acc](s)·uᵀ x_d),
    grad_x = [out]([acc](g W + [acc]([acc]([acc](s)·u A) ⊙ mask))) with no [out] on g W and no [op] on
    the masked term (one rounding fewer on each low-rank path). The counts of roundings are those of
    scaling g first, but an underflow error made inside a product is multiplied by |s| afterwards, and
    the η terms carry that factor. The one output rounding of each gradient is
    bounded relative to its exact value (:func:`final_rounding_bound`, |grad| <= |ref| + the
    reference's bound), as in :func:`lora_forward_bound`.
    """
    from reflora import lora as _lora

    check_shapes = _lora.check_shapes
    x_shape = np.shape(x)
    out_f, n_in, _ = check_shapes(x, W, A, B, None, dropout_mask, grad_y)
    op = arith.operand
    g64 = _operand("grad_y", grad_y, op).reshape(-1, out_f)
    x64 = _operand("x", x, op).reshape(-1, n_in)
    W64, A64, B64 = _operand("W", W, op), _operand("A", A, op), _operand("B", B, op)
    m64 = None if dropout_mask is None else _operand("dropout_mask", dropout_mask, op).reshape(-1, n_in)
    s = float(scaling)
    ref_errors = _backward_model(g64, x64, W64, A64, B64, s, m64, REFERENCE, need_x=grad_x)
    values = None
    if arith.fused:
        refs = _lora.backward(g64, x64, W64, A64, B64, s, dropout_mask=m64, grad_x=grad_x)
        values = tuple(None if r is None else np.abs(r) + e for r, e in zip(refs, ref_errors, strict=True))
    own = _backward_model(g64, x64, W64, A64, B64, s, m64, arith, values, need_x=grad_x)
    bx, bA, bB = (None if p is None else p + q for p, q in zip(own, ref_errors, strict=True))
    return (bx.reshape(x_shape) if grad_x else None), bA, bB


def _delta_model(A, B, s, ar: Arithmetic, fan_in_fan_out: bool) -> _Tracked:
    acc, mid, _, _ = ar.formats()
    d = _round(_matmul(_exact(B), _exact(A), acc), mid)  # (out, in) = [mid](B A), K = r
    d = _round(_mul(d, _round(_exact(s), acc), acc), mid)  # [mid][acc]([acc](s)·B A)
    return d.T if fan_in_fan_out else d


def _merged_model(W, A, B, s, ar: Arithmetic, fan_in_fan_out: bool) -> _Tracked:
    acc, _, _, out = ar.formats()
    return _round(_add(_exact(W), _delta_model(A, B, s, ar, fan_in_fan_out), acc), out)


def _merge_inputs(W, A, B, arith: Arithmetic, fan_in_fan_out: bool):
    W64, A64, B64 = (_operand(n, a, arith.operand) for n, a in (("W", W), ("A", A), ("B", B)))
    expected = (B64.shape[0], A64.shape[1])
    if A64.shape[0] != B64.shape[1] or W64.shape != (expected[::-1] if fan_in_fan_out else expected):
        raise ValueError(
            f"W {W64.shape}, A {A64.shape}, B {B64.shape} do not fit (fan_in_fan_out={fan_in_fan_out})"
        )
    return W64, A64, B64


def merge_bound(W, A, B, scaling: float, arith: Arithmetic, *, fan_in_fan_out: bool = False) -> np.ndarray:
    """Elementwise bound on |out - ref| for a merged weight (float64, W's shape), ref being
    :func:`reflora.lora.merge` on the same W (so rounded once to W's dtype).

    Model: ΔW = [mid][acc]([acc](s)·[mid](B A)) with K = r, W' = [out][acc](W + ΔW). Paths: W_ik with
    1 of acc and 1 of out; s B_ij A_jk with r + 3 of acc, 2 of mid, 1 of out. So
    |Ŵ' - W'| <= θ_W |W| + θ_Δ |s|(|B||A|) + E. The reference is the same model with float64 for
    accumulate and intermediate and W's dtype as output (its one final rounding).
    """
    W64, A64, B64 = _merge_inputs(W, A, B, arith, fan_in_fan_out)
    ref = Arithmetic(arith.operand, "float64", "float64", _dtype(np.asarray(W).dtype).name)
    return sum(
        _merged_model(W64, A64, B64, float(scaling), ar, fan_in_fan_out).error() for ar in (arith, ref)
    )


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
    w_dtype = _dtype(np.asarray(W).dtype).name
    arith = arith or Arithmetic(w_dtype, "float64", "float64", w_dtype)
    W64, A64, B64 = _merge_inputs(W, A, B, arith, fan_in_fan_out)
    s = float(scaling)
    acc, _, _, out = arith.formats()
    merged = _merged_model(W64, A64, B64, s, arith, fan_in_fan_out)
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
    """Error of dtype(f32(p)) against the exact product p, |p| <= magnitude: u32 then u_d."""
    u32, e32 = unit_roundoff("float32"), underflow_eta("float32")
    err = u32 * magnitude + e32
    if _dtype(dtype) != np.float32:
        err = err + unit_roundoff(dtype) * (magnitude * (1 + u32) + e32) + underflow_eta(dtype)
    return err


def quant_error_bound(absmax, quant_type: str = "nf4", dtype="float32", *, absmax_error=0.0) -> np.ndarray:
    """Per block, |x - dequantize(quantize(x))| <= (h + ...)·absmax (float64, absmax's shape).

    absmax: the blocks' true absmax a (float32, (n_blocks,)); dtype: the dequantized dtype;
    absmax_error: a bound on |ã - a| for the absmax ã actually used in dequantization (0 without double
    quantization; :func:`dq_absmax_error_bound` with it).

    Derivation. The code c is the nearest table value to x/a, so |x - c·a| <= h·a (:func:`scaled_error`).
    Dequantization returns fl_d(fl_32(c·ã)): |x - c·ã| <= h·a + |c|·|a - ã| <= h·a + e_a, then the
    float32 product errs by at most u32·|c ã| + η32 <= u32·(a + e_a) + η32, and the conversion to d by
    u_d·|fl_32(c ã)| + η_d (no second rounding when d is float32). Attained up to u-terms by a value
    just inside the widest gap's midpoint.
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
    look-up table is not, and needs its own dialect.)
    """
    a = np.asarray(absmax, dtype=np.float64)
    scale = np.asarray(absmax2, dtype=np.float64)[np.arange(a.size) // blocksize2]
    u32, e32 = unit_roundoff("float32"), underflow_eta("float32")
    e1 = u32 / (1 - u32) * scale
    e2 = scaled_error("dynamic") * scale
    e3 = u32 * scale + e32
    return (e1 + e2 + e3 + u32 * (a + e1 + e2 + e3)) * _SELF


def dequant_ulps(dtype="float32", *, fma_absmax: bool = False) -> int:
    """How many ulps of ``dtype`` a conforming dequantization may differ from the reference: 0.

    Dequantization dtype(fl32(code·absmax)) is one IEEE float32 multiply then one conversion, both
    correctly rounded and so deterministic: any backend that follows the rule matches bit for bit
    (0 ulp). The exception is the absmax itself when double quantization is rebuilt with a fused
    multiply-add, fl32(code2·A + offset) instead of fl32(fl32(code2·A) + offset): docs/dialects.md
    (bnb-cuda) records 1 ulp of difference on 6.5% of blocks. Given â' one float32 step from â
    (``fma_absmax=True``):
    with m = min(â, â') in [2^e, 2^(e+1)), |c·â' - c·â| <= |c|·ulp32(m) = |c|·2^(e-23), while
    |c|·m >= |c|·2^e, so the exact products differ by less than 2 ulps of the smaller one. Rounding is
    monotone and float32 steps above the smaller product are at least that ulp wide, so the float32
    results are at most 2 steps apart; converted to float16 or bfloat16 (steps at least 2^13 times
    wider), at most 1 step. Returns 2 for float32 and 1 for float16 / bfloat16 in that case.
    """
    dt = _dtype(dtype)
    if not fma_absmax:
        return 0
    return 2 if dt == np.float32 else 1
