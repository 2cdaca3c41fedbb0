"""benchmarks/oracle_summary.py: medians, p20/p80 and the ratios of the committed benchmark JSONs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import oracle_summary


def _raw(times: dict[str, list[float]]) -> dict:
    machine = {"cpu": {"brand_raw": "test cpu"}, "system": "Linux", "release": "6", "python_version": "3"}
    stats = {n: {"data": d, "median": sorted(d)[len(d) // 2], "rounds": len(d)} for n, d in times.items()}
    return {
        "datetime": "2026-11-23T00:00:00",
        "machine_info": machine,
        "benchmarks": [{"name": name, "stats": st} for name, st in stats.items()],
    }


def test_training_summary_ratios_are_the_others_medians_over_reflora():
    raw = _raw({"test_step_reflora": [2.0, 2.1, 1.9], "test_step_peft_bitsandbytes": [3.0, 3.2, 2.9]})
    s = oracle_summary.summarise(raw)
    assert s["benchmark"].startswith("benchmarks/test_training_speed.py")
    assert s["times"]["test_step_reflora"]["median_ms"] == pytest.approx(2000.0)
    assert s["ratios"] == {"peft_bitsandbytes/reflora": pytest.approx(1.5)}
    assert s["device"]["cpu"] == "test cpu" and "torch" in s["versions"]


def test_oracle_summary_checks_the_issue_2_targets():
    raw = _raw(
        {
            "test_quantize_reflora[dq]": [0.5, 0.5, 0.5],
            "test_quantize_bitsandbytes[dq]": [0.9, 0.9, 0.9],
            "test_dequantize_reflora[dq]": [0.2, 0.2, 0.2],
            "test_dequantize_bitsandbytes[dq]": [0.06, 0.06, 0.06],
        }
    )
    s = oracle_summary.summarise(raw)
    assert s["ratios"]["quantize[dq] bitsandbytes/reflora"] == pytest.approx(1.8)
    assert s["targets"]["quantize: reflora at least as fast as bitsandbytes"] is True
    assert s["targets"]["dequantize: reflora at least half as fast as bitsandbytes"] is False  # 0.3x
