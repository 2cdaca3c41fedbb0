"""reflora.qlora: LoRA on the dequantized 4-bit base, and a 4-bit merge that reports what it lost."""

import dataclasses
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflora import bounds, lora, nf4, qlora

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
U64 = 2.0**-53


@st.composite
def qlora_case(draw):
    dtype = draw(st.sampled_from(DTYPES), label="base dtype")
    out, n_in, r = (
        draw(st.sampled_from([1, 7, 16]), label="out"),
        draw(st.sampled_from([1, 33, 64]), label="in"),
        draw(st.integers(1, 3), label="r"),
    )
    blocksize = draw(st.sampled_from([32, 64, 128]), label="blocksize")  # 7 x 33 leaves a ragged last block
    quant_type = draw(st.sampled_from(["nf4", "fp4"]), label="quant_type")
    dq = draw(st.booleans(), label="double_quant")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    W = (rng.standard_normal((out, n_in)) * 0.05).astype(dtype)
    state = nf4.quantize(W, blocksize, quant_type=quant_type, double_quant=dq)
    x = rng.standard_normal((2, 3, n_in)).astype(dtype)
    A, B = (
        (rng.standard_normal((r, n_in)) * 0.1).astype(dtype),
        (rng.standard_normal((out, r)) * 0.1).astype(dtype),
    )
    mask = np.where(rng.random(x.shape) < 0.25, 0.0, 4 / 3) if draw(st.booleans(), label="dropout") else None
    bias = rng.standard_normal(out).astype(dtype) if draw(st.booleans(), label="bias") else None
    g = rng.standard_normal((2, 3, out)).astype(dtype)
    return W, state, x, A, B, mask, bias, g


@given(qlora_case())
@settings(max_examples=40, deadline=None)
def test_forward_and_backward_are_lora_on_the_dequantized_base(case):
    W, state, x, A, B, mask, bias, g = case
    W_hat = nf4.dequantize(state)
    assert W_hat.dtype == state.dtype == W.dtype
    y = qlora.forward(x, state, A, B, 2.0, bias=bias, dropout_mask=mask)
    assert np.array_equal(y, lora.forward(x, W_hat, A, B, 2.0, bias=bias, dropout_mask=mask))  # bit for bit
    grads = qlora.backward(g, x, state, A, B, 2.0, dropout_mask=mask)
    expected = lora.backward(g, x, W_hat, A, B, 2.0, dropout_mask=mask)
    assert all(np.array_equal(a, b) for a, b in zip(grads, expected, strict=True))
    assert len(grads) == 3  # grad_x, grad_A, grad_B: none for the frozen base


def _rel_tol(n_terms: int) -> float:
    """Two float64 evaluations of the same sum of n_terms non-negative terms (in different orders)
    each err by at most γ_n(u64) relative, so they agree to 2γ_n; twice that for the square root and
    the delta's own γ_r."""
    return 4 * bounds.gamma(n_terms, U64)


@given(qlora_case())
@settings(max_examples=30, deadline=None)
def test_merge_report_recomputed_independently(case):
    W, state, _, A, B, _, _, _ = case
    s = 1.5
    new, report = qlora.merge(state, A, B, s, original=W)
    W_hat = nf4.dequantize(state).astype(np.float64)
    delta = s * np.einsum("ij,jk->ik", B.astype(np.float64), A.astype(np.float64))
    target = W_hat + delta
    expected = nf4.quantize(
        target.astype(np.float32),
        state.blocksize,
        quant_type=state.quant_type,
        double_quant=state.double_quant,
    )
    assert new == dataclasses.replace(expected, dtype=state.dtype)  # same bits, original dtype kept
    assert new.dtype == state.dtype and nf4.dequantize(new).dtype == state.dtype
    lost = nf4.dequantize(new).astype(np.float64) - target
    tol = _rel_tol(W.size)
    fro = lambda a: float(np.sqrt(np.sum(a * a)))  # noqa: E731
    assert report.delta_fro == pytest.approx(fro(delta), rel=tol, abs=0)
    assert report.delta_max == pytest.approx(np.abs(delta).max(), rel=tol, abs=0)
    # lost = deq - (Ŵ + ΔW): an error of ~|ΔW|·tol in delta moves it by as much, absolutely.
    slack = fro(delta) * tol
    assert abs(report.requant_error_fro - fro(lost)) <= slack + fro(lost) * tol
    assert abs(report.requant_error_max - np.abs(lost).max()) <= slack + np.abs(lost).max() * tol
    q_err = W.astype(np.float64) - W_hat
    assert report.quant_error_fro == pytest.approx(fro(q_err), rel=tol, abs=0)
    assert report.quant_error_max == np.abs(q_err).max()
    assert report.error_exceeds_delta == (report.requant_error_fro > report.delta_fro)
    assert report.relative_fro == pytest.approx(report.requant_error_fro / report.delta_fro, rel=1e-15)
    assert report.base.startswith("the dequantized 4-bit base")


