"""Whether the kernels keep subnormal numbers on this device: measured, for the error bounds.

Reference: :func:`reflora.lora.forward` / :func:`reflora.lora.backward` (float64), on inputs whose every
product and partial sum is exact in float32, so that a kernel that keeps subnormals returns the
oracle's values rounded once to the output dtype, bit for bit. Tolerance class: exact.

Why. :class:`reflora.bounds.Arithmetic` has ``flush_to_zero``: whether subnormal operands may be read as
zero and subnormal results flushed. A backend that flushes but declares that it does not fails the
bfloat16 audit on inputs near the bottom of the range, spuriously; one that declares it without doing
it gets a looser bound than it deserves. Tensor-core dots, Triton's choice of PTX (``.ftz`` or not) and
the GEMV's float32 fused multiply-adds each decide this on their own, so it is measured through the
public op the backend runs (:func:`~reflora.backends.triton.qlora_linear`, forward and backward), at
row counts that take each of its kernels: the GEMV (1 row), the GEMM decoding W in its tiles, and the
GEMM after ``dequant`` (``gemm.DEQUANT_FIRST_MIN_M`` rows), as :func:`reflora.backends._tensors.
bf16_matmul_flushes` measures torch's matmuls.

Two probes, each a 256 x 256 weight, rank 16, scaling 1:

* subnormal operands: x and grad_y hold the dtype's 2**-130 (bfloat16, float32) or 2**-20 (float16),
  W, A and B are 1. Read as zero, they take the products they enter to zero.
* subnormal results: x, grad_y and W hold 2**-70 (normal), so each product x W is 2**-140, subnormal in
  float32; 256 of them sum to 2**-132, which the output (bfloat16 or float32) holds. B is 0 so that the
  low-rank term does not swamp it. Flushed, y and grad_x are 0. Not for float16, whose products of
  normal numbers cannot be subnormal in float32.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from reflora import lora, nf4
from reflora.backends._tensors import to_numpy
from reflora.backends.torch.quant_state import TorchQuantState, numpy_to_torch
from reflora.dtypes import as_dtype

__all__ = ["PROBE_ROWS", "flushes", "probe"]

REFERENCE = "reflora.lora.forward / reflora.lora.backward"
TOLERANCE = "exact"

_SIZE, _RANK = 256, 16


def _rows() -> tuple[int, ...]:
    from reflora.backends.triton.gemm import DEQUANT_FIRST_MIN_M

    return (1, 64, DEQUANT_FIRST_MIN_M)


PROBE_ROWS = _rows()
"""The row counts probed: one for each kernel that computes the layer (GEMV, in-tile GEMM, GEMM after
dequantize)."""

_TINY = {torch.bfloat16: 2.0**-130, torch.float32: 2.0**-130, torch.float16: 2.0**-20}
_NP = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


def _cases(dtype: torch.dtype) -> list[tuple[str, float, float, float]]:
    """(name, value of x and grad_y, value of W, value of B)."""
    cases = [("subnormal operands", _TINY[dtype], 1.0, 1.0)]
    if dtype != torch.float16:
        cases.append(("subnormal results", 2.0**-70, 2.0**-70, 0.0))
    return cases


def probe(dtype: torch.dtype, device: str | torch.device, rows: tuple[int, ...] = PROBE_ROWS) -> list[str]:
    """Where the layer's results differ from the oracle's on the subnormal probes (module docstring):
    one line each, as "subnormal operands, 64 rows: y 0 of 65536 equal". Empty: subnormals are kept.

    ``flush`` in the caller's terms: any difference. Only flushing can make one on these inputs, whose
    every intermediate is exact in float32; a wrong kernel would show in the conformance suite too.
    """
    from reflora.backends.triton import qlora_linear

    if dtype not in _TINY:
        raise ValueError(f"dtype must be one of {sorted(map(str, _TINY))}, not {dtype}")
    np_dtype = as_dtype(_NP[dtype])
    found = []
    for name, xv, wv, bv in _cases(dtype):
        w_np = np.full((_SIZE, _SIZE), wv, dtype=np.float32)
        state = nf4.quantize(w_np.astype(np_dtype), 64)
        ts = TorchQuantState.from_state(state, device)
        w = nf4.dequantize(state, _NP[dtype])  # what the kernels multiply: exactly wv
        a_np = np.ones((_RANK, _SIZE), dtype=np.float32).astype(np_dtype)
        b_np = np.full((_SIZE, _RANK), bv, dtype=np.float32).astype(np_dtype)
        for m in rows:
            x_np = np.full((m, _SIZE), xv, dtype=np.float32).astype(np_dtype)
            x = numpy_to_torch(x_np).to(device).requires_grad_()
            a = numpy_to_torch(a_np).to(device).requires_grad_()
            b = numpy_to_torch(b_np).to(device).requires_grad_()
            y = qlora_linear(x, ts, a, b, 1.0)
            g = torch.autograd.grad(y, (x, a, b), numpy_to_torch(x_np).to(device))
            want_y = lora.forward(x_np, w, a_np, b_np, 1.0)
            want = (want_y, *lora.backward(x_np, x_np, w, a_np, b_np, 1.0))
            for label, got, exact in zip(("y", "grad_x", "grad_A", "grad_B"), (y, *g), want, strict=True):
                same = to_numpy(got.detach()) == exact.astype(np_dtype)
                if not same.all():
                    found.append(f"{name}, {m} rows: {label} {int(same.sum())} of {same.size} equal")
    return found


@functools.cache  # a property of the device, the compiler and the kernels: measured once a process
def flushes(dtype: torch.dtype, device: str = "cuda") -> bool:
    """Whether :func:`~reflora.backends.triton.qlora_linear` on ``device`` flushes subnormals for
    activations of ``dtype`` (:func:`probe` finds a difference)."""
    return bool(probe(dtype, device))
