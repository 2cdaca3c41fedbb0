"""bitsandbytes as a conformance backend: its 4-bit quantizer, dequantizer and 4-bit matmul, held to the
dialect that models it bit for bit ("bnb-cpu" on the CPU, "bnb-cuda" on CUDA; docs/dialects.md).

The adapter only converts. Inputs go to ``bitsandbytes.functional`` as torch tensors over the suite's own
memory, strides kept (:func:`reflora.backends._tensors.view`), so a non-contiguous view reaches bnb as a
non-contiguous tensor. bnb's ``QuantState`` maps field for field onto :class:`reflora.QuantState`:

=============================  =========================================================
bnb                            reflora
=============================  =========================================================
packed tensor ((n+1)//2, 1)    ``packed`` (flattened; the bytes are the same)
``absmax`` float32             ``absmax`` (plain)
``absmax`` uint8 (nested)      ``nested.absmax_q``
``state2.absmax`` / ``.code``  ``nested.absmax2`` / ``nested.code2``
``offset`` (0-d float32)       ``nested.offset``
``state2.blocksize``           ``nested.blocksize2``
``code``, ``shape``,           ``code``, ``shape``, ``dtype``, ``blocksize``, ``quant_type``
``dtype``, ``blocksize``,
``quant_type``
=============================  =========================================================

The state goes back to bnb through :func:`to_bnb`, which rebuilds bnb's QuantState from those fields: so
that what the suite dequantizes is what bnb returned, ``quantize_4bit`` checks that the rebuilt state
equals bnb's field by field (tensors' dtypes, shapes and bytes, ``state2`` and the offset included) and
raises if it does not, so no metadata bnb records can be dropped or replaced on the way.

bnb's results are returned as they are: ``dequantize_4bit`` on the CPU returns some shapes differently from
the state's (a 1-D even-length state as (1, n); a state of <= 2 elements transposed), which the bnb-cpu
dialect models (``reflora.dialects.bnb_cpu.output_shape``) and the runner's Findings report. bnb
dequantizes to ``QuantState.dtype``, so an output dtype is asked for by setting it there (its API).

bitsandbytes has no LoRA: lora_forward/backward/merge are unsupported (the ``peft`` backend runs PEFT's
LoRA layers). QLoRA runs the frozen base through ``bitsandbytes.matmul_4bit`` (its training path:
``MatMul4Bit``, dequantize then ``torch.nn.functional.linear``, and ``grad_output @ dequantize(W)`` for
grad_x) and the low-rank term in eager torch, in the input dtype, as PEFT's ``Linear4bit`` does. The
adapter checks only the operands its low-rank term builds on (A, B, bias, mask: ``check_built``); x and
grad_y go to bnb as they are. (bnb's ``matmul_4bit`` takes an x whose width is out_features as the input
of a weight stored (in, out), with a DeprecationWarning; the low-rank term then rejects it.) bnb's own
NotImplementedError (a kernel missing for a dtype) is a failure, not a decline (``library_errors``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from reflora import bounds
from reflora.backends._tensors import (
    check_built,
    cpu_host,
    import_error,
    library_errors,
    to_numpy,
    torch_arithmetic,
    torch_dtype,
    view,
)
from reflora.backends.protocol import BaseBackend
from reflora.dialects import bnb_cpu
from reflora.state import NestedState, QuantState

__all__ = ["BitsandbytesBackend", "check_round_trip", "lora_term", "to_bnb", "to_reflora", "torch_qlora"]

_NO_LORA = "bitsandbytes has no LoRA layers (the peft backend runs PEFT's LoRA over torch.nn.Linear)"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def to_reflora(packed, qs) -> QuantState:
    """A :class:`reflora.QuantState` with the bytes of bnb's (packed, QuantState), field for field."""
    nested = None
    absmax = to_numpy(qs.absmax)
    if qs.nested:
        nested = NestedState(
            absmax_q=absmax,
            absmax2=to_numpy(qs.state2.absmax),
            code2=to_numpy(qs.state2.code),
            offset=np.float32(to_numpy(qs.offset).reshape(())),
            blocksize2=int(qs.state2.blocksize),
        )
        absmax = None
    return QuantState(
        packed=to_numpy(packed).reshape(-1),
        absmax=absmax,
        shape=tuple(qs.shape),
        dtype=str(qs.dtype).removeprefix("torch."),
        blocksize=int(qs.blocksize),
        quant_type=qs.quant_type,
        code=to_numpy(qs.code),
        nested=nested,
    )


