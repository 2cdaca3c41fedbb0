"""``reflora conform`` and ``reflora replay``: the conformance suite on the command line.

``reflora conform [--backend NAME|module:attr ...] [--profile ci|audit] [--seed N] [--json FILE]
[--markdown FILE] [--bundle-dir DIR]`` runs the suite against each backend named (default: every
registered backend available here; the others are listed with their reason, not failed). It prints
the seed first, progress while it runs (a status line on a terminal, one line per op × dtype
otherwise, both on stderr), then for each backend the support matrix, every failure with its message,
bundle and replay command, the declared deviations with their reasons, warnings about deviation
entries that match nothing, and the findings. Exit status: 0 when every test a backend supports
passes, 1 when one fails, 2 when the run cannot start (an unknown or broken backend, a bad option),
130 when it is stopped (Ctrl-C or SIGTERM). While it runs, ``--json`` holds the results so far
(``"complete": false``, rewritten every 30 s and when it is stopped); the finished run replaces it.

``reflora replay FILE [--backend NAME]`` runs the check saved in a bundle again (default: against the
backend it was recorded against) and prints the same message: exit 1 on a mismatch, 0 when it passes
now (or the inputs are outside the backend's dialect, which it says: REJECTED), 2 when it cannot run
(not a bundle, unknown backend, op unsupported).

Both register through the entry-point group ``reflora.commands``; nothing heavy is imported until a
command runs. Neither leaves files in the working directory: Hypothesis keeps what it caches (the
constants it collects, its character map) under ``./.hypothesis``, which these commands point at a
temporary directory for their run (``HYPOTHESIS_STORAGE_DIRECTORY``, when set, is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from reflora.cli import PipeSafe, output_problem, seed_int

__all__ = ["add_conform_parser", "add_replay_parser", "conform", "replay"]


class _Progress:
    """Progress on ``stream``: on a terminal one status line rewritten after every test; otherwise
    the runner's line per op × dtype, which also reaches a log a few lines at a time."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.failed = 0
        self.start = time.perf_counter()
        self._status = False

    def _clear(self) -> None:
        if self._status:
            self.stream.write("\r\033[K")
            self._status = False

    def line(self, text: str) -> None:
        if self.tty and text.startswith("  "):  # a cell summary: the status line already says it
            return
        self._clear()
        print(text, file=self.stream, flush=True)
        self.failed = 0
        self.start = time.perf_counter()

    def test(self, result: Any, done: int, total: int) -> None:
        self.failed += result.status in ("fail", "error")
        if not self.tty:
            return
        width = 24
        bar = "#" * (width * done // max(total, 1))
        fails = f", {self.failed} failed" if self.failed else ""
        text = (
            f"\r\033[K[{bar:<{width}}] {done}/{total}{fails} {time.perf_counter() - self.start:5.1f} s  "
            f"{result.id[:60]}"
        )
        self.stream.write(text)
        self.stream.flush()
        self._status = True
        if done == total:
            self._clear()

    def close(self) -> None:
        self._clear()


# The signal that asked the run to stop, once one has. Python runs a signal handler between any two
# bytecodes, a garbage collector's callback included (Hypothesis installs one), and there the handler's
# KeyboardInterrupt is printed and dropped ("Exception ignored in: ... gc_callback"): the run went on,
# measured under load. So the handler records it too, and the run stops after the test in progress.
_STOP: str | None = None

PARTIAL_EVERY_S = 30.0
"""How often, at most, a run with ``--json`` rewrites the file with its results so far."""


class _Partial:
    """The JSON record of an unfinished run, kept on disk while it goes: rewritten at most every
    ``every`` seconds as tests finish, and by :meth:`write` when the run is stopped, so that a run cut
    off (Ctrl-C, a ``timeout``'s SIGTERM, or a SIGKILL after the last rewrite) keeps what it measured.
    The finished run's record replaces it."""

    def __init__(self, path: str | None, profile: str, seed: int, every: float | None = None) -> None:
        self.path, self.profile, self.seed = path, profile, seed
        self.every = PARTIAL_EVERY_S if every is None else every
        self.backends: list[dict[str, Any]] = []
        self.last = time.perf_counter()

    def backend(self, spec: str) -> None:
        self.backends.append({"backend": spec, "results": [], "total": None})

    def test(self, result: Any, done: int, total: int) -> None:
        self.backends[-1]["results"].append(result.as_dict())
        self.backends[-1]["total"] = total
        if _STOP is not None:  # its KeyboardInterrupt was lost (see _STOP): stop here instead
            raise KeyboardInterrupt(_STOP)
        if time.perf_counter() - self.last >= self.every:
            self.write(None)

    def write(self, interrupted: str | None) -> bool:
        """Write the record so far; False when it could not be written (a full disk, say)."""
        from reflora.formats.files import write_files

        self.last = time.perf_counter()
        if not self.path:
            return True
        record = {"profile": self.profile, "seed": self.seed, "ok": None, "complete": False,
                  "interrupted": interrupted, "partial": self.backends}  # fmt: skip
        try:
            write_files({Path(self.path): (json.dumps(record, indent=1, default=str) + "\n").encode("utf-8")})
        except OSError:
            return False
        return True

    def done(self) -> int:
        return sum(len(b["results"]) for b in self.backends)


def conform(
    backends: list[str] | None,
    *,
    profile: str = "ci",
    seed: int | None = None,
    json_path: str | None = None,
    markdown_path: str | None = None,
    bundle_dir: str = "reflora-failures",
    select: list[str] | None = None,
    deviations: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    tty: bool | None = None,
) -> int:
    """Run the suite as ``reflora conform`` does; returns the exit status (0 pass, 1 fail, 2 no run).

    backends: registered names or ``module:attr`` (None or empty: every available registered backend);
    select: test-id patterns to run (``*`` wildcards; default all); deviations: a deviations file used
    instead of each backend's own; out / err: where the report and the progress go (default stdout /
    stderr); tty: force the progress style (default: whether ``err`` is a terminal).
    """
    from reflora.backends import BackendError
    from reflora.conformance import deviations as _deviations
    from reflora.conformance import profiles, runner
    from reflora.formats.files import write_files

    out = PipeSafe(out or sys.stdout)  # a reader that stops reading costs neither reports nor status
    err = PipeSafe(err or sys.stderr)
    # the reports first: a report named as the deviations file would overwrite it, whatever it holds
    outputs = {"--json": json_path, "--markdown": markdown_path}
    problem = output_problem(outputs, {"--deviations": deviations}) or _bundle_dir_problem(bundle_dir)
    if problem:
        print(f"reflora conform: {problem}", file=err)
        return 2
    try:
        prof = profiles.get(profile)
        entries = _deviations.load(deviations) if deviations else None
    except ValueError as exc:
        print(f"reflora conform: {exc}", file=err)
        return 2
    missing = runner.unmatched(select or ())
    if missing:
        example = runner.tests()[0].id
        print(f"reflora conform: -k {', '.join(map(repr, missing))} matches no test (test ids look like "
              f"{example!r}; '*' is the wildcard)", file=err)  # fmt: skip
        return 2
    seed = runner.resolve_seed(prof, seed)
    print(f"reflora conform: profile {prof.name}, seed {seed} (repeat this run with --seed {seed})", file=out,
          flush=True)  # fmt: skip
    progress = _Progress(err, tty)
    partial = _Partial(json_path, prof.name, seed)

    def on_test(result: Any, done: int, total: int) -> None:
        progress.test(result, done, total)
        partial.test(result, done, total)

    try:
        named = list(dict.fromkeys(backends)) if backends else None  # a backend named twice runs once
        reports, unavailable, seed = runner.run(
            named, prof.name, seed, bundle_dir=bundle_dir, progress=progress.line,
            on_test=on_test, on_backend=partial.backend, select=select or (), entries=entries,
        )  # fmt: skip
    except BackendError as exc:
        progress.close()
        print(f"reflora conform: {exc}", file=err)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the command's handler
        progress.close()
        why = str(exc) or "KeyboardInterrupt"
        kept = (f"; the {partial.done()} finished tests' results are in {json_path} (\"complete\": false)"
                if json_path and partial.write(why) else "")  # fmt: skip
        print(f"reflora conform: interrupted ({why}) after {partial.done()} tests{kept}", file=err)
        return 130
    progress.close()
    ok = bool(reports) and all(r.ok for r in reports)
    files: dict[Path, bytes] = {}
    if json_path:
        record = {
            "profile": prof.name,
            "seed": seed,
            "ok": ok,
            "complete": True,
            "unavailable": [{"name": n, "reason": r} for n, r in unavailable],
            "reports": [r.as_dict() for r in reports],
        }
        files[Path(json_path)] = (json.dumps(record, indent=1, default=str) + "\n").encode("utf-8")
    if markdown_path:
        files[Path(markdown_path)] = runner.markdown(reports, unavailable, seed, prof.name).encode("utf-8")
    unwritten = None
    try:  # before printing, so that a reader who stops reading (`| head`) loses no report
        write_files(files)
    except OSError as exc:  # checked before the run; this is the disk or the directory changing since
        unwritten = f"reflora conform: the report files were not written: {exc}"
    status = _status(reports, ok, unwritten)
    _print_summary(reports, unavailable, bundle_dir, out)
    if unwritten:
        print(unwritten, file=err)
    elif not reports:
        print("reflora conform: no backend is available to run (see `reflora backends`)", file=err)
    elif status == 2:
        print("reflora conform: no test checked anything: every selected test was unsupported, declined or "
              "rejected (outside the dialect) for the backends run", file=err)  # fmt: skip
    return status


def _status(reports: list, ok: bool, unwritten: str | None) -> int:
    """0 pass, 1 fail, 2 no run (no backend, nothing checked, or the reports unwritten)."""
    if unwritten or not reports or (ok and not any(r.checked for r in reports)):
        return 2
    return 0 if ok else 1


def _print_summary(reports: list, unavailable: list[tuple[str, str]], bundle_dir: str, out: TextIO) -> None:
    from reflora.conformance import runner

    for name, reason in unavailable:
        print(f"{name}: unavailable here, not run: {reason}", file=out)
    for rep in reports:
        print("", file=out)
        print(runner.matrix_text(rep), file=out)
    if not reports:
        return
    print("", file=out)
    for rep in reports:
        failed = len(rep.by_status("fail", "error"))
        counts = f"{failed} failed, " if failed else ""
        declared = len(rep.by_status("declared"))
        print(f"{rep.verdict} {rep.backend}: {counts}{len(rep.by_status('pass'))} passed, "
              f"{declared} declared, {len(rep.by_status('rejected'))} rejected, "
              f"{len(rep.by_status('unsupported'))} unsupported, {rep.seconds:.1f} s", file=out)  # fmt: skip
    saved = [r for rep in reports for r in rep.results if r.bundle]
    if saved:
        declared = sum(r.status == "declared" for r in saved)
        print(f"Counterexamples saved in {bundle_dir}/: {len(saved) - declared} of failures, {declared} of "
              "declared deviations (`reflora replay FILE` runs one again)", file=out)  # fmt: skip
    out.flush()


def _bundle_dir_problem(bundle_dir: str) -> str | None:
    """Why failure bundles could not be saved under ``bundle_dir``, checked before the run."""
    if not bundle_dir:
        return "--bundle-dir is empty; give a directory (default: reflora-failures)"
    d = Path(bundle_dir)
    if d.exists() and not d.is_dir():
        return f"--bundle-dir {bundle_dir} exists and is not a directory"
    existing = next(a for a in (d, *d.parents) if a.exists())  # where mkdir would start
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        return f"--bundle-dir {bundle_dir}: cannot create or write it under {existing}"
    return None


def _choose_triton_mode() -> None:
    """Decide Triton's interpreter before any backend loads: whether a ``@triton.jit`` function is
    interpreted is fixed when it is decorated, and bitsandbytes imports Triton on its own import. Without
    CUDA the triton backend then runs under the CPU interpreter; an explicit TRITON_INTERPRET wins."""
    from reflora.backends.triton.backend import use_interpreter  # imports neither torch nor triton

    use_interpreter()


@contextmanager
def _hypothesis_home_elsewhere() -> Iterator[None]:
    """Hypothesis's storage in a temporary directory for the duration, unless the user chose one
    (``HYPOTHESIS_STORAGE_DIRECTORY``): a command run from any directory must not leave ``.hypothesis``
    there (module docstring)."""
    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        yield
        return
    from hypothesis import configuration

    with tempfile.TemporaryDirectory(prefix="reflora-hypothesis-") as home:
        configuration.set_hypothesis_home_dir(home)
        try:
            yield
        finally:
            configuration.set_hypothesis_home_dir(None)


def _run_conform(args: argparse.Namespace) -> int:
    _choose_triton_mode()

    global _STOP
    _STOP = None

    def stopped(signum: int, frame: Any) -> None:  # `timeout` sends SIGTERM: stop as Ctrl-C does
        global _STOP
        if _STOP is not None:  # a second one must not cut the partial write short
            return
        _STOP = signal.Signals(signum).name
        raise KeyboardInterrupt(_STOP)

    # Only the main thread may install a handler; from another (a library caller's), runs stop as before.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stopped) if main else None
    try:
        with _hypothesis_home_elsewhere():
            return conform(args.backend, profile=args.profile, seed=args.seed, json_path=args.json,
                           markdown_path=args.markdown, bundle_dir=args.bundle_dir, select=args.select,
                           deviations=args.deviations)  # fmt: skip
    finally:
        if main:  # a handler installed outside Python reads as None: put the default back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def add_conform_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "conform",
        help="hold backends to the oracle: run the conformance suite",
        description="Run the conformance suite against backends and print a support matrix (op × dtype), "
        "failures with reproducers, declared deviations and findings.",
    )
    p.add_argument(
        "--backend",
        action="append",
        metavar="NAME|module:attr",
        help="a registered backend or module:attr (repeatable; default: every available one)",
    )
    p.add_argument(
        "--profile",
        default="ci",
        choices=("ci", "audit"),
        help="ci: bounded and reproducible (seed 0); audit: thorough, a fresh seed (default: ci)",
    )
    p.add_argument("--seed", type=seed_int, help="the run's seed, in [0, 2**32) (default: the profile's; "
                   "printed either way)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write every result, the matrix and the findings as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the report as Markdown")
    p.add_argument(
        "--bundle-dir",
        default="reflora-failures",
        metavar="DIR",
        help="where failing inputs are saved as .npz bundles (default: reflora-failures)",
    )
    p.add_argument(
        "-k",
        "--select",
        action="append",
        metavar="PATTERN",
        help="run only tests whose id matches PATTERN ('*' wildcards, e.g. 'lora_merge[*')",
    )
    p.add_argument("--deviations", metavar="FILE",
                   help="a deviations file (TOML) to use instead of each backend's own")  # fmt: skip
    p.set_defaults(func=_run_conform)


