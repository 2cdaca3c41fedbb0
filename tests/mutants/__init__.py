"""Planted bugs: copies of the reference backend, each overriding one op with one realistic mistake.

tests/test_mutations.py runs the conformance suite's ``ci`` profile against each and requires every
one to be caught (killed) with a readable message. :data:`MUTANTS` lists them with the ops whose tests
must catch them; each can also be asked for by ``module:attr`` (``mutants:NibbleOrder``) when the
tests folder is on ``sys.path``, as it is under pytest.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

from reflora import blockwise, codebooks, lora, nf4, qlora
from reflora.backends.reference import ReferenceBackend
from reflora.bounds import Arithmetic, round_to
from reflora.double_quant import quantize as quantize_absmax
from reflora.dtypes import as_dtype, bfloat16
from reflora.state import QuantState


def _quantize(x, blocksize, quant_type, double_quant, *, flat=None, absmax_fn=None, encode=None, pack=None):
    """The canonical quantizer with one step replaceable: flattening, absmax, encoding or packing."""
    x = nf4.check_input(x)
    book = codebooks.get(quant_type)
    f = (flat or (lambda a: a.reshape(-1)))(x).astype(np.float32)
    absmax = (absmax_fn or blockwise.block_absmax)(f, blocksize)
    q = (encode or (lambda v, a: blockwise.encode(v, a, blocksize, book)))(f, absmax)
    packed = (pack or nf4.pack)(q, book.zero_code)
    nested = quantize_absmax(absmax) if double_quant else None
    return QuantState(packed, None if double_quant else absmax, x.shape, x.dtype, blocksize, quant_type,
                      book.values, nested)  # fmt: skip


class _Mutant(ReferenceBackend):
    ops: tuple[str, ...] = ()
    bug: str = ""


class NibbleOrder(_Mutant):
    name, ops, bug = "mutant-nibble-order", ("quantize_4bit",), "element 2j stored in the low nibble"

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        swap = lambda q, pad: (lambda p: ((p << 4) | (p >> 4)).astype(np.uint8))(nf4.pack(q, pad))  # noqa: E731
        return _quantize(x, blocksize, quant_type, double_quant, pack=swap)


class TiesUp(_Mutant):
    name, ops, bug = (
        "mutant-ties-up",
        ("quantize_4bit",),
        "a value exactly on a threshold takes the upper code",
    )

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        book = codebooks.get(quant_type)

        def encode(f, absmax):
            scale = np.repeat(np.where(absmax == 0, 1.0, absmax.astype(np.float64)), blocksize)[: f.size]
            return book.sorted_codes[np.searchsorted(book.thresholds, f / scale, side="right")]

        return _quantize(x, blocksize, quant_type, double_quant, encode=encode)


class AbsmaxBfloat16(_Mutant):
    name, ops, bug = "mutant-absmax-bf16", ("quantize_4bit",), "absmax stored rounded to bfloat16"

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        def absmax(f, bs):
            return blockwise.block_absmax(f, bs).astype(bfloat16).astype(np.float32)

        return _quantize(x, blocksize, quant_type, double_quant, absmax_fn=absmax)


class DequantTruncates(_Mutant):
    name, ops, bug = (
        "mutant-dequant-truncates",
        ("dequantize_4bit",),
        "f32 -> f16/bf16 by truncation, not RNE",
    )

    def dequantize_4bit(self, state, *, dtype=None):
        wide = nf4.dequantize(state, "float32")
        out = nf4.dequantize(state, dtype)
        if out.dtype == np.float32:
            return out
        toward_zero = np.nextafter(out, np.zeros_like(out))
        return np.where(np.abs(out.astype(np.float64)) > np.abs(wide.astype(np.float64)), toward_zero, out)


def _fma_scales(nested):
    group = np.arange(nested.absmax_q.size) // nested.blocksize2
    exact = nested.code2[nested.absmax_q].astype(np.float64) * nested.absmax2[group].astype(np.float64)
    return (exact + np.float64(nested.offset)).astype(np.float32)  # one rounding (to f32), as an FMA


def _dequant_with_scales(state, rebuild, dtype):
    """Canonical dequantization, except that a double-quantized state's block scales are ``rebuild(state)``
    (float32) instead of the canonical rebuild; a state without double quantization is left canonical.
    The scales are used as rebuilt, below zero too (as the canonical rule uses its own), so the
    mutant stays a wrong dequantization on the sparse-weight cases instead of raising there."""
    if state.nested is None:
        return nf4.dequantize(state, dtype)
    scales = np.repeat(rebuild(state).astype(np.float32), state.blocksize)[: state.numel]
    values = state.code[nf4.unpack(state.packed, state.numel)] * scales  # float32, one rounding
    return values.astype(state.dtype if dtype is None else as_dtype(dtype)).reshape(state.shape)


class DequantFMA(_Mutant):
    name, ops, bug = "mutant-dq-fma", ("dequantize_4bit",), "DQ absmax rebuilt with one rounding (an FMA)"

    def dequantize_4bit(self, state, *, dtype=None):
        return _dequant_with_scales(state, lambda s: _fma_scales(s.nested), dtype)


class DQDrift(_Mutant):
    name, ops, bug = (
        "mutant-dq-drift",
        ("dequantize_4bit",),
        "DQ rebuild multiplies by absmax2 held in float16",
    )

    def dequantize_4bit(self, state, *, dtype=None):
        def rebuild(s):
            nested = s.nested
            group = np.arange(nested.absmax_q.size) // nested.blocksize2
            absmax2 = nested.absmax2.astype(np.float16).astype(np.float32)
            return (nested.code2[nested.absmax_q] * absmax2[group] + nested.offset).astype(np.float32)

        return _dequant_with_scales(state, rebuild, dtype)


class NegativeScaleClamped(_Mutant):
    name, ops, bug = (
        "mutant-negative-scale-clamped",
        ("dequantize_4bit",),
        "DQ scales rebuilt below zero clamped to 0 (a block that flips sign comes back as zeros)",
    )

    def dequantize_4bit(self, state, *, dtype=None):
        return _dequant_with_scales(state, lambda s: np.maximum(nf4.block_scales(s), np.float32(0)), dtype)


class RaggedTail(_Mutant):
    name, ops, bug = (
        "mutant-ragged-tail",
        ("quantize_4bit",),
        "the tail's absmax is taken over the last blocksize elements",
    )

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        def absmax(f, bs):
            a = blockwise.block_absmax(f, bs)
            if f.size % bs and f.size > bs:
                a[-1] = np.abs(f[-bs:]).max()
            return a

        return _quantize(x, blocksize, quant_type, double_quant, absmax_fn=absmax)


class LargeBlocks(_Mutant):
    name, ops, bug = (
        "mutant-large-blocks",
        ("quantize_4bit",),
        "absmax over the first 1024 elements of blocks >= 2048",
    )

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        def absmax(f, bs):
            a = blockwise.block_absmax(f, bs)
            if bs >= 2048:
                for b in range(a.size):
                    a[b] = np.abs(f[b * bs : b * bs + 1024]).max()
            return a

        return _quantize(x, blocksize, quant_type, double_quant, absmax_fn=absmax)


class AcceptsNaN(_Mutant):
    name, ops, bug = "mutant-accepts-nan", ("quantize_4bit",), "non-finite weights quantized as zeros"

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        x = np.asarray(x)
        clean = np.where(np.isfinite(x.astype(np.float32)), x, np.zeros_like(x))
        return nf4.quantize(clean, blocksize, quant_type=quant_type, double_quant=double_quant)


class MemoryOrder(_Mutant):
    name, ops, bug = (
        "mutant-memory-order",
        ("quantize_4bit",),
        "blocks cut from memory order, not logical order",
    )

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        state = _quantize(x, blocksize, quant_type, double_quant, flat=lambda a: a.ravel(order="K"))
        return state


class GradBNoScaling(_Mutant):
    name, ops, bug = "mutant-grad-b-no-scaling", ("lora_backward",), "grad_B computed without the scaling"

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        gx, gA, gB = lora.backward(grad_y, x, W, A, B, scaling, dropout_mask=dropout_mask)
        return gx, gA, gB / scaling if scaling else gB


class DropoutOnBase(_Mutant):
    name, ops, bug = "mutant-dropout-on-base", ("lora_forward",), "dropout applied to the base path too"

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        if dropout_mask is None:
            return lora.forward(x, W, A, B, scaling, bias=bias)
        x_d = np.asarray(x, dtype=np.float64) * np.asarray(dropout_mask, dtype=np.float64)
        return lora.forward(x_d, W, A, B, scaling, bias=bias)


class _SkipsAdapter(_Mutant):
    """A forward that drops the low-rank term (scaling 0) where :meth:`skips` says so."""

    ops = ("lora_forward",)

    def skips(self, A, B, scaling) -> bool:
        raise NotImplementedError

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        s = 0.0 if self.skips(A, B, scaling) else scaling
        return lora.forward(x, W, A, B, s, bias=bias, dropout_mask=dropout_mask)


class RankOneDropsAdapter(_SkipsAdapter):
    name, bug = "mutant-rank-one", "the adapter is skipped when r == 1"

    def skips(self, A, B, scaling) -> bool:
        return np.shape(A)[0] == 1


class SkipsSmallAdapter(_SkipsAdapter):
    name = "mutant-skips-small-adapter"
    bug = "the low-rank term is skipped where max|s·B| < 1e-3 (an early adapter; a 'negligible' shortcut)"

    def skips(self, A, B, scaling) -> bool:
        return np.max(np.abs(scaling * np.asarray(B, np.float64)), initial=0.0) < 1e-3


class OddInFeatures(_Mutant):
    name, ops, bug = "mutant-odd-in", ("lora_forward",), "the last input feature is dropped when in is odd"

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        n_in = np.shape(W)[1]
        if n_in % 2 == 0 or n_in == 1:
            return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)
        W0 = np.array(W, copy=True)
        W0[:, -1] = 0
        return lora.forward(x, W0, A, B, scaling, bias=bias, dropout_mask=dropout_mask)


class QLoRAGradXBaseOnly(_Mutant):
    name, ops, bug = "mutant-qlora-grad-x", ("qlora_backward",), "QLoRA grad_x misses the low-rank path"

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        _, gA, gB = qlora.backward(grad_y, x, state, A, B, scaling, dropout_mask=dropout_mask)
        W = qlora.dequantized_base(state).astype(np.float64)
        g = np.asarray(grad_y).astype(np.float64)
        return (g.reshape(-1, W.shape[0]) @ W).reshape(np.shape(x)), gA, gB


class QLoRABaseSkipsStateDtype(_Mutant):
    name, ops, bug = (
        "mutant-qlora-base-dtype",
        ("qlora_forward",),
        "the base dequantized straight into the activations' dtype, skipping the state's (as bnb's forward)",
    )

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        qlora.dequantized_base(state)  # its checks: a 2-D QuantState
        W = nf4.dequantize(state, np.asarray(x).dtype)
        return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)


class QLoRABackwardBase16Bit(_Mutant):
    name, ops, bug = (
        "mutant-qlora-grad-x-base-16bit",
        ("qlora_backward",),
        "grad_x through a base formed by a 16-bit product (code and absmax rounded to the state's dtype "
        "first), as a fused kernel might form it",
    )

    def arithmetic(self, op, dtype):  # what a fused GPU kernel declares: float32 accumulation
        return Arithmetic(operand=dtype, accumulate="float32", intermediate=dtype, output=dtype)

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        qlora.dequantized_base(state)  # its checks: a 2-D QuantState
        dt = np.dtype(state.dtype)
        codes = state.code[nf4.unpack(state.packed, state.numel)].astype(dt)
        scales = np.repeat(nf4.block_scales(state), state.blocksize)[: state.numel].astype(dt)
        W = (codes * scales).reshape(state.shape)  # one rounding of the product, in dt
        grads = lora.backward(grad_y, x, W, A, B, scaling, dropout_mask=dropout_mask)  # float64
        return tuple(round_to(g, np.asarray(a).dtype) for g, a in zip(grads, (x, A, B), strict=True))


class ScalingTruncated(_Mutant):
    name, ops, bug = (
        "mutant-scaling-int",
        ("lora_forward",),
        "scaling truncated to an int (rsLoRA's 16/sqrt(8) -> 5)",
    )

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        return lora.forward(x, W, A, B, float(int(scaling)), bias=bias, dropout_mask=dropout_mask)


class ZeroGradA(_Mutant):
    name, ops, bug = "mutant-zero-grad-a", ("lora_backward",), "grad_A returned as zeros"

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        gx, gA, gB = lora.backward(grad_y, x, W, A, B, scaling, dropout_mask=dropout_mask)
        return gx, np.zeros_like(gA), gB


class BiasIgnored(_Mutant):
    name, ops, bug = "mutant-bias-ignored", ("lora_forward",), "the bias is not added"

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        return lora.forward(x, W, A, B, scaling, dropout_mask=dropout_mask)


class DequantIgnoresDtype(_Mutant):
    name, ops, bug = (
        "mutant-dequant-dtype",
        ("dequantize_4bit",),
        "dtype= ignored: output in the state's dtype",
    )

    def dequantize_4bit(self, state, *, dtype=None):
        return nf4.dequantize(state)


class MergeFanInIgnored(_Mutant):
    name, ops, bug = "mutant-merge-fan-in", ("lora_merge",), "fan_in_fan_out adds ΔW untransposed when square"

    def lora_merge(self, W, A, B, scaling, *, fan_in_fan_out=False):
        d = lora.delta(A, B, scaling)
        if d.shape != np.shape(W):
            d = d.T
        return round_to(np.asarray(W, np.float64) + d, np.asarray(W).dtype)


class OffsetSequentialMean(_Mutant):
    name, ops, bug = "mutant-offset-mean", ("quantize_4bit",), "DQ offset = a sequential float32 mean"

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        state = nf4.quantize(x, blocksize, quant_type=quant_type, double_quant=False)
        if not double_quant:
            return state
        total = np.float32(0)
        for a in state.absmax:
            total = np.float32(total + a)
        offset = np.float32(total / np.float32(state.absmax.size))
        return dataclasses.replace(state, absmax=None, nested=quantize_absmax(state.absmax, offset=offset))


class FlushesSubnormals(_Mutant):
    name, ops, bug = "mutant-ftz", ("dequantize_4bit",), "subnormal outputs flushed to zero"

    def dequantize_4bit(self, state, *, dtype=None):
        out = nf4.dequantize(state, dtype)
        tiny = ml_dtypes.finfo(out.dtype).smallest_normal
        return np.where(np.abs(out) < tiny, np.zeros_like(out), out)


class ScratchInputs(_Mutant):
    name, ops, bug = (
        "mutant-scratch-inputs",
        ("lora_forward",),
        "drops the adapter and zeroes B in place (an oracle computed afterwards would agree)",
    )

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        y = lora.forward(x, W, A, np.zeros_like(B), scaling, bias=bias, dropout_mask=dropout_mask)
        B[...] = 0  # B used as scratch space
        return y


class FlushingSkipsTinyGradients(_Mutant):
    name, ops, bug = (
        "mutant-ftz-skips-tiny-grads",
        ("lora_backward",),
        "a backend declaring flush-to-zero (float32 accumulation) returns grad_A and grad_B as zeros where "
        "max|x|·max|grad_y| < 2**-60 (a 'negligible gradient' shortcut)",
    )

    def arithmetic(self, op, dtype):  # what a torch backend on an AVX512_BF16 CPU declares in bfloat16
        return Arithmetic(operand=dtype, accumulate="float32", intermediate="float32", output=dtype,
                          flush_to_zero=True)  # fmt: skip

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        grads = lora.backward(grad_y, x, W, A, B, scaling, dropout_mask=dropout_mask)
        gx, gA, gB = (round_to(g, np.asarray(a).dtype) for g, a in zip(grads, (x, A, B), strict=True))
        scale = float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))
        scale *= float(np.max(np.abs(np.asarray(grad_y, np.float64)), initial=0.0))
        if scale < 2.0**-60:
            return gx, np.zeros_like(gA), np.zeros_like(gB)
        return gx, gA, gB


def _dense_read(a) -> np.ndarray:
    """What a kernel that takes the first element's address and assumes dense rows reads for ``a``: its
    memory from that element on, as a C-contiguous array of its shape."""
    a = np.asarray(a)
    strides, step = [], a.itemsize
    for d in reversed(a.shape):
        strides.append(step)
        step *= d
    return np.lib.stride_tricks.as_strided(a, a.shape, tuple(reversed(strides)), writeable=False).copy()


def _unchecked_forward(x, W, A, B, scaling, bias, mask) -> np.ndarray:
    """The LoRA forward in float64 (the reference's arithmetic) with no check of its inputs: what a kernel
    computes from whatever memory it read (NaN read from padding gives NaN outputs, not an error)."""
    x, W, A, B = (np.asarray(a, dtype=np.float64) for a in (x, W, A, B))
    x_d = x if mask is None else x * np.asarray(mask, dtype=np.float64)
    y = x @ W.T + scaling * ((x_d @ A.T) @ B.T)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y


def _memory_order(a) -> np.ndarray:
    """``a``'s elements in memory order, read as a row-major array of its shape (a missing .contiguous())."""
    a = np.asarray(a)
    return a.ravel(order="K").reshape(a.shape) if a.ndim >= 2 and not a.flags.c_contiguous else a


class QLoRARankTile64(_Mutant):
    name, ops, bug = (
        "mutant-qlora-rank-tile-64",
        ("qlora_forward",),
        "the fused QLoRA forward takes the rank in one 64-wide tile, without a loop: ranks past 64 dropped",
    )

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        if np.shape(A)[0] > 64 and np.shape(B)[1] == np.shape(A)[0]:
            A, B = np.asarray(A)[:64], np.asarray(B)[:, :64]
        return qlora.forward(x, state, A, B, scaling, bias=bias, dropout_mask=dropout_mask)


class MergeRankTile64(_Mutant):
    name, ops, bug = (
        "mutant-merge-rank-tile-64",
        ("lora_merge",),
        "the merge forms B A in one 64-wide tile of rank, without a loop: ranks past 64 dropped",
    )

    def lora_merge(self, W, A, B, scaling, *, fan_in_fan_out=False):
        if np.shape(A)[0] > 64 and np.shape(B)[1] == np.shape(A)[0]:
            A, B = np.asarray(A)[:64], np.asarray(B)[:, :64]
        return lora.merge(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out)


class SplitKTail(_Mutant):
    name, ops, bug = (
        "mutant-split-k-tail",
        ("lora_forward",),
        "the split-K path (in > 1024) drops the columns past the last multiple of 256",
    )

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        n_in = np.shape(W)[-1]
        if np.ndim(W) == 2 and n_in > 1024 and n_in % 256:
            W = np.array(W)
            W[:, n_in // 256 * 256 :] = 0
        return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)


class FourDimX(_Mutant):
    name, ops, bug = (
        "mutant-4d-x",
        ("lora_forward",),
        "the grid is sized from x.shape[0] * x.shape[1]: rows of a third leading dim are left at 0",
    )

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        y = lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)
        if np.ndim(x) >= 4:
            y.reshape(-1, y.shape[-1])[np.shape(x)[0] * np.shape(x)[1] :] = 0
        return y


