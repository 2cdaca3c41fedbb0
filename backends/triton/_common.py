"""Shared pieces of the Triton kernels: the launch registry, input checks and the jit helpers that
decode NF4/FP4 tiles and round to bfloat16.

Why the bfloat16 helpers exist. Triton 3.9's CPU interpreter (``TRITON_INTERPRET=1``, what CI runs)
gets bfloat16 wrong in three places, measured here: ``x.to(tl.bfloat16)`` truncates instead of
rounding to nearest even; ``bf16.to(tl.float32)`` mis-decodes subnormals; and ``tl.dot`` on bfloat16
operands multiplies the raw 16-bit patterns as integers. On a GPU all three are correct (``cvt.rn``,
a shift, tensor cores). So when a kernel runs under the interpreter (the ``EMULATE_BF16`` constexpr)
it converts with exact integer bit arithmetic instead, and feeds the dot float32 operands holding the
same bfloat16 values: the products of bfloat16 values are exact in float32 either way, so the result
is the same function of the same inputs. On a GPU the native instructions are used.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

import torch
import triton
import triton.language as tl

from reflora.backends.torch.quant_state import TorchQuantState, check_fields
from reflora.backends.triton.backend import triton_version_problem

if _problem := triton_version_problem(triton.__version__):
    raise ImportError(_problem)

__all__ = [
    "INTERPRET",
    "check_float",
    "check_state",
    "launch_counts",
    "record_launch",
    "reset_launch_counts",
]

# Read once, at import, because @triton.jit makes the same choice at decoration time: a kernel
# decorated while TRITON_INTERPRET=1 is an interpreted function for the life of the process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_LAUNCHES: Counter[str] = Counter()


def record_launch(kernel: str) -> None:
    """Count one launch of ``kernel`` (its module-qualified name) in the registry."""
    _LAUNCHES[kernel] += 1


def launch_counts() -> dict[str, int]:
    """A copy of the launch registry: kernel name -> launches since import or the last reset.

    This is how a caller proves which implementation served a call, e.g. that ``qlora_linear`` ran
    ``nf4_gemm`` rather than a torch fallback (there is none: every op here launches a kernel or
    raises).
    """
    return dict(_LAUNCHES)


def reset_launch_counts() -> None:
    """Empty the launch registry."""
    _LAUNCHES.clear()


def check_device(*tensors: torch.Tensor | None) -> None:
    """ValueError unless all tensors share one device that can run the kernels here."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if INTERPRET:
        if device.type != "cpu":
            raise ValueError(f"under TRITON_INTERPRET=1 the kernels take CPU tensors, got {device}")
    elif device.type != "cuda":
        raise ValueError(
            f"Triton kernels need CUDA tensors (got {device}); on a CPU set TRITON_INTERPRET=1 before "
            "importing reflora.backends.triton"
        )


def check_float(name: str, t: torch.Tensor, ndim: int | None = None) -> None:
    """ValueError unless ``t`` is a float32/float16/bfloat16 tensor (of ``ndim`` dimensions if given)
    whose elements the kernels can address with int32 offsets."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    check_reach(name, t)


def lora_operands(lora, m: int, n: int, dummy: torch.Tensor, cols: str = "N") -> tuple:
    """(l, rt, scaling, r) for the kernels' low-rank epilogue ``scaling * (l @ rt)`` on an (m, n)
    output: ``lora`` = (l float32 (m, r), rt float (r, n) any strides, scaling), l made contiguous; or
    (dummy, dummy, 0.0, 1) when ``lora`` is None. ``cols`` names n in the error message."""
    if lora is None:
        return dummy, dummy, 0.0, 1
    left, rt, scaling = lora
    check_float("lora right factor", rt, ndim=2)
    if left.dtype != torch.float32 or left.ndim != 2 or left.shape[0] != m or rt.shape != (left.shape[1], n):
        raise ValueError(
            f"lora factors must be float32 (M={m}, r) and (r, {cols}={n}), got {tuple(left.shape)} "
            f"{left.dtype} and {tuple(rt.shape)}"
        )
    return left.contiguous(), rt, scaling, left.shape[1]


def bias_operand(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The bias as the kernels read it: a contiguous float (n,) tensor, or None."""
    if bias is None:
        return None
    check_float("bias", bias, ndim=1)
    if bias.shape[0] != n:
        raise ValueError(f"bias must have {n} elements, got {bias.shape[0]}")
    return bias.contiguous()


