"""The Triton dequantize kernel is bit-identical to reflora.nf4.dequantize (tolerance class EXACT).

Runs under the Triton CPU interpreter where tests/conftest.py chose it (no CUDA, or
TRITON_INTERPRET=1 set), else on CUDA.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed")

from triton_helpers import kernel_device  # noqa: E402

from reflora import nf4  # noqa: E402
from reflora.backends.torch.quant_state import TorchQuantState, numpy_to_torch  # noqa: E402
from reflora.codebooks import DYNAMIC_MAP  # noqa: E402
from reflora.dtypes import DTYPES  # noqa: E402
from reflora.state import NestedState, QuantState  # noqa: E402

DEVICE = kernel_device()

from reflora.backends.triton import dequantize_nf4, launch_counts, reset_launch_counts  # noqa: E402
from reflora.backends.triton.dequant import dequantize_launch  # noqa: E402

# The interpreter's numpy cast warns where float16 outputs overflow to inf, which is the right answer.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

OUT_DTYPES = ("float32", "float16", "bfloat16")
_INT_VIEW = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}


def assert_same_bits(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    want_t = numpy_to_torch(want)
    assert got.shape == want_t.shape and got.dtype == want_t.dtype, (got.shape, got.dtype, want_t.shape)
    name = str(got.dtype).removeprefix("torch.")
    a = got.cpu().contiguous().view(_INT_VIEW[name]).reshape(-1)
    b = want_t.contiguous().view(_INT_VIEW[name]).reshape(-1)
    bad = torch.nonzero(a != b).reshape(-1)
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.numel()} of {a.numel()} elements differ; first at flat index {i}: "
            f"got {got.reshape(-1)[i].item()!r} (bits {int(a[i]):#x}), expected "
            f"{want_t.reshape(-1)[i].item()!r} (bits {int(b[i]):#x})"
        )


def oracle(state: QuantState, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # float16 outputs of large scales overflow to inf, as they should
        return nf4.dequantize(state, dtype)


CASES = [
    # shape, blocksize, double_quant, quant_type, input dtype
    ((37, 70), 64, False, "nf4", "float32"),  # n = 2590: ragged last block of 30
    ((5, 131), 32, True, "nf4", "bfloat16"),  # odd n = 655: padding nibble, ragged tail of 15
    ((77, 131), 32, True, "nf4", "float16"),  # 316 blocks: two double-quant groups, the second ragged
    ((1,), 64, False, "nf4", "float32"),  # one element, one byte half used
    ((4099,), 4096, True, "nf4", "float32"),  # two blocks of 4096, the second 3 elements long
    ((3, 1001), 256, False, "fp4", "bfloat16"),  # FP4 table through the same kernel
    ((33, 65), 128, True, "fp4", "float16"),
]


@pytest.mark.parametrize(("shape", "blocksize", "dq", "quant_type", "in_dtype"), CASES)
def test_bit_exact_against_oracle(shape, blocksize, dq, quant_type, in_dtype):
    rng = np.random.default_rng(abs(hash((shape, blocksize))) % 2**32)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 3)).astype(DTYPES[in_dtype])
    x.reshape(-1)[: min(x.size, blocksize)] = 0  # a zero block (or a zero head of one)
    state = nf4.quantize(x, blocksize, quant_type=quant_type, double_quant=dq)
    ts = TorchQuantState.from_state(state, DEVICE)
    default = dequantize_nf4(ts)  # the state's own dtype
    assert default.dtype == ts.dtype and tuple(default.shape) == shape
    assert_same_bits(default, oracle(state, in_dtype), f"default dtype {in_dtype}")
    for out_dtype in OUT_DTYPES:
        assert_same_bits(dequantize_nf4(ts, out_dtype), oracle(state, out_dtype), f"dtype {out_dtype}")


def _adversarial_absmax(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Scales at the edges of float32 and of the output dtypes, mixed with ordinary ones."""
    special = np.array(
        [
            2.0**-149,  # smallest float32 subnormal: code * absmax underflows to 0 or stays subnormal
            1e-45,
            3.3e-39,  # float32 subnormal
            2.0**-126,  # smallest normal
            1.1754942e-38,  # largest subnormal
            6.0e-8,  # near float16's smallest subnormal (5.96e-8)
            6.1e-5,  # float16's smallest normal
            65504.0,  # float16 max: code 1.0 stays finite, rounding neighbours overflow
            65520.0,  # rounds to inf in float16
            3.3895e38,  # near bfloat16's max: the RNE carry into the exponent
            3.4028235e38,  # float32 max: rounds to inf in bfloat16 and float16
            0.0,
            1.0,
        ],
        dtype=np.float32,
    )
    absmax = rng.standard_normal(n_blocks).astype(np.float32) ** 2
    absmax[: min(n_blocks, special.size)] = special[: min(n_blocks, special.size)]
    return absmax


