"""The ``reflora`` command.

Each subcommand is a plug-in: an entry point in the group ``reflora.commands`` names a function
``add_parser(subparsers)`` that adds its parser and sets ``func`` (called with the parsed arguments,
returning the exit status). The oracle's own commands are registered the same way as those of
``reflora.conformance`` and ``reflora.backends``, so this module never imports them; a subcommand whose
plug-in fails to load is still listed, and running it prints why.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path

__all__ = [
    "SEEDS",
    "PipeSafe",
    "build_parser",
    "main",
    "nonnegative_int",
    "output_problem",
    "positive_float",
    "positive_int",
    "seed_int",
    "silence",
]


def _number(text: str, kind: type, what: str):
    """``kind(text)``, or the usage error argparse prints as it is ("must be <what>, got '7B'"; a
    ValueError read "invalid positive_float value")."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else as a usage error)."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def output_problem(outputs: Mapping[str, str | None], inputs: Mapping[str, str | None] = {}) -> str | None:
    """Why one of a command's report files cannot be written, found before the work it reports (a
    failure after an hour's run loses the run): None if every one can be.

    outputs: option -> path of each report (None or '': not asked for); inputs: option -> path the
    command reads. Refused: '-' (the report on stdout is printed anyway; it made a file named '-'), a
    directory, a missing directory, an unwritable file or directory, and a path that is an input, an
    earlier output, or inside an input directory (each was overwritten silently, or read back as input)."""
    read = {Path(p).resolve(): option for option, p in inputs.items() if p}
    written: dict[Path, str] = {}
    for option, path in outputs.items():
        if not path:
            continue
        if path == "-":
            return f"{option} -: the report goes to stdout already; give a file name"
        p = Path(path)
        if p.is_dir():
            return f"{option} {path} is a directory; give a file name"
        if not p.parent.is_dir():
            return f"{option} {path}: the directory {p.parent} does not exist"
        if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            return f"{option} {path} is not writable"
        target = p.resolve()
        clash = read.get(target) or written.get(target)
        if clash:
            return f"{option} {path} is also {clash}'s file: it would be overwritten; give another name"
        holder = next((o for at, o in read.items() if at in target.parents), None)
        if holder:
            return (f"{option} {path} is inside {holder}'s directory, which the command reads: "
                    "give a path outside it")  # fmt: skip
        written[target] = option
    return None


def silence(out) -> None:
    """After a BrokenPipeError on ``out`` (the reader stopped reading, as ``| head`` does): point its
    descriptor at /dev/null, so that the interpreter's last flush does not raise again on the way out.
    A command that caught the error this way keeps its own exit status."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # not a real file (a StringIO)
        pass


class PipeSafe:
    """``stream`` for the output of a command whose reader may stop reading (``| head``, ``2>&1 | head``):
    after a BrokenPipeError the writes go nowhere (:func:`silence`) and the command runs on, so its
    report files are written and its exit status kept. ``broken`` says whether that happened."""

    def __init__(self, stream) -> None:
        self.stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._break()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def _break(self) -> None:
        self.broken = True
        silence(self.stream)


SEEDS = 2**32  # numpy's and hypothesis' seeds are 32-bit; a larger one would alias a smaller one


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**32)."""
    value = _number(text, int, "an integer in [0, 2**32)")
    if not 0 <= value < SEEDS:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (e.g. 7e9)."""
    value = _number(text, float, "a finite number > 0 (e.g. 7e9)")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _unavailable(name: str, error: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"reflora {name}: unavailable: {type(error).__name__}: {error}", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    from reflora import __version__

    parser = argparse.ArgumentParser(
        prog="reflora",
        description="The correctness oracle, and a fast path, for LoRA and QLoRA.",
    )
    parser.add_argument("--version", action="version", version=f"reflora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="reflora.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plug-in must not take the other commands down
            broken = sub.add_parser(ep.name, help=f"(unavailable: {exc})")
            broken.set_defaults(func=_unavailable(ep.name, exc))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C in a command that does not handle it itself: a line, not a traceback
        print(f"\nreflora {args.command}: stopped (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
