"""Batch-1 / small-batch NF4 GEMV for decoding, with the same LoRA and bias epilogue as the GEMM.

Reference: ``x @ dequantize(W)^T`` in float64 (:func:`reflora.qlora.forward` for M <= 4 rows).
Tolerance class: BOUND (``reflora.bounds``, the arithmetic ``TritonBackend.arithmetic`` declares;
as :mod:`nf4_gemm`).

With one to four rows of x the product is bound by reading W once (N*K/2 bytes of codes plus the scales),
not by arithmetic, so there is no tensor-core dot: each program streams a BN-row stripe of W along K in
BK-wide steps, decodes it in registers, rounds it to the activation dtype through the state's
(:func:`_common.base_operand_f32`, the operand rule of the GEMM, so both paths compute the same
function), and accumulates x * w with a fused multiply-add (one rounding where products and sums would
each round; for 16-bit operands the product is exact, so only overflow or underflow of a sum can tell the
two apart, and there the FMA is the more accurate) in float32 registers, summed over K once after the
loop. The whole reduction for an output element stays in one program, so the low-rank term and the bias
are added before the single rounding to the output dtype, as in the GEMM's epilogue. The stripe height BN
is chosen from the device's SM count so that a 4096x11008 matrix still gives about 4 programs per SM.

When K is even (rows start on a byte) the decode keeps the even and the odd columns apart, as they
lie in the high and low nibbles (:func:`_common.w_pairs`), and multiplies them by the even and odd
columns of x: interleaving them into one tile, as the GEMM's operand needs, cost a round trip through
shared memory a step. Columns are masked only in the step that passes the end of a row. In the
sm_90 compile of the harness's GEMV (4096 x 11008, bf16, one row) the loop went from 14.9 to 12.2
instructions a weight (10.4 with ``table="shared"``), and to 11.2 (9.4) with W rounded to bfloat16 and
widened in one packed conversion (:func:`_common.rounded_f32`); docs/triton.md has the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from reflora.backends.torch.quant_state import TorchQuantState
from reflora.backends.triton._common import (
    DEFAULT_SMS,
    INTERPRET,
    TL_DTYPES,
    base_operand_f32,
    bias_operand,
    check_device,
    check_float,
    check_power_of_two,
    check_state,
    check_table,
    launch_options,
    load_f32,
    lora_operands,
    next_pow2,
    pack_bf16,
    record_launch,
    round_to,
    scale_mode,
    sm_count,
    state_args,
    w_pairs,
    w_tile,
)

__all__ = ["GEMV_MAX_M", "GemvConfig", "nf4_gemv"]

KERNEL = "nf4_gemv"
TOLERANCE = "BOUND"
REFERENCE = "reflora.qlora.forward (float64 x @ dequantize(W)^T), M <= 4"

GEMV_MAX_M = 4


@triton.jit
def _x_tile(x_ptr, rm, k0, M, K, stride_xm, stride_xk, BK: tl.constexpr, MASK_COLS: tl.constexpr):
    """x[rm, k0:k0+BK] (BM, BK) in x's dtype, 0 outside x. ``MASK_COLS`` False: the columns lie inside
    every row, so only the rows are tested."""
    rk = k0 + tl.arange(0, BK)
    if MASK_COLS:
        x_ok = (rm[:, None] < M) & (rk[None, :] < K)
    else:
        x_ok = (rm[:, None] < M) & (rk[None, :] >= 0)
    return tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=x_ok, other=0.0)


@triton.jit
def _pair_step(
    acc3,
    x_ptr,
    packed_ptr,
    absmax_ptr,
    absmax_q_ptr,
    absmax2_ptr,
    code_ptr,
    code2_ptr,
    offset,
    rm,
    rn,
    k0,
    M,
    N,
    K,
    K_BYTES,
    stride_xm,
    stride_xk,
    W_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    TABLE_SHARED: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    MASK_COLS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    PACK_BF16: tl.constexpr,
):
    """acc3 + x[:, k0:k0+BK] * W[rn, k0:k0+BK], K even: the even and odd columns apart, from the
    high and low nibbles of each byte (:func:`_common.w_pairs`). acc3: float32 (BN, BK // 2) for one
    row of x, (BM, BN, BK // 2) for more. ``MASK_COLS`` False: the step lies inside every row."""
    dtype = x_ptr.dtype.element_ty
    x = _x_tile(x_ptr, rm, k0, M, K, stride_xm, stride_xk, BK, MASK_COLS)
    xe, xo = tl.split(tl.reshape(load_f32(x, EMULATE_BF16), (BM, BK // 2, 2)))
    even, odd = w_pairs(
        packed_ptr, absmax_ptr, absmax_q_ptr, absmax2_ptr, code_ptr, code2_ptr, offset, rn,
        k0 // 2, N, K, K_BYTES, BK, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, SCALE_MODE, TABLE_SHARED,
        MASK_COLS
    )  # fmt: skip
    even = base_operand_f32(even, W_DTYPE, dtype, EMULATE_BF16, PACK_BF16)
    odd = base_operand_f32(odd, W_DTYPE, dtype, EMULATE_BF16, PACK_BF16)
    if BM == 1:
        acc3 = tl.fma(tl.reshape(xe, (BK // 2,))[None, :], even, acc3)
        acc3 = tl.fma(tl.reshape(xo, (BK // 2,))[None, :], odd, acc3)
    else:
        acc3 = tl.fma(xe[:, None, :], even[None, :, :], acc3)
        acc3 = tl.fma(xo[:, None, :], odd[None, :, :], acc3)
    return acc3


@triton.jit
def _nf4_gemv_kernel(
    x_ptr,  # (M, K) activation dtype, strided
    packed_ptr,  # W state (N, K): see _common.w_tile
    absmax_ptr,
    absmax_q_ptr,
    absmax2_ptr,
    code_ptr,
    code2_ptr,
    offset,
    l_ptr,  # float32 (M, R) contiguous: t = (x * mask) A^T (read when HAS_LORA)
    rt_ptr,  # (R, N) float, strided: B^T (read when HAS_LORA)
    bias_ptr,  # (N,) float, contiguous (read when HAS_BIAS)
    out_ptr,  # (M, N) activation dtype, contiguous
    M,
    N,
    K,
    K_BYTES,  # K // 2: bytes a row of W when K is even (see w_tile)
    R,
    scaling,  # float32
    stride_xm,
    stride_xk,
    stride_rtr,
    stride_rtn,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_DTYPE: tl.constexpr,  # the state's dtype: Ŵ is rounded to it before the activation dtype
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIRED: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    TABLE_SHARED: tl.constexpr,  # code lookups by tl.gather from the on-chip table (see w_tile)
    BM: tl.constexpr,  # M padded to a power of two
    BN: tl.constexpr,  # rows of W a program
    BK: tl.constexpr,  # columns a step
    BR: tl.constexpr,  # R padded to a power of two
    EMULATE_BF16: tl.constexpr,
    PACK_BF16: tl.constexpr,  # round to bfloat16 with cvt.rn.bf16x2.f32 (_common.rounded_f32)
):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    dtype = x_ptr.dtype.element_ty
    # Products accumulate elementwise in registers; the cross-thread reduction over K runs once,
    # after the loop, not once a step (a step's tl.sum cost 8 barriers and 56 shuffles a thread).
    if PAIRED:
        if BM == 1:
            acc3 = tl.zeros((BN, BK // 2), dtype=tl.float32)
        else:
            acc3 = tl.zeros((BM, BN, BK // 2), dtype=tl.float32)
        k_full = (K // BK) * BK
        for k0 in range(0, k_full, BK):
            acc3 = _pair_step(
                acc3, x_ptr, packed_ptr, absmax_ptr, absmax_q_ptr, absmax2_ptr, code_ptr, code2_ptr, offset,
                rm, rn, k0, M, N, K, K_BYTES, stride_xm, stride_xk, W_DTYPE, BLOCKSIZE, BLOCKSIZE2,
                DOUBLE_QUANT, SCALE_MODE, TABLE_SHARED, BM, BK, False, EMULATE_BF16,
                PACK_BF16
            )  # fmt: skip
        if k_full < K:
            acc3 = _pair_step(
                acc3, x_ptr, packed_ptr, absmax_ptr, absmax_q_ptr, absmax2_ptr, code_ptr, code2_ptr, offset,
                rm, rn, k_full, M, N, K, K_BYTES, stride_xm, stride_xk, W_DTYPE, BLOCKSIZE, BLOCKSIZE2,
                DOUBLE_QUANT, SCALE_MODE, TABLE_SHARED, BM, BK, True, EMULATE_BF16,
                PACK_BF16
            )  # fmt: skip
    else:
        # K odd: rows start mid-byte, so each element finds its own nibble (w_tile).
        acc3 = tl.zeros((BM, BN, BK), dtype=tl.float32)
        for k0 in range(0, K, BK):
            x = _x_tile(x_ptr, rm, k0, M, K, stride_xm, stride_xk, BK, True)
            w = w_tile(
                packed_ptr,
                absmax_ptr,
                absmax_q_ptr,
                absmax2_ptr,
                code_ptr,
                code2_ptr,
                offset,
                rn,
                k0,
                N,
                K,
                K_BYTES,
                BK,
                BLOCKSIZE,
                BLOCKSIZE2,
                DOUBLE_QUANT,
                PAIRED,
                SCALE_MODE,
                TABLE_SHARED,
            )
            # The GEMM's operand, as float32:
            w = base_operand_f32(w, W_DTYPE, dtype, EMULATE_BF16, PACK_BF16)
            acc3 = tl.fma(load_f32(x, EMULATE_BF16)[:, None, :], w[None, :, :], acc3)
    if PAIRED and BM == 1:
        acc = tl.sum(acc3, axis=1)[None, :]  # (1, BN)
    else:
        acc = tl.sum(acc3, axis=2)  # (BM, BN)
    if HAS_LORA:
        rr = tl.arange(0, BR)
        lr_ok = (rm[:, None] < M) & (rr[None, :] < R)
        lt = tl.load(l_ptr + rm[:, None] * R + rr[None, :], mask=lr_ok, other=0.0)
        rt = tl.load(
            rt_ptr + rr[:, None] * stride_rtr + rn[None, :] * stride_rtn,
            mask=(rr[:, None] < R) & (rn[None, :] < N),
            other=0.0,
        )
        acc += tl.sum(lt[:, :, None] * load_f32(rt, EMULATE_BF16)[None, :, :], axis=1) * scaling
    if HAS_BIAS:
        acc += load_f32(tl.load(bias_ptr + rn, mask=rn < N, other=0.0), EMULATE_BF16)[None, :]
    out = round_to(acc, out_ptr.dtype.element_ty, EMULATE_BF16)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out, mask=(rm[:, None] < M) & (rn[None, :] < N))


@dataclass(frozen=True)
class GemvConfig:
    """W rows a program (bn) and columns a step (bk), powers of two, and how the 4-bit table is read
    (``table``: "global" or "shared", see :func:`_common.w_tile`; the same values either way)."""

    bn: int
    bk: int
    num_warps: int = 4
    table: str = "global"

    def __post_init__(self):
        check_table(self.table)
        check_power_of_two("GemvConfig", bn=(self.bn, 1), bk=(self.bk, 2), num_warps=(self.num_warps, 1))


def default_config(m: int, n: int, k: int, sms: int = DEFAULT_SMS) -> GemvConfig:
    """About 4 programs per SM on a GPU of ``sms`` SMs (:func:`_common.sm_count`; BN rounded up to a power of
    two, so 3.9 on a 132-SM H100 SXM and 4.5 on a 114-SM H100 PCIe at n = 4096), and BK so that a step has
    BM*BN*BK/2 float32 accumulators (BM*BN*BK when K is odd, decoded an element at a time: 2048 then):
    2048 (16 a thread at 4 warps) for one or two rows; 4096 for three or four, where 2048 would leave each
    thread 4 bytes of codes a step (narrow loads; in the sm_90 compile, 23.4 instructions a weight for 4
    rows against 17.7). Under the interpreter: tiles of 8 x 32 so tests cross edges."""
    if INTERPRET:
        return GemvConfig(bn=8, bk=32)
    bn = max(4, min(64, triton.next_power_of_2(max(1, n // (4 * sms)))))
    accumulators = 2048 if m <= 2 or k % 2 else 4096
    bk = max(32, min(512, 2 * accumulators // (next_pow2(m) * bn)))
    return GemvConfig(bn=bn, bk=bk)


def nf4_gemv(
    x: torch.Tensor,
    ts: TorchQuantState,
    *,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``x @ W^T [+ scaling * (t @ rt)] [+ bias]`` for at most GEMV_MAX_M rows of x.

    x: (M, K) float32/float16/bfloat16, 1 <= M <= 4, any strides. ts: W (N, K) as a 2-D state.
    lora: (t, rt, scaling): t float32 (M, r), rt (r, N) any float dtype and strides.
    bias: (N,) float. config: default :func:`default_config`.
    Returns a new contiguous (M, N) tensor in x's dtype.
    """
    check_state(ts, matrix=True)
    check_float("x", x, ndim=2)
    n, k = ts.shape
    m = x.shape[0]
    if not 1 <= m <= GEMV_MAX_M:
        raise ValueError(f"nf4_gemv takes 1..{GEMV_MAX_M} rows, got {m}; use nf4_gemm")
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns; W {ts.shape} needs {k}")
    dummy = ts.packed
    t, rt, scaling, r = lora_operands(lora, m, n, dummy)
    bias = bias_operand(bias, n)
    check_device(x, ts.packed, None if lora is None else t, None if lora is None else rt, bias)
    cfg = config or default_config(m, n, k, sm_count(x.device))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _nf4_gemv_kernel[(triton.cdiv(n, cfg.bn),)](
        x,
        *state_args(ts),
        t,
        rt,
        bias if bias is not None else dummy,
        out,
        m,
        n,
        k,
        k // 2,
        r,
        float(scaling),
        x.stride(0),
        x.stride(1),
        rt.stride(0) if lora is not None else 0,
        rt.stride(1) if lora is not None else 0,
        HAS_LORA=lora is not None,
        HAS_BIAS=bias is not None,
        W_DTYPE=TL_DTYPES[ts.dtype],
        BLOCKSIZE=ts.blocksize,
        BLOCKSIZE2=ts.blocksize2,
        DOUBLE_QUANT=ts.double_quant,
        PAIRED=k % 2 == 0,
        TABLE_SHARED=cfg.table == "shared",
        SCALE_MODE=scale_mode(k, ts.blocksize, cfg.bk),
        BM=next_pow2(m),
        BN=cfg.bn,
        BK=cfg.bk,
        BR=next_pow2(r),
        EMULATE_BF16=INTERPRET,
        PACK_BF16=pack_bf16(x.device),
        num_warps=cfg.num_warps,
        **launch_options(ts),
    )
    record_launch(KERNEL)
    return out
