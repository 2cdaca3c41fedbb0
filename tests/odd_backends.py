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


class SupportsRaises(ReferenceBackend):
    """supports() raises for lora_forward (a probe with a bug), supports the rest."""

    name = "supports-raises"

    def supports(self, op, dtype):
        if op == "lora_forward":
            raise RuntimeError("boom in supports")
        return super().supports(op, dtype)


class SupportsNone(ReferenceBackend):
    """supports() with a missing return: None, which read as the reason "None"."""

    name = "supports-none"

    def supports(self, op, dtype):
        super().supports(op, dtype)


class AvailableRaises(ReferenceBackend):
    name = "available-raises"

    def available(self):
        raise RuntimeError("driver probe crashed")


class AvailableFalse(ReferenceBackend):
    name = "available-false"

    def available(self):
        return False


class TwoGradients(ReferenceBackend):
    """lora_backward returns (grad_A, grad_B): no grad_x."""

    name = "two-gradients"

    def lora_backward(self, grad_y, x, W, A, B, scaling, *, dropout_mask=None):
        return super().lora_backward(grad_y, x, W, A, B, scaling, dropout_mask=dropout_mask)[1:]


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


class TorchaoDialect(ReferenceBackend):
    """The torchao dialect itself as a backend (numpy only): quantizes what it takes, rejects the rest,
    and runs QLoRA on its own states; for the ``rejected`` status (tests/test_conformance_rejected.py)."""

    name = "torchao-dialect"
    dialect = "torchao"

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        from reflora.dialects import torchao_nf4

        if quant_type != "nf4" or not double_quant:
            raise ValueError("the torchao dialect quantizes NF4 with double quantization only")
        return torchao_nf4.quantize(x, blocksize)

    def dequantize_4bit(self, state, *, dtype=None):
        from reflora.dialects import torchao_nf4

        return torchao_nf4.dequantize(state, dtype)

    def qlora_forward(self, x, state, A, B, scaling, *, bias=None, dropout_mask=None):
        W = self.dequantize_4bit(state)
        return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask)


class TorchaoDialectAcceptsAll(TorchaoDialect):
    """Claims the torchao dialect but quantizes what it rejects (canonically): held to the dialect."""

    name = "torchao-dialect-accepts-all"

    def quantize_4bit(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        try:
            return super().quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                         double_quant=double_quant)  # fmt: skip
        except ValueError:
            from reflora import nf4

            return nf4.quantize(x, blocksize, quant_type=quant_type, double_quant=double_quant)


class TorchaoDialectDeclinesDequantize(TorchaoDialect):
    """Declines every dequantization (NotImplementedError): a decline is the backend's word, so a test
    whose examples are declined or outside the dialect is unsupported, not rejected."""

    name = "torchao-dialect-declines-dequantize"

    def dequantize_4bit(self, state, *, dtype=None):
        raise NotImplementedError("no dequantization here")
