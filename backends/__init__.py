"""reflora.backends: the Backend protocol and the registry of implementations.

Backends are registered as entry points in the group ``reflora.backends`` (name = "module:attr", the
attribute a backend instance, or a class or factory taking no arguments), so a third party plugs in from
its own package without editing reflora. Nothing is imported until a backend is asked for.

``get("torch")`` returns a registered backend, ``get("mypkg.mod:MyBackend")`` one that is not registered.
An unknown, broken or unavailable backend raises :class:`BackendError` with the list of installed
backends and why each one is or is not available: there is no silent fallback. Nor is one name quietly
given to one of two packages that both register it: the listing shows the clash, and the name is
refused until one is named by ``module:attr``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from reflora.backends.protocol import DTYPES, OPS, Backend, BaseBackend

__all__ = [
    "DTYPES",
    "GROUP",
    "OPS",
    "Backend",
    "BackendError",
    "BaseBackend",
    "Status",
    "get",
    "names",
    "status",
    "status_lines",
]

GROUP = "reflora.backends"


class BackendError(LookupError):
    """A backend that cannot be had: unknown, failing to load, or unavailable here."""


@dataclass(frozen=True)
class Status:
    """One registered backend: its name, where it comes from, and whether it can run here."""

    name: str
    target: str
    dialect: str | None
    available: bool
    reason: str = ""

    def line(self, width: int = 14) -> str:
        """The listing's line, the name padded to ``width``."""
        state = "available" if self.available else f"unavailable: {self.reason}"
        dialect = f" (dialect {self.dialect})" if self.dialect else ""
        return f"{self.name:<{width}} {state}{dialect}  [{self.target}]"


def _entry_points() -> dict[str, str]:
    """name -> target; a name two packages register with different targets maps to all of them,
    joined by " | " (no one of them is loaded under that name: :func:`_clash`)."""
    found: dict[str, list[str]] = {}
    for ep in entry_points(group=GROUP):
        if ep.value not in found.setdefault(ep.name, []):
            found[ep.name].append(ep.value)
    return {name: " | ".join(targets) for name, targets in found.items()}


def _clash(name: str, target: str) -> str | None:
    """Why ``name`` cannot be loaded when more than one package registers it, else None."""
    if " | " not in target:
        return None
    return (f"the name {name!r} is registered by more than one package ({target}); "
            "run one with --backend module:attr")  # fmt: skip


_LOADING: set[str] = set()  # targets being loaded: a factory that loads itself again is no backend


class _Reentered(BaseException):
    """Raised where a target asks for itself while it is being made (``--backend reflora.cli:main`` runs
    the command again). A BaseException, so that the inner command cannot catch and print it: it
    unwinds to the outer :func:`_load`, which says once what happened."""


def names() -> list[str]:
    """The names of the registered backends, sorted."""
    return sorted(_entry_points())


def _import(module: str) -> Any:
    """``importlib.import_module``; a module the path lacks is then looked for in the current directory,
    after everything installed, so that ``reflora conform --backend mymodule:Cls`` (and the replay line
    it prints) finds a module there as ``python -m reflora`` does."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module.partition(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        importlib.invalidate_caches()
        return importlib.import_module(module)


def _load(target: str) -> Backend:
    module, _, attr = target.partition(":")
    if not attr:
        raise BackendError(f"{target!r} is not of the form 'module:attr'")
    if target in _LOADING:  # `--backend reflora.cli:main`: calling it ran the command, which loads it again
        raise _Reentered(target)
    obj = _import(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    # A class or a factory is called to make the backend; an instance is used as it is.
    _LOADING.add(target)
    try:
        backend = obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "dialect")) else obj
    except _Reentered:
        raise BackendError(f"{target} is not a backend: calling it asked for {target} again") from None
    finally:
        _LOADING.discard(target)
    missing = [m for m in ("name", "dialect", "supports", *OPS) if not hasattr(backend, m)]
    if missing:
        raise BackendError(f"{target} does not implement the Backend protocol: missing {', '.join(missing)}")
    return backend


def _availability(backend: Backend) -> tuple[bool, str]:
    """(True, "") when the backend can run here, else (False, why): its ``available()`` reason, what it
    raised, or what is wrong with what it returned."""
    check = getattr(backend, "available", None)
    try:
        verdict = check() if callable(check) else True
    except Exception as exc:  # a probe that crashes (no driver, say) is a reason, not a crash of ours
        return False, f"available() raised {type(exc).__name__}: {exc}"
    if verdict is False:
        return False, "available() returned False"
    if isinstance(verdict, str) and verdict.strip():
        return False, verdict
    if verdict is not True:
        return False, f"available() returned {verdict!r}: it must return True or a reason (a str)"
    return True, ""


def _dialect_problem(backend: Backend) -> str | None:
    """Why the backend's dialect cannot be used (one reflora does not know), for the listing: the
    suite refuses such a backend before any test."""
    from reflora import dialects

    try:
        dialects.get(backend.dialect)
    except (ValueError, TypeError) as exc:
        return f"the suite cannot run it: {exc}"
    return None


def status() -> list[Status]:
    """Load every registered backend and report whether it can run here (for ``reflora backends``)."""
    rows = []
    for name, target in sorted(_entry_points().items()):
        clash = _clash(name, target)
        if clash:
            rows.append(Status(name, target, None, False, clash))
            continue
        try:
            backend = _load(target)
            ok, reason = _availability(backend)
            problem = _dialect_problem(backend) if ok else None
            if problem:
                ok, reason = False, problem
            rows.append(Status(name, target, backend.dialect, ok, reason))
        except Exception as exc:  # a broken plug-in is reported, not raised, in a listing
            rows.append(Status(name, target, None, False, f"{type(exc).__name__}: {exc}"))
    return rows


def status_lines(rows: list[Status]) -> list[str]:
    """Each row's :meth:`Status.line`, the names padded to one width (at least 14): the listing of
    ``reflora backends`` and of a backend error."""
    width = max([14, *(len(r.name) for r in rows)])
    return [r.line(width) for r in rows]


def _listing() -> str:
    rows = status()
    body = [f"  {line}" for line in status_lines(rows)] or ["  (none: is reflora installed?)"]
    return "installed backends:\n" + "\n".join(body)


def get(name: str) -> Backend:
    """The backend registered as ``name``, or loaded from ``module:attr``; raises :class:`BackendError`."""
    registered = _entry_points()
    target = registered.get(name, name if ":" in name else None)
    if target is None:
        raise BackendError(f"unknown backend {name!r}\n{_listing()}")
    clash = _clash(name, target)
    if clash:
        raise BackendError(f"{clash}\n{_listing()}")
    try:
        backend = _load(target)
    except BackendError as exc:
        raise BackendError(f"{exc}\n{_listing()}") from None
    except Exception as exc:
        raise BackendError(
            f"backend {name!r} failed to load: {type(exc).__name__}: {exc}\n{_listing()}"
        ) from exc
    ok, reason = _availability(backend)
    if not ok:
        raise BackendError(f"backend {name!r} is unavailable here: {reason}\n{_listing()}")
    return backend
