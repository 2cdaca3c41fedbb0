"""The Backend protocol: the public contract a LoRA/QLoRA implementation fulfils to be held to the oracle.

Arrays cross the boundary as numpy (``ml_dtypes.bfloat16`` for bf16); a backend converts to its own
device and dtype inside each op and back before returning. Shapes follow reflora's notation: x (..., in),
W (out, in), A (r, in), B (out, r), y (..., out).

A backend is any object with these attributes and methods (no base class is needed; :class:`BaseBackend`
supplies the optional parts):

``name``       the name it is registered under.
``dialect``    the quantization semantics it claims, a name from :func:`reflora.dialects.names`
               ("reflora" is the canonical oracle; "bnb-cpu", "bnb-cuda", "torchao" model real libraries).
               The suite holds the backend exactly to that dialect.
``supports(op, dtype)``  True, or a string saying why the op is not supported for that dtype.
``quantize_4bit(x, *, blocksize=64, quant_type="nf4", double_quant=False) -> reflora.QuantState``
``dequantize_4bit(state, *, dtype=None) -> ndarray``
``lora_forward(x, W, A, B, scaling, *, bias=None, dropout_mask=None) -> ndarray``
``lora_backward(grad_y, x, W, A, B, scaling, *, dropout_mask=None) -> (grad_x, grad_A, grad_B)``
``qlora_forward(x, state, A, B, scaling, *, bias=None, dropout_mask=None) -> ndarray``
``qlora_backward(grad_y, x, state, A, B, scaling, *, dropout_mask=None) -> (grad_x, grad_A, grad_B)``
``lora_merge(W, A, B, scaling, *, fan_in_fan_out=False) -> ndarray``

Optional: ``arithmetic(op, dtype) -> reflora.bounds.Arithmetic`` declares how the backend rounds (the
suite's error bounds are derived from it; the default is operands and results in ``dtype``, float32
accumulation), ``available() -> True | str``, and ``deviations`` (a path to the backend's file of known
deviations, see :mod:`reflora.conformance.deviations`).

Bad input is part of the contract: a backend must raise (any Exception) for non-finite weights to
quantize, and for operands whose shapes do not fit; accepting them silently is a conformance failure.

``NotImplementedError`` is the one exception that means "declined": the example is counted as not
supported, never as passed or failed. A backend that wraps a library must raise it only for its own
deliberate declines, and keep the library's from reaching the suite as one (torch's dispatcher raises a
NotImplementedError when a kernel is missing for a dtype): :func:`reflora.backends._tensors.library_errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from reflora.bounds import Arithmetic
from reflora.state import QuantState

__all__ = ["DTYPES", "OPS", "Backend", "BaseBackend"]

OPS = (
    "quantize_4bit",
    "dequantize_4bit",
    "lora_forward",
    "lora_backward",
    "qlora_forward",
    "qlora_backward",
    "lora_merge",
)
DTYPES = ("float32", "float16", "bfloat16")


@runtime_checkable
class Backend(Protocol):
    name: str
    dialect: str

    def supports(self, op: str, dtype: str) -> bool | str: ...

    def quantize_4bit(
        self, x: np.ndarray, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False
    ) -> QuantState: ...

    def dequantize_4bit(self, state: QuantState, *, dtype: str | None = None) -> np.ndarray: ...

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None) -> np.ndarray: ...

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None) -> tuple: ...

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None) -> np.ndarray: ...

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None) -> tuple: ...

    def lora_merge(self, W, A, B, scaling, *, fan_in_fan_out=False) -> np.ndarray: ...


class BaseBackend:
    """Defaults for the optional parts of the protocol. Subclasses set ``name`` and ``dialect`` and
    implement the ops they support; an op left out is reported as unsupported, not failed."""

    name: str = ""
    dialect: str = "reflora"
    deviations: Path | None = None

    def available(self) -> bool | str:
        return True

    def supports(self, op: str, dtype: str) -> bool | str:
        if op not in OPS:
            return f"unknown op {op!r}"
        if dtype not in DTYPES:
            return f"unknown dtype {dtype!r}"
        if getattr(type(self), op, None) is getattr(BaseBackend, op, None):
            return f"{self.name} does not implement {op}"
        return True

    def arithmetic(self, op: str, dtype: str) -> Arithmetic:
        """Operands and results in ``dtype``, float32 accumulation and intermediates in ``dtype``."""
        return Arithmetic(operand=dtype, accumulate="float32", intermediate=dtype, output=dtype)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} dialect={self.dialect!r}>"

    # The ops: unsupported until a subclass implements them.
    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        raise NotImplementedError

    def dequantize_4bit(self, state, *, dtype=None):
        raise NotImplementedError

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        raise NotImplementedError

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        raise NotImplementedError

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        raise NotImplementedError

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        raise NotImplementedError

    def lora_merge(self, W, A, B, scaling, *, fan_in_fan_out=False):
        raise NotImplementedError
