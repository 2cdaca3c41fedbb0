"""The suite: every test, with its id. A test is a hypothesis property or a special case, for one op
and one dtype.

**Test-id format**: ``<op>[<name>, <dtype>]``

* ``<op>``: one of :data:`reflora.backends.OPS` (quantize_4bit, dequantize_4bit, lora_forward,
  lora_backward, qlora_forward, qlora_backward, lora_merge);
* ``<name>``: ``random`` for the main property of the op, ``random ... -> error`` for its bad-input
  property, ``random own state round trip`` for the round trip, otherwise the special case's name
  (:mod:`reflora.conformance.cases`); a name ending in ``-> error`` is a bad-input test;
* ``<dtype>``: float32, float16 or bfloat16: the dtype of the inputs (of W for merges; for QLoRA of the
  activations and of the quantized weight, except in ``random, base weight in another dtype``, whose
  base weight, and so its state, is in one of the two other dtypes, drawn).

Examples: ``quantize_4bit[random, float16]``, ``quantize_4bit[nf4 x exactly at threshold 2|3, float32]``,
``quantize_4bit[NaN weight -> error, bfloat16]``, ``qlora_backward[one row, float32]``. The same ids
name the pytest tests and the entries of a deviations file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from reflora.backends.protocol import DTYPES, OPS  # the protocol's ops and dtypes are the suite's
from reflora.conformance import cases as _cases
from reflora.conformance import strategies
from reflora.conformance.bundle import Inputs
from reflora.conformance.profiles import Profile

__all__ = ["OPS", "Test", "make_id", "parse_id", "tests"]

_ID = re.compile(r"^(?P<op>[a-z_0-9]+)\[(?P<name>.+), (?P<dtype>float32|float16|bfloat16)\]$")


def make_id(op: str, name: str, dtype: str) -> str:
    """``op[name, dtype]``."""
    return f"{op}[{name}, {dtype}]"


def parse_id(test_id: str) -> tuple[str, str, str]:
    """(op, name, dtype) of a test id; ValueError if it is not of the form ``op[name, dtype]``."""
    m = _ID.match(test_id)
    if not m:
        raise ValueError(f"{test_id!r} is not a test id of the form 'op[name, dtype]'")
    return m["op"], m["name"], m["dtype"]


@dataclass(frozen=True)
class Test:
    """One test. kind: "property" (hypothesis draws inputs) or "case" (fixed inputs); check: the
    check it runs; requires: the ops the backend must support for it to run."""

    id: str
    op: str
    dtype: str
    kind: str
    check: str
    requires: tuple[str, ...]
    draw: Callable | None = None
    case: _cases.Case | None = None

    def draw_inputs(self, data, profile: Profile, rules: strategies.InputRules) -> Inputs:
        """A property's inputs for one hypothesis example."""
        return self.draw(data, self, profile, rules)

    def case_inputs(self) -> Inputs:
        """A case's inputs (the same on every run)."""
        return _cases.build(self.case, self.dtype, self.id)


def _quantize(check: str):
    def draw(data, test: Test, profile: Profile, rules: strategies.InputRules) -> Inputs:
        if check == "rejects":
            return strategies.draw_bad_quantize(data, test.id, test.dtype, profile, rules)
        return strategies.draw_quantize(data, test.id, check, test.dtype, profile, rules)

    return draw


def _lora(bad: bool, other_base_dtype: bool = False):
    def draw(data, test: Test, profile: Profile, rules: strategies.InputRules) -> Inputs:
        if bad:
            return strategies.draw_bad_lora(data, test.id, test.op, test.dtype, profile, rules)
        if test.op.startswith("qlora"):
            return strategies.draw_qlora(data, test.id, test.op, test.dtype, profile, rules, other_base_dtype)
        return strategies.draw_lora(data, test.id, test.op, test.dtype, profile)

    return draw


MIXED = "random, base weight in another dtype"


# (op, name, check, extra ops required, draw)
PROPERTIES = (
    ("quantize_4bit", "random", "quantize", (), _quantize("quantize")),
    ("quantize_4bit", "random non-finite weight -> error", "rejects", (), _quantize("rejects")),
    ("dequantize_4bit", "random", "dequantize", (), _quantize("dequantize")),
    (
        "dequantize_4bit",
        "random own state round trip",
        "roundtrip",
        ("quantize_4bit",),
        _quantize("roundtrip"),
    ),
    *(
        entry
        for op in OPS[2:]
        for entry in (
            (op, "random", op, (), _lora(False)),
            (op, "random broken shape -> error", "rejects", (), _lora(True)),
        )
    ),
    *((op, MIXED, op, (), _lora(False, other_base_dtype=True)) for op in ("qlora_forward", "qlora_backward")),
)


def tests(ops: tuple[str, ...] = OPS, dtypes: tuple[str, ...] = DTYPES) -> list[Test]:
    """Every test of the suite for ``ops`` and ``dtypes``: by op, then dtype; properties, then cases."""
    out = []
    for op in ops:
        for dtype in dtypes:
            for p_op, name, check, extra, draw in PROPERTIES:
                if p_op == op:
                    out.append(
                        Test(make_id(op, name, dtype), op, dtype, "property", check, (op, *extra), draw)
                    )
            for case, case_dtype in _cases.cases_for(op):
                if case_dtype == dtype:
                    requires = (op, "quantize_4bit") if case.check == "roundtrip" else (op,)
                    out.append(Test(make_id(op, case.name, dtype), op, dtype, "case", case.check, requires,
                                    case=case))  # fmt: skip
    ids = [t.id for t in out]
    assert len(ids) == len(set(ids)), "duplicate test ids"
    return out
