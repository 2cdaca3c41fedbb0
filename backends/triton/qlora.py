"""QLoRA linear layer on the Triton kernels: a thin torch.autograd.Function and the public functions.

Reference: :func:`reflora.qlora.forward` / :func:`reflora.qlora.backward` (float64). Tolerance
class: BOUND (``reflora.bounds``). Notation as in the papers: W (out=N, in=K) frozen and 4-bit; A (r, K);
B (N, r); ``scaling`` (alpha / r, or alpha / sqrt(r) for rsLoRA); an optional dropout ``mask``
(shaped like x, e.g. 0 or 1/(1-p)) that multiplies x in the LoRA branch only:

    y      = x W^T + scaling * ((x * mask) A^T) B^T + bias
    grad_x = grad_y W + scaling * ((grad_y B) A) * mask
    grad_A = scaling * (grad_y B)^T (x * mask)
    grad_B = scaling * grad_y^T ((x * mask) A^T)
    grad_bias = sum over rows of grad_y;  W gets no gradient.

Kernels per call (each visible in :func:`launch_counts`): forward = ``lowrank`` (t = (x*mask) A^T,
float32, kept for backward) then ``nf4_gemm`` (or ``nf4_gemv`` for at most 4 rows) with t B^T added
in the output tile's epilogue. Backward = ``lowrank`` (u = grad_y B), ``nf4_gemm`` in its W
orientation with scaling * (u A) * mask in the epilogue, and ``lowrank`` twice for grad_A and grad_B.
From ``gemm.DEQUANT_FIRST_MIN_M`` rows each ``nf4_gemm`` (forward and grad_x alike) is preceded by a
``dequant`` of W into a scratch buffer that lives for that call only (see :mod:`.gemm`).

Under ``torch.compile`` the same launchers run inside two opaque custom ops,
``reflora::triton_linear`` and ``reflora::triton_linear_backward`` (the section at the end): a
compiled call launches the eager call's kernels and gives its bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reflora.backends.torch.quant_state import (
    TorchQuantState,
    check_scaling,
    check_unchanged,
    from_op_args,
    op_args,
    versions,
)
from reflora.backends.triton._common import check_device, check_float, check_state
from reflora.backends.triton.gemm import GemmConfig, nf4_gemm
from reflora.backends.triton.gemv import GEMV_MAX_M, GemvConfig, nf4_gemv
from reflora.backends.triton.lowrank import LowRankConfig, lowrank_matmul

__all__ = ["LinearConfig", "nf4_matmul", "qlora_linear"]


@dataclass(frozen=True, eq=False)
class LinearConfig:
    """Everything about a call that is not a differentiable tensor.

    weight: the frozen 4-bit W. scaling: the LoRA scaling (unused without A, B).
    gemm / gemv / lowrank: tile overrides (None: the kernels' heuristics).
    gemv: None chooses the GEMV for at most GEMV_MAX_M rows; True / False forces it / the GEMM.
    """

    weight: TorchQuantState
    scaling: float = 0.0
    use_gemv: bool | None = None
    gemm: GemmConfig | None = None
    gemv: GemvConfig | None = None
    lowrank: LowRankConfig | None = None


def _forward(x2, a, b, bias, mask, cfg: LinearConfig):
    """(y (M, N), t (M, r) float32 or None) for 2-D x."""
    if x2.shape[0] == 0:  # no rows: nothing to compute and no kernel launched, as nn.Linear gives
        t = None if a is None else x2.new_empty((0, a.shape[0]), dtype=torch.float32)
        return x2.new_empty((0, cfg.weight.shape[0])), t
    t = None
    lora = None
    if a is not None:
        t = lowrank_matmul(x2, a.t(), mask=mask, mask_on=None if mask is None else "left", config=cfg.lowrank)
        lora = (t, b.t(), cfg.scaling)
    use_gemv = x2.shape[0] <= GEMV_MAX_M if cfg.use_gemv is None else cfg.use_gemv
    if use_gemv:
        y = nf4_gemv(x2, cfg.weight, lora=lora, bias=bias, config=cfg.gemv)
    else:
        y = nf4_gemm(x2, cfg.weight, lora=lora, bias=bias, config=cfg.gemm)
    return y, t


def _grads(g, x2, a, b, mask, t, cfg: LinearConfig, needs, bias_dtype) -> tuple:
    """(grad_x, grad_A, grad_B, grad_bias), None where ``needs`` (four bools) says not asked for, for a
    2-D grad_y ``g`` in x's dtype and M > 0 rows. Gradients are always new tensors."""
    need_x, need_a, need_b, need_bias = needs
    grad_x = grad_a = grad_b = grad_bias = None
    u = None
    if a is not None and (need_x or need_a):
        u = lowrank_matmul(g, b, config=cfg.lowrank)  # (M, N) @ (N, r) -> (M, r) float32
    if need_x:
        lora = None if a is None else (u, a, cfg.scaling)
        grad_x = nf4_gemm(g, cfg.weight, transposed=True, lora=lora, mask=mask, config=cfg.gemm)
    if need_a:
        # (r, M) @ (M, K): u^T (x * mask)
        grad_a = lowrank_matmul(
            u.t(), x2, mask=mask, mask_on=None if mask is None else "right", config=cfg.lowrank
        )
        grad_a = (grad_a * cfg.scaling).to(a.dtype)
    if need_b:
        grad_b = lowrank_matmul(g.t(), t, config=cfg.lowrank)  # (N, M) @ (M, r)
        grad_b = (grad_b * cfg.scaling).to(b.dtype)
    if need_bias:
        grad_bias = g.sum(dim=0, dtype=torch.float32).to(bias_dtype)
    return grad_x, grad_a, grad_b, grad_bias


class _NF4LinearFn(torch.autograd.Function):
    """y = x W^T [+ scaling ((x*mask) A^T) B^T] [+ bias] for 2-D x; gradients for x, A, B, bias."""

    @staticmethod
    def forward(ctx, x2, a, b, bias, mask, cfg: LinearConfig):
        y, t = _forward(x2, a, b, bias, mask, cfg)
        ctx.save_for_backward(x2, a, b, mask, t)
        ctx.cfg = cfg
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.state_versions = versions(cfg.weight)  # grad_x reads the state again
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients carry no graph
            raise RuntimeError(
                "the Triton QLoRA layer is differentiable once: its gradients are kernel outputs without "
                "a graph, so a second derivative (create_graph=True) would silently drop terms"
            )
        x2, a, b, mask, t = ctx.saved_tensors
        cfg: LinearConfig = ctx.cfg
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        g = grad_y if grad_y.dtype == x2.dtype else grad_y.to(x2.dtype)
        if x2.shape[0] == 0:  # sums over no rows: zero for A, B and bias, no kernel launched
            return (
                x2.new_empty(x2.shape) if need_x else None,
                torch.zeros_like(a) if need_a else None,
                torch.zeros_like(b) if need_b else None,
                g.new_zeros(g.shape[1], dtype=ctx.bias_dtype) if need_bias else None,
                None,
                None,
            )
        if need_x:
            check_unchanged(cfg.weight, ctx.state_versions)
        return *_grads(g, x2, a, b, mask, t, cfg, ctx.needs_input_grad[:4], ctx.bias_dtype), None, None


def _apply(x, ts, a, b, scaling, bias, mask, cfg_overrides):
    check_state(ts, matrix=True)
    check_float("x", x)
    n, k = ts.shape
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) for W {ts.shape}, got {tuple(x.shape)}")
    if (a is None) != (b is None) or (a is None and mask is not None):
        raise ValueError("A and B come together, and dropout_mask needs them (it applies to the LoRA branch)")
    # Every operand's device, checked before the empty-batch path returns, as for any other x.
    check_device(x, ts.packed, a, b, bias, mask)
    if a is not None:
        check_float("A", a, ndim=2)
        check_float("B", b, ndim=2)
        r = a.shape[0]
        if a.shape != (r, k) or b.shape != (n, r) or r == 0:
            raise ValueError(f"A must be (r, {k}), B ({n}, r), r >= 1; got {tuple(a.shape)} {tuple(b.shape)}")
    if bias is not None:
        check_float("bias", bias, ndim=1)
        if bias.shape != (n,):
            raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    if mask is not None:
        check_float("dropout_mask", mask)
        if mask.shape != x.shape:
            raise ValueError(f"dropout_mask must have x's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    lead = x.shape[:-1]
    # reshape is a view when the strides allow it and a copy otherwise; the kernels take any strides.
    x2 = x.reshape(-1, k)
    mask2 = None if mask is None else mask.reshape(-1, k)
    scaling = check_scaling(scaling) if a is not None else 0.0
    if torch.compiler.is_compiling():
        if cfg_overrides:
            raise ValueError(
                f"tile overrides {sorted(cfg_overrides)} are for eager calls: under torch.compile the "
                "layer runs as the opaque op reflora::triton_linear with the kernels' heuristics"
            )
        y = _compiled_linear(x2, a, b, bias, mask2, ts, scaling)
    else:
        y = _NF4LinearFn.apply(
            x2, a, b, bias, mask2, LinearConfig(weight=ts, scaling=scaling, **cfg_overrides)
        )
    return y.reshape(*lead, n)


# ------------------------------------------------------------------------------------- torch.compile
# Dynamo cannot trace a Triton launch under the interpreter, nor the launchers' Python (the launch
# registry, cached heuristics), so a compiled graph calls the layer as two opaque ops, the forward and
# its backward, each running the same launchers as an eager call: the same kernels, tiles and bits,
# the gradient of the bias included (a sum inductor would otherwise generate in its own order). Their
# arguments are the state's tensors and fields, as an op takes no dataclass. As on the torch path, a
# compiled graph goes without the check that the state was not written between forward and backward.


def _op_config(tensors, shape, dtype, blocksize, quant_type, offset, blocksize2, scaling) -> LinearConfig:
    ts = from_op_args(tensors, shape, dtype, blocksize, quant_type, offset, blocksize2)
    return LinearConfig(weight=ts, scaling=scaling)


@torch.library.custom_op("reflora::triton_linear", mutates_args=())
def _linear_op(
    x2: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    tensors: list[torch.Tensor | None],
    shape: list[int],
    dtype: torch.dtype,
    blocksize: int,
    quant_type: str,
    offset: float | None,
    blocksize2: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, N), t (M, r) float32, or (M, 0) without A): :func:`_forward` for M > 0 rows."""
    cfg = _op_config(tensors, shape, dtype, blocksize, quant_type, offset, blocksize2, scaling)
    y, t = _forward(x2, a, b, bias, mask, cfg)
    return y, x2.new_empty((x2.shape[0], 0), dtype=torch.float32) if t is None else t


@_linear_op.register_fake
def _(x2, a, b, bias, mask, tensors, shape, *fields):
    r = 0 if a is None else a.shape[0]
    return x2.new_empty((x2.shape[0], shape[0])), x2.new_empty((x2.shape[0], r), dtype=torch.float32)


@torch.library.custom_op("reflora::triton_linear_backward", mutates_args=())
def _linear_backward_op(
    g: torch.Tensor,
    x2: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    t: torch.Tensor,
    tensors: list[torch.Tensor | None],
    shape: list[int],
    dtype: torch.dtype,
    blocksize: int,
    quant_type: str,
    offset: float | None,
    blocksize2: int,
    scaling: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_A, grad_B, grad_bias) by :func:`_grads`; an empty (0,) tensor stands for one not
    asked for (``needs``: four bools)."""
    cfg = _op_config(tensors, shape, dtype, blocksize, quant_type, offset, blocksize2, scaling)
    grads = _grads(
        g, x2, a, b, mask, None if a is None else t, cfg, needs, None if bias is None else bias.dtype
    )
    return tuple(g.new_empty((0,)) if v is None else v for v in grads)


