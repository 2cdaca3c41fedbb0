"""The torch-inductor conformance backend: reflora's torch ops compiled by inductor, held to the suite.

The whole ci profile takes 3 minutes here (docs/conformance.md), so CI runs the cases that found
something: float32 activations over a 4-bit base of another dtype, where inductor, generating the
dequantization itself, dropped the weight's rounding to its state dtype (6 tests of the ci profile
failed before the dequantization became the opaque op reflora::dequantize_4bit), and a double-quantized
dequantization, exact. The second test plants that bug back and checks the suite reports it.
"""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from reflora.backends.torch import ops  # noqa: E402
from reflora.backends.torch.backend import TorchInductorBackend, cpu_compiler  # noqa: E402

if cpu_compiler() is None:
    pytest.skip("inductor needs a C++ compiler for the CPU", allow_module_level=True)
from reflora.conformance import profiles  # noqa: E402
from reflora.conformance.cli import conform  # noqa: E402
from reflora.conformance.runner import run_backend  # noqa: E402

SPEC = "reflora.backends.torch.backend:TorchInductorBackend"
FOUND = [
    "qlora_forward[random, base weight in another dtype, float32]",
    "qlora_backward[random, base weight in another dtype, float32]",
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no compiled code carried between tests (a planted bug must recompile)
    yield
    torch._dynamo.reset()


def _run(select, tmp_path):
    return run_backend(
        TorchInductorBackend("cpu"), SPEC, profiles.get("ci"), 0, bundle_dir=tmp_path, select=select
    )


def test_the_compiled_ops_pass_the_cases_that_found_inductor_bugs(tmp_path) -> None:
    select = [*FOUND, "dequantize_4bit[double quant, 600 blocks, float32]"]
    report = _run(select, tmp_path)
    assert {r.id: r.status for r in report.results} == dict.fromkeys(select, "pass")
    assert all(r.examples > 0 for r in report.results)


def test_the_suite_catches_inductor_generating_the_dequantization(monkeypatch, tmp_path) -> None:
    """With the dequantization left to inductor (the opaque op bypassed), both cases fail, naming the
    base dtype, with a replayable bundle."""
    monkeypatch.setattr(ops, "_dequantize", ops._dequantize_eager)
    report = _run(FOUND, tmp_path)
    assert [r.status for r in report.results] == ["fail", "fail"]
    for r in report.results:
        assert "> BOUND" in r.message and "base_dtype=float16" in r.message, r.message
        assert r.bundle is not None and Path(r.bundle).exists(), r.bundle


def test_reflora_conform_runs_it_by_module_path(tmp_path, capsys) -> None:
    code = conform([SPEC], select=["dequantize_4bit[odd n, float16]"], bundle_dir=str(tmp_path))
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"PASS {SPEC}: 1 passed" in out, out
