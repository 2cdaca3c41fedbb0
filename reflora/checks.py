"""Argument checks the oracle's modules share, so that a wrong kind of argument is refused alike."""

from __future__ import annotations

import numpy as np

__all__ = ["check_flag"]


def check_flag(name: str, value: object) -> bool:
    """``value`` as a bool: TypeError unless it is True or False (a numpy bool too). A string such as
    'no' or 'false' is truthy, and an int may be a misplaced size, so neither is read as a flag."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)
