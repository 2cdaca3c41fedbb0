"""reflora.lora against finite differences, torch autograd and PEFT's own LoRA layer.

Every tolerance comes from reflora.bounds: the float64 comparisons use the REFERENCE arithmetic (both
sides are float64 computations in some order), the float32 ones the all-float32 arithmetic PEFT uses.
"""

import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflora import bounds, lora, nf4, qlora
from reflora.bounds import REFERENCE, Arithmetic

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

BF16 = np.dtype(ml_dtypes.bfloat16)
F32_ARITH = Arithmetic("float32", "float32", "float32", "float32")
U64 = 2.0**-53


def _within(out, ref, bound) -> bool:
    return bool(np.all(np.abs(np.asarray(out, dtype=np.float64) - ref) <= bound))


@st.composite
def small_case(draw):
    """Odd and degenerate shapes on purpose: one row, rank 1, in = 1."""
    lead = draw(st.sampled_from([(1,), (3,), (2, 3)]), label="leading dims")
    n_in, out, r = (
        draw(st.sampled_from(v), label=n) for n, v in (("in", [1, 3, 7]), ("out", [1, 5]), ("r", [1, 2, 3]))
    )
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)

    def values(shape):
        # float32 values of magnitude in [2^-6, 2^5] (or 0), so that v ± 2^-8 is exact in float64
        v = rng.choice([-1, 1], shape) * np.ldexp(rng.uniform(1, 2, shape), rng.integers(-6, 5, shape))
        return np.where(rng.random(shape) < 0.1, 0.0, v.astype(np.float32).astype(np.float64))

    x, W, A, B = values((*lead, n_in)), values((out, n_in)), values((r, n_in)), values((out, r))
    bias = values((out,)) if draw(st.booleans(), label="bias") else None
    mask = None
    if draw(st.booleans(), label="dropout"):
        p = draw(st.sampled_from([0.1, 0.5]), label="p")
        mask = np.where(rng.random(x.shape) < p, 0.0, 1 / (1 - p))
    alpha = draw(st.sampled_from([1.0, 8.0, 16.0]), label="alpha")
    s = lora.scaling(alpha, r, rslora=draw(st.booleans(), label="rslora"))
    G = values((*lead, out))
    return x, W, A, B, s, bias, mask, G


def _loss(x, W, A, B, s, bias, mask, G, fb):
    """L = Σ G ⊙ y and a bound on its computed error: y errs by at most fb (a forward bound), and the
    products and the sum of m terms add γ_m(u64)·Σ|G ŷ|."""
    y = lora.forward(x, W, A, B, s, bias=bias, dropout_mask=mask)
    L = float(np.sum(G * y))
    return L, float(np.sum(np.abs(G) * fb) + bounds.gamma(G.size, U64) * np.sum(np.abs(G * y))) * (1 + 1e-6)


@given(small_case())
@settings(max_examples=30, deadline=None)
def test_backward_matches_central_differences(case):
    # y is linear in x, in A and in B separately, so a central difference with an exactly representable
    # step h equals the gradient exactly; what remains is rounding, which the bounds account for.
    x, W, A, B, s, bias, mask, G = case
    gx, gA, gB = lora.backward(G, x, W, A, B, s, dropout_mask=mask)
    none, gA2, gB2 = lora.backward(G, x, W, A, B, s, dropout_mask=mask, grad_x=False)
    assert none is None and np.array_equal(gA2, gA) and np.array_equal(gB2, gB)  # the same operations
    bx, bA, bB = bounds.lora_backward_bound(G, x, W, A, B, s, REFERENCE, dropout_mask=mask)
    h = 2.0**-8
    for name, p, grad, gbound in (("x", x, gx, bx), ("A", A, gA, bA), ("B", B, gB, bB)):
        # The forward bound grows with |inputs| only, so one bound with |p| + h covers every p ± h e_i.
        big = {"x": x, "A": A, "B": B} | {name: np.abs(p) + h}
        fb = bounds.lora_forward_bound(
            big["x"], W, big["A"], big["B"], s, REFERENCE, bias=bias, dropout_mask=mask
        )
        for i in np.ndindex(p.shape):
            plus, minus = p.copy(), p.copy()
            plus[i] += h
            minus[i] -= h
            assert plus[i] - minus[i] == 2 * h  # the step is exact
            args = {"x": x, "A": A, "B": B} | {name: plus}
            Lp, ep = _loss(args["x"], W, args["A"], args["B"], s, bias, mask, G, fb)
            args[name] = minus
            Lm, em = _loss(args["x"], W, args["A"], args["B"], s, bias, mask, G, fb)
            fd = (Lp - Lm) / (2 * h)
            tol = gbound[i] + (ep + em + U64 * abs(Lp - Lm)) / (2 * h)
            assert abs(fd - grad[i]) <= tol, f"∂L/∂{name}{i}: finite difference {fd}, backward {grad[i]}"


