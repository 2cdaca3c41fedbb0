"""Whether the kernels keep subnormal numbers on this device: measured, for the error bounds.

Reference: :func:`reflora.lora.forward` / :func:`reflora.lora.backward` (float64), on inputs whose every
product and partial sum is exact in float32 (all positive powers of two, few enough terms), so that a
kernel that keeps subnormals returns the oracle's values rounded once to the output dtype, bit for bit.
Tolerance class: exact.

Why. :class:`reflora.bounds.Arithmetic` has ``flush_to_zero``: whether subnormal operands may be read as
zero and subnormal results flushed. A backend that flushes but declares that it does not fails the
bfloat16 audit on inputs near the bottom of the range, spuriously; one that declares it without doing
it gets a looser bound than it deserves. Tensor-core dots, Triton's choice of PTX (``.ftz`` or not) and
the GEMV's float32 fused multiply-adds each decide this on their own, so it is measured through the
public op the backend runs (:func:`~reflora.backends.triton.qlora_linear`, forward and backward), at
row counts that take each of its kernels: the GEMV (1 row), the GEMM decoding W in its tiles, and the
GEMM after ``dequant`` (``gemm.DEQUANT_FIRST_MIN_M`` rows), as :func:`reflora.backends._tensors.
bf16_matmul_flushes` measures torch's matmuls.

The probes, each a 256 x 256 weight, rank 16, scaling 1 (:data:`CASES`; t = x Aᵀ, u = grad_y B):

* ``subnormal operands``: x and grad_y the dtype's 2**-130 (bfloat16, float32) or 2**-20 (float16),
  W, A and B 1: y = grad_x = 17 x 2**-122 (2**-12 in float16). Read as zero, they take y and grad_x down.
  (grad_A and grad_B, 2**-252 a product, are 0 in the oracle too.)
* ``subnormal results``: x, grad_y, W and B 2**-70 (normal), A 1: the products x W, t B and grad_y B
  are 2**-140 and 2**-132, subnormal in float32; y = grad_x = 17 x 2**-132, grad_B = rows x 2**-132.
* ``subnormal products in grad_A``: grad_y and A 1, x and B 2**-70, W 1: u = 2**-62 and each product
  of grad_A = uᵀ x is 2**-132, so grad_A = rows x 2**-132.
* float16, ``subnormal results``: x, grad_y and W 2**-12, A 1, B 0: y = grad_x = 2**-16 and
  grad_B = rows x 2**-16 at one row, below float16's smallest normal 2**-14 (products of float16
  numbers are normal in float32, so here only the output's rounding can flush).

Every input is positive, so every exact partial sum is positive and a flush can only make a result
smaller; a result larger than the oracle's, or not finite, is a wrong kernel, not a flush, and raises.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from reflora import lora, nf4
from reflora.backends._tensors import to_numpy
from reflora.backends.torch.quant_state import TorchQuantState, numpy_to_torch
from reflora.backends.triton.gemm import DEQUANT_FIRST_MIN_M
from reflora.dtypes import as_dtype

__all__ = ["PROBE_ROWS", "flushes", "probe"]

REFERENCE = "reflora.lora.forward / reflora.lora.backward"
TOLERANCE = "exact"

_SIZE, _RANK = 256, 16


PROBE_ROWS = (1, 64, DEQUANT_FIRST_MIN_M)
"""The row counts probed: one for each kernel that computes the layer (GEMV, in-tile GEMM, GEMM after
dequantize)."""

# name -> (x, grad_y, W, A, B), each a constant tensor of that value.
_WIDE = {
    "subnormal operands": (2.0**-130, 2.0**-130, 1.0, 1.0, 1.0),
    "subnormal results": (2.0**-70, 2.0**-70, 2.0**-70, 1.0, 2.0**-70),
    "subnormal products in grad_A": (2.0**-70, 1.0, 1.0, 1.0, 2.0**-70),
}
CASES = {
    torch.bfloat16: _WIDE,
    torch.float32: _WIDE,
    torch.float16: {
        "subnormal operands": (2.0**-20, 2.0**-20, 1.0, 1.0, 1.0),
        "subnormal results": (2.0**-12, 2.0**-12, 2.0**-12, 1.0, 0.0),
    },
}
"""The probes of each activation dtype (module docstring)."""


def probe(dtype: torch.dtype, device: str | torch.device, rows: tuple[int, ...] = PROBE_ROWS) -> list[str]:
    """Where the layer's results differ from the oracle's on the subnormal probes (module docstring):
    one line each, as "subnormal operands, 64 rows: y 0 of 65536 equal". Empty: subnormals are kept.

    Runs with gradients on and autocast off whatever the caller's mode. Raises RuntimeError where a
    result exceeds the oracle's or is not finite: no flush does that, a wrong kernel does.
    """
    from reflora.backends.triton import qlora_linear

    if dtype not in CASES:
        raise ValueError(f"dtype must be one of {sorted(map(str, CASES))}, not {dtype}")
    name_of_dtype = str(dtype).removeprefix("torch.")
    np_dtype = as_dtype(name_of_dtype)
    device = torch.device(device)
    found = []
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for name, (xv, gv, wv, av, bv) in CASES[dtype].items():
            state = nf4.quantize(np.full((_SIZE, _SIZE), wv, dtype=np.float32).astype(np_dtype), 64)
            ts = TorchQuantState.from_state(state, device)
            w = nf4.dequantize(state, name_of_dtype)  # what the kernels multiply: exactly wv
            a_np = np.full((_RANK, _SIZE), av, dtype=np.float32).astype(np_dtype)
            b_np = np.full((_SIZE, _RANK), bv, dtype=np.float32).astype(np_dtype)
            for m in rows:
                x_np = np.full((m, _SIZE), xv, dtype=np.float32).astype(np_dtype)
                g_np = np.full((m, _SIZE), gv, dtype=np.float32).astype(np_dtype)
                x, a, b = (numpy_to_torch(v).to(device).requires_grad_() for v in (x_np, a_np, b_np))
                y = qlora_linear(x, ts, a, b, 1.0)
                grads = torch.autograd.grad(y, (x, a, b), numpy_to_torch(g_np).to(device))
                want = (
                    lora.forward(x_np, w, a_np, b_np, 1.0),
                    *lora.backward(g_np, x_np, w, a_np, b_np, 1.0),
                )
                for label, got, exact in zip(
                    ("y", "grad_x", "grad_A", "grad_B"), (y, *grads), want, strict=True
                ):
                    got64 = to_numpy(got.detach()).astype(np.float64)
                    want64 = exact.astype(np_dtype).astype(np.float64)
                    if not (got64 <= want64).all():  # NaN fails this too
                        i = int(np.flatnonzero(~(got64 <= want64))[0])
                        raise RuntimeError(
                            f"the subnormal probe's {name}, {m} rows: {label} element {i} is "
                            f"{got64.flat[i]!r}, above the exact {want64.flat[i]!r}: not a flush, a wrong "
                            "result (run the conformance suite on this backend)"
                        )
                    same = got64 == want64
                    if not same.all():
                        found.append(f"{name}, {m} rows: {label} {int(same.sum())} of {same.size} equal")
    return found


@functools.cache  # a property of the device, the compiler and the kernels: measured once a process
def flushes(dtype: torch.dtype, device: str = "cuda") -> bool:
    """Whether :func:`~reflora.backends.triton.qlora_linear` on ``device`` flushes subnormals for
    activations of ``dtype`` (:func:`probe` finds a difference)."""
    return bool(probe(dtype, device))
