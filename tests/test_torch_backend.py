"""The torch backend (reflora.backends.torch.backend:TorchBackend) held to the conformance suite.

The whole ci profile must pass: quantization byte for byte against the canonical dialect, the LoRA
ops within the bounds derived from the arithmetic the backend declares. The declaration is checked to
be load-bearing: the same ops declared with float64 intermediates (a lie) must fail.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("hypothesis")
from reflora.backends import get  # noqa: E402
from reflora.backends.torch.backend import TorchBackend, _full_precision_matmul  # noqa: E402
from reflora.bounds import Arithmetic  # noqa: E402
from reflora.conformance import profiles, runner  # noqa: E402


def test_registered_under_torch():
    backend = get("torch")
    assert isinstance(backend, TorchBackend)
    assert (backend.name, backend.dialect) == ("torch", "reflora")
    assert backend.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert backend.available() is True
    assert all(backend.supports(op, dt) is True for op in runner.OPS for dt in runner.DTYPES)


@pytest.mark.slow
def test_passes_the_ci_profile(tmp_path):
    reports, _, seed = runner.run(["torch"], profile="ci", bundle_dir=tmp_path)
    (report,) = reports
    assert seed == profiles.get("ci").seed
    assert report.ok, runner.matrix_text(report)
    # Every op and dtype ran: nothing was skipped as unsupported or declined.
    assert not report.by_status("unsupported", "declared"), runner.matrix_text(report)
    assert {(r.op, r.dtype) for r in report.results} == {(o, d) for o in runner.OPS for d in runner.DTYPES}
    assert not list(tmp_path.iterdir())  # no failure bundles


class _TooTight(TorchBackend):
    """The torch ops, declared as if their intermediates were kept in float64: a false declaration."""

    def arithmetic(self, op: str, dtype: str) -> Arithmetic:
        return Arithmetic(operand=dtype, accumulate="float64", intermediate="float64", output=dtype)


def test_a_false_arithmetic_declaration_is_caught(tmp_path):
    select = ["lora_forward[random, float32]", "qlora_backward[random, float16]"]
    report = runner.run_backend(
        _TooTight(), "too-tight", profiles.get("ci"), 0, bundle_dir=tmp_path, select=select
    )
    failed = {r.id for r in report.by_status("fail")}
    assert failed == set(select), runner.matrix_text(report)


def test_cuda_reductions_are_full_precision_inside_and_restored_after():
    m = torch.backends.cuda.matmul
    before = (
        m.allow_fp16_reduced_precision_reduction,
        m.allow_bf16_reduced_precision_reduction,
        m.allow_tf32,
    )
    m.allow_fp16_reduced_precision_reduction = True
    try:
        # The switches are process-wide and can be flipped without a GPU present.
        with _full_precision_matmul(torch.device("cuda")):
            assert not m.allow_fp16_reduced_precision_reduction
            assert not m.allow_bf16_reduced_precision_reduction
            assert not m.allow_tf32
        assert m.allow_fp16_reduced_precision_reduction
        with _full_precision_matmul(torch.device("cpu")):
            assert m.allow_fp16_reduced_precision_reduction  # the CPU is left alone
    finally:
        (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction, m.allow_tf32) = (
            before
        )


def test_bad_input_raises_at_the_boundary():
    import numpy as np

    backend = TorchBackend("cpu")
    with pytest.raises(TypeError, match="int64"):
        backend.quantize_4bit(np.arange(64))
    with pytest.raises(TypeError, match="QuantState"):
        backend.dequantize_4bit(np.zeros(4, np.float32))
    x, W = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    A, B = np.ones((1, 3), np.float32), np.ones((4, 1), np.float32)
    with pytest.raises(ValueError, match="grad_y"):
        backend.lora_backward(np.ones((2, 5), np.float32), x, W, A, B, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        backend.lora_merge(W, A, np.ones((3, 1), np.float32), 1.0)


def test_bfloat16_declares_flush_to_zero_exactly_where_torch_flushes():
    """On AVX512_BF16 CPUs torch's bfloat16 matmul reads and writes subnormals as zero; the declaration
    must say so there (the ci profile's tiny-valued QLoRA backward met it: grad_x 0 where float64 gives
    2.2e-38) and only there. Checked on the shape of that case, (64, 65) @ (65, 1), not the probe's."""
    from reflora.backends._tensors import bf16_matmul_flushes

    backend = TorchBackend("cpu")
    tiny = torch.full((64, 65), 2.0**-130, dtype=torch.bfloat16)  # subnormal in bfloat16
    flushed = bool(((tiny @ torch.ones((65, 1), dtype=torch.bfloat16)) == 0).all())
    assert bf16_matmul_flushes("cpu") == flushed
    for op in ("qlora_forward", "qlora_backward", "lora_forward", "lora_backward", "lora_merge"):
        assert backend.arithmetic(op, "bfloat16").flush_to_zero == flushed
        assert not backend.arithmetic(op, "float16").flush_to_zero
        assert not backend.arithmetic(op, "float32").flush_to_zero


def test_a_nan_from_zero_times_an_infinite_scale_may_take_any_bits():
    """The audit profile (seed 1343125675) failed the torch backend on dequantize_4bit[random, float32]:
    a zero code meeting a double-quantized scale rebuilt to inf is NaN, which torch converts to bfloat16
    as 0xffff and the oracle (ml_dtypes) as 0xffc0. The canonical rules define where a NaN is, not its
    bits (IEEE 754 leaves them to the platform): the canonical dialect now declares any NaN."""
    import warnings

    import numpy as np

    from reflora import nf4
    from reflora.conformance.dialect import get as dialect

    # the audit's minimal example: 33 values near float32's largest, blocksize 32, double quantization
    bits = [2137432877, 4281741493, 2139095039, 4274040641, 4263315205, 2139095039, 4265211341, 2110464703,
            4285653957, 2130824312, 2107391017, 4272839374, 2131995885, 4274620235, 4257118462, 4282080994,
            4266028210, 4279751862, 4277363745, 2130718668, 4276149382, 2139095039, 2138448687, 2137808468,
            2129014613, 2108218749, 4276385441, 2139095039, 2138085903, 2097390148, 4282690882, 2122115121,
            2131601768]  # fmt: skip
    x = np.array(bits, np.uint32).view(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = nf4.quantize(x, 32, double_quant=True)
    want = nf4.dequantize(state, "bfloat16")
    got = TorchBackend().dequantize_4bit(state, dtype="bfloat16")
    assert np.isnan(want[29]) and np.isnan(got[29])
    assert want.view(np.uint16)[29] != got.view(np.uint16)[29]  # 0xffc0 against torch's 0xffff
    nan = np.isnan(want)
    assert np.array_equal(want.view(np.uint16)[~nan], got.view(np.uint16)[~nan])
    assert dialect("reflora").nan_encodings(state, "bfloat16") == "any"
    rep = runner.run_backend(TorchBackend(), "torch", profiles.get("audit"), 1343125675,
                             select=["dequantize_4bit[random, float32]"])  # fmt: skip
    assert rep.ok, runner.matrix_text(rep)
