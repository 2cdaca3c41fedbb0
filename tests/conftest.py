"""Hypothesis profiles for the project's own tests.

``ci`` (default) keeps every property bounded; ``thorough`` runs 20x the examples for an audit:
``REFLORA_HYPOTHESIS_PROFILE=thorough python -m pytest tests``. A failure prints the blob that replays it.
"""

import os

from hypothesis import HealthCheck, settings

common = {"deadline": None, "print_blob": True, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=100, **common)
settings.register_profile("thorough", max_examples=2000, **common)
settings.load_profile(os.environ.get("REFLORA_HYPOTHESIS_PROFILE", "ci"))
