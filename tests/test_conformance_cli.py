"""``reflora conform``, ``reflora replay`` and ``pytest --pyargs reflora.conformance``: exit codes, outputs,
reports, progress, and the errors a user meets first."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reflora import backends, cli
from reflora.conformance import cli as conform_cli
from reflora.conformance import runner

TESTS = Path(__file__).resolve().parent
MERGE = "lora_merge[*"  # a cheap slice of the suite (42 tests, well under a second)


def _conform(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["conform", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_conform_passes_reference_and_prints_seed_matrix_and_summary(capsys, tmp_path):
    rc, out, err = _conform(capsys, "--backend", "reference", "-k", MERGE, "--bundle-dir", str(tmp_path))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "reflora conform: profile ci, seed 0 (repeat this run with --seed 0)"
    assert "reference (dialect reflora): PASS  [profile ci, seed 0, 42 tests" in out
    assert any(line.split()[:3] == ["lora_merge", "pass", "14/14"] for line in lines)
    assert "PASS reference: 42 passed, 0 declared, 0 rejected, 0 unsupported" in out
    assert "lora_merge       float32   pass 14/14" in err  # non-TTY progress: a line per op × dtype
    assert not list(tmp_path.iterdir())  # nothing failed, nothing saved
    assert "Counterexamples saved" not in out


def test_conform_fails_a_mutant_with_message_bundle_and_replay_line(capsys, tmp_path):
    rc, out, _ = _conform(capsys, "--backend", "mutants:TiesUp", "-k", "quantize_4bit[nf4 x exactly at*",
                          "--bundle-dir", str(tmp_path))  # fmt: skip
    assert rc == 1
    assert "mutants:TiesUp (dialect reflora): FAIL" in out and "FAIL mutants:TiesUp: " in out
    assert "FAIL quantize_4bit[nf4 x exactly at threshold 2|3, float32]" in out
    assert "quantize_4bit: code[0] = 3, expected 2 (EXACT)" in out
    assert "Mismatched elements: " in out and "Max absolute difference: " in out
    bundles = sorted(tmp_path.glob("*.npz"))
    assert bundles and all(f"Bundle: {b}" in out for b in bundles)
    assert f"Reproduce: reflora replay {bundles[0]} --backend mutants:TiesUp" in out
    assert f"Counterexamples saved in {tmp_path}/: {len(bundles)} of failures, 0 of declared" in out


def test_json_and_markdown_reports(capsys, tmp_path):
    j, md = tmp_path / "r.json", tmp_path / "r.md"
    rc, _, _ = _conform(capsys, "--backend", "mutants:RankOneDropsAdapter", "-k", "lora_forward[rank 1*",
                        "--seed", "7", "--json", str(j), "--markdown", str(md),
                        "--bundle-dir", str(tmp_path))  # fmt: skip
    assert rc == 1
    record = json.loads(j.read_text())
    assert record["seed"] == 7 and record["profile"] == "ci" and record["ok"] is False
    (rep,) = record["reports"]
    assert rep["backend"] == "mutants:RankOneDropsAdapter" and rep["ok"] is False
    assert rep["matrix"]["lora_forward"] == {d: "FAIL 1 of 1" for d in ("float32", "float16", "bfloat16")}
    fails = [r for r in rep["results"] if r["status"] == "fail"]
    assert len(fails) == 3 and all(Path(r["bundle"]).is_file() and r["replay"] for r in fails)
    assert fails[0]["message"].startswith("lora_forward: y[0, 0] = ")
    text = md.read_text()
    assert "Profile `ci`, seed 7." in text
    assert "## `mutants:RankOneDropsAdapter` (dialect `reflora`): FAIL" in text
    assert "| lora_forward | FAIL 1 of 1 | FAIL 1 of 1 | FAIL 1 of 1 |" in text
    assert "#### `lora_forward[rank 1, float32]`" in text


def test_unknown_backend_lists_the_installed_ones(capsys):
    rc, _, err = _conform(capsys, "--backend", "no-such-backend")
    assert rc == 2
    assert "unknown backend 'no-such-backend'" in err
    assert "installed backends:" in err and "reference" in err and "available" in err


def test_broken_module_attr_backend_is_an_error_not_a_fallback(capsys):
    rc, _, err = _conform(capsys, "--backend", "reflora_no_such_module:Backend")
    assert rc == 2 and "failed to load" in err and "installed backends:" in err


def test_a_selection_that_matches_no_test_is_an_error_not_an_empty_pass(capsys):
    rc, out, err = _conform(capsys, "--backend", "reference", "-k", "lora_merge[*", "-k", "lora_mrege[*")
    assert rc == 2 and "-k 'lora_mrege[*' matches no test" in err
    assert "PASS" not in out  # nothing ran


def test_outputs_that_cannot_be_written_are_refused_before_the_run(capsys, tmp_path):
    # Before, these ran every test and then died on the write with a traceback: an audit run's work lost.
    (tmp_path / "file").write_text("")
    cases = [
        (["--json", str(tmp_path / "no" / "r.json")], f"the directory {tmp_path / 'no'} does not exist"),
        (["--markdown", str(tmp_path)], f"--markdown {tmp_path} is a directory"),
        (["--bundle-dir", str(tmp_path / "file")], "exists and is not a directory"),
        (["--bundle-dir", str(tmp_path / "file" / "sub")], "cannot create or write it"),
        (["--bundle-dir", ""], "--bundle-dir is empty"),  # bundles went to ".", reported as saved in "/"
        (["--json", "-"], "--json -: the report goes to stdout already"),  # it made a file named "-"
    ]
    for args, message in cases:
        rc, out, err = _conform(capsys, "--backend", "reference", "-k", MERGE, *args)
        assert rc == 2 and message in err, (args, err)
        assert "PASS" not in out and "pass 12/12" not in err  # refused before any test ran


def test_an_output_that_would_overwrite_an_input_or_the_other_output_is_refused(capsys, tmp_path):
    # Both ran and exited 0: the JSON report replaced the deviations file it ran with, and the Markdown
    # replaced the JSON.
    dev = tmp_path / "dev.toml"
    dev.write_text("")
    for args, message in [
        (["--deviations", str(dev), "--json", str(dev)], f"--json {dev} is also --deviations's file"),
        (["--json", str(tmp_path / "r"), "--markdown", str(tmp_path / "r")], "is also --json's file"),
    ]:
        rc, out, err = _conform(capsys, "--backend", "reference", "-k", MERGE, *args)
        assert rc == 2 and message in err, err
        assert "PASS" not in out
    assert dev.read_text() == "" and not (tmp_path / "r").exists()


class _Closed(io.StringIO):
    """A stdout whose reader went away after the first line (``| head -1``)."""

    def write(self, text: str) -> int:
        if self.getvalue().endswith("\n"):
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_reader_that_stops_reading_loses_neither_the_status_nor_the_reports(tmp_path):
    # Piped into `head`, a failing run exited 0 and wrote no report: the pipe broke while the matrix was
    # printed, before the files were written.
    # `2>&1 | head` broke the pipe in the progress on stderr, inside the run: exit 0, no report, no bundle.
    for closed in ("out", "err"):
        j = tmp_path / closed / "r.json"
        j.parent.mkdir()
        streams = {"out": io.StringIO(), "err": io.StringIO(), closed: _Closed()}
        rc = conform_cli.conform(
            ["mutants:TiesUp"], select=["quantize_4bit[nf4 x exactly at*"], bundle_dir=str(j.parent / "b"),
            json_path=str(j), **streams,
        )  # fmt: skip
        assert rc == 1, closed
        assert json.loads(j.read_text())["ok"] is False and list((j.parent / "b").glob("*.npz"))
    bundle = next((tmp_path / "out" / "b").glob("*.npz"))
    assert conform_cli.replay(str(bundle), out=_Closed(), err=io.StringIO()) == 1  # a FAIL stays 1


def test_a_bundle_that_cannot_be_saved_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    # A full disk raised out of the run with a traceback, no summary, and a 0-byte .npz left behind.
    def full(path, **entries):
        Path(path).write_bytes(b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full)
    rc, out, _ = _conform(capsys, "--backend", "mutants:TiesUp", "-k", "quantize_4bit[nf4 x exactly at*",
                          "--bundle-dir", str(tmp_path))  # fmt: skip
    assert rc == 1 and "FAIL mutants:TiesUp: " in out
    assert "Not saved: its counterexample bundle could not be saved" in out and "No space left" in out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**40)])
def test_a_seed_outside_32_bits_is_refused_not_aliased(capsys, seed):
    # 2**40 drew exactly seed 0's examples, -1 those of 2**32 - 1, each printed as itself.
    with pytest.raises(SystemExit) as exc:
        cli.main(["conform", "--backend", "reference", "--seed", seed])
    assert exc.value.code == 2 and "[0, 2**32)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        runner.resolve_seed(runner.profiles.get("ci"), int(seed))


def test_a_backend_named_twice_runs_once(capsys, tmp_path):
    rc, out, _ = _conform(capsys, "--backend", "reference", "--backend", "reference", "-k", MERGE,
                          "--bundle-dir", str(tmp_path))  # fmt: skip
    assert rc == 0 and out.count("PASS reference: 42 passed") == 1


def test_a_deviations_file_that_is_not_text_is_named(capsys, tmp_path):
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    rc, _, err = _conform(capsys, "--backend", "reference", "--deviations", str(tmp_path / "bin.toml"))
    assert rc == 2 and f"{tmp_path / 'bin.toml'}: not a TOML deviations file (not UTF-8 text" in err


def test_bad_profile_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["conform", "--profile", "thorough"])
    assert exc.value.code == 2


def test_default_runs_every_available_backend_and_lists_the_unavailable(capsys, monkeypatch, tmp_path):
    # The registry as two backends, so the test does not depend on which adapters are installed.
    reference = backends.Status("reference", "reflora.backends.reference:ReferenceBackend", "reflora", True)
    gpu = backends.Status("gpu-only", "somewhere:Backend", "reflora", False, "needs CUDA")
    monkeypatch.setattr(backends, "status", lambda: [reference, gpu])
    rc, out, _ = _conform(capsys, "-k", MERGE, "--bundle-dir", str(tmp_path))
    assert rc == 0  # unavailable is listed, not failed
    assert "gpu-only: unavailable here, not run: needs CUDA" in out
    assert "PASS reference: 42 passed" in out and "gpu-only (dialect" not in out


def test_progress_on_a_terminal_is_one_rewritten_status_line(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    rc = conform_cli.conform(
        ["reference"], select=[MERGE], bundle_dir=str(tmp_path), out=out, err=err, tty=True
    )
    assert rc == 0
    progress = err.getvalue()
    assert "\r\033[K[" in progress and "42/42" in progress and "lora_merge[" in progress
    assert "lora_merge       float32" not in progress  # the per-cell lines are for logs, not terminals
    assert progress.endswith("\r\033[K")  # the status line is cleared before the report


def test_replay_of_something_that_is_not_a_bundle(capsys, tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    assert cli.main(["replay", str(tmp_path / "x.npz")]) == 2
    assert "x.npz is not a reflora conformance bundle (not an .npz: no zip archive)" in capsys.readouterr()[1]
    np.savez(tmp_path / "y.npz", a=np.ones(3))  # an .npz, but not one of ours
    assert cli.main(["replay", str(tmp_path / "y.npz")]) == 2
    assert "y.npz is not a reflora conformance bundle (no 'meta' entry)" in capsys.readouterr().err
    assert cli.main(["replay", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz: no such file" in capsys.readouterr().err
    for meta in ([1, 2], {"format": 1, "dtypes": [1]}):  # JSON of the wrong shape: still "not a bundle"
        np.savez(tmp_path / "z.npz", meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        assert cli.main(["replay", str(tmp_path / "z.npz")]) == 2
        err = capsys.readouterr().err
        assert "z.npz is not a reflora conformance bundle (" in err and "Traceback" not in err


def test_replay_against_an_unknown_backend(capsys, tmp_path):
    one = "quantize_4bit[nf4 x exactly at threshold 2|3, float32]"
    reports, _, _ = runner.run(["mutants:TiesUp"], select=[one], bundle_dir=tmp_path)
    bundle = reports[0].by_status("fail")[0].bundle
    assert cli.main(["replay", bundle, "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def _rewrite_bundle(src: Path, dst: Path, change) -> Path:
    """A copy of the bundle ``src`` at ``dst`` with ``change(meta, arrays)`` applied."""
    with np.load(src, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    meta = json.loads(entries.pop("meta").tobytes().decode())
    arrays = {k: v.copy() for k, v in entries.items()}
    change(meta, arrays)
    np.savez_compressed(dst, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return dst


def test_replay_refuses_a_bundle_the_oracle_cannot_pass_and_notes_an_edited_one(capsys, tmp_path):
    # Broken content was blamed on the backend (exit 1, "the suite raised KeyError"), or on the oracle
    # itself for a dropped array; an edited bundle replayed under its stale header without a word.
    one = "lora_backward[random, float32]"
    reports, _, _ = runner.run(["mutants:ZeroGradA"], select=[one], bundle_dir=tmp_path / "b")
    bundle = Path(reports[0].by_status("fail")[0].bundle)
    broken = {
        "no params": lambda meta, a: meta.update(params={}),
        "a dropped array": lambda meta, a: (a.pop("a.grad_y"), meta["dtypes"].pop("grad_y")),
        "a view step out of range": lambda meta, a: meta["views"].update(x=[["step", 5, 2]]),
    }
    for name, change in broken.items():
        path = _rewrite_bundle(bundle, tmp_path / f"{name.replace(' ', '-')}.npz", change)
        assert cli.main(["replay", str(path)]) == 2, name  # against mutants:ZeroGradA, which it names
        out, err = capsys.readouterr()
        assert "is not a valid bundle: its check cannot run on its inputs even with the reference" in err, (
            name, err)  # fmt: skip
        assert out == ""
    assert cli.main(["replay", str(bundle), "--backend", "reference"]) == 0
    assert "changed after it was saved" not in capsys.readouterr().out
    edited = bundle.parent / "edited" / bundle.name  # the same name, other content
    edited.parent.mkdir()
    _rewrite_bundle(bundle, edited, lambda meta, a: a["a.x"].__setitem__((0, 0), a["a.x"][0, 0] + 1))
    assert cli.main(["replay", str(edited), "--backend", "reference"]) == 0
    assert "note: the bundle was changed after it was saved" in capsys.readouterr().out
    dated = tmp_path / "zero-grad-a-20261124.npz"  # renamed by hand: eight digits that are no digest
    dated.write_bytes(bundle.read_bytes())
    assert cli.main(["replay", str(dated), "--backend", "reference"]) == 0
    assert "changed after it was saved" not in capsys.readouterr().out
    assert cli.main(["replay", str(bundle.parent)]) == 2
    assert "is a directory; give one bundle" in capsys.readouterr().err
    assert cli.main(["replay", str(bundle), "--backend", ""]) == 2
    assert "unknown backend ''" in capsys.readouterr().err


def test_replay_refuses_arrays_whose_dtype_is_not_the_recorded_one(capsys, tmp_path):
    """An array that is not what the record says (an unknown dtype name, read as raw uint16 and
    REJECTED with exit 0; a complex array, which reached the check and raised) is no bundle: exit 2."""
    one = "quantize_4bit[nf4 x exactly at threshold 2|3, float32]"
    reports, _, _ = runner.run(["mutants:TiesUp"], select=[one], bundle_dir=tmp_path / "b")
    bundle = Path(reports[0].by_status("fail")[0].bundle)
    broken = {
        "nosuch": lambda meta, a: meta["dtypes"].update(x="nosuch"),
        "complex64": lambda meta, a: a.update({"a.x": a["a.x"].astype(np.complex64)}),
    }
    for name, change in broken.items():
        path = _rewrite_bundle(bundle, tmp_path / f"{name}.npz", change)
        assert cli.main(["replay", str(path)]) == 2, name
        out, err = capsys.readouterr()
        assert "is not a reflora conformance bundle (array 'x' is " in err and out == "", (name, err)


def test_a_wrong_oracle_is_replayed_not_refused(capsys, tmp_path, monkeypatch):
    # Someone working on the oracle replays what `conform --backend reference` printed: a value mismatch
    # of the reference is a finding to see, not a broken bundle.
    one = "lora_backward[random, float32]"
    reports, _, _ = runner.run(["mutants:ZeroGradA"], select=[one], bundle_dir=tmp_path)
    bundle = reports[0].by_status("fail")[0].bundle
    from reflora import bounds

    real = bounds.lora_backward_bound
    monkeypatch.setattr(bounds, "lora_backward_bound", lambda *a, **k: [-b for b in real(*a, **k)])
    for backend in ("reference", "torch"):
        assert cli.main(["replay", bundle, "--backend", backend]) == 1, backend
        out = capsys.readouterr().out
        assert f"against {backend}" in out and "FAIL: lora_backward: grad_x" in out


TIES_F32 = "quantize_4bit[nf4 x exactly at threshold *, float32]"


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "reflora.conformance",
        "-p",
        "no:cacheprovider",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_the_suite_runs_under_pytest_with_the_same_messages(tmp_path):
    ok = _pytest("--reflora-backend", "reference", "-k", "lora_merge", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "reflora conformance: profile ci, seed 0" in ok.stdout
    assert "42 passed" in ok.stdout
    bad = _pytest(
        "--reflora-backend", "mutants:TiesUp", "-k", "exactly and threshold and float32", cwd=tmp_path
    )
    assert bad.returncode == 1
    assert (
        "FAILED test_backends.py::test_conformance[mutants:TiesUp-quantize_4bit[nf4 x exactly at threshold"
        in (bad.stdout)
    )
    assert "quantize_4bit: code[0] = 3, expected 2 (EXACT)" in bad.stdout
    assert "Reproduce: reflora replay reflora-failures/mutant-ties-up-" in bad.stdout
    unknown = _pytest("--reflora-backend", "nope", cwd=tmp_path)
    assert unknown.returncode != 0  # a collection error, not tests that silently ran on something else
    assert "unknown backend 'nope'" in unknown.stdout and "installed backends:" in unknown.stdout


@pytest.mark.slow
def test_the_pytest_route_selects_by_id_and_takes_a_deviations_file(tmp_path):
    """Ids hold '|', '[' and ',', which pytest's -k cannot express; --reflora-select takes the suite's own
    patterns, and --reflora-deviations a file, as reflora conform -k / --deviations do."""
    path = tmp_path / "ties.toml"
    path.write_text(f'[[deviation]]\ntest = "{TIES_F32}"\nreason = "rounds ties up"\n')
    select = "quantize_4bit[nf4 x exactly at threshold 7|8*"
    args = ["--reflora-backend", "mutants:TiesUp", "--reflora-select", select]
    declared = _pytest(*args, "--reflora-deviations", str(path), "-rx", cwd=tmp_path)
    assert declared.returncode == 0, declared.stdout[-3000:]
    assert "1 xfailed" in declared.stdout and "declared deviation: rounds ties up" in declared.stdout
    assert "1 failed" in _pytest(*args, cwd=tmp_path).stdout  # without the file: a failure
    (tmp_path / "bad.toml").write_text('[[deviation]]\ntest = "x"\n')  # no reason
    bad = _pytest(*args, "--reflora-deviations", str(tmp_path / "bad.toml"), cwd=tmp_path)
    assert bad.returncode != 0 and "1 error" in bad.stdout and "failed" not in bad.stdout  # once
    assert f"--reflora-deviations {tmp_path / 'bad.toml'}: " in bad.stdout
    typo = _pytest("--reflora-backend", "reference", "--reflora-select", "quantise_4bit[*", cwd=tmp_path)
    assert typo.returncode != 0 and "'quantise_4bit[*' matches no test id of the suite" in typo.stdout


def test_a_stopped_run_keeps_its_results_so_far(tmp_path, monkeypatch):
    """An audit cut off by a time limit wrote nothing: --json was written only at the end. Now the file
    holds the results so far while the run goes, and a stopped run writes them, with exit 130."""
    monkeypatch.setattr(conform_cli, "PARTIAL_EVERY_S", 0.0)  # rewrite after every test
    j = tmp_path / "r.json"
    real, seen = runner.run_test, []

    def run_test(*args, **kwargs):
        if len(seen) == 5:  # the file holds the five finished tests, then the run is stopped
            seen.append(json.loads(j.read_text()))
            raise KeyboardInterrupt("SIGTERM")
        seen.append(None)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_test", run_test)
    err = io.StringIO()
    rc = conform_cli.conform(["reference"], select=[MERGE], json_path=str(j), bundle_dir=str(tmp_path / "b"),
                             out=io.StringIO(), err=err)  # fmt: skip
    assert rc == 130
    during = seen[-1]
    assert (during["complete"], during["interrupted"]) == (False, None)
    assert len(during["partial"][0]["results"]) == 5
    record = json.loads(j.read_text())
    assert record["complete"] is False and record["interrupted"] == "SIGTERM" and record["ok"] is None
    (part,) = record["partial"]
    assert part["backend"] == "reference" and part["total"] == 42 and len(part["results"]) == 5
    assert {r["status"] for r in part["results"]} == {"pass"}
    assert f"interrupted (SIGTERM) after 5 tests; the 5 finished tests' results are in {j}" in err.getvalue()


def test_a_stop_whose_interrupt_was_lost_ends_the_run_after_the_test_in_progress(tmp_path, monkeypatch):
    """A SIGTERM landing in a garbage-collector callback (Hypothesis installs one) had its
    KeyboardInterrupt printed and dropped, and the run went on past a `timeout`: the handler also
    records the signal, and the run stops once the test in progress is done."""
    j = tmp_path / "r.json"
    real, calls = runner.run_test, []

    def run_test(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            monkeypatch.setattr(conform_cli, "_STOP", "SIGTERM")  # as the handler leaves it
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_test", run_test)
    err = io.StringIO()
    rc = conform_cli.conform(["reference"], select=[MERGE], json_path=str(j), bundle_dir=str(tmp_path / "b"),
                             out=io.StringIO(), err=err)  # fmt: skip
    assert rc == 130 and len(calls) == 5
    record = json.loads(j.read_text())
    assert record["interrupted"] == "SIGTERM" and len(record["partial"][0]["results"]) == 5


def test_sigterm_stops_the_command_and_keeps_the_results(tmp_path):
    """As `timeout` stops it: SIGTERM, then the JSON of the finished tests and exit 130."""
    import signal
    import time

    j = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "reflora", "conform", "--backend", "reference", "--profile", "audit",
           "--seed", "1", "--json", str(j), "--bundle-dir", str(tmp_path / "b")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # non-TTY progress: a line after each op x dtype
            if line.startswith("  "):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    record = json.loads(j.read_text())
    assert record["complete"] is False and record["interrupted"] == "SIGTERM"
    assert len(record["partial"][0]["results"]) >= 1 and "interrupted (SIGTERM) after" in err


def test_a_finished_run_says_it_is_complete(capsys, tmp_path):
    j = tmp_path / "r.json"
    rc, _, _ = _conform(capsys, "--backend", "reference", "-k", MERGE, "--json", str(j), "--bundle-dir",
                        str(tmp_path / "b"))  # fmt: skip
    assert rc == 0 and json.loads(j.read_text())["complete"] is True


def test_conform_runs_from_a_thread_that_is_not_the_main_one(tmp_path):
    """The SIGTERM handler is the main thread's to install: from another thread (a library caller's) the
    command ran before it existed and must still run (signal.signal raised ValueError there)."""
    import threading

    out: dict[str, object] = {}

    def run():
        try:
            out["rc"] = cli.main(
                ["conform", "--backend", "reference", "-k", MERGE, "--bundle-dir", str(tmp_path)]
            )
        except BaseException as exc:  # reported below
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert out == {"rc": 0}, out


def test_conform_and_replay_leave_no_files_in_the_working_directory(tmp_path):
    """Hypothesis caches what it collects under ``./.hypothesis`` (seen after a passing property); the
    commands keep that in a temporary directory, so a run from any directory leaves only the files
    asked for (here a failed property's bundle, in --bundle-dir)."""
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_STORAGE_DIRECTORY"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    work, bundles = tmp_path / "work", tmp_path / "bundles"
    work.mkdir()

    def reflora(*args: str) -> int:
        done = subprocess.run([sys.executable, "-m", "reflora", *args], capture_output=True, text=True,
                              cwd=work, env=env, timeout=300)  # fmt: skip
        return done.returncode

    assert reflora("conform", "--backend", "reference", "-k", "lora_merge[random, float32]") == 0
    assert reflora("conform", "--backend", "mutants:NibbleOrder", "-k", "quantize_4bit[random, float32]",
                   "--bundle-dir", str(bundles)) == 1  # fmt: skip
    (bundle,) = bundles.glob("*.npz")
    assert reflora("replay", str(bundle)) == 1
    assert list(work.iterdir()) == []
