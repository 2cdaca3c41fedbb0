"""The oracle as a backend passes its own suite: 100% of the ci profile, every cell of the matrix."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from reflora.conformance import runner, suite, tolerances

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> runner.Report:
    reports, _, seed = runner.run(["reference"], "ci", bundle_dir=tmp_path_factory.mktemp("b"))
    assert seed == 0 and len(reports) == 1
    return reports[0]


@pytest.mark.slow
def test_reference_passes_every_ci_test(report):
    bad = report.by_status("fail", "error", "declared", "unsupported")
    assert not bad, bad[0].message or bad[0].reason
    assert report.ok and len(report.results) == len(suite.tests())
    props = [r for r in report.results if r.kind == "property"]
    # every property ran the profile's examples (none declined, none skipped)
    assert all(r.examples == 12 and not r.declined for r in props), [(r.id, r.examples) for r in props]


@pytest.mark.slow
def test_the_matrix_shows_every_op_and_dtype_passing(report):
    text = runner.matrix_text(report)
    assert text.startswith("reference (dialect reflora): PASS  [profile ci, seed 0, ")
    for op in suite.OPS:
        row = next(line for line in text.splitlines() if line.strip().startswith(op + " "))
        cells = re.findall(r"pass (\d+)/(\d+)", row)
        assert len(cells) == 3 and all(a == b for a, b in cells), row
    d = report.as_dict()
    assert d["ok"] and set(d["matrix"]) == set(suite.OPS)


def test_test_ids_are_unique_parseable_and_cover_every_op_and_dtype():
    tests = suite.tests()
    assert len({t.id for t in tests}) == len(tests)
    for t in tests:
        assert suite.parse_id(t.id) == (t.op, t.id[len(t.op) + 1 : t.id.rindex(",")], t.dtype)
    assert {(t.op, t.dtype) for t in tests} == {(o, d) for o in suite.OPS for d in suite.DTYPES}
    # each op has a random property, a bad-input test and special cases in every dtype
    for op in suite.OPS:
        for dtype in suite.DTYPES:
            cell = [t for t in tests if t.op == op and t.dtype == dtype]
            assert any(t.kind == "property" for t in cell) and any(t.kind == "case" for t in cell)
            if op != "dequantize_4bit":
                assert any(t.check == "rejects" for t in cell), (op, dtype)
    with pytest.raises(ValueError, match="not a test id"):
        suite.parse_id("quantize_4bit[random]")


def test_docs_carry_the_tolerance_table_verbatim():
    doc = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    assert tolerances.markdown_table() in doc
    for e in tolerances.TABLE:
        assert e.source and e.rule
    assert {str(e.tolerance).split("(")[0] for e in tolerances.TABLE} == {"EXACT", "ULP", "BOUND", "STAT"}


def test_nan_encodings_relax_only_nans_and_only_to_the_declared_bits():
    """A dialect may declare several NaN encodings (bnb-cpu's bfloat16 torch fallback: 0x7fc0 compiled,
    0xffff eager); the round trip then accepts exactly those where it expects a NaN, and nothing else."""
    from reflora.conformance.mismatch import Mismatch
    from reflora.dtypes import bfloat16

    def bf(*bits):
        return np.array(bits, dtype=np.uint16).view(bfloat16)

    expected = bf(0x7FC0, 0x3F80)  # NaN, 1.0
    check = lambda actual, nan_bits: tolerances.expect_bits("dequantize_4bit", "out", actual, expected, {},  # noqa: E731
                                                            nan_bits=nan_bits)  # fmt: skip
    check(bf(0xFFFF, 0x3F80), (0x7FC0, 0xFFFF))  # the other declared encoding
    check(bf(0xFFC1, 0x3F80), "any")
    for actual, nan_bits in [
        (bf(0xFFFF, 0x3F80), None),  # nothing declared: bits
        (bf(0x7FC1, 0x3F80), (0x7FC0, 0xFFFF)),  # a NaN, but not a declared encoding
        (bf(0x3F80, 0x3F80), "any"),  # a number where the dialect has a NaN
        (bf(0x7FC0, 0x7FC0), "any"),  # a NaN where the dialect has a number
    ]:
        with pytest.raises(Mismatch):
            check(actual, nan_bits)


def test_bnb_cpu_declares_two_nan_encodings_only_for_its_bfloat16_torch_fallback():
    from reflora import nf4
    from reflora.dialects import bnb_cpu

    odd = nf4.quantize(np.ones((3, 33), np.float32), 32)  # odd last dimension: the torch fallback
    even = nf4.quantize(np.ones((3, 32), np.float32), 32)  # the native kernel
    assert not bnb_cpu.uses_native_dequantize(odd.shape) and bnb_cpu.uses_native_dequantize(even.shape)
    assert bnb_cpu.nan_encodings(odd, "bfloat16") == (0x7FC0, 0xFFFF)
    assert bnb_cpu.nan_encodings(odd, "float16") is None
    assert bnb_cpu.nan_encodings(even, "bfloat16") is None


def test_a_fused_absmax_rebuild_fails_unless_declared_and_passes_when_it_is(tmp_path):
    """The reference with its QLoRA base dequantized as bitsandbytes' fused inference GEMM does (the
    double-quant absmax rebuilt in one FMA, ``bnb_cuda.dequantize(fma=True)``): its float64 arithmetic
    leaves no room for a weight off by a float32 step, so the double-quantized cases fail; declared
    with ``fma_absmax``, the bound takes the state's ``fma_dequant_error`` and they pass."""
    import dataclasses

    from reflora import lora
    from reflora.backends.reference import ReferenceBackend
    from reflora.conformance import profiles
    from reflora.dialects import bnb_cuda

    class FusedRebuild(ReferenceBackend):
        declares = False

        def arithmetic(self, op, dtype):
            a = super().arithmetic(op, dtype)
            return dataclasses.replace(a, fma_absmax=True) if self.declares and op.startswith("qlora") else a

        def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
            W = bnb_cuda.dequantize(state, fma=True)
            return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)

        def qlora_backward(self, grad_y, x, state, A, B, scaling, *, dropout_mask=None):
            W = bnb_cuda.dequantize(state, fma=True)
            return lora.backward(grad_y, x, W, A, B, scaling, dropout_mask=dropout_mask)

    select = [f"qlora_{d}[double-quantized base, {t}]" for d in ("forward", "backward")
              for t in ("float32", "float16", "bfloat16")]  # fmt: skip
    prof = profiles.get("ci")
    plain = runner.run_backend(FusedRebuild(), "fused", prof, prof.seed, bundle_dir=tmp_path, select=select)
    failed = plain.by_status("fail")
    assert failed and all(r.id.startswith("qlora_") for r in failed), [r.id for r in plain.results]
    FusedRebuild.declares = True
    declared = runner.run_backend(
        FusedRebuild(), "fused", prof, prof.seed, bundle_dir=tmp_path, select=select
    )
    assert declared.ok and len(declared.by_status("pass")) == len(select), [
        (r.id, r.status, r.message) for r in declared.results if r.status != "pass"
    ]
