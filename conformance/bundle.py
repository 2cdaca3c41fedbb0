"""The inputs of one check, and the ``.npz`` bundle that saves them so any backend can replay them.

An :class:`Inputs` holds everything a check needs: its test id, the op and the check to run, the
dtype, the arrays and the scalar parameters. Arrays are kept *contiguous* together with a *view
recipe*: the backend receives ``apply_view(base, recipe)``, a non-contiguous numpy view, exactly as
hypothesis drew it, and the bundle can rebuild that same view later.

View recipes (a tuple of steps, applied in order):

* ``("T",)``            reverse all axes (``base.T``): a transposed matrix, memory in the other order;
* ``("step", axis, k)`` every k-th element along ``axis`` (``base[..., ::k, ...]``): gaps in memory;
* ``("pad", axis, k)``  all but the last k elements along ``axis`` (``base[..., :-k, ...]``): on the last
  axis, rows of unit stride whose row stride is longer than a row (a slice of a wider buffer).

Bundle format (``numpy.savez_compressed``, readable with ``allow_pickle=False``): one entry
``a.<name>`` per array (bfloat16 stored as its uint16 bits), and ``meta``, the UTF-8 JSON of
``{"format": "reflora-conformance-bundle/1", "test_id", "op", "check", "dtype", "params", "views",
"dtypes", "backend", "backend_target", "dialect", "profile", "seed", "hypothesis", "message",
"reflora"}``. ``reflora replay FILE [--backend NAME]`` loads it and runs the check again.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflora.dtypes import bfloat16

__all__ = ["FORMAT", "Inputs", "apply_view", "describe_view", "load", "make_view", "matches_its_name", "save"]

FORMAT = "reflora-conformance-bundle/1"


def apply_view(base: np.ndarray, recipe: tuple) -> np.ndarray:
    """The view a recipe makes of ``base`` (see the module docstring); never a copy."""
    v = base
    for step in recipe:
        if step[0] == "T":
            v = v.T
        elif step[0] == "step":
            _, axis, k = step
            index = [slice(None)] * v.ndim
            index[axis] = slice(None, None, k)
            v = v[tuple(index)]
        elif step[0] == "pad":
            _, axis, k = step
            index = [slice(None)] * v.ndim
            index[axis] = slice(0, v.shape[axis] - k)
            v = v[tuple(index)]
        else:
            raise ValueError(f"unknown view step {step!r}")
    return v


def make_view(x: np.ndarray, recipe: tuple, fill: float = np.nan) -> np.ndarray:
    """A contiguous base whose view by ``recipe`` equals ``x`` (values and logical order).

    Memory the view skips is filled with ``fill`` (NaN by default), so that a backend reading memory
    instead of the view's elements meets values the view does not hold.
    """
    # Undo the steps from the last to the first: each undo gives the array the previous step saw.
    target = x
    for step in reversed(recipe):
        if step[0] == "T":
            target = np.ascontiguousarray(target.T)
        elif step[0] == "pad":
            _, axis, k = step
            shape = list(target.shape)
            shape[axis] = k
            target = np.concatenate([target, np.full(shape, fill, dtype=x.dtype)], axis=axis)
        else:
            _, axis, k = step
            shape = list(target.shape)
            shape[axis] = shape[axis] * k
            wider = np.full(shape, fill, dtype=x.dtype)
            index = [slice(None)] * target.ndim
            index[axis] = slice(None, None, k)
            wider[tuple(index)] = target
            target = wider
    base = np.ascontiguousarray(target)
    assert np.array_equal(apply_view(base, recipe), x, equal_nan=True)
    return base


def describe_view(recipe: tuple) -> str:
    """'contiguous', 'transposed', 'step 2 on axis 1', ... for a failure message."""
    if not recipe:
        return "contiguous"
    words = []
    for step in recipe:
        if step[0] == "T":
            words.append("transposed")
        elif step[0] == "pad":
            words.append(f"{step[2]} more in memory after each run along axis {step[1]}")
        else:
            words.append(f"every {step[2]}th along axis {step[1]}")
    return " then ".join(words)


@dataclass
class Inputs:
    """What one check needs. ``self[name]`` is the array as the backend receives it (view applied).

    test_id: the suite's id of the test these inputs belong to; op: the op under test; check: the
    name of the check function (:data:`reflora.conformance.properties.CHECKS`); dtype: the test's
    dtype; arrays: contiguous base arrays; views: view recipes by array name (absent: the base as it
    is); params: JSON-able scalars (blocksize, scaling, ...); note: what makes these inputs special.
    """

    test_id: str
    op: str
    check: str
    dtype: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    views: dict[str, tuple] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def __getitem__(self, name: str) -> np.ndarray:
        base = self.arrays[name]
        recipe = self.views.get(name)
        return apply_view(base, recipe) if recipe else base

    def get(self, name: str) -> np.ndarray | None:
        return self[name] if name in self.arrays else None

    def put(self, name: str, x: np.ndarray, recipe: tuple = ()) -> None:
        """Store ``x`` so that ``self[name]`` is a view of it by ``recipe`` (contiguous if empty)."""
        if recipe:
            self.arrays[name] = make_view(x, recipe)
            self.views[name] = tuple(tuple(s) for s in recipe)
        else:
            self.arrays[name] = np.ascontiguousarray(x)
            self.views.pop(name, None)

    def context(self) -> dict[str, Any]:
        """The facts a failure message shows in brackets: params, shapes and non-contiguous views."""
        ctx: dict[str, Any] = dict(self.params)
        for name in self.arrays:
            ctx[f"{name}.shape"] = tuple(self[name].shape)
        for name, recipe in self.views.items():
            ctx[f"{name} view"] = describe_view(recipe)
        return ctx


def _stem(backend: Any, test_id: str) -> str:
    """The name :func:`save` gives a bundle, up to its digest: ``backend-test-id-``."""
    return f"{_slug(str(backend))}-{_slug(test_id)}-"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:80]


def save(inputs: Inputs, directory: str | Path, **meta: Any) -> Path:
    """Write ``inputs`` (plus ``meta``: backend, dialect, profile, seed, message, ...) to an ``.npz``
    bundle in ``directory`` (created if needed); returns its path. The name is derived from the test
    id and the content, so the same failure saves to the same file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for name, a in inputs.arrays.items():
        a = np.ascontiguousarray(a)
        dtypes[name] = "bfloat16" if a.dtype == bfloat16 else a.dtype.name
        entries[f"a.{name}"] = a.view(np.uint16) if a.dtype == bfloat16 else a
    from reflora import __version__

    record = {
        "format": FORMAT,
        "test_id": inputs.test_id,
        "op": inputs.op,
        "check": inputs.check,
        "dtype": inputs.dtype,
        "params": inputs.params,
        "views": {k: [list(s) for s in v] for k, v in inputs.views.items()},
        "dtypes": dtypes,
        "note": inputs.note,
        "reflora": __version__,
        **meta,
    }
    text = json.dumps(record, indent=1, default=str)
    digest = zlib.crc32(text.encode() + b"".join(a.tobytes() for a in entries.values()))
    path = directory / f"{_stem(meta.get('backend', 'backend'), inputs.test_id)}{digest:08x}.npz"
    entries["meta"] = np.frombuffer(text.encode(), dtype=np.uint8)
    try:
        np.savez_compressed(path, **entries)
    except BaseException:  # a full disk, say: no truncated bundle is left to be mistaken for one
        path.unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> tuple[Inputs, dict[str, Any]]:
    """(inputs, meta) from a bundle written by :func:`save`; ValueError naming the reason if it is
    not one (OSError if it cannot be read at all)."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory; give one bundle (.npz) in it")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    # np.load takes a file that is not a zip archive for a pickle and says so; tell the user plainly.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a reflora conformance bundle (not an .npz: no zip archive)")
    try:
        return _load(path)
    except (ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as exc:
        # TypeError / AttributeError: JSON of the wrong shape (a list where an object belongs, ...)
        detail = str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{path} is not a reflora conformance bundle ({detail})") from None


def matches_its_name(path: str | Path) -> bool | None:
    """Whether the bundle's content is still what :func:`save` wrote: the 8 hex digits that end its
    name are the crc32 of its record and arrays. None when it does not bear the name save() gave it (a
    bundle renamed by hand); False when the content changed after it was saved (edited: its note, message and
    recorded failure may no longer describe it)."""
    with np.load(path, allow_pickle=False) as z:
        meta = z["meta"].tobytes()
        record = json.loads(meta.decode())
        # only the name save() gave it: a date or a counter that ends a name given by hand is no digest
        given = _stem(record.get("backend", "backend"), record["test_id"])
        m = re.fullmatch(re.escape(given) + r"([0-9a-f]{8})\.npz", Path(path).name)
        if m is None:
            return None
        digest = zlib.crc32(meta + b"".join(z[f"a.{n}"].tobytes() for n in record["dtypes"]))
    return f"{digest:08x}" == m.group(1)


def _load(path: str | Path) -> tuple[Inputs, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z:
            raise ValueError("no 'meta' entry")
        meta = json.loads(z["meta"].tobytes().decode())
        if not isinstance(meta, dict):
            raise ValueError(f"'meta' is JSON {type(meta).__name__}, not an object")
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown bundle format {meta.get('format')!r}, expected {FORMAT!r}")
        arrays = {}
        for name, dt in meta["dtypes"].items():
            a = z[f"a.{name}"]
            stored = "uint16" if dt == "bfloat16" else dt  # save() writes bfloat16 as its bits
            if a.dtype.name != stored or a.dtype.kind not in "fiub":
                raise ValueError(f"array {name!r} is {a.dtype.name}, its record says {dt!r}")
            arrays[name] = a.view(bfloat16) if dt == "bfloat16" else a
    views = {k: tuple(tuple(s) for s in v) for k, v in meta["views"].items()}
    inputs = Inputs(
        meta["test_id"], meta["op"], meta["check"], meta["dtype"], arrays, views, meta["params"], meta["note"]
    )
    return inputs, meta
