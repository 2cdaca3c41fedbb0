"""Bugs planted in the real libraries fail the suite through their adapters.

An adapter exists to hold the real library to the oracle; one that helps the library hides its bugs. An
audit planted bugs into bitsandbytes, torchao and PEFT at runtime and ran the ci profile: these are the
ones that passed then, each planted here the same way (undone after the test) and run on the few tests
that must now catch it, with the message a reader would see:

* a library's NotImplementedError (torch's "Could not run ... CPU backend") counted as a decline;
* bnb state metadata that reflora.QuantState cannot hold (``state2.dtype``), rebuilt instead of checked;
* torchao's dtype taken from the input instead of the NF4Tensor, and its ``NF4Tensor.to(dtype)`` (the
  path ``linear_nf4`` takes) never called;
* and, since torchao's QLoRA base is tested, two plants in ``linear_nf4`` itself: a zero grad_x and a
  weight dequantized in bfloat16 for float32 activations;
* PEFT's own scaling overwritten and its dropout module replaced unchecked;
* a declared deviation whose ``*`` swallowed a new bug in another dtype, or another error of the same output;
* and, added with the torchao-shaped cases grouped by 128 and 64 block scales, torchao's scalers rebuilt
  with the first group's factor for every group.
"""

from __future__ import annotations

import numpy as np
import pytest

from reflora import backends
from reflora.conformance import profiles, runner

pytestmark = pytest.mark.filterwarnings("ignore")


def _backend(name: str):
    row = next(s for s in backends.status() if s.name == name)
    if not row.available:
        pytest.skip(f"{name}: {row.reason}")
    if name in ("bitsandbytes", "peft") and row.dialect != "bnb-cpu":
        pytest.skip(f"the plants below are written for bitsandbytes' CPU path; here it is {row.dialect}")
    return backends.get(name)


def _run(name: str, select: list[str], tmp_path) -> dict[str, runner.TestResult]:
    """The ci profile on ``select`` (with the backend's own deviations file), results by test id."""
    prof = profiles.get("ci")
    rep = runner.run_backend(_backend(name), name, prof, prof.seed, bundle_dir=tmp_path, select=select)
    assert len(rep.results) == len(select), [r.id for r in rep.results]
    return {r.id: r for r in rep.results}


def _failed(results: dict[str, runner.TestResult], test_id: str, text: str) -> str:
    """The first line of ``test_id``'s failure, after checking it failed (not declared) saying ``text``."""
    r = results[test_id]
    first = (r.message or "").splitlines()[0] if r.message else ""
    assert r.status == "fail", f"{test_id}: {r.status} {first}"
    assert text in first, first
    assert r.replay and r.bundle, r
    return first


# ---- a library's NotImplementedError is a failure ---------------------------------------------------


