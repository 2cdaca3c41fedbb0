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
  whose ``Params4bit`` holds the suite's state byte for byte (:func:`reflora.backends.bitsandbytes.to_bnb`),
  with ``compute_dtype`` and ``lora_A``/``lora_B`` in the activations' dtype (the state's may differ, as
  a model loaded in one dtype and trained with ``bnb_4bit_compute_dtype`` another).

PEFT computes what it computes; the adapter hands it the suite's operands in the smallest faithful way:

* **Weights.** A and B are copied into ``lora_A``/``lora_B`` (``init_lora_weights=False``; PEFT's own
  initialisation is not under test).
* **Scaling.** The protocol passes the scaling, not alpha and rsLoRA, so the adapter picks a config from
  which PEFT computes that scaling itself (:func:`lora_alpha`): ``lora_alpha = scaling * r`` (PEFT's
  ``alpha / r``) for a rank that is a power of two, where both steps are exact, and ``use_rslora`` with
  ``lora_alpha = scaling * sqrt(r)`` (PEFT's ``alpha / sqrt(r)``) for any other rank, so that both of
  PEFT's formulas run. The layer's ``scaling[adapter]`` is then what PEFT computed, never overwritten; it
  must lie within 2 ulp of the requested scaling (two float64 roundings: ``alpha = scaling * q``, then
  ``alpha / q``), or the op raises.
* **Dropout.** PEFT draws its mask inside ``nn.Dropout``. The suite gives an explicit mask (0 or
  1/(1-p), already rounded to the dtype). Without one the config has ``lora_dropout = 0`` and PEFT's own
  ``nn.Identity`` stays. With one, the config has ``lora_dropout = 0.5``; the module PEFT built for it must
  be ``nn.Dropout(p=0.5)`` (or the op raises), and it is replaced by :class:`MaskDropout`, which returns
  ``x * mask``: what ``nn.Dropout`` computes in training for the mask it drew. PEFT applies it where it
  applies dropout, to the LoRA branch's input only.

PEFT builds lora_A and lora_B from the layer's own shapes, and ``copy_`` broadcasts, so a misfit A, B, bias
or mask could never reach it: the adapter rejects those it builds in (``check_built``). x and grad_y go
to PEFT's layer unchecked: their misfits are for PEFT and torch to reject.

The dialect is bitsandbytes' ("bnb-cpu" on the CPU) because QLoRA's base weight goes through bnb's 4-bit
layer; the LoRA ops involve no quantization and are held to the same error bounds as any backend.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reflora import bounds
from reflora.backends._tensors import (
    check_built,
    import_error,
    library_errors,
    to_numpy,
    torch_arithmetic,
    view,
)
from reflora.backends.bitsandbytes import BitsandbytesBackend, to_bnb
from reflora.backends.protocol import BaseBackend
from reflora.state import QuantState

__all__ = ["MaskDropout", "PeftBackend", "lora_alpha"]

_ADAPTER = "default"
_P = 0.5  # lora_dropout when the suite gives a mask (PEFT then builds nn.Dropout, which the mask replaces)


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


def lora_alpha(r: int, scaling: float) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) from which PEFT computes ``scaling`` for rank r: ``scaling * r`` and PEFT's
    ``alpha / r`` for a power of two (exact), else ``scaling * sqrt(r)`` and rsLoRA's ``alpha / sqrt(r)``."""
    if r & (r - 1) == 0:
        return scaling * r, False
    return scaling * math.sqrt(r), True


def _layer(cls, base, r: int, scaling: float, mask=None, fan_in_fan_out: bool = False):
    """PEFT's LoRA layer ``cls`` around ``base``, built as LoraModel builds it from a config."""
    from peft import LoraConfig

    alpha, rslora = lora_alpha(r, float(scaling))
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0 if mask is None else _P,
                        fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)  # fmt: skip
    return cls(base, _ADAPTER, config, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
               use_rslora=rslora, fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)  # fmt: skip


def _adapt(layer, A, B, scaling: float, mask) -> None:
    """Copy A and B into PEFT's layer, check the scaling PEFT computed and the dropout module it built,
    and put the explicit mask in its place (module docstring)."""
    import torch

    with torch.no_grad():
        layer.lora_A[_ADAPTER].weight.copy_(view(A))
        layer.lora_B[_ADAPTER].weight.copy_(view(B))
    s, got = float(scaling), layer.scaling[_ADAPTER]
    if not abs(got - s) <= 2 * math.ulp(s):
        alpha, r, rslora = layer.lora_alpha[_ADAPTER], layer.r[_ADAPTER], layer.use_rslora[_ADAPTER]
        raise RuntimeError(
            f"PEFT's scaling is {got!r} for lora_alpha {alpha!r}, r {r}, use_rslora {rslora}; expected "
            f"{s!r} within 2 ulp"
        )
    drop = layer.lora_dropout[_ADAPTER]
    want = torch.nn.Identity if mask is None else torch.nn.Dropout
    if type(drop) is not want or (mask is not None and drop.p != _P):
        raise RuntimeError(
            f"PEFT built {drop!r} as the adapter's dropout for lora_dropout = {0.0 if mask is None else _P}; "
            f"expected {want.__name__}" + ("" if mask is None else f"(p={_P})")
        )
    if mask is not None:
        layer.lora_dropout[_ADAPTER] = MaskDropout(view(mask))


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