class WeightGradRowCap(_Mutant):
    name, ops, bug = (
        "mutant-weight-grad-row-cap",
        ("lora_backward",),
        "grad_A and grad_B reduce over a fixed grid of row tiles: rows past 2048 never added",
    )

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        gx, gA, gB = lora.backward(grad_y, x, W, A, B, scaling, dropout_mask=dropout_mask)
        out, n_in = np.shape(W)
        if math.prod(np.shape(x)[:-1]) > 2048:
            m = None if dropout_mask is None else np.asarray(dropout_mask).reshape(-1, n_in)[:2048]
            _, gA, gB = lora.backward(np.asarray(grad_y).reshape(-1, out)[:2048],
                                      np.asarray(x).reshape(-1, n_in)[:2048], W, A, B, scaling,
                                      dropout_mask=m)  # fmt: skip
        return gx, gA, gB


class GradYAssumedContiguous(_Mutant):
    name, ops, bug = (
        "mutant-grad-y-contiguous",
        ("qlora_backward",),
        "the QLoRA backward reads grad_y's memory as row-major (the missing grad_output.contiguous())",
    )

    def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
        return qlora.backward(_memory_order(grad_y), x, state, A, B, scaling, dropout_mask=dropout_mask)


class AdapterAssumedContiguous(_Mutant):
    name, ops, bug = (
        "mutant-adapter-contiguous",
        ("lora_forward",),
        "A's and B's memory read as row-major (a transposed or sliced adapter taken as dense)",
    )

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        y = lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)  # the checks
        if np.asarray(A).flags.c_contiguous and np.asarray(B).flags.c_contiguous:
            return y
        return _unchecked_forward(x, W, _dense_read(A), _dense_read(B), scaling, bias, dropout_mask)


