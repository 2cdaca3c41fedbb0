"""Inspecting a 4-bit checkpoint: is every weight valid, healthy, and the one its original quantizes to?

A checkpoint in the Hugging Face + bitsandbytes 4-bit layout (:mod:`reflora.formats.bnb`) holds each
quantized Linear weight as packed codes and scales. Nothing in the file says which implementation
wrote those bytes, or whether they are right. :func:`inspect` reads every 4-bit weight and reports:

* **validity**: the weight reads back under :func:`reflora.formats.bnb.from_state_dict`'s rules (an
  invalid one is reported with its error, naming the key, and the others are still inspected);
* **health**, from the stored bytes alone, on the values dequantized in the recorded dtype: blocks
  that dequantize to all zeros, blocks whose double-quantized scale rebuilds *negative* (their
  nonzero weights dequantize with the sign flipped; docs/spec.md), and values that are not finite;
* **provenance**, given the unquantized ``original`` (the same key names): the original is quantized
  again by each dialect of :data:`DIALECTS` with the checkpoint's own parameters (quant type,
  blocksize, double quantization and its group size), and the stored codes and scales are compared
  with each result byte for byte (the JSON's fields are those parameters; its formatting is not
  compared). ``reproduced_by`` lists the dialects that give exactly these codes and scales; where
  none does, the dialect with the fewest differing codes and the first differing element are
  reported. Two rules make the comparison fair:

  - the original is first cast to the dtype the checkpoint records (``QuantState.dtype``, the dtype
    the writer quantized from), rounding to nearest even;
  - the double-quantization offset is replayed from the checkpoint, because it is a float32 mean whose
    summation order belongs to the machine that wrote it (a GPU's reduction, a CPU's SIMD width), not
    to the rules being compared.

  ``rel_error`` is ``||dequant(checkpoint) - original|| / ||original||`` in float64 (the original as
  cast), a size for the quantization error, whoever wrote the bytes.

A weight *passes* when it is valid and, with an original, reproduced by at least one dialect. The
``bnb-cuda`` dialect is an emulation of bitsandbytes' CUDA kernels read from their source and not yet
confirmed on a GPU (docs/dialects.md), so a checkpoint written on a GPU that only it reproduces is
reproduced by a model, not by a confirmed implementation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from reflora import dialects, double_quant, nf4
from reflora.double_quant import BLOCKSIZE2, RebuiltScaleWarning
from reflora.dtypes import DTYPES, dtype_name
from reflora.formats import bnb
from reflora.formats import safetensors as sft
from reflora.state import QuantState

__all__ = [
    "DIALECTS",
    "InspectError",
    "WeightReport",
    "inspect",
    "inspect_weight",
    "open_tensors",
]

#: The dialects that write the bitsandbytes layout, tried in this order.
DIALECTS = ("reflora", "bnb-cpu", "bnb-cuda")


class InspectError(ValueError):
    """A checkpoint or original that cannot be inspected at all (a missing file, no 4-bit weights)."""


@dataclasses.dataclass(frozen=True)
class WeightReport:
    """What :func:`inspect_weight` found for one 4-bit weight. Counts are of blocks or of weights, as named.

    error: why the weight is not valid (and nothing else was measured), or why its original could not
        be compared (``shape`` and the health counts are then set).
    reproduced_by: dialects whose quantization of the original gives the stored bytes (None: no original).
    code_diffs / scale_diffs: per dialect, codes (of the n weights, plus the padding nibble of odd n)
        and stored scale entries (absmax, or absmax_q and absmax2) that differ; -1 for a dialect that
        could not quantize the original with these parameters, whose reason is in ``refused`` (the
        canonical rules refuse NaN and inf; bitsandbytes double-quantizes in groups of 256 only).
    first_diff: where the nearest dialect first differs, in words, when none reproduces the bytes.
    rel_error: ``||dequant - original|| / ||original||`` (the plain norm for an all-zero original; None
        for an original with NaN or inf).
    """

    key: str
    error: str | None = None
    shape: tuple[int, ...] | None = None
    quant_type: str | None = None
    blocksize: int | None = None
    double_quant: bool | None = None
    dtype: str | None = None
    bits_per_weight: float | None = None
    zero_blocks: int = 0
    negative_blocks: int = 0
    flipped_weights: int = 0
    nonfinite: int = 0
    reproduced_by: tuple[str, ...] | None = None
    code_diffs: dict[str, int] | None = None
    scale_diffs: dict[str, int] | None = None
    first_diff: str | None = None
    refused: dict[str, str] | None = None
    rel_error: float | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and (self.reproduced_by is None or bool(self.reproduced_by))


def open_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, or of every ``*.safetensors`` file in a directory (shards).

    Files are memory-mapped (:func:`reflora.formats.safetensors.load` with ``mmap=True``), so a large
    checkpoint is read only where inspected. InspectError for a path that does not exist, a directory
    without safetensors files, a key found in two files, or a malformed file (naming it).
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise InspectError(f"{p}: a directory with no *.safetensors file")
    elif p.is_file():
        files = [p]
    elif p.exists():  # /dev/null, a pipe: there, but not a file to read tensors from
        raise InspectError(f"{p}: not a regular file or a directory")
    else:
        raise InspectError(f"{p}: no such file or directory")
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for f in files:
        try:
            loaded = sft.load(f, mmap=True)
        except sft.SafetensorsError as e:
            raise InspectError(f"{f}: {e}") from e
        for k, v in loaded.items():
            if k in tensors:
                raise InspectError(f"{k!r} is in both {where[k]} and {f}")
            tensors[k], where[k] = v, f
    return tensors


def _bits_per_weight(d: Mapping[str, np.ndarray], prefix: str, n: int) -> float:
    """Stored bits over weights: codes and scales (the tables and JSON are per tensor, not per weight)."""
    keys = [prefix, f"{prefix}.absmax", f"{prefix}.nested_absmax"]
    return 8 * sum(d[k].nbytes for k in keys if k in d) / n


def _codes(state: QuantState) -> np.ndarray:
    """uint8 (2 * len(packed),): every nibble, the padding one of odd n included, high nibble first."""
    return nf4.unpack(state.packed, 2 * state.packed.size)


def _scale_entries(state: QuantState) -> np.ndarray:
    """The stored scales as raw bytes: absmax, or absmax_q followed by absmax2."""
    if state.nested is None:
        return state.absmax.view(np.uint32)
    return np.concatenate([state.nested.absmax_q.astype(np.uint32), state.nested.absmax2.view(np.uint32)])


def _where(index: int, shape: tuple[int, ...], n: int) -> str:
    if index >= n:
        return "the padding nibble after the last weight"
    return f"element {[int(i) for i in np.unravel_index(index, shape)]}"


def _health(state: QuantState, values32: np.ndarray) -> dict[str, int]:
    """Counted on the values in the recorded dtype, as bitsandbytes returns them: a tiny scale can
    dequantize a float16 block to zeros, a huge one to inf. values32: ``nf4.dequantize(state,
    "float32")``, which the recorded dtype rounds once, as :func:`reflora.nf4.dequantize` does."""
    codes = nf4.unpack(state.packed, state.numel)
    starts = np.arange(0, state.numel, state.blocksize)
    blocks = np.arange(state.numel) // state.blocksize
    scales = nf4.block_scales(state)
    values = values32.astype(state.dtype).reshape(-1)
    return {
        "zero_blocks": int(np.count_nonzero(~np.logical_or.reduceat(values != 0, starts))),
        "negative_blocks": int(np.count_nonzero(scales < 0)),
        "flipped_weights": int(np.count_nonzero((scales < 0)[blocks] & (state.code[codes] != 0))),
        "nonfinite": int(np.count_nonzero(~np.isfinite(values))),
    }


def _requantize(name: str, original: np.ndarray, state: QuantState) -> QuantState:
    """``original`` quantized by dialect ``name`` with ``state``'s parameters and replayed offset.

    ValueError where the dialect cannot: the canonical rules refuse NaN and inf, and bitsandbytes
    double-quantizes in groups of 256 only (the canonical rules take the stored group size)."""
    nested = state.nested
    offset = None if nested is None else float(nested.offset)
    if nested is not None and nested.blocksize2 != BLOCKSIZE2 and name != "reflora":
        raise ValueError(f"it double-quantizes in groups of {BLOCKSIZE2} only, not {nested.blocksize2}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RebuiltScaleWarning)  # reported by _health on the stored bytes
        if name == "reflora" and nested is not None:
            plain = nf4.quantize(original, state.blocksize, quant_type=state.quant_type)
            again = double_quant.quantize(plain.absmax, nested.blocksize2, offset=offset)
            return dataclasses.replace(plain, absmax=None, nested=again)
        quantize, dq, qt = dialects.get(name).quantize, offset is not None, state.quant_type
        return quantize(original, state.blocksize, quant_type=qt, double_quant=dq, offset=offset)


def _provenance(
    state: QuantState, values32: np.ndarray, original: np.ndarray, names: tuple[str, ...]
) -> dict[str, object]:
    codes, scales, n = _codes(state), _scale_entries(state), state.numel
    code_diffs, scale_diffs, firsts, refused = {}, {}, {}, {}
    for name in names:
        try:
            theirs = _requantize(name, original, state)
        except ValueError as e:
            code_diffs[name] = scale_diffs[name] = -1
            refused[name] = str(e)
            continue
        their_codes = _codes(theirs)
        differ = np.flatnonzero(codes != their_codes)
        code_diffs[name] = int(differ.size)
        scale_diffs[name] = int(np.count_nonzero(scales != _scale_entries(theirs)))
        if differ.size:
            i = int(differ[0])
            value = "" if i >= n else f", original {float(original.reshape(-1)[i]):.9g}"
            firsts[name] = (
                f"{_where(i, state.shape, n)}: stored code {codes[i]}, {name} gives {their_codes[i]}{value}"
            )
        elif scale_diffs[name]:
            firsts[name] = f"codes equal; {scale_diffs[name]} stored scale entries differ"
    reproduced = tuple(d for d in names if code_diffs[d] == 0 and scale_diffs[d] == 0)
    compared = [d for d in names if code_diffs[d] >= 0]
    first = None
    if not reproduced and compared:
        nearest = min(compared, key=lambda d: (code_diffs[d], scale_diffs[d]))
        first = f"nearest {nearest}: {firsts[nearest]}"
    w = original.astype(np.float64)
    err = values32.astype(np.float64) - w
    norm = float(np.linalg.norm(w))
    rel = float(np.linalg.norm(err)) / norm if norm > 0 else float(np.linalg.norm(err))
    return {
        "reproduced_by": reproduced,
        "code_diffs": code_diffs,
        "scale_diffs": scale_diffs,
        "first_diff": first,
        "refused": refused,
        "rel_error": rel if math.isfinite(rel) else None,
    }


def inspect_weight(
    tensors: Mapping[str, np.ndarray],
    prefix: str,
    original: Mapping[str, np.ndarray] | None = None,
    names: tuple[str, ...] = DIALECTS,
) -> WeightReport:
    """The report for the 4-bit weight at key ``prefix`` of ``tensors`` (see the module docstring).

    original: the unquantized tensors by key (None: validity and health only). names: dialects to try.
    An invalid weight, or an original that is missing, of another shape, or not float32 / float16 /
    bfloat16, is reported in ``error``; nothing raises for a bad weight.
    """
    try:
        state = bnb.from_state_dict(tensors, prefix)
    except ValueError as e:  # StateDictError names the key; a state the oracle refuses says why
        return WeightReport(key=prefix, error=f"not a valid 4-bit weight: {e}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflowing scales: counted as non-finite
        return _inspect_state(state, tensors, prefix, original, names)


def _inspect_state(
    state: QuantState,
    tensors: Mapping[str, np.ndarray],
    prefix: str,
    original: Mapping[str, np.ndarray] | None,
    names: tuple[str, ...],
) -> WeightReport:
    values32 = nf4.dequantize(state, "float32")  # once, for the health counts and the error
    facts = {
        "key": prefix,
        "shape": state.shape,
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "double_quant": state.double_quant,
        "dtype": dtype_name(state.dtype),
        "bits_per_weight": _bits_per_weight(tensors, prefix, state.numel),
        **_health(state, values32),
    }
    if original is None:
        return WeightReport(**facts)
    w = original.get(prefix)
    problem = None
    if w is None:
        problem = "not in the original"
    elif tuple(w.shape) != state.shape:
        problem = f"the original has shape {tuple(w.shape)}, the checkpoint records {state.shape}"
    elif w.dtype not in DTYPES.values():
        problem = f"the original is {w.dtype}, not float32, float16 or bfloat16"
    if problem:
        return WeightReport(**facts, error=problem)
    cast = np.asarray(w).astype(state.dtype)  # round to nearest even, as torch's .to(dtype)
    return WeightReport(**facts, **_provenance(state, values32, cast, names))


def inspect(
    checkpoint: str | os.PathLike,
    original: str | os.PathLike | None = None,
    *,
    names: tuple[str, ...] = DIALECTS,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[WeightReport]:
    """One :class:`WeightReport` per 4-bit weight of ``checkpoint``, in file order.

    checkpoint / original: a safetensors file or a directory of them (:func:`open_tensors`).
    progress: called as ``progress(done, total, key)`` before each weight.
    InspectError when the checkpoint has no 4-bit weight (nothing would be checked).
    """
    tensors = open_tensors(checkpoint)
    keys = bnb.quantized_prefixes(tensors)
    if not keys:
        raise InspectError(
            f"{checkpoint}: no bitsandbytes 4-bit weight (no key ending in "
            f"'.{bnb.QUANT_STATE}nf4' or '.{bnb.QUANT_STATE}fp4')"
        )
    source = None if original is None else open_tensors(original)
    reports = []
    for i, key in enumerate(keys):
        if progress:
            progress(i, len(keys), key)
        reports.append(inspect_weight(tensors, key, source, names))
    return reports
