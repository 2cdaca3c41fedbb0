"""4-bit (NF4 or FP4) dequantization, with the double-quant absmax reconstruction fused in.

Reference: :func:`reflora.nf4.dequantize`. Tolerance class: EXACT (bit for bit, every output dtype).

Rule implemented, per element i of block b = i // blocksize:

    out[i] = dtype(f32(code[q_i] * absmax[b]))
    absmax[b] = f32(f32(code2[absmax_q[b]] * absmax2[b // blocksize2]) + offset)   (double quant)

One float32 multiply, one round-to-nearest-even cast; the reconstruction is a multiply then an add,
two roundings, never a fused multiply-add (``launch_options``). The table ``code`` is read from the
state, so FP4 states are served by the same kernel.

Layout: each program decodes BLOCK packed bytes into 2*BLOCK consecutive outputs. A byte's two
elements are 2j and 2j+1, and blocksize is even, so both share one absmax. When a program covers
whole blocks (BLOCK >= blocksize / 2) each scale is loaded once and broadcast over its block's bytes;
otherwise once a byte. The table is read with ``tl.gather`` (shared memory on a GPU) rather than a
global-memory gather a nibble. The two nibbles are decoded side by side and interleaved into one
contiguous store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reflora.backends.torch.quant_state import TorchQuantState, torch_dtype
from reflora.backends.triton._common import (
    INTERPRET,
    TL_DTYPES,
    absmax_of,
    base_operand,
    check_device,
    check_state,
    launch_options,
    record_launch,
    state_args,
)

__all__ = ["dequantize", "dequantize_launch"]

KERNEL = "dequant"
TOLERANCE = "EXACT"
REFERENCE = "reflora.nf4.dequantize"


@triton.jit
def _dequant_kernel(
    packed_ptr,  # uint8 (n_bytes,): two codes a byte, element 2j in the high nibble
    absmax_ptr,  # float32 (n_blocks,) when not double-quantized
    absmax_q_ptr,  # uint8 (n_blocks,) when double-quantized
    absmax2_ptr,  # float32 (ceil(n_blocks / BLOCKSIZE2),) when double-quantized
    code_ptr,  # float32 (16,): the 4-bit table
    code2_ptr,  # float32 (256,): the 8-bit map, when double-quantized
    offset,  # float32: double-quant mean
    out_ptr,  # OUT_DTYPE (n,)
    n,  # number of elements
    n_bytes,  # (n + 1) // 2, passed in so that Triton sees its divisibility and loads 16 bytes at a time
    BLOCK: tl.constexpr,  # packed bytes per program
    BLOCKSIZE: tl.constexpr,  # elements per absmax block
    BLOCKSIZE2: tl.constexpr,  # absmax values per double-quant group
    DOUBLE_QUANT: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    VIA_DTYPE: tl.constexpr,  # rounded to this dtype first (OUT_DTYPE: one rounding)
    EMULATE_BF16: tl.constexpr,  # interpreter: round to bfloat16 with integer ops (see _common)
):
    pid = tl.program_id(0).to(tl.int64)
    byte_idx = pid * BLOCK + tl.arange(0, BLOCK)
    valid = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=valid, other=0)
    # The scales first: under double quantization each is two dependent loads (absmax_q, then
    # code2[absmax_q]), and issued here they overlap the codes' load instead of waiting behind the
    # table gathers' barriers (a second DRAM round trip a program).
    # Element 2j lies in block 2j // BLOCKSIZE = j // HALF, as does element 2j + 1.
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes a block
    if BLOCK >= HALF:
        # The program covers whole blocks: one scale a block, broadcast over its HALF bytes.
        ROWS: tl.constexpr = BLOCK // HALF
        blk = pid * ROWS + tl.arange(0, ROWS)
        scale = absmax_of(
            blk,
            absmax_ptr,
            absmax_q_ptr,
            absmax2_ptr,
            code2_ptr,
            offset,
            blk * HALF < n_bytes,
            DOUBLE_QUANT,
            BLOCKSIZE2,
        )
    else:
        scale = absmax_of(
            byte_idx // HALF,
            absmax_ptr,
            absmax_q_ptr,
            absmax2_ptr,
            code2_ptr,
            offset,
            valid,
            DOUBLE_QUANT,
            BLOCKSIZE2,
        )
    # The 16 table values held on chip; tl.gather reads them from shared memory, not from L1.
    table = tl.load(code_ptr + tl.arange(0, 16))
    hi = tl.gather(table, (byte >> 4).to(tl.int32), 0)
    lo = tl.gather(table, (byte & 15).to(tl.int32), 0)
    if BLOCK >= HALF:
        hi = tl.reshape(tl.reshape(hi, (ROWS, HALF)) * scale[:, None], (BLOCK,))
        lo = tl.reshape(tl.reshape(lo, (ROWS, HALF)) * scale[:, None], (BLOCK,))
    else:
        hi = hi * scale
        lo = lo * scale
    values = base_operand(tl.interleave(hi, lo), VIA_DTYPE, OUT_DTYPE, EMULATE_BF16)  # (2*BLOCK,)
    elem = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + elem, values, mask=elem < n)  # an odd n drops the padding nibble here


def _block_bytes(n_bytes: int) -> int:
    # 2048 bytes -> 4096 outputs a program: enough bytes in flight per SM on a GPU; under the
    # interpreter, small blocks keep several programs (and their boundaries) in every test.
    return 128 if INTERPRET else min(2048, triton.next_power_of_2(n_bytes))


def dequantize_launch(
    ts: TorchQuantState, out: torch.Tensor, *, block: int | None = None, via_state: bool = False
) -> torch.Tensor:
    """Decode ``ts`` into ``out`` (contiguous, ``ts.numel`` elements, float32/float16/bfloat16).

    block: packed bytes per program (a power of two); default from the problem size.
    via_state: round each value to ``ts.dtype`` before ``out.dtype`` (Ŵ cast to out's dtype, the
    QLoRA operand: :func:`reflora.qlora.dequantized_base`), instead of once to ``out.dtype``
    (:func:`reflora.nf4.dequantize` with a dtype). The same where the two dtypes are equal.
    Returns ``out``.
    """
    check_state(ts, matrix=False)
    check_device(ts.packed, out)
    if out.dtype not in TL_DTYPES:
        raise ValueError(f"out must be float32, float16 or bfloat16, got {out.dtype}")
    if out.numel() != ts.numel or not out.is_contiguous():
        raise ValueError(f"out must be contiguous with {ts.numel} elements, got {tuple(out.shape)}")
    n_bytes = (ts.numel + 1) // 2
    block = block or _block_bytes(n_bytes)
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    grid = (triton.cdiv(n_bytes, block),)
    _dequant_kernel[grid](
        *state_args(ts),
        out,
        ts.numel,
        n_bytes,
        BLOCK=block,
        BLOCKSIZE=ts.blocksize,
        BLOCKSIZE2=ts.blocksize2,
        DOUBLE_QUANT=ts.double_quant,
        OUT_DTYPE=TL_DTYPES[out.dtype],
        VIA_DTYPE=TL_DTYPES[ts.dtype if via_state else out.dtype],
        EMULATE_BF16=INTERPRET,
        num_warps=4,
        **launch_options(ts),
    )
    record_launch(KERNEL)
    return out


def dequantize(ts: TorchQuantState, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """The tensor a 4-bit state stands for, bit-identical to :func:`reflora.nf4.dequantize`.

    ts: a :class:`TorchQuantState` (NF4 or FP4, plain or double-quantized) on the kernel device.
    dtype: output dtype (torch dtype or "float32"/"float16"/"bfloat16"); default ``ts.dtype``.
    Returns a new tensor of shape ``ts.shape``: ``dtype(f32(code[q] * absmax))`` for every element.
    """
    check_state(ts, matrix=False)  # before ts.device: a numpy QuantState is named as such
    try:
        out_dtype = ts.dtype if dtype is None else torch_dtype(dtype)
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}") from None
    out = torch.empty(ts.shape, dtype=out_dtype, device=ts.device)
    return dequantize_launch(ts, out)
