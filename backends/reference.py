"""The oracle as a backend: reflora's numpy reference, held to its own suite (it must pass 100%).

It computes LoRA in float64 from the exactly upcast inputs and returns float64, so its declared
arithmetic is float64 throughout; quantization is the canonical dialect "reflora".
"""

from __future__ import annotations

from reflora import lora, nf4, qlora
from reflora.backends.protocol import BaseBackend
from reflora.bounds import REFERENCE, Arithmetic

__all__ = ["ReferenceBackend"]


class ReferenceBackend(BaseBackend):
    name = "reference"
    dialect = "reflora"

    def arithmetic(self, op: str, dtype: str) -> Arithmetic:
        # merge rounds its float64 result once to W's dtype; everything else returns float64
        if op == "lora_merge":
            return Arithmetic(operand=dtype, accumulate="float64", intermediate="float64", output=dtype)
        return REFERENCE

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        return nf4.quantize(x, blocksize, quant_type=quant_type, double_quant=double_quant)

    def dequantize_4bit(self, state, *, dtype=None):
        return nf4.dequantize(state, dtype)

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        return lora.backward(grad_y, x, W, A, B, scaling, dropout_mask=dropout_mask)

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        return qlora.forward(x, state, A, B, scaling, bias=bias, dropout_mask=dropout_mask)

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        return qlora.backward(grad_y, x, state, A, B, scaling, dropout_mask=dropout_mask)

    def lora_merge(self, W, A, B, scaling, *, fan_in_fan_out=False):
        return lora.merge(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
