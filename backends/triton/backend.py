"""The Triton kernels as a conformance backend ("triton", dialect "reflora"): dequantize and QLoRA.

Ops and the kernels that serve them (:mod:`reflora.backends.triton`):

* ``dequantize_4bit``: :func:`~reflora.backends.triton.dequantize` (kernel ``dequant``), bit-exact.
* ``qlora_forward`` / ``qlora_backward``: :func:`~reflora.backends.triton.qlora_linear` and torch autograd
  through its ``autograd.Function`` (kernels ``lowrank`` and ``nf4_gemm`` / ``nf4_gemv``; from
  ``gemm.DEQUANT_FIRST_MIN_M`` rows also ``dequant`` before each ``nf4_gemm``, same W bits).
* ``quantize_4bit``, ``lora_forward``, ``lora_backward``, ``lora_merge``: unsupported (no kernel: the
  kernels quantize nothing and take the base weight only as a 4-bit state).

Where it runs: CUDA, or the CPU under Triton's interpreter. Triton decides which when a kernel is first
decorated, so ``TRITON_INTERPRET=1`` must be in the environment before anything in the process imports
the kernels (bitsandbytes imports Triton too): :meth:`TritonBackend.available` says so when it is not
set and there is no GPU, and :func:`use_interpreter` sets it for a command that can call it early enough.
Importing this module imports neither torch nor Triton.

Arithmetic (:meth:`TritonBackend.arithmetic`, the input of the suite's error bounds, reflora/bounds.py):
operands in the activation dtype (the dequantized W is rounded to the state's dtype and then to it,
exactly ``reflora.nf4.dequantize(state).astype(dtype)``: ``_common.base_operand``), products and sums
in float32, the rank-r intermediates
(t = (x*mask) Aᵀ, u = grad_y B) kept in float32, the low-rank term and the bias added to the float32
output tile, one rounding to the output dtype (``fused=True``: one accumulator, one output rounding).
On a GPU tensor cores may truncate when they align and add (``acc_slack=2``); the interpreter runs
IEEE float32 dots (``acc_slack=1``). Whether subnormals are flushed (``flush_to_zero``) is measured on
the GPU through the kernels, once a process and dtype (:mod:`reflora.backends.triton.subnormals`); the
interpreter keeps them.

Under the interpreter every program runs as numpy on one core, so examples above
:data:`INTERPRETER_MAX_WORK` multiply-adds are declined (NotImplementedError, which the suite counts and
lists) to keep the ci profile within its time budget; on a GPU nothing is declined.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from reflora.backends._tensors import to_numpy, view
from reflora.backends.protocol import BaseBackend
from reflora.bounds import Arithmetic
from reflora.lora import check_shapes
from reflora.state import QuantState

__all__ = ["INTERPRETER_MAX_WORK", "MIN_TRITON", "TritonBackend", "triton_version_problem", "use_interpreter"]

INTERPRETER_MAX_WORK = 1 << 20
"""Largest rows·in·(out + r) of a QLoRA example the interpreter runs (about 2 s a call on one core)."""

_NO_KERNEL = {
    "quantize_4bit": "the Triton kernels do not quantize (they consume reflora/bitsandbytes 4-bit states)",
    "lora_forward": "the Triton kernels take the base weight as a 4-bit state only (see qlora_forward)",
    "lora_backward": "the Triton kernels take the base weight as a 4-bit state only (see qlora_backward)",
    "lora_merge": "the Triton kernels have no merge",
}


def use_interpreter() -> bool:
    """Choose Triton's CPU interpreter for this process when there is no CUDA device: sets
    ``TRITON_INTERPRET=1`` unless it is set already. Returns whether the interpreter will be used.
    Must run before anything imports Triton (call it first thing in a command)."""
    if "TRITON_INTERPRET" not in os.environ:
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        if not gpu:
            os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET") == "1"


MIN_TRITON = (3, 4)
"""Oldest Triton the kernels run on: 3.2 has no ``tl.gather``, and 3.3's compiler fails an assertion
lowering the dequantize kernel's gather (measured: the sm_90 compile check). 3.4 to 3.9 pass it."""


def triton_version_problem(version: str) -> str | None:
    """Why Triton ``version`` cannot run the kernels, or None when it can."""
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None  # a development build with an unusual version string: let it try
    if found >= MIN_TRITON:
        return None
    need = ".".join(map(str, MIN_TRITON))
    return (
        f"Triton {version} is too old for reflora's kernels, which need Triton >= {need} (3.2 has no "
        f"tl.gather; 3.3's compiler fails on it): pip install 'triton>={need}' (it must match your torch)"
    )


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device() -> str:
    return "cpu" if _interpret() else "cuda"


