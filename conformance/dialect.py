"""The dialect a backend claims, as the suite uses it: the oracle it is held to for quantization.

A dialect module (``reflora.dialects.get(name)``) has ``quantize(x, blocksize, *, quant_type,
double_quant, offset)`` and ``dequantize(state, dtype)``. Most return a :class:`reflora.QuantState`;
a dialect with a representation of its own (torchao's ``TorchaoNF4State``) provides
``to_quant_state()`` on it, whose canonical dequantization is the dialect's bit for bit (while its
scales are >= 0; the dialect's ``dequantize`` is the rule). The suite
accepts either form from a backend: the QuantState form is compared with the dialect's state
converted, the native form field by field.

Machine facts: a dialect that models a library on a CPU takes the facts that change its bits as keyword
arguments (``host=``, a :class:`reflora.dialects.torch_cpu.Host`: SIMD width, threads, AVX512_BF16). A
backend that knows them says so with ``dialect_options() -> dict`` (the bitsandbytes, PEFT and torchao
adapters read them from torch and bitsandbytes); :func:`for_backend` passes them to every function of
the dialect that takes them, so the suite holds the library to its model *on this machine*.

The double-quantization offset: the canonical dialect ("reflora") requires the exactly rounded mean;
any other dialect's offset may sit within :func:`reflora.bounds.offset_bound` of the
exact mean (its own summation order), and the suite then replays that offset through the dialect's
``offset=`` so that every code is still compared exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from reflora import nf4
from reflora.state import QuantState

__all__ = ["CANONICAL", "Dialect", "for_backend", "get"]

CANONICAL = "reflora"
# A dialect's quantize parameter for the double-quantization group size (block scales per group): the
# canonical rules' name, torchao's.
_GROUP_SIZE_NAMES = ("blocksize2", "scaler_block_size")


def _module(name: str) -> Any:
    from reflora import dialects

    return dialects.get(name)


@dataclass(frozen=True)
class Dialect:
    """name: the dialect's name; module: its implementation (a module or an object with the same API);
    options: keyword arguments (machine facts, ``host=``) for each of its functions that takes them."""

    name: str
    module: ModuleType | Any
    options: dict[str, Any] = field(default_factory=dict)

    def _call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` plus the options ``fn`` has parameters for."""
        params = inspect.signature(fn).parameters
        extra = {k: v for k, v in self.options.items() if k in params and k not in kwargs}
        return fn(*args, **kwargs, **extra)

    @property
    def canonical(self) -> bool:
        return self.name == CANONICAL

    def quantize(self, x, blocksize: int, quant_type: str, double_quant: bool, offset=None, blocksize2=None):
        """The dialect's native state for ``x``; raises (ValueError, ...) where the dialect does.
        ``blocksize2``: the double-quantization group size, for a dialect whose quantize takes one (the
        canonical rules' ``blocksize2``, torchao's ``scaler_block_size``); ValueError for another dialect
        (bitsandbytes' groups are 256 block scales)."""
        kwargs = {"quant_type": quant_type, "double_quant": double_quant}
        if offset is not None:
            kwargs["offset"] = offset
        if blocksize2 is not None:
            params = inspect.signature(self.module.quantize).parameters
            name = next((n for n in _GROUP_SIZE_NAMES if n in params), None)
            if name is None:
                raise ValueError(f"dialect {self.name} double-quantizes in groups of 256 block scales only, "
                                 f"not {blocksize2}")  # fmt: skip
            kwargs[name] = blocksize2
        return self._call(self.module.quantize, x, blocksize, **kwargs)

    def as_quant_state(self, native) -> QuantState:
        """A :class:`reflora.QuantState` for a native state (itself if it is one)."""
        return native if isinstance(native, QuantState) else native.to_quant_state()

    def dequantize(self, state, dtype=None) -> np.ndarray:
        """The dialect's dequantization of ``state``: a native state through the dialect, a QuantState
        of a dialect whose native form differs through the canonical rule (which its
        ``to_quant_state`` is defined to match)."""
        if isinstance(state, QuantState) and not self.native_is_quant_state():
            return nf4.dequantize(state, dtype)
        return self._call(self.module.dequantize, state, dtype)

    def native_is_quant_state(self) -> bool:
        """Whether this dialect's own states are QuantStates: False when the module defines a state
        class of its own (one with ``to_quant_state``, as torchao's NF4Tensor form)."""
        return not any(
            isinstance(v, type) and hasattr(v, "to_quant_state") for v in vars(self.module).values()
        )

    def nan_encodings(self, state, dtype=None) -> tuple[int, ...] | str | None:
        """Where the dialect's dequantize of ``state`` writes a NaN, the bit patterns the implementation
        may write instead (a tuple, or "any"), when it declares more than one; None: exactly its own."""
        declared = getattr(self.module, "nan_encodings", None)
        return None if declared is None else self._call(declared, state, dtype)

    def allowed_codes(self, x: np.ndarray, blocksize: int, quant_type: str) -> tuple[np.ndarray, ...] | None:
        """Alternative codes the dialect declares (bnb-cuda's fast-math reciprocal: the codes with the
        reciprocal one ulp down and up), or None when the codes are exactly determined."""
        slack = getattr(self.module, "reciprocal_slack", None)
        if slack is None:
            return None
        return tuple(slack(x, blocksize, quant_type=quant_type))


def get(name: str, options: dict[str, Any] | None = None) -> Dialect:
    """The dialect called ``name`` (with the machine facts ``options``); ValueError if it is unknown."""
    return Dialect(name, _module(name), dict(options or {}))


def for_backend(backend: Any) -> Dialect:
    """The dialect ``backend`` claims, with the machine facts it reports (``dialect_options()``, if any)."""
    options = getattr(backend, "dialect_options", None)
    return get(backend.dialect, options() if options is not None else None)


def offset_of(state: Any) -> tuple[np.ndarray, np.dtype] | None:
    """(offset, its dtype) of a double-quantized state in either form, or None."""
    nested = getattr(state, "nested", None)
    if nested is not None:
        return np.asarray(nested.offset), np.dtype(np.float32)
    mean = getattr(state, "scaler_mean", None)
    if mean is not None:
        return np.asarray(mean), np.asarray(mean).dtype
    return None
