"""Replaying a saved failure: load an ``.npz`` bundle and run its check again, against any backend.

A bundle (:mod:`reflora.conformance.bundle`) holds the exact inputs of one failing example, the check it
ran and the backend it ran against. :func:`replay` runs that same check through the same function the
suite uses (:func:`reflora.conformance.properties.run_check`), so the message is the one the run
printed, and the result says whether the backend now passes. ``reflora replay FILE [--backend NAME]``
is this function on the command line.
"""

from __future__ import annotations

import copy
import shlex
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflora.conformance.bundle import load, matches_its_name
from reflora.conformance.dialect import for_backend as dialect_for
from reflora.conformance.mismatch import Declined, Mismatch, Rejected
from reflora.conformance.properties import Context, ProtocolError, run_check, supported

__all__ = ["ReplayResult", "replay", "replay_command"]


def replay_command(path: str | Path, backend: str) -> str:
    """The one-line shell command that replays the bundle at ``path`` against ``backend``."""
    return f"reflora replay {shlex.quote(str(path))} --backend {shlex.quote(backend)}"


@dataclass
class ReplayResult:
    """status: "pass" (the check holds now), "fail" (a mismatch, as recorded or a new one),
    "unsupported" (the backend does not support the op or declined the inputs), "rejected" (the inputs
    are outside the backend's dialect: nothing compared, see runner) or "error" (the suite could not
    run the check); message: what the suite says; meta: the bundle's record."""

    status: str
    backend: str
    test_id: str
    message: str
    meta: dict[str, Any] = field(default_factory=dict)
    declared: dict[str, Any] | None = None  # a failure the backend's deviations file declares: its entry
    edited: bool = False  # the content no longer matches the digest in the file's name

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    def header(self) -> str:
        """Where the bundle comes from, as a few lines."""
        m = self.meta
        lines = [
            f"replay {m.get('test_id')} ({m.get('check')} check, dtype {m.get('dtype')}) "
            f"against {self.backend}",
            f"  recorded against {m.get('backend_target', m.get('backend'))} (dialect {m.get('dialect')}), "
            f"profile {m.get('profile')}, seed {m.get('seed')}, reflora {m.get('reflora')}",
        ]
        if m.get("note"):
            lines.append(f"  inputs: {m['note']}")
        for note in m.get("hypothesis") or []:
            lines.extend("  " + line for line in str(note).splitlines())
        if self.edited:
            lines.append(
                "  note: the bundle was changed after it was saved (its content no longer matches the digest "
                "in its name): the lines above may not describe its inputs"
            )
        return "\n".join(lines)


def _declared(impl: Any, inputs: Any, m: Mismatch, message: str) -> dict[str, Any] | None:
    """The backend's own deviation entry that declares this failure, as a run would, or None."""
    from reflora.conformance import deviations

    try:
        entries = deviations.active(impl, deviations.for_backend(impl))
    except deviations.DeviationsError:  # a run would refuse the file; replay still shows the failure
        return None
    hit, _ = deviations.declaring(entries, impl, inputs.test_id, m.output, message, inputs)
    return None if hit is None else hit.as_dict()


def _oracle_problem(impl: Any, inputs: Any) -> str | None:
    """Why the check cannot even run on the bundle's inputs with the reference, or None: the suite or
    the reference raised (missing parameters, impossible views, a dropped array), so replaying it would
    blame the backend ``impl`` for the file. A value mismatch of the reference is not such a problem:
    it is what someone working on the oracle replays, and is left to the replay itself; against the
    reference itself the replay shows what it does, whatever that is."""
    from reflora.backends.reference import ReferenceBackend

    if type(impl) is ReferenceBackend:
        return None
    ref = ReferenceBackend()
    try:
        run_check(Context(ref, "reference", dialect_for(ref), None), inputs)
    except Mismatch as m:
        return m.headline() if m.__cause__ is not None else None  # raised from an exception: it raised
    except (Declined, Rejected):  # the reference declines nothing and has no dialect to leave
        return None
    except Exception as exc:  # the suite itself could not run the check on these inputs
        return f"{type(exc).__name__}: {exc}"
    return None


def replay(path: str | Path, backend: str | None = None) -> ReplayResult:
    """Run the check saved in the bundle at ``path`` against ``backend`` (a registered name or
    ``module:attr``; default: the backend the bundle was recorded against). The result notes a bundle
    changed since it was saved (``edited``, :func:`reflora.conformance.bundle.matches_its_name`).

    Raises ValueError for a file that is not a bundle, or whose check cannot run on its inputs even
    with the reference (broken content: parameters, views or arrays the check cannot use), and
    :class:`reflora.backends.BackendError` for a backend that cannot be had; every outcome of the check
    itself is a :class:`ReplayResult`.
    """
    from reflora import backends

    inputs, meta = load(path)  # ValueError, naming the reason, for a file that is not a bundle
    spec = backend  # given, even empty: '' is an unknown backend, as in conform
    if spec is None:
        spec = meta.get("backend_target") or meta.get("backend")
        if not spec:
            raise ValueError(f"{path}: the bundle names no backend; pass one with --backend")
    impl = backends.get(spec)
    problem = _oracle_problem(impl, copy.deepcopy(inputs))  # a copy: the replay sees nothing it touched
    if problem:
        raise ValueError(f"{path} is not a valid bundle: its check cannot run on its inputs even with the "
                         f"reference ({problem})")  # fmt: skip
    result = _check(path, impl, spec, inputs, meta)
    result.edited = matches_its_name(path) is False
    return result


def _check(path: str | Path, impl: Any, spec: str, inputs: Any, meta: dict[str, Any]) -> ReplayResult:
    for op in {inputs.op, *(("quantize_4bit",) if inputs.check == "roundtrip" else ())}:
        try:
            reason = supported(impl, op, inputs.dtype)
        except ProtocolError as exc:
            return ReplayResult("fail", spec, inputs.test_id, f"{inputs.op}: {exc}", meta)
        if reason is not None:
            return ReplayResult("unsupported", spec, inputs.test_id, f"{op}: {reason}", meta)
    ctx = Context(impl, spec, dialect_for(impl), None)
    try:
        run_check(ctx, inputs)
    except Declined as d:
        return ReplayResult("unsupported", spec, inputs.test_id, str(d), meta)
    except Rejected as r:
        return ReplayResult("rejected", spec, inputs.test_id, str(r), meta)
    except Mismatch as m:
        m.bundle, m.replay = str(path), replay_command(path, spec)
        message = m.message()
        return ReplayResult("fail", spec, inputs.test_id, message, meta, _declared(impl, inputs, m, message))
    except Exception as exc:
        text = f"{inputs.test_id}: the suite raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        return ReplayResult("error", spec, inputs.test_id, text, meta)
    return ReplayResult("pass", spec, inputs.test_id, f"{inputs.test_id}: {spec} meets the check", meta)
