"""Error bounds for the Triton kernels' BOUND class: a provisional stand-in for :mod:`reflora.bounds`.

When ``reflora.bounds`` lands, its Arithmetic model and bound functions replace this module (the
tests import only :class:`Arithmetic`, :class:`Terms`, :func:`bound` and the ``*_terms`` builders,
so the swap is one import). The derivation, stated once:

Every output here is a sum of products of exactly representable inputs, e.g. for the forward
y[m, n] = sum_k x[m,k] W[n,k] + s * sum_j (sum_k x[m,k] mask[m,k] A[j,k]) B[n,j] + bias[n]. Group the
products into *term groups*; a term of a group passes through at most ``roundings`` float32
operations on its way to the accumulator (its product, the sums it takes part in, the scaling
multiply, the epilogue adds). With unit roundoff u of the accumulate dtype, the standard result
(Higham, Accuracy and Stability, Lemma 3.1 / eq. 3.5) gives each term a relative error of at most
gamma_n(u) = n u / (1 - n u), whatever the order of the sums -- so tiling, split reductions and
tensor-core trees are all covered. A W operand rounded to the activation dtype (unit u_op) adds a
factor (1 + u_op). Hence, before the output rounding,

    |y~ - y| <= sum_groups [ (1 + u_op)(1 + gamma_n(u)) - 1 ] * magnitude_g
               + (1 + gamma_n(u)) * eta_op / 2 * operand_l1_g + n * eta_acc,

with magnitude_g the same expression evaluated on |inputs| (in float64), eta the smallest subnormal
(the rounding error of a result in the subnormal range is absolute, at most eta / 2 per operation),
and operand_l1_g the sum of |other factor| over the terms whose W factor was rounded. The final
rounding to the output dtype adds u_out |y~| <= u_out (|y| + error), and eta_out / 2 for subnormal
outputs. The float64 reference's own error, gamma_n(2**-53) * magnitude, is added so that the bound
compares the computed value with the exact one. ``directed`` accumulation (tensor cores may truncate
when they align and add) doubles the accumulate unit roundoff; the kernels declare it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Arithmetic",
    "Terms",
    "arithmetic_gemm",
    "arithmetic_lowrank",
    "bound",
    "gamma",
    "linear_backward_terms",
    "linear_forward_terms",
]

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SMALLEST_SUBNORMAL = {"float64": 2.0**-1074, "float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}


@dataclass(frozen=True)
class Arithmetic:
    """The floating-point model of a kernel.

    operand: dtype the dequantized W is rounded to before multiplying ("float32": no rounding).
    accumulate: dtype of products, sums, and t / u (the rank-r intermediates).
    output: dtype of the stored result.
    directed: the accumulator may round toward zero (tensor cores): unit roundoff 2**-23, not 2**-24.
    """

    operand: str
    output: str
    accumulate: str = "float32"
    directed: bool = True

    @property
    def u_acc(self) -> float:
        return UNIT_ROUNDOFF[self.accumulate] * (2.0 if self.directed else 1.0)


def arithmetic_gemm(dtype: str) -> Arithmetic:
    """nf4_gemm / nf4_gemv / the fused forward and grad_x: W rounded to the activation dtype once,
    float32 accumulation (tensor cores: directed), one rounding to the activation dtype."""
    return Arithmetic(operand=dtype, output=dtype)


def arithmetic_lowrank(output: str = "float32") -> Arithmetic:
    """lowrank and the grad_A / grad_B built on it: operands widened exactly to float32, an IEEE
    float32 dot (round to nearest), then one rounding to ``output`` (the parameter's dtype)."""
    return Arithmetic(operand="float32", output=output, directed=False)


def gamma(n: int, u: float) -> float:
    """gamma_n(u) = n u / (1 - n u); ValueError when n u >= 1 (no bound exists)."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n}({u}) undefined: n * u >= 1")
    return n * u / (1 - n * u)


@dataclass(frozen=True)
class Terms:
    """One group of products in an output: their summed |value| and the roundings each passes through.

    magnitude: float64 array (output shape), the expression evaluated on absolute values.
    roundings: accumulate-dtype operations on the path of any one term of the group.
    operand_l1: for groups whose W factor was rounded to ``Arithmetic.operand``: the sum of |other
      factor| over the group's terms (output shape); None when W is not a factor.
    """

    magnitude: np.ndarray
    roundings: int
    operand_l1: np.ndarray | None = None


def bound(ref: np.ndarray, groups: Sequence[Terms], arith: Arithmetic) -> np.ndarray:
    """float64 array: the largest |computed - exact| the arithmetic allows, elementwise (module doc)."""
    u, u_out = arith.u_acc, UNIT_ROUNDOFF[arith.output]
    u_op = UNIT_ROUNDOFF[arith.operand] if arith.operand != arith.accumulate else 0.0
    eta_acc, eta_out = SMALLEST_SUBNORMAL[arith.accumulate], SMALLEST_SUBNORMAL[arith.output]
    eta_op = SMALLEST_SUBNORMAL[arith.operand] if u_op else 0.0
    err = np.zeros(np.shape(ref), dtype=np.float64)
    for g in groups:
        gn = gamma(g.roundings, u)
        rel = (1 + u_op) * (1 + gn) - 1 if g.operand_l1 is not None else gn
        err = err + rel * g.magnitude + g.roundings * eta_acc + gamma(g.roundings, 2.0**-53) * g.magnitude
        if g.operand_l1 is not None:
            err = err + (1 + gn) * eta_op / 2 * g.operand_l1
    return (1 + u_out) * err + u_out * np.abs(ref) + eta_out / 2


def linear_forward_terms(x, w, a=None, b=None, scaling=0.0, bias=None, mask=None) -> list[Terms]:
    """Term groups of y = x W^T + scaling ((x*mask) A^T) B^T + bias, for 2-D float64 x.

    Roundings per term: base x W^T: K (dot) + 2 (low-rank add, bias add). Low-rank: 1 (mask
    product) + K (t) + r (epilogue dot) + 2 (scaling rounded to float32, scaling multiply) + 1 (add to
    the accumulator) + 1 (bias add). Bias: 2 adds. Arrays may be numpy or torch (float64): only
    ``abs``, ``@``, ``*``, ``.T`` and ``.sum`` are used; magnitudes broadcast to the output shape.
    """
    ax, aw = abs(x), abs(w)
    k = x.shape[1]
    groups = [Terms(ax @ aw.T, k + 2, operand_l1=ax.sum(1)[:, None])]  # l1: sum_k |x[m, k]|
    if a is not None:
        axm = ax if mask is None else ax * abs(mask)
        groups.append(Terms(abs(scaling) * (axm @ abs(a).T) @ abs(b).T, k + a.shape[0] + 5))
    if bias is not None:
        groups.append(Terms(abs(bias)[None, :], 2))
    return groups


def linear_backward_terms(
    x, w, g, a=None, b=None, scaling=0.0, mask=None, parts=("grad_x", "grad_A", "grad_B")
) -> dict[str, list[Terms]]:
    """Term groups of grad_x, grad_A, grad_B (those named in ``parts``) for 2-D float64 x and grad_y g,
    numpy or torch. ``w`` is read only for grad_x.

    grad_x: base g W: N + 1; low-rank: N (u) + r + 2 (scaling) + 1 (mask) + 1 (add).
    grad_A = s (g B)^T (x*mask): N (u) + 1 (mask) + M (dot, split partials included) + 2 (scaling).
    grad_B = s g^T ((x*mask) A^T): 1 (mask) + K (t) + M + 2 (scaling).
    """
    ag, ax = abs(g), abs(x)
    m, n = g.shape
    out = {}
    if "grad_x" in parts:
        out["grad_x"] = [Terms(ag @ abs(w), n + 1, operand_l1=ag.sum(1)[:, None])]
    if a is not None:
        r = a.shape[0]
        axm = ax if mask is None else ax * abs(mask)
        agb = ag @ abs(b)  # (M, r)
        if "grad_x" in parts:
            low = abs(scaling) * (agb @ abs(a))
            out["grad_x"].append(Terms(low if mask is None else low * abs(mask), n + r + 5))
        if "grad_A" in parts:
            out["grad_A"] = [Terms(abs(scaling) * agb.T @ axm, n + m + 3)]
        if "grad_B" in parts:
            out["grad_B"] = [Terms(abs(scaling) * ag.T @ (axm @ abs(a).T), x.shape[1] + m + 3)]
    return out
