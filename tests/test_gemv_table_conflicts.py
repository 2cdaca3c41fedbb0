"""The bank model of benchmarks/gemv_table_conflicts.py, which docs/triton.md cites for keeping the GEMV's
16-entry table: the pass counts it gives for requests whose answer the bank rules fix."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gemv_table_conflicts as conflicts


def test_a_16_entry_float32_table_is_one_pass_whatever_the_codes():
    rng = np.random.default_rng(0)
    requests = rng.integers(0, 16, (500, 32))
    assert (conflicts.passes(requests, 1) == 1).all()


def test_pair_table_passes_count_distinct_entries_on_a_bank_pair():
    same = np.zeros((1, 16), dtype=np.int64)  # every lane the same entry: one broadcast pass
    assert conflicts.passes(same, 2).tolist() == [1]
    apart = (16 * np.arange(16))[None, :]  # entries 0, 16, ..., 240 all on banks 0 and 1
    assert conflicts.passes(apart, 2).tolist() == [16]
    spread = np.arange(16)[None, :]  # entries 0..15: 16 distinct bank pairs
    assert conflicts.passes(spread, 2).tolist() == [1]
    two = np.array([[0, 16] + [1] * 14])  # two entries on one pair, the rest broadcast
    assert conflicts.passes(two, 2).tolist() == [2]


def test_a_warp_reads_bytes_16_apart():
    codes = np.arange(4096, dtype=np.int64)
    rows = conflicts.warp_bytes(codes, 3, np.random.default_rng(0))
    assert rows.shape == (3, 32)
    assert (np.diff(rows, axis=1) == 16).all()