def test_a_missing_bfloat16_kernel_in_bitsandbytes_fails(monkeypatch, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    def missing(op):
        raise NotImplementedError(
            f"Could not run 'bitsandbytes::{op}' with arguments from the 'CPU' backend."
        )

    quantize, dequantize, matmul = F.quantize_4bit, F.dequantize_4bit, bnb.matmul_4bit

    def quantize_4bit(A, *args, **kwargs):
        return missing("quantize_4bit") if A.dtype == torch.bfloat16 else quantize(A, *args, **kwargs)

    def dequantize_4bit(A, quant_state=None, *args, **kwargs):
        if quant_state.dtype == torch.bfloat16:
            missing("dequantize_4bit")
        return dequantize(A, quant_state, *args, **kwargs)

    def matmul_4bit(A, *args, **kwargs):
        return missing("gemm_4bit") if A.dtype == torch.bfloat16 else matmul(A, *args, **kwargs)

    monkeypatch.setattr(F, "quantize_4bit", quantize_4bit)
    monkeypatch.setattr(F, "dequantize_4bit", dequantize_4bit)
    monkeypatch.setattr(bnb, "matmul_4bit", matmul_4bit)
    ids = [
        "quantize_4bit[one row, bfloat16]",
        "dequantize_4bit[odd n, bfloat16]",
        "qlora_forward[rank 1, bfloat16]",
        "quantize_4bit[one row, float32]",
    ]
    results = _run("bitsandbytes", ids, tmp_path)
    for test_id in ids[:3]:
        _failed(results, test_id, "bitsandbytes raised NotImplementedError: Could not run 'bitsandbytes::")
    assert results[ids[3]].status == "pass"  # float32 still has its kernel


def test_the_adapters_own_decline_is_still_a_decline():
    """torchao's adapter declines a plain QuantState (its NF4Tensor cannot hold float32 scales): that
    NotImplementedError is the adapter's, raised before any torchao code runs."""
    from reflora import nf4

    backend = _backend("torchao")
    with pytest.raises(NotImplementedError, match=r"cannot hold a reflora\.QuantState"):
        backend.dequantize_4bit(nf4.quantize(np.ones(64, np.float32), 64))


# ---- what the library returned, not what the adapter rebuilt -----------------------------------------


def _state2_in_float16(qs) -> None:
    import torch

    qs.state2.dtype = torch.float16  # bnb's own dequantize then rounds the rebuilt absmax to float16


def _offset_in_float64(qs) -> None:
    qs.offset = qs.offset.double()


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        (_state2_in_float16, "QuantState.state2.dtype is torch.float16"),
        (_offset_in_float64, "QuantState.offset is ('torch.float64'"),
    ],
    ids=["state2.dtype float16", "offset float64"],
)
def test_bnb_state_metadata_the_adapter_cannot_carry_fails(plant, says, monkeypatch, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    quantize = F.quantize_4bit

    def planted(A, *a, **k):
        packed, qs = quantize(A, *a, **k)
        if qs.nested:
            plant(qs)
        return packed, qs

    monkeypatch.setattr(F, "quantize_4bit", planted)
    ids = ["quantize_4bit[double quant, one block, float32]",
           "dequantize_4bit[own state round trip, double quant, ragged, float32]"]  # fmt: skip
    results = _run("bitsandbytes", ids, tmp_path)
    for test_id in ids:
        _failed(results, test_id, says)


def test_torchao_state_dtype_is_the_nf4tensors(monkeypatch, tmp_path):
    _backend("torchao")
    import torch

    from reflora.backends.torchao import _nf4

    m = _nf4()
    from_tensor = m.NF4Tensor.from_tensor.__func__

    def planted(cls, t, block_size, scaler_block_size):  # records float32 whatever the input dtype
        n = from_tensor(cls, t, block_size, scaler_block_size)
        meta = m.SubclassTensorArgs(n.shape, n.stride(), n.storage_offset(), torch.float32, n.device, False)
        return m.NF4Tensor(meta, n.block_size, n.n_blocks, n.scaler_block_size, n.quantized_scalers,
                           n.quantization_factor, n.scaler_mean, n.quantized_data, n.nf4)  # fmt: skip

    monkeypatch.setattr(m.NF4Tensor, "from_tensor", classmethod(planted))
    results = _run("torchao", ["quantize_4bit[random, float16]"], tmp_path)
    _failed(results, "quantize_4bit[random, float16]", "state.dtype = float32, expected float16")


def test_torchao_dequantizes_through_its_own_to_dtype(monkeypatch, tmp_path):
    _backend("torchao")
    import torch

    from reflora.backends.torchao import _nf4

    m = _nf4()
    to = m.NF4_TORCH_FUNCTIONS[torch.Tensor.to]

    def planted(*args, **kwargs):  # NF4Tensor.to(dtype) rounds through float16 first
        out = to(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not isinstance(out, m.NF4Tensor) and out.is_floating_point():
            return out.to(torch.float16).to(out.dtype)
        return out

    monkeypatch.setitem(m.NF4_TORCH_FUNCTIONS, torch.Tensor.to, planted)
    results = _run("torchao", ["dequantize_4bit[random, float32]"], tmp_path)
    _failed(results, "dequantize_4bit[random, float32]", "torchao's NF4Tensor.to(torch.float32) differs from")


def test_torchao_round_trip_dequantizes_the_object_torchao_returned():
    import dataclasses

    from reflora.backends import torchao as adapter

    backend = _backend("torchao")
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    state = backend.quantize_4bit(x, blocksize=64, double_quant=True)
    fields_only = dataclasses.replace(state)  # the same fields, no NF4Tensor kept
    np.testing.assert_array_equal(backend.dequantize_4bit(state), backend.dequantize_4bit(fields_only))
    getattr(state, adapter._HELD).quantized_data[0] ^= 0xFF  # torchao's object, not the state's fields
    assert backend.dequantize_4bit(state)[0, 0] != backend.dequantize_4bit(fields_only)[0, 0]


def test_torchao_scalers_of_one_group_for_every_group_fail(monkeypatch, tmp_path):
    """torchao rebuilds the block scales group by group (its scaler_block_size); planted: every group
    divided by group 0's quantization_factor. The torchao-shaped cases in groups of 128 and 64 (more
    than one group in 256 blocks) fail, dequantization and the QLoRA base alike."""
    _backend("torchao")
    from reflora.backends.torchao import _nf4

    m = _nf4()
    rebuild = m.NF4Tensor.dequantize_scalers

    def planted(self, scalers, factor, scaler_block_size):
        return rebuild(self, scalers, factor[:1].expand(factor.shape), scaler_block_size)

    monkeypatch.setattr(m.NF4Tensor, "dequantize_scalers", planted)
    ids = ["dequantize_4bit[double quant in groups of 64, torchao-shaped, float32]",
           "qlora_forward[torchao-shaped base in groups of 128, bfloat16]"]  # fmt: skip
    results = _run("torchao", ids, tmp_path)
    _failed(results, ids[0], "out[32, 0]")  # row 32 starts block 64: group 1
    _failed(results, ids[1], "y")


# ---- torchao's QLoRA base: linear_nf4 forward and backward ------------------------------------------


def test_torchao_qlora_gets_its_dialects_state_and_rejects_what_torchao_cannot_quantize(tmp_path):
    """The suite hands torchao its own dialect's state of the base: the random properties and the
    torchao-shaped cases run torchao; a case whose base torchao cannot quantize (not double-quantized,
    too few blocks) is reported rejected with that reason, not passed."""
    shaped = "qlora_backward[3-D transposed x, mask, torchao-shaped base, float16]"
    results = _run("torchao", ["qlora_forward[random, bfloat16]", shaped, "qlora_forward[rank 1, float32]"],
                   tmp_path)  # fmt: skip
    assert results["qlora_forward[random, bfloat16]"].status == "pass"
    assert results["qlora_forward[random, bfloat16]"].declined == 0
    assert results["qlora_forward[random, bfloat16]"].rejected == 0
    assert results[shaped].status == "pass"
    rejected = results["qlora_forward[rank 1, float32]"]
    assert rejected.status == "rejected"
    assert "dialect torchao has no state for these inputs" in rejected.reason, rejected.reason


def _plant_linear_nf4(monkeypatch, forward=None, backward=None) -> None:
    from reflora.backends.torchao import _nf4

    fn = _nf4().LinearNF4
    if forward is not None:
        monkeypatch.setattr(fn, "forward", staticmethod(forward))
    if backward is not None:
        monkeypatch.setattr(fn, "backward", staticmethod(backward))


def test_a_zero_gradient_through_linear_nf4_fails(monkeypatch, tmp_path):
    """The fused-kernel bug the brief names: grad_x silently zero through the frozen base."""
    _backend("torchao")
    import torch

    _plant_linear_nf4(monkeypatch, backward=lambda ctx, g: (torch.zeros_like(g[..., :1]).expand(
        *g.shape[:-1], ctx.saved_tensors[0].shape[1]), None))  # fmt: skip
    results = _run("torchao", ["qlora_backward[random, float32]"], tmp_path)
    _failed(results, "qlora_backward[random, float32]", "grad_x")


def test_linear_nf4_dequantizing_in_bfloat16_fails_in_float32(monkeypatch, tmp_path):
    _backend("torchao")
    import torch
    import torch.nn.functional as F

    def forward(ctx, x, weight):  # the weight dequantized to bfloat16 whatever x's dtype
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(torch.bfloat16).to(x.dtype))

    _plant_linear_nf4(monkeypatch, forward=forward)
    results = _run("torchao", ["qlora_forward[random, float32]"], tmp_path)
    _failed(results, "qlora_forward[random, float32]", "y")


# ---- PEFT computes its own scaling and builds its own dropout --------------------------------------


@pytest.mark.parametrize(
    "planted",
    [
        lambda self, alpha, r: float(int(alpha) // r),  # the audit's plant: integer division
        lambda self, alpha, r: alpha / r,  # use_rslora ignored
    ],
    ids=["alpha // r", "rsLoRA ignored"],
)
def test_a_peft_scaling_bug_fails(planted, monkeypatch, tmp_path):
    pytest.importorskip("peft")
    from peft.tuners.lora import layer

    update = layer.LoraLayer.update_layer

    def update_layer(self, adapter_name, r, lora_alpha, *args, **kwargs):
        out = update(self, adapter_name, r, lora_alpha, *args, **kwargs)
        self.scaling[adapter_name] = planted(self, lora_alpha, r)
        return out

    monkeypatch.setattr(layer.LoraLayer, "update_layer", update_layer)
    test_id = "lora_forward[odd and prime dimensions, float32]"  # r = 5: PEFT's rsLoRA formula
    _failed(_run("peft", [test_id], tmp_path), test_id, "PEFT's scaling is ")


def test_a_peft_dropout_bug_fails(monkeypatch, tmp_path):
    pytest.importorskip("peft")
    import torch
    from peft.tuners.lora import layer

    update = layer.LoraLayer.update_layer

    def update_layer(self, adapter_name, *args, **kwargs):  # p = 0.9 whatever lora_dropout says
        out = update(self, adapter_name, *args, **kwargs)
        self.lora_dropout[adapter_name] = torch.nn.Dropout(p=0.9)
        return out

    monkeypatch.setattr(layer.LoraLayer, "update_layer", update_layer)
    ids = ["lora_forward[dropout p=0.5, float32]", "lora_backward[rank 1, float32]"]
    results = _run("peft", ids, tmp_path)
    _failed(
        results,
        ids[0],
        "PEFT built Dropout(p=0.9, inplace=False) as the adapter's dropout for lora_dropout = 0.5",
    )
    _failed(results, ids[1], "expected Identity")


def test_peft_keeps_the_scaling_it_computed():
    pytest.importorskip("peft")
    from reflora.backends import peft as adapter

    for r, scaling in ((1, 16.0), (4, 0.25), (5, 16 / 5), (7, 16 / 7**0.5), (64, -0.125), (3, 1 / 3)):
        alpha, rslora = adapter.lora_alpha(r, scaling)
        assert rslora == (r & (r - 1) != 0)
        W = np.zeros((3, 2), np.float32)
        A, B = np.zeros((r, 2), np.float32), np.zeros((3, r), np.float32)
        layer = adapter.PeftBackend()._lora_layer(np.zeros((1, 2), np.float32), W, A, B, scaling)
        assert abs(layer.scaling["default"] - scaling) <= 2 * np.spacing(abs(scaling)), (r, scaling)
        assert layer.use_rslora["default"] == rslora and layer.lora_alpha["default"] == alpha


# ---- a declared deviation covers its own dtype, output and error only ----------------------------


def test_a_new_bug_in_a_declared_test_of_another_dtype_or_error_still_fails(monkeypatch, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    import torch

    dequantize = F.dequantize_4bit

    def planted(A, quant_state=None, *a, **k):
        if len(quant_state.shape) == 3 and quant_state.dtype == torch.float32:
            raise RuntimeError("a new bug")  # where bnb's shim raises another error
        if quant_state.nested:  # the offset forgotten: absmax rebuilt without it
            offset = quant_state.offset
            quant_state.offset = torch.zeros_like(offset)
            try:
                return dequantize(A, quant_state, *a, **k)
            finally:
                quant_state.offset = offset
        return dequantize(A, quant_state, *a, **k)

    monkeypatch.setattr(F, "dequantize_4bit", planted)
    ids = ["dequantize_4bit[own state round trip, near overflow, finite, float16]",
           "dequantize_4bit[3-D state of 2 elements, float32]",
           "dequantize_4bit[3-D state of 2 elements, float16]"]  # fmt: skip
    results = _run("bitsandbytes", ids, tmp_path)
    _failed(results, ids[0], "dequantize_4bit: out[0, 0] = 0 (0x0000), expected 65504")
    _failed(results, ids[1], "RuntimeError: a new bug")
    assert results[ids[2]].status == "declared"  # bnb's own error, as declared


# ---- x and grad_y reach the library ---------------------------------------------------------------


def test_bnb_gets_x_unchecked_and_its_qlora_still_rejects_an_x_of_width_out(recwarn):
    """bnb's matmul_4bit takes an x whose width is out_features as a [K, N] weight's input (deprecated,
    with a warning) and returns a result; the QLoRA op rejects it all the same, in its low-rank term."""
    from reflora import nf4

    backend = _backend("bitsandbytes")
    import torch

    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 64)).astype(np.float32)
    state = nf4.quantize(W, 64)
    x = rng.standard_normal((2, 8)).astype(np.float32)  # width out = 8, not in = 64
    base = backend._base(state)
    assert tuple(base(torch.from_numpy(x), None).shape) == (2, 64)  # bnb accepted it
    assert any(issubclass(w.category, DeprecationWarning) for w in recwarn)
    A, B = rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    with pytest.raises(RuntimeError):  # torch's matmul in the low-rank term, not the adapter's check
        backend.qlora_forward(x, state, A, B, 1.0)


def test_bnb_dequantize_returns_bnbs_own_shape():
    from reflora.dialects import bnb_cpu

    backend = _backend("bitsandbytes")
    for shape, returned in (
        ((4,), (1, 4)),
        ((2,), (2, 1)),
        ((2, 1), (1, 2)),
        ((1, 2), (2, 1)),
        ((3, 4), (3, 4)),
    ):
        x = np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)
        out = backend.dequantize_4bit(backend.quantize_4bit(x, blocksize=64))
        assert out.shape == returned, shape
        np.testing.assert_array_equal(
            out.reshape(-1), bnb_cpu.dequantize(bnb_cpu.quantize(x, 64)).reshape(-1)
        )
