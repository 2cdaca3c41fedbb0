"""The triton conformance backend passes the ci profile (under the CPU interpreter without CUDA, as
tests/conftest.py chooses) with no declared deviations, and says why when it cannot run.

Measured on the 2-core CI machine under TRITON_INTERPRET=1: about 95 s (ci profile, seed 0).
"""

from __future__ import annotations

import os

import pytest

from reflora import backends
from reflora.conformance import runner

pytest.importorskip("torch")
pytest.importorskip("triton")


@pytest.mark.slow
def test_triton_passes_the_ci_profile(tmp_path):
    (row,) = [s for s in backends.status() if s.name == "triton"]
    if not row.available:
        pytest.skip(row.reason)
    (report,), _, _ = runner.run(["triton"], profile="ci", bundle_dir=tmp_path)
    assert report.ok, runner.matrix_text(report)
    assert report.dialect == "reflora" and not report.by_status("declared")
    for op in ("dequantize_4bit", "qlora_forward", "qlora_backward"):
        assert sum(r.status == "pass" and r.op == op for r in report.results) >= 27, op
    if os.environ.get("TRITON_INTERPRET") == "1":  # the size cap declines only a few examples
        declined = sum(r.declined for r in report.results)
        examples = sum(r.examples for r in report.results if r.op.startswith("qlora"))
        assert declined <= examples // 10, (declined, examples)


def test_triton_unavailable_without_interpreter_or_gpu_says_how_to_fix(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the backend is available without the interpreter")
    from reflora.backends.triton.backend import TritonBackend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = TritonBackend().available()
    assert isinstance(reason, str) and "TRITON_INTERPRET=1" in reason


def test_arithmetic_is_declared_in_reflora_bounds_terms():
    from reflora.backends.triton.backend import TritonBackend
    from reflora.bounds import Arithmetic

    a = TritonBackend().arithmetic("qlora_forward", "bfloat16")
    assert isinstance(a, Arithmetic)
    assert (a.operand, a.accumulate, a.intermediate, a.output) == (
        "bfloat16",
        "float32",
        "float32",
        "bfloat16",
    )
    assert a.fused  # one float32 accumulator per output, rounded once (bounds.lora_forward_bound)


def test_the_commands_choose_the_interpreter_themselves():
    """`reflora backends` (and `reflora conform`) decide Triton's mode before any backend loads, so on a
    CPU machine the triton backend is available without the user exporting TRITON_INTERPRET."""
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "reflora", "backends"], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("triton ")]
    assert line.split()[1] == "available", line
    if not torch.cuda.is_available():
        assert "Failed to load" not in done.stderr  # torchao's import-time noise is kept out of the listing


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("3.2.0", False),
        ("3.3.1", False),
        ("3.4.0", True),
        ("3.9.0", True),
        ("4.0.0", True),
        ("3.10.0+git", True),
    ],
)
def test_too_old_triton_is_refused_by_name(version, ok, monkeypatch):
    """Triton 3.2 lacks tl.gather and 3.3's compiler asserts on it (docs/triton.md): the backend says so
    instead of failing inside a kernel compile."""
    import triton

    from reflora.backends.triton.backend import TritonBackend, triton_version_problem

    problem = triton_version_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert f"Triton {version} is too old" in problem and "triton>=3.4" in problem
        monkeypatch.setattr(triton, "__version__", version)
        assert TritonBackend().available() == problem


@pytest.fixture
def interpreted():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels under the interpreter")
    import torch

    from reflora.backends.triton import subnormals

    return torch, subnormals