class DenseRowsAssumed(_Mutant):
    name, ops, bug = (
        "mutant-dense-rows",
        ("lora_forward",),
        "x of unit inner stride taken as dense: its row stride assumed to be in (row padding read)",
    )

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        y = lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)  # the checks
        x = np.asarray(x)
        if x.ndim >= 2 and x.strides[-1] == x.itemsize and not x.flags.c_contiguous:
            return _unchecked_forward(_dense_read(x), W, A, B, scaling, bias, dropout_mask)
        return y


class QuantizeDenseRowsAssumed(_Mutant):
    name, ops, bug = (
        "mutant-quantize-dense-rows",
        ("quantize_4bit",),
        "quantize takes x of unit inner stride as dense: row padding or skipped rows read as weights",
    )

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        x = np.asarray(x)
        if x.ndim >= 2 and x.strides[-1] == x.itemsize and not x.flags.c_contiguous:
            # x itself is checked; what the kernel then reads is the memory from its first element on
            flat = lambda a: _dense_read(x).astype(a.dtype).reshape(-1)  # noqa: E731
            return _quantize(x, blocksize, quant_type, double_quant, flat=flat)
        return nf4.quantize(x, blocksize, quant_type=quant_type, double_quant=double_quant)


class DequantSaturates(_Mutant):
    name, ops, bug = (
        "mutant-dequant-saturates",
        ("dequantize_4bit",),
        "the float32 -> float16/bfloat16 output conversion saturates at the largest finite value "
        "(cvt .satfinite) instead of overflowing to inf",
    )

    def dequantize_4bit(self, state, *, dtype=None):
        out = nf4.dequantize(state, dtype)
        if out.dtype == np.float32:
            return out
        wide = nf4.dequantize(state, "float32")
        big = np.copysign(ml_dtypes.finfo(out.dtype).max, wide).astype(out.dtype)
        return np.where(np.isinf(out) & np.isfinite(wide), big, out)


