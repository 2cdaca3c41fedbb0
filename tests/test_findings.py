"""The counterexamples docs/findings.md cites are committed bundles (docs/findings/*.npz): each still
fails against the library it was recorded against, as the document says, and the oracle passes it.
When a library fixes one, this test fails and the finding must be updated."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflora import backends
from reflora.conformance import deviations
from reflora.conformance.bundle import load
from reflora.conformance.replay import replay

FINDINGS = Path(__file__).resolve().parent.parent / "docs" / "findings"
BUNDLES = sorted(FINDINGS.glob("*.npz"))
# Findings of one kind of machine: the backend's deviation condition (a deviations file's `when`) that
# says whether this machine is one. Elsewhere the library takes another path and the bundle passes.
ON_MACHINE = {"bitsandbytes-avx512-misindexed-scales.npz": "avx512_misindexed"}


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
    condition = ON_MACHINE.get(bundle.name)
    if condition and not deviations.condition(backends.get(name), condition):
        pytest.skip(f"a finding of another machine ({name}'s condition {condition!r} cannot hold here)")
    recorded = load(bundle)[1]["dialect"]
    if row.dialect != recorded:  # e.g. bitsandbytes on a CUDA machine takes its CUDA path (bnb-cuda)
        pytest.skip(f"recorded against {name}'s {recorded} path; here it runs as {row.dialect}")
    result = replay(bundle)
    assert result.backend == name and result.status == "fail", result.message
    assert result.declared is not None  # each finding is a declared deviation, and replay says so
    assert replay(bundle, "reference").status == "pass"


def test_replay_prints_the_declaration(capsys):
    from reflora import cli

    bundle = FINDINGS / "torchao-nan-accepted.npz"
    if not any(s.name == "torchao" and s.available for s in backends.status()):
        pytest.skip("torchao is not available")
    assert cli.main(["replay", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "\nDeclared: a known deviation of torchao (" in out and "torchao quantizes NaN" in out


def test_torch_linear_rounds_the_bias_by_the_layout_of_x():
    """docs/findings.md, torch: F.linear adds the bias after rounding x Wᵀ for a non-contiguous 3-D x,
    in the same rounding for a contiguous one. When torch changes this, update the finding (the
    bound, docs/bounds.md §6, covers both either way)."""
    torch = pytest.importorskip("torch")
    W = torch.tensor([[0.90234375]], dtype=torch.bfloat16)
    bias = torch.tensor([-0.921875], dtype=torch.bfloat16)
    x = torch.full((2, 3, 1), -1.2421875, dtype=torch.bfloat16)
    xt = x.transpose(0, 1)  # (3, 2, 1), the same values, not contiguous
    assert x.is_contiguous() and not xt.is_contiguous()
    assert torch.nn.functional.linear(x, W, bias).flatten().tolist() == [-2.046875] * 6
    assert torch.nn.functional.linear(xt, W, bias).flatten().tolist() == [-2.03125] * 6
