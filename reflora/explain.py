"""``reflora explain TOPIC``: the rules of a format, printed from the code that implements them.

Every number printed here is computed by the oracle at run time (tables, thresholds, the derivation,
the storage arithmetic), so the explanation cannot drift from the implementation.
"""

from __future__ import annotations

import argparse

import numpy as np

from reflora import codebooks
from reflora.memory import bits_per_parameter

__all__ = ["TOPICS", "add_parser", "explain"]


def _hex(v: np.floating) -> str:
    return f"{int(np.float32(v).view(np.uint32)):08x}"


def _table(cb: codebooks.Codebook) -> list[str]:
    lines = ["  code  bits   value (float32)          hex"]
    for i, v in enumerate(cb.values):
        lines.append(f"  {i:>4}  {i:04b}   {float(v):<+24.17g} {_hex(v)}")
    return lines


def _thresholds(cb: codebooks.Codebook) -> list[str]:
    distinct = np.unique(cb.values)
    f32_mid = (distinct[:-1] + distinct[1:]) / np.float32(2)
    lines = [
        "  A value v = x/absmax gets the nearest table value; on an exact midpoint it takes the lower one.",
        "  The midpoints below are exact (float64); bitsandbytes compares against the float32 midpoints,",
        "  which differ where marked '*', so a few values in each such window are coded differently.",
        "     i  between               exact midpoint           float32 midpoint",
    ]
    for i, (m, m32) in enumerate(zip(cb.thresholds, f32_mid, strict=True)):
        mark = " " if float(m32) == float(m) else "*"
        lo, hi = float(distinct[i]), float(distinct[i + 1])
        lines.append(f"  {i:>4}  {lo:+.4f}|{hi:+.4f}   {float(m):<+24.17g} {float(m32):<+.17g} {mark}")
    return lines


def _nf4() -> list[str]:
    torch_way = codebooks.derive_nf4("torch")
    f64_way = codebooks.derive_nf4("float64")
    same = int(np.sum(torch_way.view(np.uint32) == codebooks.NF4.values.view(np.uint32)))
    off = f64_way != codebooks.NF4.values
    worst = float(np.max(np.abs(f64_way.astype(np.float64) - codebooks.NF4.values)))
    plain, dq = bits_per_parameter(64), bits_per_parameter(64, double_quant=True)
    return [
        "NF4: 4-bit NormalFloat (QLoRA), the 16 values bitsandbytes ships",
        "",
        *_table(codebooks.NF4),
        "",
        "Thresholds",
        *_thresholds(codebooks.NF4),
        "",
        "How the table is derived (reflora.codebooks.derive_nf4)",
        f"  1. Take probabilities evenly spaced from {codebooks.NF4_OFFSET} down to 0.5: 9 for the positive",
        "     half, 8 for the negative half (one more positive value: the table is asymmetric, 0 is exact).",
        "  2. Map them through the standard normal quantile function; drop the end point 0.5 (it gives 0).",
        "  3. Negate the negative half, add 0, round to float32, divide by the largest value.",
        f"  With torch's float32 linspace: {same}/16 values bit-identical to the table.",
        f"  With float64 linspace: {int(off.sum())}/16 values differ, max |difference| = {worst:.3g}:",
        "  the published table carries the rounding of the tool that made it, so reflora hard-codes it.",
        "",
        "Rules",
        "  absmax: max|x| per block of the row-major flattened tensor, float32 (exact for every dtype).",
        "  All-zero block: absmax 0, codes 7, dequantizes to +0.0 (-0.0 when double quantization rebuilds",
        "  its scale below zero; `reflora explain dq`).  Ragged tail: absmax of its own elements.",
        "  Packing: element 2j in the high nibble; an odd count pads the last low nibble with 7.",
        "  NaN or inf input: an error naming the first bad index.  blocksize: 32, 64, ..., 4096.",
        "  Dequantize: dtype(f32(code[q] * absmax)): one float32 multiply, one round-to-nearest-even.",
        "",
        "Bits per parameter (blocksize 64)",
        f"  codes 4 + float32 absmax 32/64                      = {plain:.3f} bits",
        f"  double quantization: 4 + 8/64 + 32/(64*256)         = {dq:.3f} bits",
        f"  saving: {plain - dq:.3f} bits/parameter = {(plain - dq) * 65e9 / 8 / 1e9:.2f} GB on a 65B model",
    ]


def _fp4() -> list[str]:
    return [
        "FP4 (e2m1, bitsandbytes' variant): table in nibble order; bit 3 is the sign",
        "",
        *_table(codebooks.FP4),
        "",
        "Thresholds",
        *_thresholds(codebooks.FP4),
        "",
        "  Nibble 8 is a second zero (+0.0 in the table). Every value that rounds to zero takes nibble 0.",
        "  All-zero block: absmax 0, codes 0. An odd count pads the last low nibble with 0.",
    ]


def _dq() -> list[str]:
    cb = codebooks.DYNAMIC_MAP
    pos = cb.values[cb.values > 0]
    return [
        "Double quantization: the block scales quantized again (QLoRA section 3)",
        "",
        "  1. offset = mean(absmax), rounded once to float32 (exactly; see reflora.double_quant.mean_f32).",
        "  2. c = f32(absmax - offset).",
        "  3. Groups of 256: absmax2 = max|c|; code = nearest value of the signed dynamic 8-bit map to",
        "     c/absmax2, ties to the lower index.",
        "  4. Rebuild: absmax = f32(f32(code2[q] * absmax2) + offset): two roundings, no fused multiply-add.",
        "",
        "  A block far below the offset, in a group whose absmax2 is large, can rebuild a scale below zero:",
        "  its values dequantize with their signs flipped (an all-zero block to -0.0), and the quantizer",
        "  warns (NegativeScaleWarning; docs/spec.md, negative rebuilt scales). Near the dtype's largest",
        "  value a scale can rebuild past it: those values dequantize to inf (ScaleRangeWarning).",
        "",
        f"  The dynamic map: {int(np.sum(cb.values < 0))} negative values, 0.0 at index "
        f"{int(np.flatnonzero(cb.values == 0)[0])}, {pos.size} positive values;",
        f"  smallest magnitude {float(pos.min()):.3g}, largest {float(cb.values.max())}, most negative "
        f"{float(cb.values.min())} (there is no -1).",
        f"  Cost: {bits_per_parameter(64, double_quant=True):.4f} bits/parameter at blocksize 64, "
        f"against {bits_per_parameter(64):.4f} without.",
    ]


TOPICS = {"nf4": _nf4, "fp4": _fp4, "dq": _dq}


def explain(topic: str) -> str:
    """The explanation of ``topic`` (one of :data:`TOPICS`) as text."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; choose from {', '.join(TOPICS)}")
    return "\n".join(TOPICS[topic]())


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain", help="print the rules of NF4, FP4 or double quantization")
    p.add_argument("topic", choices=sorted(TOPICS), help="what to explain")
    p.set_defaults(func=lambda args: print(explain(args.topic)) or 0)
