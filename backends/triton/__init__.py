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
``TOLERANCE``); the BOUND class's arithmetic is declared by the conformance backend
(:meth:`.backend.TritonBackend.arithmetic`, in :mod:`reflora.bounds` terms).
"""

# Nothing is imported until a name is asked for (PEP 562): importing this package, e.g. to load the
# ``triton`` conformance backend (:mod:`.backend`) for ``reflora backends``, must not import Triton,
# because Triton chooses between the CPU interpreter and CUDA (TRITON_INTERPRET) when its kernels are
# first decorated, and a command that wants the interpreter has to set the variable before that.
_EXPORTS = {
    "launch_counts": "_common",
    "reset_launch_counts": "_common",
    "dequantize": "dequant",
    "GEMV_MAX_M": "gemv",
    "nf4_gemv": "gemv",
    "lowrank_matmul": "lowrank",
    "nf4_gemm": "gemm",
    "LinearConfig": "qlora",
    "nf4_matmul": "qlora",
    "qlora_linear": "qlora",
}

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


def __getattr__(name: str):
    import importlib

    module = _EXPORTS.get("dequantize" if name == "dequantize_nf4" else name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(
        importlib.import_module(f"{__name__}.{module}"), "dequantize" if name == "dequantize_nf4" else name
    )
    globals()[name] = value
    return value
