"""numpy <-> torch at the boundary of the third-party adapters, without copying away a layout.

The suite hands a backend numpy arrays that are often views (transposed, strided, both). An adapter that
made them contiguous first would hide exactly the bugs the suite looks for (bitsandbytes' 4-bit ops were
wrong on non-contiguous input for 18 months), so :func:`view` gives torch the same memory with the same
strides. torch is imported inside the functions: a module importing this one stays importable, and
listable by ``reflora backends``, where torch is missing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from reflora.dtypes import as_dtype, dtype_name

__all__ = ["import_error", "quiet_logging", "to_numpy", "torch_dtype", "view"]


def import_error(*modules: str) -> str | None:
    """None when every module imports, else a reason naming the first that does not."""
    import importlib

    for name in modules:
        try:
            with quiet_logging():
                importlib.import_module(name)
        except Exception as exc:  # any failure to import makes the backend unavailable, with its reason
            return f"cannot import {name}: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def quiet_logging():
    """Silence log records of level WARNING and below while third-party libraries import or load: torchao
    0.18 logs one per optional CUDA extension it cannot load on a CPU machine, torch one per deprecated
    pytree registration, transformers a report of checkpoint keys a model does not use (the pooler the
    demo drops on purpose). None bears on what reflora computes; errors still raise."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def torch_dtype(dtype: Any):
    """The torch dtype of a numpy dtype (ml_dtypes bfloat16 included) or its name."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        dtype_name(as_dtype(dtype))
    ]


def view(a: np.ndarray, device: Any = None):
    """A torch tensor over ``a``'s memory with ``a``'s shape and strides (bfloat16 through its bits).

    a: any numpy array of float32/float16/bfloat16/uint8/int8 with non-negative strides. On a device
    other than the CPU the tensor is copied there with the same strides (``torch.Tensor.to`` keeps a
    dense non-contiguous layout; a strided view is rebuilt with ``as_strided`` over a copied base).
    Returns a tensor; the caller must not write to it (the memory is the suite's).
    """
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    if device is None or torch.device(device).type == "cpu":
        return t
    base = np.lib.stride_tricks.as_strided(a, shape=(_span(a),), strides=(a.itemsize,)) if a.size else a
    b = view(np.array(base), None).to(device)
    # a's first element is the first it addresses (strides are non-negative): offset 0 in the copy
    return b.as_strided(a.shape, [s // a.itemsize for s in a.strides], 0)


def _span(a: np.ndarray) -> int:
    """Elements from a's first to its last addressed element, inclusive (non-negative strides)."""
    return 1 + sum((d - 1) * s for d, s in zip(a.shape, a.strides, strict=True)) // a.itemsize


def to_numpy(t) -> np.ndarray:
    """A numpy copy of a torch tensor: float32/float16 as they are, bfloat16 as ml_dtypes.bfloat16."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(as_dtype("bfloat16")).copy()
    return t.numpy().copy()
