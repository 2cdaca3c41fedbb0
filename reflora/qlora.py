"""QLoRA (Dettmers et al., 2023): LoRA on a frozen 4-bit base weight, and merging into it.

Notation as in :mod:`reflora.lora`: x (..., in), A (r, in), B (out, r), scaling, dropout mask;
``state`` a :class:`reflora.QuantState` holding the base weight W (out, in) in 4 bits, and
Ŵ = ``reflora.nf4.dequantize(state)`` the weight it stands for, in ``state.dtype``.

Rules:

* **Forward and backward** are :func:`reflora.lora.forward` / :func:`reflora.lora.backward` with W = Ŵ,
  dequantized exactly (bit for bit, in ``state.dtype``) and then widened to float64. Ŵ is frozen: there
  is no gradient for the base, and the original full-precision W plays no part (it is gone).
* **A state of another dtype than the activations** (a model loaded in bfloat16, computed in float32)
  still stands for Ŵ in ``state.dtype``. A backend computing in the activations' dtype d uses
  d(Ŵ) = ``dequantize(state).astype(d)``, in the forward and the backward alike: exact when d holds
  ``state.dtype`` (bfloat16 or float16 under float32), one rounding of Ŵ otherwise, which the error
  bound allows (docs/bounds.md §6). Dequantizing straight into d, ``dequantize(state, d)``, gives
  another weight wherever ``state.dtype`` is not float32 (the float32 product is then never rounded to
  the state's dtype): one the state does not stand for (bitsandbytes 0.50's forward does it, and its
  backward does not; docs/findings.md).
* **Merge** adds ΔW = scaling·B A to Ŵ, not to the original W, and requantizes; a 4-bit merge loses
  whatever of ΔW falls below the quantization step. :class:`MergeReport` makes that loss visible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from reflora import lora, nf4
from reflora.double_quant import BLOCKSIZE2
from reflora.lora import as_float64
from reflora.state import QuantState

__all__ = ["MergeReport", "backward", "dequantized_base", "forward", "merge"]


def dequantized_base(state: QuantState) -> np.ndarray:
    """Ŵ: the base weight (out, in) a 2-D state stands for, in ``state.dtype``, bit-exact."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a reflora.QuantState, got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"a LoRA base weight is 2-D (out, in); the state holds shape {state.shape}")
    return nf4.dequantize(state)


def forward(
    x: np.ndarray,
    state: QuantState,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    *,
    bias: np.ndarray | None = None,
    dropout_mask: np.ndarray | None = None,
) -> np.ndarray:
    """y = x Ŵᵀ + bias + scaling·((x ⊙ mask) Aᵀ) Bᵀ in float64 (..., out), Ŵ = dequantize(state).

    Arguments and rules as :func:`reflora.lora.forward`, the base weight given as a 4-bit state.
    """
    return lora.forward(x, dequantized_base(state), A, B, scaling, bias=bias, dropout_mask=dropout_mask)


def backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    state: QuantState,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    *,
    dropout_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grad_x, grad_A, grad_B) in float64, as :func:`reflora.lora.backward` with W = Ŵ.

    grad_x = grad_y Ŵ + (grad_t A) ⊙ mask flows through the dequantized base; Ŵ gets no gradient.
    """
    return lora.backward(grad_y, x, dequantized_base(state), A, B, scaling, dropout_mask=dropout_mask)


@dataclass(frozen=True)
class MergeReport:
    """What a 4-bit merge did to the weight. Norms are Frobenius norms, computed in float64.

    base: which weight ΔW was added to; always the dequantized 4-bit base Ŵ (the original W is not
        stored in a QuantState, so no merge can use it).
    quant_error_fro / quant_error_max: ‖W - Ŵ‖ of the base's own quantization, when the original W was
        given (else None).
    delta_fro / delta_max: ‖ΔW‖, the size of what the adapter adds.
    requant_error_fro / requant_error_max: ‖deq(new) - (Ŵ + ΔW)‖, what requantizing lost.
    relative_fro / relative_max: the requantization error divided by ‖ΔW‖ (inf if ΔW = 0 but the
        error is not, 0 if both are 0).
    error_exceeds_delta: requant_error_fro > delta_fro: the merge lost more than the whole adapter is
        worth, so the merged model is not the trained one in any useful sense.
    """

    shape: tuple[int, ...]
    dtype: str
    quant_type: str
    blocksize: int
    double_quant: bool
    base: str
    quant_error_fro: float | None
    quant_error_max: float | None
    delta_fro: float
    delta_max: float
    requant_error_fro: float
    requant_error_max: float
    relative_fro: float
    relative_max: float
    error_exceeds_delta: bool

    def __str__(self) -> str:
        dq = ", double-quantized" if self.double_quant else ""
        lines = [
            f"4-bit merge of a {self.shape} {self.quant_type} weight (blocksize {self.blocksize}{dq}, "
            f"dtype {self.dtype} kept)",
            f"  ΔW = scaling·B A was added to {self.base}",
        ]
        if self.quant_error_fro is not None:
            lines.append(
                f"  base quantization error  ‖W - Ŵ‖_F = {self.quant_error_fro:.4g}"
                f"  (max {self.quant_error_max:.4g})"
            )
        lines += [
            f"  adapter delta            ‖ΔW‖_F    = {self.delta_fro:.4g}  (max {self.delta_max:.4g})",
            f"  requantization error     ‖deq(merged) - (Ŵ + ΔW)‖_F = {self.requant_error_fro:.4g}"
            f"  (max {self.requant_error_max:.4g})",
            f"  relative to ΔW           {self.relative_fro:.3g} (Frobenius), {self.relative_max:.3g} (max)",
        ]
        if self.error_exceeds_delta:
            lines.append("  WARNING: requantization lost more than the whole adapter delta (error > ‖ΔW‖_F)")
        return "\n".join(lines)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")


def _check_fits(merged: np.ndarray, dtype: np.dtype) -> None:
    """ValueError naming the first index where ``merged`` is infinite: the merge overflowed ``dtype``."""
    bad = ~np.isfinite(merged)
    if bad.any():
        flat = int(np.flatnonzero(bad.reshape(-1))[0])
        where = tuple(int(i) for i in np.unravel_index(flat, merged.shape))
        raise ValueError(f"the merged weight overflows {np.dtype(dtype)} at index {where}")


def merge(
    state: QuantState, A: np.ndarray, B: np.ndarray, scaling: float, *, original: np.ndarray | None = None
) -> tuple[QuantState, MergeReport]:
    """Merge the adapter into a 4-bit base: (new state, :class:`MergeReport`).

    state: the 2-D base (out, in); A (r, in), B (out, r), scaling as in :mod:`reflora.lora`.
    original: optionally the full-precision W (out, in) the state was quantized from, for the report.

    Rules. merged = fl32(Ŵ + ΔW): Ŵ widened exactly, ΔW = scaling·B A and the sum in float64, one
    rounding to float32 (PEFT adds in float32 too). The new state is ``reflora.nf4.quantize(merged)``
    with the same blocksize, quant_type and double quantization (blocksize2 included), and keeps the
    original ``state.dtype`` (PEFT's 4-bit merge silently changes it to float32; reflora does not). The
    bias is unchanged.
    A merged weight beyond the range of ``state.dtype`` (the float32 sum, or the requantized weight
    dequantized to ``state.dtype``) raises ValueError naming the first such index, worded as
    :func:`reflora.lora.merge` words it, and no RuntimeWarning comes before it; so does a ΔW that
    overflows float64 (:func:`reflora.lora.delta`).
    """
    W_hat = as_float64("dequantized base", dequantized_base(state))
    d = lora.delta(A, B, scaling)
    if d.shape != W_hat.shape:
        raise ValueError(f"B A has shape {d.shape} but the 4-bit base is {W_hat.shape}")
    target = W_hat + d  # (out, in): what the merged weight should be, in float64
    with np.errstate(over="ignore"):  # an overflow is reported below, with its index
        merged = target.astype(np.float32)
    _check_fits(merged, state.dtype)  # beyond float32 is beyond every state dtype
    b2 = BLOCKSIZE2 if state.nested is None else state.nested.blocksize2  # used only with double_quant
    new = nf4.quantize(
        merged, state.blocksize, quant_type=state.quant_type, double_quant=state.double_quant, blocksize2=b2
    )
    new = dataclasses.replace(new, dtype=state.dtype)
    with np.errstate(over="ignore"):
        requantized = nf4.dequantize(new)  # values beyond state.dtype's range become inf, reported below
    _check_fits(requantized, state.dtype)
    lost = as_float64("requantized", requantized) - target

    quant_fro = quant_max = None
    if original is not None:
        W = as_float64("original", original)
        if W.shape != W_hat.shape:
            raise ValueError(f"original has shape {W.shape}, the state {W_hat.shape}")
        quant_fro, quant_max = float(np.linalg.norm(W - W_hat)), float(np.abs(W - W_hat).max())
    delta_fro, delta_max = float(np.linalg.norm(d)), float(np.abs(d).max())
    lost_fro, lost_max = float(np.linalg.norm(lost)), float(np.abs(lost).max())
    report = MergeReport(
        shape=state.shape,
        dtype=np.dtype(state.dtype).name,
        quant_type=state.quant_type,
        blocksize=state.blocksize,
        double_quant=state.double_quant,
        base="the dequantized 4-bit base Ŵ, not the original weight W",
        quant_error_fro=quant_fro,
        quant_error_max=quant_max,
        delta_fro=delta_fro,
        delta_max=delta_max,
        requant_error_fro=lost_fro,
        requant_error_max=lost_max,
        relative_fro=_ratio(lost_fro, delta_fro),
        relative_max=_ratio(lost_max, delta_max),
        error_exceeds_delta=lost_fro > delta_fro,
    )
    return new, report
