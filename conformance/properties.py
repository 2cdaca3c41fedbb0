"""The checks: for each op, what a backend's result must satisfy on given inputs, and how it fails.

Every check takes a :class:`Context` (the backend, the dialect it claims, the findings to add to) and
an :class:`reflora.conformance.bundle.Inputs`, computes the expected result with the oracle, and
raises :class:`reflora.conformance.mismatch.Mismatch` when the backend's result is outside the
tolerance the table (:mod:`reflora.conformance.tolerances`) gives that output. The same function runs
a hypothesis example, a special case, and ``reflora replay``.

=================  ============================================================================
check              the property
=================  ============================================================================
``quantize``       the backend's state equals its dialect's, field for field (EXACT); the DQ offset
                   of a non-canonical dialect within :func:`~reflora.bounds.offset_bound`
                   and then replayed; inputs the dialect rejects must be rejected
``dequantize``     dequantize(the dialect's state) equals the dialect's dequantization, ULP(0)
``roundtrip``      dequantize(the backend's own state) equals the oracle's dequantization of that
                   same state, bit for bit
``lora_forward``   |y - ref64| <= lora_forward_bound with the backend's declared arithmetic
``lora_backward``  the three gradients within lora_backward_bound
``qlora_forward``  as lora_forward with W = dequantize(state), the state quantized canonically (by
                   the dialect, for a dialect with a state form of its own)
``qlora_backward`` as lora_backward with W = dequantize(state)
``lora_merge``     W' in W's dtype, within merge_interval: one rounding of W + s·B A within the
                   model's error before that rounding
``rejects``        bad input (a non-finite weight, shapes that do not fit) raises
=================  ============================================================================
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from reflora import blockwise, bounds, lora, nf4, qlora
from reflora.conformance import tolerances as tol
from reflora.conformance.bundle import Inputs, apply_view
from reflora.conformance.dialect import Dialect, offset_of
from reflora.conformance.mismatch import Declined, Mismatch, Rejected, fmt_index, fmt_value
from reflora.double_quant import BLOCKSIZE2, mean_f32
from reflora.state import QuantState

__all__ = ["CHECKS", "Context", "ProtocolError", "run_check", "supported"]


@dataclass
class Context:
    """backend: the object under test; name: how it was asked for (a registered name or module:attr);
    dialect: the dialect it claims; findings: where dialect-vs-canonical deviations are tallied (or None)."""

    backend: Any
    name: str
    dialect: Dialect
    findings: Any = None


def _context(ctx: Context, inputs: Inputs) -> dict[str, Any]:
    return {"backend": ctx.name, "dialect": ctx.dialect.name, "dtype": inputs.dtype, **inputs.context()}


def _bind(ctx: Context, inputs: Inputs, op: str, args: tuple, kwargs: dict) -> None:
    """Mismatch unless the backend's ``op`` takes the protocol's arguments: a signature error is the
    backend's, and must never pass for an answer (such as rejecting bad input)."""
    try:
        signature = inspect.signature(getattr(ctx.backend, op))
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing to check
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise Mismatch(op, "signature", None, f"{op}{signature}: {exc}", "the Backend protocol's "
                       "arguments", "the op must take them", _context(ctx, inputs)) from None  # fmt: skip


def _twin(inputs: Inputs, args: tuple, kwargs: dict) -> tuple[tuple, dict, dict[str, np.ndarray]]:
    """The arguments with every input array replaced by the same view of a private copy of its base,
    and those copies by name: the oracle computes from ``inputs``, which the backend never sees."""
    bases = {name: base.copy() for name, base in inputs.arrays.items()}
    handed: dict[str, np.ndarray] = {}

    def swap(a: Any) -> Any:
        if not isinstance(a, np.ndarray):
            return a
        for name in inputs.arrays:
            view = inputs[name]
            if a.__array_interface__ == view.__array_interface__:  # the very view: same memory, strides
                handed[name] = bases[name]
                recipe = inputs.views.get(name)
                return apply_view(bases[name], recipe) if recipe else bases[name]
        return a.copy()  # derived from the inputs (a reshape): a copy keeps the inputs safe all the same

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}, handed