def check_state(ts: TorchQuantState, *, matrix: bool) -> None:
    """ValueError unless ``ts`` is a well-formed 4-bit state the kernels can read (a matrix if asked):
    :func:`check_fields`, and a blocksize2 that is a power of two (the kernels are tested with those;
    bitsandbytes and Hugging Face use 256)."""
    if not isinstance(ts, TorchQuantState):
        raise ValueError(f"expected a TorchQuantState, got {type(ts).__name__}")
    if matrix and len(ts.shape) != 2:
        raise ValueError(f"the quantized weight must be 2-D (out, in), got shape {ts.shape}")
    n = ts.numel
    if n == 0:
        raise ValueError("the quantized tensor is empty")
    if n >= 2**31:
        raise ValueError(f"{n} elements: the kernels index with int32 and take fewer than 2**31")
    check_fields(ts)
    if ts.double_quant:
        check_power_of_two("state", blocksize2=(ts.blocksize2, 1))


def check_positive_int(owner: str, **values: int) -> None:
    """ValueError unless every value is an int >= 1 (True is not)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")


def check_power_of_two(owner: str, **sizes: int) -> None:
    """ValueError unless every size is a power of two at least its minimum (``name=(value, minimum)``)."""
    for name, (value, least) in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least or value & (value - 1):
            raise ValueError(f"{owner}.{name} must be a power of two >= {least}, got {value!r}")


def state_args(ts: TorchQuantState) -> tuple:
    """The kernels' W-state arguments: packed, absmax, absmax_q, absmax2, code, code2, offset.

    Pointers a state does not have are filled with ``packed``: the DOUBLE_QUANT constexpr guarantees
    they are never read.
    """
    if ts.double_quant:
        return (ts.packed, ts.packed, ts.absmax_q, ts.absmax2, ts.code, ts.code2, float(ts.offset))
    return (ts.packed, ts.absmax, ts.packed, ts.packed, ts.code, ts.packed, 0.0)


def launch_options(ts: TorchQuantState | None = None) -> dict:
    """Compile options every launch passes.

    ``enable_fp_fusion=False``: the double-quant reconstruction ``f32(f32(code2[q] * absmax2) + offset)``
    rounds twice; with fusion on, LLVM and ptxas may contract it into one FMA, which rounds once and
    changes ~6.5% of a normal weight's absmax values by an ulp (docs/dialects.md, bnb-cuda), and a block
    far below the offset by many (docs/bounds.md §9). Turning fusion off per
    launch is Triton's own switch for this (it also passes ``--fmad=false`` to ptxas). It is passed
    explicitly on every launch so that the kernels do not depend on Triton's default, which changes in 3.10.
    """
    del ts  # one policy for every state: contraction is never wanted in these kernels
    return {"enable_fp_fusion": False}


def scale_mode(k: int, blocksize: int, tile_cols: int) -> int:
    """w_tile's SCALE_MODE for W with k columns read in tiles tile_cols wide (a power of two).

    1: one absmax per tile row; 2: tile_cols // blocksize per row; 0: blocks can straddle two rows
    (k is not a multiple of blocksize), so each element picks among the few blocks its tile row touches.
    """
    if k % blocksize:
        return 0
    return 1 if blocksize % tile_cols == 0 else 2


def next_pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(int(n)))


# ---------------------------------------------------------------------------------------------
# jit helpers


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def bf16_to_f32(v):
    """bfloat16 tensor -> float32, exactly, by moving the 16 bits to the top of a float32."""
    bits = v.to(tl.uint16, bitcast=True).to(tl.uint32)
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16(v):
    """float32 tensor -> bfloat16, round to nearest, ties to even; NaN stays a quiet NaN.

    Adding 0x7FFF plus the lowest kept bit, then truncating, is round-to-nearest-even on the bit
    pattern; a carry out of the mantissa moves into the exponent, which is the right answer (up to
    inf at the top of the range).
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    bits = tl.where(v != v, 0x7FC0, bits)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def load_f32(v, EMULATE_BF16: tl.constexpr):
    """A loaded float tensor widened to float32 (exact for every input dtype)."""
    if EMULATE_BF16 and v.dtype == tl.bfloat16:
        return bf16_to_f32(v)
    return v.to(tl.float32)


