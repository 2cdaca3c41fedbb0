"""A 4-bit weight as bitsandbytes serializes it: ``Linear4bit.state_dict()`` and Hugging Face checkpoints.

A quantized weight of n elements at key ``P`` (``weight`` in a module's own state dict,
``model.layers.0.self_attn.q_proj.weight`` in a checkpoint) is stored as these keys, in this order:

=====================================  ==========================  ===================================
key                                    dtype, shape                 holds
=====================================  ==========================  ===================================
``P``                                  uint8 ((n+1)//2, 1)          packed codes (``QuantState.packed``)
``P.absmax``                           float32 (n_blocks,)          block scales, when not nested
                                       uint8 (n_blocks,)            8-bit scale codes, when nested
``P.quant_map``                        float32 (16,)                the 4-bit table (``code``)
``P.nested_absmax``                    float32 (n_groups,)          nested only (``absmax2``)
``P.nested_quant_map``                 float32 (256,)               nested only (``code2``)
``P.quant_state.bitsandbytes__<qt>``   uint8 (len,)                 UTF-8 JSON of the other fields
=====================================  ==========================  ===================================

with n_blocks = ceil(n / blocksize), n_groups = ceil(n_blocks / nested_blocksize) and ``<qt>`` the
quant type (``nf4`` or ``fp4``). The JSON is Python's ``json.dumps`` with its default separators
(``", "`` and ``": "``) of an object with the fields, in this order::

    {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 128],
     "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.05200386047363281}

the last three only when nested; ``nested_offset`` is the float32 offset written as the shortest
decimal that reads back as the same float (Python's float repr), so it survives exactly.

:func:`from_state_dict` accepts exactly the states bitsandbytes can write and raises
:class:`StateDictError`, naming the key, for anything else; see ``docs/formats.md`` for the list.
This module reads and writes numpy arrays only; it never imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from reflora import codebooks, nf4
from reflora.checks import check_flag
from reflora.codebooks import DYNAMIC_MAP
from reflora.dtypes import DTYPES, dtype_name
from reflora.state import BLOCKSIZES, NestedState, QuantState

__all__ = [
    "QUANT_STATE",
    "STATISTICS",
    "StateDictError",
    "dequantize_state_dict",
    "from_state_dict",
    "quant_state_json",
    "quantize_state_dict",
    "quantized_prefixes",
    "to_state_dict",
    "weight_keys",
]

QUANT_STATE = "quant_state.bitsandbytes__"
_PLAIN_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")
#: The statistics a 4-bit weight ``P`` stores beside it, as ``P.<name>``.
STATISTICS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class StateDictError(ValueError):
    """A state dict that is not a valid bitsandbytes 4-bit weight. ``key`` names the offending entry."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key!r}: {message}")
        self.key = key


def quantized_prefixes(keys: Iterable[str]) -> list[str]:
    """The 4-bit weights among a state dict's ``keys``, as their prefixes ``P``, in key order.

    ``P`` is one when a key ``P.quant_state.<anything>`` exists (the last ``.quant_state.`` in the key;
    :func:`from_state_dict` then checks the suffix and the rest), or when ``P`` itself and a statistic
    ``P.absmax`` / ``P.quant_map`` / ... exist without one (the weight lost its quant_state key, which
    :func:`from_state_dict` reports; passing it through would leave stray statistics and a uint8
    array where a weight belongs). Every reader of whole state dicts finds its weights here:
    :func:`dequantize_state_dict`, ``reflora inspect`` and the torch backend's checkpoint loader.
    """
    keys = list(keys)
    present = set(keys)
    found: dict[str, None] = {}
    for k in keys:
        prefix, sep, _ = k.rpartition(".quant_state.")
        if not sep:
            parent, _, last = k.rpartition(".")
            prefix = parent if last in STATISTICS and parent in present else ""
        if prefix:
            found.setdefault(prefix)
    return list(found)


def weight_keys(keys: Iterable[str], prefix: str) -> set[str]:
    """The entries among ``keys`` that the 4-bit weight at ``prefix`` stores: ``P`` and every ``P.*``
    (which :func:`from_state_dict` has checked are its statistics and its quant_state)."""
    return {k for k in keys if k == prefix or k.startswith(f"{prefix}.")}


