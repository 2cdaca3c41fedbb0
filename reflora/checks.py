"""Argument checks the oracle's modules share, so that a wrong kind of argument is refused alike."""

from __future__ import annotations

import numpy as np

__all__ = ["check_flag", "check_real"]


def check_flag(name: str, value: object) -> bool:
    """``value`` as a bool: TypeError unless it is True or False (a numpy bool too). A string such as
    'no' or 'false' is truthy, and an int may be a misplaced size, so neither is read as a flag."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_real(name: str, value: object) -> float:
    """``value`` as a float: TypeError unless it is a real number (an int or float, numpy's too, or a
    0-d array of one). A string ("0.5", which ``float`` and numpy parse) and a bool (True is 1) are
    refused: either is a mistake, not a number. ValueError for an int beyond a float's range."""
    v = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(v)
    except OverflowError:  # an int past float's range (10**400): a bare "int too large to convert"
        raise ValueError(f"{name} = {v} is beyond a float's range") from None
