"""Blockwise absmax quantization, the step NF4, FP4 and double quantization share.

The flattened array (row-major order of its *logical* indices, whatever its memory layout) is cut into
consecutive blocks of ``blocksize`` elements; the last block may be shorter (a *ragged tail*). Each block
is scaled by its absmax into [-1, 1] and every element gets the code of the nearest codebook value
(:mod:`reflora.codebooks` states the nearest-value and tie rules).

Rules:

* absmax[b] = max |x| over the valid elements of block b, in float32. Converting float16 or bfloat16
  to float32 is exact, so absmax is exact for every input dtype.
* An all-zero block has absmax 0 and every element gets the codebook's zero code.
* The ragged tail's absmax covers only its own elements: no padding value takes part.
"""

from __future__ import annotations

import math

import numpy as np

from reflora.codebooks import Codebook

__all__ = ["block_absmax", "encode"]

# Elements encoded per step: enough to amortise numpy's per-call cost, small enough that the float64
# temporaries stay in cache.
_CHUNK = 1 << 17


def block_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """float32 (ceil(n/blocksize),): max |x| of each block of the 1-D float32 array ``flat``."""
    n = flat.size
    full = n // blocksize
    absmax = np.empty(math.ceil(n / blocksize), dtype=np.float32)
    if full:
        absmax[:full] = np.abs(flat[: full * blocksize].reshape(full, blocksize)).max(axis=1)
    if n % blocksize:
        absmax[full] = np.abs(flat[full * blocksize :]).max()
    return absmax


def encode(flat: np.ndarray, absmax: np.ndarray, blocksize: int, codebook: Codebook) -> np.ndarray:
    """uint8 (n,): the code of each element of the 1-D float32 ``flat`` given its block's ``absmax``.

    The quotient x/absmax is formed in float64, which decides every threshold comparison exactly
    (:func:`reflora.codebooks.count_below`). A zero absmax means the block is all zeros; dividing those
    zeros by 1 instead keeps 0/0 out and gives them the zero code.
    """
    n = flat.size
    codes = np.empty(n, dtype=np.uint8)
    step = max(1, _CHUNK // blocksize) * blocksize  # whole blocks per step
    for start in range(0, n, step):
        stop = min(n, start + step)
        scale = absmax[start // blocksize : math.ceil(stop / blocksize)].astype(np.float64)
        scale[scale == 0] = 1.0
        x = flat[start:stop].astype(np.float64)
        whole = (stop - start) // blocksize * blocksize
        scaled = np.empty_like(x)
        # (k, blocksize) / (k, 1): every element divided by its own block's absmax
        np.divide(
            x[:whole].reshape(-1, blocksize),
            scale[: whole // blocksize, None],
            out=scaled[:whole].reshape(-1, blocksize),
        )
        if whole < stop - start:
            scaled[whole:] = x[whole:] / scale[-1]
        codes[start:stop] = codebook.encode(scaled)
    return codes