def quant_state_json(state: QuantState) -> bytes:
    """The UTF-8 JSON bitsandbytes stores under ``P.quant_state.bitsandbytes__<qt>`` for ``state``."""
    fields: dict[str, Any] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    if state.nested is not None:
        fields["nested_blocksize"] = state.nested.blocksize2
        fields["nested_dtype"] = "float32"
        fields["nested_offset"] = float(state.nested.offset)  # exact: every float32 is a Python float
    return json.dumps(fields).encode("utf-8")


def to_state_dict(state: QuantState, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The keys and arrays (fresh copies) bitsandbytes writes for ``state`` at ``prefix``; see the table.

    Raises ValueError for the one state bitsandbytes cannot hold: a nested blocksize2 outside BLOCKSIZES.
    """
    if state.nested is not None and state.nested.blocksize2 not in BLOCKSIZES:
        raise ValueError(f"nested blocksize {state.nested.blocksize2} is not one of {BLOCKSIZES}")
    out = {prefix: state.packed.reshape(-1, 1).copy()}
    if state.nested is None:
        out[f"{prefix}.absmax"] = state.absmax.copy()
        out[f"{prefix}.quant_map"] = state.code.copy()
    else:
        out[f"{prefix}.absmax"] = state.nested.absmax_q.copy()
        out[f"{prefix}.quant_map"] = state.code.copy()
        out[f"{prefix}.nested_absmax"] = state.nested.absmax2.copy()
        out[f"{prefix}.nested_quant_map"] = state.nested.code2.copy()
    out[f"{prefix}.{QUANT_STATE}{state.quant_type}"] = np.frombuffer(quant_state_json(state), np.uint8).copy()
    return out


def _array(d: Mapping[str, Any], key: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    if key not in d:
        raise StateDictError(key, "missing")
    a = d[key]
    if not isinstance(a, np.ndarray):
        raise StateDictError(key, f"expected a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype) or a.shape != shape:
        raise StateDictError(key, f"expected {np.dtype(dtype).name} {shape}, got {a.dtype} {a.shape}")
    return a


def _scales(d: Mapping[str, Any], key: str, n: int) -> np.ndarray:
    a = _array(d, key, np.float32, (n,))
    bad = np.flatnonzero(~(np.isfinite(a) & (a >= 0)))
    if bad.size:
        raise StateDictError(key, f"block scales must be finite and >= 0; [{bad[0]}] = {a[bad[0]]}")
    return a


def _table(d: Mapping[str, Any], key: str, expected: codebooks.Codebook, what: str) -> np.ndarray:
    a = _array(d, key, np.float32, expected.values.shape)
    if a.tobytes() != expected.values.tobytes():
        raise StateDictError(
            key,
            f"is not bitsandbytes' {what} table (first difference at index "
            f"{np.flatnonzero(a.view(np.uint32) != expected.values.view(np.uint32))[0]})",
        )
    return a


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError(f"a field appears twice: {[k for k, _ in pairs]}")
    return out


def _int_field(fields: dict[str, Any], name: str) -> bool:
    return isinstance(fields[name], int) and not isinstance(fields[name], bool)


def _read_json(d: Mapping[str, Any], prefix: str) -> tuple[str, dict[str, Any]]:
    """The quant-state key under ``prefix`` and its decoded, checked JSON fields."""
    found = [k for k in d if k.startswith(f"{prefix}.quant_state.")]
    if not found:
        beside = [k for k in (f"{prefix}.{s}" for s in STATISTICS) if k in d]
        raise StateDictError(
            f"{prefix}.{QUANT_STATE}nf4",
            "missing (no quant_state key under this prefix" + (f", which has {beside})" if beside else ")"),
        )
    if len(found) > 1:
        raise StateDictError(found[1], f"a second quant_state key besides {found[0]!r}")
    key = found[0]
    blob = d[key]
    if not (isinstance(blob, np.ndarray) and blob.dtype == np.uint8 and blob.ndim == 1):
        raise StateDictError(key, f"expected 1-D uint8 JSON bytes, got {getattr(blob, 'dtype', type(blob))}")
    try:
        fields = json.loads(blob.tobytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise StateDictError(key, f"is not UTF-8 JSON: {e}") from None
    except RecursionError:  # bitsandbytes' JSON is flat; Python's parser gives up far deeper
        raise StateDictError(key, "is not valid JSON: nested too deeply to parse") from None
    if not isinstance(fields, dict):
        raise StateDictError(key, f"JSON must be an object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(_PLAIN_FIELDS) - set(_NESTED_FIELDS))
    missing = [f for f in _PLAIN_FIELDS if f not in fields]
    nested = any(f in fields for f in _NESTED_FIELDS)
    missing += [f for f in _NESTED_FIELDS if nested and f not in fields]
    if unknown or missing:
        raise StateDictError(
            key,
            f"JSON fields must be {_PLAIN_FIELDS}, optionally followed by all of {_NESTED_FIELDS}; "
            f"unknown {unknown}, missing {missing}",
        )
    qt = fields["quant_type"]
    if not (isinstance(qt, str) and qt in ("nf4", "fp4") and key == f"{prefix}.{QUANT_STATE}{qt}"):
        raise StateDictError(key, f"quant_type {qt!r} must be 'nf4' or 'fp4' and match the key's suffix")
    if not (_int_field(fields, "blocksize") and fields["blocksize"] in BLOCKSIZES):
        raise StateDictError(key, f"blocksize {fields['blocksize']!r} is not one of {BLOCKSIZES}")
    if not (isinstance(fields["dtype"], str) and fields["dtype"] in DTYPES):
        raise StateDictError(key, f"dtype {fields['dtype']!r} is not one of {sorted(DTYPES)}")
    shape = fields["shape"]
    if not (
        isinstance(shape, list)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise StateDictError(key, f"shape {shape!r} is not a list of non-negative integers")
    if math.prod(shape) == 0:
        raise StateDictError(key, f"shape {shape} has no elements; a 4-bit state holds at least one")
    if nested:
        if not (_int_field(fields, "nested_blocksize") and fields["nested_blocksize"] in BLOCKSIZES):
            raise StateDictError(
                key, f"nested_blocksize {fields['nested_blocksize']!r} is not one of {BLOCKSIZES}"
            )
        if fields["nested_dtype"] != "float32":
            raise StateDictError(key, f"nested_dtype {fields['nested_dtype']!r} must be 'float32'")
        off = fields["nested_offset"]
        # bitsandbytes writes a float32's Python float: anything else would not survive a round trip
        if not (isinstance(off, float) and math.isfinite(off) and float(np.float32(off)) == off):
            raise StateDictError(key, f"nested_offset {off!r} is not a finite float32 value")
        if off < 0:  # the mean of scales, which are >= 0: every block would rebuild another scale
            raise StateDictError(key, f"nested_offset {off!r} is negative; bitsandbytes writes the mean of "
                                 "the block scales, which is never below 0")  # fmt: skip
    return key, fields


def from_state_dict(d: Mapping[str, np.ndarray], prefix: str = "weight") -> QuantState:
    """The :class:`reflora.QuantState` stored at ``prefix`` in ``d`` (keys and arrays as in the table).

    d: a state dict or whole checkpoint, name -> numpy array; keys not under ``prefix`` are ignored.
    prefix: the weight's key; may contain dots.
    Raises :class:`StateDictError` naming the key for anything bitsandbytes would not have written:
    a missing, extra or unknown key under ``prefix``; a wrong dtype or shape; JSON that does not
    parse, lacks or adds fields, or disagrees with the key or the arrays; a quant_map or
    nested_quant_map other than bitsandbytes' tables; a non-finite or negative block scale.
    """
    if not (isinstance(prefix, str) and prefix):
        raise StateDictError(str(prefix), "the prefix must be a non-empty str")
    qs_key, fields = _read_json(d, prefix)
    shape, blocksize = tuple(fields["shape"]), fields["blocksize"]
    n = math.prod(shape)
    n_blocks = math.ceil(n / blocksize)
    nested = "nested_offset" in fields
    expected = {prefix, f"{prefix}.absmax", f"{prefix}.quant_map", qs_key}
    nested_keys = {f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"}
    for k in d:
        if k.startswith(f"{prefix}.") and k not in expected:
            if k in nested_keys and not nested:
                raise StateDictError(
                    k, f"nested key present, but the JSON in {qs_key!r} has no nested fields"
                )
            if k not in nested_keys:
                raise StateDictError(k, "unknown key under a bitsandbytes 4-bit weight")
    packed = _array(d, prefix, np.uint8, ((n + 1) // 2, 1))
    code = _table(d, f"{prefix}.quant_map", codebooks.get(fields["quant_type"]), fields["quant_type"])
    if not nested:
        absmax, state2 = _scales(d, f"{prefix}.absmax", n_blocks), None
    else:
        for k in sorted(nested_keys):
            if k not in d:
                raise StateDictError(k, f"missing, but the JSON in {qs_key!r} has nested fields")
        blocksize2 = fields["nested_blocksize"]
        absmax = None
        state2 = NestedState(
            absmax_q=_array(d, f"{prefix}.absmax", np.uint8, (n_blocks,)),
            absmax2=_scales(d, f"{prefix}.nested_absmax", math.ceil(n_blocks / blocksize2)),
            code2=_table(d, f"{prefix}.nested_quant_map", DYNAMIC_MAP, "dynamic 8-bit"),
            offset=np.float32(fields["nested_offset"]),
            blocksize2=blocksize2,
        )
    return QuantState(
        packed=packed.reshape(-1),
        absmax=absmax,
        shape=shape,
        dtype=DTYPES[fields["dtype"]],
        blocksize=blocksize,
        quant_type=fields["quant_type"],
        code=code,
        nested=state2,
    )


def quantize_state_dict(
    weights: Mapping[str, np.ndarray],
    *,
    targets: Iterable[str],
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> dict[str, np.ndarray]:
    """A checkpoint in the Hugging Face bitsandbytes 4-bit layout.

    weights: name -> array (float32 / float16 / bfloat16 for the targets; anything for the rest).
    targets: the keys of the Linear weights (2-D, (out, in)) to quantize with :func:`reflora.nf4.quantize`;
    a collection of names, never a single str (TypeError). double_quant: True or False (TypeError).
    Returns a new dict in the order of ``weights``: each target replaced by its keys from
    :func:`to_state_dict`, every other entry passed through unchanged (the same array object).
    Raises :class:`StateDictError` naming the key for a target that is missing from ``weights``, not
    2-D, not float32 / float16 / bfloat16, or not finite, or whose new keys are already in ``weights``.
    """
    check_flag("double_quant", double_quant)
    if isinstance(targets, str):
        raise TypeError(
            f"targets must be a collection of key names, not the str {targets!r}; use [{targets!r}]"
        )
    targets = set(targets)
    for t in sorted(targets - set(weights)):
        raise StateDictError(t, "is a target but not in the weights")
    out: dict[str, np.ndarray] = {}
    for key, w in weights.items():
        if key not in targets:
            out[key] = w
            continue
        if np.ndim(w) != 2:
            raise StateDictError(key, f"a Linear weight is 2-D (out, in), got shape {np.shape(w)}")
        try:
            nf4.check_input(w)
        except (TypeError, ValueError) as e:  # a dtype other than the three, or NaN / inf
            raise StateDictError(key, str(e)) from None
        state = nf4.quantize(w, blocksize, quant_type=quant_type, double_quant=double_quant)
        for k, v in to_state_dict(state, key).items():
            if k in weights and k != key:
                raise StateDictError(k, f"already in the weights, and also a key of quantized {key!r}")
            out[k] = v
    return out


def dequantize_state_dict(d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``d`` with every 4-bit weight replaced by its dequantized tensor (``state.dtype``, ``state.shape``).

    The quantized weights are those :func:`quantized_prefixes` finds, each read with
    :func:`from_state_dict`, which raises :class:`StateDictError` for a malformed one (a weight ``P``
    with statistics ``P.absmax``, ... but no quant_state key among them); their other keys are
    dropped. Every other entry passes through unchanged.
    """
    states = {p: from_state_dict(d, p) for p in quantized_prefixes(d)}
    consumed = set().union(*(weight_keys(d, p) for p in states))
    out: dict[str, np.ndarray] = {}
    for k, v in d.items():
        if k in states:
            out[k] = nf4.dequantize(states[k])
        elif k not in consumed:
            out[k] = v
    return out
