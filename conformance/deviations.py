"""Known deviations: a backend's own list of the tests it is known to fail, each with a reason.

A backend points to its file with the attribute ``deviations`` (a path; a relative path is taken
relative to the file of the class that sets it, so a subclass elsewhere inherits its parent's file; set
on the instance, relative to the file of the backend's class). The file is TOML::

    # Known deviations of the "bitsandbytes" backend from the dialect it claims (bnb-cpu).
    [[deviation]]
    test = "quantize_4bit[*non-finite* -> error, *]"
    reason = "bitsandbytes quantizes NaN and inf instead of raising: the block's absmax becomes NaN"
    upstream = "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/0000"  # optional

    [[deviation]]
    test = "quantize_4bit[NaN weight -> error, *]"
    reason = "..."

Keys of each ``[[deviation]]`` table: ``test`` (required), a test-id pattern in which ``*`` matches any
run of characters and everything else is literal (brackets and commas included), matched against the
whole id; ``reason`` (required), why the backend deviates; ``upstream`` (optional), an issue or a
document that records it; ``output`` (optional), the output the deviation is in (``code``, ``absmax``,
``grad_A``, ``result``, ``out.shape``, ... as the failure's first line names it): with it, a failure in
another output of the same test is still a failure; ``message`` (optional), text the failure's first line
must contain (the error a library raises, say: ``output = "result"`` names any exception, ``message``
which one), so that another error in the same output is still a failure; ``when`` (optional), the name
of a condition the backend defines on a failing example's inputs (:func:`condition`): the entry declares a
failure only if the condition holds for the minimal example hypothesis found, so an entry about a defect
that only some inputs meet (a shape, a machine) cannot declare a different failure of the same test. An
entry whose condition cannot hold on this machine (asked with no inputs) is inactive: it declares nothing
and draws no warning; an active one that declared nothing in a run draws none either (the draws may not
have met its condition). Unknown keys are an error, so a typo cannot silently disable an entry.

A failing test that matches an entry is reported as *declared* (listed with its reason and message,
not counted as a failure). An entry that matches no test id of the suite draws a warning, and so does
one whose tests all passed (the deviation may have been fixed, or this run did not meet it).
"""

from __future__ import annotations

import inspect
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Deviation",
    "DeviationsError",
    "active",
    "condition",
    "declaring",
    "for_backend",
    "load",
    "pattern_regex",
]

_KEYS = {"test", "reason", "upstream", "output", "message", "when"}


class DeviationsError(ValueError):
    """A deviations file that cannot be read or does not follow the format."""


def pattern_regex(pattern: str) -> re.Pattern:
    """The regex a test-id pattern stands for: ``*`` is any run of characters, the rest literal."""
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


@dataclass(frozen=True)
class Deviation:
    """One entry: the test-id pattern, the reason, the upstream reference, and where it was read."""

    test: str
    reason: str
    upstream: str = ""
    source: str = ""
    output: str = ""  # "": any output of the matching tests
    message: str = ""  # "": any failure message
    when: str = ""  # "": on any inputs; else the backend's condition (see condition())

    def matches(self, test_id: str, output: str | None = None, message: str | None = None) -> bool:
        """Whether the entry covers ``test_id`` (and, when both name one, a failure in ``output`` whose
        first line contains the entry's ``message``)."""
        if self.output and output is not None and output != self.output:
            return False
        if self.message and message is not None and self.message not in message.split("\n", 1)[0]:
            return False
        return bool(pattern_regex(self.test).match(test_id))

    def as_dict(self) -> dict[str, str]:
        return {"test": self.test, "reason": self.reason, "upstream": self.upstream, "source": self.source,
                "output": self.output, "message": self.message, "when": self.when}  # fmt: skip


