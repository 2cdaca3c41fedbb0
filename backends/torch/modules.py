"""Drop-in LoRA and QLoRA layers for torch models, laid out so that names map onto PEFT's.

A layer at path ``P`` of a model (``encoder.layer.0.attention.self.query``) becomes a wrapper holding

* ``P.base_layer``: the frozen base: the original ``nn.Linear`` (:class:`LoRALinear`), or an
  :class:`NF4Linear` that stores W packed in 4 bits as buffers (:class:`QLoRALinear`);
* ``P.lora_A.weight`` (r, in) and ``P.lora_B.weight`` (out, r): the trainable adapter, which PEFT's
  files call ``base_model.model.P.lora_A.weight`` / ``...lora_B.weight`` (:mod:`.adapters`).

The forward is y = base(x) + scaling·B(A(dropout(x))), dropout on the adapter's input only, scaling =
alpha/r (alpha/√r with rsLoRA), as :mod:`reflora.lora` states it. Computation: :func:`.ops.lora_linear`;
for 4-bit bases the Triton kernels (``reflora.backends.triton.qlora_linear``) on CUDA when they are
installed, else :func:`.ops.qlora_linear`. ``module.last_impl`` records which one served the last call
("torch" or "triton"); ``module.impl`` ("auto", "torch", "triton") chooses.

:func:`apply_lora` wraps the matching ``nn.Linear`` layers of a model in place; :func:`merge_adapter`
folds the adapters back into the weights; :func:`lora_summary` counts parameters and bytes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reflora.backends.torch import ops
from reflora.backends.torch.quant_state import TorchQuantState, numpy_to_torch, torch_dtype, torch_to_numpy
from reflora.checks import check_flag, check_real
from reflora.double_quant import RebuiltScaleWarning

__all__ = [
    "ADAPTER_COMPUTE",
    "LoRAConfig",
    "LoRALinear",
    "LoRASummary",
    "NF4Linear",
    "QLoRALinear",
    "apply_lora",
    "check_adapter_compute",
    "lora_modules",
    "lora_summary",
    "merge_adapter",
]

IMPLS = ("auto", "torch", "triton")


def _triton_qlora():
    """reflora.backends.triton.qlora_linear, or None when the Triton backend cannot be imported."""
    try:
        from reflora.backends.triton import qlora_linear
    except ImportError:
        return None
    return qlora_linear


# ------------------------------------------------------------------------------------- 4-bit base


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight W (out, in) is stored in 4 bits: y = x Ŵᵀ + bias.

    Buffers, named after bitsandbytes' state-dict keys: ``packed`` uint8 ((n+1)//2,); ``quant_map``
    (16,) and ``absmax`` (n_blocks,) when plain, or ``absmax`` uint8 codes, ``nested_absmax`` and
    ``nested_quant_map`` (256,) when double-quantized. The float32 buffers are held as their int32 bit
    patterns, so that ``model.to(torch.bfloat16)`` moves them but can never round them; the offset,
    shape, dtype, blocksize and quant type are plain attributes. ``bias`` is a frozen parameter.

    The state dict carries those attributes too, under ``<layer>._extra_state`` (UTF-8 JSON in a
    uint8 tensor, so ``torch.save`` with ``weights_only`` and safetensors can hold it): the codes
    mean nothing without the double-quant offset. ``load_state_dict`` adopts them, and refuses, before
    touching the layer, a state of another shape or double-quant setting, a buffer of another size
    or dtype, and codes that come without the metadata (as state dicts saved before it was added do).
    """

    _META_FORMAT = 1

    def __init__(self, ts: TorchQuantState, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(ts, TorchQuantState) or len(ts.shape) != 2:
            raise ValueError(
                f"NF4Linear needs a 2-D TorchQuantState (out, in), got {getattr(ts, 'shape', ts)}"
            )
        self.out_features, self.in_features = ts.shape
        self.shape, self.dtype, self.blocksize, self.quant_type = (
            ts.shape,
            ts.dtype,
            ts.blocksize,
            ts.quant_type,
        )
        self.offset, self.blocksize2 = ts.offset, ts.blocksize2
        self.register_buffer("packed", ts.packed.reshape(-1).clone())
        self.register_buffer("quant_map", ts.code.clone().view(torch.int32))
        if ts.double_quant:
            self.register_buffer("absmax", ts.absmax_q.clone())
            self.register_buffer("nested_absmax", ts.absmax2.clone().view(torch.int32))
            self.register_buffer("nested_quant_map", ts.code2.clone().view(torch.int32))
        else:
            self.register_buffer("absmax", ts.absmax.clone().view(torch.int32))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.impl = "auto"
        self.last_impl: str | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, *, quant_type: str = "nf4", double_quant: bool = True
    ) -> NF4Linear:
        """Quantize an ``nn.Linear``'s weight with :func:`.ops.quantize_4bit` (state dtype = the weight's)."""
        ts = ops.quantize_4bit(
            linear.weight.detach(), blocksize, quant_type=quant_type, double_quant=double_quant
        )
        return cls(ts, linear.bias)

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def quant_state(self) -> TorchQuantState:
        """The weight's :class:`TorchQuantState`, viewing this module's buffers (no copy)."""
        f32 = torch.float32
        if self.double_quant:
            return TorchQuantState(
                packed=self.packed, absmax=None, code=self.quant_map.view(f32), shape=self.shape,
                dtype=self.dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                absmax_q=self.absmax, absmax2=self.nested_absmax.view(f32),
                code2=self.nested_quant_map.view(f32), offset=self.offset, blocksize2=self.blocksize2,
            )  # fmt: skip
        return TorchQuantState(
            packed=self.packed, absmax=self.absmax.view(f32), code=self.quant_map.view(f32), shape=self.shape,
            dtype=self.dtype, blocksize=self.blocksize, quant_type=self.quant_type,
        )  # fmt: skip

    def storage_bytes(self) -> int:
        """Bytes of the 4-bit weight as stored: codes, scales and tables (the bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    # -- state dict: the metadata travels with the codes

    def _meta(self) -> dict:
        return {
            "format": self._META_FORMAT, "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."), "blocksize": self.blocksize,
            "quant_type": self.quant_type, "double_quant": self.double_quant, "offset": self.offset,
            "blocksize2": self.blocksize2,
        }  # fmt: skip

    def get_extra_state(self) -> torch.Tensor:
        # json writes a float by repr, which reads back to the same float: the offset is exact.
        return torch.tensor(list(json.dumps(self._meta(), sort_keys=True).encode("utf-8")), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        meta = _decode_meta(state)
        self.shape, self.dtype = tuple(meta["shape"]), torch_dtype(meta["dtype"])
        self.blocksize, self.quant_type = meta["blocksize"], meta["quant_type"]
        self.offset, self.blocksize2 = meta["offset"], meta["blocksize2"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        name = prefix[:-1] or type(self).__name__
        key = prefix + "_extra_state"
        ours = [prefix + n for n in self._buffers if prefix + n in state_dict]
        if key not in state_dict:
            if ours:  # codes without their offset and shape would load as wrong weights
                error_msgs.append(
                    f"{name}: the state dict holds {ours[0]!r} but not {key!r}, the quantization "
                    "metadata (shape, dtype, blocksize, quant type, double-quant offset) the codes need; "
                    "it was not saved by this version's NF4Linear. Rebuild the layer from the original "
                    "weights or a 4-bit checkpoint (load_4bit_checkpoint)"
                )
                return
        else:
            try:
                meta = _decode_meta(state_dict[key])
                problem = self._incompatible(meta, state_dict, prefix)
            except ValueError as e:
                problem = f"{key} is not NF4Linear metadata: {e}"
            lacking = [prefix + n for n in self._buffers if prefix + n not in state_dict]
            if not problem and lacking:
                # codes, scales and tables are one weight: a part would load beside the layer's own rest
                problem = (f"the state dict holds {key!r} but not {', '.join(map(repr, lacking))}: part of "
                           "a 4-bit weight would load beside the rest of this layer's own")  # fmt: skip
            if problem:
                error_msgs.append(f"{name}: {problem}; the layer was left as it was")
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _incompatible(self, meta: dict, state_dict, prefix: str) -> str | None:
        """Why the state ``meta`` describes cannot load into this layer, or None."""
        shape = tuple(meta["shape"])
        if shape != tuple(self.shape):
            return f"the state dict holds a {shape} weight; this layer is {tuple(self.shape)}"
        if meta["double_quant"] != self.double_quant:
            has = "holds" if meta["double_quant"] else "does not hold"
            return f"the state dict {has} a double-quantized weight; this layer is the other kind"
        for n, own in self._buffers.items():
            t = state_dict.get(prefix + n)
            if own is None or not isinstance(t, torch.Tensor):
                continue
            if (t.shape, t.dtype) != (own.shape, own.dtype):
                return (
                    f"{prefix + n} is {t.dtype} {tuple(t.shape)}, this layer's is {own.dtype} "
                    f"{tuple(own.shape)} (blocksize {meta['blocksize']} there, {self.blocksize} here)"
                )
        return None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ (out, in), bit-identical to :func:`reflora.nf4.dequantize` (in ``self.dtype`` by default)."""
        return ops.dequantize_4bit(self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantized_forward(self, self.quant_state, x, None, None, 0.0, self.bias, None)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.quant_type}, blocksize={self.blocksize}{dq}, "
            f"dtype={self.dtype}"
        )


