"""The cases of benchmarks/gpu.py: problem construction, baselines, and the conformance checks that run
before anything is timed. Imported by gpu.py after it has decided between a CUDA run and a dry run
(the Triton interpreter must be chosen before reflora.backends.triton is imported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from reflora import bounds, lora, nf4
from reflora.backends.torch.quant_state import TorchQuantState, numpy_to_torch
from reflora.backends.triton import (
    dequantize_nf4,
    launch_counts,
    lowrank_matmul,
    nf4_gemm,
    nf4_gemv,
    nf4_matmul,
    qlora_linear,
    reset_launch_counts,
)
from reflora.backends.triton.backend import TritonBackend
from reflora.backends.triton.gemm import DEQUANT_FIRST_MIN_M, GemmConfig
from reflora.backends.triton.gemm import default_config as gemm_config
from reflora.backends.triton.gemv import GemvConfig
from reflora.backends.triton.gemv import default_config as gemv_config
from reflora.state import NestedState, QuantState

QUANTILES = [0.5, 0.2, 0.8]
VARIANT_SHARED = "reflora triton, table shared"  # GemmConfig/GemvConfig(table="shared"): a candidate default
# The GEMM decoding W in its tiles where, at this M, the default dequantizes W first (GemmConfig.
# dequantize_first): the default's gain over the fused decode, measured.
VARIANT_FUSED = "reflora triton, fused decode"


class ConformanceError(AssertionError):
    """One of our kernels disagreed with the oracle or left its bound: nothing gets timed."""


# ------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shapes:
    w_out: int = 4096  # the 4096 x 11008 matrix of the dequantize and GEMV cases (Llama-7B down_proj)
    w_in: int = 11008
    hidden: int = 4096  # Llama-7B MLP
    inter: int = 11008
    tokens: int = 8192
    rank: int = 16
    alpha: float = 32.0
    copy_bytes: int = 1 << 30
    mm: int = 8192
    # The matmuls' rows compared with float64: one in every band of this many rows (spread_rows), so
    # every M tile of every tiling in the sweep (tiles of 64 rows or multiples) has rows checked.
    check_band: int = 64


DRY_SHAPES = Shapes(
    w_out=64,
    w_in=256,
    hidden=64,
    inter=96,
    tokens=40,
    rank=4,
    alpha=8.0,
    copy_bytes=1 << 20,
    mm=64,
    check_band=16,
)


# ------------------------------------------------------------------------------------------ timing


@dataclass
class Timer:
    """Medians and p20/p80 in ms: triton.testing.do_bench (or its CUDA-graph variant for us-scale
    kernels) on a GPU; a few wall-clock runs in a dry run, which are not measurements."""

    dry_run: bool
    rep_ms: int = 200

    def __call__(
        self, fn, *, graph: bool = False, grad_to_none=None, min_rep_ms: int = 0
    ) -> tuple[float, float, float]:
        if self.dry_run:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return tuple(float(v) for v in np.quantile(times, QUANTILES))
        import triton.testing

        rep = max(self.rep_ms, min_rep_ms)
        if graph:
            out = triton.testing.do_bench_cudagraph(
                fn, rep=rep, grad_to_none=grad_to_none, quantiles=QUANTILES
            )
        else:
            out = triton.testing.do_bench(
                fn, warmup=25, rep=rep, grad_to_none=grad_to_none, quantiles=QUANTILES
            )
        return tuple(float(v) for v in out)


class Rotation:
    """Calls fns[0], fns[1], ... in turn, so that repeated runs do not find their inputs in L2.

    Captured in a CUDA graph, the n unrolled calls keep this order on every replay."""

    def __init__(self, fns):
        self.fns, self.i = list(fns), 0

    def __call__(self):
        fn = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return fn()


def copies_to_defeat_l2(bytes_per_call: int, device) -> int:
    if device.type != "cuda":
        return 2
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(8, math.ceil(2 * l2 / max(bytes_per_call, 1)) + 1))


@dataclass
class Row:
    case: str
    impl: str
    median_ms: float | None  # None: not run (``note`` says why)
    p20_ms: float | None
    p80_ms: float | None
    bytes: int | None = None
    flops: float | None = None
    check: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)
    # Another impl of the same case this row varies (a variant of a non-default kernel): derive reports
    # this row's speed against that one too, beside the usual speedup against the default.
    versus: str | None = None

    def gbps(self) -> float | None:
        return (
            None
            if self.bytes is None or self.median_ms is None
            else self.bytes / (self.median_ms * 1e-3) / 1e9
        )

    def tflops(self) -> float | None:
        return (
            None
            if self.flops is None or self.median_ms is None
            else self.flops / (self.median_ms * 1e-3) / 1e12
        )


# Why bitsandbytes' rows are not run, once its first call has failed (None: not tried, or usable).
BNB_PROBLEM: str | None = None


def unavailable(case: str, impl: str, why: str) -> Row:
    return Row(case, impl, None, None, None, check="not run", note=why)


def attempt(case: str, impl: str, fn):
    """(fn(), None), or (None, a row saying why fn failed): a library version that refuses the call, a
    check it fails, an out-of-memory (the cache is emptied for what follows)."""
    try:
        return fn(), None
    except Exception as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return None, unavailable(case, impl, f"{type(e).__name__}: {str(e)[:200]}")


def baseline(case: str, impl: str, fn) -> list[Row]:
    """fn()'s rows, or one row saying why not: a baseline that fails is reported (:func:`attempt`), and
    the run goes on to reflora's rows."""
    rows, failed = attempt(case, impl, fn)
    if failed is not None:
        return [failed]
    return rows if isinstance(rows, list) else [rows]