def _run(layer, x, grad_y=None):
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

    def dialect_options(self) -> dict:
        """bitsandbytes' (its 4-bit base is bnb's)."""
        return BitsandbytesBackend().dialect_options()

    def deviation_condition(self, name: str, inputs: Any) -> bool:
        """bitsandbytes' conditions (its 4-bit base is bnb's): ``avx512_misindexed``,
        ``state_dtype_skipped``."""
        return BitsandbytesBackend().deviation_condition(name, inputs)

    def arithmetic(self, op: str, dtype: str) -> bounds.Arithmetic:
        """The protocol's default, with ``flush_to_zero`` for bfloat16 where torch's bfloat16 matmul
        flushes subnormals (``_tensors.bf16_matmul_flushes``): PEFT's layers multiply through torch."""
        return torch_arithmetic(super().arithmetic(op, dtype), dtype)

    def supports(self, op: str, dtype: str) -> bool | str:
        if op in ("quantize_4bit", "dequantize_4bit"):
            return "PEFT does not quantize; its 4-bit layer takes bitsandbytes' states"
        return super().supports(op, dtype)

    def _lora_layer(self, x, W, A, B, scaling, bias=None, mask=None):
        from peft.tuners.lora import Linear

        check_built(*_weight_shape(W), A, B, bias, mask, x)
        layer = _layer(Linear, _linear_base(W, bias), A.shape[0], scaling, mask)
        layer.to(view(W).dtype)
        _adapt(layer, A, B, scaling, mask)
        return layer

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        with library_errors("PEFT"):
            return _run(self._lora_layer(x, W, A, B, scaling, bias, dropout_mask), x)

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        with library_errors("PEFT"):
            return _run(self._lora_layer(x, W, A, B, scaling, None, dropout_mask), x, grad_y)

    def lora_merge(self, W, A, B, scaling, *, fan_in_fan_out=False):
        import torch
        from peft.tuners.lora import Linear

        out_f, in_f = _weight_shape(W.T if fan_in_fan_out else W)
        check_built(out_f, in_f, A, B)
        with library_errors("PEFT"):
            if fan_in_fan_out:
                from transformers.pytorch_utils import Conv1D

                base = Conv1D(out_f, in_f).to(view(W).dtype)  # weight (in, out), as GPT-2 stores it
                with torch.no_grad():
                    base.weight.copy_(view(W))
                    base.bias.zero_()
                base.requires_grad_(False)
            else:
                base = _linear_base(W, None)
            layer = _layer(Linear, base, A.shape[0], scaling, None, fan_in_fan_out)
            layer.to(view(W).dtype)
            _adapt(layer, A, B, scaling, None)
            layer.merge()
            return to_numpy(layer.get_base_layer().weight)

    def _qlora_layer(self, x, state: QuantState, A, B, scaling, bias, mask):
        import bitsandbytes as bnb
        import torch
        from peft.tuners.lora.bnb import Linear4bit

        if not isinstance(state, QuantState):
            raise TypeError(f"state must be a reflora.QuantState, got {type(state).__name__}")
        # bnb.nn.Linear4bit is built (in, out) from the state's 2-D shape: the adapter needs one
        out_f, in_f = _weight_shape(np.broadcast_to(np.zeros((), np.uint8), state.shape))
        check_built(out_f, in_f, A, B, bias, mask, x)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        packed, qs = to_bnb(state, device)
        act = view(A).dtype  # the activations' (x, A, B share it); the state may be of another dtype
        base = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=act,
                                 compress_statistics=state.double_quant, quant_type=state.quant_type,
                                 device=device)  # fmt: skip
        base.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=qs, blocksize=state.blocksize, module=base,
            compress_statistics=state.double_quant, quant_type=state.quant_type, bnb_quantized=True
        )  # fmt: skip
        if bias is not None:
            base.bias = torch.nn.Parameter(view(bias).clone(), requires_grad=False)
        layer = _layer(Linear4bit, base, A.shape[0], scaling, mask)
        layer.lora_A.to(act)
        layer.lora_B.to(act)
        _adapt(layer, A, B, scaling, mask)
        return layer

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        with library_errors("PEFT"):
            return _run(self._qlora_layer(x, state, A, B, scaling, bias, dropout_mask), x)

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        # bitsandbytes' one-byte-weight backward bug reaches PEFT too: declared, not declined.
        with library_errors("PEFT"):
            return _run(self._qlora_layer(x, state, A, B, scaling, None, dropout_mask), x, grad_y)


def _weight_shape(W) -> tuple[int, int]:
    """(out, in) of the 2-D weight the adapter builds a layer from; ValueError for another rank."""
    if np.ndim(W) != 2:
        raise ValueError(f"the base weight must be 2-D (out, in), got shape {np.shape(W)}")
    return np.shape(W)