def _decode_meta(state) -> dict:
    """NF4Linear's metadata from its extra-state tensor (UTF-8 JSON); ValueError when it is not that."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise ValueError(f"expected a 1-D uint8 tensor, got {type(state).__name__}")
    try:
        meta = json.loads(bytes(state.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not UTF-8 JSON ({e})") from None
    want = {
        "format": int, "shape": list, "dtype": str, "blocksize": int, "quant_type": str,
        "double_quant": bool, "offset": (float, type(None)), "blocksize2": int,
    }  # fmt: skip
    if not isinstance(meta, dict) or set(meta) != set(want):
        raise ValueError(f"expected the fields {sorted(want)}")
    for k, kind in want.items():
        if not isinstance(meta[k], kind) or (kind is int and isinstance(meta[k], bool)):
            raise ValueError(f"field {k!r} is {meta[k]!r}")
    if meta["format"] != NF4Linear._META_FORMAT:
        raise ValueError(f"format {meta['format']}; this version reads {NF4Linear._META_FORMAT}")
    if meta["double_quant"] != (meta["offset"] is not None):
        raise ValueError("double_quant and offset disagree")
    if meta["dtype"] not in ("float32", "float16", "bfloat16") or meta["quant_type"] not in ("nf4", "fp4"):
        raise ValueError(f"dtype {meta['dtype']!r} / quant_type {meta['quant_type']!r}")
    return meta


def _quantized_forward(owner, ts, x, A, B, scaling, bias, mask) -> torch.Tensor:
    """Run a 4-bit layer through Triton or torch ops per ``owner.impl``; record ``owner.last_impl``."""
    if owner.impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {owner.impl!r}")
    kernel = None
    # auto: the kernels on CUDA, except in float64, which they do not take
    if owner.impl == "triton" or (
        owner.impl == "auto" and x.device.type == "cuda" and ops.compute_dtype(x) != torch.float64
    ):
        kernel = _triton_qlora()
        if kernel is None and owner.impl == "triton":
            raise RuntimeError("impl='triton' but reflora.backends.triton cannot be imported")
    if kernel is None:
        owner.last_impl = "torch"
        if A is None:
            return ops.nf4_linear(x, ts, bias=bias)
        return ops.qlora_linear(x, ts, A, B, scaling, bias=bias, dropout_mask=mask)
    # The kernels take one dtype and know nothing of autocast: settle the compute dtype here, as ops does.
    dt = ops.compute_dtype(x)
    x, A, B, bias, mask = (ops._cast(t, dt) for t in (x, A, B, bias, mask))
    owner.last_impl = "triton"
    with ops.autocast_off(x.device.type):
        if A is None:
            from reflora.backends.triton import nf4_matmul

            return nf4_matmul(x, ts, bias)
        return kernel(x, ts, A, B, scaling, bias, mask)


# ------------------------------------------------------------------------------------- adapters


def _check_rank(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    return int(r)


def _check_alpha(alpha: float) -> int | float:
    """``alpha`` as a Python int or float (a numpy scalar converted, so configs serialise as JSON);
    TypeError for anything but a real number."""
    if isinstance(alpha, np.generic):
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {alpha!r}")
    return alpha


def scaling_for(alpha: float, r: int, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA: PEFT's ``scaling`` (see :func:`reflora.lora.scaling`).
    TypeError for an rslora that is not True or False ("no" is truthy) or an alpha that is not a number."""
    r = _check_rank(r)
    rslora = check_flag("rslora", rslora)
    alpha = check_real("alpha", alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha / math.sqrt(r) if rslora else alpha / r


ADAPTER_COMPUTE = ("compute", "peft")


def check_adapter_compute(value: str) -> str:
    """``value`` if it is one of :data:`ADAPTER_COMPUTE`, else ValueError.

    "compute" (the default): the adapter term is computed in the compute dtype, A and B cast to it, as
    Unsloth's kernels and ours in Triton do; one rounding of the output for the base and the term. "peft":
    as PEFT's layers compute it: x cast to the adapters' dtype (float32 adapters in a bfloat16 model:
    the term in float32), then for a full-precision base the sum formed in the wider dtype and rounded
    once to the output's (``lora.Linear``), for a 4-bit base the term rounded to the output's dtype and
    then added (``Linear4bit``). Bit-identical to PEFT there, at the cost of the term's float32 products
    and, on CUDA, of the fused Triton epilogue (the base runs alone, the term in torch)."""
    if value not in ADAPTER_COMPUTE:
        raise ValueError(f"adapter_compute must be one of {ADAPTER_COMPUTE}, got {value!r}")
    return value


class _AdapterMixin:
    """The adapter every wrapper carries: lora_A (r, in), lora_B (out, r), scaling, dropout."""

    def _init_adapter(
        self, in_f, out_f, r, alpha, *, dropout, rslora, A, B, dtype, device, adapter_compute="compute"
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.adapter_compute = adapter_compute
        self.r, self.lora_alpha, self.use_rslora, self.lora_dropout = (
            _check_rank(r),
            alpha,
            bool(rslora),
            dropout,
        )
        self.scaling = scaling_for(alpha, r, rslora)
        self.lora_A = nn.Linear(in_f, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, out_f, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)
        self.impl = "auto"
        self.last_impl: str | None = None

    @property
    def adapter_compute(self) -> str:
        """The adapter arithmetic, "compute" or "peft" (:func:`check_adapter_compute`); checked when set."""
        return self._adapter_compute

    @adapter_compute.setter
    def adapter_compute(self, value: str) -> None:
        self._adapter_compute = check_adapter_compute(value)

    def _dropout_mask(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Inverted dropout: 0 with probability p, else 1/(1-p), in ``dtype`` (default: the compute
        dtype); None outside training or at p = 0."""
        if not self.training or self.lora_dropout == 0.0:
            return None
        keep = 1.0 - self.lora_dropout
        return torch.empty_like(x, dtype=dtype or ops.compute_dtype(x)).bernoulli_(keep) / keep

    def _peft_adapter_term(self, x: torch.Tensor) -> torch.Tensor:
        """``adapter_compute="peft"``: scaling·B(A(dropout(x))) as PEFT's layers form it, x cast to the
        adapters' dtype first (exact when it widens), by plain torch calls under the caller's autocast."""
        A, B = self.lora_A.weight, self.lora_B.weight
        x = x if x.dtype == A.dtype else x.to(A.dtype)
        mask = self._dropout_mask(x, x.dtype)
        x_d = x if mask is None else x * mask
        return F.linear(F.linear(x_d, A), B) * self.scaling  # (..., in) -> (..., r) -> (..., out)

    def adapter_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return (
            f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout}{rs}"
        )


class LoRALinear(_AdapterMixin, nn.Module):
    """LoRA on a full-precision ``nn.Linear``: y = base(x) + scaling·B(A(dropout(x))).

    base: the layer to adapt (kept as ``base_layer``, frozen). A (r, in), B (out, r): the initial
    adapter (float tensors; copied into ``lora_A.weight`` / ``lora_B.weight`` of ``dtype``).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        *,
        A: torch.Tensor,
        B: torch.Tensor,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        adapter_compute: str = "compute",
    ) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_adapter(
            base.in_features, base.out_features, r, alpha, dropout=dropout, rslora=rslora, A=A, B=B,
            dtype=dtype, device=base.weight.device, adapter_compute=adapter_compute,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_impl = "torch"
        base = self.base_layer
        if self.adapter_compute == "peft":  # PEFT's lora.Linear: the sum in the wider dtype, then rounded
            dt = ops.compute_dtype(x)
            y = F.linear(*(ops._cast(t, dt) for t in (x, base.weight, base.bias)))  # (..., out)
            return (y + self._peft_adapter_term(x)).to(y.dtype)
        return ops.lora_linear(
            x, base.weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
            bias=base.bias, dropout_mask=self._dropout_mask(x),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return self.adapter_repr()


class QLoRALinear(_AdapterMixin, nn.Module):
    """QLoRA: LoRA on a frozen 4-bit base (:class:`NF4Linear`): y = x Ŵᵀ + bias + scaling·B(A(dropout(x))).

    Runs on the Triton kernels for CUDA inputs when they are installed (``impl="auto"``), else on
    :func:`.ops.qlora_linear`; ``last_impl`` says which served the last call.
    """

    def __init__(
        self,
        base: NF4Linear,
        r: int,
        alpha: float,
        *,
        A: torch.Tensor,
        B: torch.Tensor,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        adapter_compute: str = "compute",
    ) -> None:
        super().__init__()
        if not isinstance(base, NF4Linear):
            raise TypeError(f"QLoRALinear wraps an NF4Linear, got {type(base).__name__}")
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_adapter(
            base.in_features, base.out_features, r, alpha, dropout=dropout, rslora=rslora, A=A, B=B,
            dtype=dtype, device=base.packed.device, adapter_compute=adapter_compute,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.adapter_compute == "peft":  # PEFT's Linear4bit: the term rounded to y's dtype, then added
            y = _quantized_forward(self, base.quant_state, x, None, None, 0.0, base.bias, None)
            base.last_impl = self.last_impl
            return y + self._peft_adapter_term(x).to(y.dtype)
        y = _quantized_forward(
            self, base.quant_state, x, self.lora_A.weight, self.lora_B.weight, self.scaling, base.bias,
            self._dropout_mask(x),
        )  # fmt: skip
        base.last_impl = self.last_impl
        return y

    def extra_repr(self) -> str:
        return self.adapter_repr()


# ------------------------------------------------------------------------------------- apply_lora


@dataclass
class LoRAConfig:
    """How :func:`apply_lora` adapted a model; what :func:`.adapters.save_adapter` writes."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    quantize: str | None = None
    double_quant: bool = True
    blocksize: int = 64
    seed: int = 0
    modules: list[str] = field(default_factory=list)
    adapter_compute: str = "compute"


@dataclass(frozen=True)
class LoRASummary:
    """Parameter and byte counts of a model after :func:`apply_lora`.

    trainable_params / total_params: elements; a 4-bit weight counts its logical (out·in) elements.
    trainable_bytes / total_bytes: storage of parameters and buffers as held in memory.
    base_4bit_bytes: the 4-bit weights' codes, scales and tables; base_4bit_params: their elements.
    modules: the paths of the adapted layers.
    """

    trainable_params: int
    total_params: int
    trainable_bytes: int
    total_bytes: int
    base_4bit_params: int
    base_4bit_bytes: int
    modules: tuple[str, ...]

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        mb = 1 / 2**20
        text = (
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
            f"trainable%: {100 * self.trainable_fraction:.4f}\n"
            f"bytes: trainable {self.trainable_bytes * mb:.2f} MiB, total {self.total_bytes * mb:.2f} MiB"
        )
        if self.base_4bit_params:
            bits = 8 * self.base_4bit_bytes / self.base_4bit_params
            text += (
                f" (4-bit weights: {self.base_4bit_params:,} params in {self.base_4bit_bytes * mb:.2f} MiB, "
                f"{bits:.3f} bits/param)"
            )
        return text + f"\nadapted layers: {len(self.modules)}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | QLoRALinear]:
    """The adapted layers of ``model`` by path, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear))}


def lora_summary(model: nn.Module) -> LoRASummary:
    """Count ``model``'s parameters and bytes (:class:`LoRASummary`)."""
    trainable = total = trainable_bytes = total_bytes = q_params = q_bytes = 0
    for p in model.parameters():
        n, b = p.numel(), p.numel() * p.element_size()
        total, total_bytes = total + n, total_bytes + b
        if p.requires_grad:
            trainable, trainable_bytes = trainable + n, trainable_bytes + b
    for buf in model.buffers():
        total_bytes += buf.numel() * buf.element_size()
    for m in model.modules():
        if isinstance(m, NF4Linear):
            q_params += math.prod(m.shape)
            q_bytes += m.storage_bytes()
    return LoRASummary(
        trainable,
        total + q_params,
        trainable_bytes,
        total_bytes,
        q_params,
        q_bytes,
        tuple(lora_modules(model)),
    )


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a string is a regular expression the whole path must match; a list matches a path
    equal to an entry or ending in "." + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear)) and n]