def to_bnb(state: QuantState, device: str, dtype: Any = None):
    """(packed ((n+1)//2, 1) uint8, bnb QuantState) holding ``state``'s bytes, built as bnb's
    ``quantize_4bit`` builds it (``state2`` in float32, as ``quantize_blockwise`` records it; checked on
    every state bnb returns by :func:`check_round_trip`); ``dtype`` overrides the state's dtype (bnb
    dequantizes to ``QuantState.dtype``)."""
    import torch
    from bitsandbytes.functional import QuantState as BnbState

    def t(a):
        return torch.from_numpy(np.array(a)).to(device)

    state2, offset = None, None
    if state.nested is not None:
        n = state.nested
        state2 = BnbState(absmax=t(n.absmax2), code=t(n.code2), blocksize=n.blocksize2, dtype=torch.float32)
        offset, absmax = t(np.float32(n.offset)), t(n.absmax_q)
    else:
        absmax = t(state.absmax)
    qs = BnbState(
        absmax=absmax,
        shape=torch.Size(state.shape),
        code=t(state.code),
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=torch_dtype(state.dtype if dtype is None else dtype),
        offset=offset,
        state2=state2,
    )
    return t(state.packed).reshape(-1, 1), qs


def _fields(packed, qs) -> dict[str, Any]:
    """Everything bnb's (packed, QuantState) holds, comparable: tensors as (dtype, shape, device, bytes)."""
    import torch

    def value(v):
        if isinstance(v, torch.Tensor):
            return (str(v.dtype), tuple(v.shape), v.device.type, to_numpy(v).tobytes())
        return v

    out = {"packed": value(packed)}
    for name, v in vars(qs).items():
        if name == "state2" and v is not None:
            out |= {f"state2.{k}": value(w) for k, w in vars(v).items()}
        else:
            out[name] = value(v)
    return out


def check_round_trip(packed, qs, state: QuantState) -> None:
    """RuntimeError unless :func:`to_bnb` of ``state`` (bnb's result as a reflora.QuantState) rebuilds
    bnb's (packed, QuantState) exactly, field by field: what the adapter cannot carry, it must not drop."""
    theirs = _fields(packed, qs)
    rebuilt = _fields(*to_bnb(state, packed.device.type))
    for name in sorted(set(theirs) | set(rebuilt)):
        a, b = theirs.get(name, "(absent)"), rebuilt.get(name, "(absent)")
        if a != b:
            if isinstance(a, tuple) and isinstance(b, tuple) and a[:3] != b[:3]:  # tensors: say dtype, shape
                a, b = a[:3], b[:3]
            elif isinstance(a, tuple) and isinstance(b, tuple):
                a, b = f"{a[:3]} with other bytes", b[:3]
            raise RuntimeError(
                f"bitsandbytes' QuantState.{name} is {a}, but a reflora.QuantState of its fields rebuilds "
                f"{b}: the state does not survive the adapter's conversion"
            )


def lora_term(x, A, B, scaling: float, mask=None):
    """scaling · ((x ⊙ mask) Aᵀ) Bᵀ in eager torch, every intermediate in the input dtype, in PEFT's
    order: ``lora_B(lora_A(dropout(x))) * scaling``. x (..., in), A (r, in), B (out, r)."""
    xd = x if mask is None else x * mask
    return ((xd @ A.T) @ B.T) * scaling  # (..., in) @ (in, r) @ (r, out) -> (..., out)


