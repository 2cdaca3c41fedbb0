"""The rank-r products of LoRA: a strided float32 GEMM, C = L @ R, with an optional elementwise mask.

Reference: the float64 products in :mod:`reflora.lora` / :mod:`reflora.qlora` (``x A^T``,
``grad_y B``, ``grad_y^T t``, ``u^T x``). Tolerance class: BOUND (float32 operands and accumulation;
``reflora.bounds.matmul_bound``, round to nearest: ``acc_slack=1``).

One kernel serves the four products the forward and backward need, because each is "a long
reduction with a rank-sized side":

    t      = (x * mask) @ A^T     (M, K) @ (K, r)    forward, before the main GEMM
    u      = grad_y @ B           (M, N) @ (N, r)    backward, before grad_x
    grad_B = grad_y^T @ t         (N, M) @ (M, r)    reduction over tokens
    grad_A = u^T @ (x * mask)     (r, M) @ (M, K)    reduction over tokens

Transposes are strides, never copies. Both operands are widened to float32 in registers (exact for
every input dtype) and multiplied with an IEEE float32 dot, so t and u are kept at float32 precision
rather than rounded to the activation dtype as PEFT does. Why not torch.matmul: torch cannot multiply
a bfloat16 grad_y by a float32 t without first copying grad_y to float32 (M*N*4 bytes, 360 MB for a
Llama-7B MLP at 8192 tokens), and rounding t to bfloat16 instead would add an intermediate rounding
to the gradient. The mask (dropout) is applied in registers, never materialised as x * mask.

Long reductions (over 8192 tokens) with small outputs give few tiles, so the reduction can be split
(SPLIT programs per tile, each writing a float32 partial); the partials are summed in a fixed order
afterwards, deterministic unlike atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from reflora.backends.triton._common import (
    DEFAULT_SMS,
    INTERPRET,
    check_device,
    check_float,
    check_positive_int,
    check_power_of_two,
    check_reach,
    launch_options,
    load_f32,
    next_pow2,
    record_launch,
    sm_count,
)

__all__ = ["LowRankConfig", "lowrank_matmul"]

KERNEL = "lowrank"
TOLERANCE = "BOUND"
REFERENCE = "float64 L @ R (reflora.lora / reflora.qlora rank-r products)"


@triton.jit
def _lowrank_kernel(
    l_ptr,  # (P, Kr) any float dtype, strided
    r_ptr,  # (Kr, Q) any float dtype, strided
    mask_ptr,  # mask of L (P, Kr) or of R (Kr, Q), strided; unread when MASK_ON == 0
    out_ptr,  # float32 (SPLIT, P, Q), contiguous
    P,  # rows of L and of the output
    Q,  # columns of R and of the output
    Kr,  # reduction length
    k_per_split,  # reduction elements each split covers (a multiple of BK)
    stride_lp,
    stride_lk,
    stride_rk,
    stride_rq,
    stride_m0,  # mask strides, along the masked operand's first and second dimension
    stride_m1,
    MASK_ON: tl.constexpr,  # 0: no mask; 1: L is multiplied by the mask; 2: R is
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    split = tl.program_id(2)
    rp = pid_p * BP + tl.arange(0, BP)
    rq = pid_q * BQ + tl.arange(0, BQ)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, Kr)
    for k0 in range(k_start, k_stop, BK):
        rk = k0 + tl.arange(0, BK)
        l_ok = (rp[:, None] < P) & (rk[None, :] < k_stop)
        r_ok = (rk[:, None] < k_stop) & (rq[None, :] < Q)
        lt = load_f32(
            tl.load(l_ptr + rp[:, None] * stride_lp + rk[None, :] * stride_lk, mask=l_ok, other=0.0),
            EMULATE_BF16,
        )
        rt = load_f32(
            tl.load(r_ptr + rk[:, None] * stride_rk + rq[None, :] * stride_rq, mask=r_ok, other=0.0),
            EMULATE_BF16,
        )
        if MASK_ON == 1:
            m = tl.load(mask_ptr + rp[:, None] * stride_m0 + rk[None, :] * stride_m1, mask=l_ok, other=0.0)
            lt = lt * load_f32(m, EMULATE_BF16)
        elif MASK_ON == 2:
            m = tl.load(mask_ptr + rk[:, None] * stride_m0 + rq[None, :] * stride_m1, mask=r_ok, other=0.0)
            rt = rt * load_f32(m, EMULATE_BF16)
        acc = tl.dot(lt, rt, acc, input_precision="ieee")
    out = out_ptr + split * P * Q + rp[:, None] * Q + rq[None, :]
    tl.store(out, acc, mask=(rp[:, None] < P) & (rq[None, :] < Q))


@dataclass(frozen=True)
class LowRankConfig:
    """Tile sizes (powers of two, each >= 16 for tl.dot) and the number of reduction splits."""

    bp: int
    bq: int
    bk: int
    split: int = 1
    num_warps: int = 4

    def __post_init__(self):
        check_power_of_two("LowRankConfig", bp=(self.bp, 16), bq=(self.bq, 16), bk=(self.bk, 16),
                           num_warps=(self.num_warps, 1))  # fmt: skip
        check_positive_int("LowRankConfig", split=self.split)


def default_config(p: int, q: int, k: int, sms: int = DEFAULT_SMS) -> LowRankConfig:
    """Heuristic tiles: the rank side padded to a power of two, the long side in 64s (GPU) or 16s
    (interpreter, so that small test shapes still span several tiles and a ragged edge); on a GPU of
    ``sms`` SMs (:func:`_common.sm_count`), enough reduction splits for 4 programs per SM."""
    if INTERPRET:
        return LowRankConfig(bp=next_pow2(min(p, 32), 16), bq=next_pow2(min(q, 32), 16), bk=16)
    bp = next_pow2(min(p, 64), 16)
    bq = next_pow2(min(q, 64), 16)
    # bk 32: the float32 dot runs on CUDA cores with its operands in registers; at bk 64 a 16x64 tile
    # spills at 4 warps on sm_90 (benchmarks/_gpu_compile_check.py: 255 registers, 200-280 B of stack).
    bk = 32
    tiles = triton.cdiv(p, bp) * triton.cdiv(q, bq)
    # At least 4 programs per SM where the reduction is long enough; never below 8 k-steps a program.
    split = max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(k, 8 * bk)))
    return LowRankConfig(bp=bp, bq=bq, bk=bk, split=split)


def lowrank_matmul(
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    mask_on: str | None = None,
    config: LowRankConfig | None = None,
) -> torch.Tensor:
    """float32 (P, Q) = (left [* mask]) @ (right [* mask]), float32 accumulation.

    left: (P, Kr), right: (Kr, Q); float32/float16/bfloat16, any strides (pass ``A.t()`` for A^T).
    mask: a float tensor shaped like the operand named by ``mask_on`` ("left" or "right"), any strides,
      multiplied into that operand elementwise in float32 before the product.
    config: tiles and reduction splits; default :func:`default_config`.
    Returns a new contiguous float32 tensor.
    """
    check_float("left", left, ndim=2)
    check_float("right", right, ndim=2)
    p, kr = left.shape
    if right.shape[0] != kr:
        raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} do not chain")
    q = right.shape[1]
    mask_code = {None: 0, "left": 1, "right": 2}.get(mask_on)
    if mask_code is None or (mask is None) != (mask_code == 0):
        raise ValueError(f"mask_on must be 'left' or 'right' with a mask, None without; got {mask_on!r}")
    if mask is not None:
        target = left if mask_code == 1 else right
        if mask.shape != target.shape or not mask.dtype.is_floating_point:
            raise ValueError(f"mask must be a float tensor of shape {tuple(target.shape)}, got {mask.shape}")
        check_reach("mask", mask)
    check_device(left, right, mask)
    if p * q >= 2**31:  # the kernel's store offsets split * P * Q + rp * Q + rq are int32
        raise ValueError(
            f"the output ({p}, {q}) has {p * q} elements; the kernels index with int32 (< 2**31)"
        )
    if p == 0 or q == 0 or kr == 0:  # nothing to multiply; an empty sum is 0
        return torch.zeros((p, q), dtype=torch.float32, device=left.device)
    cfg = config or default_config(p, q, kr, sm_count(left.device))
    # Fewer splits where SPLIT float32 partials would pass 2**31 elements (int32 offsets).
    split = max(1, min(cfg.split, triton.cdiv(kr, cfg.bk), (2**31 - 1) // (p * q)))
    k_per_split = triton.cdiv(triton.cdiv(kr, split), cfg.bk) * cfg.bk
    split = max(1, triton.cdiv(kr, k_per_split))  # every split gets a non-empty range
    out = torch.empty((split, p, q), dtype=torch.float32, device=left.device)
    grid = (triton.cdiv(p, cfg.bp), triton.cdiv(q, cfg.bq), split)
    m_arg = mask if mask is not None else left
    _lowrank_kernel[grid](
        left,
        right,
        m_arg,
        out,
        p,
        q,
        kr,
        k_per_split,
        left.stride(0),
        left.stride(1),
        right.stride(0),
        right.stride(1),
        m_arg.stride(0),
        m_arg.stride(1),
        MASK_ON=mask_code,
        BP=cfg.bp,
        BQ=cfg.bq,
        BK=cfg.bk,
        EMULATE_BF16=INTERPRET,
        num_warps=cfg.num_warps,
        **launch_options(),
    )
    record_launch(KERNEL)
    # Partials summed in split order: deterministic, and still one float32 sum of the same terms.
    return out[0] if split == 1 else out.sum(dim=0)
