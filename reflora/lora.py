"""LoRA (Hu et al., 2021) as PEFT computes it: scaling, forward, hand-derived backward, merge, init.

Notation, used in every docstring here:

* ``W`` (out, in): the frozen base weight; ``bias`` (out,): its bias, also frozen.
* ``A`` (r, in) and ``B`` (out, r): the adapter, ``r`` its rank; ``alpha`` the user's LoRA alpha.
* ``scaling`` = alpha / r (or alpha / sqrt(r) with rsLoRA): the factor on the adapter's output.
* ``x`` (..., in): the input, any number of leading dimensions; ``y`` (..., out): the output.
* A *dropout mask* is an array of x's shape holding the multiplier of each element (0 or 1/(1-p) for
  inverted dropout), so that dropout(x) = x * mask. ``x_d`` = x * mask.

The rules, each a guarantee of the functions below:

* **Forward.** y = x Wᵀ + bias + scaling · (x_d Aᵀ) Bᵀ. Dropout applies only to the adapter's input,
  never to the base path (PEFT feeds the undropped x to the base layer).
* **Precision.** Inputs may be float64, float32, float16 or bfloat16. They are widened exactly to
  float64 and everything is computed in float64; results are float64 (merge rounds once to W's dtype).
  The float64 result still carries rounding errors, which :func:`reflora.bounds.lora_forward_bound`
  accounts for: its model of the reference is exactly the operation order written here.
* **Merge.** W' = W ± scaling·B A formed in float64 and rounded once to W's dtype (:func:`merge`);
  in a low precision, merge then unmerge does not give W back (bounded in :mod:`reflora.bounds`).
* **Init.** PEFT's defaults from an explicit ``numpy.random.Generator``: A kaiming-uniform or
  gaussian, B exactly zero (:func:`init_lora`).
* **Bad input.** Shapes that do not fit raise ValueError naming the shapes; non-finite values raise
  ValueError naming the array and the first bad index; other dtypes raise TypeError. A result that
  overflows float64 from finite input (values near 1e154) raises ValueError naming the output and
  the index, as :func:`delta` and :func:`merge` do, rather than returning ±inf.
"""

from __future__ import annotations

import math

import numpy as np

from reflora.bounds import round_to
from reflora.checks import check_flag, check_real
from reflora.dtypes import bfloat16

__all__ = [
    "as_float64",
    "backward",
    "check_shapes",
    "delta",
    "forward",
    "init_lora",
    "merge",
    "scaling",
    "unmerge",
]

_FLOATS = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), bfloat16)


def scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """The adapter's output factor: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023).

    r: the rank, a positive int. alpha: any finite real (PEFT's ``lora_alpha``); TypeError for a string
    or a bool, which ``float`` would read.
    rsLoRA keeps the adapter's output scale independent of r as r grows; PEFT's ``use_rslora``
    (True or False; TypeError for anything else).
    """
    rslora = check_flag("rslora", rslora)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    alpha = check_real("alpha", alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha / math.sqrt(r) if rslora else alpha / int(r)


def as_float64(name: str, a: np.ndarray) -> np.ndarray:
    """``a`` widened exactly to float64, after checking that it is a finite float array.

    Raises TypeError for a dtype other than float64 / float32 / float16 / bfloat16, and ValueError
    naming ``name`` and the first non-finite index.
    """
    a = np.asarray(a)
    if a.dtype.byteorder not in "=|":  # big-endian float32 ('>f4') is float32, as nf4 takes it
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {a.dtype}")
    a64 = a.astype(np.float64)
    where = _first_nonfinite(a64)
    if where is not None:
        raise ValueError(f"{name} is not finite at index {where}: {a64[where]}")
    return a64


def _first_nonfinite(a: np.ndarray) -> tuple[int, ...] | None:
    """The multi-index of the first (row-major) NaN or ±inf of ``a``, or None when all are finite."""
    bad = ~np.isfinite(np.asarray(a, dtype=np.float64))
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), bad.shape))


def _check_scaling(s: float) -> float:
    """``scaling`` as a float, by the rules of :func:`scaling`'s alpha (a 0-d array too)."""
    value = check_real("scaling", s)
    if not math.isfinite(value):
        raise ValueError(f"scaling must be finite, got {s}")
    return value


