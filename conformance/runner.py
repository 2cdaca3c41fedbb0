"""The runner: drives every test of the suite against a backend, outside pytest or inside it.

For a property, hypothesis draws examples under the profile's settings: a fixed seed per test derived
from the run's seed and the test id, no example database, and a provider that ignores which modules
are loaded (:mod:`reflora.conformance.draws`), so a run is reproducible from its seed alone (for one
Hypothesis version). On a failure it shrinks to a minimal example, whose :class:`Mismatch` the runner
catches, saves as an ``.npz`` bundle and turns into a result. A case runs once. Every result is one of

``pass``         every example met its tolerance;
``fail``         a mismatch (message, bundle, replay command);
``declared``     a failure that matches an entry of the backend's deviations file (listed, with reason);
``rejected``     every example was outside the dialect the backend claims (it has no state for those
                 inputs): nothing was computed to compare, and all that was checked is that a
                 quantize_4bit backend rejects them too (accepting them fails). A torchao-shaped test
                 is what a torchao backend computes; the ragged tails torchao cannot quantize are
                 ``rejected``, not ``pass``;
``unsupported``  the backend does not support the op for this dtype (``supports`` gave a reason), or
                 declined every example (NotImplementedError);
``error``        the suite itself could not run the test (a traceback; counts as a failure).

:func:`run` returns a :class:`Report` per backend; :func:`matrix_text`, :func:`markdown` and
:meth:`Report.as_dict` render them. A run passes when no report has a ``fail`` or an ``error``.
"""

from __future__ import annotations

import numbers
import random
import time
import traceback
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from reflora.cli import SEEDS
from reflora.conformance import deviations as _deviations
from reflora.conformance import profiles
from reflora.conformance.bundle import save
from reflora.conformance.dialect import for_backend as dialect_for
from reflora.conformance.draws import seed_only_draws
from reflora.conformance.findings import Findings
from reflora.conformance.mismatch import Declined, Mismatch, Rejected
from reflora.conformance.properties import Context, ProtocolError, _arithmetic, run_check, supported
from reflora.conformance.replay import replay_command
from reflora.conformance.strategies import INPUT_RULES, InputRules
from reflora.conformance.suite import DTYPES, OPS, Test, tests

__all__ = [
    "Report",
    "TestResult",
    "markdown",
    "matrix_text",
    "resolve_seed",
    "run",
    "run_backend",
    "run_test",
    "unmatched",
    "unusable",
]

FAILED = ("fail", "error")


@dataclass
class TestResult:
    """The outcome of one test (see the module docstring for ``status``)."""

    id: str
    op: str
    dtype: str
    kind: str
    status: str
    examples: int = 0
    declined: int = 0
    rejected: int = 0  # examples outside the claimed dialect (Rejected): nothing computed
    seconds: float = 0.0
    message: str = ""
    reason: str = ""
    bundle: str | None = None
    replay: str | None = None
    hypothesis: list[str] = field(default_factory=list)
    deviation: dict | None = None
    output: str = ""  # the output a failure is in ("suite" for an error of the suite itself)
    # The failing example's inputs, for the deviation conditions (deviations.condition); not serialized.
    inputs: Any = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "inputs"}


@dataclass
class Report:
    """Everything one backend's run produced."""

    backend: str
    name: str
    dialect: str
    profile: str
    seed: int
    results: list[TestResult]
    findings: list[dict]
    findings_lines: list[str]
    warnings: list[str]
    seconds: float
    # What the backend declared for each LoRA op it supports: the arithmetic every BOUND tolerance of
    # that op is derived from ("op dtype" -> Arithmetic fields, or why it could not be had).
    arithmetic: dict[str, Any] = field(default_factory=dict)
    # The machine facts the dialect was evaluated with (conformance.dialect.for_backend), as text.
    dialect_options: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(r.status in FAILED for r in self.results)

    @property
    def checked(self) -> bool:
        """Whether any test checked something: a run where every test was unsupported, declined or
        rejected (outside the dialect) compared nothing, and must not read as a pass."""
        return any(r.status in ("pass", "declared") for r in self.results)

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or NOTHING CHECKED (no failure, and no test that checked anything)."""
        return "FAIL" if not self.ok else "PASS" if self.checked else "NOTHING CHECKED"

    def by_status(self, *statuses: str) -> list[TestResult]:
        return [r for r in self.results if r.status in statuses]

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["results"] = [r.as_dict() for r in self.results]
        d["ok"] = self.ok
        d["verdict"] = self.verdict
        d["matrix"] = {op: {dt: _cell(self, op, dt)[0] for dt in DTYPES} for op in OPS}
        return d


def resolve_seed(profile: profiles.Profile, seed: int | None) -> int:
    """The run's seed: the one given, else the profile's, else a fresh random one (printed by callers)."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEEDS:
            # _test_seed folds the seed modulo 2**32: a larger one would draw a smaller one's examples
            raise ValueError(f"a seed is an integer in [0, 2**32), got {seed!r}")
        return int(seed)
    if profile.seed is not None:
        return profile.seed
    return random.SystemRandom().randrange(2**32)


