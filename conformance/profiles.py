"""Profiles: how hard the suite looks. One setting caps every drawn size.

``ci``     bounded and reproducible: a fixed seed (printed; ``--seed`` changes it), few examples a
           property, small arrays. Sized so one backend takes about a minute on two cores.
``audit``  thorough: many examples, arrays up to 2^18 elements, ranks up to 256, a fresh seed
           each run (printed, so a failure can be replayed with ``--seed``).

Sizes are capped by ``max_elements`` (the most elements any one drawn array may hold) and
``max_rank`` (the largest LoRA rank drawn); every strategy in :mod:`reflora.conformance.strategies`
reads these two numbers and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROFILES", "Profile", "get"]


@dataclass(frozen=True)
class Profile:
    """name; max_examples: hypothesis examples per property; max_elements: the size cap of any drawn
    array; max_rank: the largest LoRA rank drawn; seed: the default seed (None: a fresh random one);
    natural_elements: the size of the fixed N(0, 0.02) sample the findings measure each dialect on."""

    name: str
    max_examples: int
    max_elements: int
    max_rank: int
    seed: int | None
    natural_elements: int

    def __post_init__(self) -> None:
        if self.max_examples < 1 or self.max_elements < 64 or not 1 <= self.max_rank <= 256:
            raise ValueError(f"unusable profile {self}")


PROFILES: dict[str, Profile] = {
    "ci": Profile("ci", max_examples=12, max_elements=1 << 14, max_rank=64, seed=0, natural_elements=1 << 18),
    "audit": Profile(
        "audit", max_examples=400, max_elements=1 << 18, max_rank=256, seed=None, natural_elements=1 << 22
    ),
}


def get(name: str) -> Profile:
    """The profile called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
