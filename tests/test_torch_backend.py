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