@pytest.mark.parametrize("blocksize", [32, 64])
def test_adversarial_scales_bit_exact(blocksize):
    rng = np.random.default_rng(blocksize)
    n = 13 * blocksize + 7  # every special scale gets a block, plus a ragged tail
    n_blocks = -(-n // blocksize)
    packed = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    state = QuantState(
        packed=packed,
        absmax=_adversarial_absmax(rng, n_blocks),
        shape=(n,),
        dtype=np.float32,
        blocksize=blocksize,
        quant_type="nf4",
        code=nf4.quantize(np.ones(2, np.float32)).code,
    )
    ts = TorchQuantState.from_state(state, DEVICE)
    for out_dtype in OUT_DTYPES:
        assert_same_bits(dequantize_nf4(ts, out_dtype), oracle(state, out_dtype), f"adversarial {out_dtype}")


def _nested(rng: np.random.Generator, n_blocks: int, absmax2: np.ndarray, offset: float) -> NestedState:
    return NestedState(
        absmax_q=rng.integers(0, 256, n_blocks, dtype=np.uint8),
        absmax2=np.asarray(absmax2, dtype=np.float32),
        code2=DYNAMIC_MAP.values,
        offset=np.float32(offset),
    )


def _fma_changes(nested: NestedState) -> int:
    """How many reconstructed scales a fused multiply-add (one rounding) would change."""
    group = np.arange(nested.absmax_q.size) // nested.blocksize2
    a = nested.code2[nested.absmax_q].astype(np.float64)
    b = nested.absmax2[group].astype(np.float64)
    two = (a * b).astype(np.float32) + nested.offset  # float32 + float32: the second rounding
    fused = (a * b + np.float64(nested.offset)).astype(np.float32)  # a*b is exact in float64
    return int((two.view(np.uint32) != fused.view(np.uint32)).sum())


@pytest.mark.parametrize(
    ("absmax2", "offset"),
    [
        ([0.021, 0.013], 0.0407),  # ordinary: offset ~ the mean scale, codes spread around it
        ([1e-38, 3.0e-39], 2.0e-39),  # subnormal group scales and offset
        ([3.0e38, 1.0e38], 1.0e37),  # huge: products near float32 max
        ([0.5, 0.0], -1e-3),  # an all-zero group (absmax2 = 0) and a negative offset
    ],
)
def test_double_quant_reconstruction_bit_exact(absmax2, offset):
    """Two roundings, f32(f32(code2[q] * absmax2) + offset), never one fused multiply-add."""
    rng = np.random.default_rng(7)
    blocksize, n_blocks = 32, 300  # two groups of 256 scales, the second ragged (44)
    n = blocksize * n_blocks - 5
    nested = _nested(rng, n_blocks, absmax2, offset)
    state = QuantState(
        packed=rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8),
        absmax=None,
        shape=(n,),
        dtype=np.float32,
        blocksize=blocksize,
        quant_type="nf4",
        code=nf4.quantize(np.ones(2, np.float32)).code,
        nested=nested,
    )
    ts = TorchQuantState.from_state(state, DEVICE)
    for out_dtype in OUT_DTYPES:
        assert_same_bits(dequantize_nf4(ts, out_dtype), oracle(state, out_dtype), f"double quant {out_dtype}")


def test_fma_would_be_detected():
    """The ordinary double-quant case above contains scales where an FMA changes the result, so the
    bit-exact test would catch a contracted reconstruction on hardware that fuses."""
    nested = _nested(np.random.default_rng(7), 300, [0.021, 0.013], 0.0407)
    assert _fma_changes(nested) > 0


