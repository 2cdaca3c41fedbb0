"""Backends that are wrong in ways a value comparison alone would not see, for
tests/test_conformance_integrity.py (``module:attr`` as ``odd_backends:Name``; tests/ is on sys.path
under pytest)."""

from __future__ import annotations

from reflora import lora
from reflora.backends.protocol import OPS
from reflora.backends.reference import ReferenceBackend


class DeclinesEverything(ReferenceBackend):
    """Says it supports every op, and raises NotImplementedError from each."""

    name = "declines-everything"


def _decline(self, *args, **kwargs):
    raise NotImplementedError("not written yet")


for _op in OPS:
    setattr(DeclinesEverything, _op, _decline)


class MissingKeyword(ReferenceBackend):
    """lora_forward without the protocol's dropout_mask keyword: every call is a TypeError."""

    name = "missing-keyword"

    def lora_forward(self, x, W, A, B, scaling, *, bias=None):
        return lora.forward(x, W, A, B, scaling, bias=bias)


class UpcastOutput(ReferenceBackend):
    """Declares the protocol's default arithmetic (results in the input dtype), returns float64."""

    name = "upcast-output"
    arithmetic = None  # the default: operands and results in the input dtype, float32 accumulation

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)  # float64


class SupportsNothing(ReferenceBackend):
    name = "supports-nothing"

    def supports(self, op, dtype):
        return "not implemented here"


class MissingDeviations(ReferenceBackend):
    name = "missing-deviations"
    deviations = "no-such-deviations.toml"


class UnknownDialect(ReferenceBackend):
    name = "unknown-dialect"
    dialect = "bitsandbytes"


class TorchTensors(ReferenceBackend):
    """Returns torch tensors where the protocol says numpy."""

    name = "torch-tensors"

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        import torch

        return torch.from_numpy(lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask))


class BadArithmetic(ReferenceBackend):
    name = "bad-arithmetic"

    def arithmetic(self, op, dtype):
        from reflora.bounds import Arithmetic

        return Arithmetic(operand=dtype, accumulate="fp32", intermediate=dtype, output="float64")
