"""Known-deviation files: a declared failure is listed with its reason, not counted; an entry that
matches nothing, or only passing tests, draws a warning; a malformed file is an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from mutants import TiesUp

from reflora import cli
from reflora.conformance import deviations, profiles, runner

TIES = "quantize_4bit[nf4 x exactly at threshold *, float32]"
SELECT = ["quantize_4bit[nf4 x exactly at threshold *", "quantize_4bit[one row, *"]


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deviations.toml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = f"""
# the mutant's known bug, declared
[[deviation]]
test = "{TIES}"
reason = "rounds ties up"
upstream = "https://example.org/issue/1"

[[deviation]]
test = "quantize_4bit[no such case, *]"
reason = "stale entry"

[[deviation]]
test = "quantize_4bit[one row, *]"
reason = "fixed long ago"
"""


def _run(backend, entries, tmp_path) -> runner.Report:
    prof = profiles.get("ci")
    return runner.run_backend(
        backend, "mutants:TiesUp", prof, 0, bundle_dir=tmp_path, select=SELECT, entries=entries
    )


def test_declared_failures_are_listed_not_counted_and_stale_entries_warn(tmp_path):
    entries = deviations.load(_file(tmp_path, GOOD))
    assert [e.test for e in entries] == [TIES, "quantize_4bit[no such case, *]", "quantize_4bit[one row, *]"]
    undeclared = _run(TiesUp(), [], tmp_path)
    assert not undeclared.ok
    failed = {r.id for r in undeclared.by_status("fail")}
    rep = _run(TiesUp(), entries, tmp_path)
    assert rep.ok  # every failure is declared
    assert {r.id for r in rep.by_status("declared")} == failed
    assert all(r.deviation["reason"] == "rounds ties up" for r in rep.by_status("declared"))
    where = tmp_path / "deviations.toml"
    assert rep.warnings == [
        f"deviation 'quantize_4bit[no such case, *]' ({where}) matches no test id of the suite",
        f"deviation 'quantize_4bit[one row, *]' ({where}) matched 3 tests, none of which failed",
    ]
    text = runner.matrix_text(rep)
    assert "Declared deviations (known, not counted as failures):" in text
    assert "rounds ties up (https://example.org/issue/1)" in text
    n = sum(r.dtype == "float32" for r in rep.results)
    assert f"pass {n - len(failed)}/{n}, {len(failed)} declared" in text
    assert "WARNING: deviation 'quantize_4bit[no such case, *]'" in text
    md = runner.markdown([rep], [], 0, "ci")
    assert "### Declared deviations" in md and "### Warnings" in md


def test_a_failure_the_file_does_not_name_still_fails(tmp_path):
    only16 = TIES.replace("float32", "float16")  # the mutant fails in float32
    entries = deviations.load(_file(tmp_path, f'[[deviation]]\ntest = "{only16}"\nreason = "r"\n'))
    rep = _run(TiesUp(), entries, tmp_path)
    assert not rep.ok and not rep.by_status("declared")


def test_the_backend_owns_its_file(tmp_path):
    backend = TiesUp()
    backend.deviations = _file(tmp_path, GOOD)
    rep = runner.run_backend(
        backend, "mutants:TiesUp", profiles.get("ci"), 0, bundle_dir=tmp_path, select=SELECT
    )
    assert rep.ok and rep.by_status("declared")


def test_conform_takes_a_deviations_file_and_exits_0_when_all_failures_are_declared(tmp_path, capsys):
    args = ["conform", "--backend", "mutants:TiesUp", "--bundle-dir", str(tmp_path)]
    for pattern in SELECT:
        args += ["-k", pattern]
    assert cli.main([*args, "--deviations", str(_file(tmp_path, GOOD))]) == 0
    out = capsys.readouterr().out
    assert "Declared deviations" in out and "WARNING: deviation 'quantize_4bit[one row, *]'" in out


@pytest.mark.parametrize(
    "text, error",
    [
        ('[[deviation]]\ntset = "x[*]"\nreason = "r"\n', "unknown keys ['tset']"),
        ('[[deviation]]\ntest = "x[*]"\n', "'reason' must be a non-empty string"),
        ('[deviation]\ntest = "x[*]"\nreason = "r"\n', "array of tables"),
        ('[[deviations]]\ntest = "x"\n', "unknown top-level keys"),
        ("[[deviation]\n", "deviations.toml"),
    ],
)
def test_a_malformed_file_is_an_error_naming_file_and_entry(tmp_path, capsys, text, error):
    path = _file(tmp_path, text)
    with pytest.raises(deviations.DeviationsError, match=r"deviations\.toml") as exc:
        deviations.load(path)
    assert error in str(exc.value)
    assert cli.main(["conform", "--backend", "reference", "--deviations", str(path)]) == 2
    assert error in capsys.readouterr().err


def test_patterns_are_literal_but_for_the_star():
    match = deviations.pattern_regex("quantize_4bit[random, *]").match
    assert match("quantize_4bit[random, float32]")
    assert not match("quantize_4bit[random non-finite weight -> error, float32]")
    assert not match("dequantize_4bit[random, float32]")  # anchored at both ends
    assert deviations.pattern_regex("*[*.*]").match("lora_merge[x.y]")
    assert not deviations.pattern_regex("a.c").match("abc")


def test_a_blanket_entry_warns_that_it_declares_anything(tmp_path):
    # test = "*" turned 30 failures into PASS with no word of warning (a third-party-author audit).
    path = tmp_path / "deviations.toml"
    path.write_text('[[deviation]]\ntest = "*"\nreason = "everything"\n')
    rep = _run(TiesUp(), deviations.load(path), tmp_path)
    assert rep.ok and rep.by_status("declared")
    n = len(runner.tests())
    assert rep.warnings == [
        f"deviation '*' ({path}) matches {n} of {n} test ids: it declares any failure there, whatever it "
        "is; name the tests it is about"
    ]


def test_an_entry_with_an_output_declares_only_failures_in_that_output(tmp_path):
    # Without `output`, an entry declared any failure of its tests: a second bug there was hidden.
    failed = {r.id for r in _run(TiesUp(), [], tmp_path).by_status("fail")}
    for output, declared in (("absmax", set()), ("code", failed)):
        path = tmp_path / f"{output}.toml"
        path.write_text(f'[[deviation]]\ntest = "{TIES}"\nreason = "ties"\noutput = "{output}"\n')
        (entry,) = deviations.load(path)
        assert entry.output == output
        rep = _run(TiesUp(), [entry], tmp_path)
        assert {r.id for r in rep.by_status("declared")} == declared
        assert {r.id for r in rep.by_status("fail")} == failed - declared
    path.write_text(f'[[deviation]]\ntest = "{TIES}"\nreason = "ties"\noutput = 3\n')
    with pytest.raises(deviations.DeviationsError, match="'output', 'message' and 'when' must be"):
        deviations.load(path)


def test_an_entry_whose_output_names_no_failure_says_where_the_failures_are(tmp_path):
    # A typo in `output` ("Code") used to draw "matched N tests, none of which failed" while they failed.
    failed = _run(TiesUp(), [], tmp_path).by_status("fail")
    path = _file(tmp_path, f'[[deviation]]\ntest = "{TIES}"\nreason = "ties"\noutput = "Code"\n')
    rep = _run(TiesUp(), deviations.load(path), tmp_path)
    assert len(rep.by_status("fail")) == len(failed) and not rep.by_status("declared")
    assert rep.warnings == [
        f"deviation '{TIES}' ({path}) matched 6 tests; {len(failed)} failed, none with output 'Code' "
        "(their failures are in 'code')"
    ]
    # an entry whose failures another entry declared first does not claim they passed
    path = _file(
        tmp_path,
        f'[[deviation]]\ntest = "{TIES}"\nreason = "a"\n[[deviation]]\ntest = "{TIES}"\nreason = "b"\n',
    )
    rep = _run(TiesUp(), deviations.load(path), tmp_path)
    assert rep.warnings == [
        f"deviation '{TIES}' ({path}) matched 6 tests; {len(failed)} failed, all declared by other entries"
    ]


def test_an_entry_with_a_message_declares_only_that_error(tmp_path):
    # output = "result" names any exception of the op: a second bug raising another error was hidden.
    failed = {r.id: r.message.splitlines()[0] for r in _run(TiesUp(), [], tmp_path).by_status("fail")}
    text = next(iter(failed.values())).split(", expected")[0]  # one failure's "op: output[i] = value"
    named = {i for i, first in failed.items() if text in first}
    assert 0 < len(named) < len(failed)
    for message, declared in (("not in any message", set()), (text, named)):
        path = tmp_path / "message.toml"
        path.write_text(
            f'[[deviation]]\ntest = "{TIES}"\nreason = "ties"\noutput = "code"\nmessage = "{message}"\n'
        )
        (entry,) = deviations.load(path)
        assert entry.message == message and entry.as_dict()["message"] == message
        rep = _run(TiesUp(), [entry], tmp_path)
        assert {r.id for r in rep.by_status("declared")} == declared
        assert {r.id for r in rep.by_status("fail")} == set(failed) - declared
    path.write_text(f'[[deviation]]\ntest = "{TIES}"\nreason = "ties"\nmessage = ["a"]\n')
    with pytest.raises(deviations.DeviationsError, match="'message' and 'when' must be"):
        deviations.load(path)


def test_a_long_matrix_cell_does_not_run_into_the_next():
    # "pass 11/12, 1 declared, 1 unsupported" is 38 characters: at a fixed width of 30 it ran on into the
    # next column ("...1 unsupportedpass 11/12").
    def result(i: int, dtype: str, status: str) -> runner.TestResult:
        declared = {"reason": "known", "upstream": ""} if status == "declared" else None
        return runner.TestResult(f"quantize_4bit[t{i}, {dtype}]", "quantize_4bit", dtype, "case", status,
                                 message="m", reason="why", deviation=declared)  # fmt: skip

    statuses = ["pass"] * 11 + ["declared", "unsupported"]
    results = [result(i, d, s) for d in ("float32", "float16") for i, s in enumerate(statuses)]
    rep = runner.Report("b", "b", "reflora", "ci", 0, results, [], [], [], 0.0)
    row = next(
        line for line in runner.matrix_text(rep).splitlines() if line.lstrip().startswith("quantize_4bit")
    )
    cell = "pass 11/12, 1 declared, 1 unsupported [1]"  # [1]: the note saying why
    assert f"{cell}  {cell}" in row, row


class _TiesUpWithConditions(TiesUp):
    """The mutant with deviation conditions: "7|8" holds on the inputs of the case at NF4's threshold
    between codes 7 and 8; "gpu" cannot hold here."""

    def deviation_condition(self, name, inputs):
        if name == "7|8":
            return inputs is None or "threshold 7|8," in inputs.test_id
        if name == "gpu":
            return False
        raise ValueError(f"no condition {name!r}")


def test_an_entry_with_when_declares_only_failures_whose_inputs_meet_the_condition(tmp_path):
    # A defect of some inputs only (bnb's AVX-512 dequantize misreads scales of rows that straddle
    # blocks): a pattern alone would declare any failure of the random tests it names.
    failed = {r.id for r in _run(TiesUp(), [], tmp_path).by_status("fail")}
    meets = {i for i in failed if "threshold 7|8," in i}
    assert meets and failed - meets  # the mutant fails at several thresholds
    path = tmp_path / "when.toml"
    path.write_text(f'[[deviation]]\ntest = "{TIES}"\nreason = "ties"\nwhen = "7|8"\n')
    (entry,) = deviations.load(path)
    assert entry.when == "7|8" and entry.as_dict()["when"] == "7|8"
    rep = _run(_TiesUpWithConditions(), [entry], tmp_path)
    assert {r.id for r in rep.by_status("declared")} == meets
    assert {r.id for r in rep.by_status("fail")} == failed - meets
    assert rep.warnings == []
    record = rep.as_dict()  # the failing inputs the condition read are not serialized
    assert record["results"] and all("inputs" not in r for r in record["results"])


def test_an_entry_whose_condition_cannot_hold_here_is_inactive_and_silent(tmp_path):
    path = tmp_path / "when.toml"
    path.write_text(f'[[deviation]]\ntest = "{TIES}"\nreason = "a GPU-only bug"\nwhen = "gpu"\n')
    rep = _run(_TiesUpWithConditions(), deviations.load(path), tmp_path)
    assert rep.by_status("fail") and not rep.by_status("declared")
    assert rep.warnings == []  # not "matched N tests, none of which failed": it cannot apply here


@pytest.mark.parametrize(
    "backend, error",
    [(_TiesUpWithConditions(), "no condition 'typo'"), (TiesUp(), "has no deviation_condition")],
)
def test_an_unknown_condition_is_an_error_before_any_test_runs(tmp_path, backend, error):
    path = tmp_path / "when.toml"
    path.write_text(f'[[deviation]]\ntest = "{TIES}"\nreason = "r"\nwhen = "typo"\n')
    backend.deviations = path
    assert error in runner.unusable(backend)
    with pytest.raises(deviations.DeviationsError, match=error):
        _run(backend, deviations.load(path), tmp_path)


class _TiesUpWithABuggyCondition(TiesUp):
    """A condition with a bug of its own: it reads a param as an array (KeyError) on a failing example."""

    def deviation_condition(self, name, inputs):
        if name != "buggy":
            raise ValueError(f"no condition {name!r}")
        return inputs is None or inputs["blocksize"] == 64


def test_a_condition_that_raises_leaves_the_failure_undeclared_and_says_why(tmp_path):
    path = tmp_path / "when.toml"
    path.write_text(f'[[deviation]]\ntest = "{TIES}"\nreason = "ties"\nwhen = "buggy"\n')
    rep = _run(_TiesUpWithABuggyCondition(), deviations.load(path), tmp_path)  # no crash: a report
    failed = rep.by_status("fail")
    assert failed and not rep.by_status("declared")
    assert all(f"(not declared by {TIES!r}" in r.message and "raised KeyError" in r.message for r in failed)


def test_a_subclass_elsewhere_keeps_its_parents_deviations_file(tmp_path, monkeypatch):
    # The relative path was taken from the subclass's own file, where no such file is.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _file(tmp_path / "a", GOOD)
    (tmp_path / "a" / "parent_backend.py").write_text(
        "from mutants import TiesUp\n\nclass Parent(TiesUp):\n    deviations = 'deviations.toml'\n"
    )
    (tmp_path / "b" / "child_backend.py").write_text(
        "from parent_backend import Parent\n\nclass Child(Parent):\n    name = 'child'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    from child_backend import Child

    assert [e.test for e in deviations.for_backend(Child())] == [
        e.test for e in deviations.load(_file(tmp_path / "a", GOOD))
    ]
    mine = Child()
    mine.deviations = "deviations.toml"  # set on the instance: from the file of its class
    with pytest.raises(deviations.DeviationsError, match=r"b/deviations\.toml"):
        deviations.for_backend(mine)


def test_a_report_named_as_the_deviations_file_is_refused_whatever_the_file_holds(tmp_path, capsys):
    # A previous JSON report given as --deviations was read first: a TOML parse error, not the clash.
    report = tmp_path / "report.json"
    report.write_text('{"not": "toml"}')
    rc = cli.main(["conform", "--backend", "reference", "-k", "lora_merge[rank 1, *]",
                   "--deviations", str(report), "--json", str(report)])  # fmt: skip
    assert rc == 2 and "is also --deviations's file: it would be overwritten" in capsys.readouterr().err