def _test_seed(seed: int, test_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(test_id.encode())) % 2**32


def _settings(profile: profiles.Profile):
    from hypothesis import HealthCheck, Phase, settings

    return settings(
        max_examples=profile.max_examples,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=True,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
    )


def _unsupported(backend: Any, test: Test) -> str | None:
    for op in test.requires:
        reason = supported(backend, op, test.dtype)
        if reason is not None:
            return f"{op}: {reason}"
    return None


def _save(m: Mismatch, ctx: Context, profile: str, seed: int, bundle_dir: Path, notes: list[str]) -> None:
    if m.inputs is None:
        return
    try:
        path = save(m.inputs, bundle_dir, backend=ctx.backend.name, backend_target=ctx.name,
                    dialect=ctx.dialect.name, profile=profile, seed=seed, hypothesis=notes,
                    message=m.headline())  # fmt: skip
    except OSError as exc:  # a full disk must not end the run: the failure is reported without its bundle
        m.unsaved = f"its counterexample bundle could not be saved in {bundle_dir}: {exc}"
        return
    m.bundle = str(path)
    m.replay = replay_command(path, ctx.name)


def run_test(ctx: Context, test: Test, profile: profiles.Profile, seed: int, bundle_dir: Path) -> TestResult:
    """Run one test against ``ctx.backend``; never raises for a backend's failure."""
    result = TestResult(test.id, test.op, test.dtype, test.kind, "pass")
    try:
        reason = _unsupported(ctx.backend, test)
    except ProtocolError as exc:
        result.status, result.output = "fail", "supports()"
        result.message = f"{test.op}: {exc}"
        return result
    if reason:
        result.status, result.reason = "unsupported", reason
        return result
    start = time.perf_counter()
    last: dict[str, Any] = {}
    try:
        if test.kind == "case":
            inputs = test.case_inputs()
            last["inputs"] = inputs
            result.examples = 1
            run_check(ctx, inputs)
        else:
            _run_property(ctx, test, profile, _test_seed(seed, test.id), result, last)
    except Declined as d:
        result.status, result.reason, result.declined = "unsupported", str(d), 1
    except Rejected as r:
        result.status, result.reason, result.rejected = "rejected", str(r), 1
    except Mismatch as m:
        # hypothesis' advice to decorate "your test function" is for its own users: replay instead
        notes = getattr(m, "__notes__", [])
        result.hypothesis = [n for n in notes if "@reproduce_failure" not in n]
        _save(m, ctx, profile.name, seed, bundle_dir, result.hypothesis)
        result.status, result.message, result.bundle, result.replay = "fail", m.message(), m.bundle, m.replay
        result.output, result.inputs = m.output, m.inputs
    except Exception as exc:  # the suite could not run the test: report it, do not hide it
        result.status, result.output = "error", "suite"
        result.message = f"{test.id}: the suite raised {type(exc).__name__}: {exc}\n" + traceback.format_exc()
        if "inputs" in last:
            m = Mismatch(test.op, "suite", None, type(exc).__name__, "no error", "internal error")
            m.inputs = last["inputs"]
            _save(m, ctx, profile.name, seed, bundle_dir, [])
            result.bundle, result.replay = m.bundle, m.replay
            if m.unsaved:
                result.message += f"\nNot saved: {m.unsaved}"
    result.seconds = time.perf_counter() - start
    if result.status == "pass" and result.examples and result.declined + result.rejected == result.examples:
        result.status = "unsupported" if result.declined else "rejected"  # a decline is the backend's word
    return result


