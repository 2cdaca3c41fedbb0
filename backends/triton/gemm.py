"""NF4 matmul with in-tile dequantization, and its low-rank (LoRA) epilogue.

Reference: ``x @ dequantize(W)^T`` in float64 (:func:`reflora.qlora.forward`, and ``grad_y @ W`` for
:func:`reflora.qlora.backward`'s grad_x). Tolerance class: BOUND (``reflora.bounds``, fused arithmetic).

One kernel, two orientations of the same frozen W (out=N, in=K), stored 4-bit:

    forward  (W_T=False):  out (M, N) = a (M, K) @ W^T          + scaling * (l (M, r) @ rt (r, N)) + bias
    grad_x   (W_T=True):   out (M, K) = a (M, N) @ W            + scaling * (l (M, r) @ rt (r, K)) * mask

with l = t = (x * mask) A^T, rt = B^T in the forward and l = u = grad_y B, rt = A for grad_x. Writing P
for the output columns and Q for the reduction, each program owns a (BM, BP) output tile and walks Q
in BQ steps: it loads the packed bytes of a W tile, decodes them with their block scales
(:func:`_common.w_tile`; the double-quant reconstruction included), rounds the tile to the
activation dtype -- exactly ``reflora.nf4.dequantize(state).astype(dtype)``: to the state's dtype,
then to the activation dtype where the two differ (:func:`_common.base_operand`) -- and feeds it to
``tl.dot`` with float32 accumulation. The low-rank term is a few more small dots (r in chunks of LORA_CHUNK)
added to the float32 accumulator before the single rounding to the output dtype: no second pass
over the output.

From ``DEQUANT_FIRST_MIN_M`` rows (``GemmConfig.dequantize_first``) the decode leaves the tile: W is
dequantized once by the dequantize kernel (:func:`reflora.backends.triton.dequant.dequantize_launch`
with ``via_state``, bit-identical to the in-tile decode) into a scratch buffer of the activation
dtype, freed when the call returns, and the same kernel (``DENSE_W``) loads W tiles from it like any
dense operand, which Triton pipelines with asynchronous copies and overlapped tensor-core MMAs.
Same W bits, same dots, same epilogue: the declared arithmetic and the bound do not change.

Arithmetic: operands in the activation dtype (float32 operands use an IEEE dot, not tf32), float32
accumulation, t/u kept in float32, one final rounding. No division anywhere, so no fast-math
reciprocal; launches use enable_fp_fusion=False (``_common.launch_options``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from reflora.backends.torch.quant_state import TorchQuantState
from reflora.backends.triton._common import (
    INTERPRET,
    TL_DTYPES,
    base_operand,
    bias_operand,
    check_device,
    check_float,
    check_positive_int,
    check_power_of_two,
    check_state,
    check_table,
    dot_operand,
    launch_options,
    load_f32,
    lora_operands,
    next_pow2,
    record_launch,
    round_to,
    scale_mode,
    state_args,
    w_tile,
)
from reflora.backends.triton.dequant import dequantize_launch

__all__ = ["DEQUANT_FIRST_MIN_M", "GemmConfig", "nf4_gemm"]

KERNEL = "nf4_gemm"
TOLERANCE = "BOUND"
REFERENCE = "reflora.qlora.forward / backward (float64 x @ dequantize(W)^T, grad_y @ dequantize(W))"


@triton.jit
def _low_rank(
    l_ptr,  # float32 (M, R) contiguous
    rt_ptr,  # (R, P) float, strided
    rm,  # (BM,) output rows
    rp,  # (BP,) output columns
    M,
    P,
    R,
    stride_rtr,
    stride_rtp,
    BM: tl.constexpr,
    BP: tl.constexpr,
    BR: tl.constexpr,  # rank chunk
    ONE_CHUNK: tl.constexpr,  # R <= BR: one dot, no loop (fewer registers)
    EMULATE_BF16: tl.constexpr,
):
    """float32 (BM, BP) ``l[rm, :] @ rt[:, rp]`` in rank chunks of BR (IEEE float32 dots), so that its
    tiles (and their shared memory) do not grow with R; the loop is not pipelined (num_stages=1): it
    runs once a tile, after the main loop."""
    low = tl.zeros((BM, BP), dtype=tl.float32)
    for r0 in tl.range(0, 1 if ONE_CHUNK else R, BR, num_stages=1):
        rr = r0 + tl.arange(0, BR)
        lt = tl.load(
            l_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0
        )
        rt = tl.load(
            rt_ptr + rr[:, None] * stride_rtr + rp[None, :] * stride_rtp,
            mask=(rr[:, None] < R) & (rp[None, :] < P),
            other=0.0,
        )
        low = tl.dot(lt, load_f32(rt, EMULATE_BF16), low, input_precision="ieee")
    return low


@triton.jit
def _nf4_gemm_kernel(
    a_ptr,  # (M, Q) activation dtype, strided: x (forward) or grad_y (grad_x)
    w_ptr,  # (N_W, K_W) activation dtype, contiguous: W already dequantized (read when DENSE_W)
    packed_ptr,  # W state: see _common.w_tile (read unless DENSE_W)
    absmax_ptr,
    absmax_q_ptr,
    absmax2_ptr,
    code_ptr,
    code2_ptr,
    offset,
    l_ptr,  # float32 (M, R) contiguous: t or u (read when HAS_LORA)
    rt_ptr,  # (R, P) float, strided: B^T or A (read when HAS_LORA)
    mask_ptr,  # (M, P) float, strided: dropout mask on the low-rank term (read when HAS_MASK)
    bias_ptr,  # (P,) float, contiguous (read when HAS_BIAS)
    out_ptr,  # (M, P) activation dtype, contiguous
    M,
    P,  # output columns: N (forward) or K (grad_x)
    Q,  # reduction length: K (forward) or N (grad_x)
    R,  # LoRA rank
    N_W,  # rows of W
    K_W,  # columns of W
    K_BYTES,  # K_W // 2: bytes a row of W when K_W is even (see w_tile)
    scaling,  # float32 LoRA scaling
    stride_am,
    stride_aq,
    stride_rtr,
    stride_rtp,
    stride_mm,
    stride_mp,
    W_T: tl.constexpr,  # False: out = a @ W^T; True: out = a @ W
    W_DTYPE: tl.constexpr,  # the state's dtype: Ŵ is rounded to it before the activation dtype
    DENSE_W: tl.constexpr,  # W tiles loaded from w_ptr instead of decoded from the 4-bit state
    HAS_LORA: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIRED: tl.constexpr,  # K_W even (see w_tile)
    SCALE_MODE: tl.constexpr,  # absmax gather pattern (see w_tile)
    TABLE_SHARED: tl.constexpr,  # code lookups by tl.gather from the on-chip table (see w_tile)
    BM: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BR: tl.constexpr,  # the rank's chunk in the low-rank epilogue (LORA_CHUNK)
    ONE_CHUNK: tl.constexpr,  # R <= BR
    GROUP_M: tl.constexpr,  # M tiles walked together, so that W tiles are reused from L2
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 operands (never tf32); moot for 16-bit ones
    EMULATE_BF16: tl.constexpr,
):
    # Grouped ordering: consecutive programs share W columns (the 4-bit operand) across GROUP_M rows.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_p = tl.cdiv(P, BP)
    per_group = GROUP_M * tiles_p
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_p = (pid % per_group) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rp = pid_p * BP + tl.arange(0, BP)
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for q0 in range(0, Q, BQ):
        rq = q0 + tl.arange(0, BQ)
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + rq[None, :] * stride_aq,
            mask=(rm[:, None] < M) & (rq[None, :] < Q),
            other=0.0,
        )
        if DENSE_W:
            # W already in the activation dtype (bit-identical to the decode below): a plain tile load.
            # Forward: (BQ, BP) = W[rp, rq]^T; grad_x: (BQ, BP) = W[rq, rp]. Q, P follow the orientation.
            if W_T:
                w_offs = rq[:, None] * K_W + rp[None, :]
            else:
                w_offs = rp[None, :] * K_W + rq[:, None]
            w = tl.load(w_ptr + w_offs, mask=(rq[:, None] < Q) & (rp[None, :] < P), other=0.0)
            w = dot_operand(w, EMULATE_BF16)
        else:
            # Forward: W rows are the output columns, tile (BP, BQ) = W[rp, rq], transposed for the dot.
            # grad_x: W rows are the reduction, tile (BQ, BP) = W[rq, rp], already the dot's (Q, P) layout.
            if W_T:
                rows, col0 = rq, pid_p * BP
            else:
                rows, col0 = rp, q0
            w = w_tile(
                packed_ptr,
                absmax_ptr,
                absmax_q_ptr,
                absmax2_ptr,
                code_ptr,
                code2_ptr,
                offset,
                rows,
                col0,
                N_W,
                K_W,
                K_BYTES,
                BP if W_T else BQ,
                BLOCKSIZE,
                BLOCKSIZE2,
                DOUBLE_QUANT,
                PAIRED,
                SCALE_MODE,
                TABLE_SHARED,
            )
            if not W_T:
                w = tl.trans(w)
        if not DENSE_W:
            # W's rounding: to the state's dtype (Ŵ), then the activation dtype, as bnb's backward does.
            w = dot_operand(base_operand(w, W_DTYPE, dtype, EMULATE_BF16), EMULATE_BF16)
        acc = tl.dot(dot_operand(a, EMULATE_BF16), w, acc, input_precision=DOT_PRECISION)

    if HAS_LORA:
        low = _low_rank(
            l_ptr, rt_ptr, rm, rp, M, P, R, stride_rtr, stride_rtp, BM, BP, BR, ONE_CHUNK, EMULATE_BF16
        )
        low = low * scaling
        if HAS_MASK:
            m = tl.load(
                mask_ptr + rm[:, None] * stride_mm + rp[None, :] * stride_mp,
                mask=(rm[:, None] < M) & (rp[None, :] < P),
                other=0.0,
            )
            low = low * load_f32(m, EMULATE_BF16)
        acc += low
    if HAS_BIAS:
        acc += load_f32(tl.load(bias_ptr + rp, mask=rp < P, other=0.0), EMULATE_BF16)[None, :]
    out = round_to(acc, out_ptr.dtype.element_ty, EMULATE_BF16)
    tl.store(out_ptr + rm[:, None] * P + rp[None, :], out, mask=(rm[:, None] < M) & (rp[None, :] < P))


# From this many rows of a up, W is dequantized once into a scratch buffer and the GEMM reads it as
# a dense operand (GemmConfig.dequantize_first). The in-tile decode is repeated by each of the
# ceil(M / BM) row tiles that reads a W tile (64 times at M = 8192, BM = 128), and in the sm_90
# machine code it is ~440 instructions a thread per 128x128x64 step, with the tensor-core MMA waited
# on every step; the dense-W loop is ~110-120, with one MMA group left in flight. The extra pass
# costs a read of the 4-bit W and a write of the 16-bit one (~37 us for a 4096 x 11008 W at 3 TB/s,
# an estimate), small against the GEMM from a few row tiles up; 256 rows (two 128-row tiles) is a
# first choice for the GPU run's tile phase to confirm or move. Below it the decode stays in the
# tile: a small M is bandwidth-bound, and the 4-bit W is the smaller read.
DEQUANT_FIRST_MIN_M = 256


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes (powers of two, >= 16), the L2 grouping, launch resources, how the 4-bit table is
    read (``table``: "global" or "shared", see :func:`_common.w_tile`; the same values either way),
    and whether W is first dequantized into a scratch buffer of the activation dtype
    (``dequantize_first``, see ``DEQUANT_FIRST_MIN_M``; the same bits of W either way)."""

    bm: int
    bp: int
    bq: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    table: str = "global"
    dequantize_first: bool = False

    def __post_init__(self):
        check_table(self.table)
        check_power_of_two("GemmConfig", bm=(self.bm, 16), bp=(self.bp, 16), bq=(self.bq, 16),
                           num_warps=(self.num_warps, 1))  # fmt: skip
        check_positive_int("GemmConfig", group_m=self.group_m, num_stages=self.num_stages)
        if not isinstance(self.dequantize_first, bool):
            raise ValueError(f"GemmConfig.dequantize_first must be a bool, got {self.dequantize_first!r}")


