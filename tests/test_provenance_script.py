"""benchmarks/provenance.py on the CPU: bitsandbytes' own checkpoints, each weight traced to bnb-cpu."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import provenance

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def test_every_weight_bitsandbytes_writes_on_the_cpu_is_reproduced_by_bnb_cpu(tmp_path, capsys) -> None:
    assert (
        provenance.main(["--device", "cpu", "--hidden", "128", "--layers", "1", "--out", str(tmp_path)]) == 0
    )
    record = json.loads((tmp_path / "provenance-cpu.json").read_text())
    assert record["passed"] and record["expected"] == "bnb-cpu"
    assert set(record["configs"]) == set(provenance.CONFIGS)
    for row in record["configs"].values():
        assert row["weights"] == 7 and row["reproduced_by"]["bnb-cpu"] == 7 and not row["not_reproduced"]
    # the canonical rules round bnb's 8-bit scale codes differently: double quantization tells them apart
    assert record["configs"]["nf4-DQ"]["reproduced_by"]["reflora"] < 7
    assert "PASS: bnb-cpu must reproduce every weight" in capsys.readouterr().out


def test_a_weight_the_expected_dialect_does_not_reproduce_fails_the_run(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(provenance.EXPECTED, "cpu", "reflora")  # a wrong claim about who wrote the bytes
    assert (
        provenance.main(["--device", "cpu", "--hidden", "128", "--layers", "1", "--out", str(tmp_path)]) == 1
    )
    record = json.loads((tmp_path / "provenance-cpu.json").read_text())
    missed = record["configs"]["nf4-DQ"]["not_reproduced"]
    assert missed and all(m["code_diffs"]["reflora"] + m["scale_diffs"]["reflora"] > 0 for m in missed)
    out = capsys.readouterr().out
    assert f"  {missed[0]['key']}: reflora: " in out and "scales differ" in out
    assert out.rstrip().endswith("FAIL: reflora must reproduce every weight")
