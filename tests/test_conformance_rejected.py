"""The ``rejected`` status: a test whose inputs are outside the claimed dialect compared nothing, and is
reported as such, not as a pass (conformance/runner.py).

The backend here is the torchao dialect itself (tests/odd_backends.py): it takes NF4 with double
quantization in whole groups of 256 blocks and rejects everything else, as torchao does.
"""

from __future__ import annotations

import odd_backends
import pytest

from reflora.conformance import profiles, runner

pytestmark = pytest.mark.filterwarnings("ignore")

RAGGED = "quantize_4bit[ragged tail, float32]"
NAN_ODD_SHAPE = "quantize_4bit[NaN weight -> error, float32]"  # 6 x 50: torchao rejects the shape anyway
NAN_TAKEN_SHAPE = "quantize_4bit[NaN weight, double quant, 128 x 128 -> error, float32]"
TAKEN = "quantize_4bit[all-zero block, torchao-shaped, float32]"
QLORA_ODD = "qlora_forward[rank 1, float32]"  # a 10 x 24 base, single quantization
QLORA_TAKEN = "qlora_forward[3-D transposed x, mask, torchao-shaped base, float32]"
DEQUANT = "dequantize_4bit[random, float32]"


def _run(backend, select, tmp_path) -> runner.Report:
    prof = profiles.get("ci")
    return runner.run_backend(backend, backend.name, prof, prof.seed, bundle_dir=tmp_path, select=select,
                              entries=[])  # fmt: skip


def test_inputs_outside_the_dialect_are_rejected_not_passed(tmp_path):
    selected = [RAGGED, NAN_ODD_SHAPE, TAKEN, QLORA_ODD, QLORA_TAKEN]
    rep = _run(odd_backends.TorchaoDialect(), selected, tmp_path)
    status = {r.id: r for r in rep.results}
    assert {i: r.status for i, r in status.items()} == {RAGGED: "rejected", NAN_ODD_SHAPE: "rejected",
                                                        QLORA_ODD: "rejected", TAKEN: "pass",
                                                        QLORA_TAKEN: "pass"}  # fmt: skip
    assert "dialect torchao has no state for these inputs" in status[RAGGED].reason
    assert "the backend rejects them too" in status[RAGGED].reason
    # the NaN case: torchao's error is about the 6 x 50 shape, which the dialect rejects without the NaN too
    assert "nor for the same x with nan made 0" in status[NAN_ODD_SHAPE].reason
    assert "(the base weight)" in status[QLORA_ODD].reason
    assert rep.ok and rep.verdict == "PASS"
    text = runner.matrix_text(rep)
    assert "Rejected: 3 tests outside dialect torchao" in text
    cells = [line for line in text.splitlines() if line.strip().startswith("quantize_4bit")]
    assert "pass 1/1, 2 rejected" in cells[0], cells


def test_a_property_reports_how_many_examples_were_outside_the_dialect(tmp_path):
    (r,) = _run(odd_backends.TorchaoDialect(), [DEQUANT], tmp_path).results
    assert r.status == "pass" and 0 < r.rejected < r.examples, (r.status, r.rejected, r.examples)
    assert f"{r.rejected} of {r.examples} examples outside the dialect (nothing computed)" in r.message


def test_a_backend_accepting_what_its_dialect_rejects_fails(tmp_path):
    (r,) = _run(odd_backends.TorchaoDialectAcceptsAll(), [RAGGED], tmp_path).results
    assert r.status == "fail"
    assert "expected an error, as dialect torchao raises ValueError" in r.message.splitlines()[0]


def test_a_nan_in_a_shape_the_dialect_takes_is_still_held_to_raise(tmp_path):
    """The dialect quantizes NaN as torchao does, so the backend accepting it fails the contract."""
    (r,) = _run(odd_backends.TorchaoDialect(), [NAN_TAKEN_SHAPE], tmp_path).results
    assert r.status == "fail"
    assert "x[77, 5] = nan (accepted: a state was returned)" in r.message


def test_a_run_where_every_test_was_rejected_checked_nothing(tmp_path):
    rep = _run(odd_backends.TorchaoDialect(), [RAGGED, QLORA_ODD], tmp_path)
    assert [r.status for r in rep.results] == ["rejected", "rejected"]
    assert rep.ok and not rep.checked and rep.verdict == "NOTHING CHECKED"


def test_examples_declined_or_outside_the_dialect_are_unsupported_not_rejected(tmp_path):
    (r,) = _run(odd_backends.TorchaoDialectDeclinesDequantize(), [DEQUANT], tmp_path).results
    assert 0 < r.rejected < r.examples and r.declined == r.examples - r.rejected, (r.rejected, r.declined)
    assert r.status == "unsupported"
    assert "NotImplementedError: no dequantization here" in r.reason
