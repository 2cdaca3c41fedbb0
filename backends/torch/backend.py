"""The torch ops as a conformance backend: :mod:`reflora.backends.torch.ops` held to the oracle.

Registered as ``torch`` (entry point group ``reflora.backends``). Arrays cross the boundary as numpy
(``ml_dtypes.bfloat16`` for bf16); each op copies them exactly onto the device (CUDA when available,
else the CPU), runs the eager torch op, and copies the result back exactly.

Quantization claims the canonical dialect "reflora": :func:`.ops.quantize_4bit` and
:func:`.ops.dequantize_4bit` are byte- and bit-identical to the oracle. The LoRA ops declare, for each
dtype d, ``Arithmetic(operand=d, accumulate="float32", intermediate=d, output=d)``:

* on the CPU, torch's matmuls accumulate float32, float16 and bfloat16 products in float32 and round
  each result once to d; elementwise ops compute in float32 (torch's "opmath") and round once to d;
* on CUDA, cuBLAS may reduce half-precision products in half precision, and may use TF32 for float32
  products, unless told not to. Every op here runs with those allowances switched off for the
  duration of the call (:func:`_full_precision_matmul`), so the same declaration holds;
* on CPUs with AVX512_BF16, torch's bfloat16 matmuls read and write subnormals as zero
  (:func:`reflora.backends._tensors.bf16_matmul_flushes`, measured once a process): there the bfloat16
  declaration adds ``flush_to_zero``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from reflora.backends._tensors import torch_arithmetic
from reflora.backends.protocol import BaseBackend
from reflora.backends.torch import ops
from reflora.backends.torch.quant_state import TorchQuantState, numpy_to_torch, torch_dtype, torch_to_numpy
from reflora.bounds import Arithmetic
from reflora.state import QuantState

__all__ = ["TorchBackend", "TorchInductorBackend", "cpu_compiler"]


def cpu_compiler() -> str | None:
    """The C++ compiler inductor uses for CPU code, found by inductor's own search (on Linux ``$CXX``,
    else ``g++``; a compiler under another name is not looked for), or None: without one
    ``torch.compile``'s inductor cannot compile for the CPU."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


@contextmanager
def _full_precision_matmul(device: torch.device) -> Iterator[None]:
    """cuBLAS without reduced-precision reductions or TF32 while the block runs (a no-op on the CPU).

    These are process-wide switches: they are restored on exit, and a concurrent caller in another
    thread would see them changed meanwhile.
    """
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction, m.allow_tf32)
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    m.allow_tf32 = False
    try:
        yield
    finally:
        (
            m.allow_fp16_reduced_precision_reduction,
            m.allow_bf16_reduced_precision_reduction,
            m.allow_tf32,
        ) = saved


