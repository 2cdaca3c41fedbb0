"""``reflora backends``: the registered backends and whether each can run here."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    from reflora.backends import status, status_lines
    from reflora.backends.triton.backend import use_interpreter

    use_interpreter()  # as `reflora conform` does: without CUDA the triton backend runs interpreted

    rows = status()
    for line in status_lines(rows):
        print(line)
    if not rows:
        print("no backends are registered: is reflora installed (pip install -e .)?")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("backends", help="list the registered backends and whether each is available")
    p.set_defaults(func=_run)
