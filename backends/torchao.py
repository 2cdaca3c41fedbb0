"""torchao's NF4Tensor as a conformance backend, held to the "torchao" dialect bit for bit
(reflora/dialects/torchao_nf4.py, docs/dialects.md).

``quantize_4bit`` calls ``to_nf4(x, blocksize, 256)`` on a tensor over the suite's memory (strides kept) and
returns torchao's own fields as a :class:`reflora.dialects.torchao_nf4.TorchaoNF4State`, which the suite
compares field by field with the dialect's (no conversion to reflora's QuantState can lose anything,
because none is made). ``dequantize_4bit`` rebuilds an ``NF4Tensor`` from those fields and calls
``get_original_weight()``.

What torchao does not do is refused, not emulated:

* FP4, or single (not double) quantization: ``quantize_4bit`` raises ValueError (torchao always
  double-quantizes, with its own linear int8 scalers), as the dialect does, so the suite's check that a
  backend rejects what its dialect rejects applies.
* torchao's shape rules (at most 2-D, numel a multiple of blocksize and of 256 blocks) are torchao's own
  ``assert`` statements; the AssertionError they raise is the rejection (under ``python -O`` torchao checks
  nothing, and the suite would report what it then returns).
* A plain :class:`reflora.QuantState` to dequantize: its float32 block scales cannot be written as torchao's
  int8 scalers with a factor and a mean, so no NF4Tensor holds it. The example is declined
  (NotImplementedError); the suite hands a torchao-dialect backend the dialect's own states instead, so
  torchao's dequantization is checked on those and on its own states (round trip).
* LoRA and QLoRA: torchao's NF4Tensor has a linear, but the suite's QLoRA base is a canonical state, which
  an NF4Tensor cannot hold (above); unsupported, with that reason.
"""

from __future__ import annotations

import numpy as np

from reflora.backends._tensors import import_error, to_numpy, torch_dtype, view
from reflora.backends.protocol import BaseBackend
from reflora.dialects.torchao_nf4 import TorchaoNF4State
from reflora.state import QuantState

__all__ = ["TorchaoBackend"]

_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
_NO_LORA = "torchao has no LoRA layers"
_NO_QLORA = (
    "the suite's QLoRA base is a canonical state; an NF4Tensor holds only torchao's int8-scaler states"
)
_REASONS = {"lora_forward": _NO_LORA, "lora_backward": _NO_LORA, "lora_merge": _NO_LORA,
            "qlora_forward": _NO_QLORA, "qlora_backward": _NO_QLORA}  # fmt: skip


def _nf4():
    import importlib

    return importlib.import_module(_MODULE)


class TorchaoBackend(BaseBackend):
    """torchao 0.18: ``to_nf4`` and ``NF4Tensor.get_original_weight`` on the CPU."""

    name = "torchao"
    dialect = "torchao"
    deviations = "deviations/torchao.toml"

    def available(self) -> bool | str:
        return import_error("torch", _MODULE) or True

    def supports(self, op: str, dtype: str) -> bool | str:
        return _REASONS.get(op) or super().supports(op, dtype)

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        if quant_type != "nf4":
            raise ValueError(f"torchao's NF4Tensor has no {quant_type!r}")
        if not double_quant:
            raise ValueError("torchao always double-quantizes the block scales")
        t = _nf4().to_nf4(view(x), blocksize, 256)
        mean = to_numpy(t.scaler_mean).reshape(())
        return TorchaoNF4State(
            quantized_data=to_numpy(t.quantized_data),
            quantized_scalers=to_numpy(t.quantized_scalers),
            quantization_factor=to_numpy(t.quantization_factor),
            scaler_mean=mean,
            nf4=to_numpy(t.nf4),
            shape=tuple(t.shape),
            dtype=np.asarray(x).dtype,
            block_size=int(t.block_size),
            scaler_block_size=int(t.scaler_block_size),
        )

    def dequantize_4bit(self, state, *, dtype=None):
        if isinstance(state, QuantState):
            raise NotImplementedError(
                "torchao's NF4Tensor cannot hold a reflora.QuantState's float32 block scales (it stores "
                "int8 scalers, a factor per 256 blocks and a mean); its dequantization is checked on its "
                "own states"
            )
        if not isinstance(state, TorchaoNF4State):
            raise TypeError(f"expected a TorchaoNF4State, got {type(state).__name__}")
        import torch

        m = _nf4()
        shape = torch.Size(state.shape)
        strides = tuple(int(np.prod(state.shape[i + 1 :])) for i in range(len(state.shape)))
        meta = m.SubclassTensorArgs(shape, strides, 0, torch_dtype(state.dtype), torch.device("cpu"), False)
        t = m.NF4Tensor(
            meta,
            state.block_size,
            int(np.prod(state.shape)) // state.block_size,
            state.scaler_block_size,
            view(np.array(state.quantized_scalers)),
            view(np.array(state.quantization_factor)),
            view(np.array(state.scaler_mean)),
            view(np.array(state.quantized_data)),
            nf4=view(np.array(state.nf4)),
        )
        out = t.get_original_weight()
        return to_numpy(out if dtype is None else out.to(torch_dtype(dtype)))
