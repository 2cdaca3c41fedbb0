"""torchao's NF4Tensor as a conformance backend, held to the "torchao" dialect bit for bit
(reflora/dialects/torchao_nf4.py, docs/dialects.md).

``quantize_4bit`` calls ``to_nf4(x, blocksize, 256)`` on a tensor over the suite's memory (strides kept) and
returns torchao's own fields as a :class:`reflora.dialects.torchao_nf4.TorchaoNF4State` (its dtype is the
NF4Tensor's, not the input's), which the suite compares field by field with the dialect's. The NF4Tensor
torchao returned stays attached to that state, so the round trip dequantizes torchao's own object, not
one the adapter rebuilt. A state without one (the dialect's, in the dequantize tests) is handed to
torchao's constructor with the metadata ``to_nf4`` gives a contiguous tensor of that shape.

``dequantize_4bit`` dequantizes through torchao: ``get_original_weight()``, and for an output dtype
``NF4Tensor.to(dtype)``, the conversion ``linear_nf4`` uses. The two must agree: ``to`` of the state's
own dtype must equal ``get_original_weight()`` bit for bit, or the adapter raises.

What torchao does not do is refused, not emulated:

* FP4, or single (not double) quantization: ``quantize_4bit`` raises ValueError (torchao always
  double-quantizes, with its own linear int8 scalers), as the dialect does, so the suite's check that a
  backend rejects what its dialect rejects applies.
* torchao's shape rules (at most 2-D, numel a multiple of blocksize and of 256 blocks) are torchao's own
  ``assert`` statements; the AssertionError they raise is the rejection (under ``python -O`` torchao checks
  nothing, and the suite would report what it then returns). Its contiguity assert
  (``assert input_tensor.is_contiguous``, without the call) never fires: a non-contiguous view is
  quantized, in logical order, which the suite checks like any other input.
* A plain :class:`reflora.QuantState` to dequantize: its float32 block scales cannot be written as torchao's
  int8 scalers with a factor and a mean, so no NF4Tensor holds it. The example is declined
  (NotImplementedError); the suite hands a torchao-dialect backend the dialect's own states instead, so
  torchao's dequantization is checked on those and on its own states (round trip).
* LoRA (unquantized) and merging: torchao has no LoRA layer; unsupported, with that reason.

QLoRA is torchao's ``linear_nf4`` over the NF4Tensor, the base layer torchtune's ``LoRALinear`` uses for
QLoRA: its autograd Function dequantizes with ``NF4Tensor.to(x.dtype)`` and calls ``F.linear`` forward,
and backward returns ``grad_y @ weight.to(grad_y.dtype)`` for x and nothing for the frozen base. That
is what the QLoRA tests hold to the bounds. torchao has no low-rank layer of its own, so the adapter
adds it as ``LoRALinear`` does, in plain torch: ``y = linear_nf4(x, W) (+ bias) + s * F.linear(F.linear(
x * mask, A), B)``, with grad_A and grad_B from torch's autograd; those lines are reflora's, not
torchao's. The suite hands a torchao-dialect backend its dialect's state of the base (a
TorchaoNF4State): only QLoRA bases torchao can quantize are tested (whole groups of 256 blocks), and a
special case whose base it cannot quantize is reported rejected by the suite. The adapter checks only
what it builds (A, B, bias, mask, for a 2-D state); the state's rank, x and grad_y reach torchao
(torch's autograd checks grad_y's shape against y before linear_nf4's backward runs).
"""

from __future__ import annotations

import numpy as np

from reflora import bounds
from reflora.backends._tensors import (
    check_built,
    cpu_host,
    import_error,
    library_errors,
    to_numpy,
    torch_arithmetic,
    torch_dtype,
    view,
)
from reflora.backends.protocol import BaseBackend
from reflora.dialects.torchao_nf4 import TorchaoNF4State
from reflora.dtypes import as_dtype
from reflora.state import QuantState

__all__ = ["TorchaoBackend"]

_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
_NO_LORA = "torchao has no LoRA layers (its QLoRA base, linear_nf4, is tested under qlora_*)"
_REASONS = {"lora_forward": _NO_LORA, "lora_backward": _NO_LORA, "lora_merge": _NO_LORA}


def _nf4():
    import importlib

    return importlib.import_module(_MODULE)