def _run_property(ctx: Context, test: Test, profile: profiles.Profile, seed: int, result: TestResult,
                  last: dict) -> None:  # fmt: skip
    from hypothesis import given
    from hypothesis import seed as fix_seed
    from hypothesis import strategies as st

    rules = INPUT_RULES.get(ctx.dialect.name, InputRules())

    @fix_seed(seed)
    @_settings(profile)
    @given(st.data())
    def prop(data) -> None:
        inputs = test.draw_inputs(data, profile, rules)
        last["inputs"] = inputs
        result.examples += 1
        try:
            run_check(ctx, inputs)
        except Declined as d:
            result.declined += 1
            result.reason = str(d)
        except Rejected as r:
            result.rejected += 1
            last["rejected"] = str(r)

    with seed_only_draws():
        prop()
    notes = []
    if result.declined and result.declined + result.rejected < result.examples:
        notes.append(f"{result.declined} of {result.examples} examples declined: {result.reason}")
    if result.rejected and result.declined + result.rejected < result.examples:
        notes.append(f"{result.rejected} of {result.examples} examples outside the dialect (nothing "
                     f"computed), e.g. {last['rejected']}")  # fmt: skip
    if result.rejected and not result.declined:
        result.reason = last["rejected"]
    result.message = "\n".join(notes)


def _declare(results: list[TestResult], entries: list[_deviations.Deviation], backend: Any) -> None:
    """Mark each failure that matches a known deviation as declared (an entry with ``when``: only where
    the backend's condition holds for the failing example's inputs; :func:`deviations.declaring`)."""
    for r in results:
        if r.status in FAILED:
            hit, notes = _deviations.declaring(entries, backend, r.id, r.output, r.message, r.inputs)
            r.message += "".join(f"\n{n}" for n in notes)
            if hit is not None:
                r.status, r.deviation = "declared", hit.as_dict()


def _deviation_warnings(results: list[TestResult], entries: list[_deviations.Deviation]) -> list[str]:
    """Warnings for entries that match no test id of the suite, or only tests that did not fail."""
    warnings = []
    all_ids = [t.id for t in tests()]
    for d in entries:
        if not any(d.matches(i) for i in all_ids):
            warnings.append(f"deviation {d.test!r} ({d.source}) matches no test id of the suite")
            continue
        ran = [r for r in results if d.matches(r.id)]
        hits = sum(d.matches(i) for i in all_ids)
        if hits > len(all_ids) // 2:  # a blanket: it would declare any failure in most of the suite
            warnings.append(
                f"deviation {d.test!r} ({d.source}) matches {hits} of {len(all_ids)} test ids: it "
                "declares any failure there, whatever it is; name the tests it is about"
            )
        # An entry with `when` may declare nothing in a run none of whose failing examples met its condition
        # (the random draws did not reach those inputs): not a sign it is stale. Its committed
        # counterexample (docs/findings) is what shows it still holds.
        declared_here = any(r.status == "declared" and r.deviation == d.as_dict() for r in ran)
        if ran and not d.when and not declared_here:
            failed = [r for r in ran if r.status in FAILED]
            if not failed:
                others = sum(r.status == "declared" for r in ran)
                tail = ", none of which failed"
                if others:
                    tail = f"; {others} failed, all declared by other entries"
                warnings.append(f"deviation {d.test!r} ({d.source}) matched {len(ran)} tests{tail}")
                continue
            # they failed, but not as the entry says: a typo in `output` or `message` shows here
            seen = sorted({r.output for r in failed})
            wants = " and ".join(
                f"{key} {value!r}" for key, value in (("output", d.output), ("message", d.message)) if value
            )
            warnings.append(
                f"deviation {d.test!r} ({d.source}) matched {len(ran)} tests; {len(failed)} failed, none "
                f"with {wants} (their failures are in {', '.join(map(repr, seen))})"
            )
    return warnings


