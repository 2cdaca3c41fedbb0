"""The three floating-point dtypes reflora quantizes and computes in, by name.

numpy has no bfloat16; ml_dtypes provides a real one (``ml_dtypes.bfloat16``) whose conversions from
float32 round to nearest, ties to even, as torch's do.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["DTYPES", "as_dtype", "dtype_name"]

bfloat16 = np.dtype(ml_dtypes.bfloat16)

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": bfloat16,
}


def as_dtype(d: str | np.dtype | type) -> np.dtype:
    """The numpy dtype for a name ("bfloat16", "float16", "float32") or a dtype-like object ("f4",
    np.float32, ...). ValueError for a string that names no dtype; TypeError for a dtype reflora does
    not work in ("float64" and np.float64 alike)."""
    if isinstance(d, str):
        if d in DTYPES:
            return DTYPES[d]
        try:
            dt = np.dtype(d)
        except TypeError:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {d!r}") from None
    else:
        dt = np.dtype(d)
    if dt.byteorder not in "=|":  # ">f4" is float32 in the other byte order: results are native
        dt = dt.newbyteorder("=")
    dtype_name(dt)
    return dt


def dtype_name(d: np.dtype) -> str:
    """'float32', 'float16' or 'bfloat16'; TypeError for any other dtype."""
    for name, dt in DTYPES.items():
        if np.dtype(d) == dt:
            return name
    raise TypeError(f"reflora works in float32, float16 and bfloat16, not {np.dtype(d)}")