class TorchaoBackend(BaseBackend):
    """torchao 0.18: ``to_nf4``, ``NF4Tensor.get_original_weight``, ``NF4Tensor.to`` and ``linear_nf4``
    on the CPU."""

    name = "torchao"
    dialect = "torchao"
    deviations = "deviations/torchao.toml"

    def available(self) -> bool | str:
        return import_error("torch", _MODULE) or True

    def supports(self, op: str, dtype: str) -> bool | str:
        return _REASONS.get(op) or super().supports(op, dtype)

    def dialect_options(self) -> dict:
        """The torchao dialect's machine facts (``host=``: the threads and SIMD width of torch's mean)."""
        return {"host": cpu_host()}

    def arithmetic(self, op: str, dtype: str) -> bounds.Arithmetic:
        """The protocol's default, with ``flush_to_zero`` for bfloat16 where torch's bfloat16 matmul
        flushes subnormals (``_tensors.bf16_matmul_flushes``): ``linear_nf4`` multiplies through torch."""
        return torch_arithmetic(super().arithmetic(op, dtype), dtype)

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        if quant_type != "nf4":
            raise ValueError(f"torchao's NF4Tensor has no {quant_type!r}")
        if not double_quant:
            raise ValueError("torchao always double-quantizes the block scales")
        with library_errors("torchao"):
            t = _nf4().to_nf4(view(x), blocksize, 256)
        state = TorchaoNF4State(
            quantized_data=to_numpy(t.quantized_data),
            quantized_scalers=to_numpy(t.quantized_scalers),
            quantization_factor=to_numpy(t.quantization_factor),
            scaler_mean=to_numpy(t.scaler_mean).reshape(()),
            nf4=to_numpy(t.nf4),
            shape=tuple(t.shape),
            dtype=as_dtype(str(t.dtype).removeprefix("torch.")),
            block_size=int(t.block_size),
            scaler_block_size=int(t.scaler_block_size),
        )
        object.__setattr__(state, _HELD, t)  # not a field: the suite compares the fields alone
        return state

    def dequantize_4bit(self, state, *, dtype=None):
        _check_state(state)
        with library_errors("torchao"):
            t = _held(state)
            out = t.get_original_weight()
            if not _same_bits(t.to(t.dtype), out):
                raise RuntimeError(
                    f"torchao's NF4Tensor.to({t.dtype}) differs from its get_original_weight() (the path "
                    "linear_nf4 takes and torchao's dequantization disagree)"
                )
            return to_numpy(out if dtype is None else t.to(torch_dtype(dtype)))

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        return _qlora(x, state, A, B, scaling, bias, dropout_mask)

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        return _qlora(x, state, A, B, scaling, None, dropout_mask, grad_y)


_HELD = "_torchao_nf4tensor"  # the NF4Tensor torchao returned, kept on the state quantize_4bit made


def _check_state(state) -> None:
    if isinstance(state, QuantState):
        raise NotImplementedError(
            "torchao's NF4Tensor cannot hold a reflora.QuantState's float32 block scales (it stores "
            "int8 scalers, a factor per 256 blocks and a mean); it is checked on its own states"
        )
    if not isinstance(state, TorchaoNF4State):
        raise TypeError(f"expected a TorchaoNF4State, got {type(state).__name__}")


def _held(state: TorchaoNF4State):
    """The NF4Tensor torchao made for this state, or one built from its fields."""
    t = getattr(state, _HELD, None)
    return _nf4_tensor(state) if t is None else t


def _qlora(x, state, A, B, scaling, bias, mask, grad_y=None):
    """y = linear_nf4(x, W) (+ bias) + scaling * F.linear(F.linear(x * mask, A), B), torchtune's
    LoRALinear over torchao's NF4Tensor; with grad_y, (grad_x, grad_A, grad_B) by autograd through
    linear_nf4's own backward (module docstring)."""
    import torch
    import torch.nn.functional as F

    _check_state(state)
    if len(state.shape) == 2:  # A, B, bias and the mask are the adapter's to build; the rest is torchao's
        check_built(*state.shape, A, B, bias, mask, x)
    train = grad_y is not None
    with library_errors("torchao"), torch.enable_grad() if train else torch.no_grad():
        xt = view(x).detach().requires_grad_(train)
        At = view(A).detach().clone().requires_grad_(train)
        Bt = view(B).detach().clone().requires_grad_(train)
        y = _nf4().linear_nf4(xt, _held(state))
        if bias is not None:
            y = y + view(bias)
        xd = xt if mask is None else xt * view(mask)
        y = y + F.linear(F.linear(xd, At), Bt) * scaling
        if not train:
            return to_numpy(y)
        return tuple(to_numpy(g) for g in torch.autograd.grad(y, (xt, At, Bt), view(grad_y)))


def _nf4_tensor(state: TorchaoNF4State):
    """torchao's NF4Tensor holding a state's fields, with the metadata ``to_nf4`` records for a contiguous
    input of that shape and dtype (its strides, ``numel // block_size`` blocks, no grad)."""
    import torch

    m = _nf4()
    like = torch.empty(state.shape, dtype=torch_dtype(state.dtype))
    meta = m.SubclassTensorArgs(like.size(), like.stride(), 0, like.dtype, like.device, False)
    return m.NF4Tensor(
        meta,
        state.block_size,
        like.numel() // state.block_size,
        state.scaler_block_size,
        view(np.array(state.quantized_scalers)),
        view(np.array(state.quantization_factor)),
        view(np.array(state.scaler_mean)),
        view(np.array(state.quantized_data)),
        nf4=view(np.array(state.nf4)),
    )


def _same_bits(a, b) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and to_numpy(a).tobytes() == to_numpy(b).tobytes()
