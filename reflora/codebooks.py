"""Codebooks: the 4-bit NF4 and FP4 tables and the 8-bit dynamic map used for double quantization.

A *codebook* ``code`` is a float32 table indexed by the stored integer (a 4-bit nibble or an 8-bit byte).
Quantizing a value ``v`` already scaled into [-1, 1] means choosing the index whose table value is nearest
to ``v``. Every table here is hard-coded by its float32 bit patterns, exactly as bitsandbytes ships it:
re-deriving a table in floating point is not bit-exact (see :func:`derive_nf4`, which shows why).

Rules stated once, used by every quantizer in reflora:

* **Nearest value, exact arithmetic.** The decision thresholds are the *exact* midpoints between
  neighbouring distinct table values. Each midpoint of two float32 numbers is exact in float64, and
  ``float64(x) / float64(absmax)`` lies strictly on the same side of every such midpoint as the exact
  quotient does, so comparing in float64 decides like exact arithmetic (the proof is in
  :func:`count_below`).
* **Ties go to the lower value.** A scaled value exactly on a midpoint takes the smaller of the two
  table values. For NF4 and the dynamic map, whose tables are sorted, that is also the lower index.
* **One code for zero.** FP4's nibble 8 is a second zero (bitsandbytes' table holds +0.0 there). Every
  value that rounds to zero, negative or not, takes nibble 0, so that a code is a function of the
  value and quantizing a dequantized tensor gives back the same bytes. (bitsandbytes' CUDA kernel puts
  small negatives in nibble 8, its CPU path small positives: see reflora.dialects.)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DYNAMIC_MAP",
    "FP4",
    "NF4",
    "Codebook",
    "count_below",
    "derive_nf4",
    "get",
    "torch_linspace_f32",
]


def _from_hex(words: str) -> np.ndarray:
    """float32 values from whitespace-separated 8-digit hex bit patterns."""
    bits = np.array([int(w, 16) for w in words.split()], dtype=np.uint32)
    return bits.view(np.float32)


@dataclass(frozen=True, eq=False)
class Codebook:
    """A quantization table and the exact thresholds that choose among its entries.

    values:     float32 (2**bits,), indexed by the stored code, in the order the format defines.
    thresholds: float64 (k-1,), the exact midpoints between the k distinct values sorted ascending.
    sorted_codes: uint8 (k,), the code of the j-th smallest distinct value (the first code holding it).
    negative_zero_code: a code for negative values that round to zero, for tables that keep the sign
        of zero (dialects); None (the canonical rule) gives every zero the first zero code.
    """

    name: str
    values: np.ndarray
    thresholds: np.ndarray
    sorted_codes: np.ndarray
    zero_code: int
    negative_zero_code: int | None = None

    @classmethod
    def from_values(cls, name: str, values: np.ndarray, negative_zero_code: int | None = None) -> Codebook:
        values = np.asarray(values, dtype=np.float32)
        values.setflags(write=False)
        distinct, first = np.unique(values, return_index=True)  # sorted ascending; first index wins
        mids = (distinct[:-1].astype(np.float64) + distinct[1:].astype(np.float64)) / 2  # exact in f64
        zero_code = int(np.flatnonzero(values == 0)[0])
        codes = first.astype(np.uint8)
        for table in (mids, codes):  # shared module globals: a write would change every later quantize
            table.setflags(write=False)
        return cls(name, values, mids, codes, zero_code, negative_zero_code)

    @property
    def bits(self) -> int:
        return int(self.values.size).bit_length() - 1

    def encode(self, scaled: np.ndarray) -> np.ndarray:
        """Codes (uint8, same shape) of float64 values ``scaled`` = x / absmax, by the module's rules."""
        codes = self.sorted_codes[count_below(self.thresholds, scaled)]
        if self.negative_zero_code is not None:
            rounds_to_zero = codes == self.zero_code
            codes = np.where(rounds_to_zero & (scaled < 0), np.uint8(self.negative_zero_code), codes)
        return codes


def count_below(thresholds: np.ndarray, scaled: np.ndarray) -> np.ndarray:
    """For each value, the number of thresholds strictly below it (int, same shape as ``scaled``).

    This is the index of the nearest sorted table value with ties going down: a value exactly on
    threshold i is not above it, so it stays with the lower value i.

    Why float64 division decides exactly: let x and a > 0 be float32 (24-bit significands, a's lowest
    bit 2**e_a) and m a threshold, the exact midpoint of two float32 values, with k significant bits
    (lowest bit 2**e_m, leading bit 2**E, E = e_m + k - 1). The midpoints of two table values of
    different exponents need more bits than either: k is 26 for NF4, 29 for FP4 (the midpoint of 1/192
    and 1/6) and 26 for the dynamic map (``test_midpoints_have_at_most_30_bits``). If x/a != m, then
    x - m*a is a non-zero multiple of 2**(e_m + e_a), and a < 2**(e_a + 24), so
    |x/a - m| > 2**(e_m - 24) = 2**(E - k - 23) >= 2**(E - 53) for k <= 30: more than half a float64
    ulp of m's binade, which the correctly rounded quotient cannot cross (rounding is monotone, and m,
    a float64 number, is not the nearest to a quotient that far from it). If x/a == m exactly, the
    division returns m. Hence ``float64(x)/float64(a) > m`` iff ``x/a > m`` in exact arithmetic.
    """
    if thresholds.size <= 16:
        # A short table: 15 vectorised comparisons beat a binary search per element by ~7x.
        count = np.zeros(scaled.shape, dtype=np.uint8)
        for m in thresholds:
            count += scaled > m
        return count
    return np.searchsorted(thresholds, scaled, side="left")


