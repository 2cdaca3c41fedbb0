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


def test_a_supports_that_raises_or_returns_none_fails_its_tests_and_the_run_goes_on(capsys):
    # Before: supports() raising ended `reflora conform` (every backend's run) with a traceback, and a
    # missing return read as the reason "None", an unsupported op.
    rc = cli.main(["conform", "--backend", "odd_backends:SupportsRaises", "--backend", "reference",
                   "-k", "lora_forward[rank 1, *]", "-k", "lora_merge[rank 1, *]"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    assert "FAIL lora_forward[rank 1, float16]\nlora_forward: supports('lora_forward', 'float16') raised " \
        "RuntimeError: boom in supports" in out  # fmt: skip
    assert "odd_backends:SupportsRaises (dialect reflora): FAIL" in out
    assert "  lora_merge      pass 1/1" in out  # its other op ran
    assert "reference (dialect reflora): PASS" in out  # and so did the next backend
    rep = _report("odd_backends:SupportsNone", "lora_merge[rank 1, float32]")
    (r,) = rep.results
    assert r.status == "fail" and r.output == "supports()"
    assert r.message == (
        "lora_merge: supports('lora_merge', 'float32') returned None: it must return True, False or a "
        "reason (a str)"
    )


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("odd_backends:AvailableRaises", "available() raised RuntimeError: driver probe crashed"),
        ("odd_backends:AvailableFalse", "available() returned False"),
    ],
)
def test_an_available_that_raises_or_says_false_is_a_clear_refusal(capsys, spec, words):
    # Before: a traceback (exit 1) when named, and "is unavailable here: False".
    rc = cli.main(["conform", "--backend", spec, "-k", "lora_merge[*"])
    err = capsys.readouterr().err
    assert rc == 2 and f"backend {spec!r} is unavailable here: {words}" in err and "Traceback" not in err


def test_a_backward_with_the_wrong_number_of_gradients_says_how_many():
    rep = _report("odd_backends:TwoGradients", "lora_backward[rank 1, float32]")
    (r,) = rep.by_status("fail")
    assert r.message.startswith(
        "lora_backward: result = a tuple of 2, expected a tuple of 3: (grad_x, grad_A, grad_B) (EXACT)"
    )


def test_an_arithmetic_that_fails_is_not_shown_as_a_declaration():
    rep = _report("odd_backends:BadArithmetic", "lora_forward[random, float32]")
    text = runner.matrix_text(rep)
    section = text.split("Declared arithmetic (what the BOUND tolerances are derived from):\n")[1]
    assert section.startswith(
        "  lora_forward float32: nothing usable declared (lora_forward: arithmetic() = TypeError: "
    )


def test_a_partly_unsupported_cell_says_why():
    # "dequantize_4bit pass 20/20, 3 unsupported" gave no reason; a wholly unsupported cell did.
    rep = _report("triton", "dequantize_4bit[random*, float32]")
    text = runner.matrix_text(rep)
    assert "  dequantize_4bit pass 1/1, 1 unsupported [1]" in text
    assert "  [1] quantize_4bit: the Triton kernels do not quantize" in text
