"""Eager torch ops for 4-bit weights and LoRA / QLoRA layers, on CPU and CUDA.

Notation as in :mod:`reflora.lora` and :mod:`reflora.qlora`: x (..., in), W (out, in), A (r, in),
B (out, r), ``scaling``, an optional dropout ``mask`` of x's shape (0 or 1/(1-p)) that multiplies x in
the adapter's branch only; ``ts`` a :class:`TorchQuantState` holding W in 4 bits and Ŵ the weight it
stands for.

What each op guarantees against the numpy oracle:

* :func:`quantize_4bit` is byte-identical to :func:`reflora.nf4.quantize` (codes, packing, absmax,
  double quantization): every threshold decision is made on the float64 quotient x/absmax, which
  decides exactly (:func:`reflora.codebooks.count_below`), and the double-quantization offset is the
  oracle's exactly rounded mean.
* :func:`dequantize_4bit` is bit-identical to :func:`reflora.nf4.dequantize`:
  ``dtype(f32(code[q] * absmax))``, with a double-quantized absmax rebuilt as
  ``f32(f32(code2[absmax_q] * absmax2) + offset)`` in two separate roundings (separate torch kernels,
  so never a fused multiply-add).
* :func:`lora_linear` and :func:`qlora_linear` compute the forward of :func:`reflora.lora.forward`,
  and their gradients those of :func:`reflora.lora.backward`, in the operation order that
  :func:`reflora.bounds.lora_forward_bound` / :func:`reflora.bounds.lora_backward_bound` model, with
  ``Arithmetic(operand=d, accumulate="float32", intermediate=d, output=d)`` for the compute dtype d
  (torch's CPU matmuls accumulate in float32 for every dtype; see docs/training.md for CUDA).

**Compute dtype.** Under ``torch.autocast`` it is the autocast dtype; otherwise x's dtype. Every other
float operand (W or Ŵ, A, B, bias, mask) is cast to it by a differentiable ``.to``, so gradients reach
parameters in their own dtype. Ŵ is dequantized in ``ts.dtype`` (exactly) and then cast, as
bitsandbytes does; a float32 state used in bfloat16 therefore computes with bf16(Ŵ).

**float64.** The layers' float operands may also be float64 (``torch.autograd.gradcheck`` needs it,
and PEFT runs float64 models); a 4-bit state's dtype and the quantize / dequantize ops stay float32,
float16 or bfloat16, as the oracle's. The conformance suite checks the three narrower dtypes. The
Triton kernels refuse float64; the modules' ``impl="auto"`` then uses these ops.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reflora import codebooks
from reflora.backends.torch.quant_state import (
    TorchQuantState,
    check_fields,
    check_scaling,
    check_unchanged,
    from_op_args,
    numpy_to_torch,
    op_args,
    versions,
)
from reflora.checks import check_flag
from reflora.double_quant import BLOCKSIZE2, mean_f32, warn_lost_scales
from reflora.state import NestedState, check_blocksize, check_blocksize2

__all__ = [
    "autocast_off",
    "compute_dtype",
    "dequantize_4bit",
    "lora_linear",
    "lora_merge",
    "nf4_linear",
    "qlora_linear",
    "quantize_4bit",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# A layer's activations, weights and adapters may also be float64 (gradcheck; PEFT runs float64 models);
# a 4-bit state's dtype stays one of _FLOATS, as the oracle's does.
_LAYER_FLOATS = (torch.float64, *_FLOATS)
# Elements whose float64 quotients are formed at once: bounds the temporaries (8 B each, twice).
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------- quantization


def _codebook_tensors(codebook: codebooks.Codebook, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(values float32, thresholds float64, sorted_codes uint8) of a codebook on ``device``."""
    if codebook.negative_zero_code is not None:
        raise ValueError(f"codebook {codebook.name!r} is a dialect; the torch ops follow the canonical rules")
    return (
        numpy_to_torch(codebook.values, device),
        numpy_to_torch(codebook.thresholds, device),
        numpy_to_torch(codebook.sorted_codes, device),
    )