def test_flag_trips_when_the_delta_is_below_the_quantization_step():
    # NF4 steps near 0.05-scale weights are ~0.05·0.08 = 4e-3 (absmax times a code gap); a delta of
    # 1e-6 cannot survive requantization, and the report must say the merge lost more than it added.
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((64, 128)) * 0.05).astype(BF16)
    state = nf4.quantize(W, 64, double_quant=True)
    A, B = rng.standard_normal((4, 128)) * 1e-3, rng.standard_normal((64, 4)) * 1e-3
    new, report = qlora.merge(state, A, B, 1.0)
    assert report.error_exceeds_delta and report.relative_fro > 10
    assert new.dtype == BF16  # PEFT would have turned this state into float32
    text = str(report)
    assert "WARNING" in text and "dequantized 4-bit base" in text and f"{report.delta_fro:.4g}" in text
    # A delta far above the step survives: requantization errs by a step, a small part of ΔW.
    big_A, big_B = rng.standard_normal((4, 128)), rng.standard_normal((64, 4))
    _, report = qlora.merge(state, big_A, big_B, 1.0)
    assert not report.error_exceeds_delta and report.relative_fro < 0.5 and "WARNING" not in str(report)


def test_zero_adapter_merge_is_the_identity_on_a_float32_state():
    # Without double quantization a float32 state is a fixed point of dequantize-then-quantize: each
    # block's largest element dequantizes to ±absmax exactly (code ±1), so absmax and codes come back.
    # This holds for FP4 too because zero has a single code (nibble 0) in the canonical rules.
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((9, 37)) * 0.05).astype(np.float32)  # 333 elements: ragged last block
    for quant_type in ("nf4", "fp4"):
        state = nf4.quantize(W, 32, quant_type=quant_type)
        new, report = qlora.merge(state, np.zeros((2, 37)), np.zeros((9, 2)), 4.0)
        assert new == state
        assert report.requant_error_fro == report.delta_fro == report.relative_fro == 0.0
        assert not report.error_exceeds_delta and report.quant_error_fro is None


def test_merge_rejects_bad_input():
    state = nf4.quantize(np.ones((4, 32), dtype=np.float32), 32)
    with pytest.raises(ValueError, match=r"B A has shape \(5, 32\)"):
        qlora.merge(state, np.ones((2, 32)), np.ones((5, 2)), 1.0)
    with pytest.raises(ValueError, match="original has shape"):
        qlora.merge(state, np.ones((2, 32)), np.ones((4, 2)), 1.0, original=np.ones((4, 31)))
    with pytest.raises(ValueError, match="2-D"):
        qlora.forward(
            np.ones((1, 32)),
            nf4.quantize(np.ones(64, dtype=np.float32), 32),
            np.ones((1, 32)),
            np.ones((2, 1)),
            1.0,
        )
    with pytest.raises(TypeError, match="QuantState"):
        qlora.forward(np.ones((1, 32)), np.ones((4, 32)), np.ones((1, 32)), np.ones((4, 1)), 1.0)


@pytest.mark.parametrize(
    ("dtype", "value", "scaling"),
    [(np.float16, 60000.0, 10000.0), (BF16, 3e38, 1e38), (np.float32, 1.0, 1e39)],
    ids=["float16", "bfloat16", "float32"],
)
def test_merge_that_overflows_the_state_dtype_names_it_as_lora_merge_does(dtype, value, scaling):
    W = np.full((4, 64), value, dtype)
    A, B = np.ones((1, 64)), np.ones((4, 1))
    with pytest.raises(ValueError) as dense:
        lora.merge(W, A, B, scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from a cast on the way
        with pytest.raises(ValueError) as four_bit:
            qlora.merge(nf4.quantize(W), A, B, scaling)
    expected = f"the merged weight overflows {np.dtype(dtype)} at index (0, 0)"
    assert str(four_bit.value) == str(dense.value) == expected


def test_merge_reports_the_first_index_the_requantized_weight_overflows():
    # 63000 fits float16, but it shares a block with 70000 and takes the code 1.0: it comes back as 70000.
    W = np.zeros((2, 64), np.float16)
    B = np.zeros((2, 1))
    B[1, 0] = 1.0
    A = np.zeros((1, 64))
    A[0, 3], A[0, 9] = 63000.0, 70000.0
    with pytest.raises(ValueError, match=r"overflows float16 at index \(1, 3\)"):
        qlora.merge(nf4.quantize(W), A, B, 1.0)