def replay(
    path: str, backend: str | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``reflora replay``: 0 when the check passes now, 1 on a mismatch or an error, 2 when it cannot run."""
    from reflora.backends import BackendError
    from reflora.conformance.replay import replay as run_replay

    out = PipeSafe(out or sys.stdout)  # `| head` must not turn a FAIL into exit 0
    err = PipeSafe(err or sys.stderr)
    try:
        result = run_replay(path, backend)
    except (OSError, ValueError, KeyError, BackendError) as exc:
        print(f"reflora replay: {exc}", file=err)
        return 2
    print(result.header(), file=out)
    print("", file=out)
    if result.status == "pass":
        print(f"PASS: {result.message}", file=out)
        return 0
    if result.status == "unsupported":
        print(f"UNSUPPORTED: {result.backend} does not run this check: {result.message}", file=out)
        return 2
    if result.status == "rejected":
        print(f"REJECTED (not a failure; no value compared): {result.message}", file=out)
        return 0
    print(f"{result.status.upper()}: {result.message}", file=out)
    if result.declared:
        d = result.declared
        up = f" ({d['upstream']})" if d.get("upstream") else ""
        where = f"{result.backend} ({d['source']})"
        print(f"\nDeclared: a known deviation of {where}: {d['reason']}{up}", file=out)
    return 1


def add_replay_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay",
        help="run a saved conformance failure (.npz bundle) again",
        description="Re-run the check saved in a bundle by `reflora conform` against any backend.",
    )
    p.add_argument("file", metavar="FILE", help="the .npz bundle")
    p.add_argument("--backend", metavar="NAME|module:attr",
                   help="the backend to run it against (default: the one it ran against)")  # fmt: skip
    p.set_defaults(func=_run_replay)


def _run_replay(args: argparse.Namespace) -> int:
    _choose_triton_mode()
    with _hypothesis_home_elsewhere():
        return replay(args.file, args.backend)