def run_backend(
    backend: Any,
    spec: str,
    profile: profiles.Profile,
    seed: int,
    *,
    bundle_dir: str | Path = "reflora-failures",
    progress: Callable[[str], None] | None = None,
    select: Iterable[str] = (),
    entries: list[_deviations.Deviation] | None = None,
    on_test: Callable[[TestResult, int, int], None] | None = None,
) -> Report:
    """Run the suite against ``backend`` (asked for as ``spec``), with ``profile`` and ``seed``.

    select: test-id patterns (``*`` wildcards); only matching tests run. entries: the known deviations
    (default: the backend's own file). progress: called with a line after each op × dtype.
    on_test: called as ``on_test(result, done, total)`` after each test (a progress bar's hook).
    """
    start = time.perf_counter()
    dialect = dialect_for(backend)
    findings = Findings(dialect)
    ctx = Context(backend, spec, dialect, findings)
    patterns = [_deviations.pattern_regex(p) for p in select]
    chosen = [t for t in tests() if not patterns or any(p.match(t.id) for p in patterns)]
    entries = _deviations.active(backend, _deviations.for_backend(backend) if entries is None else entries)
    say = progress or (lambda line: None)
    say(f"{spec}: dialect {dialect.name}, profile {profile.name}, seed {seed}, {len(chosen)} tests")
    results: list[TestResult] = []
    bundle_dir = Path(bundle_dir)
    for op in OPS:
        for dtype in DTYPES:
            cell = [t for t in chosen if t.op == op and t.dtype == dtype]
            if not cell:
                continue
            t0 = time.perf_counter()
            cell_results = []
            for t in cell:
                cell_results.append(run_test(ctx, t, profile, seed, bundle_dir))
                _declare(cell_results[-1:], entries, backend)
                if on_test is not None:
                    on_test(cell_results[-1], len(results) + len(cell_results), len(chosen))
            results += cell_results
            text, _ = _cell_text(cell_results)
            say(f"  {op:<16} {dtype:<9} {text:<28} {time.perf_counter() - t0:6.1f} s")
    warnings = _deviation_warnings(results, entries)
    if not patterns or any(p.match("quantize_4bit[random, float32]") for p in patterns):
        findings.natural(profile.natural_elements, DTYPES)
    return Report(spec, getattr(backend, "name", spec), dialect.name, profile.name, seed, results,
                  findings.as_list(), findings.lines(), warnings, time.perf_counter() - start,
                  _declared_arithmetic(ctx, {(t.op, t.dtype) for t in chosen}),
                  {k: repr(v) for k, v in dialect.options.items()})  # fmt: skip


def _options_text(report: Report) -> str:
    """ ", host=Host(lanes=16, ...)": the machine facts the dialect was evaluated with, if any."""
    return "".join(f", {k}={v}" for k, v in report.dialect_options.items())


def _declared_arithmetic(ctx: Context, cells: set[tuple[str, str]]) -> dict[str, Any]:
    declared = {}
    for op in OPS:
        for dtype in DTYPES:
            if (op, dtype) not in cells or not op.startswith(("lora", "qlora")):
                continue
            try:
                if supported(ctx.backend, op, dtype) is not None:
                    continue
            except ProtocolError:  # each of its tests already fails for it
                continue
            try:
                declared[f"{op} {dtype}"] = asdict(_arithmetic(ctx, op, dtype))
            except Mismatch as m:
                declared[f"{op} {dtype}"] = m.message().splitlines()[0]
    return declared


def _arithmetic_lines(report: Report) -> list[str]:
    """One line per distinct declaration, with the cells that share it."""
    groups: dict[str, list[str]] = {}
    broken: dict[str, list[str]] = {}  # arithmetic() failed: the error, not a declaration
    for cell, a in report.arithmetic.items():
        if isinstance(a, str):
            broken.setdefault(a, []).append(cell)
        else:
            groups.setdefault(", ".join(f"{k} {v}" for k, v in a.items()), []).append(cell)
    return [f"{text}: {'; '.join(cells)}" for text, cells in groups.items()] + [
        f"{'; '.join(cells)}: nothing usable declared ({error})" for error, cells in broken.items()
    ]


def unusable(backend: Any, entries: list[_deviations.Deviation] | None = None) -> str | None:
    """Why the suite cannot run ``backend`` (an unknown dialect, a deviations file that is missing or
    malformed, an entry naming a condition the backend does not define), found before any test runs;
    None when it can. entries: the deviations to use instead of the backend's own file."""
    try:
        dialect_for(backend)
        _deviations.active(backend, _deviations.for_backend(backend) if entries is None else entries)
    except (ValueError, OSError) as exc:  # DeviationsError is a ValueError
        return f"{type(exc).__name__}: {exc}"
    return None


def unmatched(select: Iterable[str]) -> list[str]:
    """The patterns of ``select`` that match no test of the suite (a typo would otherwise run nothing
    and pass)."""
    ids = [t.id for t in tests()]
    return [p for p in select if not any(_deviations.pattern_regex(p).match(i) for i in ids)]


