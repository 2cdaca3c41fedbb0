"""PEFT as a conformance backend: LoRA through PEFT's own LoRA layers, QLoRA through its bitsandbytes
4-bit layer.

Every op builds the layer a PEFT model would hold and runs PEFT's code on it:

* lora_forward / lora_backward: ``peft.tuners.lora.Linear`` around a ``torch.nn.Linear`` holding W (and the
  bias), forward (``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``) and torch autograd through it.
* lora_merge: the same layer's ``merge()`` (``get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) *
  scaling``, in float32 on the CPU for 16-bit weights, added to the base weight in place). With
  ``fan_in_fan_out`` the base layer is transformers' GPT-2 ``Conv1D``, whose weight is stored (in, out),
  the case the flag exists for.
* qlora_forward / qlora_backward: ``peft.tuners.lora.bnb.Linear4bit`` around a ``bitsandbytes.nn.Linear4bit``
  whose ``Params4bit`` holds the suite's state byte for byte (:func:`reflora.backends.bitsandbytes.to_bnb`).

Three things are set from outside the layer, each the smallest faithful way to hand PEFT the suite's
operands:

* **Weights.** A and B are copied into ``lora_A``/``lora_B`` (``init_lora_weights=False``; PEFT's own
  initialisation is not under test).
* **Scaling.** PEFT stores the scaling per adapter in ``layer.scaling[adapter]`` and computes it once, as
  ``lora_alpha / r`` or, with ``use_rslora``, ``lora_alpha / sqrt(r)``. The suite hands over the scaling
  itself (alpha and rsLoRA are not arguments of the protocol), so the layer is built with
  ``lora_alpha = scaling * r`` and the stored value is then set to ``scaling`` exactly (``alpha / r`` of
  that alpha may differ from it in the last bit). That PEFT's own ``use_rslora`` computes ``alpha /
  sqrt(r)`` is checked separately in tests/test_backends_thirdparty.py.
* **Dropout.** PEFT draws its mask inside ``nn.Dropout``. The suite gives an explicit mask (0 or
  1/(1-p), already rounded to the dtype), so the layer's dropout module (``layer.lora_dropout[adapter]``)
  is replaced by :class:`MaskDropout`, which returns ``x * mask``: what ``nn.Dropout`` computes in training
  for the mask it drew. PEFT applies it where it applies dropout, to the LoRA branch's input only.

PEFT builds lora_A and lora_B from the layer's own shapes, so a misfit A or B could never reach it; the
adapter rejects the suite's misfit operands (reflora.lora.check_shapes) before copying them in.

The dialect is bitsandbytes' ("bnb-cpu" on the CPU) because QLoRA's base weight goes through bnb's 4-bit
layer; the LoRA ops involve no quantization and are held to the same error bounds as any backend.
"""

from __future__ import annotations

import numpy as np

from reflora.backends._tensors import import_error, to_numpy, view
from reflora.backends.bitsandbytes import BitsandbytesBackend, to_bnb
from reflora.backends.protocol import BaseBackend
from reflora.lora import check_shapes
from reflora.state import QuantState

__all__ = ["MaskDropout", "PeftBackend"]

_ADAPTER = "default"


def MaskDropout(mask):
    """An ``nn.Module`` that multiplies its input by ``mask`` (a torch tensor broadcastable to it)."""
    import torch

    class _MaskDropout(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.register_buffer("mask", m, persistent=False)

        def forward(self, x):
            return x * self.mask

    return _MaskDropout(mask)


def _config(r: int, scaling: float, fan_in_fan_out: bool = False):
    from peft import LoraConfig

    # lora_dropout > 0 makes PEFT create a dropout module for the adapter, which is then replaced
    return LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=0.5, fan_in_fan_out=fan_in_fan_out,
                      init_lora_weights=False)  # fmt: skip


def _layer(cls, base, r: int, scaling: float, fan_in_fan_out: bool = False):
    """PEFT's LoRA layer ``cls`` around ``base``, built as LoraModel builds it from a config."""
    config = _config(r, scaling, fan_in_fan_out)
    return cls(base, _ADAPTER, config, r=r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
               fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)  # fmt: skip


def _adapt(layer, A, B, scaling: float, mask) -> None:
    """Put A, B, the exact scaling and the explicit dropout mask into PEFT's layer (module docstring)."""
    import torch

    with torch.no_grad():
        layer.lora_A[_ADAPTER].weight.copy_(view(A))
        layer.lora_B[_ADAPTER].weight.copy_(view(B))
    layer.scaling[_ADAPTER] = float(scaling)
    layer.lora_dropout[_ADAPTER] = torch.nn.Identity() if mask is None else MaskDropout(view(mask))


def _linear_base(W, bias):
    """``torch.nn.Linear`` holding W (out, in) and the bias, frozen; dtype that of W."""
    import torch

    out_f, in_f = W.shape
    base = torch.nn.Linear(in_f, out_f, bias=bias is not None, dtype=view(W).dtype)
    with torch.no_grad():
        base.weight.copy_(view(W))
        if bias is not None:
            base.bias.copy_(view(bias))
    base.requires_grad_(False)
    return base


