"""The conformance suite as pytest tests: ``pytest --pyargs reflora.conformance --reflora-backend NAME``.

One pytest item per backend and test id (``test_conformance[reference-quantize_4bit[random, float32]]``),
each run by the same :func:`reflora.conformance.runner.run_test` as ``reflora conform``, so a failure
prints the same message, bundle and replay command. A test the backend does not support is skipped
with its reason; a failure its deviations file declares is an expected failure (xfail) with the
reason; a backend that is registered but unavailable here is skipped, not failed. The options come from
the plug-in :mod:`reflora.conformance.pytest_plugin` (``--reflora-backend``, ``--reflora-profile``,
``--reflora-seed``, ``--reflora-bundle-dir``, ``--reflora-select``, ``--reflora-deviations``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reflora import backends
from reflora.conformance import deviations, profiles, runner, suite
from reflora.conformance.dialect import for_backend as dialect_for
from reflora.conformance.properties import Context
from reflora.conformance.pytest_plugin import RESULTS, SEED

_CONTEXTS: dict[str, tuple[Context, list]] = {}


def _backends(config: pytest.Config) -> list[tuple[str, str | None]]:
    """(spec, reason it cannot run or None) for each backend the session asks for."""
    specs = config.getoption("reflora_backend", default=None)
    if specs:
        for spec in specs:
            try:
                problem = runner.unusable(backends.get(spec))
            except backends.BackendError as exc:
                raise pytest.UsageError(f"--reflora-backend {spec}: {exc}") from None
            if problem:
                raise pytest.UsageError(f"--reflora-backend {spec}: cannot be run: {problem}")
        return [(spec, None) for spec in specs]
    rows = []
    for s in backends.status():
        reason = s.reason if not s.available else runner.unusable(backends.get(s.name))
        rows.append((s.name, reason))
    return rows


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_test" not in metafunc.fixturenames:
        return
    select = metafunc.config.getoption("reflora_select", default=None) or []
    missing = runner.unmatched(select)
    if missing:
        raise pytest.UsageError(f"--reflora-select {missing[0]!r} matches no test id of the suite")
    patterns = [deviations.pattern_regex(p) for p in select]
    chosen = [t for t in suite.tests() if not patterns or any(p.match(t.id) for p in patterns)]
    path = metafunc.config.getoption("reflora_deviations", default=None)
    if path:  # a bad file is one usage error at collection, not a failure in every test
        try:
            deviations.load(path)
        except deviations.DeviationsError as exc:
            raise pytest.UsageError(f"--reflora-deviations {path}: {exc}") from None
    params = []
    for spec, reason in _backends(metafunc.config):
        marks = [pytest.mark.skip(reason=f"backend {spec} is unavailable here: {reason}")] if reason else []
        params += [pytest.param((spec, t), id=f"{spec}-{t.id}", marks=marks) for t in chosen]
    metafunc.parametrize("conformance_test", params)


def _context(config: pytest.Config, spec: str) -> tuple[Context, list]:
    if spec not in _CONTEXTS:
        backend = backends.get(spec)
        ctx = Context(backend, spec, dialect_for(backend), None)
        path = config.getoption("reflora_deviations", default=None)
        try:
            listed = deviations.load(path) if path else deviations.for_backend(backend)
            entries = deviations.active(backend, listed)
        except deviations.DeviationsError as exc:
            raise pytest.UsageError(f"--reflora-backend {spec}: {exc}") from None
        _CONTEXTS[spec] = (ctx, entries)
        config.stash[RESULTS][spec] = (entries, [])
    return _CONTEXTS[spec]


def test_conformance(conformance_test, request: pytest.FixtureRequest) -> None:
    spec, test = conformance_test
    config = request.config
    ctx, entries = _context(config, spec)
    profile = profiles.get(config.getoption("reflora_profile"))
    bundle_dir = Path(config.getoption("reflora_bundle_dir"))
    result = runner.run_test(ctx, test, profile, config.stash[SEED], bundle_dir)
    runner._declare([result], entries, ctx.backend)
    config.stash[RESULTS][spec][1].append(result)
    if result.status == "unsupported":
        pytest.skip(f"{spec}: {result.reason}")
    if result.status == "rejected":  # outside the backend's dialect: nothing was computed to compare
        pytest.skip(f"{spec}: rejected: {result.reason}")
    if result.status == "declared":
        d = result.deviation
        up = f" ({d['upstream']})" if d.get("upstream") else ""
        pytest.xfail(f"declared deviation: {d['reason']}{up}; {result.message.splitlines()[0]}")
    if result.status in runner.FAILED:
        pytest.fail(result.message, pytrace=False)