@triton.jit
def round_to(v, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """float32 tensor -> ``dtype``, one round-to-nearest-even."""
    if dtype == tl.float32:
        return v
    elif EMULATE_BF16 and dtype == tl.bfloat16:
        return f32_to_bf16(v)
    else:
        return v.to(dtype)


@triton.jit
def base_operand(w, W_DTYPE: tl.constexpr, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """A decoded float32 tile of W as a product's operand in the activation dtype ``dtype``: Ŵ, the
    weight the state stands for, is in the state's dtype ``W_DTYPE`` (reflora.qlora), so the float32
    value is rounded to W_DTYPE first and then to ``dtype`` (two roundings when the dtypes differ, as
    ``dequantize(state).to(dtype)``; one when they are the same)."""
    if W_DTYPE != dtype:
        w = load_f32(round_to(w, W_DTYPE, EMULATE_BF16), EMULATE_BF16)
    return round_to(w, dtype, EMULATE_BF16)


@triton.jit
def rounded_f32(v, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr, PACK_BF16: tl.constexpr):
    """float32 tensor -> the float32 value of ``round_to(v, dtype)``: one round-to-nearest-even to
    ``dtype``, widened back exactly.

    For bfloat16 with ``PACK_BF16`` (:func:`pack_bf16`) this is one instruction, not two:
    ``cvt.rn.bf16x2.f32 d, a, b`` rounds a and b to bfloat16 and packs them with a in the high half
    (PTX ISA, cvt); with b = 0 the high half holds bf16(a) and the low half is zero, which is the
    float32 bit pattern of bf16(a) itself. The plain conversion leaves bf16(a) in the low half and
    needs a shift to widen it. Same rounding (to inf past the largest finite), a NaN stays a NaN,
    subnormals are kept (no ``.ftz``)."""
    if dtype == tl.float32:
        return v
    elif dtype == tl.bfloat16 and PACK_BF16 and not EMULATE_BF16:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 z; mov.f32 z, 0f00000000; cvt.rn.bf16x2.f32 $0, $1, z; }",
            "=r,f",
            [v],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        ).to(tl.float32, bitcast=True)
    else:
        return load_f32(round_to(v, dtype, EMULATE_BF16), EMULATE_BF16)


@triton.jit
def base_operand_f32(
    w, W_DTYPE: tl.constexpr, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr, PACK_BF16: tl.constexpr
):
    """The float32 value of :func:`base_operand`: W rounded to the state's dtype, then to ``dtype``,
    for kernels that multiply in float32 (the GEMV's fused multiply-adds)."""
    if W_DTYPE != dtype:
        w = rounded_f32(w, W_DTYPE, EMULATE_BF16, PACK_BF16)
    return rounded_f32(w, dtype, EMULATE_BF16, PACK_BF16)


@triton.jit
def dot_operand(v, EMULATE_BF16: tl.constexpr):
    """A tl.dot operand: itself, or under the interpreter a bfloat16 tile as float32 (same values)."""
    if EMULATE_BF16 and v.dtype == tl.bfloat16:
        return bf16_to_f32(v)
    return v


@triton.jit
def absmax_of(
    blk,  # int tensor: block indices, any shape
    absmax_ptr,  # float32 (n_blocks,): plain absmax
    absmax_q_ptr,  # uint8 (n_blocks,): double-quant codes
    absmax2_ptr,  # float32 (ceil(n_blocks / BLOCKSIZE2),): double-quant group scales
    code2_ptr,  # float32 (256,): the 8-bit dynamic map
    offset,  # float32 scalar: the mean subtracted before double quantization
    mask,  # bool tensor like blk: which indices are real
    DOUBLE_QUANT: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
):
    """float32 absmax of each block index in ``blk``: stored, or f32(f32(code2[q] * absmax2) + offset).

    The reconstruction is written as a multiply then an add; the launch's enable_fp_fusion=False keeps
    them two roundings (see launch_options).
    """
    if DOUBLE_QUANT:
        q = tl.load(absmax_q_ptr + blk, mask=mask, other=0)
        scale2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        value2 = tl.load(code2_ptr + q.to(tl.int32), mask=mask, other=0.0)
        return value2 * scale2 + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


