"""reflora: the correctness oracle for LoRA and QLoRA.

A readable numpy reference of NF4/FP4 4-bit quantization, double quantization and LoRA/QLoRA math,
stating every rule that other implementations leave implicit. Importing reflora never imports torch.

Modules: :mod:`reflora.nf4` (quantize / dequantize), :mod:`reflora.double_quant`,
:mod:`reflora.codebooks`, :mod:`reflora.lora`, :mod:`reflora.qlora`, :mod:`reflora.bounds` (error
bounds), :mod:`reflora.formats` (bitsandbytes / PEFT / safetensors files).
"""

from reflora import bounds, codebooks, double_quant, lora, nf4, qlora
from reflora.state import NestedState, QuantState

__version__ = "0.1.0"

__all__ = [
    "NestedState",
    "QuantState",
    "__version__",
    "bounds",
    "codebooks",
    "double_quant",
    "lora",
    "nf4",
    "qlora",
]
