"""Memory arithmetic of 4-bit storage, as in the QLoRA paper (section 3, "Double Quantization").

A 4-bit weight costs 4 bits for its code plus its share of the block scale:

* without double quantization a float32 absmax per block of ``blocksize``: 4 + 32/blocksize bits
  (4.5 at blocksize 64);
* with it, an 8-bit code per block plus a float32 absmax2 per group of ``blocksize2`` blocks:
  4 + 8/blocksize + 32/(blocksize·blocksize2) bits (4.127 at 64 and 256).

The per-tensor constants (the 16-entry table, the 256-entry 8-bit map, the offset) do not grow with the
tensor and are left out, as the paper does.
"""

from __future__ import annotations

__all__ = ["bits_per_parameter", "quantized_bytes"]


def bits_per_parameter(blocksize: int = 64, *, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Storage bits a parameter of a 4-bit tensor, scales included (see the module docstring)."""
    if blocksize <= 0 or blocksize2 <= 0:
        raise ValueError("block sizes must be positive")
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


def quantized_bytes(n_params: float, blocksize: int = 64, *, double_quant: bool = False) -> float:
    """Bytes of ``n_params`` parameters stored in 4 bits, scales included (per-tensor constants excluded)."""
    return n_params * bits_per_parameter(blocksize, double_quant=double_quant) / 8