def _run(layer, x, dtype, grad_y=None):
    """The layer's forward on x, or with grad_y (grad_x, grad_A, grad_B) by autograd; numpy out."""
    import torch

    layer.train()
    xt = view(x).detach().requires_grad_(grad_y is not None)
    A, B = layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
    with torch.enable_grad() if grad_y is not None else torch.no_grad():
        y = layer(xt)
        if grad_y is None:
            return to_numpy(y)
        grads = torch.autograd.grad(y, (xt, A, B), view(grad_y))
    return tuple(to_numpy(g) for g in grads)


class PeftBackend(BaseBackend):
    """PEFT 0.21: ``peft.tuners.lora.Linear`` over ``torch.nn.Linear`` (and transformers' ``Conv1D`` for
    fan_in_fan_out merges), ``peft.tuners.lora.bnb.Linear4bit`` over ``bitsandbytes.nn.Linear4bit``."""

    name = "peft"
    deviations = "deviations/peft.toml"

    @property
    def dialect(self) -> str:
        return BitsandbytesBackend().dialect

    def available(self) -> bool | str:
        return import_error("torch", "peft", "bitsandbytes", "transformers") or True

    def supports(self, op: str, dtype: str) -> bool | str:
        if op in ("quantize_4bit", "dequantize_4bit"):
            return "PEFT does not quantize; its 4-bit layer takes bitsandbytes' states"
        return super().supports(op, dtype)

    def _lora_layer(self, W, A, B, scaling, bias=None, mask=None):
        from peft.tuners.lora import Linear

        layer = _layer(Linear, _linear_base(W, bias), A.shape[0], scaling)
        layer.to(view(W).dtype)
        _adapt(layer, A, B, scaling, mask)
        return layer

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        check_shapes(x, W, A, B, bias, dropout_mask)
        return _run(self._lora_layer(W, A, B, scaling, bias, dropout_mask), x, W.dtype)

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        check_shapes(x, W, A, B, None, dropout_mask, grad_y)
        return _run(self._lora_layer(W, A, B, scaling, None, dropout_mask), x, W.dtype, grad_y)

    def lora_merge(self, W, A, B, scaling, *, fan_in_fan_out=False):
        import torch
        from peft.tuners.lora import Linear

        r = A.shape[0]
        out_f, in_f = B.shape[0], A.shape[1]
        if A.shape[0] != B.shape[1] or W.shape != ((in_f, out_f) if fan_in_fan_out else (out_f, in_f)):
            raise ValueError(
                f"W {W.shape}, A {A.shape}, B {B.shape} do not fit (fan_in_fan_out={fan_in_fan_out})"
            )
        if fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            base = Conv1D(out_f, in_f).to(view(W).dtype)  # weight (in, out), as GPT-2 stores it
            with torch.no_grad():
                base.weight.copy_(view(W))
                base.bias.zero_()
            base.requires_grad_(False)
        else:
            base = _linear_base(W, None)
        layer = _layer(Linear, base, r, scaling, fan_in_fan_out)
        layer.to(view(W).dtype)
        _adapt(layer, A, B, scaling, None)
        layer.merge()
        return to_numpy(layer.get_base_layer().weight)

    def _qlora_layer(self, state: QuantState, A, B, scaling, bias, mask):
        import bitsandbytes as bnb
        import torch
        from peft.tuners.lora.bnb import Linear4bit

        if not isinstance(state, QuantState) or len(state.shape) != 2:
            raise ValueError("state must be a 2-D reflora.QuantState (out, in)")
        out_f, in_f = state.shape
        device = "cuda" if torch.cuda.is_available() else "cpu"
        packed, qs = to_bnb(state, device)
        base = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=qs.dtype,
                                 compress_statistics=state.double_quant, quant_type=state.quant_type,
                                 device=device)  # fmt: skip
        base.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=qs, blocksize=state.blocksize, module=base,
            compress_statistics=state.double_quant, quant_type=state.quant_type, bnb_quantized=True
        )  # fmt: skip
        if bias is not None:
            base.bias = torch.nn.Parameter(view(bias).clone(), requires_grad=False)
        r = A.shape[0]
        layer = _layer(Linear4bit, base, r, scaling)
        layer.lora_A.to(qs.dtype)
        layer.lora_B.to(qs.dtype)
        _adapt(layer, A, B, scaling, mask)
        return layer

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        _check_qlora(x, state, A, B, bias, dropout_mask)
        return _run(self._qlora_layer(state, A, B, scaling, bias, dropout_mask), x, state.dtype)

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        _check_qlora(x, state, A, B, None, dropout_mask, grad_y)
        # bitsandbytes' one-byte-weight backward bug reaches PEFT too: declared, not declined.
        return _run(self._qlora_layer(state, A, B, scaling, None, dropout_mask), x, state.dtype, grad_y)


def _check_qlora(x, state, A, B, bias, mask, grad_y=None) -> None:
    if not isinstance(state, QuantState) or len(state.shape) != 2:
        raise ValueError("state must be a 2-D reflora.QuantState (out, in)")
    check_shapes(x, np.broadcast_to(np.zeros((), state.dtype), state.shape), A, B, bias, mask, grad_y)
