"""Failure messages that point at the fault: an op that raises says where, and codes that are the
expected ones with their nibbles swapped say so."""

from __future__ import annotations

import pytest
from mutants import MemoryOrder, NibbleOrder

from reflora.backends.reference import ReferenceBackend
from reflora.conformance import profiles, runner


def _run(backend, select, tmp_path) -> runner.Report:
    prof = profiles.get("ci")
    return runner.run_backend(backend, "test", prof, 0, bundle_dir=tmp_path, select=select, entries=[])


class _RaisesInQLoRA(ReferenceBackend):
    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        return self._helper(x)

    def _helper(self, x):
        raise TypeError("a bug in my kernel wrapper")  # the line the report must name


def test_an_op_that_raises_is_reported_with_the_line_in_the_backend(tmp_path):
    rep = _run(_RaisesInQLoRA(), ["qlora_forward[random, float32]"], tmp_path)
    (r,) = rep.by_status("fail")
    first = r.message.splitlines()[0]
    assert "TypeError: a bug in my kernel wrapper (raised at " in first
    assert f"{__file__}:" in first and "in _helper)" in first


def test_swapped_nibbles_are_named(tmp_path):
    rep = _run(NibbleOrder(), ["quantize_4bit[random, float32]"], tmp_path)
    (r,) = rep.by_status("fail")
    assert "with their two nibbles swapped: element 2j goes in the high nibble" in r.message


def test_wrong_codes_are_reported_before_the_offset_they_spoil(tmp_path):
    """Blocks cut from memory order change the scales, so the double-quant offset (their mean) is wrong
    too; the codes are the cause, and the report names them first."""
    rep = _run(MemoryOrder(), ["quantize_4bit[transposed view, torchao-shaped, float32]"], tmp_path)
    (r,) = rep.by_status("fail")
    assert r.message.startswith("quantize_4bit: code[")


def test_a_backend_class_without_a_source_file_still_gets_its_failure(tmp_path):
    """A class defined in __main__ (python -c, a REPL) has no source file: the report still names the
    deepest frame, and never the suite's own."""
    namespace: dict = {"ReferenceBackend": ReferenceBackend}
    # the point is a class whose source inspect cannot find
    exec(
        "class Anon(ReferenceBackend):\n"
        "    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):\n"
        "        raise RuntimeError('boom')\n",
        namespace,
    )
    rep = _run(namespace["Anon"](), ["qlora_forward[random, float32]"], tmp_path)
    (r,) = rep.by_status("fail")
    assert "RuntimeError: boom (raised at <string>:3 in qlora_forward)" in r.message.splitlines()[0]


def test_wrong_codes_in_a_native_state_are_reported_before_its_offset(tmp_path):
    """torchao's own state (codes, int8 scalers, a scaler mean): a backend that cuts the blocks of a
    transposed view from memory order has wrong codes, and a wrong mean because of them."""
    pytest.importorskip("torchao")
    from reflora.backends.torchao import TorchaoBackend

    class TorchaoMemoryOrder(TorchaoBackend):
        def quantize_4bit(self, x, **kwargs):
            return super().quantize_4bit(x.ravel(order="K").reshape(x.shape), **kwargs)

    backend = TorchaoMemoryOrder()
    prof = profiles.get("ci")
    select = ["quantize_4bit[transposed view, torchao-shaped, float32]"]
    rep = runner.run_backend(backend, "torchao", prof, 0, bundle_dir=tmp_path, select=select, entries=[])
    (r,) = rep.by_status("fail")
    assert r.message.startswith("quantize_4bit: code[")
