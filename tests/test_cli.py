"""The ``reflora`` command: plug-in subcommands and ``reflora explain``."""

import re
import shutil
import subprocess
from importlib.metadata import EntryPoint

import numpy as np
import pytest

from reflora import cli, codebooks


def test_explain_nf4_prints_table_thresholds_derivation_and_bits(capsys):
    assert cli.main(["explain", "nf4"]) == 0
    out = capsys.readouterr().out
    for v in codebooks.NF4.values:
        assert f"{int(np.float32(v).view(np.uint32)):08x}" in out
    assert sum(line.endswith("*") for line in out.splitlines()) == 9  # float32 midpoints that are not exact
    assert "16/16 values bit-identical" in out
    assert "= 4.500 bits" in out and "= 4.127 bits" in out


@pytest.mark.parametrize("topic", ["fp4", "dq"])
def test_explain_other_topics(topic, capsys):
    assert cli.main(["explain", topic]) == 0
    assert capsys.readouterr().out.strip()


def test_console_script_is_installed():
    exe = shutil.which("reflora")
    assert exe, "the reflora console script is not on PATH"
    out = subprocess.run([exe, "explain", "dq"], capture_output=True, text=True, check=True).stdout
    assert "4.1270 bits/parameter" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "explain" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["memory", "--params", "-5"], "argument --params: must be a finite number > 0, got -5"),
        (["memory", "--params", "inf"], "argument --params: must be a finite number > 0, got inf"),
        (["memory", "--params", "7e9", "--r", "0"], "argument --r: must be a positive integer, got 0"),
        (["memory", "--params", "7e9", "--vocab", "-1"], "argument --vocab: must be >= 0, got -1"),
        (["memory", "--params", "7e9", "--seq", "x"], "argument --seq: must be a positive integer, got 'x'"),
        (["memory", "--params", "7B"], "argument --params: must be a finite number > 0 (e.g. 7e9), got '7B'"),
        (
            ["memory", "--params", "7e9", "--seq", "1e3"],
            "argument --seq: must be a positive integer, got '1e3'",
        ),
        (["conform", "--seed", "1.5"], "argument --seed: must be an integer in [0, 2**32), got '1.5'"),
        (["demo", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["demo", "--batch-size", "-2"], "argument --batch-size: must be a positive integer, got -2"),
    ],
)
def test_bad_numbers_are_usage_errors_not_tracebacks(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_a_broken_plugin_is_listed_and_explains_itself(monkeypatch, capsys):
    broken = EntryPoint("broken", "reflora_missing_module:add_parser", "reflora.commands")
    real = cli.entry_points(group="reflora.commands")
    monkeypatch.setattr(cli, "entry_points", lambda group: [*real, broken])
    assert cli.main(["broken"]) == 2
    assert "reflora_missing_module" in capsys.readouterr().err
    assert cli.main(["explain", "nf4"]) == 0  # the others still work


def test_output_problem_names_each_output_that_cannot_be_written(tmp_path) -> None:
    # One check for every report file of every command (conform and inspect each had their own, with
    # different gaps: inspect wrote a file named '-', conform refused nothing inside an input directory).
    from reflora.cli import output_problem

    model = tmp_path / "model"
    model.mkdir()
    read = {"the checkpoint": str(model), "--deviations": str(tmp_path / "dev.toml")}
    cases = [
        ({"--json": "-"}, "--json -: the report goes to stdout already"),
        ({"--json": str(tmp_path)}, f"--json {tmp_path} is a directory"),
        ({"--json": str(tmp_path / "no" / "r.json")}, f"the directory {tmp_path / 'no'} does not exist"),
        ({"--json": str(tmp_path / "dev.toml")}, "is also --deviations's file: it would be overwritten"),
        ({"--json": str(model / "r.json")}, "is inside the checkpoint's directory, which the command reads"),
        ({"--json": str(tmp_path / "r"), "--markdown": str(tmp_path / "r")}, "--markdown"),
    ]
    for outputs, message in cases:
        problem = output_problem(outputs, read)
        assert problem is not None and message in problem, (outputs, problem)
    assert output_problem({"--json": str(tmp_path / "r.json"), "--markdown": None}, read) is None
    assert output_problem({"--json": ""}) is None  # not asked for


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    """A command without a Ctrl-C handler of its own (demo, inspect, explain) stops with one line and
    the shell's status for SIGINT, not a traceback."""
    from reflora import explain

    def interrupted(topic):
        raise KeyboardInterrupt

    monkeypatch.setattr(explain, "explain", interrupted)
    assert cli.main(["explain", "nf4"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "reflora explain: stopped (Ctrl-C)" and "Traceback" not in err


def test_two_packages_registering_one_backend_name_is_shown_and_refused(monkeypatch):
    """A plug-in that registers "reference" too was silently one of the two (the last entry point won)."""
    from reflora import backends

    real = list(backends.entry_points(group=backends.GROUP))
    theirs = EntryPoint("reference", "odd_backends:UpcastOutput", backends.GROUP)
    monkeypatch.setattr(backends, "entry_points", lambda group: [*real, theirs])
    row = next(s for s in backends.status() if s.name == "reference")
    assert not row.available and "registered by more than one package" in row.reason
    assert "odd_backends:UpcastOutput" in row.target and "reflora.backends.reference" in row.target
    with pytest.raises(backends.BackendError, match="run one with --backend module:attr"):
        backends.get("reference")
    assert backends.get("reflora.backends.reference:ReferenceBackend").name == "reference"


def test_a_callable_that_runs_the_command_again_is_no_backend(tmp_path):
    # `--backend reflora.cli:main` recursed until Python's limit and listed every backend as broken
    import sys

    argv = [sys.executable, "-m", "reflora", "conform", "--backend", "reflora.cli:main", "-k",
            "lora_merge[random, float32]"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "reflora.cli:main is not a backend" in done.stderr and "RecursionError" not in done.stderr
    # said once: the inner command neither prints an error of its own nor hands the outer one a result
    assert done.stderr.count("installed backends:") == 1 and "Backend protocol" not in done.stderr


def test_explain_states_the_rebuilt_scale_caveats(capsys):
    """`explain nf4` said an all-zero block dequantizes to +0.0 and `explain dq` never mentioned scales
    rebuilt below zero or past the dtype, both of which the spec documents."""
    assert cli.main(["explain", "nf4"]) == 0
    assert "-0.0 when double quantization rebuilds" in capsys.readouterr().out
    assert cli.main(["explain", "dq"]) == 0
    out = capsys.readouterr().out
    assert "signs flipped" in out and "NegativeScaleWarning" in out and "ScaleRangeWarning" in out


def test_the_listing_marks_an_unknown_dialect_and_aligns_long_names(monkeypatch, capsys):
    """`reflora backends` listed a backend of an unknown dialect as available (conform refuses it), and
    a name longer than 14 characters pushed its row out of line."""
    from reflora import backends

    real = list(backends.entry_points(group=backends.GROUP))
    odd = [
        EntryPoint("unknown-dialect", "odd_backends:UnknownDialect", backends.GROUP),
        EntryPoint("a-rather-long-backend-name", "odd_backends:AvailableRaises", backends.GROUP),
    ]
    monkeypatch.setattr(backends, "entry_points", lambda group: [*real, *odd])
    rows = {s.name: s for s in backends.status()}
    assert not rows["unknown-dialect"].available
    assert rows["unknown-dialect"].reason.startswith(
        "the suite cannot run it: unknown dialect 'bitsandbytes'"
    )
    assert (
        rows["a-rather-long-backend-name"].reason == "available() raised RuntimeError: driver probe crashed"
    )
    assert cli.main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {len(re.match(r"\S+ +", line).group()) for line in lines}
    assert len(starts) == 1, lines  # every state starts in one column


def test_a_module_in_the_current_directory_loads_from_the_script_too(tmp_path, monkeypatch):
    """`reflora conform --backend mymodule:Cls` failed from the `reflora` script (which does not put
    the current directory on the path, as `python -m` does), and so did the replay line it printed."""
    import sys

    from reflora import backends

    (tmp_path / "here_only_backend.py").write_text(
        "from reflora.backends.reference import ReferenceBackend\n\n"
        "class Mine(ReferenceBackend):\n    name = 'mine'\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert backends.get("here_only_backend:Mine").name == "mine"
    assert sys.path[-1] == str(tmp_path)  # after everything installed
    with pytest.raises(backends.BackendError, match="No module named 'no_such_module_here'"):
        backends.get("no_such_module_here:X")
