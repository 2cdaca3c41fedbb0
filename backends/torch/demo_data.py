"""The demo's task: does this summary describe this function? Built from the Python standard library.

Every public function or class defined in the modules of :data:`MODULES` with a docstring gives one
(name, summary) pair: the name as ``module.function`` and the summary as the docstring's first
sentence. Summaries that contain the function's own name (or one of its ``_``-separated parts of three
letters or more) are dropped, so that the task cannot be solved by spotting the name in the text.

Each kept function yields two examples:

* label 1: its own summary;
* label 0: the summary of another function, drawn from the same module when the module has one
  (``numpy.random.default_rng(seed)``, functions in sorted order), so that the topic alone does not
  give the answer away.

A function is in the evaluation split when ``crc32(name) % 5 == 0`` (about a fifth), so evaluation
names and their true summaries are never seen in training; training examples are shuffled with the same
generator. For a given Python version (docstrings change between releases) and seed the data set is
identical from run to run and machine to machine: it reads only source text shipped with Python. The
callables are collected in a fresh interpreter (:func:`functions`), because libraries imported into the
caller's process may patch standard-library callables (one of the demo's imports replaces
``inspect.getfile``, which then no longer looks defined in ``inspect``), and one callable more or less
would change every draw after it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["MODULES", "Example", "build", "functions"]

MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "codecs", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "datetime", "decimal", "difflib", "email.utils", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.cookies",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "mimetypes", "operator", "os", "os.path", "pathlib", "pickle", "platform", "plistlib",
    "poplib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3", "statistics", "string",
    "struct", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse", "urllib.request", "uu",
    "uuid", "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "zipfile", "zlib",
)  # fmt: skip


@dataclass(frozen=True)
class Example:
    """One sentence pair: ``name`` ("module.function"), ``summary`` (a sentence), ``label`` 1 if the
    summary is that function's own, else 0."""

    name: str
    summary: str
    label: int


_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)")


def _summary(doc: str) -> str | None:
    """The docstring's first sentence (of its first paragraph), or None if it is unusable."""
    para = " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())
    m = _SENTENCE.match(para)
    text = m.group(1) if m else para
    words = text.split()
    if not 4 <= len(words) <= 30 or "(" in words[0] or text.startswith(("Return self", "Create and return")):
        return None  # signatures, "Return self<op>value." and other boilerplate say nothing of the name
    return text


def _names_itself(name: str, summary: str) -> bool:
    """Whether the summary contains the name, or a word of it (split at "_" and at CamelCase humps)."""
    low = summary.lower()
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)
    parts = [name.lower(), *(w.lower() for w in words if len(w) >= 3)]
    return any(p in low for p in parts)


def _defined_in(obj: object, module: object) -> bool:
    """Whether ``obj`` belongs to ``module`` rather than being imported into it from elsewhere: its
    ``__module__`` is the module's name, that name with a leading underscore (a C accelerator), or, for
    ``os``, the platform module it re-exports (posix, nt)."""
    home = getattr(obj, "__module__", None)
    if home is None:
        return True
    name = module.__name__
    return home in (name, "_" + name) or (name == "os" and home in ("posix", "nt"))


def _collect(mod_name: str, out: dict[str, tuple[str, str, str]]) -> None:
    """Add the usable callables of module ``mod_name`` to ``out`` (see :func:`functions`)."""
    try:
        mod = importlib.import_module(mod_name)
    except Exception:  # a module missing from this Python (uu is gone in 3.13): skip, do not fail
        return
    for attr in sorted(vars(mod)):
        obj = getattr(mod, attr)
        if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if not _defined_in(obj, mod):
            continue
        summary = _summary(inspect.getdoc(obj) or "")
        if summary is None or _names_itself(attr, summary):
            continue
        out[f"{mod_name}.{attr}"] = (mod_name, f"{mod_name}.{attr}", summary)


def _functions_here(modules: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """:func:`functions` computed in this process, as its imports have left the standard library."""
    out: dict[str, tuple[str, str, str]] = {}
    with warnings.catch_warnings():  # deprecated modules and attributes (uu, typing.re) still have docs
        warnings.simplefilter("ignore", DeprecationWarning)
        for mod_name in modules:
            _collect(mod_name, out)
    # One summary, one meaning: drop summaries shared by several names (aliases), which would be
    # positives and negatives at once.
    counts: dict[str, int] = {}
    for _, _, s in out.values():
        counts[s] = counts.get(s, 0) + 1
    return sorted(v for v in out.values() if counts[v[2]] == 1)


def functions(modules: tuple[str, ...] = MODULES) -> list[tuple[str, str, str]]:
    """Sorted (module, "module.function", summary) for the usable public callables of ``modules``.

    A module that cannot be imported here is skipped; a callable imported into a module from another
    one is left out (:func:`_defined_in`), so each callable is listed under its own module. Collected
    in a fresh, isolated interpreter running this file, so that what the caller has imported cannot
    change the result (see the module docstring).
    """
    done = subprocess.run([sys.executable, "-I", __file__, *modules], capture_output=True, text=True,
                          check=False, timeout=300)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"collecting the demo's standard-library functions failed:\n{done.stderr}")
    return [tuple(row) for row in json.loads(done.stdout)]


def build(seed: int = 0, modules: tuple[str, ...] = MODULES) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples, balanced between labels, deterministic for a Python version and seed."""
    rng = np.random.default_rng(seed)
    funcs = functions(modules)
    if len(funcs) < 2:
        raise RuntimeError("too few documented functions found to build the demo task")
    by_module: dict[str, list[str]] = {}
    for mod, _, summary in funcs:
        by_module.setdefault(mod, []).append(summary)
    everything = [s for _, _, s in funcs]
    train: list[Example] = []
    test: list[Example] = []
    for mod, name, summary in funcs:
        pool = [s for s in by_module[mod] if s != summary] or [s for s in everything if s != summary]
        other = pool[int(rng.integers(len(pool)))]
        split = test if zlib.crc32(name.encode()) % 5 == 0 else train
        split += [Example(name, summary, 1), Example(name, other, 0)]
    order = rng.permutation(len(train))
    return [train[i] for i in order], test


if __name__ == "__main__":  # the fresh interpreter of functions(): modules in, JSON rows out
    json.dump(_functions_here(tuple(sys.argv[1:])), sys.stdout)