# ------------------------------------------------------------------------------------------ checks


@contextlib.contextmanager
def poisoned_outputs():
    """Within it, every ``torch.empty`` comes back filled with NaN (integers with their largest value),
    through torch's deterministic mode (``torch.utils.deterministic.fill_uninitialized_memory``). Our
    kernels allocate their outputs that way, so one that leaves part of its output unwritten fails its
    check here, rather than passing on correct values an earlier call left in memory the caching
    allocator hands back. For checks only: the filling is a pass over each output. ``warn_only``: an
    op without a deterministic variant warns (silenced) instead of raising."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic.*", category=UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def spread_rows(m: int, band: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of [0, m): one in every band of ``band`` rows, at an offset drawn per band,
    and the last row. Every M tile of a tiling whose tiles are ``band`` rows or a multiple of it then
    has a row checked, at varying offsets inside the tiles."""
    starts = np.arange(0, m, band)
    offsets = np.random.default_rng(seed).integers(0, band, size=starts.size)
    return np.unique(np.append(np.minimum(starts + offsets, m - 1), m - 1))


def check_finite(what: str, t: torch.Tensor) -> None:
    """ConformanceError unless every element of ``t`` is finite. With finite inputs of moderate size a
    correct result is; under :func:`poisoned_outputs` an element the kernel never wrote is NaN."""
    bad = ~torch.isfinite(t.detach())
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ConformanceError(
            f"{what}: {int(bad.sum())} of {t.numel()} elements are not finite (NaN where the output was "
            f"never written: its buffer was filled with NaN), first at index {first}"
        )


def check_exact(what: str, got: torch.Tensor, want: np.ndarray) -> str:
    want_t = numpy_to_torch(want)
    view = torch.int32 if got.dtype == torch.float32 else torch.int16
    a = got.detach().cpu().contiguous().view(view).reshape(-1)
    b = want_t.contiguous().view(view).reshape(-1)
    bad = int((a != b).sum())
    if bad:
        i = int(torch.nonzero(a != b)[0])
        raise ConformanceError(
            f"{what}: {bad} of {a.numel()} elements differ from reflora.nf4.dequantize; first at flat index "
            f"{i}: got {got.reshape(-1)[i].item()!r}, expected {want_t.reshape(-1)[i].item()!r}"
        )
    return "exact"