ALL_LINEAR = "all-linear"


def _all_linear(model: nn.Module) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every linear layer but the output embeddings (a
    language-model head), in module order. GPT-2-style ``Conv1D`` layers, which PEFT counts as
    linear, are refused here rather than silently left out."""
    conv = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv:
        raise TypeError(
            f"'all-linear' would include Conv1D layers ({conv[0]!r}, ...), which reflora does not adapt"
        )
    head = _output_embeddings(model)
    return [n for n in _linear_names(model) if model.get_submodule(n) is not head]


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's output embeddings (a language-model head), as transformers names them, or None."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _check_targets(target_modules: Sequence[str] | str, model: nn.Module) -> list[str] | str:
    """``target_modules`` (a regex, or a list of names) after checking its form and that each name,
    or the regex, matches some module of ``model`` (ValueError naming the linear layers otherwise)."""
    if isinstance(target_modules, str):  # the model itself ("" or ".*" matched its empty path) is no target
        if not any(n and _matches(n, target_modules) for n, _ in model.named_modules()):
            raise _no_match_error(target_modules, model)
        return target_modules
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"target_modules must be a regex or a non-empty list of names, got {target_modules!r}"
        )
    for t in targets:
        if not any(_matches(n, [t]) for n, _ in model.named_modules()):
            raise _no_match_error(t, model)
    return targets


def _no_match_error(target: str, model: nn.Module) -> ValueError:
    names = _linear_names(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = f" (e.g. {names[0]!r})" if names else ""
    return ValueError(
        f"target module {target!r} matches no module of this {type(model).__name__}; its Linear layers are "
        f"named {', '.join(leaves) or '(none)'}{example}"
    )


def _init_adapter_weights(in_f: int, out_f: int, r: int, init: str, rng: np.random.Generator):
    """(A, B) as float32 torch tensors drawn by :func:`reflora.lora.init_lora` from ``rng``."""
    from reflora.lora import init_lora

    A, B = init_lora(in_f, out_f, r, rng=rng, method=init, dtype=np.float32)
    return numpy_to_torch(A), numpy_to_torch(B)


def _check_adaptable(name: str, m: nn.Module) -> None:
    """TypeError unless ``m`` is exactly an ``nn.Linear`` or an :class:`NF4Linear` whose forward nothing
    changes: the adapted layer computes from the weight itself, so a subclass's own forward (a
    bitsandbytes ``Linear4bit``, ``nn.MultiheadAttention``'s ``out_proj``) or a hook on the layer would
    be dropped without a word. ValueError for a layer on the meta device (no weights to adapt yet)."""
    if not (type(m) is nn.Linear or isinstance(m, NF4Linear)):
        where = type(m).__module__
        kind = type(m).__name__ if where.startswith("torch.nn") else f"{where}.{type(m).__qualname__}"
        hint = ""
        if type(m).__name__ in ("Linear4bit", "Params4bit") or "bitsandbytes" in where:
            hint = (
                "; for a model loaded with BitsAndBytesConfig(load_in_4bit=True), call "
                "reflora.backends.torch.checkpoint.from_bitsandbytes(model) first, which puts the same "
                "bytes into NF4Linear layers"
            )
        elif isinstance(m, nn.Linear):
            hint = "; a subclass of nn.Linear may compute its own forward, which the adapter would not run"
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise TypeError(
            f"target {name!r} is {article} {kind}; LoRA here adapts nn.Linear and NF4Linear only{hint}"
        )
    if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
        raise TypeError(f"target {name!r} has forward hooks, which the adapted layer would not run")
    if m._backward_hooks or m._backward_pre_hooks:
        raise TypeError(f"target {name!r} has backward hooks, which the adapted layer would not run")
    if any(t.is_meta for t in m.parameters()) or any(t.is_meta for t in m.buffers()):
        raise ValueError(f"target {name!r} is on the meta device: load its weights before apply_lora")


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    target_modules: Sequence[str] | str,
    *,
    dropout: float = 0.0,
    rslora: bool = False,
    quantize: str | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    init: str = "kaiming",
    seed: int = 0,
    adapter_dtype: torch.dtype | None = None,
    adapter_compute: str = "compute",
    verbose: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """Add LoRA adapters to the matching linear layers of ``model``, in place, and freeze the rest.

    r, alpha: rank and LoRA alpha; scaling = alpha/r (alpha/√r with ``rslora``).
    target_modules: PEFT's rule: a list of names, each matching a layer whose path equals it or ends in
        "." + it, or one regular expression the whole path must match. Each name must match at least
        one layer (ValueError naming the layers that exist); every match must be exactly an
        ``nn.Linear`` (not a subclass, which may compute its own forward) or an :class:`NF4Linear`,
        with no forward or backward hooks (TypeError otherwise), and not on the meta device (ValueError).
        ``"all-linear"`` (any case), as in PEFT, is every linear layer but the model's output
        embeddings (``get_output_embeddings()``, an LM head); it is recorded, and saved, as the list
        of their full paths, as PEFT records it.
    dropout: probability of the adapter-input dropout, in [0, 1).
    quantize: None keeps nn.Linear bases in full precision (:class:`LoRALinear`); "nf4" (or "fp4")
        quantizes them (``blocksize``, ``double_quant``) into :class:`QLoRALinear`. Layers that are
        already 4-bit (:class:`NF4Linear`, e.g. from :func:`.checkpoint.load_4bit_checkpoint`) always
        become :class:`QLoRALinear`.
    init: "kaiming" (A ~ U(±1/√in)) or "gaussian" (A ~ N(0, 1/r²)); B = 0 in both
        (:func:`reflora.lora.init_lora`), drawn from ``numpy.random.default_rng(seed)`` layer by layer in
        module order, so a seed fixes the adapter.
    adapter_dtype: dtype of lora_A / lora_B. None (the default) is PEFT's rule, layer by layer: float64
        where the base layer's weight is float64, float32 otherwise (PEFT gives adapters the base
        weight's float dtype, then its default autocast_adapter_dtype raises float16 and bfloat16 to
        float32; a 4-bit base's adapters are float32).
    adapter_compute: "compute" or "peft", the dtype the adapter term is computed in when the adapters'
        dtype is not the compute dtype (:func:`check_adapter_compute`); settable later on each layer's
        ``adapter_compute``. verbose: print the :class:`LoRASummary`.
    progress: a progress bar (tqdm, on stderr) while layers are quantized, which takes about a second a
        layer on a CPU; None shows it when stderr is a terminal and tqdm is installed.

    Returns ``model``, with ``model.reflora_lora`` (:class:`LoRAConfig`) and ``model.reflora_summary``
    (:class:`LoRASummary`) attached. Every parameter that is not an adapter weight is frozen.
    """
    r = _check_rank(r)
    alpha = _check_alpha(alpha)
    scaling_for(alpha, r, rslora)
    check_flag("double_quant", double_quant)
    if adapter_dtype is not None and not (
        isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point
    ):
        raise TypeError(f"adapter_dtype must be None or a floating torch.dtype (torch.float32, "
                        f"torch.bfloat16, ...), got {adapter_dtype!r}")  # fmt: skip
    check_adapter_compute(adapter_compute)
    if quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"quantize must be None, 'nf4' or 'fp4', got {quantize!r}")
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_adapter or load a fresh model first")
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if all_linear:
        targets: list[str] | str = _all_linear(model)
        if not targets:
            raise _no_match_error(target_modules, model)
    else:
        targets = _check_targets(target_modules, model)
    if all_linear:
        chosen = [(n, model.get_submodule(n)) for n in targets]  # exactly these, recorded by full path
    else:
        chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if not chosen:  # nothing to adapt: the model would be frozen whole, with nothing to train
        raise _no_match_error(target_modules if isinstance(target_modules, str) else targets[0], model)
    for n, m in chosen:
        _check_adaptable(n, m)

    # Every replacement is built before the model is touched, so that a layer that cannot be
    # quantized (a NaN weight, say) leaves the model exactly as it was, full-precision weights included.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    rng = np.random.default_rng(seed)
    built: list[tuple[str, nn.Module]] = []
    try:
        bar = progress if quantize is not None else False  # only quantizing takes long enough to show
        for name, m in progress_bar(chosen, "apply_lora: quantizing", bar):
            A, B = _init_adapter_weights(m.in_features, m.out_features, r, init, rng)
            kw = {"A": A, "B": B, "dropout": dropout, "rslora": rslora,
                  "dtype": _adapter_dtype_for(m) if adapter_dtype is None else adapter_dtype,
                  "adapter_compute": adapter_compute}  # fmt: skip
            if isinstance(m, NF4Linear):
                wrapped: nn.Module = QLoRALinear(m, r, alpha, **kw)
            elif quantize is not None:
                base = _quantize_layer(name, m, blocksize, quant_type=quantize, double_quant=double_quant)
                wrapped = QLoRALinear(base, r, alpha, **kw)
            else:
                wrapped = LoRALinear(m, r, alpha, **kw)
            built.append((name, wrapped.train(m.training)))  # eval stays eval: no adapter dropout
    except BaseException:
        for p, flag in flags:  # the wrappers froze the bases they took
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)
    for name, wrapped in built:
        _set_submodule(model, name, wrapped)
    model.reflora_lora = LoRAConfig(
        r, alpha, targets, dropout, bool(rslora), init, quantize, double_quant, blocksize, seed,
        [n for n, _ in chosen], adapter_compute,
    )  # fmt: skip
    model.reflora_summary = lora_summary(model)
    if verbose:
        print(model.reflora_summary)
    return model


def _adapter_dtype_for(m: nn.Module) -> torch.dtype:
    """PEFT's adapter dtype for base layer ``m``: float64 for a float64 weight, float32 otherwise."""
    weight = getattr(m, "weight", None)
    float64 = isinstance(weight, torch.Tensor) and weight.dtype == torch.float64
    return torch.float64 if float64 else torch.float32