def default_config(
    m: int,
    p: int,
    q: int,
    blocksize: int,
    dtype: torch.dtype = torch.bfloat16,
    scale_per_element: bool = False,
) -> GemmConfig:
    """Heuristic tiles for an (m, q) @ (q, p) product in ``dtype`` over W of ``blocksize`` blocks;
    ``scale_per_element``: W's column count is not a multiple of the blocksize (w_tile's SCALE_MODE 0).

    On a GPU, 16-bit activations: 128x128 output tiles (64 rows or fewer for small M), 64-wide
    reduction steps but never wider than a quantization block, so each W-tile row has one absmax;
    3 stages, 2 when blocks straddle rows (SCALE_MODE 0). Rows whose length is not a multiple of 16
    elements (p or q) cannot be read in 16-byte pieces, and at 128x128 the scalar addresses and the
    LoRA epilogue's second float32 tile spill: 64 columns then. float32 activations (IEEE dots on CUDA
    cores, whose operands are held in registers): 32x64 tiles, 16-wide steps, 2 stages. From
    ``DEQUANT_FIRST_MIN_M`` rows W is dequantized first and read as a dense operand (4 stages for
    16-bit). Each of these compiles for sm_90 within its shared memory and with at most a few
    spilled registers outside the main loop (``benchmarks/_gpu_compile_check.py --sweep``). Under the
    interpreter: 16-32 wide tiles, so that test shapes cross several tiles and ragged edges."""
    first = m >= DEQUANT_FIRST_MIN_M
    if INTERPRET:
        return GemmConfig(bm=next_pow2(min(m, 32), 16), bp=32, bq=16, group_m=2, dequantize_first=first)
    if dtype == torch.float32:
        return GemmConfig(bm=next_pow2(min(m, 32), 16), bp=64, bq=16, group_m=8, num_warps=4, num_stages=2,
                          dequantize_first=first)  # fmt: skip
    bp = 64 if p % 16 or q % 16 else 128
    if first:
        return GemmConfig(bm=128, bp=bp, bq=64, group_m=8, num_warps=8, num_stages=4, dequantize_first=True)
    bm = 128 if m > 64 else next_pow2(m, 16)
    return GemmConfig(bm=bm, bp=bp, bq=min(64, blocksize), group_m=8, num_warps=8 if bm == 128 else 4,
                      num_stages=2 if scale_per_element else 3)  # fmt: skip


