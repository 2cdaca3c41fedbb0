"""Golden tables and the exactness of threshold decisions."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflora import codebooks
from reflora.codebooks import DYNAMIC_MAP, FP4, NF4

# The 16 NF4 values as published in the QLoRA paper's appendix (decimal), independent of the hex table.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_table_is_the_published_one():
    assert NF4.values.dtype == np.float32
    assert NF4.values.tolist() == [float(np.float32(v)) for v in PUBLISHED_NF4]


def test_nf4_table_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    ours = NF4.values.view(np.uint32)
    theirs = F.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32).view(np.uint32)
    assert np.array_equal(ours, theirs)


def test_fp4_table_matches_bitsandbytes_in_nibble_order():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    theirs = F.get_4bit_type("fp4", device="cpu").numpy().astype(np.float32)
    assert np.array_equal(FP4.values.view(np.uint32), theirs.view(np.uint32))
    # bit 3 is the sign: nibbles 9..15 are the negatives of 1..7
    assert np.array_equal(FP4.values[9:], -FP4.values[1:8])


def test_dynamic_map_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    theirs = F.create_dynamic_map(signed=True).numpy().astype(np.float32)
    assert np.array_equal(DYNAMIC_MAP.values.view(np.uint32), theirs.view(np.uint32))


def test_dynamic_map_shape_facts():
    v = DYNAMIC_MAP.values
    assert v.size == 256 and np.all(np.diff(v) > 0)
    assert v[127] == 0.0 and v[255] == 1.0 and v[0] > -1.0  # there is no -1
    assert int((v < 0).sum()) == 127 and int((v > 0).sum()) == 128


def test_derivation_reproduces_table_only_with_torch_linspace():
    assert np.array_equal(codebooks.derive_nf4("torch").view(np.uint32), NF4.values.view(np.uint32))
    approx = codebooks.derive_nf4("float64")
    # float64 spacing lands within a few float32 ulps but is not bit-exact: the reason for hard-coding.
    assert not np.array_equal(approx, NF4.values)
    ulps = np.abs(approx.view(np.int32).astype(np.int64) - NF4.values.view(np.int32))
    assert 0 < ulps.max() <= 8  # measured: 5 ulps at most, 8 of 16 values off


def test_torch_linspace_emulation_matches_torch():
    """Bit for bit, on the NF4 derivation's inputs and on 500 random ones (vectorised lengths too). The
    step used to be rounded once from the exact difference; torch rounds end − start to float32 first,
    which differed in 90 of 400 random cases (found by an audit; (1/3, 2, 7) is one)."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    rng = np.random.default_rng(0)
    cases = [(0.9677083, 0.5, 9), (0.9677083, 0.5, 8), (0.1, 1.0, 65), (-3.0, 7.0, 17), (1 / 3, 2.0, 7)]
    for _ in range(500):
        start, end = rng.standard_normal(2) * rng.choice([1e-3, 1.0, 1e3])
        cases.append((float(start), float(end), int(rng.integers(0, 300))))
    for start, end, steps in cases:
        ours = codebooks.torch_linspace_f32(start, end, steps)
        theirs = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), (start, end, steps)


def test_thresholds_are_exact_midpoints():
    for cb in (NF4, FP4, DYNAMIC_MAP):
        distinct = np.unique(cb.values)
        for m, lo, hi in zip(cb.thresholds, distinct[:-1], distinct[1:], strict=True):
            assert Fraction(float(m)) == (Fraction(float(lo)) + Fraction(float(hi))) / 2


def _significant_bits(v: float) -> int:
    n = abs(Fraction(v).numerator)
    return (n >> ((n & -n).bit_length() - 1)).bit_length()  # odd part's length


def test_midpoints_have_at_most_30_bits():
    """count_below's proof needs k <= 30 significant bits in a threshold (its docstring): NF4's and the
    dynamic map's need 26, FP4's 29 (the midpoint of 1/192 and 1/6 spans 29 binary places)."""
    need = {"nf4": 26, "fp4": 29, "dynamic": 26}
    for name, cb in (("nf4", NF4), ("fp4", FP4), ("dynamic", DYNAMIC_MAP)):
        assert max(_significant_bits(float(m)) for m in cb.thresholds) == need[name] <= 30, name


