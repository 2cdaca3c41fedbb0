"""Proof that the suite can fail: every planted bug in tests/mutants must be killed by the ``ci`` profile,
with a readable message, and a saved failure must replay.

Each mutant is run against the tests that exercise the ops it overrides (the others are the reference's
own code, which tests/test_conformance_reference.py holds to 100%). A mutant is *killed* when at least
one test fails; the kill rate is printed (``-s``) and must be 100%.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mutants import MUTANTS

from reflora import cli
from reflora.backends.protocol import OPS
from reflora.backends.reference import ReferenceBackend
from reflora.conformance import profiles, runner, suite
from reflora.conformance.replay import replay

# The bugs issue #3 asks the suite to catch, each with the mutant that plants it.
REQUIRED = {
    "nibble order": "NibbleOrder",
    "tie direction": "TiesUp",
    "absmax precision": "AbsmaxBfloat16",
    "dequant rounding": "DequantTruncates",
    "a ragged-tail error": "RaggedTail",
    "a bug only at large blocksizes": "LargeBlocks",
    "NaN accepted": "AcceptsNaN",
    "missing scaling in a LoRA gradient": "GradBNoScaling",
    "dropout applied to the base path": "DropoutOnBase",
    "a bug only at rank 1": "RankOneDropsAdapter",
    "a bug only at odd dimensions": "OddInFeatures",
    "QLoRA grad_x missing the low-rank path": "QLoRAGradXBaseOnly",
    "double-quant reconstruction drift": "DQDrift",
}

REPLAYED = ["TiesUp", "DQDrift", "GradBNoScaling", "QLoRAGradXBaseOnly", "AcceptsNaN"]

# Mutants whose bug only shows on a special case: the case that must catch it (a random draw may too).
CAUGHT_BY_CASE = {
    "TiesUp": "exactly at threshold",
    "LargeBlocks": "blocksize 4096",
    "RankOneDropsAdapter": "rank 1",
    "OddInFeatures": "odd and prime dimensions",
    "AcceptsNaN": "NaN weight -> error",
    "MergeFanInIgnored": "fan_in_fan_out, square W",
    "QLoRABaseSkipsStateDtype": "base weight in bfloat16",
    "QLoRABackwardBase16Bit": "one-hot rows, B = 0",
    "FlushingSkipsTinyGradients": "tiny values, products normal in float32",
    "QLoRARankTile64": "rank 65",
    "MergeRankTile64": "rank 65",
    "SplitKTail": "in 1031 (prime)",
    "FourDimX": "4-D x",
    "WeightGradRowCap": "4099 rows",
    "GradYAssumedContiguous": "transposed grad_y",
    "AdapterAssumedContiguous": "every other row of B",
    "DenseRowsAssumed": "row-padded x",
    "QuantizeDenseRowsAssumed": "row-padded view, NaN in the padding",
    "DequantSaturates": "past its largest -> inf",
    "ZeroAsNegativeZero": "all-zero block -> +0.0",
    "NestedGroups256": "in groups of",
}

HEADLINE = re.compile(
    r"^(?P<op>\w+): (?P<output>[\w.']+)(?P<index>\[[\d, ]+\])? = (?P<actual>.+), expected (?P<exp>.+) \("
)


def overridden_ops(cls: type) -> tuple[str, ...]:
    """The ops a mutant defines differently from the reference backend."""
    return tuple(op for op in OPS if getattr(cls, op) is not getattr(ReferenceBackend, op))


def selection(ops: tuple[str, ...]) -> list[str]:
    """The ids of every test that calls one of ``ops``."""
    return [t.id for t in suite.tests() if set(t.requires) & set(ops)]


_REPORTS: dict[str, runner.Report] = {}


def report_for(cls: type, bundle_dir: Path) -> runner.Report:
    """The ci report of one mutant (run once per session)."""
    if cls.__name__ not in _REPORTS:
        prof = profiles.get("ci")
        _REPORTS[cls.__name__] = runner.run_backend(
            cls(), f"mutants:{cls.__name__}", prof, prof.seed, bundle_dir=bundle_dir,
            select=selection(overridden_ops(cls)), entries=[],
        )  # fmt: skip
    return _REPORTS[cls.__name__]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


def test_the_mutants_plant_every_bug_the_issue_lists():
    names = {m.__name__ for m in MUTANTS}
    assert set(REQUIRED.values()) <= names
    for m in MUTANTS:
        assert overridden_ops(m) == m.ops, f"{m.__name__} declares {m.ops}, overrides {overridden_ops(m)}"
        assert m.bug and m.name.startswith("mutant-")


def _readable(message: str, spec: str) -> bool:
    """A message a person can act on: op, output, both values, context, bundle and the replay line."""
    first = message.splitlines()[0]
    return bool(
        HEADLINE.match(first)
        and f"backend={spec}" in message
        and "dtype=" in message
        and ".shape=" in message
        and re.search(rf"^Reproduce: reflora replay \S+\.npz --backend {re.escape(spec)}$", message, re.M)
    )


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.__name__)
def test_ci_kills_the_mutant_with_a_readable_message(mutant, bundles):
    rep = report_for(mutant, bundles)
    spec = f"mutants:{mutant.__name__}"
    failures = rep.by_status("fail")
    assert failures, f"{mutant.__name__} ({mutant.bug}) survived the ci profile"
    assert not rep.by_status("error"), rep.by_status("error")[0].message
    for r in failures:
        assert _readable(r.message, spec), r.message
        assert Path(r.bundle).is_file()
        assert r.replay == f"reflora replay {r.bundle} --backend {spec}"
    # Where the bug is in values, the message carries numpy.testing's summary with an index.
    if mutant.__name__ == "ScratchInputs":  # caught by the write itself, before any value is compared
        assert any(re.match(r"lora_forward: B = written in place \(first at \[", r.message) for r in failures)
    elif mutant.__name__ != "AcceptsNaN":
        full = [r for r in failures if "Mismatched elements: " in r.message]
        assert full, failures[0].message
        m = full[0].message
        scalar = "Mismatched elements: 1 / 1 (" in m and "at []" in m  # a 0-d output: the DQ offset
        assert HEADLINE.match(m).group("index") or scalar, m
        assert re.search(r"^Mismatched elements: \d+ / \d+ \(", m, re.M)
        if not HEADLINE.match(m).group("actual").startswith("nan"):  # NaN read from a view's padding
            assert re.search(r"^Max absolute difference: \S+ at \[", m, re.M)
            if not re.search(r"^Max absolute difference: inf ", m, re.M):  # inf / inf: no relative one
                assert re.search(r"^Max relative difference: \S+ at \[", m, re.M)
    else:  # the bad element itself: where it is and what it was
        assert any(r.message.startswith("quantize_4bit: x[4, 37] = nan (accepted") for r in failures)
    if mutant.__name__ in CAUGHT_BY_CASE:
        assert any(CAUGHT_BY_CASE[mutant.__name__] in r.id for r in failures), [r.id for r in failures]


@pytest.mark.slow
def test_kill_rate_is_100_percent(bundles, capsys):
    killed = [m.__name__ for m in MUTANTS if report_for(m, bundles).by_status("fail")]
    with capsys.disabled():
        print(f"\nmutation kill rate (ci profile, seed 0): {len(killed)}/{len(MUTANTS)} planted bugs caught")
    assert len(killed) == len(MUTANTS), sorted({m.__name__ for m in MUTANTS} - set(killed))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutant", ["TiesUp", "DQDrift", "GradBNoScaling", "QLoRAGradXBaseOnly", "AcceptsNaN"]
)
def test_a_saved_bundle_replays_the_failure_and_passes_on_reference(mutant, bundles, capsys):
    cls = next(m for m in MUTANTS if m.__name__ == mutant)
    failure = report_for(cls, bundles).by_status("fail")[0]
    again = replay(failure.bundle)  # against the backend it was recorded against: the mutant
    assert again.status == "fail" and again.backend == f"mutants:{mutant}"
    assert again.message.splitlines()[0] == failure.message.splitlines()[0]
    assert again.message == failure.message  # same message, same bundle line, same replay command
    assert cli.main(["replay", failure.bundle]) == 1
    out = capsys.readouterr().out
    assert f"FAIL: {failure.message}" in out and f"recorded against mutants:{mutant}" in out
    assert replay(failure.bundle, "reference").ok
    assert cli.main(["replay", failure.bundle, "--backend", "reference"]) == 0
    assert f"PASS: {failure.id}: reference meets the check" in capsys.readouterr().out
