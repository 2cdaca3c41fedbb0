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

__all__ = ["TorchQuantState", "numpy_to_torch", "torch_dtype", "torch_to_numpy"]

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
