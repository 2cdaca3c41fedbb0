"""Draws that depend on the seed alone, not on which modules happen to be loaded.

Hypothesis (6.170, the version this was measured with) returns, for about one integer draw in twenty
and one float draw in seven, a literal taken from
a pool instead of a random value. The pool has two parts: a fixed table of its own, and every literal
(an integer of at least 100 in size, a non-zero float, a short string) in the source of each *local*
module loaded in the process, that is one outside site-packages and the standard library and not a test
file. Which local modules are loaded changes from run to run: an editable install of reflora makes its
own modules local, ``reflora conform`` loads the CLI and pytest does not, a plug-in backend in the
current directory is local. So one seed drew different inputs in different processes: importing a
module that holds nine new numbers changed the ci draws of 8 of the suite's 48 property tests (2026-11-24).

:func:`seed_only_draws` makes the runner's draws a function of the seed and the Hypothesis version
only. While it is active, the default provider is one whose local pool is empty; Hypothesis' own table
still applies. Its cache of allowed constants is emptied on the way in and out, since it holds entries
computed from the local pool. This rests on two Hypothesis internals (the provider's
``_local_constants`` and ``CONSTANTS_CACHE``); where they are missing the draws cannot be made
independent, and :func:`seed_only_draws` warns once instead of pretending.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, cached_property
from typing import Any

__all__ = ["seed_only_draws", "seed_only_provider"]


@cache
def seed_only_provider() -> type | str:
    """Hypothesis' default provider class without the literals of loaded local modules; or, where this
    Hypothesis has no local pool to remove, or keeps it somewhere this module does not know, the reason
    (a string) why the draws are left as they are."""
    import hypothesis
    from hypothesis.internal.conjecture import providers

    base = providers.HypothesisProvider
    if not hasattr(base, "_maybe_draw_constant"):
        return "none needed"  # a Hypothesis that draws no constants at all
    local = vars(base).get("_local_constants")
    if not isinstance(local, (cached_property, property)) or not hasattr(providers, "CONSTANTS_CACHE"):
        return (
            f"hypothesis {hypothesis.__version__} keeps the literals of loaded local modules where reflora "
            "does not look for them, so the same seed may draw different inputs in different processes "
            "(saved bundles still replay exactly)"
        )
    empty = providers.Constants()

    class SeedOnlyProvider(base):
        """HypothesisProvider whose pool of local literals is empty."""

        @property
        def _local_constants(self) -> Any:
            return empty

    return SeedOnlyProvider


@cache
def _warn(reason: str) -> None:
    warnings.warn(reason, RuntimeWarning, stacklevel=3)


@contextmanager
def seed_only_draws() -> Iterator[None]:
    """Within the block, Hypothesis' default backend draws from the seed and its own table only."""
    from hypothesis.internal.conjecture import providers

    provider = seed_only_provider()
    if isinstance(provider, str):
        if provider != "none needed":
            _warn(provider)
        yield
        return
    before = providers.AVAILABLE_PROVIDERS["hypothesis"]
    providers.CONSTANTS_CACHE.cache.clear()
    providers.AVAILABLE_PROVIDERS["hypothesis"] = provider
    try:
        yield
    finally:
        providers.AVAILABLE_PROVIDERS["hypothesis"] = before
        providers.CONSTANTS_CACHE.cache.clear()