def _untouched(ctx: Context, inputs: Inputs, op: str, handed: dict[str, np.ndarray]) -> None:
    """Mismatch if the backend wrote to an input (any byte of its base, skipped memory included)."""
    for name, copy in handed.items():
        before = inputs.arrays[name].reshape(-1).view(np.uint8)
        changed = np.flatnonzero(copy.reshape(-1).view(np.uint8) != before)
        if changed.size:
            i = int(changed[0]) // copy.itemsize
            index = tuple(int(k) for k in np.unravel_index(i, copy.shape))
            raise Mismatch(op, name, None, f"written in place (first at {fmt_index(index)} of its memory: "
                           f"{fmt_value(inputs.arrays[name].reshape(-1)[i])} -> "
                           f"{fmt_value(copy.reshape(-1)[i])})", "the input left unchanged",
                           "a backend must not write to its inputs", _context(ctx, inputs))  # fmt: skip


def _call(ctx: Context, inputs: Inputs, op: str, *args, **kwargs) -> Any:
    """The backend's op on valid inputs, given copies of them: NotImplementedError declines the
    example; any other exception, a signature that does not take the protocol's arguments, and a
    write to an input are failures."""
    _bind(ctx, inputs, op, args, kwargs)
    args, kwargs, handed = _twin(inputs, args, kwargs)
    try:
        result = getattr(ctx.backend, op)(*args, **kwargs)
    except NotImplementedError as exc:
        raise Declined(f"{op}: NotImplementedError: {exc}") from None
    except Exception as exc:
        raise Mismatch(op, "result", None, f"{type(exc).__name__}: {exc}{_raised_at(ctx.backend, exc)}",
                       "a result", "valid inputs must not raise", _context(ctx, inputs)) from exc  # fmt: skip
    _untouched(ctx, inputs, op, handed)
    return result


def _raised_at(backend: Any, exc: BaseException) -> str:
    """' (raised at FILE:LINE in FUNC)': the deepest frame in the backend's own source file, else the
    deepest frame, so that a failure of an op that raised points at the line to read."""
    here = os.path.dirname(os.path.abspath(__file__))  # the suite's own frames say nothing
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.dirname(f.filename) != here]
    if not frames:
        return ""
    try:
        own = inspect.getsourcefile(type(backend))
    except (TypeError, OSError):  # a class from C, or from __main__ with no file
        own = None
    mine = [f for f in frames if own and f.filename == own]
    f = (mine or frames)[-1]
    return f" (raised at {f.filename}:{f.lineno} in {f.name})"


class ProtocolError(Exception):
    """The backend broke the protocol outside an op: its ``supports`` raised, or returned neither True,
    False nor a reason. The test it was asked for fails (other tests and backends still run)."""


def supported(backend: Any, op: str, dtype: str) -> str | None:
    """None when ``backend`` supports ``op`` in ``dtype``, else its reason; :class:`ProtocolError` for a
    ``supports`` that raises or returns anything but True, False or a non-empty str (a missing
    ``return`` gave None, which read as a reason "None")."""
    check = getattr(backend, "supports", None)
    if check is None:
        return None
    try:
        verdict = check(op, dtype)
    except Exception as exc:
        raise ProtocolError(f"supports({op!r}, {dtype!r}) raised {type(exc).__name__}: {exc}") from exc
    if verdict is True:
        return None
    if verdict is False:
        return "supports() returned False"
    if isinstance(verdict, str) and verdict.strip():
        return verdict
    raise ProtocolError(
        f"supports({op!r}, {dtype!r}) returned {verdict!r}: it must return True, False or a reason (a str)"
    )


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _arithmetic(ctx: Context, op: str, dtype: str, context: dict | None = None) -> bounds.Arithmetic:
    declared = getattr(ctx.backend, "arithmetic", None)
    if declared is None:  # the protocol's default: operands and results in dtype, float32 accumulation
        return bounds.Arithmetic(operand=dtype, accumulate="float32", intermediate=dtype, output=dtype)
    try:
        arith = declared(op, dtype)
    except Exception as exc:  # Arithmetic refuses a dtype it does not know ("fp32", say)
        arith = f"{type(exc).__name__}: {exc}"
    if not isinstance(arith, bounds.Arithmetic):
        raise Mismatch(op, "arithmetic()", None, str(arith), "a reflora.bounds.Arithmetic (dtype names: "
                       f"{', '.join(_FLOATS)})", "the bounds are derived from it", context or {})  # fmt: skip
    return arith


def _array(op: str, output: str, value: Any, context: dict) -> np.ndarray:
    """``value`` when it is a numpy array (or scalar); a Mismatch otherwise: numpy crosses the boundary,
    and a tensor of another library converted here would hide where its bytes came from."""
    if not isinstance(value, np.ndarray | np.generic):
        raise Mismatch(
            op, output, None, type(value).__name__, "a numpy array", "numpy at the boundary", context
        )
    return np.asarray(value)


# ---- Quantization --------------------------------------------------------------------------------------


