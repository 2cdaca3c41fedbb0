"""``reflora inspect CHECKPOINT [--original ORIGINAL]``: the report of :mod:`reflora.checkpoint`, printed.

One row a 4-bit weight (shape, format, stored bits a weight, health counts and, with an original, the
quantization error and the dialects that reproduce its bytes), a line under any weight that is invalid
or reproduced by no dialect, then a summary. Exit status: 0 when every weight passes
(:attr:`reflora.checkpoint.WeightReport.passed`), 1 when one does not, 2 when nothing could be inspected
or the ``--json`` file could not be written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TextIO

from reflora import checkpoint as ck
from reflora.cli import PipeSafe, output_problem
from reflora.formats.files import write_files
from reflora.formats.safetensors import SafetensorsError

__all__ = ["add_parser", "format_report", "run"]

_HEADER = ("weight", "shape", "type", "block", "DQ", "bits/w", "zero blk", "neg blk (flipped)", "rel err")


def _row(r: ck.WeightReport, with_original: bool) -> tuple[str, ...]:
    if r.shape is None:
        return (r.key, *("-",) * (len(_HEADER) - 1 + with_original))
    cells = (
        r.key,
        "x".join(map(str, r.shape)),
        r.quant_type,
        str(r.blocksize),
        "yes" if r.double_quant else "no",
        f"{r.bits_per_weight:.3f}",
        str(r.zero_blocks),
        f"{r.negative_blocks} ({r.flipped_weights})",
        "-" if r.rel_error is None else _relative(r.rel_error),
    )
    if with_original:
        cells += (", ".join(r.reproduced_by) if r.reproduced_by else ("-" if r.error else "none"),)
    return cells


def _relative(v: float) -> str:
    """A relative error: four decimals, or three significant digits in exponent form where four
    decimals say nothing (below 1e-4) or would widen the table (1e4 and more: a 40-digit number was
    printed)."""
    return f"{v:.4f}" if v == 0 or 1e-4 <= v < 1e4 else f"{v:.3e}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _notes(r: ck.WeightReport) -> list[str]:
    notes = []
    if r.error:
        notes.append(f"  ! {r.error}")
    if r.nonfinite:
        notes.append(
            f"  ! {r.nonfinite} dequantized value{'s are' if r.nonfinite != 1 else ' is'} not finite"
        )
    if r.reproduced_by == ():
        diffs = "; ".join(
            f"{d}: {r.refused[d] if n < 0 else f'{n} codes, {r.scale_diffs[d]} scales'}"
            for d, n in r.code_diffs.items()
        )
        where = f"; {r.first_diff}" if r.first_diff else ""
        notes.append(f"  ~ reproduced by no dialect ({diffs}){where}")
    return notes


def _summary(reports: list[ck.WeightReport], with_original: bool) -> list[str]:
    invalid = [r for r in reports if r.shape is None]
    lines = [f"{_count(len(reports), 'weight')}: {len(reports) - len(invalid)} valid, {len(invalid)} invalid"]
    if with_original:
        compared = [r for r in reports if r.reproduced_by is not None]
        per = {d: sum(d in r.reproduced_by for r in compared) for d in ck.DIALECTS}
        lines.append(
            f"compared with the original: {len(compared)}; codes and scales reproduced byte for byte by "
            + ", ".join(f"{d} {k}" for d, k in per.items())
            + f"; by none {sum(not r.reproduced_by for r in compared)}"
        )
        if len(compared) > 1 and not any(r.reproduced_by for r in compared):
            lines.append(
                "no weight is reproduced by any implementation: is --original the model this checkpoint "
                "was quantized from (its weights, in the same order)?"
            )
    flipped = [r for r in reports if r.negative_blocks]
    if flipped:
        blocks, weights = sum(r.negative_blocks for r in flipped), sum(r.flipped_weights for r in flipped)
        lines.append(
            f"negative rebuilt scales: {_count(len(flipped), 'weight')}, {_count(blocks, 'block')}; "
            f"{_count(weights, 'weight')} dequantize with the sign flipped "
            "(docs/spec.md, negative rebuilt scales)"
        )
    zero = sum(r.zero_blocks for r in reports)
    if zero:
        lines.append(f"blocks that dequantize to all zeros: {zero}")
    lines.append("PASS" if all(r.passed for r in reports) else "FAIL")
    return lines


def format_report(reports: list[ck.WeightReport], with_original: bool) -> str:
    """The table, notes and summary ``reflora inspect`` prints."""
    header = _HEADER + (("reproduced by",) if with_original else ())
    rows = [_row(r, with_original) for r in reports]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for r, row in zip(reports, rows, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        lines.extend(_notes(r))
    return "\n".join([*lines, "", *_summary(reports, with_original)])


def _progress(err: TextIO):
    """On a terminal a status line rewritten for each weight; in a log a line each tenth of the weights."""
    tty = err.isatty()

    def say(done: int, total: int, key: str) -> None:
        if tty:
            err.write(f"\r\033[K[{done + 1}/{total}] {key[:70]}")
        elif done % max(1, total // 10) == 0:
            err.write(f"[{done + 1}/{total}] {key}\n")
        else:
            return
        err.flush()

    return say


def run(
    checkpoint: str,
    original: str | None = None,
    *,
    json_path: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Inspect as ``reflora inspect`` does; returns the exit status (0 pass, 1 fail, 2 nothing inspected,
    or the report printed, with its PASS or FAIL, but the ``--json`` file not written)."""
    out, err = PipeSafe(out or sys.stdout), PipeSafe(err or sys.stderr)  # `| head`: status and JSON kept
    problem = output_problem({"--json": json_path}, {"the checkpoint": checkpoint, "--original": original})
    if problem:
        print(f"reflora inspect: {problem}", file=err)
        return 2
    try:
        reports = ck.inspect(checkpoint, original, progress=_progress(err))
    except (ck.InspectError, SafetensorsError, OSError) as e:
        print(f"reflora inspect: {e}", file=err)
        return 2
    finally:
        if err.isatty():
            err.write("\r\033[K")
    passed = all(r.passed for r in reports)
    # The report first: a --json file that cannot be written after all (a full disk) loses no run.
    # A reader who stops reading (`| head`) does not stop the command (PipeSafe): the file is still written.
    files = f"{checkpoint}" + (f"; original: {original}" if original else "")
    print(f"reflora inspect {files}", file=out)
    if original:
        print(f"dialects tried: {', '.join(ck.DIALECTS)} (bnb-cuda is emulated from source)", file=out)
    print(file=out)
    print(format_report(reports, original is not None), file=out)
    out.flush()
    if json_path:
        record = {
            "checkpoint": str(checkpoint),
            "original": None if original is None else str(original),
            "dialects": list(ck.DIALECTS),
            "passed": passed,
            "weights": [{**dataclasses.asdict(r), "passed": r.passed} for r in reports],
        }
        try:
            write_files({json_path: (json.dumps(record, indent=1, default=str) + "\n").encode("utf-8")})
        except OSError as e:
            print(f"reflora inspect: the report above was not saved: --json {json_path}: {e}", file=err)
            return 2
    return 0 if passed else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``reflora inspect``: validity, health and provenance of every 4-bit weight in a checkpoint."""
    p = subparsers.add_parser(
        "inspect",
        help="check every 4-bit weight of a bitsandbytes-format checkpoint (against its original, if given)",
        description=(
            "Read every 4-bit weight of a Hugging Face + bitsandbytes checkpoint (a .safetensors file or a "
            "directory of shards), check it reads back under bitsandbytes' rules, count blocks that "
            "dequantize to zeros or with flipped signs, and, given the unquantized original, say which "
            "implementation's quantization reproduces its bytes exactly."
        ),
    )
    p.add_argument("checkpoint", help="a .safetensors file or a directory of them")
    p.add_argument("--original", metavar="PATH", help="the unquantized model (same keys): file or directory")
    p.add_argument("--json", metavar="FILE", help="write every weight's report as JSON")
    p.set_defaults(func=lambda a: run(a.checkpoint, a.original, json_path=a.json))