def run(
    specs: list[str] | None = None,
    profile: str = "ci",
    seed: int | None = None,
    **kwargs: Any,
) -> tuple[list[Report], list[tuple[str, str]], int]:
    """Run the suite against the backends named in ``specs`` (registered names or module:attr; default:
    every registered backend available here). Returns (reports, unavailable (name, reason), seed).
    An unknown or broken backend named explicitly raises :class:`reflora.backends.BackendError`.
    kwargs: those of :func:`run_backend`, and ``on_backend``, called with each backend's spec before
    its tests run."""
    from reflora import backends

    prof = profiles.get(profile)
    seed = resolve_seed(prof, seed)
    unavailable: list[tuple[str, str]] = []
    named = set(specs or ())
    if not specs:
        specs = []
        for status in backends.status():
            (
                specs.append(status.name)
                if status.available
                else unavailable.append((status.name, status.reason))
            )
    chosen = []
    on_backend = kwargs.pop("on_backend", None)  # called with each backend's spec before it runs
    entries = kwargs.get("entries")
    for spec in specs:
        backend = backends.get(spec)  # raises, listing what is installed
        problem = unusable(backend, entries)
        if problem and spec in named:
            raise backends.BackendError(f"backend {spec!r} cannot be run: {problem}")
        if problem:
            unavailable.append((spec, problem))
        else:
            chosen.append((spec, backend))
    reports = []
    for spec, b in chosen:
        if on_backend is not None:
            on_backend(spec)
        reports.append(run_backend(b, spec, prof, seed, **kwargs))
    return reports, unavailable, seed


# ---- Rendering -------------------------------------------------------------------------------------------


def _cell_text(results: list[TestResult]) -> tuple[str, str]:
    """(text, unsupported reason) for one op × dtype."""
    if not results:
        return "-", ""
    unsupported = [r for r in results if r.status == "unsupported"]
    if len(unsupported) == len(results):
        return "unsupported", unsupported[0].reason
    rejected = sum(r.status == "rejected" for r in results)
    n = len(results) - len(unsupported) - rejected
    failed = sum(r.status in FAILED for r in results)
    declared = sum(r.status == "declared" for r in results)
    if failed:
        return f"FAIL {failed} of {n}", ""
    parts = [f"pass {n - declared}/{n}"] if n else []
    if declared:
        parts.append(f"{declared} declared")
    if rejected:
        parts.append(f"{rejected} rejected")
    text = ", ".join(parts)
    if unsupported:  # why, as for a wholly unsupported cell (the first reason; the JSON has each)
        return f"{text}, {len(unsupported)} unsupported", unsupported[0].reason
    return text, ""


def _cell(report: Report, op: str, dtype: str) -> tuple[str, str]:
    return _cell_text([r for r in report.results if r.op == op and r.dtype == dtype])