def _codes_detail(x: np.ndarray, scales: np.ndarray, blocksize: int):
    flat = x.reshape(-1)

    def detail(index: tuple[int, ...]) -> str:
        i = int(np.ravel_multi_index(index, x.shape)) if x.ndim else 0
        block = i // blocksize
        a = float(scales[block])
        ratio = f", x/absmax = {float(flat[i]) / a:.9g}" if a else ""
        where = f"x{fmt_index(index)} = {fmt_value(flat[i])} (flat {i})"
        return f"{where} in block {block}, absmax {fmt_value(a)}{ratio}"

    return detail


def _compare_codes(op: str, actual: np.ndarray, expected: np.ndarray, x: np.ndarray, scales, blocksize,
                   context: dict, allowed: tuple[np.ndarray, ...] | None) -> None:  # fmt: skip
    codes_a = nf4.unpack(actual, x.size).reshape(x.shape)
    codes_e = nf4.unpack(expected, x.size).reshape(x.shape)
    if allowed is not None:  # the dialect declares alternatives: a code matching any of them is right
        ok = np.zeros(x.shape, dtype=bool)
        for alt in allowed:
            ok |= codes_a == alt.reshape(x.shape)
        codes_e = np.where(ok, codes_a, codes_e)
    detail = _codes_detail(x, scales, blocksize)
    if (codes_a != codes_e).any() and _nibbles_swapped(actual, expected):
        where = detail
        detail = lambda index: (  # noqa: E731
            f"{where(index)}; the backend's bytes equal the expected ones with their two nibbles swapped: "
            "element 2j goes in the high nibble, 2j+1 in the low"
        )
    tol.expect_bits(op, "code", codes_a, codes_e, context, detail=detail)


def _nibbles_swapped(actual: np.ndarray, expected: np.ndarray) -> bool:
    a, e = np.asarray(actual, dtype=np.uint8).reshape(-1), np.asarray(expected, dtype=np.uint8).reshape(-1)
    return a.shape == e.shape and np.array_equal(((a & 0x0F) << 4) | (a >> 4), e)


def _absmax_detail(x: np.ndarray, blocksize: int):
    def detail(index: tuple[int, ...]) -> str:
        b = index[0]
        stop = min(x.size, (b + 1) * blocksize)
        ragged = " (the ragged tail)" if stop - b * blocksize < blocksize else ""
        return f"block {b} holds flat elements {b * blocksize} ... {stop - 1}{ragged} of x {x.shape}"

    return detail


def _compare_header(op: str, actual: QuantState, expected: QuantState, context: dict) -> None:
    for field in ("shape", "blocksize", "quant_type"):
        tol.expect_equal(op, f"state.{field}", getattr(actual, field), getattr(expected, field), context)


def _compare_quant_states(op, actual: QuantState, expected: QuantState, x, context, allowed) -> None:
    _compare_header(op, actual, expected, context)
    tol.expect_equal(op, "state.dtype", np.dtype(actual.dtype).name, np.dtype(expected.dtype).name, context)
    tol.expect_bits(op, "state.code", actual.code, expected.code, context)
    scales = nf4.block_scales(expected)
    _compare_codes(op, actual.packed, expected.packed, x, scales, expected.blocksize, context, allowed)
    tol.expect_bits(op, "packed", actual.packed, expected.packed, context)  # the padding nibble
    tol.expect_equal(op, "state.double_quant", actual.double_quant, expected.double_quant, context)
    if expected.nested is None:
        tol.expect_bits(op, "absmax", actual.absmax, expected.absmax, context,
                        detail=_absmax_detail(x, expected.blocksize))  # fmt: skip
        return
    a, e = actual.nested, expected.nested
    tol.expect_equal(op, "nested.blocksize2", a.blocksize2, e.blocksize2, context)
    tol.expect_bits(op, "nested.offset", np.asarray(a.offset), np.asarray(e.offset), context)
    tol.expect_bits(op, "nested.code2", a.code2, e.code2, context)
    tol.expect_bits(op, "nested.absmax_q", a.absmax_q, e.absmax_q, context)
    tol.expect_bits(op, "nested.absmax2", a.absmax2, e.absmax2, context)


# The field of a dialect's own state dataclass that holds the packed codes (torchao: quantized_data).
_CODE_FIELDS = ("quantized_data", "packed")