def test_rounding_to_bfloat16_and_float16_is_nearest_even():
    """A custom 16-entry table with absmax 1 turns dequantize into a plain float32 -> dtype cast of
    chosen values: exact ties (to even, both directions), a mantissa carry, subnormals, overflow."""
    one = 1.0
    table = np.array(
        [
            one + 2.0**-8,  # bf16 tie between 1 and 1+2^-7: to 1 (even)
            one + 3 * 2.0**-8,  # bf16 tie between 1+2^-7 and 1+2^-6: to 1+2^-6 (even)
            -(one + 2.0**-8),
            one + 2.0**-11,  # f16 tie: to 1
            one + 3 * 2.0**-11,  # f16 tie: up
            2.0 - 2.0**-9,  # bf16 rounds up to 2.0: carry into the exponent
            2.0**-130 + 2.0**-139,  # bf16 subnormal with a rounding bit
            2.0**-149,  # float32 subnormal: flushes to 0 in both 16-bit types
            3 * 2.0**-26,  # float16 subnormal tie region
            3.4e38,  # inf in both 16-bit types
            -3.4e38,
            65519.0,  # float16: rounds to 65504
            65520.0,  # float16: rounds to inf
            1.0 / 3.0,
            -0.0,
            0.0,
        ],
        dtype=np.float32,
    )
    n = 16 * 16
    q = np.arange(n) % 16
    state = QuantState(
        packed=nf4.pack(q.astype(np.uint8), 7),
        absmax=np.ones(n // 64, np.float32),
        shape=(n,),
        dtype=np.float32,
        blocksize=64,
        quant_type="nf4",
        code=table,
    )
    ts = TorchQuantState.from_state(state, DEVICE)
    for out_dtype in OUT_DTYPES:
        assert_same_bits(dequantize_nf4(ts, out_dtype), oracle(state, out_dtype), f"table cast {out_dtype}")


def test_nibble_order_high_first():
    """Byte 0xF0 decodes to [code[15], code[0]] = [absmax, -absmax]: element 2j is the high nibble."""
    state = QuantState(
        packed=np.array([0xF0, 0x7F], np.uint8),
        absmax=np.array([2.0], np.float32),
        shape=(3,),
        dtype=np.float32,
        blocksize=64,
        quant_type="nf4",
        code=nf4.quantize(np.ones(2, np.float32)).code,
    )
    out = dequantize_nf4(TorchQuantState.from_state(state, DEVICE))
    assert out.cpu().tolist() == [2.0, -2.0, 0.0]


def test_block_sizes_per_program_do_not_matter():
    """Smaller and larger programs (a multiple and a non-multiple of the data) give the same bits."""
    rng = np.random.default_rng(3)
    state = nf4.quantize(rng.standard_normal((9, 67)).astype(np.float32), 32, double_quant=True)
    ts = TorchQuantState.from_state(state, DEVICE)
    want = oracle(state, "bfloat16")
    for block in (16, 128, 512):
        out = torch.empty(ts.shape, dtype=torch.bfloat16, device=DEVICE)
        assert_same_bits(dequantize_launch(ts, out, block=block), want, f"block={block}")


def test_launch_is_recorded():
    state = nf4.quantize(np.ones((2, 64), np.float32))
    reset_launch_counts()
    dequantize_nf4(TorchQuantState.from_state(state, DEVICE))
    assert launch_counts() == {"dequant": 1}


def test_bad_arguments_raise():
    state = nf4.quantize(np.ones((2, 64), np.float32))
    ts = TorchQuantState.from_state(state, DEVICE)
    with pytest.raises(ValueError, match="contiguous with 128 elements"):
        dequantize_launch(ts, torch.empty(127, device=DEVICE))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        dequantize_launch(ts, torch.empty(128, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_launch(ts, torch.empty(2, 128, device=DEVICE)[:, ::2])
    with pytest.raises(ValueError, match="power of two"):
        dequantize_launch(ts, torch.empty(128, device=DEVICE), block=48)
    short = TorchQuantState(ts.packed, ts.absmax[:1], ts.code, ts.shape, ts.dtype, 64, "nf4")
    with pytest.raises(ValueError, match=r"state\.absmax must be"):
        dequantize_nf4(short)
    with pytest.raises(ValueError, match="one device"):
        dequantize_launch(ts, torch.empty(128, device="meta"))
    # The oracle and the torch ops take any positive blocksize2; the kernels only powers of two.
    odd = TorchQuantState.from_state(nf4.quantize(np.ones((2, 64), np.float32), 32, double_quant=True,
                                                  blocksize2=3), DEVICE)  # fmt: skip
    with pytest.raises(ValueError, match=r"state\.blocksize2 must be a power of two >= 1, got 3"):
        dequantize_nf4(odd)
