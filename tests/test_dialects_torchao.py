"""The ``torchao`` dialect against torchao 0.18's ``to_nf4``, bit for bit.

Compared: the codebook, scaler_mean, quantization_factor, quantized_scalers, quantized_data and the
dequantized weight, for bfloat16/float16/float32 and the shapes torchao accepts; and the shapes it
rejects. NaN payload bits are not modelled by the dialect (torch's float32 -> bfloat16 conversion of
NaN depends on the kernel), so where a value is NaN only NaN-ness is compared.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="comparing with torchao needs torch")
workflows = pytest.importorskip(
    "torchao.quantization.quantize_.workflows", reason="the torchao dialect is checked against torchao"
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from reflora import dialects, nf4  # noqa: E402
from reflora.backends._tensors import cpu_host  # noqa: E402
from reflora.dialects import torchao_nf4 as ao  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
HOST = cpu_host()
# (shape, blocksize): accepted by torchao with scaler_block_size 256.
SHAPES = [((16384,), 64), ((128, 128), 64), ((3, 16384), 64), ((256, 64), 32), ((64, 1024), 256)]


def to_torch(x: np.ndarray) -> torch.Tensor:
    x = np.array(x, order="C")  # a C-contiguous copy that keeps 0-d arrays 0-d
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def assert_same(name: str, mine: np.ndarray, theirs: torch.Tensor, ctx: str) -> None:
    want = to_numpy(theirs)
    mine = np.asarray(mine)
    assert mine.dtype == want.dtype and mine.shape == want.shape, (
        f"{name}: {mine.dtype}{mine.shape} vs torchao {want.dtype}{want.shape} [{ctx}]"
    )
    same = mine.tobytes() == want.tobytes()
    if not same:
        a, b = mine.reshape(-1), want.reshape(-1)
        diff = a.view(f"u{a.itemsize}") != b.view(f"u{b.itemsize}")
        if a.dtype.kind == "f" or a.dtype == BF16:
            diff &= ~(np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32)))
        i = np.flatnonzero(diff)
        assert i.size == 0, (
            f"{name}: {i.size}/{a.size} differ, first at {i[0]}: {a[i[0]]} vs {b[i[0]]} [{ctx}]"
        )


def check_against_torchao(
    x: np.ndarray, blocksize: int = 64, scaler_block_size: int = 256
) -> ao.TorchaoNF4State:
    ctx = f"dtype={x.dtype}, shape={x.shape}, blocksize={blocksize}, scaler_block_size={scaler_block_size}"
    ref = workflows.to_nf4(to_torch(x), blocksize, scaler_block_size)
    state = ao.quantize(x, blocksize, scaler_block_size=scaler_block_size, host=HOST)
    assert_same("nf4", state.nf4, ref.nf4, ctx)
    assert_same("scaler_mean", state.scaler_mean, ref.scaler_mean, ctx)
    assert_same("quantization_factor", state.quantization_factor, ref.quantization_factor, ctx)
    assert_same("quantized_scalers", state.quantized_scalers, ref.quantized_scalers, ctx)
    assert_same("quantized_data", state.quantized_data, ref.quantized_data, ctx)
    assert_same("dequantized", ao.dequantize(state), ref.get_original_weight(), ctx)
    return state


@pytest.mark.parametrize("dist", ["normal", "uniform", "wide"])
@pytest.mark.parametrize(("shape", "blocksize"), SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random(dtype, shape, blocksize, dist):
    rng = np.random.default_rng(sum(shape) + blocksize + dtype.itemsize)
    if dist == "normal":
        x = rng.normal(0, 0.02, shape)
    elif dist == "uniform":
        x = rng.uniform(-0.05, 0.05, shape)
    else:  # magnitudes over ~4 decades inside one tensor
        x = rng.normal(0, 1, shape) * np.exp(rng.uniform(-5, 5, shape))
    state = check_against_torchao(x.astype(np.float32).astype(dtype), blocksize)
    # The conversion to a plain QuantState dequantizes canonically to torchao's exact output.
    np.testing.assert_array_equal(
        nf4.dequantize(state.to_quant_state()).view(np.uint8), ao.dequantize(state).view(np.uint8)
    )


@pytest.mark.parametrize("scaler_block_size", [1, 8, 64, 128, 512, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scaler_block_sizes_other_than_256(dtype, scaler_block_size):
    """Groups of other than 256 block scales (1024 blocks of 64, scales over ten binades; 1024 is one
    group): each group's own factor; the conversion to a QuantState dequantizes exactly, or is refused
    where a scale rebuilds below zero (the spread makes some small blocks' scales do so)."""
    rng = np.random.default_rng(scaler_block_size + dtype.itemsize)
    x = rng.standard_normal((1024, 64)) * 2.0 ** rng.uniform(-8, 2, (1024, 1))
    state = check_against_torchao(x.reshape(256, 256).astype(np.float32).astype(dtype), 64, scaler_block_size)
    assert state.quantization_factor.shape == (1024 // scaler_block_size,)
    if (state.scales().astype(np.float32) < 0).any():
        with pytest.raises(ValueError, match="stored scale must be finite and >= 0"):
            nf4.dequantize(state.to_quant_state())
    else:
        np.testing.assert_array_equal(
            nf4.dequantize(state.to_quant_state()).view(np.uint8), ao.dequantize(state).view(np.uint8)
        )


def _adversarial(shape=(128, 128)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.02, shape)
    cases = {"zeros": np.zeros(shape), "ones (every scaler equal: factor inf)": np.ones(shape)}
    x = w.copy()
    x[5:10] = 0
    cases["all-zero blocks"] = x
    for name, v in (("nan", np.nan), ("+inf", np.inf), ("-inf", -np.inf)):
        x = w.copy()
        x[3, 7] = v
        cases[name] = x
    cases["tiny (float16 factor overflows)"] = rng.normal(0, 1e-6, shape)
    cases["subnormal"] = rng.normal(0, 1e-40, shape)
    cases["large"] = rng.normal(0, 1e4, shape)
    x = np.abs(w)
    x.reshape(-1, 64)[:, 0] = 0.05
    cases["equal absmax everywhere but rounding"] = x
    return cases


ADVERSARIAL = _adversarial()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial(name, dtype):
    check_against_torchao(ADVERSARIAL[name].astype(np.float32).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_in_the_input_dtype(dtype):
    # Scaled values on (and 1e-3 around) the midpoints of the rounded table *in that dtype*: torchao's
    # argmin takes the first (lower) index on an exact tie.
    table = ao.codebook(dtype).astype(np.float64)
    blocks = []
    for m in (table[:-1] + table[1:]) / 2:
        for spread in (0.0, 1e-3, -1e-3):
            block = np.empty(64)
            block[0], block[1:] = 1.0, m + spread * np.linspace(-1, 1, 63)
            blocks.append(block)
    x = np.concatenate(blocks)
    x = np.concatenate([x, np.tile(x[:64], (16384 - x.size) // 64)]).reshape(128, 128)
    check_against_torchao(x.astype(np.float32).astype(dtype))


def test_codebook_is_four_decimals_in_the_input_dtype():
    assert ao.codebook(BF16)[1] == np.float32(-0.6953125)  # -0.6962 in bfloat16
    assert ao.codebook(np.float32)[14] == np.float32(0.7230)


@pytest.mark.parametrize(
    ("shape", "blocksize"),
    [((64, 128), 64), ((2, 3, 16384), 64), ((16383,), 64), ((128, 128), 48), ((128, 128), 128), ((0,), 64)],
    ids=str,
)
def test_shape_constraints(shape, blocksize):
    x = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError):
        ao.quantize(x, blocksize)
    if x.size:  # torchao itself asserts (an empty tensor it would turn into NaN scalers)
        with pytest.raises(AssertionError):
            workflows.to_nf4(to_torch(x), blocksize, 256)


@pytest.mark.parametrize(
    ("shape", "blocksize", "scaler_block_size"),
    [((32, 32), 32, 64), ((128, 128), 64, 512), ((96,), 32, 2), ((24, 20), 64, 1)],
    ids=str,
)
def test_shape_constraints_with_other_scaler_block_sizes(shape, blocksize, scaler_block_size):
    """Rule 1 with the group size given: blocks not a multiple of it, numel not a multiple of blocksize."""
    x = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError):
        ao.quantize(x, blocksize, scaler_block_size=scaler_block_size)
    with pytest.raises(AssertionError):
        workflows.to_nf4(to_torch(x), blocksize, scaler_block_size)


def test_interface():
    assert dialects.get("torchao") is ao
    x = np.zeros((128, 128), dtype=np.float32)
    with pytest.raises(ValueError, match="NF4 only"):
        ao.quantize(x, quant_type="fp4")
    with pytest.raises(ValueError, match="always double-quantizes"):
        ao.quantize(x, double_quant=False)
    odd_blocks = ao.quantize(np.ones((64, 64), np.float32), 16)  # torchao takes any divisor
    with pytest.raises(ValueError, match="block_size 16"):
        odd_blocks.to_quant_state()
    state = ao.quantize(np.ones((256, 64), np.float32), 32)
    assert state == ao.quantize(np.ones((256, 64), np.float32), 32)
    assert ao.dequantize(state, "bfloat16").dtype == BF16


def test_offset_replays_scaler_mean():
    x = np.random.default_rng(3).normal(0, 0.02, (128, 128)).astype(BF16)
    ref = workflows.to_nf4(to_torch(x), 64, 256)
    state = ao.quantize(x, offset=float(ref.scaler_mean.float()))
    assert_same("quantized_scalers", state.quantized_scalers, ref.quantized_scalers, "offset replay")
    moved = ao.quantize(x, offset=float(ref.scaler_mean.float()) * 1.5)
    assert moved.scaler_mean != state.scaler_mean


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-30, 30),
    rows=st.sampled_from([1, 2, 4]),
)
def test_hypothesis_against_torchao(dtype, seed, log_scale, rows):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows * 64, 256)) * np.exp(log_scale) * np.exp(rng.uniform(-3, 3, (rows * 64, 1)))
    with np.errstate(over="ignore"):
        check_against_torchao(x.astype(np.float32).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_non_contiguous_view_is_quantized_in_logical_order(dtype):
    """torchao's contiguity check, ``assert input_tensor.is_contiguous`` (the bound method, always true),
    never fires: a transposed or strided view is quantized as its logical-order copy would be, as the
    dialect quantizes it; the NF4Tensor records the view's strides."""
    from reflora.backends._tensors import view  # torch over the same memory, strides kept

    base = np.random.default_rng(7).standard_normal((256, 256)).astype(np.float32).astype(dtype)
    for x in (base[:, :128].T, base[:, ::2]):  # (128, 256) transposed; (256, 128) every other column
        t = view(x)
        assert not t.is_contiguous()
        ref = workflows.to_nf4(t, 64, 256)
        assert ref.stride() == t.stride()
        state = ao.quantize(x, 64, host=HOST)
        ctx = f"{dtype}, strides {t.stride()}"
        assert_same("quantized_data", state.quantized_data, ref.quantized_data, ctx)
        assert_same("dequantized", ao.dequantize(state), ref.get_original_weight(), ctx)


def _sparse(dtype: np.dtype, seed: int) -> np.ndarray:
    """128 x 128, 5% of the entries N(0, 0.05), the rest 0 (benchmarks/sparse_scales.py's weights)."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal(128 * 128) * 0.05
    return (dense * (rng.random(dense.size) < 0.05)).reshape(128, 128).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_weights_rebuild_negative_scales_and_nonzero_zero_blocks(dtype):
    """Rule 5 on sparse weights, against torchao: some block scale comes back below zero, and an all-zero
    block dequantizes to -scale; the dialect reproduces both bit for bit, and the canonical dequantization
    of to_quant_state() refuses the negative scale instead of returning something else."""
    for seed in range(40):
        x = _sparse(dtype, seed)
        state = check_against_torchao(x, 32)  # every field and the dequantized weight, bit for bit
        scales = state.scales().astype(np.float32)
        if (scales < 0).any():
            break
    else:
        pytest.fail("no negative rebuilt scale in 40 sparse weights")
    out = ao.dequantize(state).astype(np.float32).reshape(-1, 32)
    zero = np.abs(x.astype(np.float32)).reshape(-1, 32).max(1) == 0
    assert (out[zero] != 0).any(), "an all-zero block dequantized to zero everywhere"
    with pytest.raises(ValueError, match="stored scale must be finite and >= 0"):
        nf4.dequantize(state.to_quant_state())