def _torch_reference(x, W, A, B, s, bias, mask, G):
    t = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=k in "xAB")
        for k, v in (("x", x), ("W", W), ("A", A), ("B", B))
    }
    x_d = t["x"] if mask is None else t["x"] * torch.tensor(mask)
    y = t["x"] @ t["W"].T + s * ((x_d @ t["A"].T) @ t["B"].T)
    if bias is not None:
        y = y + torch.tensor(bias)
    (y * torch.tensor(G)).sum().backward()
    return y.detach().numpy(), t["x"].grad.numpy(), t["A"].grad.numpy(), t["B"].grad.numpy()


@given(small_case())
@settings(max_examples=40, deadline=None)
def test_forward_and_backward_match_torch_autograd(case):
    x, W, A, B, s, bias, mask, G = case
    y_t, gx_t, gA_t, gB_t = _torch_reference(x, W, A, B, s, bias, mask, G)
    assert _within(
        y_t,
        lora.forward(x, W, A, B, s, bias=bias, dropout_mask=mask),
        bounds.lora_forward_bound(x, W, A, B, s, REFERENCE, bias=bias, dropout_mask=mask),
    )
    ours = lora.backward(G, x, W, A, B, s, dropout_mask=mask)
    bds = bounds.lora_backward_bound(G, x, W, A, B, s, REFERENCE, dropout_mask=mask)
    for theirs, mine, bd in zip((gx_t, gA_t, gB_t), ours, bds, strict=True):
        assert _within(theirs, mine, bd)


# ---- PEFT's own layer ------------------------------------------------------------------------------


def _peft_layer(n_in, out, r, alpha, *, rslora=False, fan_in_fan_out=False, dropout=0.0, dtype=torch.float64):
    """A one-layer model wrapped by PEFT's real LoraConfig / get_peft_model, with B made non-zero."""
    torch.manual_seed(0)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(out, n_in)  # GPT-2's layer: weight stored (in, out)
        torch.nn.init.normal_(base.bias)
    else:
        base = torch.nn.Linear(n_in, out)
    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=["0"],
        use_rslora=rslora,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=dropout,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(torch.nn.Sequential(base), cfg).to(dtype)
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    return model, layer


def _weights(layer):
    get = lambda t: t.detach().numpy().astype(np.float64)  # noqa: E731
    return (
        get(layer.base_layer.weight),
        get(layer.base_layer.bias),
        get(layer.lora_A["default"].weight),
        get(layer.lora_B["default"].weight),
    )


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_peft(rslora, dtype):
    n_in, out, r, alpha = 13, 7, 3, 8
    model, layer = _peft_layer(n_in, out, r, alpha, rslora=rslora, dtype=dtype)
    s = lora.scaling(alpha, r, rslora)
    assert layer.scaling["default"] == s  # alpha/r or alpha/sqrt(r), exactly
    W, b, A, B = _weights(layer)
    x = torch.randn(2, 5, n_in, dtype=dtype)
    y_peft = model(x).detach().numpy()
    arith = REFERENCE if dtype == torch.float64 else F32_ARITH
    x64 = x.numpy().astype(np.float64)
    assert _within(
        y_peft,
        lora.forward(x64, W, A, B, s, bias=b),
        bounds.lora_forward_bound(x64, W, A, B, s, arith, bias=b),
    )