def torch_qlora(base, x, A, B, scaling, *, bias=None, dropout_mask=None, grad_y=None, device="cpu"):
    """y = base(x, bias) + lora_term(...), or with ``grad_y`` the gradients (grad_x, grad_A, grad_B) by
    autograd. ``base(x_t, bias_t)`` is the library's frozen-base product. Arrays in and out are numpy."""
    import torch

    xt = view(x, device).detach().requires_grad_(grad_y is not None)
    At = view(A, device).detach().requires_grad_(grad_y is not None)
    Bt = view(B, device).detach().requires_grad_(grad_y is not None)
    bt = None if bias is None else view(bias, device)
    mt = None if dropout_mask is None else view(dropout_mask, device)
    with torch.enable_grad() if grad_y is not None else torch.no_grad():
        y = base(xt, bt) + lora_term(xt, At, Bt, scaling, mt)
        if grad_y is None:
            return to_numpy(y)
        gx, gA, gB = torch.autograd.grad(y, (xt, At, Bt), view(grad_y, device))
    return to_numpy(gx), to_numpy(gA), to_numpy(gB)


class BitsandbytesBackend(BaseBackend):
    """bitsandbytes 0.50: ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` and
    ``bitsandbytes.matmul_4bit``, on CUDA when torch sees a GPU, else on the CPU."""

    name = "bitsandbytes"
    deviations = "deviations/bitsandbytes.toml"

    @property
    def dialect(self) -> str:
        try:
            return "bnb-cuda" if _device() == "cuda" else "bnb-cpu"
        except ImportError:
            return "bnb-cpu"

    def available(self) -> bool | str:
        return import_error("torch", "bitsandbytes") or True

    def arithmetic(self, op: str, dtype: str) -> bounds.Arithmetic:
        """The protocol's default; on CUDA a forward without gradients of one row takes bnb's inference
        GEMV (``gemv_4bit``, READ from source; no GPU run yet), declared for every CUDA qlora_forward:

        * it rebuilds a double-quantized absmax in one FMA (docs/dialects.md, bnb-cuda rule 8):
          ``fma_absmax``, so its base weight may lie ``bounds.fma_dequant_error(state)`` from reflora's;
        * for 16-bit activations it forms the weight as T(T(c)·T(â)) (``__hmul2`` of the table value
          and the scale, each rounded to T): three roundings in T where the reference has one after an
          exact float32 product, so |Δ| <= (4·u_T + O(u_T²))·|w|, and a step of T at |w| exceeds
          u_T·|w|: ``dequant_ulps = 5``;
        * the build uses ``--use_fast_math`` (the bnb-cuda dialect's ``ftz``): ``flush_to_zero``.

        Where torch's bfloat16 matmul flushes subnormals (``_tensors.bf16_matmul_flushes``:
        AVX512_BF16 CPUs), bfloat16 ops declare ``flush_to_zero``: the products around bnb's dequantize
        are torch's."""
        arith, dialect = super().arithmetic(op, dtype), self.dialect
        if dialect == "bnb-cpu":
            arith = torch_arithmetic(arith, dtype)
        if op == "qlora_forward" and dialect == "bnb-cuda":
            arith = dataclasses.replace(arith, fma_absmax=True, dequant_ulps=5, flush_to_zero=True)
        return arith

    def dialect_options(self) -> dict[str, Any]:
        """The machine facts of the bnb-cpu dialect (``host=``): torch's SIMD width and threads, and
        whether bnb's library converts to bfloat16 with AVX512_BF16 (its ``has_avx512bf16()``). None (an
        empty dict) on CUDA, whose dialect takes none."""
        if self.dialect != "bnb-cpu":
            return {}
        from bitsandbytes.functional import has_avx512bf16

        return {"host": cpu_host(avx512_bf16=bool(has_avx512bf16()))}

    def deviation_condition(self, name: str, inputs: Any) -> bool:
        """The conditions this backend's deviations file names (``when``; docs/conformance.md).

        ``avx512_misindexed``: bnb's AVX-512 dequantize loop reads another block's absmax for this
        weight (``bnb_cpu.avx512_misindexed`` of its shape and blocksize). It runs only on the CPU of an
        AVX-512 host (``inputs`` None: whether this machine is one).

        ``state_dtype_skipped``: the QLoRA base's state is float16 or bfloat16 and the activations are
        of another dtype, so bnb's forward, which dequantizes straight into the activations' dtype,
        skips a rounding to the state's (a float32 state has none to skip). Any host."""
        if name == "state_dtype_skipped":
            if inputs is None:
                return True
            base, x = inputs.params.get("base_dtype"), inputs.get("x")
            return base in ("float16", "bfloat16") and x is not None and str(x.dtype) != base
        if name != "avx512_misindexed":
            raise ValueError(
                f"bitsandbytes defines no condition {name!r} (it has: avx512_misindexed, state_dtype_skipped)"
            )
        options = self.dialect_options()
        if not options or options["host"].lanes != 16:
            return False
        if inputs is None:
            return True
        weight = inputs.get("W" if inputs.op.startswith("qlora") else "x")  # as the check saw it (views)
        blocksize = inputs.params.get("blocksize")
        if weight is None or blocksize is None:
            return False
        return bnb_cpu.avx512_misindexed(weight.shape, blocksize)

    def supports(self, op: str, dtype: str) -> bool | str:
        if op.startswith("lora_"):
            return _NO_LORA
        return super().supports(op, dtype)

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        import bitsandbytes.functional as F

        with library_errors("bitsandbytes"):
            packed, qs = F.quantize_4bit(
                view(x, _device()),
                blocksize=blocksize,
                compress_statistics=double_quant,
                quant_type=quant_type,
            )
        state = to_reflora(packed, qs)
        check_round_trip(packed, qs, state)
        return state

    def dequantize_4bit(self, state, *, dtype=None):
        import bitsandbytes.functional as F

        # bnb's output as it is: its CPU shapes ((1, n) rows, transposes of one packed byte) are the
        # bnb-cpu dialect's rule 11; a 3-D state of <= 2 elements makes it raise, a declared deviation.
        with library_errors("bitsandbytes"):
            return to_numpy(F.dequantize_4bit(*to_bnb(state, _device(), dtype)))

    def _base(self, state: QuantState):
        import bitsandbytes as bnb

        packed, qs = to_bnb(state, _device())
        return lambda x, bias: bnb.matmul_4bit(x, packed.t(), qs, bias=bias)

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        _check_qlora(x, state, A, B, bias, dropout_mask)
        with library_errors("bitsandbytes"):
            return torch_qlora(self._base(state), x, A, B, scaling, bias=bias, dropout_mask=dropout_mask,
                               device=_device())  # fmt: skip

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        _check_qlora(x, state, A, B, None, dropout_mask)
        # bnb cannot backpropagate through a weight of <= 2 elements (one packed byte): a declared
        # deviation, qlora_backward[2-element base weight (one packed byte), *], not declined.
        with library_errors("bitsandbytes"):
            return torch_qlora(self._base(state), x, A, B, scaling, dropout_mask=dropout_mask, grad_y=grad_y,
                               device=_device())  # fmt: skip


def _check_qlora(x, state, A, B, bias, mask) -> None:
    """The operands the adapter builds itself (``check_built``): its low-rank term is its own torch code,
    whose broadcasting would accept a mask of one row. x and grad_y go to bnb unchecked, and so does a
    state that is not 2-D (``matmul_4bit`` raises for one)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a reflora.QuantState, got {type(state).__name__}")
    if len(state.shape) == 2:
        check_built(*state.shape, A, B, bias, mask, x)
