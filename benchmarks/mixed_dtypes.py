"""A 4-bit base whose state is of another dtype than the activations: which weight bitsandbytes'
forward and backward each multiply by, against reflora's rule (Ŵ = dequantize(state) in the state's
dtype, then cast to the activations' dtype: reflora/qlora.py).

A model loaded in bfloat16 or float16 and trained with ``bnb_4bit_compute_dtype=torch.float32`` (or
any other pair of dtypes) quantizes its weights into states of the load dtype and computes in the
compute dtype. bitsandbytes 0.50's ``MatMul4Bit`` runs its forward through the ``gemm_4bit`` op, which
dequantizes straight into the activations' dtype, and its backward through ``dequantize_4bit(B,
state).to(grad.dtype)``, which goes through the state's. This script measures, on the real library
(this machine's device):

* how many weights the two paths give differently, and by how much (relative, in the weight's units);
* how far bnb's forward lies from reflora's reference, in units of reflora's derived bound for the
  declared arithmetic (float32 accumulation; the base rounded once to the activations' dtype).

Usage: ``python benchmarks/mixed_dtypes.py`` (needs torch and bitsandbytes; a few seconds). A 1024 x
1024 weight N(0, 0.02), blocksize 64, NF4 with double quantization; x (16, 1024) N(0, 1); seed 0.
Prints one line per (state dtype, activation dtype), then the one case where normal weights pass and
small ones do not: a float16 state under bfloat16 activations (:func:`small_float16_weights`).
"""

from __future__ import annotations

import sys

import numpy as np

from reflora import bounds, lora, nf4
from reflora.dtypes import as_dtype

PAIRS = [("bfloat16", "float32"), ("float16", "float32"), ("float16", "bfloat16"), ("bfloat16", "float16"),
         ("float32", "bfloat16"), ("float32", "float16")]  # fmt: skip


def measure(state_dtype: str, act: str, seed: int = 0) -> dict:
    import bitsandbytes as bnb
    import torch

    from reflora.backends._tensors import to_numpy, view
    from reflora.backends.bitsandbytes import _device, to_bnb

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((1024, 1024)) * 0.02).astype(as_dtype(state_dtype))
    x = rng.standard_normal((16, 1024)).astype(as_dtype(act))
    state = nf4.quantize(w, 64, double_quant=True)
    w_hat = nf4.dequantize(state)  # Ŵ, in the state's dtype
    device = _device()
    packed, qs = to_bnb(state, device)
    xt = view(x, device).requires_grad_(True)
    y = bnb.matmul_4bit(xt, packed.t(), qs)
    # grad_x for grad_y = e_i e_jᵀ summed over rows: with grad_y the identity's first rows, grad_x's row
    # i is the weight's row i as the backward multiplies by it.
    eye = torch.zeros(16, 1024, dtype=xt.dtype, device=device)
    eye[torch.arange(16), torch.arange(16)] = 1
    (gx,) = torch.autograd.grad(y, xt, eye)
    w_bwd_rows = to_numpy(gx).astype(np.float64)  # (16, 1024): Ŵ rows 0..15 as the backward uses them
    w_fwd = to_numpy(torch.ops.bitsandbytes.dequantize_4bit.default(
        packed.view(-1, 1), qs.absmax if not qs.nested else _rebuilt(qs), 64, "nf4", qs.shape, xt.dtype
    )).astype(np.float64)  # fmt: skip
    want = w_hat.astype(as_dtype(act)).astype(np.float64)  # reflora's operand: Ŵ cast to the activations'
    assert np.array_equal(w_bwd_rows, want[:16]), "the backward's weight is not Ŵ cast (unexpected)"
    differ = w_fwd != want
    rel = np.abs(w_fwd - want)[differ] / np.abs(want)[differ] if differ.any() else np.zeros(1)
    arith = bounds.Arithmetic(operand=act, accumulate="float32", intermediate=act, output=act)
    zeros_a, zeros_b = np.zeros((1, 1024)), np.zeros((1024, 1))
    ref = lora.forward(x, w_hat, zeros_a, zeros_b, 0.0)
    bound = bounds.lora_forward_bound(x, w_hat, zeros_a, zeros_b, 0.0, arith, base_dtype=state_dtype)
    ratio = np.abs(to_numpy(y).astype(np.float64) - ref) / bound
    return {"pair": f"{state_dtype} state, {act} x", "differ": float(differ.mean()),
            "max_rel": float(rel.max()), "worst": float(ratio.max()),
            "outside": float((ratio > 1).mean())}  # fmt: skip


def small_float16_weights(scale: float, seed: int = 0) -> float:
    """Worst |Δ|/bound of the forward's weight (dequantized straight into bfloat16, as bitsandbytes'
    forward does) for a float16 state of N(0, scale) weights under bfloat16 activations: one-hot rows
    of x (each output one product, exact), 16 x 64 weights, double quantization. Below float16's normal
    range (6.1e-5) Ŵ loses bits a direct bfloat16 rounding keeps, beyond the one rounding the bound
    allows. Computed with reflora's own dequantize(state, "bfloat16"), bit-identical to bnb's kernel."""
    rng = np.random.default_rng(seed)
    state = nf4.quantize((rng.standard_normal((16, 64)) * scale).astype(np.float16), 64, double_quant=True)
    w_hat = nf4.dequantize(state)
    direct = nf4.dequantize(state, "bfloat16").astype(np.float64)
    x = np.eye(64).astype(as_dtype("bfloat16"))
    a, b = np.zeros((1, 64)), np.zeros((16, 1))
    y = bounds.round_to(x.astype(np.float64) @ direct.T, "bfloat16").astype(np.float64)
    arith = bounds.Arithmetic(
        operand="bfloat16", accumulate="float32", intermediate="bfloat16", output="bfloat16"
    )
    bound = bounds.lora_forward_bound(x, w_hat, a, b, 0.0, arith, base_dtype="float16")
    ref = lora.forward(x, w_hat, a, b, 0.0)
    return float((np.abs(y - ref) / np.where(bound > 0, bound, np.inf)).max())


def _rebuilt(qs):
    """bnb's own rebuilt float32 absmax of a double-quantized state (its dequantize_blockwise + offset)."""
    import bitsandbytes.functional as F

    return F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset


def main() -> int:
    try:
        import bitsandbytes  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"needs torch and bitsandbytes: {exc}", file=sys.stderr)
        return 2
    print("bitsandbytes' forward weight vs Ŵ cast to the activations' dtype (what its backward uses):")
    for state_dtype, act in PAIRS:
        r = measure(state_dtype, act)
        print(f"  {r['pair']:<26} forward weight differs in {r['differ']:7.2%} of entries (max rel "
              f"{r['max_rel']:.2e}); forward y: worst |Δ|/bound {r['worst']:8.2f}, "
              f"{r['outside']:7.2%} of outputs outside the bound")  # fmt: skip
    print("float16 state, bfloat16 x, weights N(0, scale): worst |Δ|/bound of the direct bfloat16 weight:")
    print(
        "  "
        + ", ".join(f"scale {sc:.0e}: {small_float16_weights(sc):.2f}" for sc in (1e-4, 1e-5, 2e-6, 5e-7))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