def test_dropout_applies_to_the_lora_branch_only_as_in_peft():
    # PEFT's real nn.Dropout in training mode: replaying the seed gives its mask (dropout is the first
    # random draw of the forward), and our forward with that mask on the LoRA branch alone matches.
    n_in, out, r = 6, 4, 2
    model, layer = _peft_layer(n_in, out, r, 16, dropout=0.5)
    model.train()
    x = torch.randn(3, n_in, dtype=torch.float64)
    torch.manual_seed(7)
    y_peft = model(x).detach().numpy()
    torch.manual_seed(7)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True).numpy()
    assert set(np.unique(mask)) <= {0.0, 2.0} and (mask == 0).any()
    W, b, A, B = _weights(layer)
    x64, s = x.numpy(), lora.scaling(16, r)
    ours = lora.forward(x64, W, A, B, s, bias=b, dropout_mask=mask)
    assert _within(
        y_peft, ours, bounds.lora_forward_bound(x64, W, A, B, s, REFERENCE, bias=b, dropout_mask=mask)
    )
    dropped_base = lora.forward(x64 * mask, W, A, B, s, bias=b, dropout_mask=np.ones_like(mask))
    assert not _within(y_peft, dropped_base, 1e-3)  # dropping the base input too would be visibly wrong


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_and_unmerge_match_peft(fan_in_fan_out, rslora, dtype):
    n_in, out, r, alpha = 11, 6, 4, 8
    model, layer = _peft_layer(n_in, out, r, alpha, rslora=rslora, fan_in_fan_out=fan_in_fan_out, dtype=dtype)
    s = lora.scaling(alpha, r, rslora)
    W, b, A, B = _weights(layer)
    assert W.shape == ((n_in, out) if fan_in_fan_out else (out, n_in))
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    arith = REFERENCE if dtype == torch.float64 else F32_ARITH
    x = torch.randn(4, n_in, dtype=dtype)
    layer.merge()
    merged_peft = layer.base_layer.weight.detach().numpy().copy()
    merged = lora.merge(W.astype(np_dtype), A, B, s, fan_in_fan_out=fan_in_fan_out)
    assert merged.dtype == np_dtype
    bound = bounds.merge_bound(W.astype(np_dtype), A, B, s, arith, fan_in_fan_out=fan_in_fan_out)
    assert _within(merged_peft, merged.astype(np.float64), bound)
    # Merged, the forward needs no adapter: PEFT's merged model against our forward on our merged
    # weight, allowing for the two merged weights' difference (merge_bound) times |x|.
    W_out_in = merged.T if fan_in_fan_out else merged
    bound_out_in = bound.T if fan_in_fan_out else bound
    x64, zero_A, zero_B = x.numpy().astype(np.float64), np.zeros_like(A), np.zeros_like(B)
    y_merged = model(x).detach().numpy()
    fwd_bound = bounds.lora_forward_bound(x64, W_out_in, zero_A, zero_B, s, arith, bias=b)
    assert _within(
        y_merged,
        lora.forward(x64, W_out_in, zero_A, zero_B, s, bias=b),
        fwd_bound + np.abs(x64) @ bound_out_in.T,
    )
    # Unmerge from PEFT's merged weight: W' - ΔW, the same model with ΔW's sign flipped.
    layer.unmerge()
    unmerged_peft = layer.base_layer.weight.detach().numpy()
    unmerged = lora.unmerge(merged_peft, A, B, s, fan_in_fan_out=fan_in_fan_out)
    assert _within(
        unmerged_peft,
        unmerged.astype(np.float64),
        bounds.merge_bound(merged_peft, A, B, s, arith, fan_in_fan_out=fan_in_fan_out),
    )


# ---- Merge rules -----------------------------------------------------------------------------------


def test_merge_rounds_once_to_w_dtype():
    # 1 + 2^-8 + 2^-40 is just above a bfloat16 tie: one rounding gives 1 + 2^-7; rounding through
    # float32 first (what ml_dtypes' float64 -> bfloat16 cast does) would give 1.
    W = np.array([[1.0]], dtype=BF16)
    A, B = np.array([[1.0]]), np.array([[2.0**-8 + 2.0**-40]])
    merged = lora.merge(W, A, B, 1.0)
    assert merged.dtype == BF16 and float(merged[0, 0]) == 1 + 2.0**-7


