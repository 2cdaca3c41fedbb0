"""The ``reflora`` command.

Each subcommand is a plug-in: an entry point in the group ``reflora.commands`` names a function
``add_parser(subparsers)`` that adds its parser and sets ``func`` (called with the parsed arguments,
returning the exit status). The oracle's own commands are registered the same way as those of
``reflora.conformance`` and ``reflora.backends``, so this module never imports them; a subcommand whose
plug-in fails to load is still listed, and running it prints why.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

__all__ = ["build_parser", "main"]


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


if __name__ == "__main__":
    sys.exit(main())