def _compare_native(op, actual, expected, quant_state: QuantState, x, context) -> None:
    """Field by field for a dialect's own state dataclass; packed codes reported per element."""
    scales = nf4.block_scales(quant_state)
    for f in dataclasses.fields(expected):
        va, ve = getattr(actual, f.name), getattr(expected, f.name)
        if f.name in _CODE_FIELDS:
            _compare_codes(
                op, np.asarray(va), np.asarray(ve), x, scales, quant_state.blocksize, context, None
            )
        if isinstance(ve, np.ndarray):
            tol.expect_bits(op, f"state.{f.name}", np.asarray(va), ve, context)
        else:
            tol.expect_equal(op, f"state.{f.name}", va, ve, context)


def _dialect_absmax(dialect: Dialect, x: np.ndarray, blocksize: int, quant_type: str) -> np.ndarray:
    """The block absmax values the dialect averages for its offset (its own, where it can give them)."""
    try:
        state = dialect.as_quant_state(dialect.quantize(x, blocksize, quant_type, False))
        if state.absmax is not None:
            return state.absmax
    except (ValueError, TypeError, AssertionError):
        pass
    return blockwise.block_absmax(x.reshape(-1).astype(np.float32), blocksize)


def _same_bits(a, b, dtype) -> bool:
    a, b = np.asarray(a, dtype=dtype).reshape(-1), np.asarray(b, dtype=dtype).reshape(-1)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _check_offset(ctx: Context, inputs: Inputs, state, x, context) -> np.ndarray | None:
    """Check the backend's DQ offset and return it (to replay through the dialect), or None.

    reflora: the exactly rounded mean, bit for bit. Other dialects: the dialect's own offset for these
    inputs bit for bit, or else within :func:`reflora.bounds.offset_bound` of the exact mean (a backend
    whose summation order differs from the dialect's emulation, but rounds no worse)."""
    found = offset_of(state)
    if found is None:
        return None
    offset, offset_dtype = found
    p = inputs.params
    if ctx.dialect.canonical:
        exact = mean_f32(blockwise.block_absmax(x.reshape(-1).astype(np.float32), p["blocksize"]))
        tol.expect_bits("quantize_4bit", "nested.offset", offset.astype(np.float32).reshape(()),
                        np.asarray(exact).reshape(()), context)  # fmt: skip
        return offset
    # Held exactly to the dialect it claims: its own emulated mean, bit for bit, passes (torchao's
    # float32 sum overflows to inf near the dtype's maximum, and the torchao dialect reproduces that).
    own = offset_of(ctx.dialect.quantize(x, p["blocksize"], p["quant_type"], True))
    if own is not None and own[1] == offset_dtype and _same_bits(offset, own[0], offset_dtype):
        return offset
    absmax = _dialect_absmax(ctx.dialect, x, p["blocksize"], p["quant_type"])
    mean, limit = bounds.offset_bound(absmax, offset_dtype)
    delta = abs(float(offset) - mean)
    if not delta <= limit:
        raise Mismatch("quantize_4bit", "nested.offset", None, fmt_value(offset),
                       f"{mean:.9g} (the exact mean)",
                       f"|Δ| = {delta:.3g} > BOUND = {limit:.3g}, offset_bound", context)  # fmt: skip
    return offset


def _outside(ctx: Context, what: str, why) -> Rejected:
    """The example is outside the claimed dialect: it has no state for these inputs."""
    return Rejected(f"{what}: dialect {ctx.dialect.name} has no state for these inputs ({why})")


def _dialect_state(ctx: Context, x: np.ndarray, p: dict, what: str, note: str = ""):
    """The claimed dialect's state of x for the params' blocksize, quant_type and double_quant; Rejected
    (``what``, ``note`` before the dialect's reason) where the dialect refuses x."""
    try:
        return ctx.dialect.quantize(x, p["blocksize"], p["quant_type"], p["double_quant"],
                                    blocksize2=p.get("blocksize2"))  # fmt: skip
    except (ValueError, TypeError, AssertionError) as exc:
        raise _outside(ctx, what, f"{note}{exc}") from None


