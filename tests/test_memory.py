"""reflora.memory: the QLoRA paper's storage arithmetic, checked against the oracle's real storage, and
the training-memory estimate, checked term by term on shapes whose counts are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reflora import cli, memory, nf4


def test_the_papers_bits_per_parameter():
    assert memory.bits_per_parameter(64) == 4.5
    assert memory.bits_per_parameter(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(memory.bits_per_parameter(64, double_quant=True), 3) == 4.127


def test_double_quantization_saves_about_3_gb_at_65b():
    saving = memory.double_quant_saving(65e9)
    assert saving == pytest.approx(65e9 * 0.373046875 / 8, rel=1e-15)
    assert round(saving / 1e9, 2) == 3.03


@pytest.mark.parametrize(("blocksize", "double_quant"), [(64, False), (64, True), (128, True), (32, False)])
def test_quantized_bytes_is_what_the_oracle_stores(blocksize, double_quant):
    # A size with whole blocks and whole groups of 256 blocks: then the formula has no rounding up.
    n = blocksize * 256 * 3
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    state = nf4.quantize(x, blocksize, double_quant=double_quant)
    if double_quant:
        stored = state.packed.nbytes + state.nested.absmax_q.nbytes + state.nested.absmax2.nbytes
    else:
        stored = state.packed.nbytes + state.absmax.nbytes
    assert memory.quantized_bytes(n, blocksize, double_quant=double_quant) == stored


def test_llama_shapes_give_the_published_parameter_counts():
    assert memory._llama_params(memory.LLAMA_SHAPES["7B"]) == 6_738_415_616
    assert [memory.nearest_llama(p) for p in (7e9, 13e9, 30e9, 65e9)] == ["7B", "13B", "33B", "65B"]


def test_adapters_on_every_linear_layer_of_llama_7b():
    L, h, f, a, v = memory.LLAMA_SHAPES["7B"]
    est = memory.training_memory(6.74e9, 16, layers=L, hidden=h, intermediate=f, heads=a, vocab=v)
    # PEFT's count for r=16 on q, k, v, o, gate, up, down of LLaMA-7B: 39,976,960 trainable parameters.
    assert est["adapters"] == 39_976_960 * 4
    assert est["adapter gradients"] == est["adapters"]
    assert est["optimizer states"] == 39_976_960 * 8
    q = L * (4 * h * h + 3 * h * f)
    assert est["base (4-bit)"] == q * memory.bits_per_parameter(64, double_quant=True) / 8
    assert est["frozen (other)"] == (6.74e9 - q) * 2
    assert est["logits"] == 512 * v * 4
    assert est.total == sum(b for _, b, _ in est.terms)


def test_activations_term_by_term():
    b, s, h, f, a, L, r = 3, 7, 16, 40, 2, 5, 4
    common = dict(layers=L, hidden=h, intermediate=f, heads=a, batch=b, seq=s, mlp_matrices=2,
                  activation_bytes=4, flash_attention=False)  # fmt: skip
    lora_t = L * 6 * b * s * r * 4  # x_d·Aᵀ of 6 adapted layers a block
    block = 4 * (8 * s * b * h + 2 * s * b * f + 2 * a * s * s * b)
    full = memory.training_memory(1e6, r, checkpointing=False, **common)
    assert full["activations"] == L * block + lora_t
    ckpt = memory.training_memory(1e6, r, checkpointing=True, **common)
    assert ckpt["activations"] == L * s * b * h * 4 + block + lora_t
    masks = memory.training_memory(1e6, r, checkpointing=False, dropout=True, **common)
    assert masks["activations"] - full["activations"] == L * (2 * s * b * h + a * s * s * b)
    flash = memory.training_memory(1e6, r, checkpointing=False, **{**common, "flash_attention": True})
    assert full["activations"] - flash["activations"] == L * 4 * 2 * a * s * s * b


def test_estimate_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="r must be positive, got 0"):
        memory.training_memory(1e9, 0, layers=2, hidden=64)
    with pytest.raises(ValueError, match="params must be positive, got nan"):
        memory.training_memory(float("nan"), 8, layers=2, hidden=64)
    with pytest.raises(ValueError, match="heads must be positive, got -1"):
        memory.training_memory(1e9, 8, layers=2, hidden=64, heads=-1)
    with pytest.raises(ValueError, match="quantized_params"):
        memory.training_memory(1e3, 8, layers=2, hidden=64)  # the blocks alone hold more than 1e3
    with pytest.raises(KeyError, match="no term 'weights'"):
        memory.training_memory(1e9, 8, layers=2, hidden=64)["weights"]


def test_cli_json(capsys):
    assert cli.main(["memory", "--params", "7e9", "--r", "16", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bits_per_param"] == {"nf4": 4.5, "nf4+dq": 4.126953125}
    assert math.isclose(rep["double_quant_saving_65B_bytes"], memory.double_quant_saving(65e9))
    assert rep["shape"]["layers"] == 32 and "LLaMA-7B" in rep["shape"]["source"]
    terms = rep["training"]["terms"]
    assert math.isclose(rep["training"]["total_bytes"], sum(t["bytes"] for t in terms.values()))


def test_cli_text_with_a_given_shape(capsys):
    argv = ["memory", "--params", "22.7e6", "--r", "8", "--layers", "6", "--hidden", "384", "--batch", "16",
            "--seq", "64"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "bits/param: NF4 4.5, NF4 + double quantization 4.127" in out
    assert "3.03 GB at 65B" in out
    assert "6 layers, hidden 384 (given; intermediate 4h, heads h/64 by default)" in out and "total" in out


def test_cli_json_reports_the_shape_it_used(capsys):
    # a given shape without --intermediate and --heads reported them as null, though 4h and h/64 were used
    argv = ["memory", "--params", "22.7e6", "--layers", "6", "--hidden", "384", "--heads", "12", "--json"]
    assert cli.main(argv) == 0
    shape = json.loads(capsys.readouterr().out)["shape"]
    assert (shape["intermediate"], shape["heads"]) == (1536, 12)
    assert shape["source"] == "given; intermediate 4h by default"


def test_cli_borrows_a_llama_shape_only_near_a_llama_size(capsys):
    # 6e9 is nearest LLaMA-7B, whose linear layers alone hold 6.48e9: the estimate is for 7B's own count
    # (before, it raised from inside training_memory for 1e9, 3e9, 6e9 ...).
    assert cli.main(["memory", "--params", "6e9", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["shape"]["layers"] == 32 and "LLaMA-7B's shape and 6.738e+09 params" in rep["shape"]["source"]
    assert rep["base_bytes"]["bf16"] == 12e9 and rep["training"]["total_bytes"] > 0
    for p in ("1e9", "2e10"):  # no LLaMA size within 1.25x: the storage figures, and why no estimate
        assert cli.main(["memory", "--params", p]) == 0
        out = capsys.readouterr().out
        assert (
            "bits/param: NF4 4.5" in out and "no training estimate" in out and "--layers and --hidden" in out
        )
        assert cli.main(["memory", "--params", p, "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["training"] is None and rep["shape"] is None and "1.25x" in rep["training_note"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "2"], "--layers alone is part of a shape"),
        (["--hidden", "64", "--heads", "2"], "--hidden, --heads alone is part of a shape"),
        (["--layers", "40", "--hidden", "8192"], "the given shape does not fit --params 7e+09"),
    ],
)
def test_cli_refuses_options_that_describe_no_model(capsys, argv, message):
    assert cli.main(["memory", "--params", "7e9", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_a_blocksize_nf4_does_not_have(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["memory", "--params", "7e9", "--blocksize", "3"])
    assert e.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err


def test_heads_count_with_eager_attention_only(capsys):
    # --heads used to change nothing: the CLI always estimated a flash attention
    def total(*extra: str) -> float:
        argv = ["memory", "--params", "7e9", "--layers", "32", "--hidden", "4096", "--intermediate", "11008",
                "--json", *extra]  # fmt: skip
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out)["training"]["total_bytes"]

    assert total("--heads", "1") == total("--heads", "64")
    assert total("--heads", "1", "--eager-attention") < total("--heads", "64", "--eager-attention")


def test_less_than_one_parameter_is_a_usage_error(capsys):
    assert cli.main(["memory", "--params", "1e-3"]) == 2  # it printed "0.001 params ... 0 B"
    assert "less than one parameter" in capsys.readouterr().err


def test_a_size_past_any_model_is_a_usage_error(capsys):
    assert cli.main(["memory", "--params", "1e308", "--json"]) == 2  # it printed inf and "fp32": Infinity
    assert "--params 1e+308 is more than 1e+15 parameters" in capsys.readouterr().err


def test_llama_7b_shape_without_its_mlp_width_says_which_option_is_missing(capsys):
    # 4h is the default MLP width; LLaMA's gated MLP is wider, so its linear weights outgrow 7e9
    assert cli.main(["memory", "--params", "7e9", "--layers", "32", "--hidden", "4096"]) == 2
    assert "give --intermediate" in capsys.readouterr().err
    assert cli.main(["memory", "--params", "7e9", "--layers", "32", "--hidden", "4096", "--intermediate",
                     "11008"]) == 0  # fmt: skip


def test_a_rank_above_the_hidden_size_is_noted(capsys):
    """r above h is estimated as allocated (PEFT allocates it too), with a note that no update can use
    it; a rank within h has no note, in the text or the JSON."""
    shape = ["memory", "--params", "1e6", "--layers", "2", "--hidden", "64", "--intermediate", "256"]
    assert cli.main([*shape, "--r", "128"]) == 0
    out = capsys.readouterr().out
    assert "note: r=128 is above the hidden size 64" in out and "total" in out
    assert cli.main([*shape, "--r", "128", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["training"]["r"] == 128 and "r=128 is above the hidden size 64" in rep["training_note"]
    assert cli.main([*shape, "--r", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training_note"] is None
    assert cli.main([*shape, "--r", "64"]) == 0
    assert "note:" not in capsys.readouterr().out