def test_merge_then_unmerge_in_bfloat16_is_not_the_identity():
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((64, 48)) * 0.02).astype(BF16)
    A, B = (
        (rng.standard_normal((4, 48)) * 0.01).astype(BF16),
        (rng.standard_normal((64, 4)) * 0.01).astype(BF16),
    )
    back = lora.unmerge(lora.merge(W, A, B, 2.0), A, B, 2.0)
    changed = back != W
    assert changed.any()  # a real loss...
    bound = bounds.merge_roundtrip_bound(W, A, B, 2.0)
    assert np.all(np.abs(back.astype(np.float64) - W.astype(np.float64)) <= bound)  # ...within the bound
    # In float64 the same round trip is exact up to a bound about u64/u_bf16 = 2^-45 times the size.
    W64 = W.astype(np.float64)
    back64 = lora.unmerge(lora.merge(W64, A, B, 2.0), A, B, 2.0)
    bound64 = bounds.merge_roundtrip_bound(W64, A, B, 2.0)
    assert np.all(np.abs(back64 - W64) <= bound64) and bound64.max() < 2.0**-40 * bound.max()


def test_merge_refuses_overflow():
    W = np.array([[60000.0]], dtype=np.float16)
    with pytest.raises(ValueError, match=r"overflows float16 at index \(0, 0\)"):
        lora.merge(W, np.array([[100.0]]), np.array([[100.0]]), 1.0)


def test_a_delta_overflowing_float64_is_refused_without_a_warning():
    # B A is formed before the scaling: 1e200 · 1e200 overflows float64 even where s · B A would fit. It
    # gave inf with a RuntimeWarning, which qlora.merge's docstring says never comes; now a ValueError.
    A, B = np.full((2, 3), 1e200), np.zeros((4, 2))
    B[1, 1] = 1e200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"the merged weight overflows float64 at index \(0, 0\)"):
            lora.merge(np.full((2, 4), 1.7e308), np.ones((2, 4)), np.full((2, 2), 5e307), 1.0)  # W + ΔW
        for call in (lora.delta, lambda *a: lora.merge(np.zeros((4, 3)), *a)):
            with pytest.raises(ValueError, match=r"scaling · B A overflows float64 at index \(1, 0\)"):
                call(A, B, 1e-300)
        with pytest.raises(ValueError, match=r"overflows float64 at index \(1, 0\)"):
            qlora.merge(nf4.quantize(np.zeros((4, 32), np.float32), 32), np.full((2, 32), 1e200), B, 1e-300)


def test_merge_refuses_rank_zero():
    # check_shapes refuses r = 0 for forward and backward; merge took A (0, in), B (out, 0) as ΔW = 0.
    with pytest.raises(ValueError, match=r"r >= 1; got A \(0, 3\), B \(4, 0\)"):
        lora.merge(np.zeros((4, 3)), np.zeros((0, 3)), np.zeros((4, 0)), 1.0)


def test_flags_must_be_bools():
    # The string 'no' is truthy: rslora='no' used alpha/sqrt(r), fan_in_fan_out='no' transposed ΔW.
    x, W, A, B = np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2))
    calls = {
        "rslora": lambda v: lora.scaling(8, 4, v),
        "grad_x": lambda v: lora.backward(np.ones((2, 4)), x, W, A, B, 1.0, grad_x=v),
        "fan_in_fan_out": lambda v: lora.merge(
            np.ones((3, 3)), np.ones((2, 3)), np.ones((3, 2)), 1.0, fan_in_fan_out=v
        ),
    }
    for name, call in calls.items():
        for bad in ("no", 0, None):
            with pytest.raises(TypeError, match=f"{name} must be True or False, got {bad!r}"):
                call(bad)
        call(np.bool_(True))  # numpy's bool is a bool


# ---- Initialisers ----------------------------------------------------------------------------------


