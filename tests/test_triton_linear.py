"""The Triton NF4 matmul, GEMV, rank-r GEMM and fused QLoRA linear (forward and backward) stay within
the derived error bound of float64 math on the same inputs (tolerance class BOUND).

Every reference is computed in float64 (``reflora.lora``) from the exact inputs: x, A, B, bias, mask
as stored, and W as ``reflora.nf4.dequantize(state, dtype)`` in the activation dtype, which is exactly
the operand the kernels multiply (they round each decoded tile once to that dtype). The bound comes
from ``reflora.bounds`` with the arithmetic ``TritonBackend.arithmetic`` declares (float32
accumulation, one output rounding: ``fused=True``), never a picked tolerance. Shapes are odd on
purpose: M, N, K not multiples of any tile, K not a multiple of the blocksize (and odd, so rows start
mid-byte), rank 1, one row.

Runs under the Triton CPU interpreter where tests/conftest.py chose it (no CUDA, or
TRITON_INTERPRET=1 set), else on CUDA.
"""

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed")

from bnb_helpers import bits  # noqa: E402  (the element bits of a tensor or array)
from triton_helpers import INTERPRET, kernel_device  # noqa: E402

from reflora import bounds, lora, nf4  # noqa: E402
from reflora.backends.torch.quant_state import TorchQuantState  # noqa: E402
from reflora.dtypes import as_dtype  # noqa: E402

DEVICE = kernel_device()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from reflora.backends.triton import (  # noqa: E402
    _common,
    launch_counts,
    lowrank_matmul,
    nf4_gemm,
    nf4_gemv,
    nf4_matmul,
    qlora_linear,
    reset_launch_counts,
)
from reflora.backends.triton import gemm as gemm_module  # noqa: E402
from reflora.backends.triton import gemv as gemv_module  # noqa: E402
from reflora.backends.triton._common import rounded_f32  # noqa: E402
from reflora.backends.triton.backend import TritonBackend  # noqa: E402
from reflora.backends.triton.gemm import DEQUANT_FIRST_MIN_M, GemmConfig  # noqa: E402
from reflora.backends.triton.gemm import default_config as gemm_default  # noqa: E402
from reflora.backends.triton.gemv import GemvConfig  # noqa: E402
from reflora.backends.triton.gemv import default_config as gemv_default  # noqa: E402
from reflora.backends.triton.lowrank import LowRankConfig  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- helpers