@_linear_backward_op.register_fake
def _(g, x2, a, b, bias, *rest):
    needs = rest[-1]
    return tuple(
        v.new_empty(v.shape) if need else g.new_empty((0,))
        for v, need in zip((x2, a, b, bias), needs, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    x2, a, b, bias, mask, tensors = inputs[:6]
    ctx.save_for_backward(x2, a, b, bias, mask, output[1], *tensors)
    ctx.fields = inputs[6:]  # shape, dtype, blocksize, quant_type, offset, blocksize2, scaling
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_y, _grad_t):
    x2, a, b, bias, mask, t, *tensors = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    g = grad_y if grad_y.dtype == x2.dtype else grad_y.to(x2.dtype)
    grads = torch.ops.reflora.triton_linear_backward(g, x2, a, b, bias, mask, t, tensors, *ctx.fields, needs)
    # gradients for x, A, B and bias; none for the mask, the state and the fields
    return *(v if need else None for v, need in zip(grads, needs, strict=True)), *[None] * (ctx.n_inputs - 4)


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _compiled_linear(x2, a, b, bias, mask, ts: TorchQuantState, scaling: float) -> torch.Tensor:
    if x2.shape[0] == 0:  # no rows, as on the eager path: nothing launched
        return _NF4LinearFn.apply(x2, a, b, bias, mask, LinearConfig(weight=ts, scaling=scaling))
    return torch.ops.reflora.triton_linear(x2, a, b, bias, mask, *op_args(ts), scaling)[0]


def qlora_linear(
    x: torch.Tensor,
    ts: TorchQuantState,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    **config,
) -> torch.Tensor:
    """The QLoRA linear layer, ``x W^T + scaling * ((x * dropout_mask) A^T) B^T + bias``, differentiable.

    x: (..., K) float32/float16/bfloat16, any strides; the output has x's dtype.
    ts: W (N, K) as a 2-D :class:`TorchQuantState` (NF4 or FP4, plain or double-quantized); frozen.
    A: (r, K), B: (N, r): float32/float16/bfloat16, any strides; gradients come back in their dtypes.
    scaling: alpha / r (or alpha / sqrt(r) for rsLoRA); applied in float32.
    bias: (N,) or None. dropout_mask: x's shape or None; multiplies x in the LoRA branch only.
    config: optional ``use_gemv``, ``gemm``, ``gemv``, ``lowrank`` overrides (:class:`LinearConfig`).
    Returns (..., N). The result is within the derived bound of the float64 reference
    (``reflora.bounds.lora_forward_bound``, fused arithmetic); W is dequantized inside the kernels'
    tiles, or from ``gemm.DEQUANT_FIRST_MIN_M`` rows once a GEMM into a buffer freed when that GEMM
    returns (the same bits either way). An x with no rows (e.g. shape (0, K)) gives an empty y and zero
    gradients for A, B and bias without launching a kernel. A state written in place between the
    forward and a backward that needs grad_x raises RuntimeError there, as autograd does for saved
    tensors.
    """
    return _apply(x, ts, A, B, scaling, bias, dropout_mask, config)


def nf4_matmul(
    x: torch.Tensor, ts: TorchQuantState, bias: torch.Tensor | None = None, **config
) -> torch.Tensor:
    """``x @ dequantize(W)^T (+ bias)`` with W dequantized tile by tile; differentiable in x and bias.

    x: (..., K) float32/float16/bfloat16, any strides. ts: W (N, K), 2-D state. bias: (N,) or None.
    config: as for :func:`qlora_linear`. Returns (..., N) in x's dtype.
    """
    return _apply(x, ts, None, None, 0.0, bias, None, config)
