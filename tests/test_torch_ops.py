"""reflora.backends.torch.ops against the numpy oracle.

Quantization and dequantization are held to byte identity with reflora.nf4. The linear ops are held to
reflora.lora / reflora.qlora in float64 within the bounds of reflora.bounds for the arithmetic the ops
declare (operand = accumulate = float32, or bfloat16 operands with float32 accumulation and bfloat16
intermediates). Shapes are odd on purpose: rank 1, one row, ragged last blocks, primes.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from reflora import bounds, codebooks, lora, nf4, qlora  # noqa: E402
from reflora.backends.torch import ops  # noqa: E402
from reflora.backends.torch.backend import cpu_compiler  # noqa: E402
from reflora.backends.torch.quant_state import TorchQuantState, numpy_to_torch, torch_to_numpy  # noqa: E402
from reflora.state import BLOCKSIZES, QuantState  # noqa: E402

CI = settings(max_examples=40, deadline=None)
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
F32 = bounds.Arithmetic("float32", "float32", "float32", "float32")
BF16 = bounds.Arithmetic("bfloat16", "float32", "bfloat16", "bfloat16")


def sample(shape, dtype: str, seed: int, *, zero_block: bool = True) -> np.ndarray:
    """Normal data with a zero run, a run of tiny values and one large value, in ``dtype``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    if zero_block:
        flat[: min(64, flat.size // 3)] = 0.0
    flat[flat.size // 2 : flat.size // 2 + 5] *= 1e-3
    flat[-1] *= 40.0
    return x.astype(NP_DTYPES[dtype])


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------------- quantization


@pytest.mark.filterwarnings("ignore::reflora.double_quant.NegativeScaleWarning")  # outlier blocks on purpose
@CI
@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3)
    .map(tuple)
    .filter(lambda s: np.prod(s) <= 20000),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    dtype=st.sampled_from(list(NP_DTYPES)),
    seed=st.integers(0, 2**16),
)
def test_quantize_and_dequantize_are_byte_identical_to_the_oracle(
    shape, blocksize, quant_type, double_quant, dtype, seed
) -> None:
    x = sample(shape, dtype, seed)
    ref = nf4.quantize(x, blocksize, quant_type=quant_type, double_quant=double_quant)
    ts = ops.quantize_4bit(numpy_to_torch(x), blocksize, quant_type=quant_type, double_quant=double_quant)
    assert ts.shape == shape and ts.dtype == numpy_to_torch(x).dtype
    assert ts.to_state() == ref
    assert same_bytes(torch_to_numpy(ops.dequantize_4bit(ts)), nf4.dequantize(ref))
    for out, torch_out in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert same_bytes(torch_to_numpy(ops.dequantize_4bit(ts, torch_out)), nf4.dequantize(ref, out))


def test_dequantize_reads_oracle_states() -> None:
    """States made by the oracle (not by ops) dequantize identically: the two directions are independent."""
    for dq in (False, True):
        ref = nf4.quantize(sample((257, 129), "bfloat16", 3), 128, double_quant=dq)
        ts = TorchQuantState.from_state(ref)
        assert same_bytes(torch_to_numpy(ops.dequantize_4bit(ts)), nf4.dequantize(ref))


def test_exact_midpoints_tie_to_the_lower_code() -> None:
    """x/absmax exactly on a midpoint between two NF4 values takes the lower code (absmax 1 makes the
    quotient exact); one float32 step either side goes to the nearer value."""
    mids = [np.float32(m) for m in codebooks.NF4.thresholds if float(np.float32(m)) == m]
    assert len(mids) == 6
    values = [np.float32(1.0)]
    for m in mids:
        values += [m, np.nextafter(m, np.float32(-2)), np.nextafter(m, np.float32(2))]
    x = np.array(values, dtype=np.float32)
    ts = ops.quantize_4bit(numpy_to_torch(x), 32)
    assert ts.to_state() == nf4.quantize(x, 32)
    codes = nf4.unpack(torch_to_numpy(ts.packed), x.size)
    table = codebooks.NF4.values
    for i, m in enumerate(mids):
        at, below, above = codes[1 + 3 * i : 4 + 3 * i]
        assert table[at] < m < table[at + 1]  # the lower neighbour
        assert below == at and above == at + 1


def test_non_contiguous_input_is_quantized_as_the_matrix_it_shows() -> None:
    x = sample((65, 33), "float32", 5)
    xt = numpy_to_torch(x).t()  # a transposed view: memory order differs from logical order
    assert not xt.is_contiguous()
    assert ops.quantize_4bit(xt, 64, double_quant=True).to_state() == nf4.quantize(
        np.ascontiguousarray(x.T), 64, double_quant=True
    )


def test_all_zero_input_and_single_element() -> None:
    for x in (np.zeros((3, 5), np.float32), np.array([2.5], np.float32), np.array([-0.0], np.float32)):
        for dq in (False, True):
            ts = ops.quantize_4bit(numpy_to_torch(x), 64, double_quant=dq)
            assert ts.to_state() == nf4.quantize(x, 64, double_quant=dq)
            assert same_bytes(torch_to_numpy(ops.dequantize_4bit(ts)), nf4.dequantize(ts.to_state()))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_the_first_bad_index(bad) -> None:
    x = np.zeros((4, 7), np.float32)
    x[2, 3] = bad
    x[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"index \(2, 3\) \(flat index 17\)"):
        ops.quantize_4bit(numpy_to_torch(x))
    with pytest.raises(ValueError, match=r"index \(2, 3\) \(flat index 17\)"):
        nf4.quantize(x)


def test_bad_arguments() -> None:
    x = torch.ones(8)
    with pytest.raises(ValueError, match="blocksize"):
        ops.quantize_4bit(x, 48)
    with pytest.raises(ValueError, match="quant_type"):
        ops.quantize_4bit(x, quant_type="int4")
    with pytest.raises(TypeError, match="float64"):
        ops.quantize_4bit(x.double())
    with pytest.raises(ValueError, match="empty"):
        ops.quantize_4bit(torch.ones(0))
    with pytest.raises(TypeError, match="dtype"):
        ops.dequantize_4bit(ops.quantize_4bit(x), torch.float64)


# ----------------------------------------------------------------------------------- linear layers


def lora_inputs(n, out_f, in_f, r, dtype: str, seed: int, *, nonzero_b: bool = True):
    """x (n, in), W (out, in), A (r, in), B (out, r), bias (out,), g (n, out) in ``dtype`` (numpy)."""
    rng = np.random.default_rng(seed)
    dt = NP_DTYPES[dtype]
    x = rng.standard_normal((n, in_f)).astype(dt)
    W = (rng.standard_normal((out_f, in_f)) * 0.05).astype(dt)
    A = rng.uniform(-1, 1, (r, in_f)).astype(dt) / np.sqrt(in_f).astype(dt)
    B = (rng.standard_normal((out_f, r)) * (0.1 if nonzero_b else 0.0)).astype(dt)
    bias = rng.standard_normal(out_f).astype(dt)
    g = rng.standard_normal((n, out_f)).astype(dt)
    return x, W, A, B, bias, g


def dropout_mask(shape, p: float, dtype: str, seed: int) -> np.ndarray:
    keep = np.random.default_rng(seed + 1).random(shape) >= p
    return (keep / (1 - p)).astype(NP_DTYPES[dtype])


def within(out: np.ndarray, ref: np.ndarray, bound: np.ndarray, what: str) -> None:
    err = np.abs(out.astype(np.float64) - ref)
    worst = np.unravel_index(int(np.argmax(err - bound)), err.shape)
    assert (err <= bound).all(), f"{what}: |Δ| = {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    assert np.isfinite(bound).all()


def t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return numpy_to_torch(a).requires_grad_(grad)


def assert_matches_reference(y, grads, g, x, W, A, B, s, arith, *, bias=None, mask=None) -> None:
    """y and grads = (grad_x, grad_A, grad_B) (torch) within the bounds of the float64 oracle on the same
    operands (numpy, 2-D x and g): reflora.qlora.forward / backward when W is a QuantState (its base
    is then Ŵ, exactly), reflora.lora's when W is an array."""
    if isinstance(W, QuantState):
        y_ref = qlora.forward(x, W, A, B, s, bias=bias, dropout_mask=mask)
        refs = qlora.backward(g, x, W, A, B, s, dropout_mask=mask)
        W = qlora.dequantized_base(W)
    else:
        y_ref = lora.forward(x, W, A, B, s, bias=bias, dropout_mask=mask)
        refs = lora.backward(g, x, W, A, B, s, dropout_mask=mask)
    y_bound = bounds.lora_forward_bound(x, W, A, B, s, arith, bias=bias, dropout_mask=mask)
    within(torch_to_numpy(y.detach()).reshape(y_ref.shape), y_ref, y_bound, "y")
    bnds = bounds.lora_backward_bound(g, x, W, A, B, s, arith, dropout_mask=mask)
    for name, got, ref, bnd in zip("xAB", grads, refs, bnds, strict=True):
        if got is not None:
            within(torch_to_numpy(got).reshape(ref.shape), ref, bnd, f"grad_{name}")


SHAPES = [(1, 7, 5, 1), (3, 33, 65, 4), (17, 64, 130, 8), (5, 1, 97, 2)]  # (rows, out, in, r)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "DQ"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{s[0]}-out{s[1]}-in{s[2]}-r{s[3]}" for s in SHAPES])
def test_qlora_linear_forward_and_backward_within_the_float32_bound(shape, with_mask, dq) -> None:
    n, out_f, in_f, r = shape
    x, W, A, B, bias, g = lora_inputs(n, out_f, in_f, r, "float32", seed=n * out_f + r)
    state = nf4.quantize(W, 64, double_quant=dq)
    mask = dropout_mask(x.shape, 0.25, "float32", n) if with_mask else None
    xt, At, Bt = t(x, True), t(A, True), t(B, True)
    ts = TorchQuantState.from_state(state)
    y = ops.qlora_linear(xt, ts, At, Bt, 1.7, bias=t(bias), dropout_mask=None if mask is None else t(mask))
    y.backward(t(g))
    grads = (xt.grad, At.grad, Bt.grad)
    assert_matches_reference(y, grads, g, x, state, A, B, 1.7, F32, bias=bias, mask=mask)


def test_qlora_linear_bf16_state_and_three_d_input() -> None:
    x, W, A, B, bias, g = lora_inputs(12, 40, 67, 3, "bfloat16", seed=11)
    state = nf4.quantize(W, 64, double_quant=True)  # a bfloat16 state: Ŵ exact in bfloat16
    xt, At, Bt = t(x.reshape(3, 4, 67), True), t(A, True), t(B, True)
    y = ops.qlora_linear(xt, TorchQuantState.from_state(state), At, Bt, 0.5, bias=t(bias))
    assert y.shape == (3, 4, 40) and y.dtype == torch.bfloat16
    y.backward(t(g.reshape(3, 4, 40)))
    grads = (xt.grad, At.grad, Bt.grad)
    assert all(gr.dtype == torch.bfloat16 for gr in grads)
    assert_matches_reference(y, grads, g, x, state, A, B, 0.5, BF16, bias=bias)


@pytest.mark.skipif(cpu_compiler() is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inductor_compiled_qlora_linear_stays_within_the_derived_bound(dtype) -> None:
    """Compiled by inductor, the torch path's elementwise steps (the low-rank term scaled and added to y,
    the scaled grad_y, the mask's products) are inductor's own code, fused into its loops and not rounded
    where eager rounds, so y and the gradients need not be eager's bits (measured on these inputs: grad_x
    in both dtypes and the bfloat16 y differ). They are held to the same derived bound of the float64
    oracle as eager's, with the op's declared arithmetic. The shapes are dynamic: a symbolic row count
    and scaling are traced too."""
    torch._dynamo.reset()
    arith = F32 if dtype == "float32" else BF16
    compiled = torch.compile(ops.qlora_linear, dynamic=True, fullgraph=True)
    for n, s in ((5, 1.7), (23, 0.5)):
        x, W, A, B, bias, g = lora_inputs(n, 40, 130, 4, dtype, seed=n)
        state = nf4.quantize(W, 64, double_quant=True)
        mask = dropout_mask(x.shape, 0.25, dtype, n)
        xt, At, Bt = t(x, True), t(A, True), t(B, True)
        y = compiled(xt, TorchQuantState.from_state(state), At, Bt, s, bias=t(bias), dropout_mask=t(mask))
        y.backward(t(g))
        grads = (xt.grad, At.grad, Bt.grad)
        assert_matches_reference(y, grads, g, x, state, A, B, s, arith, bias=bias, mask=mask)


def test_lora_linear_within_the_float32_bound() -> None:
    x, W, A, B, bias, g = lora_inputs(9, 31, 45, 5, "float32", seed=2)
    mask = dropout_mask(x.shape, 0.5, "float32", 2)
    xt, At, Bt = t(x, True), t(A, True), t(B, True)
    y = ops.lora_linear(xt, t(W), At, Bt, 2.0, bias=t(bias), dropout_mask=t(mask))
    y.backward(t(g))
    grads = (xt.grad, At.grad, Bt.grad)
    assert_matches_reference(y, grads, g, x, W, A, B, 2.0, F32, bias=bias, mask=mask)


def test_qlora_keeps_no_dequantized_weight_and_writes_no_saved_input() -> None:
    """Everything autograd saves for backward is recorded: nothing of W's shape, (out, in), is among it,
    and the inputs' version counters (bumped by any in-place write) do not move through backward."""
    x, W, A, B, _, g = lora_inputs(6, 48, 80, 4, "float32", seed=4)
    ts = TorchQuantState.from_state(nf4.quantize(W, 64, double_quant=True))
    xt, At, Bt, mask = t(x, True), t(A, True), t(B, True), t(dropout_mask(x.shape, 0.1, "float32", 0))
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = ops.qlora_linear(xt, ts, At, Bt, 1.0, dropout_mask=mask)
    assert saved and all(shape != (48, 80) for shape, _ in saved)
    assert sum(np.prod(s) for s, _ in saved) == 2 * x.size + 6 * 4 + A.size + B.size  # x, mask, t, A, B
    versions = [v._version for v in (xt, At, Bt, mask, ts.packed, ts.absmax_q)]
    y.backward(t(g))
    assert [v._version for v in (xt, At, Bt, mask, ts.packed, ts.absmax_q)] == versions
    assert all(v.grad is not None for v in (xt, At, Bt)) and mask.grad is None


def test_gradients_only_where_asked() -> None:
    x, W, A, B, bias, g = lora_inputs(4, 10, 12, 2, "float32", seed=6)
    ts = TorchQuantState.from_state(nf4.quantize(W, 32))
    At, Bt, bt = t(A, True), t(B, False), t(bias, True)
    y = ops.qlora_linear(t(x), ts, At, Bt, 1.0, bias=bt)
    y.backward(t(g))
    assert At.grad is not None and Bt.grad is None
    assert torch.equal(bt.grad, t(g).sum(0))  # the bias gradient is the column sum of grad_y


def test_gradient_accumulation_equals_one_big_batch_within_a_derived_bound() -> None:
    """k micro-batches with .grad accumulation against one batch of k times the rows.

    Each micro-batch gradient ĝ_j is within b_j (lora_backward_bound) of its exact value G_j, and the
    full-batch ĝ within b of G = Σ G_j. Accumulation adds the ĝ_j in float32, k - 1 roundings: its
    result is within γ_{k-1}(u32)·Σ|ĝ_j| of Σ ĝ_j. So |acc - ĝ| <= Σ b_j + γ_{k-1}(u32)·Σ|ĝ_j| + b.
    """
    k, rows = 4, 6
    x, W, A, B, bias, g = lora_inputs(k * rows, 29, 70, 3, "float32", seed=9)
    state = nf4.quantize(W, 64, double_quant=True)
    W_hat = qlora.dequantized_base(state)
    ts = TorchQuantState.from_state(state)

    def grads(rows_slice: slice, A_leaf=None, B_leaf=None):
        A_leaf = t(A, True) if A_leaf is None else A_leaf
        B_leaf = t(B, True) if B_leaf is None else B_leaf
        ops.qlora_linear(t(x[rows_slice]), ts, A_leaf, B_leaf, 1.3, bias=t(bias)).backward(t(g[rows_slice]))
        return A_leaf, B_leaf

    At, Bt = t(A, True), t(B, True)
    size_A = size_B = bound_A = bound_B = 0.0
    for j in range(k):
        sl = slice(j * rows, (j + 1) * rows)
        grads(sl, At, Bt)  # accumulates into At.grad, Bt.grad
        Aj, Bj = grads(sl)  # the same micro-batch alone: ĝ_j (the op is deterministic)
        size_A, size_B = size_A + np.abs(torch_to_numpy(Aj.grad)), size_B + np.abs(torch_to_numpy(Bj.grad))
        _, bA, bB = bounds.lora_backward_bound(g[sl], x[sl], W_hat, A, B, 1.3, F32)
        bound_A, bound_B = bound_A + bA, bound_B + bB
    Af, Bf = grads(slice(None))
    _, bA, bB = bounds.lora_backward_bound(g, x, W_hat, A, B, 1.3, F32)
    gamma = bounds.gamma(k - 1, bounds.unit_roundoff("float32"))
    full_A, full_B = torch_to_numpy(Af.grad).astype(np.float64), torch_to_numpy(Bf.grad).astype(np.float64)
    within(torch_to_numpy(At.grad), full_A, bound_A + gamma * size_A + bA, "accumulated grad_A")
    within(torch_to_numpy(Bt.grad), full_B, bound_B + gamma * size_B + bB, "accumulated grad_B")
    assert np.abs(full_A).max() > 0 and np.abs(full_B).max() > 0


def test_bf16_autocast() -> None:
    """Under CPU autocast to bfloat16 the layer computes in bfloat16 (x, A, B, Ŵ cast), returns bfloat16,
    and the float32 parameters receive float32 gradients: those of the bfloat16 computation, within
    its bound of the float64 reference on the cast operands."""
    x, W, A, B, bias, g = lora_inputs(8, 24, 72, 4, "float32", seed=12)
    state = nf4.quantize(W, 64, double_quant=True)  # float32 state: Ŵ is cast to bfloat16
    ts = TorchQuantState.from_state(state)
    xt, At, Bt = t(x, True), t(A, True), t(B, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.qlora_linear(xt, ts, At, Bt, 2.0, bias=t(bias))
        assert y.dtype == torch.bfloat16
        y.backward(t(g).to(torch.bfloat16))  # backward inside autocast must not recast anything
    assert (xt.grad.dtype, At.grad.dtype, Bt.grad.dtype) == (torch.float32,) * 3
    bf = ml_dtypes.bfloat16
    xb, Wb, Ab, Bb, biasb, gb = (a.astype(bf) for a in (x, qlora.dequantized_base(state), A, B, bias, g))
    assert_matches_reference(y, (xt.grad, At.grad, Bt.grad), gb, xb, Wb, Ab, Bb, 2.0, BF16, bias=biasb)


def test_nf4_linear_is_the_base_alone() -> None:
    x, W, _, _, bias, g = lora_inputs(5, 13, 66, 1, "float32", seed=13)
    state = nf4.quantize(W, 64)
    W_hat = qlora.dequantized_base(state)
    xt = t(x, True)
    y = ops.nf4_linear(xt, TorchQuantState.from_state(state), bias=t(bias))
    y.backward(t(g))
    no_A, no_B = np.zeros((1, 66), np.float32), np.zeros((13, 1), np.float32)  # an adapter adding nothing
    assert_matches_reference(y, (xt.grad, None, None), g, x, state, no_A, no_B, 0.0, F32, bias=bias)
    assert torch.equal(xt.grad, t(g) @ numpy_to_torch(W_hat))  # one matmul: no rounding beyond it


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(quantized) -> None:
    # As nn.Linear does: y (2, 0, out), grad_x of x's shape, and zero gradients for A, B and bias.
    W = np.ones((6, 10), np.float32)
    x = torch.zeros(2, 0, 10, dtype=torch.bfloat16, requires_grad=True)
    A, B, bias = (torch.ones(*s, requires_grad=True) for s in ((2, 10), (6, 2), (6,)))
    if quantized:
        y = ops.qlora_linear(x, TorchQuantState.from_state(nf4.quantize(W)), A, B, 2.0, bias=bias)
    else:
        y = ops.lora_linear(x, torch.from_numpy(W), A, B, 2.0, bias=bias)
    assert y.shape == (2, 0, 6) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in (A, B, bias):
        assert p.grad.shape == p.shape and not p.grad.any()


def test_linear_ops_reject_bad_shapes() -> None:
    ts = TorchQuantState.from_state(nf4.quantize(np.ones((6, 10), np.float32), 32))
    x, A, B = torch.ones(3, 10), torch.ones(2, 10), torch.ones(6, 2)
    with pytest.raises(ValueError, match="in_features = 10"):
        ops.qlora_linear(torch.ones(3, 9), ts, A, B, 1.0)
    with pytest.raises(ValueError, match=r"A must be \(r, 10\)"):
        ops.qlora_linear(x, ts, torch.ones(2, 9), B, 1.0)
    with pytest.raises(ValueError, match=r"B \(6, r\)"):
        ops.qlora_linear(x, ts, A, torch.ones(6, 3), 1.0)
    with pytest.raises(ValueError, match="bias"):
        ops.qlora_linear(x, ts, A, B, 1.0, bias=torch.ones(5))
    with pytest.raises(ValueError, match="dropout_mask"):
        ops.qlora_linear(x, ts, A, B, 1.0, dropout_mask=torch.ones(3, 9))
    with pytest.raises(ValueError, match="scaling"):
        ops.qlora_linear(x, ts, A, B, float("nan"))
    with pytest.raises(TypeError, match=r"must be float64, float32, float16 or bfloat16, got torch\.int64"):
        ops.qlora_linear(x.long(), ts, A, B, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        ops.qlora_linear(x, TorchQuantState.from_state(nf4.quantize(np.ones(60, np.float32))), A, B, 1.0)


def test_scaling_takes_numpy_scalars_and_refuses_what_float32_cannot_hold() -> None:
    # np.float32(0.5) was refused (the oracle and the Triton layer take it); 1e39 passed the finiteness
    # check and turned every output into NaN, even with B = 0.
    ts = TorchQuantState.from_state(nf4.quantize(np.ones((6, 10), np.float32), 32))
    x, A, B = torch.ones(3, 10), torch.ones(2, 10), torch.zeros(6, 2)
    for s in (np.float32(0.5), np.int64(2), torch.tensor(0.5)):
        assert torch.equal(ops.qlora_linear(x, ts, A, B, s), ops.qlora_linear(x, ts, A, B, float(s)))
    for s in (1e39, -1e39):
        with pytest.raises(ValueError, match="scaling must be finite in float32"):
            ops.qlora_linear(x, ts, A, B, s)
        with pytest.raises(ValueError, match="scaling must be finite in float32"):
            ops.lora_linear(x, torch.ones(6, 10), A, B, s)


def test_a_malformed_state_is_refused_naming_the_field() -> None:
    # A float64 code table and absmax of shape (n_blocks, 1) dequantized to garbage without an error;
    # blocksize2 = 0, a missing offset and a float64 dtype raised bare ZeroDivisionError, TypeError, KeyError.
    import dataclasses

    ts = TorchQuantState.from_state(nf4.quantize(np.ones((6, 64), np.float32), 64, double_quant=True))
    plain = TorchQuantState.from_state(nf4.quantize(np.ones((6, 64), np.float32), 64))
    cases = [
        (
            dataclasses.replace(ts, code=ts.code.double()),
            r"state\.code must be a contiguous 1-D torch\.float32",
        ),
        (dataclasses.replace(plain, absmax=plain.absmax[:, None]), r"state\.absmax must be a contiguous 1-D"),
        (dataclasses.replace(ts, blocksize2=0), r"state\.blocksize2 must be a positive int"),
        (dataclasses.replace(ts, offset=float("nan")), r"state\.offset must be a finite float"),
        (dataclasses.replace(ts, dtype=torch.float64), r"state\.dtype must be float32, float16 or bfloat16"),
        (dataclasses.replace(ts, code2=ts.code2[:8]), r"state\.code2 must be a contiguous 1-D"),
    ]
    x = torch.ones(2, 64)
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.dequantize_4bit(state)
        with pytest.raises(ValueError, match=message):
            ops.qlora_linear(x, state, None, None, 0.0)


def test_second_derivatives_through_grad_b_are_kept() -> None:
    """create_graph=True: grad_B = s·gᵀ(x_d Aᵀ) depends on x and A, but the backward used t = x_d Aᵀ
    saved from the forward, without a graph, and d(sum grad_B)/dx came out 26.6 off a max of 54.
    Small dyadic values make every float32 operation exact, so the float64 autograd of the same
    function must agree bit for bit."""
    rng = np.random.default_rng(0)
    ts = TorchQuantState.from_state(nf4.quantize(rng.standard_normal((5, 8)).astype(np.float32), 32))
    W = ops.dequantize_4bit(ts)
    x, A, B, g = (torch.from_numpy(rng.integers(-4, 5, shape).astype(np.float32) / 4)
                  for shape in ((3, 8), (2, 8), (5, 2), (3, 5)))  # fmt: skip
    s = 0.5

    def second(op, dtype):
        xx, aa, bb = (t.to(dtype).requires_grad_() for t in (x, A, B))
        y = op(xx, aa, bb)
        _, _, grad_b = torch.autograd.grad(y, (xx, aa, bb), g.to(dtype), create_graph=True)
        return torch.autograd.grad(grad_b.sum(), (xx, aa))

    ours = second(lambda xx, aa, bb: ops.qlora_linear(xx, ts, aa, bb, s), torch.float32)
    ref = second(lambda xx, aa, bb: xx @ W.double().T + s * (xx @ aa.T) @ bb.T, torch.float64)
    assert all(torch.equal(o.double(), r) for o, r in zip(ours, ref, strict=True))
    assert any(r.abs().max() > 0 for r in ref)


def test_a_state_written_in_place_between_forward_and_backward_is_refused() -> None:
    # The backward dequantizes Ŵ again: a state changed after the forward gave grad_x of the new weight
    # (4370 against the forward's), silently. Autograd refuses the same for any tensor it saved.
    ts = TorchQuantState.from_state(
        nf4.quantize(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
    )
    x, A, B = (torch.randn(*s, requires_grad=True) for s in ((3, 64), (2, 64), (8, 2)))
    for change in (lambda: ts.packed.zero_(), lambda: ts.absmax.mul_(2)):
        y = ops.qlora_linear(x, ts, A, B, 0.5)
        change()
        with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
            y.sum().backward()
    ops.qlora_linear(x, ts, A, B, 0.5).sum().backward()  # a forward after the change is fine


def test_meta_tensors_give_shapes() -> None:
    # Shape inference on the meta device raised "unknown device type for autocast".
    ts = TorchQuantState.from_state(nf4.quantize(np.ones((8, 64), np.float32)), "meta")
    x = torch.empty(2, 3, 64, device="meta")
    A, B = torch.empty(4, 64, device="meta"), torch.empty(8, 4, device="meta")
    for y in (ops.qlora_linear(x, ts, A, B, 0.5), ops.nf4_linear(x, ts),
              ops.lora_linear(x, torch.empty(8, 64, device="meta"), A, B, 0.5)):  # fmt: skip
        assert y.device.type == "meta" and y.shape == (2, 3, 8) and y.dtype == torch.float32


def test_a_dropout_mask_without_an_adapter_is_refused() -> None:
    # It was ignored (the Triton layer refused it): the mask applies to the adapter's input only.
    ts = TorchQuantState.from_state(nf4.quantize(np.ones((8, 64), np.float32)))
    x = torch.ones(3, 64)
    with pytest.raises(ValueError, match="dropout_mask needs an adapter"):
        ops.qlora_linear(x, ts, None, None, 0.5, dropout_mask=torch.zeros(3, 64))


def test_float64_layers_pass_gradcheck_and_stay_within_the_float64_bound() -> None:
    # float64 activations and adapters were refused (TypeError), so torch.autograd.gradcheck could not
    # run on the ops and a float64 model (which PEFT runs) failed on its first forward.
    from reflora import bounds, lora

    rng = np.random.default_rng(3)
    ts = TorchQuantState.from_state(nf4.quantize(rng.standard_normal((6, 40)).astype(np.float32), 32))
    x, A, B = (
        torch.from_numpy(rng.standard_normal(s)).requires_grad_() for s in ((2, 3, 40), (4, 40), (6, 4))
    )
    mask = torch.from_numpy((rng.random((2, 3, 40)) < 0.8) / 0.8)
    assert torch.autograd.gradcheck(lambda x, A, B: ops.qlora_linear(x, ts, A, B, 0.75, dropout_mask=mask),
                                    (x, A, B))  # fmt: skip
    W = ops.dequantize_4bit(ts).double()
    assert torch.autograd.gradcheck(lambda x, A, B: ops.lora_linear(x, W, A, B, 0.75), (x, A, B))
    y = ops.qlora_linear(x, ts, A, B, 0.75)
    assert y.dtype == torch.float64
    args = [t.detach().numpy() for t in (x, W, A, B)]
    ref = lora.forward(*args, 0.75)
    f64 = bounds.Arithmetic("float64", "float64", "float64", "float64")
    assert np.all(np.abs(y.detach().numpy() - ref) <= bounds.lora_forward_bound(*args, 0.75, f64))
    with pytest.raises(TypeError, match=r"not torch\.float64"):  # the 4-bit ops stay in the oracle's dtypes
        ops.quantize_4bit(W)
