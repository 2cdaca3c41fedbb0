"""benchmarks/gpu.py's non-GPU parts: the clear failure without CUDA, target verdicts, and a dry run
(Triton CPU interpreter, tiny shapes) that runs the conformance checks and writes the JSON record."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402

# torchao and bitsandbytes, imported by the dry run, warn about torch.jit on import.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_exits_2_with_a_clear_message(capsys):
    assert gpu.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err


def _row(case, impl, ms, pct=None, speedup=None):
    return {
        "case": case,
        "impl": impl,
        "median_ms": ms,
        "pct_copy_bandwidth": pct,
        **({"reflora_speedup": speedup} if speedup else {}),
    }


def test_targets_met_and_missed():
    rows = [
        _row("dequantize 4096x11008 -> bf16", "reflora triton", 0.04, pct=85),
        _row("dequantize 4096x11008 -> bf16", "bitsandbytes dequantize_4bit", 0.07, speedup=1.75),
        _row("GEMV 1x11008", "reflora triton", 0.01, pct=65),
        _row("GEMV 1x11008", "bitsandbytes matmul_4bit (inference)", 0.02, speedup=2.0),
        _row("QLoRA MLP fwd+bwd", "reflora triton", 6.0),
        _row("QLoRA MLP fwd+bwd", "PEFT + bitsandbytes (LoRA bfloat16)", 13.0, speedup=13 / 6),
        _row("QLoRA MLP fwd+bwd", "bf16 dense + PEFT LoRA (bfloat16)", 4.0, speedup=4 / 6),
    ]
    verdicts = gpu.evaluate_targets(rows, dry_run=False)
    assert verdicts["dequantize"].startswith("met")
    assert verdicts["GEMV"].startswith("MISSED: 65% of copy bandwidth < 70%")
    assert verdicts["QLoRA MLP"].startswith("MISSED: 0.67x vs bf16 dense (need 0.77x)")
    assert all(v.startswith("not evaluated (dry run)") for v in gpu.evaluate_targets(rows, True).values())
    # `--only dequant gemv` runs no ceiling: no percentage to judge (before, formatting None raised and
    # the run's JSON was never written)
    rows = [_row("dequantize 4096x11008 -> bf16", "reflora triton", 0.04)]
    verdict = gpu.evaluate_targets(rows, dry_run=False)["dequantize"]
    assert verdict.startswith("not fully evaluated (no copy ceiling, bitsandbytes row to compare)")


def test_the_json_is_written_after_every_case_and_keeps_them_when_one_fails(tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the dry run of this test uses the interpreter")
    import _gpu_cases as cases

    def broken(*args):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(cases, "gemv_case", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        gpu.main(["--dry-run", "--only", "dequant", "gemv", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("dryrun-gpu-*.json")
    record = json.loads(path.read_text())
    assert record["cases_done"] == ["dequant"] and record["error"] == "gemv: RuntimeError: out of memory, say"
    assert any(r["impl"] == "reflora triton" and r["check"] == "exact" for r in record["rows"])
    # a baseline that fails is a row saying why; the others, reflora's included, are still measured
    rows = cases.baseline("case", "some library", broken)
    assert [(r.impl, r.median_ms, r.note) for r in rows] == [
        ("some library", None, "RuntimeError: out of memory, say")
    ]


def test_dry_run_checks_kernels_and_writes_json(tmp_path, capsys):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the dry run of this test uses the interpreter")
    assert gpu.main(["--dry-run", "--only", "dequant", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("dryrun-gpu-*.json")
    record = json.loads(path.read_text())
    assert record["dry_run"] is True
    for key in ("date", "device", "torch", "triton", "bitsandbytes", "driver"):
        assert key in record["environment"]
    ours = next(r for r in record["rows"] if r["impl"] == "reflora triton")
    assert ours["check"] == "exact"
    assert {"median_ms", "p20_ms", "p80_ms", "gb_per_s"} <= ours.keys()
    assert "DRY RUN" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "usage: gpu_session.sh PHASE..."), (["check", "bench"], "unknown phase 'bench'")],
)
def test_gpu_session_refuses_bad_phases_before_running_any(args, message, tmp_path):
    """benchmarks/gpu_session.sh spends lent GPU time: a typo must stop it before the first phase."""
    import subprocess

    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_session.sh"), *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 2
    assert (
        message in done.stderr
        and "phases: check harness tiles audit audit-dequant audit-forward audit-backward conform provenance "
        "tests"
        in done.stderr
    )
    assert not any(tmp_path.iterdir())  # no phase ran, no log written


def test_tile_sweep_times_the_default_first_and_records_configs_that_do_not_compile():
    import _gpu_cases as cases

    timer = cases.Timer(dry_run=True)
    calls = []

    def run(cfg):
        calls.append(cfg)
        if cfg.bm == 64:
            raise RuntimeError("out of resource: shared memory")
        return cfg.bm

    default, other, broken = cases.DRY_GEMM_TILES[0], cases.DRY_GEMM_TILES[1], cases.GemmConfig(64, 64, 64)
    configs = (other, default, broken)
    rows = cases._sweep(timer, "tiles: x", configs, default, run, lambda out: "ok", 1.0, None)
    assert [r.impl for r in rows] == [
        "reflora triton",  # the default, first and once, under the name the speedup column divides by
        f"reflora triton {cases.tile_name(other)}",
        f"reflora triton {cases.tile_name(broken)}",
    ]
    assert rows[0].note == f"default: {cases.tile_name(default)}" and rows[1].check == "ok"
    assert rows[2].check == "not run" and "RuntimeError: out of resource" in rows[2].note
    assert cases.tile_name(cases.GEMM_TILES[-1]).endswith("+shared")
    assert cases.tile_name(cases.GEMM_TILES[0]).endswith("+dq")  # M = 8192: W dequantized first

    def wrong(out):
        raise cases.ConformanceError("tiles: x: |computed - float64| reaches 3 x the derived bound")

    with pytest.raises(cases.ConformanceError):  # a wrong default stops the run; it is never timed
        cases._sweep(timer, "tiles: x", (other,), default, run, wrong, 1.0, None)

    def wrong_candidate(out):
        if out == other.bm:
            raise cases.ConformanceError("|computed - float64| reaches 3 x the derived bound")
        return "ok"

    timed = []
    slow_timer = lambda fn, **kw: timed.append(fn()) or (1.0, 1.0, 1.0)  # noqa: E731
    rows = cases._sweep(slow_timer, "tiles: x", (other,), default, run, wrong_candidate, 1.0, None)
    assert rows[1].median_ms is None and rows[1].check.startswith("FAILED, not timed: |computed")
    assert timed == [default.bm]  # only the default was timed; the wrong candidate never


def test_targets_take_the_fastest_row_of_each_baseline():
    """PEFT is timed with and without bf16 autocast: the ≥2x target is judged against the faster."""
    rows = [
        _row("QLoRA MLP fwd+bwd", "reflora triton", 6.0),
        _row("QLoRA MLP fwd+bwd", "PEFT + bitsandbytes (LoRA float32)", 13.0, speedup=13 / 6),
        _row("QLoRA MLP fwd+bwd", "PEFT + bitsandbytes (LoRA float32, bf16 autocast)", 9.0, speedup=9 / 6),
        _row("QLoRA MLP fwd+bwd", "bf16 dense + PEFT LoRA (float32)", 5.0, speedup=5 / 6),
    ]
    verdict = gpu.evaluate_targets(rows, dry_run=False)["QLoRA MLP"]
    assert verdict.startswith("MISSED: 1.50x vs PEFT + bitsandbytes (need 2.00x)"), verdict
    assert "bf16 dense" not in verdict.split(" -- ")[0]  # 0.83x is within 1.3x of dense


def test_a_variant_is_compared_with_the_row_it_varies():
    import _gpu_cases as cases

    rows = [
        cases.Row("mlp", "reflora triton", 5.0, 5.0, 5.0),
        cases.Row("mlp", cases.VARIANT_FUSED, 8.0, 8.0, 8.0),
        cases.Row("mlp", cases.VARIANT_SHARED, 6.4, 6.4, 6.4, versus=cases.VARIANT_FUSED),
    ]
    shared = gpu.derive(rows, None, None)[2]
    assert shared["reflora_speedup"] == pytest.approx(6.4 / 5.0)  # against the default, as every row
    assert shared["versus"] == cases.VARIANT_FUSED and shared["versus_speedup"] == pytest.approx(8.0 / 6.4)


def test_spread_rows_check_every_tile_of_every_tiling():
    import _gpu_cases as cases

    rows = cases.spread_rows(8192, 64)
    assert rows[-1] == 8191 and len(rows) == 129 and (np.diff(rows) > 0).all()
    for bm in (64, 128, 256):  # every M tile of these tilings holds a checked row
        assert set(range(8192 // bm)) == set(rows // bm)
    assert len(set(rows % 64)) > 32  # and at varying offsets inside the tiles
    assert list(cases.spread_rows(40, 16, seed=1)) == sorted(set(cases.spread_rows(40, 16, seed=1)))
    assert set(cases.spread_rows(40, 16) // 16) == {0, 1, 2}


def test_an_output_left_partly_unwritten_fails_its_check_and_is_not_timed():
    """The kernels' outputs come from torch.empty, which may hand back memory holding an earlier call's
    correct values; under poisoned_outputs it holds NaN, so a candidate that skips a tile fails."""
    import _gpu_cases as cases

    def run(cfg):
        out = torch.empty(40, 8)  # as the launchers allocate
        out[: cfg.bm] = 1.0  # writes only its first M tile
        return out

    def check(out):
        cases.check_finite("tiles: x", out)
        return "ok"

    timed = []
    timer = lambda fn, **kw: timed.append(fn) or (1.0, 1.0, 1.0)  # noqa: E731
    full, partial = cases.GemmConfig(bm=64, bp=16, bq=16), cases.GemmConfig(bm=16, bp=16, bq=16)
    rows = cases._sweep(timer, "tiles: x", (partial,), full, run, check, 1.0, None)
    assert rows[0].check == "ok" and rows[1].median_ms is None and len(timed) == 1
    assert rows[1].check.startswith("FAILED, not timed: tiles: x: 192 of 320 elements are not finite")
    assert "never written" in rows[1].check and "first at index (16, 0)" in rows[1].check
    assert not torch.are_deterministic_algorithms_enabled()  # the poisoning is undone after each check
    assert torch.isfinite(torch.zeros(3)).all()


def test_the_json_records_the_digest_gpu_session_prints(tmp_path):
    """gpu_session.sh hashes the sha256sum listing of the sources; gpu.py records the same digest."""
    import subprocess

    root = BENCH.parent
    listing = subprocess.run(
        "find reflora backends conformance benchmarks -name '*.py' -o -name '*.toml' | LC_ALL=C sort "
        "| xargs sha256sum | sha256sum",
        shell=True, cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert gpu.sources_digest() == listing.stdout.split()[0]
    (tmp_path / "reflora").mkdir()
    (tmp_path / "reflora" / "a.py").write_text("x = 1\n")
    before = gpu.sources_digest(tmp_path)
    (tmp_path / "reflora" / "a.py").write_text("x = 2\n")
    assert gpu.sources_digest(tmp_path) != before