def _matrix(report: Report) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The op × dtype cells, each reason replaced by a note number: ([(op, cells)], notes), every
    reason once in ``notes``."""
    rows: list[tuple[str, list[str]]] = []
    notes: list[str] = []
    for op in OPS:
        cells = []
        for dtype in DTYPES:
            text, reason = _cell(report, op, dtype)
            if reason:
                if reason not in notes:
                    notes.append(reason)
                text += f" [{notes.index(reason) + 1}]"
            cells.append(text)
        rows.append((op, cells))
    return rows, notes


def _declared_groups(report: Report) -> list[tuple[str, str, list[TestResult]]]:
    """The declared failures grouped by deviation entry: [(reason, upstream or "", results)]."""
    groups: dict[tuple[str, str], list[TestResult]] = {}
    for r in report.by_status("declared"):
        groups.setdefault((r.deviation["reason"], r.deviation.get("upstream") or ""), []).append(r)
    return [(reason, upstream, results) for (reason, upstream), results in groups.items()]


def matrix_text(report: Report) -> str:
    """The support matrix (op × dtype), failures, declared deviations, warnings and findings, as text."""
    verdict = report.verdict
    rows, notes = _matrix(report)
    # a column is as wide as its longest cell and two spaces, at least 30 (a long cell must not run on)
    width = max([30] + [len(text) + 2 for _, cells in rows for text in cells])
    lines = [
        f"{report.backend} (dialect {report.dialect}{_options_text(report)}): {verdict}  [profile "
        f"{report.profile}, seed {report.seed}, {len(report.results)} tests, {report.seconds:.1f} s]",
        (f"  {'op':<16}" + "".join(f"{d:<{width}}" for d in DTYPES)).rstrip(),
    ]
    lines += [(f"  {op:<16}" + "".join(f"{text:<{width}}" for text in cells)).rstrip() for op, cells in rows]
    lines += [f"  [{i + 1}] {reason}" for i, reason in enumerate(notes)]
    for r in report.by_status("fail", "error"):
        lines += ["", f"{r.status.upper()} {r.id}", r.message]
    groups = _declared_groups(report)  # one reason, printed once, above its tests
    if groups:
        lines += ["", "Declared deviations (known, not counted as failures):"]
        for reason, upstream, results in groups:
            lines.append(f"  {reason}" + (f" ({upstream})" if upstream else ""))
            for r in results:
                lines.append(f"    {r.id}: " + r.message.splitlines()[0])
    rejected = report.by_status("rejected")
    if rejected:
        lines += ["", f"Rejected: {len(rejected)} tests outside dialect {report.dialect} (it has no state "
                  "for their inputs, so nothing was computed to compare; a quantize_4bit backend must "
                  f"reject them too), e.g. {rejected[0].id}: {rejected[0].reason}"]  # fmt: skip
    partial = [r for r in report.results if r.status == "pass" and (r.declined or r.rejected)]
    if partial:
        lines += ["", "Examples the backend declined (NotImplementedError) or outside the dialect:"]
        lines += [f"  {r.id}: " + r.message.replace("\n", "; ") for r in partial]
    if report.warnings:
        lines += ["", *(f"WARNING: {w}" for w in report.warnings)]
    if report.arithmetic:
        lines += ["", "Declared arithmetic (what the BOUND tolerances are derived from):"]
        lines += [f"  {line}" for line in _arithmetic_lines(report)]
    lines += ["", f"Findings: dialect {report.dialect} vs canonical"]
    lines += [f"  {line}" for line in report.findings_lines] or ["  (no draws)"]
    return "\n".join(lines)


def markdown(reports: list[Report], unavailable: list[tuple[str, str]], seed: int, profile: str) -> str:
    """All reports as one Markdown document (``reflora conform --markdown``)."""
    out = ["# reflora conform", "", f"Profile `{profile}`, seed {seed}.", ""]
    for name, reason in unavailable:
        out.append(f"- `{name}`: unavailable here: {reason}")
    for rep in reports:
        out += ["", f"## `{rep.backend}` (dialect `{rep.dialect}`): {rep.verdict}", "",
                f"{len(rep.results)} tests in {rep.seconds:.1f} s.", "",
                "| op | " + " | ".join(DTYPES) + " |", "|---|" + "---|" * len(DTYPES)]  # fmt: skip
        rows, notes = _matrix(rep)  # each reason once, as a numbered note under the table
        out += [f"| {op} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for op, cells in rows]
        if notes:
            out += ["", *(f"[{i + 1}] {reason}  " for i, reason in enumerate(notes))]
        failures = rep.by_status("fail", "error")
        if failures:
            out += ["", "### Failures"]
            for r in failures:
                out += ["", f"#### `{r.id}`", "", "```text", r.message, "```"]
        groups = _declared_groups(rep)
        if groups:
            out += ["", "### Declared deviations"]
            for reason, upstream, results in groups:
                out += ["", reason + (f" ({upstream})" if upstream else ""), ""]
                out += [f"- `{r.id}`" for r in results]
        if rep.warnings:
            out += ["", "### Warnings", "", *(f"- {w}" for w in rep.warnings)]
        if rep.arithmetic:
            out += ["", "### Declared arithmetic", "", *(f"- {line}" for line in _arithmetic_lines(rep))]
        out += ["", "### Findings", ""]
        if rep.findings:
            out += ["| sample | dtype | codes differ | rate (95% CI) | draws differing | scales differ "
                    "| max abs Δ (of absmax) | shape not the state's |",
                    "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for f in rep.findings:
                lo, hi = f["code_rate_95"]
                out.append(
                    f"| {f['sample']} | {f['dtype']} | {f['codes_differing']}/{f['elements']} | "
                    f"{f['code_rate']:.3g} [{lo:.2g}, {hi:.2g}] | {f['draws_differing']}/{f['draws']} | "
                    f"{f['scales_differing']}/{f['blocks']} | {f['max_abs_difference']:.3g} "
                    f"({f['max_rel_to_absmax']:.3g}) | {f['shapes_differing']}/{f['draws']}"
                    + (f" ({', '.join(f['shape_examples'])})" if f["shape_examples"] else "")
                    + " |"
                )
        else:
            out += rep.findings_lines
    return "\n".join(out) + "\n"
