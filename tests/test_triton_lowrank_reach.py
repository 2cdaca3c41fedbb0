"""The rank-r kernel's launcher: int32 reach of its output and mask, and its grid on GPUs of different
SM counts (nothing here needs a GPU: oversized calls raise before anything is allocated or launched)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed")

from reflora.backends.triton.backend import use_interpreter  # noqa: E402

use_interpreter()  # before the kernels are imported (conftest does the same for the whole suite)
from reflora.backends.triton import gemv, lowrank  # noqa: E402
from reflora.backends.triton._common import DEFAULT_SMS, sm_count  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def test_output_past_int32_offsets_raises():
    # 70000 x 40000 = 2.8e9 float32 outputs: the store offsets rp * Q + rq would wrap in int32.
    left, right = torch.empty(70000, 16, device=DEVICE), torch.empty(16, 40000, device=DEVICE)
    with pytest.raises(ValueError, match=r"the output \(70000, 40000\) has 2800000000 elements; .* int32"):
        lowrank.lowrank_matmul(left, right)


def test_mask_past_int32_reach_raises():
    # A mask of the right shape whose strides reach past 2**31 elements (meta: nothing is allocated).
    left, right = torch.empty(4, 64, device=DEVICE), torch.empty(64, 16, device=DEVICE)
    mask = torch.empty_strided((4, 64), (2**31, 1), device="meta")
    with pytest.raises(ValueError, match=r"mask spans \d+ elements; the kernels index with int32"):
        lowrank.lowrank_matmul(left, right, mask=mask, mask_on="left")


def test_a_broadcast_operand_of_too_many_elements_is_named_by_its_count():
    # A stride-0 view with 2**31 elements spans one element of memory: "left spans 1 elements" said
    # nothing about why it was refused.
    left = torch.empty(1, 1, device="meta").expand(2**16, 2**15)
    with pytest.raises(ValueError, match=r"left has 2147483648 elements; the kernels index with int32"):
        lowrank.lowrank_matmul(left, torch.empty(2**15, 16, device="meta"))


def test_splits_are_capped_so_that_partials_stay_within_int32(monkeypatch):
    # 2**30 outputs: 8 float32 partials would be 2**33 elements; one split fits.
    grids = []
    monkeypatch.setattr(lowrank, "check_device", lambda *t: None)
    monkeypatch.setattr(lowrank, "_lowrank_kernel", _Recorder(grids))
    left, right = torch.empty(2**16, 4096, device="meta"), torch.empty(4096, 2**14, device="meta")
    cfg = lowrank.LowRankConfig(bp=64, bq=64, bk=32, split=8)
    out = lowrank.lowrank_matmul(left, right, config=cfg)
    assert grids == [(2**10, 2**8, 1)] and out.shape == (2**16, 2**14)


class _Recorder:
    """Stands in for the kernel: ``kernel[grid](...)`` appends the grid and launches nothing."""

    def __init__(self, grids: list):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("sms", [114, 132], ids=["H100-PCIe", "H100-SXM"])
def test_default_grids_give_four_programs_per_sm(sms, monkeypatch):
    # The Llama-7B MLP's rank-16 products at 8192 tokens, with the GPU tiles (not the interpreter's).
    monkeypatch.setattr(lowrank, "INTERPRET", False)
    shapes = ((8192, 16, 4096), (8192, 16, 11008), (11008, 16, 8192), (16, 4096, 8192), (16, 11008, 8192))
    for p, q, k in shapes:
        cfg = lowrank.default_config(p, q, k, sms)
        programs = -(-p // cfg.bp) * -(-q // cfg.bq) * cfg.split
        assert programs >= 4 * sms, (p, q, k, cfg)
    # The GEMV: about 4 stripes per SM for W (4096, 11008) (BN is a power of two).
    monkeypatch.setattr(gemv, "INTERPRET", False)
    cfg = gemv.default_config(1, 4096, 11008, sms)
    assert 3.5 * sms <= -(-4096 // cfg.bn) <= 8 * sms


def test_sm_count_falls_back_off_cuda():
    assert sm_count(torch.device("cpu")) == sm_count(torch.device("meta")) == DEFAULT_SMS == 132
