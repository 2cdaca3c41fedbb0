"""What the bitsandbytes comparison tests share (tests/test_bnb_agreement.py,
tests/test_dialects_bnb_cpu.py): an exact numpy -> torch copy that keeps 0-d arrays 0-d, the bits of
an array or tensor, and a fixture that runs bnb's torch fallback eagerly. Import it after
``pytest.importorskip("torch")``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reflora.dtypes import DTYPES

BF16 = np.dtype(DTYPES["bfloat16"])


@pytest.fixture(autouse=True, scope="module")
def eager_bnb():
    """Run bnb's torch fallback eagerly: torch.compile would recompile it for every shape (seconds each).
    Autouse in every module that imports it."""
    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = before


def to_torch(x: np.ndarray) -> torch.Tensor:
    x = np.array(x, order="C")  # a C-contiguous copy that keeps 0-d arrays 0-d
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def bits(a) -> np.ndarray:
    """Unsigned-integer bits of a tensor's or array's elements, flattened."""
    if isinstance(a, torch.Tensor):
        a = a.contiguous()
        a = (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).numpy()
    a = np.ascontiguousarray(a).reshape(-1)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])