def make_weight(n, k, blocksize=64, dq=False, quant_type="nf4", seed=0, dtype="float32"):
    """(TorchQuantState on DEVICE, float64 (n, k) W: the exact ``nf4.dequantize(state, dtype)``, the
    operand the kernels use for activations of ``dtype``)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.02, 0.5, size=(n, 1))).astype(np.float32)
    state = nf4.quantize(w, blocksize, quant_type=quant_type, double_quant=dq)
    return TorchQuantState.from_state(state, DEVICE), nf4.dequantize(state, dtype).astype(np.float64)


def rand(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(DTYPES[dtype] if isinstance(dtype, str) else dtype)


def f64(t):
    return None if t is None else t.detach().cpu().double().numpy()


def dname(t):
    return str(t.dtype).removeprefix("torch.")


def arithmetic(output, *tensors):
    """The arithmetic TritonBackend declares for ``output``; with inputs of several dtypes (a bf16 x
    with float32 adapters) the operand is float32, which holds every one of them exactly."""
    ar = TritonBackend().arithmetic("qlora_forward", output)
    mixed = len({dname(t) for t in tensors if t is not None} | {output}) > 1
    return dataclasses.replace(ar, operand="float32") if mixed else ar


def check_bound(what, got, ref, bound, magnitude):
    """|got - ref| <= bound, elementwise; and the bound is tight enough to catch a real error
    (``magnitude``: the formula evaluated on absolute values, what an O(1) relative error would reach)."""
    got64 = f64(got)
    assert got64.shape == ref.shape, (what, got64.shape, ref.shape)
    assert np.isfinite(got64).all(), f"{what}: non-finite output"
    err = np.abs(got64 - ref)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements outside the bound; worst {tuple(map(int, i))}: "
            f"got {got64[i]!r}, expected {ref[i]!r} (|Δ| = {err[i]:.3e} > bound {bound[i]:.3e})"
        )
    # A bound this loose would let an O(1) relative error through; ours is a few output ulps at most.
    assert (bound <= 0.02 * magnitude + 1e-3 * np.abs(ref).max() + 1e-30).all(), f"{what}: vacuous bound"


def no_adapter(k, n):
    """A zero rank-1 adapter: its paths are all zero, so the LoRA bounds reduce to the base product."""
    return np.zeros((1, k)), np.zeros((n, 1))


def check_forward(what, y, x, w64, ar, a=None, b=None, scaling=0.0, bias=None, mask=None):
    """y = x W^T [+ scaling ((x*mask) A^T) B^T] [+ bias] within bounds.lora_forward_bound (2-D x)."""
    x64, b64, m64 = f64(x), f64(bias), f64(mask)
    a64, bb64 = no_adapter(x64.shape[1], w64.shape[0]) if a is None else (f64(a), f64(b))
    ref = lora.forward(x64, w64, a64, bb64, scaling, bias=b64, dropout_mask=m64)
    bound = bounds.lora_forward_bound(x64, w64, a64, bb64, scaling, ar, bias=b64, dropout_mask=m64)
    absolute = [None if v is None else np.abs(v) for v in (x64, w64, a64, bb64, b64, m64)]
    xa, wa, aa, ba, biasa, ma = absolute
    magnitude = lora.forward(xa, wa, aa, ba, abs(scaling), bias=biasa, dropout_mask=ma)
    check_bound(what, y, ref, bound, magnitude)


def backward_bounds(g, x, w64, a, b, scaling, mask, ar):
    """(refs, bounds, magnitudes) of (grad_x, grad_A, grad_B) by reflora.lora / reflora.bounds."""
    g64, x64, m64 = f64(g), f64(x), f64(mask)
    a64, b64 = no_adapter(x64.shape[1], w64.shape[0]) if a is None else (f64(a), f64(b))
    refs = lora.backward(g64, x64, w64, a64, b64, scaling, dropout_mask=m64)
    bds = bounds.lora_backward_bound(g64, x64, w64, a64, b64, scaling, ar, dropout_mask=m64)
    ga, xa, wa, aa, ba = (np.abs(v) for v in (g64, x64, w64, a64, b64))
    mags = lora.backward(ga, xa, wa, aa, ba, abs(scaling), dropout_mask=None if m64 is None else np.abs(m64))
    return refs, bds, mags


def check_sum_over_rows(what, got, g, out_dtype):
    """grad_bias = sum over rows of g, summed in float32 and rounded once to ``out_dtype``."""
    g64 = f64(g)
    ones = np.ones((1, g64.shape[0]))
    ref = (ones @ g64)[0]
    ref_err = bounds.matmul_bound(ones, g64, "float64")[0]
    err = bounds.matmul_bound(ones, g64, "float32")[0]
    bound = bounds.final_rounding_bound(err, np.abs(ref) + ref_err, out_dtype) + ref_err
    check_bound(what, got, ref, bound, np.abs(g64).sum(0))


def check_lowrank(what, got, p64, q64, slack):
    """got = p @ q for float64 operands that float32 holds exactly, summed in float32 (any order,
    split partials included), stored as float32: bounds.matmul_bound."""
    for v in (p64, q64):  # x*mask is formed in float32 by the kernel: exact, as checked here
        assert np.array_equal(bounds.round_to(v, "float32").astype(np.float64), v)
    ref = p64 @ q64
    ref_err = bounds.matmul_bound(p64, q64, "float64")
    err = bounds.matmul_bound(p64, q64, "float32", slack=slack)
    bound = bounds.final_rounding_bound(err, np.abs(ref) + ref_err, "float32") + ref_err
    check_bound(what, got, ref, bound, np.abs(p64) @ np.abs(q64))


# --------------------------------------------------------------------------------------------- nf4_gemm

GEMM_CASES = [
    # M, N, K, blocksize, double_quant, config: odd K (rows start mid-byte), K % blocksize != 0
    pytest.param(37, 70, 131, 64, False, None, id="37x70x131-bs64-oddK"),
    pytest.param(5, 33, 128, 32, True, None, id="5x33x128-bs32-dq-one-scale-per-tile-row"),
    pytest.param(20, 40, 192, 32, True, GemmConfig(bm=16, bp=32, bq=64), id="two-scales-per-tile-row"),
    pytest.param(1, 17, 256, 64, False, None, id="one-row"),
    pytest.param(16, 9, 70, 32, False, GemmConfig(bm=16, bp=16, bq=32), id="evenK-blocks-straddle-rows"),
    # grad_x tiles 64 wide over blocks of 32 that straddle rows: a tile row touches 3 blocks
    pytest.param(16, 9, 70, 32, True, GemmConfig(bm=16, bp=64, bq=16), id="three-blocks-per-tile-row"),
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("m", "n", "k", "bs", "dq", "cfg"), GEMM_CASES)
def test_gemm_forward_within_bound(m, n, k, bs, dq, cfg, dtype):
    ts, w64 = make_weight(n, k, bs, dq, seed=m + n, dtype=dtype)
    x = rand((m, k), dtype, seed=k)
    y = nf4_gemm(x.to(DEVICE), ts, config=cfg)
    assert y.dtype == x.dtype and y.shape == (m, n)
    check_forward(f"x @ W^T [{dtype}]", y, x, w64, arithmetic(dtype))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("m", "n", "k", "bs", "dq", "cfg"), GEMM_CASES)
def test_gemm_transposed_within_bound(m, n, k, bs, dq, cfg, dtype):
    """The grad_x orientation, a @ W, reads W tiles with rows as the reduction."""
    ts, w64 = make_weight(n, k, bs, dq, seed=m + n, dtype=dtype)
    g = rand((m, n), dtype, seed=n)
    out = nf4_gemm(g.to(DEVICE), ts, transposed=True, config=cfg)
    refs, bds, mags = backward_bounds(g, torch.zeros(m, k), w64, None, None, 0.0, None, arithmetic(dtype))
    check_bound(f"g @ W [{dtype}]", out, refs[0], bds[0], mags[0])


def test_gemm_fp4_state():
    ts, w64 = make_weight(23, 77, 32, True, quant_type="fp4", seed=5, dtype="bfloat16")
    x = rand((9, 77), "bfloat16", seed=1)
    check_forward("fp4 x @ W^T", nf4_gemm(x.to(DEVICE), ts), x, w64, arithmetic("bfloat16"))


@pytest.mark.parametrize(("m", "n", "k", "bs", "dq", "cfg"), GEMM_CASES)
def test_gemm_table_in_shared_memory_gives_the_same_bits(m, n, k, bs, dq, cfg):
    """table="shared" (codes looked up with tl.gather) changes how the table is read, not one value or
    the order of any sum: both orientations, with a LoRA epilogue and a mask, agree bit for bit."""
    ts, _ = make_weight(n, k, bs, dq, seed=m + n, dtype="bfloat16")
    x = rand((m, k), "bfloat16", seed=k).to(DEVICE)
    g = rand((m, n), "bfloat16", seed=n).to(DEVICE)
    lt = rand((m, 3), "float32", seed=1).to(DEVICE)
    for transposed, a, p, q in ((False, x, n, k), (True, g, k, n)):
        rt = rand((3, p), "bfloat16", seed=2).to(DEVICE)
        mask = (rand((m, p), "float32", seed=3) > 0).float().to(DEVICE)
        glob = cfg or gemm_default(m, p, q, bs)
        shared = dataclasses.replace(glob, table="shared")
        for kw in ({}, {"lora": (lt, rt, 0.5), "mask": mask}):
            want = nf4_gemm(a, ts, transposed=transposed, config=glob, **kw)
            got = nf4_gemm(a, ts, transposed=transposed, config=shared, **kw)
            assert np.array_equal(bits(got.cpu()), bits(want.cpu())), (transposed, sorted(kw))


@pytest.mark.parametrize(("m", "n", "k", "bs", "dq", "cfg"), GEMM_CASES)
def test_gemm_dequantize_first_gives_the_same_bits(m, n, k, bs, dq, cfg, monkeypatch):
    """dequantize_first (W decoded once into a scratch buffer, then read as a dense operand) changes
    where W is decoded, not its bits or the order of any sum: both orientations, with the LoRA
    epilogue (rank 37: three chunks), a mask and a bias, agree bit for bit with the in-tile decode.
    The scratch W is not kept once the call returns."""
    ts, _ = make_weight(n, k, bs, dq, seed=m + n, dtype="bfloat16")
    kept = []
    launch = gemm_module.dequantize_launch
    record = lambda *a, **k: kept.append(w := launch(*a, **k)) or w  # noqa: E731
    monkeypatch.setattr(gemm_module, "dequantize_launch", record)
    for dtype in ("bfloat16", "float32") if cfg is None else ("bfloat16",):
        x = rand((m, k), dtype, seed=k).to(DEVICE)
        g = rand((m, n), dtype, seed=n).to(DEVICE)
        lt = rand((m, 37), "float32", seed=1).to(DEVICE)
        for transposed, a, p, q in ((False, x, n, k), (True, g, k, n)):
            rt = rand((37, p), dtype, seed=2).to(DEVICE)
            mask = (rand((m, p), "float32", seed=3) > 0).float().to(DEVICE)
            bias = rand((p,), dtype, seed=4).to(DEVICE)
            fused = dataclasses.replace(cfg or gemm_default(m, p, q, bs), dequantize_first=False)
            first = dataclasses.replace(fused, dequantize_first=True)
            for kw in ({}, {"lora": (lt, rt, 0.5), "mask": mask, "bias": bias}):
                want = nf4_gemm(a, ts, transposed=transposed, config=fused, **kw)
                reset_launch_counts()
                got = nf4_gemm(a, ts, transposed=transposed, config=first, **kw)
                assert launch_counts() == {"dequant": 1, "nf4_gemm": 1}
                assert np.array_equal(bits(got.cpu()), bits(want.cpu())), (dtype, transposed, sorted(kw))
    import gc
    import weakref

    refs = [weakref.ref(w) for w in kept]
    del kept[:]
    gc.collect()
    assert refs and all(r() is None for r in refs)  # nothing held the scratch W


MIXED = [
    ("bfloat16", "float32"),
    ("float16", "float32"),
    ("float16", "bfloat16"),
    ("bfloat16", "float16"),
    ("float32", "bfloat16"),
]


@pytest.mark.parametrize(("state_dtype", "act"), MIXED, ids=[f"{s}-state-{a}-x" for s, a in MIXED])
def test_a_base_of_another_dtype_is_rounded_through_the_state_dtype(state_dtype, act):
    """W's operand is Ŵ = dequantize(state) in the state's dtype, then cast to the activations' dtype
    (reflora.qlora; bitsandbytes' backward), not the float32 product rounded once to the activations'
    (bitsandbytes' forward). One-hot rows of x pick single columns of W, so each output is one product
    1·w summed with zeros, exact: the output's bits are the operand's. Every path: the fused GEMM, the
    GEMM over W dequantized first, the GEMV, and the grad_x orientation."""
    n, k = 33, 70
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((n, k)) * 0.05).astype(as_dtype(state_dtype))
    state = nf4.quantize(w, 64, double_quant=True)
    ts = TorchQuantState.from_state(state, DEVICE)
    want = nf4.dequantize(state).astype(as_dtype(act))  # (n, k) Ŵ cast to the activations' dtype
    direct = nf4.dequantize(state, act)  # the single rounding the kernels must not use
    assert not np.array_equal(bits(want), bits(direct)) or state_dtype == "float32"
    eye_k, eye_n = torch.eye(k, dtype=DTYPES[act]), torch.eye(n, dtype=DTYPES[act])
    fused = dataclasses.replace(gemm_default(k, n, k, 64), dequantize_first=False)
    for first in (False, True):
        cfg = dataclasses.replace(fused, dequantize_first=first)
        y = nf4_gemm(eye_k.to(DEVICE), ts, config=cfg)  # (k, n): row j is W[:, j]
        assert np.array_equal(bits(y.cpu()), bits(want.T.copy())), ("forward", first)
        gx = nf4_gemm(eye_n.to(DEVICE), ts, transposed=True, config=cfg)  # (n, k): row i is W[i, :]
        assert np.array_equal(bits(gx.cpu()), bits(want)), ("grad_x", first)
    for j0 in (0, 4, 66):  # the GEMV: up to 4 one-hot rows at a time
        rows = eye_k[j0 : j0 + 4]
        y = nf4_gemv(rows.to(DEVICE), ts)
        assert np.array_equal(bits(y.cpu()), bits(want.T[j0 : j0 + 4].copy())), ("gemv", j0)


def test_gemm_default_config_on_a_gpu(monkeypatch):
    """default_config's GPU branch (pure Python): W dequantized first from DEQUANT_FIRST_MIN_M rows;
    float32 gets its own small tiles; 2 stages where scales are gathered an element; 64-wide tiles
    for rows that are not a multiple of 16 elements."""
    monkeypatch.setattr(gemm_module, "INTERPRET", False)
    cfg = gemm_module.default_config
    assert cfg(DEQUANT_FIRST_MIN_M, 11008, 4096, 64).dequantize_first
    below = cfg(DEQUANT_FIRST_MIN_M - 1, 11008, 4096, 64)
    assert not below.dequantize_first and (below.bm, below.bp, below.num_stages) == (128, 128, 3)
    assert cfg(100, 11008, 4096, 64, scale_per_element=True).num_stages == 2
    assert cfg(100, 11008, 4100, 64).bp == 64
    f32 = cfg(100, 11008, 4096, 64, torch.float32)
    assert (f32.bm, f32.bp, f32.bq, f32.num_stages) == (32, 64, 16, 2)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 37, 131), (4, 16, 256)], ids=["1x37x131-oddK", "4x16x256"])
def test_gemv_table_in_shared_memory_gives_the_same_bits(m, n, k):
    ts, _ = make_weight(n, k, 64, True, seed=n, dtype="bfloat16")
    x = rand((m, k), "bfloat16", seed=1).to(DEVICE)
    glob = gemv_default(m, n, k)
    want = nf4_gemv(x, ts, config=glob)
    got = nf4_gemv(x, ts, config=dataclasses.replace(glob, table="shared"))
    assert np.array_equal(bits(got.cpu()), bits(want.cpu()))


def test_table_must_be_global_or_shared():
    with pytest.raises(ValueError, match=r"table must be one of \('global', 'shared'\), got 'smem'"):
        GemmConfig(bm=16, bp=16, bq=16, table="smem")
    with pytest.raises(ValueError, match="table must be one of"):
        GemvConfig(bn=8, bk=32, table="texture")


# --------------------------------------------------------------------------------------------- nf4_gemv


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    ("m", "n", "k", "bs", "dq"),
    [(1, 37, 131, 64, True), (3, 29, 128, 32, False), (4, 16, 256, 128, True)],
    ids=["1x37x131", "3x29x128", "4x16x256"],
)
def test_gemv_with_lora_and_bias_within_bound(m, n, k, bs, dq, dtype):
    ts, w64 = make_weight(n, k, bs, dq, seed=n, dtype=dtype)
    x = rand((m, k), dtype, seed=1)
    a, b = rand((3, k), "float32", 0.1, seed=2), rand((n, 3), dtype, 0.1, seed=3)
    bias = rand((n,), dtype, seed=4)
    t = lowrank_matmul(x, a.t())
    y = nf4_gemv(x, ts, lora=(t, b.t(), 1.5), bias=bias, config=GemvConfig(bn=8, bk=32))
    check_forward(f"gemv [{dtype}]", y, x, w64, arithmetic(dtype, x, a, b, bias), a, b, 1.5, bias)
    plain = nf4_gemv(x, ts)
    check_forward(f"gemv plain [{dtype}]", plain, x, w64, arithmetic(dtype))


# (K, blocksize, BK) -> the scale gather (_common.scale_mode) of the one-row GEMV's paired decode, and
# whether the last step passes the end of a row (the step whose columns are masked).
ONE_ROW = {
    "mode0-tail": (70, 64, 32, 0, True),  # blocks straddle rows; 70 = 2 * 32 + 6
    "mode1": (128, 64, 32, 1, False),  # a step inside one block of each row
    "mode2-tail": (96, 32, 64, 2, True),  # two blocks a step; the last step's second block is past K
}


@pytest.mark.parametrize("act", ["bfloat16", "float32"])
@pytest.mark.parametrize(("k", "bs", "bk", "mode", "tail"), ONE_ROW.values(), ids=ONE_ROW.keys())
def test_one_row_gemv_reads_each_weight_bit_for_bit(k, bs, bk, mode, tail, act):
    """The one-row GEMV decodes the even and odd columns apart (_common.w_pairs) and masks columns only
    in a step that passes the end of a row. A one-hot x picks one column of W, so each output is one
    product 1·w: the column of Ŵ (a bfloat16 state, so under float32 x the operand is rounded through
    bfloat16), bit for bit. Columns at both nibbles, at block edges and in the last step, under each
    scale gather."""
    n = 21
    w = (np.random.default_rng(k).standard_normal((n, k)) * 0.05).astype(as_dtype("bfloat16"))
    state = nf4.quantize(w, bs, double_quant=True)
    ts = TorchQuantState.from_state(state, DEVICE)
    want = nf4.dequantize(state).astype(as_dtype(act))
    assert gemv_module.scale_mode(k, bs, bk) == mode and (k % bk != 0) == tail
    cfg = GemvConfig(bn=8, bk=bk)
    for j in sorted({0, 1, bs - 1, bs, bk - 1, bk, k - k % bk - 1, k - 2, k - 1}):
        x = torch.zeros(1, k, dtype=DTYPES[act])
        x[0, j] = 1
        y = nf4_gemv(x.to(DEVICE), ts, config=cfg)
        assert np.array_equal(bits(y[0].cpu()), bits(want[:, j].copy())), j


@triton.jit
def _rounded_kernel(src, dst, n, DTYPE: tl.constexpr, EMULATE: tl.constexpr, PACK: tl.constexpr):
    i = tl.program_id(0) * 4096 + tl.arange(0, 4096)
    v = tl.load(src + i, mask=i < n, other=0.0)
    tl.store(dst + i, rounded_f32(v, DTYPE, EMULATE, PACK), mask=i < n)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounded_f32_is_one_rounding_to_nearest_even(dtype):
    """_common.rounded_f32, the GEMV's rounding of Ŵ, is the float32 value of one round-to-nearest-even
    to ``dtype``. For bfloat16 on a GPU of compute capability 8.0 or newer it is the packed conversion
    (cvt.rn.bf16x2.f32 with a zero low half, _common.pack_bf16); under the interpreter, the integer
    emulation. Every high half of a float32 with the low halves 0, 0x7FFF, 0x8000 (the ties), 0x8001,
    0xFFFF and a random one: zeros, subnormals, the largest finite numbers (to inf), inf and NaN."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = [0, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
    rand = np.random.default_rng(0).integers(0, 1 << 16, high.size, dtype=np.uint32)
    v = np.concatenate([high | lo for lo in low] + [high | rand]).view(np.float32)
    src = torch.from_numpy(v).to(DEVICE)
    dst = torch.empty_like(src)
    pack = _common.pack_bf16(src.device)
    nvidia = DEVICE == "cuda" and torch.version.hip is None
    assert pack == (nvidia and torch.cuda.get_device_capability() >= (8, 0))
    _rounded_kernel[(triton.cdiv(v.size, 4096),)](src, dst, v.size, getattr(tl, dtype), INTERPRET, pack)
    got = dst.cpu().numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # the largest finite numbers round to inf
        want = v.astype(as_dtype(dtype)).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_gemv_masks_the_row_end_under_an_infinite_scale():
    """A block whose scale is inf (double quantization can rebuild one, docs/findings.md) and whose
    codes are all +1 has Ŵ = +inf throughout, so x = 1 gives +inf. With blocks straddling rows, the
    step that passes the end of a row reads padding that falls in that same block, with code -1 and
    x = 0: without the column mask that step keeps, 0·(-inf) makes the sum NaN."""
    n, k, bs = 3, 70, 64  # block 1: row 0's columns 64..69 and row 1's 0..57; the last step (bk 32) is 64..95
    ts, _ = make_weight(n, k, bs, False, dtype="float32")
    absmax = torch.ones_like(ts.absmax)
    absmax[1] = math.inf
    ts = dataclasses.replace(ts, packed=torch.full_like(ts.packed, 0xFF), absmax=absmax)  # code 15: +1.0
    y = nf4_gemv(torch.ones(1, k).to(DEVICE), ts, config=GemvConfig(bn=8, bk=32)).cpu()
    assert y.tolist() == [[math.inf, math.inf, 70.0]], y


def test_gemv_rejects_too_many_rows():
    ts, _ = make_weight(8, 64)
    with pytest.raises(ValueError, match=r"1\.\.4 rows"):
        nf4_gemv(torch.zeros(5, 64, device=DEVICE), ts)


# --------------------------------------------------------------------------------------------- lowrank


@pytest.mark.parametrize("split", [1, 3])
def test_lowrank_strided_masked_split(split):
    """t = (x*mask) A^T with A^T a transposed view, and u^T (x*mask) with the mask on the right."""
    x = rand((37, 131), "bfloat16", seed=1)
    mask = ((torch.rand(37, 131, generator=torch.Generator().manual_seed(2)) > 0.3) / 0.7).to(torch.bfloat16)
    a = rand((5, 131), "float32", 0.1, seed=3)
    cfg = LowRankConfig(bp=16, bq=16, bk=16, split=split)
    t = lowrank_matmul(x, a.t(), mask=mask, mask_on="left", config=cfg)
    x64, m64, a64 = f64(x), f64(mask), f64(a)
    slack = 1.0  # IEEE float32 dots, round to nearest (see test_qlora_forward_and_backward_within_bound)
    check_lowrank("t", t, x64 * m64, a64.T, slack)
    u = rand((37, 5), "float32", seed=4)
    ga = lowrank_matmul(u.t(), x, mask=mask, mask_on="right", config=cfg)
    check_lowrank("u^T (x*mask)", ga, f64(u).T, x64 * m64, slack)


# --------------------------------------------------------------------------------------------- qlora_linear

FIRST_M = DEQUANT_FIRST_MIN_M
QLORA_CASES = [
    # M, N, K, r, blocksize, dq, x dtype, adapter dtype, scaling, bias, dropout
    pytest.param(19, 37, 70, 4, 64, True, "bfloat16", "float32", 2.0, True, True, id="bf16-x-f32-lora-all"),
    pytest.param(19, 37, 70, 4, 32, False, "float16", "float16", 16 / math.sqrt(4), False, True, id="rslora"),
    pytest.param(19, 37, 131, 1, 64, True, "float32", "float32", 16 / 7**0.5, True, False, id="rank1-oddK"),
    pytest.param(1, 21, 67, 3, 32, False, "bfloat16", "bfloat16", 0.5, True, True, id="one-row-gemv"),
    pytest.param(21, 37, 70, 37, 64, True, "float16", "float32", 0.5, False, True, id="rank37-chunked"),
    # From DEQUANT_FIRST_MIN_M rows the default dequantizes W first, in the forward and in grad_x.
    pytest.param(FIRST_M, 37, 70, 20, 64, True, "bfloat16", "bfloat16", 2.0, True, True, id="dequant-first"),
]


def _qlora_inputs(m, n, k, r, bs, dq, dt, adt, bias, dropout, seed=0):
    ts, w64 = make_weight(n, k, bs, dq, seed=seed, dtype=dt)
    x = rand((m, k), dt, seed=seed + 1).to(DEVICE)
    a = rand((r, k), adt, 1 / math.sqrt(k), seed=seed + 2).to(DEVICE)
    b = rand((n, r), adt, 0.2, seed=seed + 3).to(DEVICE)
    bias_t = rand((n,), dt, seed=seed + 4).to(DEVICE) if bias else None
    mask = None
    if dropout:
        keep = torch.rand((m, k), generator=torch.Generator().manual_seed(seed + 5)) > 0.25
        mask = (keep / 0.75).to(DTYPES[dt]).to(DEVICE)
    return ts, w64, x, a, b, bias_t, mask


def _reference_grads(x, w64, g, a, b, scaling, bias, mask):
    """float64 gradients by torch autograd through the dequantized weight (the gradcheck-style check)."""
    x64 = torch.tensor(f64(x), requires_grad=True)
    a64 = torch.tensor(f64(a), requires_grad=True)
    b64 = torch.tensor(f64(b), requires_grad=True)
    w = torch.tensor(w64)
    y = x64 @ w.T
    xm = x64 if mask is None else x64 * torch.tensor(f64(mask))
    y = y + scaling * (xm @ a64.T) @ b64.T
    bias64 = None
    if bias is not None:
        bias64 = torch.tensor(f64(bias), requires_grad=True)
        y = y + bias64
    y.backward(torch.tensor(f64(g)))
    grads = {"grad_x": x64.grad.numpy(), "grad_A": a64.grad.numpy(), "grad_B": b64.grad.numpy()}
    if bias64 is not None:
        grads["grad_bias"] = bias64.grad.numpy()
    return grads


@pytest.mark.parametrize("m, n, k, r, bs, dq, dt, adt, scaling, bias, dropout", QLORA_CASES)
def test_qlora_forward_and_backward_within_bound(m, n, k, r, bs, dq, dt, adt, scaling, bias, dropout):
    ts, w64, x, a, b, bias_t, mask = _qlora_inputs(m, n, k, r, bs, dq, dt, adt, bias, dropout)
    saved = [t.clone() for t in (x, a, b, bias_t, mask) if t is not None]
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    if bias_t is not None:
        bias_t.requires_grad_()
    y = qlora_linear(x, ts, a, b, scaling, bias=bias_t, dropout_mask=mask)
    assert y.dtype == x.dtype and y.shape == (m, n)
    check_forward("qlora forward", y, x, w64, arithmetic(dt, x, a, b, bias_t), a, b, scaling, bias_t, mask)

    # A non-contiguous grad_y: the transpose of an (N, M) tensor.
    g = rand((n, m), dt, seed=9).to(DEVICE).t()
    y.backward(g)
    want = _reference_grads(x, w64, g, a, b, scaling, bias_t, mask)
    refs, bx, mags = backward_bounds(g, x, w64, a, b, scaling, mask, arithmetic(dt, x, a, b))
    # grad_A and grad_B come from the rank-r kernel: IEEE float32 dots (CUDA-core FMAs, or numpy under
    # the interpreter) that round to nearest, so the tensor cores' slack 2 is not theirs (acc_slack=1).
    lowrank_ar = dataclasses.replace(arithmetic(adt, x, a, b), acc_slack=1.0)
    _, (_, bA, bB), _ = backward_bounds(g, x, w64, a, b, scaling, mask, lowrank_ar)
    check_bound("grad_x", x.grad, refs[0], bx[0], mags[0])
    check_bound("grad_A", a.grad, refs[1], bA, mags[1])
    check_bound("grad_B", b.grad, refs[2], bB, mags[2])
    assert (x.grad.dtype, a.grad.dtype, b.grad.dtype) == (x.dtype, a.dtype, b.dtype)
    # Non-zero exactly where the float64 gradient is (dropped inputs give exact zeros in grad_A).
    for name, grad in (("grad_x", x.grad), ("grad_A", a.grad), ("grad_B", b.grad)):
        assert np.array_equal(f64(grad) != 0, want[name] != 0), f"{name}: zero pattern differs"
        assert (want[name] != 0).any()
    if bias_t is not None:
        check_sum_over_rows("grad_bias", bias_t.grad, g, dt)
    # Gradients never land in saved inputs: every input is bit-identical after backward.
    after = [t.detach() for t in (x, a, b, bias_t, mask) if t is not None]
    for before, now in zip(saved, after, strict=True):
        assert torch.equal(before.view(torch.uint8), now.view(torch.uint8))


def test_qlora_noncontiguous_and_batched_x():
    """A transposed-view x and a 3-D x with a permuted layout give the same function as contiguous x."""
    ts, w64, x, a, b, bias_t, mask = _qlora_inputs(13, 29, 70, 2, 32, True, "float16", "float32", True, True)
    ar = arithmetic("float16", x, a, b, bias_t)
    x_t = x.t().contiguous().t()  # same values, strides (1, 13)
    m_t = mask.t().contiguous().t()
    assert not x_t.is_contiguous()
    y = qlora_linear(x_t, ts, a, b, 3.0, bias=bias_t, dropout_mask=m_t)
    check_forward("transposed-view x", y, x, w64, ar, a, b, 3.0, bias_t, mask)
    # (13, 70) as (1, 13, 70) through a permuted (13, 1, 70) buffer: leading dims flattened.
    x3 = x.reshape(13, 1, 70).permute(1, 0, 2)
    y3 = qlora_linear(x3, ts, a, b, 3.0, bias=bias_t, dropout_mask=mask.reshape(13, 1, 70).permute(1, 0, 2))
    assert y3.shape == (1, 13, 29)
    check_forward("3-D x", y3[0], x, w64, ar, a, b, 3.0, bias_t, mask)


def test_peft_init_b_zero_gives_base_output_and_zero_grad_a():
    """With B = 0 (PEFT's init) the low-rank term is exactly 0: y equals nf4_matmul bit for bit,
    grad_A is exactly zero, and grad_B is not."""
    ts, _, x, a, _, bias_t, mask = _qlora_inputs(11, 19, 64, 4, 32, False, "bfloat16", "float32", True, True)
    b = torch.zeros(19, 4, device=DEVICE, requires_grad=True)
    a.requires_grad_()
    y = qlora_linear(x, ts, a, b, 2.0, bias=bias_t, dropout_mask=mask)
    base = nf4_matmul(x, ts, bias=bias_t)
    assert torch.equal(y.view(torch.int16), base.view(torch.int16))
    y.backward(rand((11, 19), "bfloat16", seed=3).to(DEVICE))
    assert torch.count_nonzero(a.grad) == 0
    assert torch.count_nonzero(b.grad) == b.numel()


def test_dropout_mask_applies_to_lora_branch_only():
    """A mask column of zeros removes that input feature from the LoRA branch only: grad_A's column is
    exactly 0, and grad_x's column is the base gradient g W alone, bit for bit."""
    ts, _, x, a, b, _, mask = _qlora_inputs(9, 21, 64, 3, 64, True, "float32", "float32", False, True)
    mask[:, 5] = 0
    x.requires_grad_()
    a.requires_grad_()
    qlora_linear(x, ts, a, b, 2.0, dropout_mask=mask).backward(g := rand((9, 21), "float32", seed=4))
    assert torch.count_nonzero(a.grad[:, 5]) == 0 and torch.count_nonzero(a.grad[:, 4]) > 0
    base_grad_x = nf4_gemm(g, ts, transposed=True)
    assert torch.equal(x.grad[:, 5], base_grad_x[:, 5])
    assert not torch.equal(x.grad[:, 4], base_grad_x[:, 4])


def test_nf4_matmul_grad_x_and_bias_only():
    ts, w64 = make_weight(17, 45, 32, True)
    x = rand((6, 45), "float32", seed=1).requires_grad_()
    bias = rand((17,), "float32", seed=2).requires_grad_()
    y = nf4_matmul(x, ts, bias=bias)
    check_forward("nf4_matmul", y, x, w64, arithmetic("float32"), bias=bias)
    g = rand((6, 17), "float32", seed=3)
    y.backward(g)
    refs, bds, mags = backward_bounds(g, x, w64, None, None, 0.0, None, arithmetic("float32"))
    check_bound("nf4_matmul grad_x", x.grad, refs[0], bds[0], mags[0])
    check_sum_over_rows("nf4_matmul grad_bias", bias.grad, g, "float32")


def test_frozen_inputs_get_no_grad_and_launches_are_recorded():
    ts, _, x, a, b, _, _ = _qlora_inputs(8, 21, 64, 2, 64, False, "bfloat16", "bfloat16", False, False)
    b.requires_grad_()  # only B trains: no grad_x, no grad_A
    reset_launch_counts()
    y = qlora_linear(x, ts, a, b, 1.0)
    assert launch_counts() == {"lowrank": 1, "nf4_gemm": 1}
    y.sum().backward()
    assert launch_counts() == {"lowrank": 2, "nf4_gemm": 1}  # grad_B only: one rank-r product
    assert x.grad is None and a.grad is None and b.grad is not None
    reset_launch_counts()
    qlora_linear(x[:1], ts, a, b, 1.0)
    assert launch_counts() == {"lowrank": 1, "nf4_gemv": 1}


def test_from_dequant_first_min_m_rows_w_is_dequantized_once_per_gemm():
    """Forward and grad_x each dequantize W into a scratch buffer, then run the dense-W GEMM."""
    m = DEQUANT_FIRST_MIN_M
    ts, _, x, a, b, _, _ = _qlora_inputs(m, 21, 64, 2, 64, False, "bfloat16", "bfloat16", False, False)
    x.requires_grad_()
    reset_launch_counts()
    y = qlora_linear(x, ts, a, b, 1.0)
    assert launch_counts() == {"lowrank": 1, "dequant": 1, "nf4_gemm": 1}
    y.sum().backward()  # grad_x (dequant + nf4_gemm) and u = g B; A and B are frozen
    assert launch_counts() == {"lowrank": 2, "dequant": 2, "nf4_gemm": 2}
    reset_launch_counts()
    qlora_linear(x[: m - 1], ts, a, b, 1.0)
    assert launch_counts() == {"lowrank": 1, "nf4_gemm": 1}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(dtype):
    # As nn.Linear does (an MoE expert that receives no tokens): y (3, 0, N), grad_x of x's shape,
    # grad_A, grad_B and grad_bias zero in their own dtypes, and no kernel launched.
    ts, _ = make_weight(8, 64)
    x = torch.zeros(3, 0, 64, device=DEVICE, dtype=DTYPES[dtype], requires_grad=True)
    a = torch.ones(2, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    b = torch.ones(8, 2, device=DEVICE, requires_grad=True)
    bias = torch.ones(8, device=DEVICE, dtype=torch.float16, requires_grad=True)
    reset_launch_counts()
    for fn in (lambda: qlora_linear(x, ts, a, b, 2.0, bias=bias), lambda: nf4_matmul(x, ts, bias=bias)):
        y = fn()
        assert y.shape == (3, 0, 8) and y.dtype == x.dtype
        y.sum().backward()
    assert launch_counts() == {}
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
    for t in (a, b, bias):
        assert t.grad.dtype == t.dtype and not t.grad.any()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape and bias.grad.shape == bias.shape


def test_bad_inputs_raise_clear_errors():
    ts, _ = make_weight(8, 64)
    x = torch.zeros(3, 64, device=DEVICE)
    a, b = torch.zeros(2, 64, device=DEVICE), torch.zeros(8, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 64\)"):
        qlora_linear(torch.zeros(3, 63, device=DEVICE), ts, a, b, 1.0)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        qlora_linear(x.double(), ts, a, b, 1.0)
    with pytest.raises(ValueError, match="A must be"):
        qlora_linear(x, ts, a[:, :32], b, 1.0)
    with pytest.raises(ValueError, match="dropout_mask must have"):
        qlora_linear(x, ts, a, b, 1.0, dropout_mask=torch.ones(3, 32, device=DEVICE))
    with pytest.raises(ValueError, match="bias must be"):
        qlora_linear(x, ts, a, b, 1.0, bias=torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="needs lora"):
        nf4_gemm(x, ts, mask=torch.ones(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match="must be 2-D"):
        nf4_matmul(x, dataclasses.replace(ts, shape=(512,)))


def test_more_bad_inputs_raise_clear_errors_not_garbage():
    """Found by an audit of the public API: each of these ran (wrongly) or failed deep inside Triton."""
    from reflora.backends.triton import dequantize_nf4

    ts, _ = make_weight(8, 64)
    x = torch.zeros(3, 64, device=DEVICE)
    a, b = torch.zeros(2, 64, device=DEVICE), torch.zeros(8, 2, device=DEVICE)
    for bad, kind in (
        (float("nan"), ValueError),
        (math.inf, ValueError),
        ("0.5", TypeError),
        (True, TypeError),
    ):
        with pytest.raises(kind, match="scaling must be"):
            qlora_linear(x, ts, a, b, bad)
    with pytest.raises(TypeError, match="not differentiated"):
        qlora_linear(x, ts, a, b, torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match="A and B come together"):
        qlora_linear(x, ts, None, b, 0.5, dropout_mask=torch.zeros(3, 64, device=DEVICE))
    with pytest.raises(ValueError, match="one device"):  # an empty batch is checked like any other
        qlora_linear(x[:0], ts, a, b, 0.5, bias=torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match=r"state\.code is on meta, state\.packed on"):
        qlora_linear(x, dataclasses.replace(ts, code=ts.code.to("meta")), a, b, 0.5)
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16, got 'float8'"):
        dequantize_nf4(ts, "float8")
    with pytest.raises(ValueError, match="expected a TorchQuantState, got QuantState"):
        dequantize_nf4(ts.to_state())
    for make, words in [
        (lambda: GemmConfig(16, 16, 16, group_m=0), "group_m must be an int >= 1"),
        (lambda: GemmConfig(bm=24, bp=16, bq=16), "bm must be a power of two >= 16"),
        (lambda: GemmConfig(bm=8, bp=16, bq=16), "bm must be a power of two >= 16"),
        (lambda: GemvConfig(bn=8, bk=48), "bk must be a power of two >= 2"),
        (lambda: LowRankConfig(bp=16, bq=16, bk=24), "bk must be a power of two >= 16"),
    ]:
        with pytest.raises(ValueError, match=words):
            make()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        lowrank_matmul(
            torch.zeros(3, 4, dtype=torch.float64, device=DEVICE), torch.zeros(4, 2, device=DEVICE)
        )
    empty = lowrank_matmul(torch.ones(3, 0, device=DEVICE), torch.ones(0, 2, device=DEVICE))
    assert empty.shape == (3, 2) and not empty.any()  # an empty sum, not a ZeroDivisionError


def test_an_output_beyond_int32_reach_is_refused_before_launch():
    # x passes its own reach check (one row, broadcast), but y = (M, 4096) would need offsets >= 2**31:
    # the store offsets wrapped negative (out-of-bounds writes on a GPU).
    ts, _ = make_weight(4096, 64)
    m = 2**31 // 4096 + 1
    x = torch.zeros(1, 64, device=DEVICE).expand(m, 64)
    with pytest.raises(ValueError, match=r"the output .* elements; the kernels index with int32"):
        nf4_matmul(x, ts, use_gemv=False)


def test_second_derivatives_raise_rather_than_come_out_wrong():
    ts, _ = make_weight(8, 64)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    a = torch.randn(2, 64, device=DEVICE, requires_grad=True)
    b = torch.randn(8, 2, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiable once"):  # before: 97% off, silently
        torch.autograd.grad(qlora_linear(x, ts, a, b, 0.5).sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(qlora_linear(x, ts, a, b, 0.5).sum(), x)  # once is fine
    assert gx.shape == x.shape


def test_a_state_written_in_place_between_forward_and_backward_is_refused():
    # grad_x dequantizes the weight again: a state zeroed after the forward gave grad_x of another
    # weight, silently.
    ts, _ = make_weight(8, 64)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    a = torch.randn(2, 64, device=DEVICE, requires_grad=True)
    b = torch.randn(8, 2, device=DEVICE, requires_grad=True)
    y = qlora_linear(x, ts, a, b, 0.5)
    ts.absmax.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        y.sum().backward()
    (ga,) = torch.autograd.grad(qlora_linear(x.detach(), ts, a, b, 0.5).sum(), a)  # A's needs no W
    assert ga.shape == a.shape


def test_the_package_exports_the_functions_whatever_was_imported_first():
    # The launcher module was also called nf4_gemm: once qlora.py imported it, the package attribute
    # `nf4_gemm` was that module, and `from reflora.backends.triton import nf4_gemm` gave the module.
    import reflora.backends.triton as package
    import reflora.backends.triton.qlora  # noqa: F401

    assert callable(package.nf4_gemm) and package.nf4_gemm.__module__ == "reflora.backends.triton.gemm"
