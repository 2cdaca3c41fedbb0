"""The counterexamples docs/findings.md cites are committed bundles (docs/findings/*.npz): each still
fails against the library it was recorded against, as the document says, and the oracle passes it.
When a library fixes one, this test fails and the finding must be updated."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflora import backends
from reflora.conformance.replay import replay

FINDINGS = Path(__file__).resolve().parent.parent / "docs" / "findings"
BUNDLES = sorted(FINDINGS.glob("*.npz"))


def test_every_bundle_is_cited_in_the_findings():
    text = (FINDINGS.parent / "findings.md").read_text()
    assert BUNDLES
    for bundle in BUNDLES:
        assert f"reflora replay docs/findings/{bundle.name} --backend" in text, bundle.name


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.stem for b in BUNDLES])
def test_the_library_still_deviates_and_the_oracle_does_not(bundle):
    name = bundle.name.split("-")[0]
    (row,) = [s for s in backends.status() if s.name == name]
    if not row.available:
        pytest.skip(f"{name}: {row.reason}")
    result = replay(bundle)
    assert result.backend == name and result.status == "fail", result.message
    assert replay(bundle, "reference").status == "pass"