# The low-rank epilogue's rank chunk (the kernel's BR): its float32 tiles (BM, 16) and (16, BP) and
# the shared memory Triton gives them do not grow with r. 32 spills at 128x128 tiles, 8 warps.
LORA_CHUNK = 16


def nf4_gemm(
    a: torch.Tensor,
    ts: TorchQuantState,
    *,
    transposed: bool = False,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """``a @ W^T`` (or ``a @ W`` when ``transposed``) with W dequantized tile by tile, plus epilogues.

    a: (M, Q) float32/float16/bfloat16, any strides; Q = in (W^T) or out (W) features of W (out, in).
    ts: the 4-bit W, a 2-D :class:`TorchQuantState` (NF4 or FP4, plain or double-quantized).
    lora: (l, rt, scaling): l float32 (M, r) (made contiguous), rt (r, P) any float dtype and strides;
      adds ``scaling * (l @ rt)`` to each output tile before its rounding.
    mask: (M, P) float, any strides: multiplies the low-rank term elementwise (needs ``lora``).
    bias: (P,) float: added in float32 before the rounding.
    config: tiles; default :func:`default_config` (which, from ``DEQUANT_FIRST_MIN_M`` rows, first
      dequantizes W into a transient buffer of a's dtype: one more launch, ``dequant``).
    Returns a new contiguous (M, P) tensor in a's dtype.
    """
    check_state(ts, matrix=True)
    check_float("a", a, ndim=2)
    n_w, k_w = ts.shape
    q, p = (n_w, k_w) if transposed else (k_w, n_w)
    if a.shape[1] != q:
        op = "a @ W" if transposed else "a @ W^T"
        raise ValueError(f"a has {a.shape[1]} columns; W {ts.shape} needs {q} for {op}")
    m = a.shape[0]
    dummy = ts.packed
    l_t, rt, scaling, r = lora_operands(lora, m, p, dummy, cols="P")
    if mask is not None:
        if lora is None:
            raise ValueError("mask applies to the low-rank term and needs lora")
        check_float("mask", mask, ndim=2)
        if mask.shape != (m, p):
            raise ValueError(f"mask must be ({m}, {p}), got {tuple(mask.shape)}")
    bias = bias_operand(bias, p)
    check_device(a, ts.packed, None if lora is None else l_t, None if lora is None else rt, mask, bias)

    if m * p >= 2**31:  # the kernel's store offsets rm * P + rp are int32
        raise ValueError(
            f"the output ({m}, {p}) has {m * p} elements; the kernels index with int32 (< 2**31)"
        )
    cfg = config or default_config(m, p, q, ts.blocksize, a.dtype, k_w % ts.blocksize != 0)
    w_cols = cfg.bp if transposed else cfg.bq  # the W-tile width along W's columns
    if cfg.dequantize_first:
        # A scratch W in a's dtype, bit-identical to the in-tile decode; freed when this call returns
        # (the caching allocator reuses the block for the next layer's), never kept per layer.
        w_dense = dequantize_launch(ts, torch.empty(ts.shape, dtype=a.dtype, device=a.device), via_state=True)
        state = (dummy,) * 6 + (0.0,)  # unread under DENSE_W
        # Fixed decode constexprs: one compiled dense variant whatever the state's layout.
        decode = dict(BLOCKSIZE=64, BLOCKSIZE2=256, DOUBLE_QUANT=False, PAIRED=True, TABLE_SHARED=False,
                      SCALE_MODE=1)  # fmt: skip
    else:
        w_dense = a  # unread
        state = state_args(ts)
        decode = dict(
            BLOCKSIZE=ts.blocksize,
            BLOCKSIZE2=ts.blocksize2,
            DOUBLE_QUANT=ts.double_quant,
            PAIRED=k_w % 2 == 0,
            TABLE_SHARED=cfg.table == "shared",
            SCALE_MODE=scale_mode(k_w, ts.blocksize, w_cols),
        )
    out = torch.empty((m, p), dtype=a.dtype, device=a.device)
    m_arg = mask if mask is not None else dummy
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(p, cfg.bp),)
    _nf4_gemm_kernel[grid](
        a,
        w_dense,
        *state,
        l_t,
        rt,
        m_arg,
        bias if bias is not None else dummy,
        out,
        m,
        p,
        q,
        r,
        n_w,
        k_w,
        k_w // 2,
        float(scaling),
        a.stride(0),
        a.stride(1),
        rt.stride(0) if lora is not None else 0,
        rt.stride(1) if lora is not None else 0,
        m_arg.stride(0) if mask is not None else 0,
        m_arg.stride(1) if mask is not None else 0,
        W_T=transposed,
        W_DTYPE=TL_DTYPES[ts.dtype],
        DENSE_W=cfg.dequantize_first,
        HAS_LORA=lora is not None,
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        **decode,
        BM=cfg.bm,
        BP=cfg.bp,
        BQ=cfg.bq,
        BR=LORA_CHUNK,
        ONE_CHUNK=r <= LORA_CHUNK,
        GROUP_M=cfg.group_m,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        EMULATE_BF16=INTERPRET,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **launch_options(ts),
    )
    record_launch(KERNEL)
    del w_dense  # the scratch W (if any) goes back to the allocator now, not when out is freed
    return out