def test_kaiming_init_distribution():
    # U(-b, b) with b = 1/sqrt(in): std b/sqrt(3). The sample std of n draws has relative standard
    # deviation sqrt((μ4/σ^4 - 1)/(4n)) = sqrt(0.2/n) for a uniform (μ4/σ^4 = 9/5); 6 of those is a
    # false-failure chance below 1e-8 whatever the seed.
    n_in, r = 4096, 64
    A, B = lora.init_lora(n_in, 96, r, rng=np.random.default_rng(0))
    bound, n = 1 / math.sqrt(n_in), A.size
    assert A.dtype == np.float32 and A.shape == (r, n_in) and B.shape == (96, r)
    assert np.all(B == 0) and not np.signbit(B).any()
    assert np.abs(A).max() <= bound
    assert np.abs(A).max() >= bound * (1 - 20 / n)  # P(max < b(1 - 20/n)) = (1 - 20/n)^n < e^-20
    assert abs(A.std() / (bound / math.sqrt(3)) - 1) < 6 * math.sqrt(0.2 / n)
    assert abs(A.mean()) < 6 * bound / math.sqrt(3 * n)


def test_gaussian_init_distribution():
    # N(0, 1/r²): the sample std of n normal draws has relative sd sqrt(1/(2n)); 6 of those.
    n_in, r = 2048, 16
    A, B = lora.init_lora(n_in, 8, r, rng=np.random.default_rng(1), method="gaussian", dtype=np.float64)
    assert abs(A.std() * r - 1) < 6 * math.sqrt(1 / (2 * A.size))
    assert A.dtype == np.float64 and np.all(B == 0)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
