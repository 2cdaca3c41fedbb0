"""The suite must not report a pass for a backend that checked nothing, declined, took the wrong
arguments, answered in another dtype than it declared, or wrote to its inputs; and a backend it cannot
run is refused before any test (found by a third-party-author audit; each test fails on the code
before the fix)."""

from __future__ import annotations

import numpy as np
import pytest

from reflora import backends, cli
from reflora.conformance import runner


@pytest.fixture(autouse=True)
def _bundles_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # failure bundles go to ./reflora-failures


def _report(spec: str, *patterns: str) -> runner.Report:
    reports, _, _ = runner.run([spec], select=list(patterns), entries=[])
    return reports[0]


def test_declining_is_never_counted_as_rejecting_bad_input():
    # Before, the bad-input tests "passed" on NotImplementedError: lora_forward pass 6/6, exit 0.
    rep = _report("odd_backends:DeclinesEverything", "lora_forward[*, float32]", "quantize_4bit[*, float32]")
    assert not rep.by_status("pass") and rep.by_status("unsupported")
    assert all("NotImplementedError" in r.reason for r in rep.by_status("unsupported"))
    assert rep.verdict == "NOTHING CHECKED" and "NOTHING CHECKED" in runner.matrix_text(rep)


def test_a_signature_that_does_not_take_the_protocols_arguments_fails():
    rep = _report("odd_backends:MissingKeyword", "lora_forward[*, float32]")
    failed = rep.by_status("fail")
    assert not rep.by_status("pass") and failed  # the bad-input tests used to pass on the TypeError
    assert all("signature = lora_forward(" in r.message for r in failed)
    assert any("-> error" in r.id for r in failed)


def test_a_result_in_another_dtype_than_declared_fails():
    rep = _report("odd_backends:UpcastOutput", "lora_forward[random, bfloat16]")
    (r,) = rep.by_status("fail")
    assert r.message.startswith("lora_forward: y.dtype = float64, expected bfloat16 (")


def test_a_run_that_checks_nothing_is_not_a_pass(capsys):
    rc = cli.main(["conform", "--backend", "odd_backends:SupportsNothing", "-k", "lora_merge[*"])
    out, err = capsys.readouterr()
    assert rc == 2 and "NOTHING CHECKED odd_backends:SupportsNothing: 0 passed" in out
    assert "no test checked anything" in err


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("odd_backends:MissingDeviations", "no-such-deviations.toml"),
        ("odd_backends:UnknownDialect", "unknown dialect 'bitsandbytes'"),
    ],
)
def test_a_backend_the_suite_cannot_run_is_refused_before_any_test(capsys, spec, words):
    rc = cli.main(["conform", "--backend", spec, "-k", "lora_merge[*"])
    out, err = capsys.readouterr()
    assert rc == 2 and f"backend {spec!r} cannot be run" in err and words in err
    assert "Traceback" not in err and "PASS" not in out
    assert words in runner.unusable(backends.get(spec))


def test_numpy_crosses_the_boundary_and_arithmetic_names_real_dtypes():
    # Before: float32 torch tensors passed silently, bfloat16 ones were "the suite raised TypeError".
    rep = _report("odd_backends:TorchTensors", "lora_forward[random, *]")
    assert not rep.by_status("pass", "error")
    assert all(
        r.message.startswith("lora_forward: y = Tensor, expected a numpy array (")
        for r in rep.by_status("fail")
    )
    # Before: every test "raised TypeError: data type 'fp32' not understood", blamed on the suite.
    rep = _report("odd_backends:BadArithmetic", "lora_forward[random, float32]")
    (r,) = rep.by_status("fail")
    assert r.message.startswith(
        "lora_forward: arithmetic() = TypeError: data type 'fp32' not understood, expected a reflora.bounds"
    )


def test_the_report_shows_the_arithmetic_each_bound_was_derived_from():
    rep = _report("torch", "lora_forward[random, bfloat16]", "lora_merge[random, float32]")
    assert sorted(rep.arithmetic) == ["lora_forward bfloat16", "lora_merge float32"]
    fwd = rep.arithmetic["lora_forward bfloat16"]
    assert (fwd["operand"], fwd["accumulate"], fwd["output"]) == ("bfloat16", "float32", "bfloat16")
    assert rep.arithmetic["lora_merge float32"]["output"] == "float32"
    assert rep.as_dict()["arithmetic"] == rep.arithmetic
    text = runner.matrix_text(rep)
    assert "Declared arithmetic (what the BOUND tolerances are derived from):" in text
    assert "accumulate float32, intermediate bfloat16, output bfloat16" in text
    assert "### Declared arithmetic" in runner.markdown([rep], [], 0, "ci")


def test_a_difference_from_an_expected_zero_reads_as_infinitely_large():
    # A code of 7 where 0 was expected read "Max relative difference: 0" (a wrong nibble order, say).
    from reflora.conformance.tolerances import _differences

    actual, expected = np.array([7, 0, 3], np.uint8), np.array([0, 0, 3], np.uint8)
    assert _differences(actual, expected, actual != expected) == [
        "Mismatched elements: 1 / 3 (33.3%)",
        "Max absolute difference: 7 at [0]",
        "Max relative difference: inf at [0]",
    ]
