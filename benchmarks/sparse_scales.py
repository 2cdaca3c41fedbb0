"""Sparse weights under double quantization: blocks whose rebuilt scale comes back with the wrong sign,
and all-zero blocks that do not dequantize to zero: torchao's NF4Tensor, bitsandbytes (on this
machine's device) and reflora's canonical rules.

A pruned or sparse weight has blocks whose absmax is zero or far below the others. Double quantization
stores each block's absmax relative to a mean; a rebuilt scale carries an absolute error of up to half a
step of that second quantizer, so a block whose absmax is smaller than that error can rebuild below zero
(its values then dequantize with their signs flipped), and an all-zero block rebuilds a nonzero scale.
Whether the block then dequantizes to zero depends on its codes: the canonical rules give an all-zero
block the code of 0.0, torchao's 0/0 division gives it code 0 (-1.0).

Usage: ``python benchmarks/sparse_scales.py [--draws N]`` (needs torch, torchao and bitsandbytes; about
10 s on two cores). Each
draw: a 128 x 128 weight, 5% of its entries N(0, 0.05) and the rest 0, blocksize 32, double quantization;
the same weights for each. Prints one line per implementation and dtype.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from reflora import nf4
from reflora.dtypes import as_dtype


def _weights(seed: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal(128 * 128) * 0.05
    return (dense * (rng.random(dense.size) < 0.05)).astype(np.float32).astype(as_dtype(dtype))


def _torchao(w: np.ndarray, blocksize: int) -> np.ndarray:
    import importlib

    from reflora.backends._tensors import to_numpy, view

    m = importlib.import_module("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    return to_numpy(m.to_nf4(view(w.reshape(128, 128)), blocksize, 256).get_original_weight())


def _bitsandbytes(w: np.ndarray, blocksize: int) -> np.ndarray:
    import bitsandbytes.functional as F

    from reflora.backends._tensors import to_numpy, view

    packed, state = F.quantize_4bit(view(w.reshape(128, 128)), blocksize=blocksize, compress_statistics=True,
                                    quant_type="nf4")  # fmt: skip
    return to_numpy(F.dequantize_4bit(packed, state))


def _canonical(w: np.ndarray, blocksize: int) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NegativeScaleWarning is what is being counted
        return nf4.dequantize(nf4.quantize(w.reshape(128, 128), blocksize, double_quant=True))


def count(dequantize, dtype: str, draws: int, blocksize: int = 32) -> dict:
    """Over ``draws`` weights: draws and blocks where a nonzero block's largest entry came back with the
    other sign (and the largest error in such a block), draws where an all-zero block dequantized to
    something nonzero, and the largest such value."""
    flipped_draws = flipped_blocks = zero_draws = 0
    largest = flipped_error = 0.0
    for seed in range(draws):
        w = _weights(seed, dtype)
        x = w.astype(np.float32).reshape(-1, blocksize)
        out = np.asarray(dequantize(w, blocksize)).astype(np.float32).reshape(-1, blocksize)
        rows = np.arange(x.shape[0])
        at = np.abs(x).argmax(1)
        flipped = (x[rows, at] != 0) & (np.sign(out[rows, at]) == -np.sign(x[rows, at]))
        flipped_blocks += int(flipped.sum())
        flipped_draws += int(flipped.any())
        if flipped.any():
            flipped_error = max(flipped_error, float(np.abs(out[flipped] - x[flipped]).max()))
        zero = np.abs(x).max(1) == 0
        if (out[zero] != 0).any():
            zero_draws += 1
            largest = max(largest, float(np.abs(out[zero]).max()))
    return {"flipped_draws": flipped_draws, "flipped_blocks": flipped_blocks, "flipped_error": flipped_error,
            "zero_draws": zero_draws, "largest": largest}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args(argv)
    print(f"{args.draws} draws a dtype: 128 x 128, 5% nonzero N(0, 0.05), blocksize 32, double quantization")
    for name, fn in (("torchao", _torchao), ("bitsandbytes", _bitsandbytes), ("canonical", _canonical)):
        for dtype in ("float32", "float16", "bfloat16"):
            c = count(fn, dtype, args.draws)
            print(
                f"{name:12} {dtype:8}  sign-flipped block in {c['flipped_draws']}/{args.draws} draws "
                f"({c['flipped_blocks']} blocks, error <= {c['flipped_error']:.3g}); all-zero block "
                f"nonzero in {c['zero_draws']}/{args.draws} draws, largest |value| {c['largest']:.3g}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