TABLES = ("global", "shared")


def check_table(table: str) -> None:
    """ValueError unless ``table`` names a way of reading the 4-bit table (w_tile's TABLE_SHARED)."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}")


@triton.jit
def lookup(code_ptr, idx, TABLE_SHARED: tl.constexpr):
    """code[idx] for a 2-D int32 tile of indices 0..15 (see w_tile's TABLE_SHARED)."""
    if TABLE_SHARED:
        table = tl.load(code_ptr + tl.arange(0, 16))
        flat = tl.reshape(idx, (idx.shape[0] * idx.shape[1],))
        return tl.reshape(tl.gather(table, flat, 0), (idx.shape[0], idx.shape[1]))
    else:
        return tl.load(code_ptr + idx)


@triton.jit
def nibble_values(packed_ptr, code_ptr, rows, pair, K_BYTES, mask, TABLE_SHARED: tl.constexpr):
    """(code[high nibble], code[low nibble]) of bytes ``pair`` (BP,) of rows ``rows`` (BR,) of W, K
    even (a row is K_BYTES whole bytes): float32 (BR, BP) tiles, the elements 2j and 2j + 1 of each
    row's bytes. Bytes outside ``mask`` read as 0 (code[0])."""
    # Widened before the nibbles are taken: on uint8, each shift is followed by a zero-extension.
    byte = tl.load(packed_ptr + rows[:, None] * K_BYTES + pair[None, :], mask=mask, other=0).to(tl.int32)
    return lookup(code_ptr, byte >> 4, TABLE_SHARED), lookup(code_ptr, byte & 15, TABLE_SHARED)


@triton.jit
def scale_tile(
    absmax_ptr,
    absmax_q_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    rows,  # int32 (BR,): row indices of W
    start,  # int32 scalar: the tile's first unit within a row
    N,  # rows of W
    row_units,  # units a row: K elements, or K // 2 bytes
    BU: tl.constexpr,  # units in the tile's width
    UNIT_BLOCK: tl.constexpr,  # units a quantization block: BLOCKSIZE elements, or BLOCKSIZE // 2 bytes
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # how absmax is gathered; scale_mode() above
):
    """float32 (BR, BU): the absmax of the block that each unit of W[rows, start:start + BU] lies in,
    where a unit is an element, or a byte of two elements (:func:`w_pairs`: K and the blocksize are
    even, so both elements of a byte share a block). Finite for rows outside W (their loads are masked:
    0.0, or the double-quant offset)."""
    if SCALE_MODE == 1:
        # The tile's units lie in one block of each row: one scale a row.
        blk = (rows * row_units + start) // UNIT_BLOCK
        scale = absmax_of(
            blk, absmax_ptr, absmax_q_ptr, absmax2_ptr, code2_ptr, offset, rows < N, DOUBLE_QUANT, BLOCKSIZE2
        )
        scale = tl.broadcast_to(scale[:, None], (rows.shape[0], BU))
    elif SCALE_MODE == 2:
        # The tile's units are BU // UNIT_BLOCK whole blocks of each row: one scale a block.
        PER_ROW: tl.constexpr = BU // UNIT_BLOCK
        blk = (rows[:, None] * row_units + start) // UNIT_BLOCK + tl.arange(0, PER_ROW)[None, :]
        ok = (rows[:, None] < N) & (start + tl.arange(0, PER_ROW)[None, :] * UNIT_BLOCK < row_units)
        scale = absmax_of(
            blk, absmax_ptr, absmax_q_ptr, absmax2_ptr, code2_ptr, offset, ok, DOUBLE_QUANT, BLOCKSIZE2
        )
        scale = tl.broadcast_to(scale[:, :, None], (rows.shape[0], PER_ROW, UNIT_BLOCK))
        scale = tl.reshape(scale, (rows.shape[0], BU))
    else:
        # General: blocks may straddle rows (K not a multiple of blocksize). A tile row's BU
        # consecutive units touch at most SPAN blocks (2 when BU <= UNIT_BLOCK): gather SPAN scales
        # a row and let each unit pick its block's, rather than one gather a unit (whose pipelined
        # copies would take BR * BU * 9 bytes of shared memory a stage with double quant).
        SPAN: tl.constexpr = (BU + UNIT_BLOCK - 2) // UNIT_BLOCK + 1
        units = start + tl.arange(0, BU)
        first = (rows * row_units + start) // UNIT_BLOCK  # (BR,): the block of each row's first unit
        last = (rows * row_units + tl.minimum(start + BU, row_units) - 1) // UNIT_BLOCK
        # 0..SPAN-1 inside W:
        pick = (rows[:, None] * row_units + units[None, :]) // UNIT_BLOCK - first[:, None]
        scale = tl.zeros((rows.shape[0], BU), dtype=tl.float32)
        for j in tl.static_range(SPAN):
            blk = first + j
            ok = (rows < N) & (blk <= last)
            s = absmax_of(
                blk, absmax_ptr, absmax_q_ptr, absmax2_ptr, code2_ptr, offset, ok, DOUBLE_QUANT, BLOCKSIZE2
            )
            scale = tl.where(pick == j, s[:, None], scale)
    return scale


@triton.jit
def w_pairs(
    packed_ptr,  # uint8 (N*K/2,): codes, element 2j in the high nibble; K even
    absmax_ptr,
    absmax_q_ptr,
    absmax2_ptr,
    code_ptr,  # float32 (16,): the 4-bit table
    code2_ptr,
    offset,
    rows,  # int32 (BR,): row indices of W (out dimension)
    pair0,  # int32 scalar: the tile's first byte within a row (a multiple of BC // 2)
    N,  # rows of W
    K,  # columns of W (even)
    K_BYTES,  # K // 2, passed in so that Triton sees its divisibility by 16 and loads 16 bytes at a time
    BC: tl.constexpr,  # columns in the tile: BC // 2 bytes
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # scale_mode(K, BLOCKSIZE, BC)
    TABLE_SHARED: tl.constexpr,  # see w_tile
    MASK_COLS: tl.constexpr,  # False: the caller knows that the tile's bytes all lie inside a row
):
    """(even, odd): float32 (BR, BC // 2) tiles, f32(code[q] * absmax) for W[rows, 2 * (pair0 + j)]
    and W[rows, 2 * (pair0 + j) + 1]: the elements of :func:`w_tile` for K even, not interleaved, for a
    kernel that can consume them as they lie in the bytes. 0.0 outside W.

    ``MASK_COLS`` False drops the column test, whose select costs an instruction an element, from a loop's
    full steps; rows outside W still load as zero codes and masked scales (0.0, or the double-quant
    offset), so their values are finite, and the kernel does not store them. The test is needed where the
    tile passes the end of a row: there the padding would take the last block's scale, and a scale of inf
    (which double quantization can produce, docs/findings.md) times the padding's code would put a NaN
    into a row that should sum to inf.
    """
    pair = pair0 + tl.arange(0, BC // 2)
    if MASK_COLS:
        inside = (rows[:, None] < N) & (pair[None, :] < K_BYTES)
    else:
        inside = (rows[:, None] < N) & (pair[None, :] >= 0)
    even, odd = nibble_values(packed_ptr, code_ptr, rows, pair, K_BYTES, inside, TABLE_SHARED)
    scale = scale_tile(
        absmax_ptr, absmax_q_ptr, absmax2_ptr, code2_ptr, offset, rows, pair0, N, K_BYTES, BC // 2,
        BLOCKSIZE // 2, BLOCKSIZE2, DOUBLE_QUANT, SCALE_MODE
    )  # fmt: skip
    even = even * scale
    odd = odd * scale
    if MASK_COLS:
        even = tl.where(inside, even, 0.0)
        odd = tl.where(inside, odd, 0.0)
    return even, odd


@triton.jit
def w_tile(
    packed_ptr,  # uint8 (ceil(N*K/2),): codes, element 2j in the high nibble
    absmax_ptr,
    absmax_q_ptr,
    absmax2_ptr,
    code_ptr,  # float32 (16,): the 4-bit table
    code2_ptr,
    offset,
    rows,  # int32 (BR,): row indices of W (out dimension)
    col0,  # int32 scalar: first column of the tile (a multiple of BC)
    N,  # rows of W
    K,  # columns of W
    K_BYTES,  # K // 2, passed in so that Triton sees its divisibility by 16 and loads 16 bytes at a time
    BC: tl.constexpr,  # columns in the tile
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIRED: tl.constexpr,  # K even: a row starts on a byte, so bytes load whole and split in two
    SCALE_MODE: tl.constexpr,  # how absmax is gathered; scale_mode() above
    TABLE_SHARED: tl.constexpr,  # look codes up with tl.gather from the table held on chip, not tl.load
):
    """float32 (BR, BC): f32(code[q] * absmax) for W[rows, col0:col0+BC]; 0.0 outside W.

    This is the value :func:`reflora.nf4.dequantize` computes before its final cast, element for
    element, so casting it once gives the oracle's bits.

    The 16-entry table lookup is the tile's one gather. ``TABLE_SHARED`` False: a ``tl.load`` from
    ``code_ptr`` an element (global memory, cached in L1; in a pipelined loop Triton stages these as
    4-byte asynchronous copies). True: the table is loaded once and each element reads it with
    ``tl.gather`` (shared memory on a GPU), as the dequantize kernel does. Same values either way;
    which is faster is for the GPU harness to measure (``table=`` in GemmConfig / GemvConfig).
    """
    cols = col0 + tl.arange(0, BC)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    if PAIRED:
        pair = col0 // 2 + tl.arange(0, BC // 2)
        byte_ok = (rows[:, None] < N) & (pair[None, :] < K_BYTES)
        hi, lo = nibble_values(packed_ptr, code_ptr, rows, pair, K_BYTES, byte_ok, TABLE_SHARED)
        value = tl.interleave(hi, lo)  # (BR, BC): element 2j from the high nibble
    else:
        elem = rows[:, None] * K + cols[None, :]
        byte = tl.load(packed_ptr + elem // 2, mask=inside, other=0)
        nib = (byte >> (4 - 4 * (elem % 2)).to(tl.uint8)) & 15
        value = lookup(code_ptr, nib.to(tl.int32), TABLE_SHARED)
    scale = scale_tile(
        absmax_ptr, absmax_q_ptr, absmax2_ptr, code2_ptr, offset, rows, col0, N, K, BC, BLOCKSIZE,
        BLOCKSIZE2, DOUBLE_QUANT, SCALE_MODE
    )  # fmt: skip
    return tl.where(inside, value * scale, 0.0)


DEFAULT_SMS = 132
"""SMs assumed where no CUDA device can be asked (the interpreter, ``meta`` tensors): an H100 SXM's."""


@functools.cache  # asked on every GEMV launch; a device's answer never changes
def pack_bf16(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use ``cvt.rn.bf16x2.f32`` (:func:`rounded_f32`): an NVIDIA CUDA
    device of compute capability 8.0 or newer, where PTX has it, or a ``meta`` device (the compile
    check, benchmarks/_gpu_compile_check.py, which targets sm_80 or newer). Not under the
    interpreter, which runs no PTX, nor on ROCm, whose devices torch also calls ``cuda``."""
    if INTERPRET:
        return False
    if device.type == "meta":
        return True
    return (
        device.type == "cuda"
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


@functools.cache  # asked on every launch without a config; a device's SMs never change
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100 SXM, 114 on an H100 PCIe), read from
    the driver for a CUDA device; :data:`DEFAULT_SMS` for any other device (the interpreter's CPU
    tensors, ``meta`` tensors), where grid sizes only need to be plausible."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_reach(name: str, t: torch.Tensor) -> None:
    """ValueError unless every element of ``t`` (any dtype) lies within int32 offsets of its first:
    :func:`check_float`'s reach rule for tensors whose dtype it does not restrict (a dropout mask)."""
    if t.numel() >= 2**31:  # a broadcast view (stride 0) can have that many and span one
        raise ValueError(f"{name} has {t.numel()} elements; the kernels index with int32 (< 2**31)")
    reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    if reach >= 2**31:
        raise ValueError(f"{name} spans {reach + 1} elements; the kernels index with int32 (< 2**31)")