def _flushes(dtype: str) -> bool:
    """Whether the kernels flush subnormals for activations of ``dtype`` on the GPU, measured once a
    process (:func:`reflora.backends.triton.subnormals.flushes`). Under the interpreter, whose numpy
    arithmetic keeps them (the probe finds nothing there: tests/test_triton_backend.py), not measured."""
    if _interpret():
        return False
    import torch

    from reflora.backends.triton import subnormals

    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if torch_dtype not in subnormals.CASES:  # not an activation dtype: Arithmetic's own check says so
        return False
    return subnormals.flushes(torch_dtype, _device())


class TritonBackend(BaseBackend):
    """reflora's fused NF4 / QLoRA Triton kernels, on CUDA or under ``TRITON_INTERPRET=1`` on the CPU."""

    name = "triton"
    dialect = "reflora"

    def available(self) -> bool | str:
        try:
            import torch
            import triton
        except ImportError as exc:
            return f"cannot import {exc.name}: {exc}"
        problem = triton_version_problem(triton.__version__)
        if problem:
            return problem
        if not _interpret() and not torch.cuda.is_available():
            return (
                "no CUDA device and TRITON_INTERPRET is not 1: set TRITON_INTERPRET=1 in the environment "
                "before anything imports Triton (e.g. `TRITON_INTERPRET=1 reflora conform --backend triton`)"
            )
        from reflora.backends.triton import _common

        if _common.INTERPRET != _interpret():
            return (
                f"the kernels were imported with TRITON_INTERPRET={'1' if _common.INTERPRET else '0'} and it "
                "is now different; Triton's choice is fixed at import: set it before anything imports Triton"
            )
        return True

    def supports(self, op: str, dtype: str) -> bool | str:
        return _NO_KERNEL.get(op) or super().supports(op, dtype)

    def arithmetic(self, op: str, dtype: str) -> Arithmetic:
        slack = 1.0 if _interpret() else 2.0
        return Arithmetic(operand=dtype, accumulate="float32", intermediate="float32", output=dtype,
                          acc_slack=slack, fused=True, flush_to_zero=_flushes(dtype))  # fmt: skip

    def dequantize_4bit(self, state, *, dtype=None):
        from reflora.backends.torch.quant_state import TorchQuantState
        from reflora.backends.triton import dequantize

        return to_numpy(dequantize(TorchQuantState.from_state(state, _device()), dtype))

    def _qlora(self, x, state, A, B, scaling, bias, mask, grad_y=None) -> Any:
        import torch

        from reflora.backends.torch.quant_state import TorchQuantState
        from reflora.backends.triton import qlora_linear

        if not isinstance(state, QuantState) or len(state.shape) != 2:
            raise ValueError("state must be a 2-D reflora.QuantState (out, in)")
        check_shapes(x, np.broadcast_to(np.zeros((), state.dtype), state.shape), A, B, bias, mask, grad_y)
        out_f, in_f = state.shape
        rows = int(np.prod(np.shape(x)[:-1]))
        work = rows * in_f * (out_f + A.shape[0])
        if _interpret() and work > INTERPRETER_MAX_WORK:
            raise NotImplementedError(
                f"under the Triton interpreter examples are capped at {INTERPRETER_MAX_WORK} multiply-adds "
                f"(this one: {rows} rows x {in_f} in x ({out_f} out + r {A.shape[0]}) = {work})"
            )
        dev = _device()
        ts = TorchQuantState.from_state(state, dev)
        grad = grad_y is not None
        xt = view(x, dev).detach().requires_grad_(grad)
        At = view(A, dev).detach().requires_grad_(grad)
        Bt = view(B, dev).detach().requires_grad_(grad)
        bt = None if bias is None else view(bias, dev)
        mt = None if mask is None else view(mask, dev)
        with torch.enable_grad() if grad else torch.no_grad():
            y = qlora_linear(xt, ts, At, Bt, float(scaling), bias=bt, dropout_mask=mt)
            if not grad:
                return to_numpy(y)
            grads = torch.autograd.grad(y, (xt, At, Bt), view(grad_y, dev))
        return tuple(to_numpy(g) for g in grads)

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        return self._qlora(x, state, A, B, scaling, bias, dropout_mask)

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        return self._qlora(x, state, A, B, scaling, None, dropout_mask, grad_y)
