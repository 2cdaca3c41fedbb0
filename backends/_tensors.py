"""numpy <-> torch at the boundary of the third-party adapters, without copying away a layout.

The suite hands a backend numpy arrays that are often views (transposed, strided, both). An adapter that
made them contiguous first would hide exactly the bugs the suite looks for (bitsandbytes' 4-bit ops were
wrong on non-contiguous input for 18 months), so :func:`view` gives torch the same memory with the same
strides. torch is imported inside the functions: a module importing this one stays importable, and
listable by ``reflora backends``, where torch is missing.

Two rules every adapter keeps at the same boundary:

* A library's NotImplementedError is the library's failure, not a decline. The suite counts a
  NotImplementedError as "the backend does not support this" (the protocol's way to decline), and torch's
  dispatcher raises one (``NotImplementedError: Could not run 'X' with arguments from the 'CPU' backend``)
  when a kernel is missing for a dtype: unconverted, a library without its bfloat16 kernel would pass.
  :func:`library_errors` turns it into a RuntimeError naming the library; an adapter raises
  NotImplementedError only for its own deliberate declines, outside that context.
* An adapter checks only what it builds itself (:func:`check_built`: the A, B, bias and mask it copies
  into layers or multiplies in its own code, where torch's ``copy_`` and broadcasting would accept a misfit).
  x and grad_y go to the library as they are, so its own checks (or their absence) are what the suite sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import numpy as np

from reflora.dtypes import as_dtype, dtype_name

__all__ = [
    "bf16_matmul_flushes",
    "check_built",
    "cpu_host",
    "import_error",
    "library_errors",
    "quiet_logging",
    "to_numpy",
    "torch_arithmetic",
    "torch_dtype",
    "view",
]


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


@functools.cache  # a property of the machine and the torch build: asked once a process
def bf16_matmul_flushes(device: str = "cpu") -> bool:
    """Whether torch's bfloat16 matmul on ``device`` reads subnormal operands as zero or flushes subnormal
    results to zero: measured on two 128 x 128 x 128 products, one of subnormal operands (2**-130 times
    one) and one of normal operands whose exact result is subnormal (2**-70 times 2**-70, summed).

    On x86 CPUs with AVX512_BF16, torch 2.13 sends bfloat16 matmuls of all but the smallest shapes to
    oneDNN's ``vdpbf16ps`` kernels, and that instruction treats subnormal inputs and outputs as zero
    whatever the MXCSR says (measured on an AMD EPYC: 64 x 65 x 1 and larger flush, 4 x 4 x 4 does not;
    float32 and float16 do not flush). Elsewhere (AVX2) the same products keep their subnormals. A
    backend that multiplies through torch declares ``flush_to_zero`` for bfloat16 where this is True:
    its results may lie a subnormal away from the oracle's, which ``reflora.bounds`` then allows.
    """
    import torch

    tiny = torch.full((128, 128), 2.0**-130, dtype=torch.bfloat16, device=device)  # subnormal in bf16
    one = torch.ones((128, 128), dtype=torch.bfloat16, device=device)
    small = torch.full((128, 128), 2.0**-70, dtype=torch.bfloat16, device=device)  # normal; 128 * 2**-140
    return bool((tiny @ one == 0).any() or (small @ small == 0).any())  # is a subnormal 2**-133


def cpu_host(avx512_bf16: bool | None = None) -> Any:
    """This machine's facts for the dialects that model torch-based libraries on the CPU: a
    :class:`reflora.dialects.torch_cpu.Host` with torch's SIMD width (capability "AVX512": 16 floats,
    else 8), its intra-op threads, and whether the CPU has AVX512_BF16 (``avx512_bf16``, default torch's
    answer; the bitsandbytes adapter passes its library's own)."""
    import torch

    from reflora.dialects.torch_cpu import Host

    if avx512_bf16 is None:
        avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return Host(lanes=16 if avx512 else 8, threads=torch.get_num_threads(), avx512_bf16=avx512_bf16)


def torch_arithmetic(arith: Any, dtype: str, device: str = "cpu") -> Any:
    """``arith`` (a :class:`reflora.bounds.Arithmetic`) with ``flush_to_zero`` set for a bfloat16 op on a
    device whose bfloat16 matmul flushes (:func:`bf16_matmul_flushes`): what a backend that computes
    through torch's matmuls declares."""
    if dtype == "bfloat16" and bf16_matmul_flushes(device):
        return dataclasses.replace(arith, flush_to_zero=True)
    return arith


@contextlib.contextmanager
def library_errors(library: str):
    """Run a library's code; a NotImplementedError it raises comes out as a RuntimeError naming ``library``
    (module docstring), chained to the original."""
    try:
        yield
    except NotImplementedError as exc:
        raise RuntimeError(
            f"{library} raised {type(exc).__name__}: {exc} (the library's error: a failure, not a decline)"
        ) from exc


def check_built(out: int, n_in: int, A, B, bias=None, mask=None, x=None) -> None:
    """ValueError unless the operands an adapter builds into its layers fit a weight (out, in): A (r, in),
    B (out, r), bias (out,), and a dropout mask of x's shape (the adapter multiplies x by it). x's own
    width and grad_y are the library's to check."""
    a_shape, b_shape = np.shape(A), np.shape(B)
    r = a_shape[0] if len(a_shape) == 2 else 0
    if r < 1 or a_shape != (r, n_in) or b_shape != (out, r):
        raise ValueError(f"A {a_shape} and B {b_shape} do not fit a weight ({out}, {n_in}): A must be "
                         f"(r, {n_in}) and B ({out}, r), r >= 1")  # fmt: skip
    if bias is not None and np.shape(bias) != (out,):
        raise ValueError(f"bias has shape {np.shape(bias)}, expected ({out},)")
    if mask is not None and np.shape(mask) != np.shape(x):
        raise ValueError(f"dropout_mask has shape {np.shape(mask)}, expected x's shape {np.shape(x)}")


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