def progress_bar(items: Sequence, desc: str, progress: bool | None):
    """``items``, iterated under a tqdm bar on stderr when ``progress`` is True, or None and stderr is
    a terminal and tqdm is installed; as they are otherwise. progress=True without tqdm: ImportError."""
    if progress is None:
        progress = sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None
    if not progress:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ImportError("progress=True needs tqdm (pip install tqdm)") from e
    return tqdm(items, desc=desc, unit="layer", file=sys.stderr)


def _quantize_layer(
    name: str, linear: nn.Linear, blocksize: int, *, quant_type: str, double_quant: bool
) -> NF4Linear:
    """:meth:`NF4Linear.from_linear`, with the layer's path in any error (ValueError or TypeError) and
    in a :class:`reflora.double_quant.RebuiltScaleWarning` (negative, zero or out-of-range scales)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RebuiltScaleWarning)
            q = NF4Linear.from_linear(linear, blocksize, quant_type=quant_type, double_quant=double_quant)
    except (ValueError, TypeError) as e:
        raise type(e)(f"cannot quantize layer {name!r}: {e}") from e
    for w in caught:
        if issubclass(w.category, RebuiltScaleWarning):
            warnings.warn(w.category(f"layer {name!r}: {w.message}"), stacklevel=4)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return q


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# ------------------------------------------------------------------------------------- merging


def _merged_linear(m: LoRALinear) -> nn.Linear:
    """An nn.Linear holding :func:`reflora.lora.merge` of the layer (ΔW in float64, one rounding)."""
    from reflora import lora

    base = m.base_layer
    W = lora.merge(
        torch_to_numpy(base.weight),
        torch_to_numpy(m.lora_A.weight),
        torch_to_numpy(m.lora_B.weight),
        m.scaling,
    )
    out = nn.Linear(m.in_features, m.out_features, bias=base.bias is not None, device=base.weight.device)
    out.to(base.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(numpy_to_torch(W, base.weight.device))
        if base.bias is not None:
            out.bias.copy_(base.bias)
    return out.requires_grad_(False)


def merge_adapter(model: nn.Module, *, force: bool = False) -> dict:
    """Fold every adapter of ``model`` into its base weight, in place, and drop the adapters.

    * :class:`LoRALinear` becomes a plain ``nn.Linear`` with W' = :func:`reflora.lora.merge` (W + ΔW
      formed in float64, rounded once to W's dtype); report None.
    * :class:`QLoRALinear` becomes an :class:`NF4Linear` holding :func:`reflora.qlora.merge`'s new state
      (Ŵ + ΔW requantized with the same blocksize, quant type and double quantization; dtype kept);
      report its :class:`reflora.qlora.MergeReport`.

    A 4-bit merge whose requantization error exceeds ‖ΔW‖ (``report.error_exceeds_delta``) loses more
    than the adapter adds: it warns, and unless ``force`` raises ValueError before changing anything.
    Returns {path: report or None}. The model keeps no adapter afterwards.
    """
    from reflora import qlora

    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    replacements: dict[str, nn.Module] = {}
    reports: dict = {}
    for name, m in layers.items():
        if isinstance(m, LoRALinear):
            replacements[name], reports[name] = _merged_linear(m), None
            continue
        base = m.base_layer
        A, B = torch_to_numpy(m.lora_A.weight), torch_to_numpy(m.lora_B.weight)
        state, report = qlora.merge(base.quant_state.to_state(), A, B, m.scaling)
        new = NF4Linear(TorchQuantState.from_state(state, base.packed.device), base.bias)
        new.impl = base.impl
        replacements[name], reports[name] = new, report
    lossy = {n: r for n, r in reports.items() if r is not None and r.error_exceeds_delta}
    if lossy:
        detail = "; ".join(
            f"{n}: ‖requant error‖ = {r.requant_error_fro:.3g} > ‖ΔW‖ = {r.delta_fro:.3g}"
            for n, r in lossy.items()
        )
        message = (
            f"merging into the 4-bit base loses more than the adapter adds in {len(lossy)} of "
            f"{len(reports)} layers ({detail})"
        )
        warnings.warn(message, stacklevel=2)
        if not force:
            raise ValueError(message + "; nothing was changed. Pass force=True to merge anyway.")
    for name, new in replacements.items():
        _set_submodule(model, name, new.train(layers[name].training))
    for attr in ("reflora_lora", "reflora_summary"):  # they describe adapters that are gone
        if hasattr(model, attr):
            delattr(model, attr)
    return reports