def check_quantize(ctx: Context, inputs: Inputs) -> None:
    x, p = inputs["x"], inputs.params
    context = _context(ctx, inputs)
    args = (x,)
    kwargs = {"blocksize": p["blocksize"], "quant_type": p["quant_type"], "double_quant": p["double_quant"]}
    try:
        expected = ctx.dialect.quantize(x, p["blocksize"], p["quant_type"], p["double_quant"])
    except (ValueError, TypeError, AssertionError) as rejected:
        _bind(ctx, inputs, "quantize_4bit", args, kwargs)
        try:
            ctx.backend.quantize_4bit(*args, **kwargs)
        except NotImplementedError as exc:  # declining is not rejecting
            raise Declined(f"quantize_4bit: NotImplementedError: {exc}") from None
        except Exception as exc:  # rejected, as its dialect rejects it: all this example can check
            raise _outside(ctx, "quantize_4bit", f"{type(rejected).__name__}: {rejected}; the backend "
                           f"rejects them too ({type(exc).__name__})") from None  # fmt: skip
        raise Mismatch("quantize_4bit", "result", None, "a state",
                       f"an error, as dialect {ctx.dialect.name} raises "
                       f"{type(rejected).__name__}: {rejected}",
                       "held to the dialect", context) from None  # fmt: skip
    state = _call(ctx, inputs, "quantize_4bit", *args, **kwargs)
    if ctx.findings is not None:
        ctx.findings.record(inputs, x, expected)
    if p["double_quant"]:
        try:
            offset = _check_offset(ctx, inputs, state, x, context)
        except Mismatch:
            # The offset is the mean of the block scales: codes cut from the wrong blocks spoil both,
            # and the codes (which the offset does not change) are the cause to report.
            _codes_first(ctx, state, expected, x, p, context)
            raise
        if offset is not None and not ctx.dialect.canonical:
            expected = ctx.dialect.quantize(x, p["blocksize"], p["quant_type"], True, offset=offset)
    native_form = not isinstance(state, QuantState)
    if native_form and type(state) is not type(expected):
        raise Mismatch("quantize_4bit", "result", None, type(state).__name__, "a reflora.QuantState or the "
                       f"dialect's {type(expected).__name__}", "EXACT", context)  # fmt: skip
    if native_form:
        _compare_native("quantize_4bit", state, expected, ctx.dialect.as_quant_state(expected), x, context)
        return
    allowed = ctx.dialect.allowed_codes(x, p["blocksize"], p["quant_type"])
    _compare_quant_states("quantize_4bit", state, ctx.dialect.as_quant_state(expected), x, context, allowed)


def _codes_first(ctx: Context, state: Any, expected: Any, x: np.ndarray, p: dict, context: dict) -> None:
    """A codes Mismatch if the backend's codes differ from the dialect's: a QuantState's (after its
    header), or the packed codes of a native state of the dialect's own type (torchao's
    ``quantized_data``), where the sizes agree."""
    want = ctx.dialect.as_quant_state(expected)
    if isinstance(state, QuantState):
        _compare_header("quantize_4bit", state, want, context)  # a wrong header explains codes and offset
        got, ref = state.packed, want.packed
        allowed = ctx.dialect.allowed_codes(x, p["blocksize"], p["quant_type"])
    elif type(state) is type(expected) and dataclasses.is_dataclass(expected):
        field = next((f for f in _CODE_FIELDS if hasattr(expected, f)), None)
        if field is None:
            return
        got, ref, allowed = np.asarray(getattr(state, field)), np.asarray(getattr(expected, field)), None
    else:
        return
    if np.shape(got) != np.shape(ref):
        return
    scales = nf4.block_scales(want)
    _compare_codes("quantize_4bit", got, ref, x, scales, want.blocksize, context, allowed)


def check_dequantize(ctx: Context, inputs: Inputs) -> None:
    x, p = inputs["x"], inputs.params
    context = _context(ctx, inputs)
    native = _dialect_state(ctx, x, p, "dequantize_4bit")  # no state of this dialect: nothing to dequantize
    # The dialect's own state: a QuantState, or its native form (torchao's TorchaoNF4State), which is what
    # a backend of that dialect reads; a native state converted to a QuantState would not be its input.
    state = native if not ctx.dialect.native_is_quant_state() else ctx.dialect.as_quant_state(native)
    out_dtype = p.get("out_dtype")
    out = _array(
        "dequantize_4bit", "out", _call(ctx, inputs, "dequantize_4bit", state, dtype=out_dtype), context
    )
    expected = ctx.dialect.dequantize(native, out_dtype)
    n = tol.entry("dequantize_4bit", "out").tolerance.n
    tol.expect_ulp("dequantize_4bit", "out", out, expected, n, context)  # values first, then the dtype
    if not n:  # 0 ulp: the bits, a zero's sign too (+0.0 for a zero block, -0.0 where its scale is < 0)
        nan_bits = ctx.dialect.nan_encodings(native, out_dtype)
        tol.expect_bits("dequantize_4bit", "out", out, expected, context, nan_bits=nan_bits)