# NF4 (QLoRA's NormalFloat4): bitsandbytes get_4bit_type("nf4"), sorted, so code order == value order.
NF4 = Codebook.from_values(
    "nf4",
    _from_hex(
        "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000"
        " 3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000"
    ),
)

# FP4 (e2m1 with a subnormal of 0.0625/12), in bitsandbytes' nibble order: bit 3 is the sign, and
# nibble 8 holds +0.0 because bitsandbytes writes it as the Python integer literal -0. Zero is coded 0.
FP4 = Codebook.from_values(
    "fp4",
    _from_hex(
        "00000000 3baaaaab 3f2aaaab 3f800000 3eaaaaab 3f000000 3e2aaaab 3e800000"
        " 00000000 bbaaaaab bf2aaaab bf800000 beaaaaab bf000000 be2aaaab be800000"
    ),
)

# bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)): 127 negative values, 0.0 at
# index 127, 128 positive values up to 1.0. There is no -1.0: the smallest value is -0.99296874.
DYNAMIC_MAP = Codebook.from_values(
    "dynamic",
    _from_hex(
        "bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000"
        " bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333"
        " bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666"
        " bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a"
        " bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a"
        " bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000"
        " bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd"
        " be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334"
        " bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a"
        " bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d"
        " bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148"
        " bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148"
        " bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4"
        " bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d"
        " ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b"
        " b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000"
        " 3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b"
        " 398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d"
        " 3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4"
        " 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148"
        " 3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148"
        " 3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d"
        " 3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a"
        " 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334"
        " 3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd"
        " 3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000"
        " 3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a"
        " 3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a"
        " 3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666"
        " 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333"
        " 3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000"
        " 3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000"
    ),
)

_BY_NAME = {"nf4": NF4, "fp4": FP4}


def get(quant_type: str) -> Codebook:
    """The 4-bit codebook called ``quant_type`` ("nf4" or "fp4"); ValueError for anything else (a list,
    None or "NF4" too)."""
    if not isinstance(quant_type, str) or quant_type not in _BY_NAME:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return _BY_NAME[quant_type]


# --- How the NF4 table is made (for teaching; the table above is what everyone ships) ---------------

NF4_OFFSET = 0.9677083  # the largest probability used; norm.ppf(0.9677083) = 1.848 standard deviations


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 (steps,): torch.linspace(start, end, steps) as torch 2.x computes it on the CPU.

    torch forms ``step = (end - start)/(steps - 1)`` in float32, rounding twice (the difference, then
    the quotient), fills the first half forwards from ``start`` and the second half backwards from
    ``end``, each point rounded once (a fused multiply-add).
    numpy's linspace rounds differently, and that difference alone changes NF4 entries. steps: an
    int >= 0 (ValueError otherwise); 0 gives an empty array and 1 gives [start], as torch does.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    s, e = np.float32(start), np.float32(end)
    if steps <= 1:  # torch gives [] and [start]: there is no step to divide by
        return np.full(steps, s, dtype=np.float32)
    step = np.float32(np.float64(e - s) / (steps - 1))  # e - s in float32: torch's first rounding
    # Each product step*i (24-bit by <= 12-bit integer) and the sum are exact in float64, so rounding
    # the float64 result to float32 is exactly one rounding, as an FMA does.
    i = np.arange(steps, dtype=np.float64)
    forward = np.float64(s) + np.float64(step) * i
    backward = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, forward, backward).astype(np.float32)


def derive_nf4(linspace: str = "torch") -> np.ndarray:
    """Derive the 16 NF4 values from normal quantiles, step by step. Returns float32 (16,).

    1. Pick probabilities evenly spaced from 0.5 up to NF4_OFFSET: 9 points for the positive half and 8
       for the negative half (the extra positive value is why NF4 is asymmetric and has an exact zero).
    2. Map them through the standard normal's inverse CDF (its quantiles) and drop the 0.5 end point,
       which would give 0: 8 positive values, and 7 negated ones.
    3. Add zero, round to float32, and divide by the largest value so the table spans [-1, 1].

    ``linspace="torch"`` spaces the probabilities as torch's float32 linspace does, which is how
    bitsandbytes built the table: it reproduces all 16 values bit for bit. ``linspace="float64"`` uses
    exact-ish float64 spacing and lands up to 1.19e-7 away (up to 5 ulps, in 8 of the 16 values): the
    published table carries the rounding of the tool that first computed it, which is why reflora
    hard-codes the bits.
    """
    if linspace == "torch":
        pos_p = torch_linspace_f32(NF4_OFFSET, 0.5, 9)[:-1].astype(np.float64)
        neg_p = torch_linspace_f32(NF4_OFFSET, 0.5, 8)[:-1].astype(np.float64)
    elif linspace == "float64":
        pos_p = np.linspace(NF4_OFFSET, 0.5, 9)[:-1]
        neg_p = np.linspace(NF4_OFFSET, 0.5, 8)[:-1]
    else:
        raise ValueError(f"linspace must be 'torch' or 'float64', got {linspace!r}")
    ppf = statistics.NormalDist().inv_cdf
    positive = [ppf(p) for p in pos_p]
    negative = [-ppf(p) for p in neg_p]
    values = np.array([*negative, 0.0, *positive], dtype=np.float32)  # step 3: round to float32
    values.sort()
    return values / values.max()  # float32 division, as the original


def widest_half_gap(codebook: Codebook) -> float:
    """Half the largest gap between neighbouring table values: the worst rounding error on [-1, 1]."""
    distinct = np.unique(codebook.values.astype(np.float64))
    return float(np.max(np.diff(distinct)) / 2)
