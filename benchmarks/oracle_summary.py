"""Summarise a pytest-benchmark JSON of benchmarks/test_oracle_speed.py or test_training_speed.py:
device, versions, medians (with p20/p80 of the rounds) and the ratios that matter (for the oracle,
the targets of issue #2; for a training step, PEFT's times over reflora's).

    python -m pytest benchmarks/test_oracle_speed.py --benchmark-only --benchmark-json raw.json
    python benchmarks/oracle_summary.py raw.json benchmarks/results/oracle-cpu-DATE.json

Ratios are of medians taken in the same run, one benchmark after the other on one machine.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata

import numpy as np


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _times(raw: dict) -> dict:
    times = {}
    for b in raw["benchmarks"]:
        data = b["stats"]["data"]
        times[b["name"]] = {
            "median_ms": b["stats"]["median"] * 1e3,
            "p20_ms": float(np.quantile(data, 0.2)) * 1e3,
            "p80_ms": float(np.quantile(data, 0.8)) * 1e3,
            "rounds": b["stats"]["rounds"],
        }
    return times


def _machine(raw: dict) -> tuple[dict, dict]:
    """(device, versions) from pytest-benchmark's machine_info and the installed packages."""
    info = raw["machine_info"]
    device = {
        "cpu": info.get("cpu", {}).get("brand_raw"),
        "cores": os.cpu_count(),
        "system": f"{info.get('system')} {info.get('release')}",
    }
    packages = ("reflora", "numpy", "ml_dtypes", "torch", "bitsandbytes", "peft", "transformers")
    return device, {"python": info.get("python_version"), **{p: _version(p) for p in packages}}


def summarise_training(raw: dict) -> dict:
    times = _times(raw)
    ours = times.get("test_step_reflora")
    ratios = {  # above 1: reflora is faster
        f"{name.removeprefix('test_step_')}/reflora": t["median_ms"] / ours["median_ms"]
        for name, t in times.items()
        if ours and name != "test_step_reflora"
    }
    device, versions = _machine(raw)
    return {
        "benchmark": "benchmarks/test_training_speed.py: one QLoRA step (forward + backward) of MiniLM, "
        "16 x 64 tokens, r 8, the 36 block linear layers, NF4 + double quantization, float32 compute",
        "datetime": raw["datetime"],
        "device": device,
        "versions": versions,
        "times": times,
        "ratios": ratios,
    }


def summarise(raw: dict) -> dict:
    if any(b["name"].startswith("test_step_") for b in raw["benchmarks"]):
        return summarise_training(raw)
    times = _times(raw)
    ratios = {}
    for op in ("quantize", "dequantize"):
        for variant in ("plain", "dq"):
            ours, theirs = f"test_{op}_reflora[{variant}]", f"test_{op}_bitsandbytes[{variant}]"
            if ours in times and theirs in times:
                # > 1: reflora is faster
                ratios[f"{op}[{variant}] bitsandbytes/reflora"] = (
                    times[theirs]["median_ms"] / times[ours]["median_ms"]
                )
    device, versions = _machine(raw)
    return {
        "benchmark": "benchmarks/test_oracle_speed.py: NF4, blocksize 64, 4096x11008 float32, N(0, 0.02)",
        "datetime": raw["datetime"],
        "device": device,
        "versions": versions,
        "times": times,
        "ratios": ratios,
        "targets": {
            "quantize: reflora at least as fast as bitsandbytes": all(
                v >= 1 for k, v in ratios.items() if k.startswith("quantize")
            ),
            "dequantize: reflora at least half as fast as bitsandbytes": all(
                v >= 0.5 for k, v in ratios.items() if k.startswith("dequantize")
            ),
        },
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/oracle_summary.py RAW.json OUT.json")
    with open(sys.argv[1]) as f:
        summary = summarise(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(json.dumps({"times": summary["times"], "ratios": summary["ratios"]}, indent=2))