def _finite(name: str, a: np.ndarray) -> np.ndarray:
    """``a`` (a float64 result), or ValueError where finite inputs overflowed float64 (as
    :func:`delta` refuses it): the reference never answers ±inf or NaN for finite input."""
    where = _first_nonfinite(a)
    if where is not None:
        raise ValueError(f"{name} overflows float64 at index {where}")
    return a


def check_shapes(x, W, A, B, bias=None, dropout_mask=None, grad_y=None) -> tuple[int, int, int]:
    """(out, in, r) after checking that the arrays' shapes fit together (None: not given); ValueError
    naming the shapes otherwise. Only shapes are read, so this is cheap to call before any work."""
    x_shape, W_shape, A_shape, B_shape = (np.shape(a) for a in (x, W, A, B))
    if len(W_shape) != 2 or len(A_shape) != 2 or len(B_shape) != 2:
        raise ValueError(f"W, A and B must be 2-D, got shapes W {W_shape}, A {A_shape}, B {B_shape}")
    (out, n_in), (r, a_in), (b_out, b_r) = W_shape, A_shape, B_shape
    if min(out, n_in, r) < 1:
        raise ValueError(f"out, in and r must be at least 1, got W {W_shape}, A {A_shape}")
    if a_in != n_in or b_out != out or b_r != r:
        raise ValueError(
            f"shapes do not fit: W {W_shape} is (out, in), so A must be (r, {n_in}) and B ({out}, r); "
            f"got A {A_shape}, B {B_shape}"
        )
    if len(x_shape) < 1 or x_shape[-1] != n_in:
        raise ValueError(
            f"x has shape {x_shape}; its last dimension must be in_features = {n_in} (W {W_shape})"
        )
    if bias is not None and np.shape(bias) != (out,):
        raise ValueError(f"bias has shape {np.shape(bias)}, expected ({out},) for W {W_shape}")
    if dropout_mask is not None and np.shape(dropout_mask) != x_shape:
        raise ValueError(f"dropout_mask has shape {np.shape(dropout_mask)}, expected x's shape {x_shape}")
    if grad_y is not None and np.shape(grad_y) != (*x_shape[:-1], out):
        raise ValueError(
            f"grad_y has shape {np.shape(grad_y)}, expected {(*x_shape[:-1], out)} for x {x_shape}"
        )
    return out, n_in, r


def forward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    *,
    bias: np.ndarray | None = None,
    dropout_mask: np.ndarray | None = None,
) -> np.ndarray:
    """y = x Wᵀ + bias + scaling · ((x ⊙ mask) Aᵀ) Bᵀ, in float64. Returns float64 (..., out).

    x (..., in), W (out, in), A (r, in), B (out, r), bias (out,) or None, dropout_mask x's shape or
    None (no dropout); any of float64 / float32 / float16 / bfloat16. scaling: a finite real.
    """
    check_shapes(x, W, A, B, bias, dropout_mask)
    s = _check_scaling(scaling)
    x64, W64, A64, B64 = (as_float64(n, a) for n, a in (("x", x), ("W", W), ("A", A), ("B", B)))
    x_d = x64 if dropout_mask is None else x64 * as_float64("dropout_mask", dropout_mask)
    bias64 = None if bias is None else as_float64("bias", bias)
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below, with its place
        t = x_d @ A64.T  # (..., in) @ (in, r) -> (..., r)
        lora = s * (t @ B64.T)  # (..., r) @ (r, out) -> (..., out)
        base = x64 @ W64.T  # (..., in) @ (in, out) -> (..., out); the base path sees the undropped x
        if bias64 is not None:
            base = base + bias64
        y = base + lora
    return _finite("y", y)


def backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    *,
    dropout_mask: np.ndarray | None = None,
    grad_x: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of a loss L with respect to x, A and B, given grad_y = ∂L/∂y. Returns float64
    (grad_x of x's shape, grad_A (r, in), grad_B (out, r)); with ``grad_x=False`` grad_x is None and
    step 4, the one (N, out) x (out, in) product, is skipped.

    grad_y (..., out) with the same leading dimensions as x; other arguments as in :func:`forward`.
    W and the bias are frozen (no gradient); the bias does not enter any gradient.

    Derivation. Flatten the leading dimensions into N rows: x, x_d (N, in), g = grad_y (N, out),
    m the mask (N, in). Write the forward as

        t = x_d Aᵀ                 (N, r)
        y = x Wᵀ + bias + s · t Bᵀ  (N, out)

    1. y depends on B only through s · t Bᵀ, so y[n, i] = ... + s Σ_j t[n, j] B[i, j] and
       ∂L/∂B[i, j] = Σ_n g[n, i] · s · t[n, j]:            grad_B = s · gᵀ t          (out, r)
    2. Likewise ∂L/∂t[n, j] = Σ_i g[n, i] · s · B[i, j]:     grad_t = s · g B          (N, r)
    3. t[n, j] = Σ_k x_d[n, k] A[j, k], so ∂L/∂A[j, k] = Σ_n grad_t[n, j] x_d[n, k]:
                                                             grad_A = grad_tᵀ x_d      (r, in)
    4. x reaches y twice: directly through W, and through x_d = x ⊙ m into t. The first gives g W;
       the second ∂L/∂x_d = grad_t A, then ∂x_d/∂x = m elementwise:
                                                             grad_x = g W + (grad_t A) ⊙ m   (N, in)

    The code computes s · g once and uses it in steps 1 and 2, in this order: this is the operation
    order that :func:`reflora.bounds.lora_backward_bound` models for the reference.
    """
    x_shape = np.shape(x)
    grad_x = check_flag("grad_x", grad_x)
    out, n_in, _ = check_shapes(x, W, A, B, None, dropout_mask, grad_y)
    s = _check_scaling(scaling)
    g = as_float64("grad_y", grad_y).reshape(-1, out)
    x64 = as_float64("x", x).reshape(-1, n_in)
    W64, A64, B64 = as_float64("W", W), as_float64("A", A), as_float64("B", B)
    m = None if dropout_mask is None else as_float64("dropout_mask", dropout_mask).reshape(-1, n_in)
    x_d = x64 if m is None else x64 * m
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, with its place
        t = x_d @ A64.T  # (N, in) @ (in, r) -> (N, r)
        g_s = s * g  # (N, out)
        grad_B = g_s.T @ t  # (out, N) @ (N, r) -> (out, r)
        grad_t = g_s @ B64  # (N, out) @ (out, r) -> (N, r)
        grad_A = grad_t.T @ x_d  # (r, N) @ (N, in) -> (r, in)
        if grad_x:
            grad_xd = grad_t @ A64  # (N, r) @ (r, in) -> (N, in)
            gx = g @ W64 + (grad_xd if m is None else grad_xd * m)  # (N, out) @ (out, in) -> (N, in)
    _finite("grad_A", grad_A)
    _finite("grad_B", grad_B)
    if not grad_x:
        return None, grad_A, grad_B
    return _finite("grad_x", gx).reshape(x_shape), grad_A, grad_B


def delta(A: np.ndarray, B: np.ndarray, scaling: float, *, fan_in_fan_out: bool = False) -> np.ndarray:
    """ΔW = scaling · (B A) in float64: (out, in), or its transpose (in, out) with fan_in_fan_out.

    A (r, in) and B (out, r) with r >= 1 (ValueError otherwise). B A is formed first, then scaled,
    the order :func:`reflora.bounds.merge_bound` models. Where that overflows float64 (only for values
    near 1e154 and beyond) ValueError names the first index, rather than an inf and a RuntimeWarning.
    """
    fan_in_fan_out = check_flag("fan_in_fan_out", fan_in_fan_out)
    if np.ndim(A) != 2 or np.ndim(B) != 2 or np.shape(B)[1] != np.shape(A)[0] or np.shape(A)[0] < 1:
        raise ValueError(f"A must be (r, in) and B (out, r), r >= 1; got A {np.shape(A)}, B {np.shape(B)}")
    s = _check_scaling(scaling)
    with np.errstate(over="ignore", invalid="ignore"):  # reported just below, with its index
        d = s * (as_float64("B", B) @ as_float64("A", A))  # (out, r) @ (r, in) -> (out, in)
    where = _first_nonfinite(d)
    if where is not None:
        raise ValueError(f"scaling · B A overflows float64 at index {where} of B A (out, in)")
    return d.T if fan_in_fan_out else d


def _merge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float, fan_in_fan_out: bool, sign: int
) -> np.ndarray:
    W = np.asarray(W)
    W64 = as_float64("W", W)
    d = delta(A, B, s, fan_in_fan_out=fan_in_fan_out)
    if d.shape != W.shape:
        layout = "(in, out)" if fan_in_fan_out else "(out, in)"
        raise ValueError(f"W has shape {W.shape} but B A gives {d.shape}; W must be stored {layout}")
    with np.errstate(over="ignore"):  # an overflow is refused just below, with its place, not warned of
        merged = round_to(W64 + sign * d, W.dtype)  # (W ± ΔW) in float64, then one rounding
    where = _first_nonfinite(merged)
    if where is not None:
        raise ValueError(f"the merged weight overflows {W.dtype} at index {where}")
    return merged


def merge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float, *, fan_in_fan_out: bool = False
) -> np.ndarray:
    """The merged weight W + scaling · B A, in W's dtype, so that forward with it and no adapter
    equals forward with the adapter (up to that one rounding).

    W: (out, in), or (in, out) with ``fan_in_fan_out`` (GPT-2's Conv1D stores it that way; then
    ΔW is transposed). Any of the four float dtypes; A (r, in), B (out, r).

    Rules. ΔW is computed in float64 and W + ΔW is formed in float64, then rounded once, to nearest
    with ties to even, to W's dtype. A result that overflows W's dtype raises ValueError. The bias is
    unchanged (an adapter without a bias of its own adds nothing to it).

    Merge then :func:`unmerge` is the identity only in exact arithmetic. Each of the two steps rounds
    once to W's dtype, so in a low precision W comes back changed by up to about u·(|W| + |W + ΔW|)
    per element (u = 2^-8 in bfloat16): a whole ulp of W where ΔW is below half an ulp.
    :func:`reflora.bounds.merge_roundtrip_bound` states the bound exactly.
    """
    return _merge(W, A, B, scaling, fan_in_fan_out, +1)


def unmerge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float, *, fan_in_fan_out: bool = False
) -> np.ndarray:
    """W - scaling · B A in W's dtype: the inverse of :func:`merge`, by the same rules (not exact)."""
    return _merge(W, A, B, scaling, fan_in_fan_out, -1)


def _largest_at_most(bound: float, dtype: np.dtype) -> np.ndarray:
    """The largest value of ``dtype`` that is <= ``bound`` (>= 0): rounding must never exceed it."""
    b = round_to(np.float64(bound), dtype)
    if float(b) > bound:
        b = np.nextafter(b, dtype.type(0))
    return b


def init_lora(
    in_features: int,
    out_features: int,
    r: int,
    *,
    rng: np.random.Generator,
    method: str = "kaiming",
    dtype: np.dtype | type | str = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """A fresh adapter (A (r, in), B (out, r)) in ``dtype``, as PEFT's default initialisers draw it.

    method "kaiming" (PEFT's ``init_lora_weights=True``): A ~ U(-1/√in, 1/√in), which is torch's
    kaiming_uniform_ with a = √5: bound = gain·√(3/in) with gain = √(2/(1 + a²)) = 1/√3. Every value
    satisfies |A| <= 1/√in even after rounding to ``dtype`` (values that would round past the bound
    are set to the largest value of ``dtype`` below it). std = 1/√(3·in).
    method "gaussian" (``init_lora_weights="gaussian"``): A ~ N(0, (1/r)²), i.e. std 1/r, not 1/√r.
    In both, B = 0 exactly, so the adapter starts as the identity change.

    rng: a ``numpy.random.Generator``; the same seed gives the same adapter. torch's generator draws
    other numbers, so the distribution matches PEFT's, not the values.
    """
    for name, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    dt = np.dtype(dtype)
    if dt not in _FLOATS:
        raise TypeError(f"dtype must be float64, float32, float16 or bfloat16, got {dt}")
    if method == "kaiming":
        bound = 1.0 / math.sqrt(in_features)
        limit = float(_largest_at_most(bound, dt))
        A = round_to(np.clip(rng.uniform(-bound, bound, size=(r, in_features)), -limit, limit), dt)
    elif method == "gaussian":
        A = round_to(rng.normal(0.0, 1.0 / r, size=(r, in_features)), dt)
    else:
        raise ValueError(f"method must be 'kaiming' or 'gaussian', got {method!r}")
    return A, np.zeros((out_features, r), dtype=dt)
