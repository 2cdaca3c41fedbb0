"""A reflora QuantState held as torch tensors on a device, for kernels and modules.

Same fields and meaning as :class:`reflora.QuantState` (see reflora/state.py); only the storage
differs. Conversions in both directions are exact (the bytes are copied, never recomputed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from reflora.dtypes import dtype_name
from reflora.state import NestedState, QuantState

__all__ = [
    "TorchQuantState",
    "check_fields",
    "check_scaling",
    "numpy_to_torch",
    "torch_dtype",
    "torch_to_numpy",
]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(d: np.dtype | str | torch.dtype) -> torch.dtype:
    """The torch dtype for float32 / float16 / bfloat16 given as numpy dtype, name or torch dtype."""
    if isinstance(d, torch.dtype):
        if d not in _TORCH_DTYPES.values():
            raise TypeError(f"expected float32, float16 or bfloat16, got {d}")
        return d
    return _TORCH_DTYPES[d if isinstance(d, str) else dtype_name(np.dtype(d))]


def numpy_to_torch(a: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """An exact copy of a numpy array (bfloat16 from ml_dtypes included) as a torch tensor."""
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(a.copy()).to(device)


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """An exact copy of a torch tensor as numpy (bfloat16 becomes ml_dtypes.bfloat16)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        from reflora.dtypes import DTYPES

        return t.view(torch.uint16).numpy().view(DTYPES["bfloat16"]).copy()
    return t.numpy().copy()


@dataclass(frozen=True, eq=False)
class TorchQuantState:
    """packed uint8 (ceil(n/2),); absmax float32 (n_blocks,) or None; absmax_q uint8 (n_blocks,),
    absmax2 float32 (ceil(n_blocks/256),), code2 float32 (256,), offset float when double-quantized;
    code float32 (16,); shape, dtype (torch), blocksize, quant_type as in QuantState."""

    packed: torch.Tensor
    absmax: torch.Tensor | None
    code: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax_q: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: float | None = None
    blocksize2: int = 256

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_state(cls, state: QuantState, device: torch.device | str | None = None) -> TorchQuantState:
        nested = state.nested
        return cls(
            packed=numpy_to_torch(state.packed, device),
            absmax=None if state.absmax is None else numpy_to_torch(state.absmax, device),
            code=numpy_to_torch(state.code, device),
            shape=state.shape,
            dtype=torch_dtype(state.dtype),
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            absmax_q=None if nested is None else numpy_to_torch(nested.absmax_q, device),
            absmax2=None if nested is None else numpy_to_torch(nested.absmax2, device),
            code2=None if nested is None else numpy_to_torch(nested.code2, device),
            offset=None if nested is None else float(nested.offset),
            blocksize2=256 if nested is None else nested.blocksize2,
        )

    def to_state(self) -> QuantState:
        nested = None
        if self.double_quant:
            nested = NestedState(
                torch_to_numpy(self.absmax_q),
                torch_to_numpy(self.absmax2),
                torch_to_numpy(self.code2),
                np.float32(self.offset),
                self.blocksize2,
            )
        return QuantState(
            packed=torch_to_numpy(self.packed),
            absmax=None if self.absmax is None else torch_to_numpy(self.absmax),
            shape=self.shape,
            dtype=str(self.dtype).removeprefix("torch."),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            code=torch_to_numpy(self.code),
            nested=nested,
        )

    def to(self, device: torch.device | str) -> TorchQuantState:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return TorchQuantState(
            move(self.packed),
            move(self.absmax),
            move(self.code),
            self.shape,
            self.dtype,
            self.blocksize,
            self.quant_type,
            move(self.absmax_q),
            move(self.absmax2),
            move(self.code2),
            self.offset,
            self.blocksize2,
        )


def op_args(ts: TorchQuantState) -> tuple:
    """``ts`` as custom-op arguments (an op takes no dataclass): (tensors, shape, dtype, blocksize,
    quant_type, offset, blocksize2), tensors = [packed, absmax, code, absmax_q, absmax2, code2]."""
    tensors = [ts.packed, ts.absmax, ts.code, ts.absmax_q, ts.absmax2, ts.code2]
    return tensors, list(ts.shape), ts.dtype, ts.blocksize, ts.quant_type, ts.offset, ts.blocksize2


def from_op_args(tensors, shape, dtype, blocksize, quant_type, offset, blocksize2) -> TorchQuantState:
    """The state :func:`op_args` took apart."""
    packed, absmax, code, absmax_q, absmax2, code2 = tensors
    return TorchQuantState(
        packed,
        absmax,
        code,
        tuple(shape),
        dtype,
        blocksize,
        quant_type,
        absmax_q,
        absmax2,
        code2,
        offset,
        blocksize2,
    )


_STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_fields(ts: TorchQuantState) -> None:
    """ValueError naming the field unless ``ts`` is well formed: the dtype one of float32, float16,
    bfloat16; blocksize a power of two in 32..4096 (blocksize2 a positive int, as the oracle's
    :func:`reflora.state.check_blocksize2` takes it); every tensor contiguous,
    1-D, of its dtype and size, on the device of ``packed``; a finite float offset when double-quantized.
    Both the torch ops and the Triton launchers check a state with this before reading it: a malformed
    one (a float64 code table, absmax of shape (n_blocks, 1), blocksize2 = 0) gave wrong values or a
    bare ZeroDivisionError, KeyError or IndexError."""
    if ts.dtype not in _STATE_DTYPES:
        raise ValueError(f"state.dtype must be float32, float16 or bfloat16, got {ts.dtype}")
    b = ts.blocksize
    if isinstance(b, bool) or not isinstance(b, int) or b & (b - 1) or not 32 <= b <= 4096:
        raise ValueError(f"state.blocksize must be a power of two in 32..4096, got {ts.blocksize!r}")
    n = ts.numel
    n_blocks = math.ceil(n / ts.blocksize)
    want = {"packed": (ts.packed, torch.uint8, (n + 1) // 2), "code": (ts.code, torch.float32, 16)}
    if ts.double_quant:
        b2 = ts.blocksize2
        if isinstance(b2, bool) or not isinstance(b2, int) or b2 < 1:
            raise ValueError(f"state.blocksize2 must be a positive int, got {b2!r}")
        # torch.compile hands a layer's offset over as a symbolic float once it recompiles for another
        # layer's, and math.isfinite cannot be traced: its finiteness is checked in eager calls only
        number = isinstance(ts.offset, (int, float))
        if not number or not (torch.compiler.is_compiling() or math.isfinite(ts.offset)):
            raise ValueError(f"state.offset must be a finite float when double-quantized, got {ts.offset!r}")
        want["absmax_q"] = (ts.absmax_q, torch.uint8, n_blocks)
        want["absmax2"] = (ts.absmax2, torch.float32, math.ceil(n_blocks / b2))
        want["code2"] = (ts.code2, torch.float32, 256)
    else:
        want["absmax"] = (ts.absmax, torch.float32, n_blocks)
    for field, (t, dtype, size) in want.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state.{field} is missing")
        if t.dtype != dtype or t.ndim != 1 or t.numel() != size or not t.is_contiguous():
            raise ValueError(
                f"state.{field} must be a contiguous 1-D {dtype} tensor of {size} elements, got "
                f"{t.dtype} shape {tuple(t.shape)} strides {t.stride()}"
            )
        if t.device != ts.packed.device:
            raise ValueError(f"state.{field} is on {t.device}, state.packed on {ts.packed.device}")


def versions(ts: TorchQuantState) -> tuple[int, ...] | None:
    """The version counters of the state's tensors, which every in-place write bumps. Autograd checks
    them for the tensors a Function saves; a layer's state is held outside those, so the forward records
    them and the backward compares (:func:`check_unchanged`). None while torch.compile traces: a
    traced graph has no version counters to read (reading them there broke the trace with an internal
    Dynamo error), so a compiled model goes without this check. None under ``torch.inference_mode()``
    too, or for a state whose tensors were made there: inference tensors have no version counter (reading
    one raised "Inference tensors do not track version counter", failing every 4-bit layer there), and
    no backward can follow."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return None
    fields = [t for t in (ts.packed, ts.absmax, ts.absmax_q, ts.absmax2, ts.code, ts.code2) if t is not None]
    if any(t.is_inference() for t in fields):
        return None
    return tuple(t._version for t in fields)


def check_unchanged(ts: TorchQuantState, recorded: tuple[int, ...] | None) -> None:
    """RuntimeError if a tensor of ``ts`` was written in place since :func:`versions` gave ``recorded``:
    the backward would read another weight than the forward did, and grad_x would be silently wrong.
    Nothing to compare where the forward was compiled (``recorded`` None)."""
    if recorded is None or torch.compiler.is_compiling():
        return
    if versions(ts) != recorded:
        raise RuntimeError(
            "the 4-bit weight's state was modified in place between the forward and the backward, so "
            "grad_x would use another weight than the output did; run the forward again after changing "
            "the weight (autograd refuses the same for any tensor it saved)"
        )


_F32_MAX = float(torch.finfo(torch.float32).max)


def check_scaling(scaling) -> float:
    """``scaling`` as a float for the torch ops and the Triton kernels: the oracle's rule (a finite real
    number, numpy's scalars included; :func:`reflora.lora._check_scaling`), a one-element tensor
    without a gradient included, and finite in float32, the widest dtype either applies it in (1e39
    passed the oracle's rule and turned every output into NaN)."""
    from reflora.lora import _check_scaling

    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1 or scaling.requires_grad:
            raise TypeError("scaling must be a number (a one-element tensor without requires_grad: it is "
                            f"not differentiated), got a tensor of shape {tuple(scaling.shape)}")  # fmt: skip
        scaling = scaling.item()
    if torch.compiler.is_compiling():
        # Traced, it may be a symbolic float (dynamic=True), which math.isfinite cannot take; the
        # modules' scaling was checked when set (alpha and r are).
        return scaling
    s = _check_scaling(scaling)
    if abs(s) > _F32_MAX:
        raise ValueError(f"scaling must be finite in float32, got {s!r}")
    return s