def _check_input(x: torch.Tensor) -> None:
    """The oracle's input rules (:func:`reflora.nf4.check_input`), with the same messages."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"reflora quantizes float32, float16 and bfloat16 data, not {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty array (shape {tuple(x.shape)})")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        flat = int(torch.nonzero(~finite.reshape(-1))[0])
        where = tuple(int(i) for i in np.unravel_index(flat, tuple(x.shape))) if x.ndim else ()
        value = float(x.reshape(-1)[flat])
        raise ValueError(
            f"input is not finite at index {where} (flat index {flat}): {value}; "
            "NaN and inf have no 4-bit code"
        )


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 (ceil(n/blocksize),): max |x| per block of the 1-D float32 ``flat``.

    The ragged tail is padded with zeros, which cannot change a maximum of absolute values, so its
    absmax covers its own elements only, as the oracle's rule says.
    """
    n_blocks = math.ceil(flat.numel() / blocksize)
    padded = F.pad(flat, (0, n_blocks * blocksize - flat.numel()))
    return padded.view(n_blocks, blocksize).abs().amax(dim=1)


def _encode(
    flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, codebook: codebooks.Codebook
) -> torch.Tensor:
    """uint8 (n,): codes of the 1-D float32 ``flat`` given each block's float32 ``absmax``.

    x/absmax is formed in float64 (exact decisions, :func:`reflora.codebooks.count_below`); a zero
    absmax (an all-zero block) is replaced by 1 so that its zeros take the zero code. The index is the
    count of thresholds strictly below each value, so ties go to the lower value: for a 16-entry
    table by 15 comparisons (twice as fast as ``bucketize``'s binary search on one CPU thread: 13
    against 25 ms a million values), for the 256-entry double-quant map by ``bucketize`` with
    ``right=False``.
    """
    _, thresholds, sorted_codes = _codebook_tensors(codebook, flat.device)
    short = [float(m) for m in codebook.thresholds] if codebook.thresholds.size <= 16 else None
    scale = absmax.to(torch.float64)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    n = flat.numel()
    n_blocks = scale.numel()
    padded = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    codes = torch.empty(n_blocks, blocksize, dtype=torch.uint8, device=flat.device)
    step = max(1, _CHUNK // blocksize)  # whole blocks per chunk
    for b in range(0, n_blocks, step):
        # (k, blocksize) / (k, 1): every element divided by its own block's absmax, in float64
        scaled = padded[b : b + step].to(torch.float64) / scale[b : b + step, None]
        if short is None:
            index = torch.bucketize(scaled, thresholds, right=False)
        else:
            index = torch.zeros(scaled.shape, dtype=torch.uint8, device=flat.device)
            for m in short:
                index += scaled > m
        codes[b : b + step] = sorted_codes[index.long()]
    return codes.view(-1)[:n]


def _pack(q: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 (ceil(n/2),): element 2j in the high nibble; an odd n pads the last low nibble with ``pad``."""
    if q.numel() % 2:
        q = torch.cat([q, torch.full((1,), pad, dtype=torch.uint8, device=q.device)])
    return (q[0::2] << 4) | q[1::2]


def quantize_4bit(
    x: torch.Tensor,
    blocksize: int = 64,
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize2: int = BLOCKSIZE2,
) -> TorchQuantState:
    """Quantize ``x`` to 4 bits, blockwise: byte-identical to :func:`reflora.nf4.quantize`.

    x: float32 / float16 / bfloat16 tensor on any device, any shape and strides, finite, non-empty;
        blocks run over the row-major flattening of its logical indices.
    blocksize: one of 32, 64, ..., 4096. quant_type: "nf4" or "fp4".
    double_quant: also quantize the block scales (:mod:`reflora.double_quant`), True or False;
    blocksize2: scales a group (default 256), used only with double_quant.
    Returns a :class:`TorchQuantState` on x's device with x's shape and dtype. Raises ValueError for
    non-finite input (naming the first bad index), an empty tensor or a bad blocksize or blocksize2;
    TypeError for another dtype or a double_quant that is not a bool. Warns as
    :func:`reflora.nf4.quantize` does about block scales the double quantization loses
    (:func:`reflora.double_quant.warn_lost_scales`).
    """
    _check_input(x)
    blocksize = check_blocksize(blocksize)
    double_quant = check_flag("double_quant", double_quant)
    blocksize2 = check_blocksize2(blocksize2)
    codebook = codebooks.get(quant_type)
    device = x.device
    flat = x.detach().reshape(-1).to(torch.float32)  # logical row-major order; exact widening
    absmax = _block_absmax(flat, blocksize)
    packed = _pack(_encode(flat, absmax, blocksize, codebook), codebook.zero_code)
    code = numpy_to_torch(codebook.values, device)
    common = {"packed": packed, "code": code, "shape": tuple(x.shape), "dtype": x.dtype}
    common |= {"blocksize": blocksize, "quant_type": quant_type}
    if not double_quant:
        return TorchQuantState(absmax=absmax, **common)
    # The offset is the oracle's exactly rounded mean: a float32 torch mean can be an ulp off
    # (docs/dialects.md).
    offset = mean_f32(absmax.cpu().numpy())
    centred = absmax - torch.tensor(offset, dtype=torch.float32, device=device)  # one float32 rounding
    absmax2 = _block_absmax(centred, blocksize2)
    absmax_q = _encode(centred, absmax2, blocksize2, codebooks.DYNAMIC_MAP)
    code2 = numpy_to_torch(codebooks.DYNAMIC_MAP.values, device)
    ts = TorchQuantState(
        absmax=None,
        absmax_q=absmax_q,
        absmax2=absmax2,
        code2=code2,
        offset=float(offset),
        blocksize2=blocksize2,
        **common,
    )
    # The oracle's checks, on the (n_blocks,) scales only: as nf4.quantize does, say what is lost.
    map2 = codebooks.DYNAMIC_MAP.values
    nested = NestedState(absmax_q.cpu().numpy(), absmax2.cpu().numpy(), map2, offset, blocksize2)
    dtype = str(x.dtype).removeprefix("torch.")
    warn_lost_scales(nested, absmax.cpu().numpy(), dtype, blocksize, flat.numel())
    return ts


def _check_state(ts: TorchQuantState) -> None:
    if not isinstance(ts, TorchQuantState):
        raise TypeError(f"expected a TorchQuantState, got {type(ts).__name__}")
    check_fields(ts)  # ValueError naming the field: a malformed state gave wrong values, or bare errors


def rebuild_scales(
    absmax_q: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor, offset: float, blocksize2: int
) -> torch.Tensor:
    """float32 (n_blocks,): ``f32(f32(code2[absmax_q] * absmax2[group]) + offset)``, the oracle's rule 4,
    in two roundings as long as the multiply and the add run as separate kernels (eager torch)."""
    group = torch.arange(absmax_q.numel(), device=absmax_q.device) // blocksize2
    scaled = code2[absmax_q.long()] * absmax2[group]  # float32 * float32: first rounding
    return scaled + torch.tensor(offset, dtype=torch.float32, device=absmax_q.device)  # second rounding


def block_scales(ts: TorchQuantState) -> torch.Tensor:
    """float32 (n_blocks,): each block's absmax, rebuilt by the oracle's rule 4 if double-quantized."""
    if not ts.double_quant:
        return ts.absmax
    return rebuild_scales(ts.absmax_q, ts.absmax2, ts.code2, ts.offset, ts.blocksize2)


def dequantize_4bit(ts: TorchQuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``ts`` stands for, ``dtype(f32(code[q] * absmax))``: bit-identical to the oracle.

    ts: any :class:`TorchQuantState` (NF4 or FP4, plain or double-quantized) on any device.
    dtype: torch.float32 / float16 / bfloat16; default ``ts.dtype``.
    Returns a new contiguous tensor of ``ts.shape`` on ``ts.device``. A zero block gives +0.0.
    """
    _check_state(ts)
    out_dtype = ts.dtype if dtype is None else dtype
    if out_dtype not in _FLOATS:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {out_dtype}")
    return _dequantize(ts, out_dtype)


def _dequantize(ts: TorchQuantState, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_4bit` of a state already checked.

    Under torch.compile it runs as the opaque op ``reflora::dequantize_4bit``, in eager kernels. Left to
    inductor, the generated code was not the oracle's in two ways: the double-quant rebuild's multiply
    and add become one expression its code may contract into a fused multiply-add (its CUDA code does
    by default, its C++ code with the floating-point contract flag ``fast``), and a weight rounded to a
    16-bit state dtype and then widened for float32 activations lost that rounding (inductor drops the
    narrowing-widening pair: the conformance suite's torch-inductor backend found it).
    """
    if torch.compiler.is_compiling():
        return torch.ops.reflora.dequantize_4bit(*op_args(ts), out_dtype)
    return _dequantize_eager(ts, out_dtype)


@torch.library.custom_op("reflora::dequantize_4bit", mutates_args=())
def _dequantize_op(
    tensors: list[torch.Tensor | None],
    shape: list[int],
    dtype: torch.dtype,
    blocksize: int,
    quant_type: str,
    offset: float | None,
    blocksize2: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`_dequantize_eager` as one op a compiler cannot see into."""
    ts = from_op_args(tensors, shape, dtype, blocksize, quant_type, offset, blocksize2)
    return _dequantize_eager(ts, out_dtype)


@_dequantize_op.register_fake
def _(tensors, shape, dtype, blocksize, quant_type, offset, blocksize2, out_dtype):
    return tensors[0].new_empty(shape, dtype=out_dtype)


def _dequantize_eager(ts: TorchQuantState, out_dtype: torch.dtype) -> torch.Tensor:
    n, bs = ts.numel, ts.blocksize
    n_blocks = math.ceil(n / bs)
    # A byte decodes to two table values at once: pairs[b] = (code[b >> 4], code[b & 15]). Each row's
    # 8 bytes are gathered as one int64 and viewed back as the two float32s in memory order: a 1-D
    # gather is an order of magnitude faster on the CPU than indexing rows of a 2-D table, and
    # index_select with int32 indices 2.5x faster than take (0.28 against 0.69 ms for 295k bytes, one
    # CPU thread).
    pairs = torch.stack([ts.code.repeat_interleave(16), ts.code.repeat(16)], dim=1).view(torch.int64)
    values = torch.index_select(pairs.reshape(-1), 0, ts.packed.reshape(-1).int()).view(torch.float32)
    if values.numel() < n_blocks * bs:  # a ragged last block (F.pad would copy even when padding nothing)
        values = F.pad(values, (0, n_blocks * bs - values.numel()))
    values = values.view(n_blocks, bs) * block_scales(ts)[:, None]  # (blocks, bs) * (blocks, 1), float32
    return values.reshape(-1)[:n].to(out_dtype).reshape(ts.shape)


# ---------------------------------------------------------------------------------- linear layers


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in for input ``x``: the autocast dtype if autocast is on, else x's.
    A device autocast does not know (``meta``, for shape inference) computes in x's dtype."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast is off for ``device_type``: the dtypes were settled already. On a
    device autocast does not know (``meta``) there is nothing to turn off (torch.autocast raised)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (a differentiable cast), or None."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _check_lora_shapes(x, out_f: int, in_f: int, A, B, bias, mask) -> None:
    if x.ndim == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features = {in_f}")
    if (A is None) != (B is None):
        raise ValueError("A and B must both be given or both be None")
    if A is None and mask is not None:  # it was ignored: the mask applies to the adapter's input only
        raise ValueError("dropout_mask needs an adapter (A and B): it applies to the adapter's input only")
    if A is not None:
        r = A.shape[0] if A.ndim == 2 else 0
        if r < 1 or A.shape[1] != in_f or B.ndim != 2 or tuple(B.shape) != (out_f, r):
            raise ValueError(
                f"A must be (r, {in_f}) and B ({out_f}, r) with r >= 1; "
                f"got A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"dropout_mask has shape {tuple(mask.shape)}, expected x's shape {tuple(x.shape)}")
    for name, t in (("x", x), ("A", A), ("B", B), ("bias", bias), ("dropout_mask", mask)):
        if t is not None and t.dtype not in _LAYER_FLOATS:
            raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {t.dtype}")


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + bias + scaling · ((x ⊙ mask) Aᵀ) Bᵀ, differentiable by torch's own autograd.

    x (..., in); W (out, in); A (r, in); B (out, r); bias (out,) or None; dropout_mask x's shape or
    None. Float tensors of any of float64 / float32 / float16 / bfloat16, cast to the compute dtype
    (module docstring). scaling: a finite real (alpha / r, or alpha / sqrt(r) with rsLoRA).
    Returns (..., out) in the compute dtype. Gradients flow to whatever requires them (W normally
    does not). The adapter term is formed as PEFT forms it, ``B(A(x_d)) * scaling`` added to the
    base output, so with x, W, A and B of one dtype the result is bit-identical to PEFT's
    ``lora.Linear``. With adapters of another dtype (float32 adapters in a bfloat16 model, PEFT's
    default) it is not: PEFT computes the adapter term in the adapters' dtype, this in the compute
    dtype (docs/training.md, "Compute dtype").
    """
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    if W.dtype not in _LAYER_FLOATS:
        raise TypeError(f"W must be float64, float32, float16 or bfloat16, got {W.dtype}")
    _check_lora_shapes(x, W.shape[0], W.shape[1], A, B, bias, dropout_mask)
    s = check_scaling(scaling)
    dt = compute_dtype(x)
    x, W, A, B, bias, mask = (_cast(t, dt) for t in (x, W, A, B, bias, dropout_mask))
    x_d = x if mask is None else x * mask
    return F.linear(x, W, bias) + F.linear(F.linear(x_d, A), B) * s  # (..., out) + (..., r) -> (..., out)


@dataclass(frozen=True, eq=False)
class _QLoRAConfig:
    """The non-differentiable part of a QLoRA call: the frozen 4-bit weight and the scaling."""

    ts: TorchQuantState
    scaling: float


def _base_weight(ts: TorchQuantState, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ in ``dtype``: dequantized exactly in ts.dtype, then cast (as bitsandbytes' MatMul4Bit). The
    state was checked before the autograd Function that calls this (checking it inside one, under
    torch.compile and autocast, broke the trace: "Global autocast state changed while dynamo tracing")."""
    W = _dequantize(ts, ts.dtype)
    return W if W.dtype == dtype else W.to(dtype)


class _QLoRAFunction(torch.autograd.Function):
    """y = x Ŵᵀ + bias + s·((x ⊙ m) Aᵀ) Bᵀ on 2-D x, with Ŵ dequantized in forward and again in
    backward: no dequantized weight lives between the two. Saved: x, A, B, mask and t = x_d Aᵀ
    (N, r), all inputs or fresh tensors, never written to."""

    @staticmethod
    def forward(ctx, x, A, B, bias, mask, cfg: _QLoRAConfig):
        W = _base_weight(cfg.ts, x.dtype)  # (out, in), freed when forward returns
        y = F.linear(x, W, bias)  # (N, in) @ (in, out) -> (N, out)
        t = None
        if A is not None:
            x_d = x if mask is None else x * mask
            t = F.linear(x_d, A)  # (N, in) @ (in, r) -> (N, r)
            y = y + F.linear(t, B) * cfg.scaling  # (N, r) @ (r, out) -> (N, out)
        ctx.save_for_backward(x, A, B, mask, t)
        ctx.cfg = cfg
        ctx.state_versions = versions(cfg.ts)  # the backward reads the state again
        return y

    @staticmethod
    def backward(ctx, g):
        x, A, B, mask, t = ctx.saved_tensors
        cfg: _QLoRAConfig = ctx.cfg
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
        grad_x = grad_A = grad_B = grad_bias = None
        # On the CPU the backward runs in the caller's thread, where autocast may still be on; the
        # dtypes were settled in forward, so it must not recast anything here.
        with autocast_off(g.device.type):
            g = g if g.dtype == x.dtype else g.to(x.dtype)
            grad_t = None
            if A is not None:
                x_d = x if mask is None else x * mask
                if torch.is_grad_enabled():  # create_graph=True: t saved from forward carries no graph,
                    t = F.linear(x_d, A)  # and grad_B's second-order terms through x and A were lost
                g_s = g * cfg.scaling  # (N, out); the oracle's order: s·g first, then both products
                if need_B:
                    grad_B = g_s.t() @ t  # (out, N) @ (N, r) -> (out, r)
                if need_A or need_x:
                    grad_t = g_s @ B  # (N, out) @ (out, r) -> (N, r)
                if need_A:
                    grad_A = grad_t.t() @ x_d  # (r, N) @ (N, in) -> (r, in)
            if need_x:
                check_unchanged(cfg.ts, ctx.state_versions)
                W = _base_weight(cfg.ts, x.dtype)  # dequantized again: nothing was kept from forward
                grad_x = g @ W  # (N, out) @ (out, in) -> (N, in)
                del W
                if grad_t is not None:
                    lora = grad_t @ A  # (N, r) @ (r, in) -> (N, in)
                    grad_x = grad_x + (lora if mask is None else lora * mask)
            if need_bias:
                grad_bias = g.sum(dim=0)
        return grad_x, grad_A, grad_B, grad_bias, None, None


def _qlora(x, ts, A, B, scaling, bias, mask) -> torch.Tensor:
    _check_state(ts)
    if len(ts.shape) != 2:
        raise ValueError(f"a linear layer's 4-bit weight is 2-D (out, in); the state holds shape {ts.shape}")
    out_f, in_f = ts.shape
    _check_lora_shapes(x, out_f, in_f, A, B, bias, mask)
    devices = {t.device for t in (x, A, B, bias, mask, ts.packed) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    dt = compute_dtype(x)
    x, A, B, bias, mask = (_cast(t, dt) for t in (x, A, B, bias, mask))
    lead = x.shape[:-1]
    cfg = _QLoRAConfig(ts, check_scaling(scaling) if A is not None else 0.0)
    with autocast_off(x.device.type):
        y = _QLoRAFunction.apply(
            x.reshape(-1, in_f), A, B, bias, None if mask is None else mask.reshape(-1, in_f), cfg
        )
    return y.reshape(*lead, out_f)


def qlora_linear(
    x: torch.Tensor,
    ts: TorchQuantState,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The QLoRA layer y = x Ŵᵀ + bias + scaling · ((x ⊙ mask) Aᵀ) Bᵀ, Ŵ = dequantize(ts), differentiable.

    x (..., in); ts: W (out, in) as a 2-D :class:`TorchQuantState` (NF4 or FP4, plain or
    double-quantized), frozen; A (r, in); B (out, r); bias (out,) or None; dropout_mask x's shape or
    None. Floats of any of float64 / float32 / float16 / bfloat16, cast to the compute dtype (module
    docstring); all on one device. scaling: a real number finite in float32 (a numpy scalar or a
    one-element tensor without a gradient too). ts is checked field by field (ValueError naming it).
    Returns (..., out) in the compute dtype. Gradients: x, A, B (and bias, if it requires one); Ŵ
    gets none. The backward dequantizes Ŵ again instead of keeping it: between forward and backward
    only x, A, B, mask and the (N, r) product x_d Aᵀ are held. The backward is itself differentiable
    (``create_graph=True``, for a gradient penalty): it then forms x_d Aᵀ again with its graph. The
    Triton layer refuses that instead (docs/triton.md). A state written in place between the forward
    and a backward that needs grad_x raises RuntimeError there, as autograd does for saved tensors. A
    dropout_mask without A and B is refused (ValueError). Meta tensors give the output's shape.
    """
    return _qlora(x, ts, A, B, scaling, bias, dropout_mask)


def nf4_linear(x: torch.Tensor, ts: TorchQuantState, *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Ŵᵀ + bias with a frozen 4-bit W: :func:`qlora_linear` without an adapter.

    x (..., in); ts 2-D (out, in); bias (out,) or None. Returns (..., out) in the compute dtype;
    differentiable in x (and bias). Ŵ is dequantized per call, in forward and again in backward.
    """
    return _qlora(x, ts, None, None, 0.0, bias, None)


def lora_merge(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """The merged weight W' = W + scaling · B A, computed in torch in W's dtype (not differentiated).

    W (out, in), or (in, out) with ``fan_in_fan_out`` (then ΔW is transposed); A (r, in); B (out, r);
    all float64 / float32 / float16 / bfloat16 on one device, A and B cast to W's dtype d. scaling: a
    finite real.
    Returns a new tensor of W's shape and dtype on W's device.

    Arithmetic, as :func:`reflora.bounds.merge_bound` models it with accumulate float32 (float64 for
    d = float64) and intermediate = output = d: ΔW = d(s · d(B A)) (the product accumulated and
    rounded once to d, then scaled), W' = d(W + ΔW). A merged value beyond d's range becomes ±inf, as IEEE
    rounding gives it; :func:`reflora.lora.merge` (one rounding from float64) raises there instead.
    """
    for name, t in (("W", W), ("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.dtype not in _LAYER_FLOATS:
            raise ValueError(f"{name} must be a 2-D float64/float32/float16/bfloat16 tensor, got {t!r:.80}")
    out_f, in_f = (W.shape[1], W.shape[0]) if fan_in_fan_out else tuple(W.shape)
    r = A.shape[0]
    if r < 1 or tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
        raise ValueError(
            f"W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
            f"(fan_in_fan_out={fan_in_fan_out}): A must be (r, {in_f}) and B ({out_f}, r), r >= 1"
        )
    s = check_scaling(scaling)
    with torch.no_grad():
        delta = (B.to(W.dtype) @ A.to(W.dtype)) * s  # (out, r) @ (r, in) -> (out, in), rounded, then scaled
        return W + (delta.t() if fan_in_fan_out else delta)