class ZeroAsNegativeZero(_Mutant):
    name, ops, bug = (
        "mutant-zero-as-negative-zero",
        ("dequantize_4bit",),
        "zero outputs written as -0.0 (the sign taken from a sign-magnitude decode)",
    )

    def dequantize_4bit(self, state, *, dtype=None):
        out = nf4.dequantize(state, dtype)
        return np.where(out == 0, -np.zeros_like(out), out)


class NestedGroups256(_Mutant):
    name, ops, bug = (
        "mutant-nested-groups-256",
        ("dequantize_4bit",),
        "the double-quant rebuild takes groups of 256 block scales whatever the state's blocksize2",
    )

    def dequantize_4bit(self, state, *, dtype=None):
        n = state.nested
        if n is not None and n.blocksize2 != 256:  # read as if grouped by 256: group g's scale at g
            groups = np.minimum(np.arange(-(-n.absmax_q.size // 256)), n.absmax2.size - 1)
            n = dataclasses.replace(n, absmax2=n.absmax2[groups], blocksize2=256)
            state = dataclasses.replace(state, nested=n)
        return nf4.dequantize(state, dtype)  # the canonical rebuild and product, negative scales too


MUTANTS: tuple[type[_Mutant], ...] = (
    NibbleOrder,
    TiesUp,
    AbsmaxBfloat16,
    DequantTruncates,
    DequantFMA,
    DQDrift,
    RaggedTail,
    LargeBlocks,
    AcceptsNaN,
    MemoryOrder,
    GradBNoScaling,
    DropoutOnBase,
    RankOneDropsAdapter,
    OddInFeatures,
    QLoRAGradXBaseOnly,
    QLoRABackwardBase16Bit,
    ScalingTruncated,
    ZeroGradA,
    BiasIgnored,
    DequantIgnoresDtype,
    MergeFanInIgnored,
    OffsetSequentialMean,
    FlushesSubnormals,
    ScratchInputs,
    NegativeScaleClamped,
    QLoRABaseSkipsStateDtype,
    SkipsSmallAdapter,
    FlushingSkipsTinyGradients,
    QLoRARankTile64,
    MergeRankTile64,
    SplitKTail,
    FourDimX,
    WeightGradRowCap,
    GradYAssumedContiguous,
    AdapterAssumedContiguous,
    DenseRowsAssumed,
    QuantizeDenseRowsAssumed,
    DequantSaturates,
    ZeroAsNegativeZero,
    NestedGroups256,
)