def check_roundtrip(ctx: Context, inputs: Inputs) -> None:
    x, p = inputs["x"], inputs.params
    context = _context(ctx, inputs)
    kwargs = {"blocksize": p["blocksize"], "quant_type": p["quant_type"], "double_quant": p["double_quant"]}
    _dialect_state(ctx, x, p, "round trip")  # check_quantize covers the rejection itself
    state = _call(ctx, inputs, "quantize_4bit", x, **kwargs)
    out_dtype = p.get("out_dtype")
    out = _array(
        "dequantize_4bit", "out", _call(ctx, inputs, "dequantize_4bit", state, dtype=out_dtype), context
    )
    try:
        expected = ctx.dialect.dequantize(state, out_dtype)
    except Exception as exc:
        raise Mismatch("quantize_4bit", "result", None, f"a state the oracle cannot dequantize ({exc})",
                       "a well-formed state", "EXACT", context) from exc  # fmt: skip
    if p.get("require_finite") and np.isfinite(np.asarray(x, dtype=np.float64)).all():
        bad = np.flatnonzero(~np.isfinite(np.asarray(out, dtype=np.float64)).reshape(-1))
        if bad.size:  # the contract, whatever the dialect: finite weights dequantize to finite values
            index = tuple(int(i) for i in np.unravel_index(bad[0], np.shape(out)))
            raise Mismatch("dequantize_4bit", "out", index, fmt_value(np.asarray(out).reshape(-1)[bad[0]]),
                           "a finite value (the input is finite)",
                           f"{bad.size} of {np.size(out)} non-finite; finite input must stay finite",
                           context)  # fmt: skip
    nan_bits = ctx.dialect.nan_encodings(state, out_dtype)
    tol.expect_bits("dequantize_4bit", "out", out, expected, context, nan_bits=nan_bits)


# ---- LoRA ---------------------------------------------------------------------------------------------


def _operands(inputs: Inputs) -> dict[str, Any]:
    return {k: inputs.get(k) for k in ("x", "W", "A", "B", "bias", "dropout_mask", "grad_y")}