def _exact_code(x: float, a: float, cb: codebooks.Codebook) -> int:
    """Nearest sorted value to x/a in Fractions, ties to the lower value, mapped to its code."""
    r = Fraction(x) / Fraction(a)
    distinct = [Fraction(float(v)) for v in np.unique(cb.values)]
    best = min(range(len(distinct)), key=lambda i: (abs(distinct[i] - r), i))
    return int(cb.sorted_codes[best])


f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@given(x=f32, a=f32.filter(lambda v: v != 0), which=st.integers(0, 14), nudge=st.integers(-3, 3))
def test_float64_division_decides_like_exact_arithmetic(x, a, which, nudge):
    # Half the draws sit on or within a few ulps of a threshold, where a wrong decision would show.
    a = abs(a)
    if which % 2 == 0:
        target = np.float32(NF4.thresholds[which] * a)
        x = float(target + np.float32(nudge) * np.spacing(target)) if np.isfinite(target) else x
    if abs(x) > a:
        x = float(np.float32(a) * np.sign(x)) if x else 0.0
    q = NF4.encode(np.array([np.float64(np.float32(x)) / np.float64(np.float32(a))]))[0]
    assert q == _exact_code(float(np.float32(x)), float(np.float32(a)), NF4)


def test_ties_go_to_the_lower_value():
    # Only the 6 midpoints that are float32 numbers can be hit exactly by x/absmax with float32 x and
    # absmax (the other 9 need 25 significant bits); each of them must go down.
    representable = [m for m in NF4.thresholds if float(np.float32(m)) == m]
    assert len(representable) == 6
    for m in representable:
        i = int(np.searchsorted(NF4.thresholds, m))
        for a in (1.0, 0.5, 2.0**-20, 2.0**100):
            x = np.float32(m) * np.float32(a)
            assert np.float64(x) / np.float64(a) == m  # a genuine tie
            assert NF4.encode(np.array([np.float64(x) / a]))[0] == i


def test_fp4_zero_has_one_code_and_ties_go_down():
    tiny = float(FP4.values[1]) / 4  # rounds to zero
    assert FP4.encode(np.array([tiny, -tiny, 0.0, -0.0])).tolist() == [0, 0, 0, 0]
    # on every midpoint the lower value wins: toward zero for positives, away from it for negatives
    distinct = np.unique(FP4.values)
    for i, m in enumerate(FP4.thresholds):
        assert FP4.values[FP4.encode(np.array([m]))[0]] == distinct[i]


def test_get_rejects_unknown_type():
    for bad in ("int4", "NF4", None, ["nf4"]):  # a list raised a bare TypeError (unhashable) before
        with pytest.raises(ValueError, match="nf4"):
            codebooks.get(bad)


def test_torch_linspace_emulation_of_zero_and_one_steps():
    # steps = 1 divided by zero and gave [nan]; torch gives [start] (and [] for 0).
    torch = pytest.importorskip("torch", reason="torch not installed")
    for steps in (0, 1, 2):
        theirs = torch.linspace(0.9677083, 0.5, steps, dtype=torch.float32).numpy()
        assert np.array_equal(codebooks.torch_linspace_f32(0.9677083, 0.5, steps), theirs), steps
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="steps must be an int >= 0"):
            codebooks.torch_linspace_f32(0.0, 1.0, bad)


def test_the_shared_tables_cannot_be_written_to() -> None:
    # thresholds and sorted_codes were writable module globals: `NF4.thresholds[:] = 0` changed every
    # later quantize (codes [0 1 3 5 9 12 14 15] became [0 0 0 0 15 15 15 15]).
    for book in (codebooks.NF4, codebooks.FP4, codebooks.DYNAMIC_MAP):
        for table in (book.values, book.thresholds, book.sorted_codes):
            with pytest.raises(ValueError, match="read-only"):
                table[0] = 0
