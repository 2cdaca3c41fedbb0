"""reflora.backends.triton: fused NF4 and QLoRA Triton kernels.

Public functions (torch tensors in and out; a backend class converts to and from numpy):

* :func:`dequantize_nf4` -- 4-bit state -> dense tensor, bit-identical to :func:`reflora.nf4.dequantize`
  (NF4 and FP4, plain or double-quantized). Kernel ``dequant``.
* :func:`nf4_matmul` -- ``x @ dequantize(W)^T (+ bias)``, differentiable in x and bias. Kernels
  ``nf4_gemm`` (or ``nf4_gemv`` for at most 4 rows).
* :func:`qlora_linear` -- ``x W^T + scaling ((x*mask) A^T) B^T + bias``, differentiable in x, A, B,
  bias; the low-rank term fused into the GEMM's output tile. Kernels ``lowrank`` + ``nf4_gemm``.
* :func:`nf4_gemm`, :func:`nf4_gemv`, :func:`lowrank_matmul` -- the launchers, for direct use.
* :func:`launch_counts` / :func:`reset_launch_counts` -- the launch registry: kernel name -> number
  of launches, the proof of which implementation served a call.

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before this package
is imported). Each kernel module names its reference function and tolerance class (``REFERENCE``,
``TOLERANCE``); the BOUND class's arithmetic is declared in :mod:`._bounds`.
"""

from reflora.backends.triton._common import launch_counts, reset_launch_counts
from reflora.backends.triton.dequant import dequantize
from reflora.backends.triton.gemv import GEMV_MAX_M, nf4_gemv
from reflora.backends.triton.lowrank import lowrank_matmul
from reflora.backends.triton.nf4_gemm import nf4_gemm
from reflora.backends.triton.qlora import LinearConfig, nf4_matmul, qlora_linear

dequantize_nf4 = dequantize

__all__ = [
    "GEMV_MAX_M",
    "LinearConfig",
    "dequantize",
    "dequantize_nf4",
    "launch_counts",
    "lowrank_matmul",
    "nf4_gemm",
    "nf4_gemv",
    "nf4_matmul",
    "qlora_linear",
    "reset_launch_counts",
]