def _bound(op: str, context: dict, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:  # operands not representable in the declared operand dtype
        raise Mismatch(op, "arithmetic()", None, str(exc), "operands of the declared operand dtype",
                       "the backend's declared arithmetic must describe its inputs",
                       context) from exc  # fmt: skip


def _base_state(ctx: Context, inputs: Inputs, flat: bool = False) -> tuple[Any, np.ndarray]:
    """(the state the backend gets, the weight Ŵ it stands for) for a QLoRA check's base W (flattened
    to 1-D with ``flat``, for the bad-input case of a state that is not a weight).

    A dialect whose states are QuantStates gets W quantized canonically (any QuantState is its input).
    A dialect with a state form of its own (torchao) gets its dialect's state of W, the only form its
    backend reads, and Ŵ is that state's dequantization by the dialect's own rule (not the canonical
    one through ``to_quant_state``, which refuses the negative scales torchao can rebuild for a block of
    absmax near zero). Where that dialect cannot quantize W (a shape it refuses), the example is
    rejected (:class:`Rejected`): there is no state to hand the backend."""
    p = inputs.params
    W = inputs["W"].reshape(-1) if flat else inputs["W"]
    if ctx.dialect.native_is_quant_state():
        state = nf4.quantize(W, p["blocksize"], quant_type=p["quant_type"], double_quant=p["double_quant"],
                             blocksize2=p.get("blocksize2", BLOCKSIZE2))  # fmt: skip
        return state, (nf4.dequantize(state) if flat else qlora.dequantized_base(state))
    state = _dialect_state(ctx, W, p, f"{inputs.op} (the base weight)")
    return state, ctx.dialect.dequantize(state)


def _forward(ctx: Context, inputs: Inputs) -> None:
    op, o = inputs.op, _operands(inputs)
    s = inputs.params["scaling"]
    context = _context(ctx, inputs)
    if op == "qlora_forward":
        state, W = _base_state(ctx, inputs)
        y = _call(
            ctx, inputs, op, o["x"], state, o["A"], o["B"], s, bias=o["bias"], dropout_mask=o["dropout_mask"]
        )
    else:
        W = o["W"]
        y = _call(
            ctx, inputs, op, o["x"], W, o["A"], o["B"], s, bias=o["bias"], dropout_mask=o["dropout_mask"]
        )
    ref = lora.forward(o["x"], W, o["A"], o["B"], s, bias=o["bias"], dropout_mask=o["dropout_mask"])
    arith = _arithmetic(ctx, op, inputs.dtype, context)
    limit = _bound(op, context, bounds.lora_forward_bound, o["x"], W, o["A"], o["B"], s, arith,
                   bias=o["bias"], dropout_mask=o["dropout_mask"], base_dtype=_base_dtype(op, W, arith),
                   base_error=_base_error(state, arith) if op == "qlora_forward" else None)  # fmt: skip
    y = _array(op, "y", y, context)
    _expect_output_dtype(op, "y", y, arith, context)
    tol.expect_bound(op, "y", y, ref, limit, context, "lora_forward_bound (bounds.md §6)")


def _base_error(state, arith: bounds.Arithmetic) -> np.ndarray | None:
    """What the bound adds to the base weight of a backend that declares ``fma_absmax``: the state's
    :func:`reflora.bounds.fma_dequant_error` (a QuantState's; a dialect's own state form has no nested
    absmax to rebuild); None otherwise."""
    if not arith.fma_absmax or not isinstance(state, QuantState):
        return None
    return bounds.fma_dequant_error(state)


def _base_dtype(op: str, W: np.ndarray, arith: bounds.Arithmetic) -> str:
    """The dtype the bound takes W in: a QLoRA base Ŵ is dequantized in its state's dtype, which may
    differ from the activations' (the test ``... base weight in another dtype``); a LoRA W is an
    operand like the others."""
    return np.dtype(W.dtype).name if op.startswith("qlora") else arith.operand


def _expect_output_dtype(op: str, name: str, value: np.ndarray, arith: bounds.Arithmetic, context) -> None:
    """The bound assumes results rounded to the declared output dtype: a result in another dtype
    (float64 for bfloat16 inputs, say) is not what the backend declared, whatever its values."""
    tol.expect_equal(op, f"{name}.dtype", value.dtype.name, np.dtype(arith.output).name, context,
                     "the dtype the backend's arithmetic() declares for its output")  # fmt: skip


def _backward(ctx: Context, inputs: Inputs) -> None:
    op, o = inputs.op, _operands(inputs)
    s = inputs.params["scaling"]
    context = _context(ctx, inputs)
    if op == "qlora_backward":
        state, W = _base_state(ctx, inputs)
        grads = _call(
            ctx, inputs, op, o["grad_y"], o["x"], state, o["A"], o["B"], s, dropout_mask=o["dropout_mask"]
        )
    else:
        W = o["W"]
        grads = _call(
            ctx, inputs, op, o["grad_y"], o["x"], W, o["A"], o["B"], s, dropout_mask=o["dropout_mask"]
        )
    refs = lora.backward(o["grad_y"], o["x"], W, o["A"], o["B"], s, dropout_mask=o["dropout_mask"])
    if not isinstance(grads, (tuple, list)) or len(grads) != 3:
        got = type(grads).__name__
        if isinstance(grads, (tuple, list)):
            got = f"a {got} of {len(grads)}"
        raise Mismatch(op, "result", None, got, "a tuple of 3: (grad_x, grad_A, grad_B)", "EXACT", context)
    arith = _arithmetic(ctx, op, inputs.dtype, context)
    limits = _bound(op, context, bounds.lora_backward_bound, o["grad_y"], o["x"], W, o["A"], o["B"], s, arith,
                    dropout_mask=o["dropout_mask"], base_dtype=_base_dtype(op, W, arith),
                    base_error=_base_error(state, arith) if op == "qlora_backward" else None)  # fmt: skip
    for name, g, r, b in zip(("grad_x", "grad_A", "grad_B"), grads, refs, limits, strict=True):
        g = _array(op, name, g, context)
        _expect_output_dtype(op, name, g, arith, context)
        tol.expect_bound(op, name, g, r, b, context, "lora_backward_bound (bounds.md §7)")


def check_lora_merge(ctx: Context, inputs: Inputs) -> None:
    o, p = _operands(inputs), inputs.params
    context = _context(ctx, inputs)
    fan = p["fan_in_fan_out"]
    try:
        ref = lora.merge(o["W"], o["A"], o["B"], p["scaling"], fan_in_fan_out=fan)
    except ValueError:
        return  # the merged weight overflows W's dtype: no value to compare
    merged = _array("lora_merge", "W'", _call(ctx, inputs, "lora_merge", o["W"], o["A"], o["B"], p["scaling"],
                                               fan_in_fan_out=fan), context)  # fmt: skip
    tol.expect_equal("lora_merge", "W'.dtype", str(merged.dtype), str(o["W"].dtype), context)
    arith = _arithmetic(ctx, "lora_merge", inputs.dtype, context)
    # Against the unrounded W + s·B A, not against lora.merge's rounded result: |W' - ref| <= merge_bound
    # compares two rounded values and so allows a whole ulp more than the model does.
    lo, hi = _bound("lora_merge", context, bounds.merge_interval, o["W"], o["A"], o["B"], p["scaling"],
                    arith, fan_in_fan_out=fan)  # fmt: skip
    tol.expect_interval("lora_merge", "W'", merged, ref, lo, hi, context, "merge_interval (bounds.md §8)")


# ---- Bad input ----------------------------------------------------------------------------------------


def check_rejects(ctx: Context, inputs: Inputs) -> None:
    """The op must raise (any exception) on these inputs: a non-finite weight, or a broken shape."""
    op, o, p = inputs.op, _operands(inputs), inputs.params
    context = _context(ctx, inputs)
    if op == "quantize_4bit":
        call = functools.partial(
            ctx.backend.quantize_4bit,
            o["x"], blocksize=p["blocksize"], quant_type=p["quant_type"], double_quant=p["double_quant"],
        )  # fmt: skip
    elif op == "lora_forward":
        call = functools.partial(
            ctx.backend.lora_forward,
            o["x"], o["W"], o["A"], o["B"], p["scaling"], bias=o["bias"], dropout_mask=o["dropout_mask"],
        )  # fmt: skip
    elif op == "lora_backward":
        call = functools.partial(
            ctx.backend.lora_backward,
            o["grad_y"], o["x"], o["W"], o["A"], o["B"], p["scaling"], dropout_mask=o["dropout_mask"],
        )  # fmt: skip
    elif op == "lora_merge":
        call = functools.partial(
            ctx.backend.lora_merge, o["W"], o["A"], o["B"], p["scaling"], fan_in_fan_out=p["fan_in_fan_out"]
        )
    elif op == "qlora_forward":
        state = _base_state(ctx, inputs, flat="state_1d" in p)[0]
        call = functools.partial(
            ctx.backend.qlora_forward,
            o["x"], state, o["A"], o["B"], p["scaling"], bias=o["bias"], dropout_mask=o["dropout_mask"],
        )  # fmt: skip
    elif op == "qlora_backward":
        state = _base_state(ctx, inputs, flat="state_1d" in p)[0]
        call = functools.partial(
            ctx.backend.qlora_backward,
            o["grad_y"], o["x"], state, o["A"], o["B"], p["scaling"], dropout_mask=o["dropout_mask"],
        )  # fmt: skip
    else:
        raise ValueError(f"no bad-input check for {op}")
    _bind(ctx, inputs, op, call.args, call.keywords)
    try:
        call()
    except NotImplementedError as exc:  # declining is not rejecting: the op was never tried
        raise Declined(f"{op}: NotImplementedError: {exc}") from None
    except Exception:
        if op == "quantize_4bit" and "bad_index" in p:
            _clean_input_quantizes(ctx, inputs)
        return
    if op == "quantize_4bit" and "bad_index" in p:
        index = tuple(p["bad_index"])
        raise Mismatch(op, "x", index, f"{p['bad']} (accepted: a state was returned)", "an error",
                       "non-finite input has no 4-bit code and must raise", context)  # fmt: skip
    raise Mismatch(op, "result", None, "a result (accepted)", "an error",
                   f"bad input must raise: {inputs.note}", context)  # fmt: skip


def _clean_input_quantizes(ctx: Context, inputs: Inputs) -> None:
    """Rejected (not a pass) when the dialect cannot quantize the input even with its non-finite element
    made 0: the backend's error then need not be about the NaN (torchao rejects a 6 x 50 weight's shape)."""
    x, p = inputs["x"].copy(), inputs.params
    x[tuple(p["bad_index"])] = 0
    _dialect_state(ctx, x, p, "quantize_4bit", f"nor for the same x with {p['bad']} made 0: ")


CHECKS = {
    "quantize": check_quantize,
    "dequantize": check_dequantize,
    "roundtrip": check_roundtrip,
    "lora_forward": _forward,
    "qlora_forward": _forward,
    "lora_backward": _backward,
    "qlora_backward": _backward,
    "lora_merge": check_lora_merge,
    "rejects": check_rejects,
}


def run_check(ctx: Context, inputs: Inputs) -> None:
    """Run the check ``inputs.check`` names; raises Mismatch, Declined or Rejected, returns None on
    success."""
    try:
        check = CHECKS[inputs.check]
    except KeyError:
        raise ValueError(f"unknown check {inputs.check!r}; known: {', '.join(CHECKS)}") from None
    try:
        # Overflow to inf in a conversion is a stated rule, not an accident: the checks decide.
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            check(ctx, inputs)
    except Mismatch as m:
        m.inputs = inputs
        raise
