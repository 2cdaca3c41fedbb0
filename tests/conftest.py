"""Hypothesis profiles for the project's own tests.

``ci`` (default) keeps every property bounded; ``thorough`` runs 20x the examples for an audit:
``REFLORA_HYPOTHESIS_PROFILE=thorough python -m pytest tests``. A failure prints the blob that replays it.

Triton. Whether a ``@triton.jit`` function is interpreted is fixed when it is decorated, and Triton's own
``triton.language`` helpers are decorated when anything first imports Triton (bitsandbytes does, on
import). So the choice is made here, before any test module is collected: without CUDA the kernels run
under the CPU interpreter (``TRITON_INTERPRET=1``); an explicit ``TRITON_INTERPRET`` in the environment
wins.

Hypothesis. Its default provider mixes the literals of every loaded local module into integer and float
draws, so a property would draw differently run alone than in the whole suite. The project's tests use
the provider the conformance runner uses (reflora.conformance.draws), whose draws depend on the seed
alone, so a failure seen in a full run repeats when its file runs alone.
"""

import os

import pytest

from reflora.backends.triton.backend import use_interpreter  # the module imports neither torch nor Triton

use_interpreter()

from hypothesis import HealthCheck, settings  # noqa: E402  (after the Triton choice)
from hypothesis.internal.conjecture.providers import AVAILABLE_PROVIDERS  # noqa: E402

from reflora.conformance.draws import seed_only_provider  # noqa: E402

if not isinstance(seed_only_provider(), str):
    AVAILABLE_PROVIDERS["hypothesis"] = seed_only_provider()

common = {"deadline": None, "print_blob": True, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=100, **common)
settings.register_profile("thorough", max_examples=2000, **common)
settings.load_profile(os.environ.get("REFLORA_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def refuse_unpickling(monkeypatch):
    """Every unpickling entry point (pickle.load/loads/Unpickler and torch.load) made to fail, for tests
    that a loader reads only safetensors and JSON."""
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