def test_the_subnormal_probe_finds_the_interpreter_keeps_them(interpreted):
    """The probe through qlora_linear (GEMV at 1 row, in-tile GEMM at 16; the GEMM after dequantize, at
    256 rows, is left to the GPU for time): numpy keeps subnormals, so it finds nothing, and the backend
    declares no flushing. On a GPU the same probe decides flush_to_zero."""
    torch, subnormals = interpreted
    assert subnormals.probe(torch.bfloat16, "cpu", rows=(1, 16)) == []
    from reflora.backends.triton.backend import TritonBackend

    assert TritonBackend().arithmetic("qlora_forward", "bfloat16").flush_to_zero is False
    with pytest.raises(ValueError, match="dtype must be one of"):
        subnormals.probe(torch.float64, "cpu")
    # whatever mode the first caller is in (it raised under no_grad and inference_mode)
    with torch.no_grad():
        assert subnormals.probe(torch.float16, "cpu", rows=(1,)) == []
    with torch.inference_mode():
        assert subnormals.probe(torch.float16, "cpu", rows=(1,)) == []


@pytest.mark.parametrize("where", ["inputs", "outputs"])
def test_the_subnormal_probe_sees_a_kernel_that_flushes(interpreted, monkeypatch, where):
    """A planted flush, of the operands read (denormals-are-zero) or of the results (flush-to-zero), is
    what the probe reports and what the backend then declares."""
    torch, subnormals = interpreted
    import reflora.backends.triton as package
    from reflora.backends.triton import backend as backend_module

    real = package.qlora_linear

    def ftz(t):
        tiny = torch.finfo(t.dtype).tiny  # the smallest normal number
        return torch.where(t.abs() < tiny, torch.zeros_like(t), t)

    def flushing(x, ts, a, b, s):
        if where == "inputs":
            return real(ftz(x), ts, a, b, s)
        return ftz(real(x, ts, a, b, s))

    monkeypatch.setattr(package, "qlora_linear", flushing)
    found = subnormals.probe(torch.bfloat16, "cpu", rows=(1,))
    if where == "inputs":  # x = 2**-130 read as 0: y, and grad_x through the graph, come out 0
        assert found[0] == "subnormal operands, 1 rows: y 0 of 256 equal", found
    else:  # y = 2**-132, a subnormal result, flushed (and grad_x behind torch.where's zero gradient)
        assert found[0] == "subnormal results, 1 rows: y 0 of 256 equal", found
        assert not any(line.startswith("subnormal operands") for line in found), found
    monkeypatch.setattr(backend_module, "_interpret", lambda: False)  # as on a GPU: probed, not assumed
    # a dtype the kernels do not take is not probed (it raised from getattr or the probe's own check)
    assert backend_module.TritonBackend().arithmetic("qlora_forward", "float64").flush_to_zero is False
    monkeypatch.setattr(backend_module, "_device", lambda: "cpu")
    monkeypatch.setattr(
        subnormals, "flushes", lambda dtype, device: bool(subnormals.probe(dtype, device, (1,)))
    )
    arith = backend_module.TritonBackend().arithmetic("qlora_backward", "bfloat16")
    assert arith.flush_to_zero is True and arith.acc_slack == 2.0


def test_the_subnormal_probe_sees_grad_a_flushed_and_refuses_a_wrong_kernel(interpreted, monkeypatch):
    """grad_A's products are subnormal in one probe (u = 2**-62 times x = 2**-70): a kernel that zeroes
    grad_A is seen (the first probes never had a nonzero grad_A). A result above the oracle's cannot
    come from flushing these all-positive sums: that is an error, not a declared flush."""
    torch, subnormals = interpreted
    import reflora.backends.triton as package

    real = package.qlora_linear

    def zero_grad_a(x, ts, a, b, s):
        a2 = a * 1
        a2.register_hook(torch.zeros_like)
        return real(x, ts, a2, b, s)

    monkeypatch.setattr(package, "qlora_linear", zero_grad_a)
    found = subnormals.probe(torch.bfloat16, "cpu", rows=(1,))
    assert found == ["subnormal products in grad_A, 1 rows: grad_A 0 of 4096 equal"], found

    monkeypatch.setattr(package, "qlora_linear", lambda x, ts, a, b, s: real(x, ts, a, b, s) * 2)
    with pytest.raises(RuntimeError, match=r"subnormal operands, 1 rows: y element 0 is .*above the exact"):
        subnormals.probe(torch.float16, "cpu", rows=(1,))
