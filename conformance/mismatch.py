"""How a check fails: :class:`Mismatch`, with a message that reads like numpy.testing plus a reproducer.

    dequantize_4bit: out[3, 17] = 0.4407, expected 0.4375 (|Δ| = 3.2e-03 > ULP(0) = 0)
      [backend=triton, dialect=reflora, dtype=float16, blocksize=64, x.shape=(5, 33)]
    Mismatched elements: 3 / 165 (1.82%)
    Max absolute difference: 3.2e-03 at [3, 17]
    Max relative difference: 7.3e-03 at [3, 17]
    Bundle: reflora-failures/triton-dequantize_4bit-random-float16-1a2b3c4d.npz
    Reproduce: reflora replay reflora-failures/triton-...npz --backend triton

The first line names the op, the output and the *first* mismatching index (row-major order), both
values, and the tolerance that was broken; the bracket holds the backend, its dialect, the dtype and
every drawn parameter. The bundle lines are added by the runner once the inputs are saved.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Declined", "Mismatch", "Rejected", "fmt_index", "fmt_value"]


def fmt_index(index: tuple[int, ...] | None) -> str:
    """'[3, 17]' for a multi-index, '' for None or a 0-d index."""
    return "" if not index else "[" + ", ".join(str(int(i)) for i in index) + "]"


def fmt_value(v: Any) -> str:
    """A number as a failure message shows it: 7 significant digits, ints and bools as they are."""
    if isinstance(v, (bool, np.bool_, str)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    f = float(v)
    return repr(f) if f != f or f in (float("inf"), float("-inf")) else f"{f:.7g}"


def _fmt_context(ctx: dict[str, Any]) -> str:
    parts = []
    for k, v in ctx.items():
        if isinstance(v, float):
            v = fmt_value(v)
        parts.append(f"{k}={v}")
    return "[" + ", ".join(parts) + "]"


class Mismatch(AssertionError):
    """A backend's result differs from the oracle beyond the tolerance of the output.

    op: the op under test; output: which output ("out", "code", "absmax", "grad_A", "raises", ...);
    index: the first mismatching multi-index (None for a whole-output fact such as a shape);
    actual / expected: the two values as text; why: the broken tolerance ("|Δ| = 3e-3 > ULP(0) = 0");
    context: backend, dialect, dtype and the drawn parameters; summary: further lines (counts,
    max errors, details). The runner attaches ``inputs`` (an :class:`reflora.conformance.bundle.Inputs`)
    and, once saved, ``bundle`` and ``replay`` (or ``unsaved``, why the bundle could not be saved).
    """

    def __init__(
        self,
        op: str,
        output: str,
        index: tuple[int, ...] | None,
        actual: str,
        expected: str,
        why: str,
        context: dict[str, Any] | None = None,
        summary: list[str] | None = None,
    ) -> None:
        self.op, self.output, self.index = op, output, index
        self.actual, self.expected, self.why = actual, expected, why
        self.context = dict(context or {})
        self.summary = list(summary or [])
        self.inputs = None
        self.bundle: str | None = None
        self.replay: str | None = None
        self.unsaved: str | None = None  # why no bundle could be saved (a full disk), once tried
        super().__init__(self.headline())

    def headline(self) -> str:
        where = f"{self.output}{fmt_index(self.index)}"
        return f"{self.op}: {where} = {self.actual}, expected {self.expected} ({self.why})"

    def message(self) -> str:
        """The full message: headline, context, summary lines, and the reproducer once known."""
        lines = [self.headline(), "  " + _fmt_context(self.context), *self.summary]
        if self.bundle:
            lines.append(f"Bundle: {self.bundle}")
        if self.replay:
            lines.append(f"Reproduce: {self.replay}")
        if self.unsaved:
            lines.append(f"Not saved: {self.unsaved}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message()


class Rejected(Exception):
    """The inputs are outside the claimed dialect (it has no state for them) and no value could be
    compared: quantize's backend rejected them as its dialect does (accepting them is a Mismatch), and
    dequantize, the round trip and QLoRA have no state to run on. Not a failure, and not a pass of a
    value check: a test whose every example ends here is reported as ``rejected``."""


class Declined(Exception):
    """The backend raised NotImplementedError for these (valid) inputs: the example is not counted.

    A test whose every example is declined is reported as unsupported, with the backend's message;
    a test with some declined examples reports how many (nothing is hidden)."""