class TorchBackend(BaseBackend):
    """reflora's eager torch ops on ``device`` (default: CUDA when available, else the CPU)."""

    name = "torch"
    dialect = "reflora"

    def __init__(self, device: str | torch.device | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return f"<TorchBackend 'torch' dialect='reflora' device={self.device}>"

    def available(self) -> bool | str:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            return "device cuda was asked for but torch.cuda.is_available() is False"
        return True

    def arithmetic(self, op: str, dtype: str) -> Arithmetic:
        """Operands, intermediates and results in ``dtype``, float32 accumulation (module docstring);
        subnormals may flush in bfloat16 where torch's bfloat16 matmul flushes them."""
        arith = Arithmetic(operand=dtype, accumulate="float32", intermediate=dtype, output=dtype)
        return torch_arithmetic(arith, dtype, self.device.type)

    def _op(self, name: str):
        """The op of :mod:`.ops` called ``name`` (a subclass may wrap it)."""
        return getattr(ops, name)

    # ---- the boundary

    def _t(self, a: np.ndarray | None, *, grad: bool = False) -> torch.Tensor | None:
        if a is None:
            return None
        a = np.asarray(a)
        if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
            raise TypeError(f"expected a float array, got dtype {a.dtype}")
        t = numpy_to_torch(a, self.device)
        return t.requires_grad_(True) if grad else t

    def _state(self, state: QuantState) -> TorchQuantState:
        if not isinstance(state, QuantState):
            raise TypeError(f"state must be a reflora.QuantState, got {type(state).__name__}")
        return TorchQuantState.from_state(state, self.device)

    # ---- quantization

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False) -> QuantState:
        x = np.asarray(x)
        if x.dtype.name not in ("float32", "float16", "bfloat16"):
            raise TypeError(f"reflora quantizes float32, float16 and bfloat16 data, not {x.dtype}")
        ts = ops.quantize_4bit(self._t(x), blocksize, quant_type=quant_type, double_quant=double_quant)
        return ts.to_state()

    def dequantize_4bit(self, state, *, dtype=None) -> np.ndarray:
        out = None if dtype is None else torch_dtype(dtype)
        return torch_to_numpy(self._op("dequantize_4bit")(self._state(state), out))

    # ---- LoRA

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None) -> np.ndarray:
        with torch.no_grad(), _full_precision_matmul(self.device):
            y = self._op("lora_linear")(
                self._t(x), self._t(W), self._t(A), self._t(B), float(scaling),
                bias=self._t(bias), dropout_mask=self._t(dropout_mask),
            )  # fmt: skip
        return torch_to_numpy(y)

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None) -> tuple:
        xt, At, Bt = self._t(x, grad=True), self._t(A, grad=True), self._t(B, grad=True)
        with _full_precision_matmul(self.device):
            y = self._op("lora_linear")(
                xt, self._t(W), At, Bt, float(scaling), dropout_mask=self._t(dropout_mask)
            )
            return self._grads(y, (xt, At, Bt), grad_y)

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None) -> np.ndarray:
        with torch.no_grad(), _full_precision_matmul(self.device):
            y = self._op("qlora_linear")(
                self._t(x), self._state(state), self._t(A), self._t(B), float(scaling),
                bias=self._t(bias), dropout_mask=self._t(dropout_mask),
            )  # fmt: skip
        return torch_to_numpy(y)

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None) -> tuple:
        xt, At, Bt = self._t(x, grad=True), self._t(A, grad=True), self._t(B, grad=True)
        with _full_precision_matmul(self.device):
            y = self._op("qlora_linear")(
                xt, self._state(state), At, Bt, float(scaling), dropout_mask=self._t(dropout_mask)
            )
            return self._grads(y, (xt, At, Bt), grad_y)

    def _grads(self, y: torch.Tensor, inputs: tuple, grad_y) -> tuple:
        """The gradients of ``inputs`` for ``grad_y`` (checked to have y's shape), as numpy arrays."""
        g = self._t(grad_y)
        if g.shape != y.shape:
            raise ValueError(f"grad_y has shape {tuple(g.shape)}, expected {tuple(y.shape)}")
        return tuple(torch_to_numpy(t) for t in torch.autograd.grad(y, inputs, g))

    def lora_merge(self, W, A, B, scaling, *, fan_in_fan_out=False) -> np.ndarray:
        with _full_precision_matmul(self.device):
            merged = self._op("lora_merge")(
                self._t(W), self._t(A), self._t(B), float(scaling), fan_in_fan_out=fan_in_fan_out
            )
        return torch_to_numpy(merged)


class TorchInductorBackend(TorchBackend):
    """The same ops compiled by ``torch.compile`` (inductor, ``dynamic=True``, ``fullgraph=True``): the
    suite then holds the code inductor generates around them to the eager declaration. Dequantization
    claims exactness, as eager; the LoRA ops declare the eager ops' arithmetic (code that rounds less
    often than eager stays within it). Quantization runs eagerly (it reports lost scales on the host).

    Not registered, so ``reflora conform`` does not run it by default (it compiles a graph for each new
    dtype, optional operand and size class: the ci profile took 3 min 2 s on 2 CPU cores, more than the
    six registered backends together): ``reflora conform --backend
    reflora.backends.torch.backend:TorchInductorBackend``. Each compiled op may recompile as often as
    the suite needs (a new dtype, a missing bias, a size-1 dimension), and a hit recompile limit fails
    the call instead of quietly running eager code.
    """

    name = "torch-inductor"

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__(device)
        self._compiled: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"<TorchInductorBackend 'torch-inductor' dialect='reflora' device={self.device}>"

    def available(self) -> bool | str:
        if self.device.type == "cpu" and cpu_compiler() is None:
            return "inductor compiles C++ for the CPU and finds no C++ compiler ($CXX, else g++, on PATH)"
        return super().available()

    def _op(self, name: str):
        import torch._dynamo

        if name not in self._compiled:
            self._compiled[name] = torch.compile(getattr(ops, name), dynamic=True, fullgraph=True)
        compiled = self._compiled[name]

        def call(*args, **kwargs):
            limits = {"recompile_limit": 1_000_000, "accumulated_recompile_limit": 1_000_000}
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, **limits):
                return compiled(*args, **kwargs)

        return call