def _np(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a


def arithmetic(dtype: torch.dtype, *, lowrank: bool = False) -> bounds.Arithmetic:
    """The arithmetic TritonBackend declares for activations of ``dtype`` (fused, float32 accumulation).
    ``lowrank``: grad_A / grad_B, IEEE float32 dots that round to nearest (acc_slack 1)."""
    ar = TritonBackend().arithmetic("qlora_forward", str(dtype).removeprefix("torch."))
    return dataclasses.replace(ar, acc_slack=1.0) if lowrank else ar


def bound_ratio(
    what: str, got: torch.Tensor, ref: np.ndarray, bound: np.ndarray, *, ours: bool = True
) -> float:
    """max |got - ref| / bound (<= 1: within the bound reflora.bounds derives). Raises ConformanceError
    for our kernels when it is above 1 or not finite; returns it for baselines."""
    got_np = got.detach().double().cpu().numpy()
    err = np.abs(got_np - ref)
    ratio = float(np.max(err / bound)) if np.isfinite(got_np).all() else math.inf
    if ours and not ratio <= 1.0:
        raise ConformanceError(f"{what}: |computed - float64| reaches {ratio:.3g} x the derived bound")
    return ratio


def forward_check(x64: np.ndarray, w64: np.ndarray, arith: bounds.Arithmetic, a64=None, b64=None, s=0.0):
    """(float64 reference, bound) of y = x Wᵀ [+ s (x Aᵀ) Bᵀ] for float64 numpy operands
    (reflora.lora.forward, reflora.bounds.lora_forward_bound); no adapter is a zero rank-1 one."""
    if a64 is None:
        a64, b64 = np.zeros((1, x64.shape[1])), np.zeros((w64.shape[0], 1))
    ref = lora.forward(x64, w64, a64, b64, s)
    return ref, bounds.lora_forward_bound(x64, w64, a64, b64, s, arith)


def check_within(what: str, got, ref, bound, *, ours: bool = True) -> str:
    ratio = bound_ratio(what, got, ref, bound, ours=ours)
    inside = "within" if ratio <= 1 else "OUTSIDE"
    return f"{inside} reflora's bound (max |Δ|/bound {ratio:.3g})"


# ------------------------------------------------------------------------------------------ weights


@dataclass
class Weight:
    """One quantized matrix, in bitsandbytes' and in reflora's form (the same bytes)."""

    dense: torch.Tensor  # bf16 (out, in), the matrix before quantization
    ts: TorchQuantState
    bnb: tuple | None  # (packed (n/2, 1) uint8, bnb QuantState) or None without bitsandbytes


def quantize_weight(out_f: int, in_f: int, device, seed: int) -> Weight:
    """N(0, 0.02) bf16, NF4, blocksize 64, double quantization: bitsandbytes' quantizer when installed
    (so its kernels run on their own state), else reflora's; reflora reads either bit for bit."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dense = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16).to(device)
    global BNB_PROBLEM
    packed = qs = None
    if BNB_PROBLEM is None:
        try:  # importable is not enough: a missing CUDA library only fails on the first call
            import bitsandbytes.functional as bnbf

            packed, qs = bnbf.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
        except Exception as e:
            BNB_PROBLEM = f"bitsandbytes unusable here: {type(e).__name__}: {str(e)[:160]}"
    if qs is None:
        state = nf4.quantize(_np(dense.float()).astype(np.float32), 64, double_quant=True)
        return Weight(dense, TorchQuantState.from_state(state, device), None)
    ts = TorchQuantState(
        packed=packed.reshape(-1),
        absmax=None,
        code=qs.code.float().contiguous(),
        shape=tuple(qs.shape),
        dtype=torch.bfloat16,
        blocksize=qs.blocksize,
        quant_type="nf4",
        absmax_q=qs.absmax.contiguous(),
        absmax2=qs.state2.absmax.float().contiguous(),
        code2=qs.state2.code.float().contiguous(),
        offset=float(qs.offset),
        blocksize2=qs.state2.blocksize,
    )
    return Weight(dense, ts, (packed, qs))


def oracle_state(ts: TorchQuantState) -> QuantState:
    state = ts.to_state()
    assert state.nested is None or isinstance(state.nested, NestedState)
    return state


def nf4_bytes(ts: TorchQuantState) -> int:
    """Bytes a reader of the 4-bit state must move: codes, scales (8-bit + group scales), tables."""
    n = ts.packed.numel() + ts.code.numel() * 4
    if ts.double_quant:
        n += ts.absmax_q.numel() + ts.absmax2.numel() * 4 + ts.code2.numel() * 4
    else:
        n += ts.absmax.numel() * 4
    return n


def torch_eager_dequantize(ts: TorchQuantState, dtype: torch.dtype) -> torch.Tensor:
    """The obvious eager-torch dequantize (several kernels, intermediates in memory): the baseline a
    user writes without a fused kernel. Same arithmetic as the oracle."""
    q = torch.stack([ts.packed >> 4, ts.packed & 15], dim=-1).reshape(-1)[: ts.numel].long()
    values = ts.code[q]
    if ts.double_quant:
        groups = torch.arange(ts.absmax_q.numel(), device=q.device) // ts.blocksize2
        absmax = ts.code2[ts.absmax_q.long()] * ts.absmax2[groups]
        absmax = absmax + ts.offset
    else:
        absmax = ts.absmax
    return (values.view(-1, ts.blocksize) * absmax[:, None]).to(dtype).reshape(ts.shape)


# ------------------------------------------------------------------------------------------ cases


def ceilings(timer: Timer, shapes: Shapes, device, rows: list[Row]) -> None:
    n = shapes.copy_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    if not timer.dry_run:  # about a second of work first, so the ceilings are not taken at idle clocks
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            a @ a
            torch.cuda.synchronize()
    med, p20, p80 = timer(lambda: dst.copy_(src))
    rows.append(Row("ceiling", "HBM copy (device-to-device)", med, p20, p80, bytes=2 * n * 4, check="-"))
    a = torch.randn(shapes.mm, shapes.mm, device=device).to(torch.bfloat16)
    b = torch.randn(shapes.mm, shapes.mm, device=device).to(torch.bfloat16)
    med, p20, p80 = timer(lambda: a @ b)
    rows.append(Row("ceiling", "bf16 matmul (torch)", med, p20, p80, flops=2.0 * shapes.mm**3, check="-"))


def dequant_case(timer: Timer, shapes: Shapes, device, rows: list[Row]) -> None:
    case = f"dequantize {shapes.w_out}x{shapes.w_in} -> bf16"
    n = shapes.w_out * shapes.w_in
    k = copies_to_defeat_l2(n // 2 + 2 * n, device)
    weights = [quantize_weight(shapes.w_out, shapes.w_in, device, seed=i) for i in range(k)]
    out_bytes = 2 * n

    # Ours: checked bit for bit against the oracle on the first matrix, for bf16 and float32.
    ts0 = weights[0].ts
    state0 = oracle_state(ts0)
    with poisoned_outputs():
        check = check_exact(
            "dequantize bf16", dequantize_nf4(ts0, torch.bfloat16), nf4.dequantize(state0, "bfloat16")
        )
        check_exact("dequantize f32", dequantize_nf4(ts0, torch.float32), nf4.dequantize(state0, "float32"))
    reset_launch_counts()
    dequantize_nf4(ts0, torch.bfloat16)
    assert launch_counts() == {"dequant": 1}, launch_counts()
    fns = [lambda w=w: dequantize_nf4(w.ts, torch.bfloat16) for w in weights]
    med, p20, p80 = timer(Rotation(fns), graph=True)
    rows.append(Row(case, "reflora triton", med, p20, p80, bytes=nf4_bytes(ts0) + out_bytes, check=check))

    def bnb_row() -> Row:
        import bitsandbytes.functional as bnbf

        got = bnbf.dequantize_4bit(*weights[0].bnb)
        try:
            check = check_exact("bnb dequantize_4bit", got, nf4.dequantize(state0, "bfloat16"))
        except ConformanceError as e:
            check = f"differs from oracle: {e}"
        fns = [lambda w=w: bnbf.dequantize_4bit(*w.bnb) for w in weights]
        med, p20, p80 = timer(Rotation(fns), graph=True)
        return Row(
            case, "bitsandbytes dequantize_4bit", med, p20, p80, nf4_bytes(ts0) + out_bytes, check=check
        )

    if weights[0].bnb is not None:
        rows += baseline(case, "bitsandbytes dequantize_4bit", bnb_row)
    else:
        rows.append(
            unavailable(case, "bitsandbytes dequantize_4bit", BNB_PROBLEM or "bitsandbytes not installed")
        )

    def eager_row() -> Row:
        got = torch_eager_dequantize(ts0, torch.bfloat16)
        try:  # a baseline is information: a difference is reported, not fatal
            check = check_exact("torch eager", got, nf4.dequantize(state0, "bfloat16"))
        except ConformanceError as e:
            check = f"differs from oracle: {e}"
        fns = [lambda w=w: torch_eager_dequantize(w.ts, torch.bfloat16) for w in weights]
        med, p20, p80 = timer(Rotation(fns), graph=True)
        return Row(case, "torch eager", med, p20, p80, nf4_bytes(ts0) + out_bytes, check=check)

    rows += baseline(case, "torch eager", eager_row)
    rows += baseline(case, "torchao NF4Tensor", lambda: _torchao_dequant(timer, case, weights))


def _torchao_dequant(timer: Timer, case: str, weights: list[Weight]) -> Row:
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError as e:
        return unavailable(case, "torchao NF4Tensor", f"torchao not importable: {e}")
    tensors = [to_nf4(w.dense) for w in weights]  # torchao's own format: it re-quantizes the bf16 W
    t0 = tensors[0]
    stored = sum(
        getattr(t0, a).numel() * getattr(t0, a).element_size()
        for a in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
    )
    deq = t0.get_original_weight()
    # Not comparable bit for bit (own codebook, bf16 arithmetic, int8 scalers: SPEC §6); record how
    # far it lands from the unquantized W next to ours, as information.
    ours = dequantize_nf4(weights[0].ts, torch.bfloat16).float()
    dense = weights[0].dense.float()
    rel = lambda d: float((d.float() - dense).norm() / dense.norm())  # noqa: E731
    check = f"own format; ‖W−deq‖/‖W‖ {rel(deq):.4f} (reflora/bnb state: {rel(ours):.4f})"
    fns = [lambda t=t: t.get_original_weight() for t in tensors]
    med, p20, p80 = timer(Rotation(fns), graph=True)
    return Row(case, "torchao NF4Tensor", med, p20, p80, stored + 2 * t0.numel(), check=check)


def gemv_weights(shapes: Shapes, device) -> list[Weight]:
    """The GEMV's matrix (w_out, w_in), in as many copies as rotating over them takes to defeat L2."""
    k = copies_to_defeat_l2(shapes.w_out * shapes.w_in // 2, device)
    return [quantize_weight(shapes.w_out, shapes.w_in, device, seed=100 + i) for i in range(k)]


def gemv_case(timer: Timer, shapes: Shapes, device, rows: list[Row]) -> None:
    case = f"GEMV 1x{shapes.w_in} @ ({shapes.w_out}x{shapes.w_in})^T bf16"
    n = shapes.w_out * shapes.w_in
    weights = gemv_weights(shapes, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, shapes.w_in, generator=g).to(torch.bfloat16).to(device)
    io_bytes = 2 * (shapes.w_in + shapes.w_out)
    w0 = weights[0]
    with poisoned_outputs():
        w_bf16 = dequantize_nf4(w0.ts, torch.bfloat16)  # the operand the kernel multiplies, checked exact
    check_exact("dequantize bf16 (GEMV reference)", w_bf16, nf4.dequantize(oracle_state(w0.ts), "bfloat16"))
    x64, w64 = _np(x.double()), _np(w_bf16.double())
    ref, bound = forward_check(x64, w64, arithmetic(torch.bfloat16))

    with torch.no_grad():
        reset_launch_counts()
        with poisoned_outputs():
            y = nf4_matmul(x, w0.ts)
        assert launch_counts() == {"nf4_gemv": 1}, launch_counts()
        check_finite("nf4 GEMV", y)
        check = check_within("nf4 GEMV", y, ref, bound)
        fns = [lambda w=w: nf4_matmul(x, w.ts) for w in weights]
        med, p20, p80 = timer(Rotation(fns), graph=True)
        rows.append(Row(case, "reflora triton", med, p20, p80, nf4_bytes(w0.ts) + io_bytes, check=check))

        # The other way of reading the 4-bit table (tl.gather from shared memory), measured beside the
        # default so that the faster one can become the default: checked the same way first.
        cfg = dataclasses.replace(gemv_config(1, shapes.w_out, shapes.w_in), table="shared")
        with poisoned_outputs():
            y = nf4_matmul(x, w0.ts, gemv=cfg)
        check_finite("nf4 GEMV, table shared", y)
        check = check_within("nf4 GEMV, table shared", y, ref, bound)
        fns = [lambda w=w: nf4_matmul(x, w.ts, gemv=cfg) for w in weights]
        med, p20, p80 = timer(Rotation(fns), graph=True)
        rows.append(Row(case, VARIANT_SHARED, med, p20, p80, nf4_bytes(w0.ts) + io_bytes, check=check))

        impl = "bitsandbytes matmul_4bit (inference)"

        def bnb_row() -> Row:
            import bitsandbytes as bnb

            y = bnb.matmul_4bit(x, w0.bnb[0].t(), w0.bnb[1])
            check = check_within("bnb matmul_4bit", y, ref, bound, ours=False)
            fns = [lambda w=w: bnb.matmul_4bit(x, w.bnb[0].t(), w.bnb[1]) for w in weights]
            med, p20, p80 = timer(Rotation(fns), graph=True)
            return Row(case, impl, med, p20, p80, nf4_bytes(w0.ts) + io_bytes, check=check)

        if w0.bnb is not None:
            rows += baseline(case, impl, bnb_row)
        else:
            rows.append(unavailable(case, impl, BNB_PROBLEM or "bitsandbytes not installed"))

        dense = [w.dense for w in weights]
        y = torch.nn.functional.linear(x, dense[0])
        check = check_within(
            "bf16 dense",
            y,
            *forward_check(x64, _np(dense[0].double()), arithmetic(torch.bfloat16)),
            ours=False,
        )
        fns = [lambda d=d: torch.nn.functional.linear(x, d) for d in dense]
        med, p20, p80 = timer(Rotation(fns), graph=True)
        rows.append(Row(case, "bf16 dense (cuBLAS GEMV)", med, p20, p80, 2 * n + io_bytes, check=check))


# ------------------------------------------------------------------------------------------ QLoRA MLP


@dataclass
class MlpParams:
    gate: Weight
    up: Weight
    down: Weight
    lora: dict  # name -> (A bf16 (r, in), B bf16 (out, r)), on the device: PEFT's dtype for bf16 bases
    scaling: float


def make_mlp(shapes: Shapes, device) -> MlpParams:
    h, i, r = shapes.hidden, shapes.inter, shapes.rank
    lora = {}
    g = torch.Generator(device="cpu").manual_seed(7)
    for name, (out_f, in_f) in {"gate": (i, h), "up": (i, h), "down": (h, i)}.items():
        a = (torch.rand(r, in_f, generator=g) * 2 - 1) / math.sqrt(in_f)  # PEFT's kaiming bound
        b = torch.randn(out_f, r, generator=g) * 0.01  # non-zero, so the LoRA path changes the numbers
        lora[name] = (a.to(torch.bfloat16).to(device), b.to(torch.bfloat16).to(device))
    return MlpParams(
        quantize_weight(i, h, device, 11),
        quantize_weight(i, h, device, 12),
        quantize_weight(h, i, device, 13),
        lora,
        shapes.alpha / r,
    )


def ours_mlp(p: MlpParams, x: torch.Tensor, lora: dict, **config) -> torch.Tensor:
    gate = qlora_linear(x, p.gate.ts, *lora["gate"], p.scaling, **config)
    up = qlora_linear(x, p.up.ts, *lora["up"], p.scaling, **config)
    return qlora_linear(torch.nn.functional.silu(gate) * up, p.down.ts, *lora["down"], p.scaling, **config)


def check_layer(
    what: str, w: Weight, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, band: int, **config
):
    """One qlora_linear forward and backward at full size against float64: y and grad_x on one row in
    every ``band`` rows (:func:`spread_rows`), grad_A and grad_B in full (they reduce over every row),
    and all four finite everywhere, their buffers filled with NaN first (:func:`poisoned_outputs`): a
    tile the kernels skip fails. Raises ConformanceError."""
    x = x.detach().requires_grad_()
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    gen = torch.Generator(device="cpu").manual_seed(3)
    with poisoned_outputs():
        y = qlora_linear(x, w.ts, a, b, s, **config)
        gy = torch.randn(y.shape, generator=gen).to(y.dtype).to(y.device)
        y.backward(gy)
    for name, t in (("y", y), ("grad_x", x.grad), ("grad_A", a.grad), ("grad_B", b.grad)):
        check_finite(f"{what} {name}", t)
    x64, g64, a64, b64 = (_np(t.detach().double()) for t in (x, gy, a, b))
    # W as the kernels multiply it: the oracle's dequantization in the activation dtype.
    w64 = nf4.dequantize(oracle_state(w.ts), str(x.dtype).removeprefix("torch.")).astype(np.float64)
    sl = spread_rows(x.shape[0], band)
    ar = arithmetic(x.dtype)
    ref, bound = forward_check(x64[sl], w64, ar, a64, b64, s)
    rows = torch.from_numpy(sl).to(y.device)
    out = {"y": bound_ratio(f"{what} y", y[rows], ref, bound)}
    # grad_x on the same rows (it is row-wise); grad_A and grad_B reduce over every row.
    refs = lora.backward(g64[sl], x64[sl], w64, a64, b64, s)
    bx = bounds.lora_backward_bound(g64[sl], x64[sl], w64, a64, b64, s, ar)[0]
    out["grad_x"] = bound_ratio(f"{what} grad_x", x.grad[rows], refs[0], bx)
    # Over every row, but without the (tokens, out) x (out, in) products only grad_x needs.
    _, ref_a, ref_b = lora.backward(g64, x64, w64, a64, b64, s, grad_x=False)
    _, bA, bB = bounds.lora_backward_bound(
        g64, x64, w64, a64, b64, s, arithmetic(a.dtype, lowrank=True), grad_x=False
    )
    out["grad_A"] = bound_ratio(f"{what} grad_A", a.grad, ref_a, bA)
    out["grad_B"] = bound_ratio(f"{what} grad_B", b.grad, ref_b, bB)
    return f"{what}: " + ", ".join(f"{k} {v:.3g}" for k, v in out.items())


# A forward+backward of 5-15 ms: at least a second of runs, so each median has 60-200 samples.
MLP_REP_MS = 1000


def mlp_case(timer: Timer, shapes: Shapes, device, rows: list[Row]) -> None:
    case = f"QLoRA MLP fwd+bwd h{shapes.hidden} i{shapes.inter} {shapes.tokens} tok r{shapes.rank}"
    p = make_mlp(shapes, device)
    gen = torch.Generator(device="cpu").manual_seed(5)
    x = torch.randn(shapes.tokens, shapes.hidden, generator=gen).to(torch.bfloat16).to(device)
    gy = torch.randn(shapes.tokens, shapes.hidden, generator=gen).to(torch.bfloat16).to(device)
    h, i, t = shapes.hidden, shapes.inter, shapes.tokens
    flops = 4.0 * t * (3 * h * i)  # forward x W^T and backward grad_x for three layers; LoRA excluded

    # Conformance of every layer shape at full size, before any timing.
    mid = torch.randn(t, i, generator=gen).to(torch.bfloat16).to(device)
    checks = [
        check_layer("gate", p.gate, x, *p.lora["gate"], p.scaling, shapes.check_band),
        check_layer("down", p.down, mid, *p.lora["down"], p.scaling, shapes.check_band),
    ]
    lora = {k: (a.clone().requires_grad_(), b.clone().requires_grad_()) for k, (a, b) in p.lora.items()}
    params = [t_ for pair in lora.values() for t_ in pair]
    xg = x.clone().requires_grad_()
    reset_launch_counts()
    ours_mlp(p, xg, lora).backward(gy)
    counts = launch_counts()
    first = 6 if t >= DEQUANT_FIRST_MIN_M else 0  # W dequantized first for each GEMM at this many tokens
    assert counts.get("nf4_gemm") == 6 and counts.get("lowrank") == 12, counts
    assert counts.get("dequant", 0) == first, counts
    ours_out = ours_mlp(p, x, lora).detach()

    def run_ours():
        ours_mlp(p, xg, lora).backward(gy)

    med, p20, p80 = timer(run_ours, grad_to_none=[xg, *params], min_rep_ms=MLP_REP_MS)
    check = "within reflora's bound, max |Δ|/bound per layer: " + "; ".join(checks)
    rows.append(Row(case, "reflora triton", med, p20, p80, flops=flops, check=check))

    # The in-tile decode at this M (the default tiles of the largest M that keeps it), and that with
    # the table read by tl.gather; each checked on the down layer at full size before it is timed.
    # default_config's tiles depend on M and the blocksize, not on the layer's width (all are
    # multiples of 16 here).
    # The shared table varies the in-tile decode: its row is compared with that one's (``versus``), which
    # at this M is the "fused decode" row, not the default.
    fused = gemm_config(min(t, DEQUANT_FIRST_MIN_M - 1), h, i, 64)
    versus = VARIANT_FUSED if t >= DEQUANT_FIRST_MIN_M else None
    variants = [(VARIANT_SHARED, dataclasses.replace(fused, table="shared"), versus)]
    if t >= DEQUANT_FIRST_MIN_M:
        variants.insert(0, (VARIANT_FUSED, fused, None))
    for impl, cfg, versus in variants:
        check = "within reflora's bound, max |Δ|/bound: " + check_layer(
            "down", p.down, mid, *p.lora["down"], p.scaling, shapes.check_band, gemm=cfg
        )

        def run_variant(cfg=cfg):
            ours_mlp(p, xg, lora, gemm=cfg).backward(gy)

        med, p20, p80 = timer(run_variant, grad_to_none=[xg, *params], min_rep_ms=MLP_REP_MS)
        rows.append(Row(case, impl, med, p20, p80, flops=flops, check=check, versus=versus))
    _peft_rows(timer, case, shapes, p, x, gy, flops, ours_out, rows)


class _Mlp(torch.nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _inject_lora(model: torch.nn.Module, p: MlpParams, shapes: Shapes):
    import peft

    cfg = peft.LoraConfig(
        r=shapes.rank,
        lora_alpha=shapes.alpha,
        lora_dropout=0.0,
        target_modules=["gate_proj", "up_proj", "down_proj"],
    )
    model = peft.inject_adapter_in_model(cfg, model)
    params = []
    with torch.no_grad():
        for name, (a, b) in p.lora.items():
            layer = getattr(model, f"{name}_proj")
            la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            la.copy_(a.to(la.dtype))
            lb.copy_(b.to(lb.dtype))
            params += [la, lb]
    return model, params


def _peft_rows(timer, case, shapes, p: MlpParams, x, gy, flops, ours_out, rows: list[Row]) -> None:
    """PEFT + bitsandbytes, and bf16 dense + PEFT (which needs no bitsandbytes), each on its own, each
    timed twice: as a plain call, and under bfloat16 autocast (the Trainer's ``bf16=True``, where PEFT
    runs its float32 adapters' products in bfloat16). The targets take the faster of the two. Each row
    is its own baseline: one that fails leaves the others, and each is appended when it is done."""
    # label -> (model builder, what precedes the adapters' dtype in the row's name)
    builders = {
        "PEFT + bitsandbytes": (_peft_bnb_model, "LoRA "),
        "bf16 dense + PEFT LoRA": (_peft_dense_model, ""),
    }
    for label, (build, prefix) in builders.items():
        if build is _peft_bnb_model and p.gate.bnb is None:
            rows.append(unavailable(case, label, BNB_PROBLEM or "bitsandbytes not installed"))
            continue
        built, failed = attempt(case, label, functools.partial(build, p, shapes))
        if failed is not None:
            rows.append(failed)
            continue
        model, params = built
        impl = f"{label} ({prefix}{str(params[0].dtype).removeprefix('torch.')})"
        for autocast in (False, True):
            name = impl[:-1] + f", {AUTOCAST})" if autocast else impl
            run = functools.partial(_time_module, timer, case, name, model, params, x, gy, flops, ours_out)
            rows += baseline(case, name, functools.partial(run, autocast))


def _peft_bnb_model(p: MlpParams, shapes: Shapes):
    import bitsandbytes as bnb

    def linear4(w: Weight) -> torch.nn.Module:
        out_f, in_f = w.dense.shape
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(
            w.dense.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        return layer.to(w.dense.device)

    model = _Mlp(linear4(p.gate), linear4(p.up), linear4(p.down))
    model.is_loaded_in_4bit = True  # PEFT dispatches its bnb 4-bit LoRA layer only for flagged models
    return _inject_lora(model, p, shapes)


def _peft_dense_model(p: MlpParams, shapes: Shapes):
    def dense(w: Weight) -> torch.nn.Module:
        out_f, in_f = w.dense.shape
        layer = torch.nn.Linear(in_f, out_f, bias=False, device=w.dense.device, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(w.dense)
        layer.weight.requires_grad_(False)
        return layer

    model = _Mlp(dense(p.gate), dense(p.up), dense(p.down))
    return _inject_lora(model, p, shapes)


AUTOCAST = "bf16 autocast"


def _time_module(timer, case, impl, model, params, x, gy, flops, ours_out, autocast: bool) -> Row:
    """``model``'s forward + backward, called as it is or under bfloat16 autocast."""
    xg = x.clone().requires_grad_()
    context = functools.partial(torch.autocast, x.device.type, torch.bfloat16, enabled=autocast)
    with torch.no_grad(), context():
        y = model(x).float()
    ref = ours_out.float()
    rel = float((y - ref).norm() / ref.norm())
    check = f"info: ‖y−y_reflora‖/‖y_reflora‖ {rel:.2e}{' (unquantized W)' if 'dense' in impl else ''}"

    def run():
        with context():
            out = model(xg)
        out.backward(gy)

    med, p20, p80 = timer(run, grad_to_none=[xg, *params], min_rep_ms=MLP_REP_MS)
    return Row(case, impl, med, p20, p80, flops=flops, check=check)


# ------------------------------------------------------------------------------------------ tile sweep

TILES_CASE = "tiles"
# GEMM candidates on a GPU for M = 8192: the default (W dequantized first, first) and neighbours, then
# the in-tile decode's former default and neighbours; each compiles for sm_90 without spilling
# (benchmarks/_gpu_compile_check.py --tiles checks this). With the LoRA epilogue's second float32
# tile, 256-wide tiles spill 300-600 B a thread with the in-tile decode and 1.4-1.6 KB with W
# dequantized first, and 32-wide reduction steps at 4 warps spill too, so they are not here.
_DENSE = dict(num_warps=8, dequantize_first=True)
GEMM_TILES = (
    GemmConfig(bm=128, bp=128, bq=64, group_m=8, num_stages=4, **_DENSE),
    GemmConfig(bm=128, bp=128, bq=64, group_m=8, num_stages=3, **_DENSE),
    GemmConfig(bm=128, bp=128, bq=64, group_m=8, num_stages=5, **_DENSE),
    GemmConfig(bm=128, bp=128, bq=64, group_m=16, num_stages=4, **_DENSE),
    GemmConfig(bm=128, bp=64, bq=64, group_m=8, num_warps=4, num_stages=4, dequantize_first=True),
    GemmConfig(bm=128, bp=128, bq=64, group_m=8, num_warps=8, num_stages=3),
    GemmConfig(bm=128, bp=128, bq=64, group_m=8, num_warps=8, num_stages=4),
    GemmConfig(bm=64, bp=128, bq=64, group_m=8, num_warps=4, num_stages=4),
    GemmConfig(bm=128, bp=128, bq=64, group_m=8, num_warps=8, num_stages=3, table="shared"),
)
# GEMV candidates: each thread's share of a step's codes, bn*bk/2 / (32*num_warps) bytes, must be at
# least 16 for the 16-byte loads (smaller shares compile to narrower loads; the compile check fails them).
_GEMV_TILES = ((8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (16, 512, 8))
GEMV_TILES = tuple(GemvConfig(bn=bn, bk=bk, num_warps=w) for bn, bk, w in _GEMV_TILES)
# Under the interpreter (dry run): small tiles that cross the tiny shapes' edges.
DRY_GEMM_TILES = (
    GemmConfig(bm=16, bp=32, bq=16, group_m=2),
    GemmConfig(bm=32, bp=16, bq=32, group_m=1),
    GemmConfig(bm=16, bp=16, bq=32, group_m=1, dequantize_first=True),
)
DRY_GEMV_TILES = (GemvConfig(bn=8, bk=32), GemvConfig(bn=4, bk=64))


def tile_name(cfg) -> str:
    """'bm128 bp128 bq64 g8 w8 s3' (GemmConfig, '+dq' when W is dequantized first) or 'bn8 bk512 w4'
    (GemvConfig), '+shared' for that table."""
    if isinstance(cfg, GemmConfig):
        text = f"bm{cfg.bm} bp{cfg.bp} bq{cfg.bq} g{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}"
        text += " +dq" if cfg.dequantize_first else ""
    else:
        text = f"bn{cfg.bn} bk{cfg.bk} w{cfg.num_warps}"
    return text + (" +shared" if cfg.table == "shared" else "")


def _sweep(
    timer, case, configs, default, run, check, flops, nbytes, rows: list[Row] | None = None, bench=None
) -> list[Row]:
    """Time ``run(cfg)`` for each config, each checked first by ``check(out)``, its output allocated
    under :func:`poisoned_outputs`: a wrong kernel is never timed (a wrong default stops the run; a
    wrong candidate is a row that says so). The default's row is named "reflora triton", so that every
    other row's speedup reads as the default's time over it (below 1: the candidate wins).
    A config that does not compile (too many registers or too much shared memory) becomes a row that
    says why. Rows are appended to ``rows`` (returned; a new list by default) as each is done.
    bench: cfg -> (function to time, whether to time it as a CUDA graph); default (run(cfg), False)."""
    rows = [] if rows is None else rows
    bench = bench or (lambda cfg: (lambda: run(cfg), False))
    for cfg in dict.fromkeys((default, *configs)):  # the default first, once
        impl = "reflora triton" if cfg == default else f"reflora triton {tile_name(cfg)}"
        note = f"default: {tile_name(cfg)}" if cfg == default else ""
        try:
            with poisoned_outputs():
                out = run(cfg)
        except Exception as e:  # a launch the compiler refuses: recorded, not fatal
            rows.append(unavailable(case, impl, f"{type(e).__name__}: {str(e)[:160]}"))
            continue
        try:
            status = check(out)
        except ConformanceError as e:
            if cfg == default:
                raise  # the default is what ships: a wrong default stops the run
            rows.append(Row(case, impl, None, None, None, bytes=nbytes, flops=flops,
                            check=f"FAILED, not timed: {e}"))  # fmt: skip
            continue
        fn, graph = bench(cfg)
        med, p20, p80 = timer(fn, graph=graph)
        rows.append(Row(case, impl, med, p20, p80, bytes=nbytes, flops=flops, check=status, note=note))
    return rows


def tiles_case(timer: Timer, shapes: Shapes, device, rows: list[Row]) -> None:
    """Tile candidates for the QLoRA MLP's GEMMs (forward with its LoRA epilogue, and grad_x with
    its own) and for the GEMV, each checked (finite everywhere after a poisoned allocation, and against
    float64 on rows spread over every M tile), then timed beside the default: what the defaults of
    default_config should be, measured. Not part of the default run."""
    dry = timer.dry_run
    gemm_tiles, gemv_tiles = (DRY_GEMM_TILES, DRY_GEMV_TILES) if dry else (GEMM_TILES, GEMV_TILES)
    p = make_mlp(shapes, device)
    t, h, i = shapes.tokens, shapes.hidden, shapes.inter
    gen = torch.Generator(device="cpu").manual_seed(17)
    ar = arithmetic(torch.bfloat16)
    sl = spread_rows(t, shapes.check_band)
    picked = torch.from_numpy(sl).to(device)
    layers = {"gate/up": (p.gate, h, i, "gate"), "down": (p.down, i, h, "down")}
    for label, (w, k_in, n_out, name) in layers.items():
        a, b = p.lora[name]
        a64, b64 = _np(a.double()), _np(b.double())
        w64 = nf4.dequantize(oracle_state(w.ts), "bfloat16").astype(np.float64)
        x = torch.randn(t, k_in, generator=gen).to(torch.bfloat16).to(device)
        g = torch.randn(t, n_out, generator=gen).to(torch.bfloat16).to(device)
        with torch.no_grad():
            lt = lowrank_matmul(x, a.t())  # x Aᵀ, float32, as the forward keeps it
            u = lowrank_matmul(g, b)  # g B, float32, as the backward forms it
        fwd_ref = forward_check(_np(x.double())[sl], w64, ar, a64, b64, p.scaling)
        # grad_x = g W + s (g B) A is the forward form with W -> Wᵀ, A -> Bᵀ, B -> Aᵀ.
        bwd_ref = forward_check(_np(g.double())[sl], w64.T, ar, b64.T, a64.T, p.scaling)
        flops = 2.0 * t * k_in * n_out
        for direction, a_in, lora_args, ref, transposed in (
            ("fwd", x, (lt, b.t(), p.scaling), fwd_ref, False),
            ("grad_x", g, (u, a, p.scaling), bwd_ref, True),
        ):
            m, q_dim = a_in.shape
            p_dim = k_in if transposed else n_out
            case = f"{TILES_CASE}: {label} {direction} {m}x{p_dim}x{q_dim}"

            def run(cfg, a_in=a_in, lora_args=lora_args, transposed=transposed, w=w):
                return nf4_gemm(a_in, w.ts, transposed=transposed, lora=lora_args, config=cfg)

            def check(out, case=case, ref=ref):
                check_finite(case, out)
                return check_within(case, out[picked], *ref)

            default = gemm_config(m, p_dim, q_dim, w.ts.blocksize)
            with torch.no_grad():
                _sweep(timer, case, gemm_tiles, default, run, check, flops, None, rows)

    # The batch-1 GEMV on the dequantize case's matrix, timed as the GEMV case times it: a CUDA graph
    # of calls rotating over copies of the matrix, so that no call finds its weight in L2.
    weights = gemv_weights(shapes, device)
    w = weights[0]
    x = torch.randn(1, shapes.w_in, generator=gen).to(torch.bfloat16).to(device)
    w64 = nf4.dequantize(oracle_state(w.ts), "bfloat16").astype(np.float64)
    ref = forward_check(_np(x.double()), w64, ar)
    case = f"{TILES_CASE}: GEMV 1x{shapes.w_in} @ ({shapes.w_out}x{shapes.w_in})^T"
    nbytes = nf4_bytes(w.ts) + 2 * (shapes.w_in + shapes.w_out)

    def run_gemv(cfg):
        return nf4_gemv(x, w.ts, config=cfg)

    def check_gemv(out):
        check_finite(case, out)
        return check_within(case, out, *ref)

    def bench_gemv(cfg):
        return Rotation([lambda w=w_: nf4_gemv(x, w.ts, config=cfg) for w_ in weights]), True

    default = gemv_config(1, shapes.w_out, shapes.w_in)
    with torch.no_grad():
        _sweep(timer, case, gemv_tiles, default, run_gemv, check_gemv, None, nbytes, rows, bench_gemv)