def load(path: str | Path) -> list[Deviation]:
    """The entries of a deviations file; DeviationsError naming the file and the entry otherwise."""
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:  # it named neither the file nor what it is not
        raise DeviationsError(f"{path}: not a TOML deviations file (not UTF-8 text: {exc})") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeviationsError(f"{path}: {exc}") from exc
    unknown = set(data) - {"deviation"}
    if unknown:
        raise DeviationsError(f"{path}: unknown top-level keys {sorted(unknown)}; use [[deviation]] tables")
    entries = data.get("deviation", [])
    if not isinstance(entries, list):
        raise DeviationsError(f"{path}: 'deviation' must be an array of tables ([[deviation]])")
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}, deviation #{i + 1}"
        if not isinstance(entry, dict):
            raise DeviationsError(f"{where}: not a table")
        if set(entry) - _KEYS:
            raise DeviationsError(
                f"{where}: unknown keys {sorted(set(entry) - _KEYS)} (allowed: {sorted(_KEYS)})"
            )
        for key in ("test", "reason"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise DeviationsError(f"{where}: '{key}' must be a non-empty string")
        optional = {key: entry.get(key, "") for key in ("upstream", "output", "message", "when")}
        if not all(isinstance(v, str) for v in optional.values()):
            raise DeviationsError(f"{where}: 'upstream', 'output', 'message' and 'when' must be strings")
        out.append(Deviation(entry["test"], entry["reason"].strip(), optional["upstream"], str(path),
                             optional["output"].strip(), optional["message"].strip(),
                             optional["when"].strip()))  # fmt: skip
    return out


def for_backend(backend: Any) -> list[Deviation]:
    """The entries of ``backend.deviations`` (none if it has no such attribute or it is None)."""
    path = getattr(backend, "deviations", None)
    if path is None:
        return []
    path = Path(path)
    if not path.is_absolute():
        try:
            path = Path(inspect.getfile(_owner(backend))).parent / path
        except TypeError:  # a class without a source file: take the path as given
            pass
    return load(path)


def _owner(backend: Any) -> type:
    """The class whose file a relative ``deviations`` path is taken from: the one that sets it (a
    subclass elsewhere inherits its parent's file), or the backend's own class when the instance does."""
    if "deviations" not in getattr(backend, "__dict__", {}):
        for cls in type(backend).__mro__:
            if "deviations" in vars(cls):
                return cls
    return type(backend)


def condition(backend: Any, name: str, inputs: Any = None) -> bool:
    """Whether the backend's condition ``name`` (a deviation's ``when``) holds for ``inputs`` (a failing
    example's :class:`reflora.conformance.bundle.Inputs`), or, with ``inputs`` None, whether it can hold
    on this machine at all.

    A backend defines its conditions with a method ``deviation_condition(name, inputs) -> bool`` that
    raises ValueError for a name it does not know. DeviationsError for a backend without the method, an
    unknown name (checked before any test runs, so a typo cannot silently disable an entry), or a
    condition that raises anything else.
    """
    method = getattr(backend, "deviation_condition", None)
    if method is None:
        raise DeviationsError(
            f"deviation condition {name!r}: {type(backend).__name__} has no deviation_condition(name, inputs)"
        )
    try:
        return bool(method(name, inputs))
    except ValueError as exc:
        raise DeviationsError(f"deviation condition {name!r}: {exc}") from exc
    except Exception as exc:  # a bug in the backend's condition: reported by the caller, not a crash
        raise DeviationsError(f"deviation condition {name!r} raised {type(exc).__name__}: {exc}") from exc


def active(backend: Any, entries: list[Deviation]) -> list[Deviation]:
    """The entries that can apply on this machine: those without ``when``, and those whose condition can
    hold here (:func:`condition` with no inputs). DeviationsError for an unknown condition."""
    return [d for d in entries if not d.when or condition(backend, d.when)]


def declaring(
    entries: list[Deviation], backend: Any, test_id: str, output: str | None, message: str, inputs: Any
) -> tuple[Deviation | None, list[str]]:
    """The first of ``entries`` that declares a failure of ``test_id`` (in ``output``, with ``message``,
    on the failing example's ``inputs``), or None; and, for each entry before it whose pattern matched
    but whose condition raised, why it declared nothing (a bug in a condition leaves the failure a
    failure, and says so, rather than stopping the run)."""
    notes = []
    for d in entries:
        if not d.matches(test_id, output, message):
            continue
        if not d.when:
            return d, notes
        try:
            if inputs is not None and condition(backend, d.when, inputs):
                return d, notes
        except DeviationsError as exc:
            notes.append(f"(not declared by {d.test!r} ({d.source}): its {exc})")
    return None, notes