def test_kaiming_bound_survives_rounding(dtype):
    # in = 3: 1/sqrt(3) rounds *up* in bfloat16 (0.578125 > 0.57735), so a draw near the bound would
    # round past it without the clamp.
    A, _ = lora.init_lora(3, 2, 2000, rng=np.random.default_rng(2), dtype=dtype)
    assert A.dtype == np.dtype(dtype)
    assert np.abs(A.astype(np.float64)).max() <= 1 / math.sqrt(3)


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov D = max |F_a - F_b| over the pooled sample."""
    grid = np.concatenate([a, b])
    fa = np.searchsorted(np.sort(a), grid, side="right") / a.size
    fb = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


def test_init_matches_peft_distribution():
    # Two-sample Kolmogorov-Smirnov between PEFT's A and ours (262144 draws each). For identical
    # distributions P(D > c·sqrt(2/n)) <= 2·exp(-2c²) (the DKW-Massart form); c = 2.8 makes a false
    # failure rarer than 3e-7, while a wrong bound (1/sqrt(2·in)) gives D ≈ 0.15 against 0.0077.
    n_in, r = 4096, 64
    _, layer = _peft_layer(n_in, 8, r, 8, dtype=torch.float32)
    critical = 2.8 * math.sqrt(2 / (n_in * r))
    for init, method in ((True, "kaiming"), ("gaussian", "gaussian")):
        torch.manual_seed(3)
        layer.reset_lora_parameters("default", init)
        theirs = layer.lora_A["default"].weight.detach().numpy().ravel()
        ours = lora.init_lora(n_in, 8, r, rng=np.random.default_rng(3), method=method)[0].ravel()
        assert _ks_statistic(theirs, ours) < critical, init
        assert np.all(layer.lora_B["default"].weight.detach().numpy() == 0)


def test_init_is_deterministic_under_a_seeded_generator():
    a1, _ = lora.init_lora(33, 7, 5, rng=np.random.default_rng(42))
    a2, _ = lora.init_lora(33, 7, 5, rng=np.random.default_rng(42))
    a3, _ = lora.init_lora(33, 7, 5, rng=np.random.default_rng(43))
    assert a1.tobytes() == a2.tobytes() and a1.tobytes() != a3.tobytes()


def test_init_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="method"):
        lora.init_lora(4, 4, 2, rng=rng, method="pissa")
    with pytest.raises(ValueError, match="r must be a positive int"):
        lora.init_lora(4, 4, 0, rng=rng)
    with pytest.raises(TypeError, match="Generator"):
        lora.init_lora(4, 4, 2, rng=np.random.RandomState(0))


# ---- Scaling and input checks ----------------------------------------------------------------------


def test_scaling():
    assert lora.scaling(8, 4) == 2.0 and lora.scaling(8, 4, rslora=True) == 4.0  # SPEC §7
    assert lora.scaling(16, 3) == 16 / 3 and lora.scaling(16, 3, True) == 16 / math.sqrt(3)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="r must be a positive int"):
            lora.scaling(8, bad)
    with pytest.raises(ValueError, match="alpha must be finite"):
        lora.scaling(float("inf"), 4)
    for bad in ("16", True, None):  # float("16") is 16.0 and True is 1: neither is an alpha someone meant
        with pytest.raises(TypeError, match="alpha must be a real number"):
            lora.scaling(bad, 8)
    assert lora.scaling(np.float32(16), 8) == lora.scaling(np.array(16.0), 8) == 2.0


def test_bad_inputs_raise_clear_errors():
    x, W, A, B = np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"x has shape \(2, 5\).*in_features = 3"):
        lora.forward(np.ones((2, 5)), W, A, B, 1.0)
    with pytest.raises(ValueError, match=r"A \(2, 4\)"):
        lora.forward(x, W, np.ones((2, 4)), B, 1.0)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
        lora.forward(x, W, A, B, 1.0, bias=np.ones(3))
    with pytest.raises(ValueError, match=r"dropout_mask has shape \(3,\)"):
        lora.forward(x, W, A, B, 1.0, dropout_mask=np.ones(3))
    with pytest.raises(ValueError, match=r"grad_y has shape \(2, 3\)"):
        lora.backward(np.ones((2, 3)), x, W, A, B, 1.0)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"x is not finite at index \(1, 2\)"):
        lora.forward(bad, W, A, B, 1.0)
    with pytest.raises(ValueError, match="scaling must be finite"):
        lora.forward(x, W, A, B, float("nan"))
    with pytest.raises(TypeError, match="int64"):
        lora.forward(x.astype(np.int64), W, A, B, 1.0)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
def test_low_precision_inputs_are_widened_exactly(dtype):
    rng = np.random.default_rng(6)
    x, W, A, B = (rng.standard_normal(s).astype(dtype) for s in ((3, 5), (4, 5), (2, 5), (4, 2)))
    y = lora.forward(x, W, A, B, 0.5)
    assert y.dtype == np.float64
    wide = lora.forward(*(a.astype(np.float64) for a in (x, W, A, B)), 0.5)
    assert np.array_equal(y, wide)


def test_the_reference_refuses_a_float64_overflow_and_reads_scaling_as_alpha():
    """forward and backward returned ±inf from finite input where float64 overflowed (delta and merge
    refused it); forward refused a 0-d scaling that lora.scaling takes, and big-endian float32; a huge
    int gave a bare OverflowError (an audit of the public API)."""
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((2, 3)) * 1e200, rng.standard_normal((4, 3)) * 1e200
    A, B = rng.standard_normal((1, 3)), rng.standard_normal((4, 1))
    with pytest.raises(ValueError, match=r"y overflows float64 at index \(0, 0\)"), warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.forward(x, W, A, B, 1.0)
    with pytest.raises(ValueError, match="grad_A overflows float64"):
        lora.backward(np.ones((2, 4)) * 1e200, x, W, A, B, 1.0)
    with pytest.raises(ValueError, match="grad_x overflows float64"):  # g W alone overflows
        lora.backward(np.ones((2, 4)) * 1e200, x * 1e-200, W, A * 0, B, 1.0)
    x, W = x * 1e-200, W * 1e-200
    assert np.array_equal(lora.forward(x, W, A, B, np.array(0.5)), lora.forward(x, W, A, B, 0.5))
    assert np.array_equal(
        lora.forward(x.astype(">f4"), W, A, B, 0.5), lora.forward(x.astype(np.float32), W, A, B, 0.5)
    )
    for call in (lambda: lora.scaling(10**400, 8), lambda: lora.forward(x, W, A, B, 10**400)):
        with pytest.raises(ValueError, match="is beyond a float's range"):
            call()
    with pytest.raises(TypeError, match="scaling must be a real number"):
        lora.forward(x, W, A, B, "0.5")
