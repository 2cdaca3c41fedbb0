"""The safetensors file format, read and written with numpy alone (and ml_dtypes for bfloat16).

A file is three parts, nothing else:

1. ``N``: the header's length in bytes, an unsigned 64-bit little-endian integer.
2. The header: ``N`` bytes of UTF-8 JSON, one object. Each key is a tensor name mapped to
   ``{"dtype": D, "shape": [d0, ...], "data_offsets": [begin, end]}``; the optional key
   ``"__metadata__"`` maps to an object of string to string. Trailing spaces pad it.
3. The data: the tensors' raw little-endian row-major bytes. ``data_offsets`` count from the start
   of the data; ``end - begin`` is ``prod(shape) * itemsize``.

Rules this module enforces when reading (each failure raises :class:`SafetensorsError` naming the
key): the header lies within the file and is at most 100 MB; it is UTF-8 JSON (nested no deeper
than Python's parser can go), an object, with no key twice (at any level); every entry has exactly
the three fields, a dtype of :data:`DTYPES`, a shape of non-negative integers and offsets
``0 <= begin <= end`` whose difference is the tensor's size; the tensors, taken in offset order, tile
the data exactly: no overlap, no gap, no byte after the last; a BOOL tensor holds only the bytes 0
and 1.

Rules this module follows when writing, found by running safetensors 0.8.0 (tests pin them):

* The entries are ordered by dtype, in the order U64, I64, F64, F32, U32, I32, BF16, F16, U16, I16,
  F8_E4M3, F8_E5M2, I8, U8, BOOL (the reverse of the order of the real package's ``Dtype`` enum; not
  simply by alignment: I64 comes before F64 and I32 after F32), then by name (code point order). The
  data follows the same order, so every tensor starts at a multiple of its itemsize.
* ``"__metadata__"`` comes first, and only when metadata is given (an empty dict writes ``{}``).
* The JSON is compact (``,`` and ``:`` without spaces), non-ASCII characters are written as UTF-8,
  and the header is padded with spaces to a multiple of 8 bytes.

The result is byte-identical to the real package's output with at most one metadata entry. With two
or more, the real package writes them in an order that changes from call to call (a Rust hash map);
this module writes them sorted, so its files equal the real package's in everything but that order.

Never uses pickle: a file can only ever produce arrays of the fifteen dtypes below (a checkpoint's
4-bit weights are U8; an unrelated tensor of another of these dtypes no longer makes the file unreadable).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from reflora.formats.files import write_files

__all__ = [
    "DTYPES",
    "SafetensorsError",
    "from_bytes",
    "load",
    "load_metadata",
    "metadata_from_bytes",
    "save",
    "to_bytes",
]

#: The dtypes this module reads and writes, by their safetensors name, in the order files list them.
DTYPES: dict[str, np.dtype] = {
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_RANK = {name: i for i, name in enumerate(DTYPES)}
_METADATA = "__metadata__"
_FIELDS = ("dtype", "shape", "data_offsets")
MAX_HEADER = 100_000_000  # the real package refuses larger headers too


class SafetensorsError(ValueError):
    """A file, or tensors to write, that break the format. ``key`` names the tensor (None: the file)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message if key is None else f"{key!r}: {message}")
        self.key = key


def _dtype_code(key: str, dtype: np.dtype) -> str:
    for code, dt in DTYPES.items():
        # a big-endian array is still the same numbers; it is byte-swapped when written
        if dtype == dt or (dtype.kind in "iuf" and dtype.newbyteorder("<") == dt):
            return code
    raise SafetensorsError(f"dtype {dtype} is not one of {', '.join(DTYPES)}", key)


def _has_utf8(s: str) -> bool:
    """False for a str holding a lone surrogate, which no UTF-8 bytes encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors file holding ``tensors`` (name -> array of a :data:`DTYPES` dtype, any shape).

    metadata: string -> string, stored as ``"__metadata__"``; None stores none.
    Returns the whole file, laid out by the writing rules of the module docstring.
    Raises :class:`SafetensorsError` naming the tensor (``__metadata__`` for metadata) for what a file
    cannot hold: a dtype outside :data:`DTYPES`, a value that is not an array, the name
    ``__metadata__``, non-str metadata, a string with no UTF-8 form (a lone surrogate).
    """
    entries = []
    for key, array in tensors.items():
        if not isinstance(key, str) or key == _METADATA:
            raise SafetensorsError("a tensor name must be a str other than '__metadata__'", str(key))
        if not _has_utf8(key):
            raise SafetensorsError("a tensor name must have a UTF-8 form (it holds a lone surrogate)", key)
        if not isinstance(array, np.ndarray | np.generic):
            raise SafetensorsError(f"expected a numpy array, got {type(array).__name__}", key)
        code = _dtype_code(key, array.dtype)
        entries.append((_RANK[code], key, code, np.asarray(array)))
    entries.sort(key=lambda e: (e[0], e[1]))

    header: dict[str, Any] = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not (isinstance(k, str) and isinstance(v, str)):
                raise SafetensorsError(f"metadata must map str to str, got {k!r}: {v!r}", _METADATA)
            if not (_has_utf8(k) and _has_utf8(v)):
                raise SafetensorsError(
                    f"{k!r}: {v!r} has no UTF-8 form (it holds a lone surrogate)", _METADATA
                )
        header[_METADATA] = {k: metadata[k] for k in sorted(metadata)}
    chunks, offset = [], 0
    for _, key, code, array in entries:
        data = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
        header[key] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *chunks])


def save(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (and ``metadata``) to ``path`` as :func:`to_bytes` lays them out, whole or
    not at all (:func:`reflora.formats.files.write_files`)."""
    write_files({path: to_bytes(tensors, metadata)})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise SafetensorsError("appears twice in the header", k)
        seen[k] = v
    return seen


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_header(
    head: bytes, n_data: int
) -> tuple[dict[str, str] | None, list[tuple[str, str, tuple, int, int]]]:
    """Validate a header against a data section of ``n_data`` bytes; (metadata, entries in header order)."""
    try:
        header = json.loads(head.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"header is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise SafetensorsError(f"header is not JSON: {e}") from None
    except RecursionError:  # a valid header nests 3 deep; Python's parser gives up far deeper
        raise SafetensorsError("header is not valid JSON: nested too deeply to parse") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop(_METADATA, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise SafetensorsError("must be an object of string to string", _METADATA)

    entries = []
    for key, info in header.items():
        if not isinstance(info, dict) or sorted(info) != sorted(_FIELDS):
            raise SafetensorsError(
                f"entry must be an object with exactly the fields {_FIELDS}, got {info!r}", key
            )
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            raise SafetensorsError(f"unknown dtype {code!r}; known: {', '.join(DTYPES)}", key)
        if not (isinstance(shape, list) and all(_is_int(d) for d in shape)):
            raise SafetensorsError(f"shape must be a list of non-negative integers, got {shape!r}", key)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise SafetensorsError(f"data_offsets must be two non-negative integers, got {offsets!r}", key)
        begin, end = offsets
        if begin > end:
            raise SafetensorsError(f"data_offsets {offsets} are out of order (begin > end)", key)
        size = math.prod(shape) * DTYPES[code].itemsize
        if end - begin != size:
            raise SafetensorsError(
                f"data_offsets {offsets} span {end - begin} bytes, but shape {shape} of {code} needs {size}",
                key,
            )
        if end > n_data:
            raise SafetensorsError(
                f"data_offsets {offsets} run past the end of the data ({n_data} bytes)", key
            )
        entries.append((key, code, tuple(shape), begin, end))

    covered, previous = 0, None
    for key, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin < covered:
            raise SafetensorsError(f"data_offsets [{begin}, {end}] overlap those of {previous!r}", key)
        if begin > covered:
            raise SafetensorsError(
                f"bytes [{covered}, {begin}) before data_offsets [{begin}, {end}] belong to no tensor", key
            )
        covered, previous = end, key
    if covered != n_data:
        raise SafetensorsError(
            f"{n_data - covered} trailing bytes after the last tensor (data ends at {covered})"
        )
    return metadata, entries


def _split(blob: bytes | bytearray | memoryview, file_size: int | None = None) -> tuple[bytes, int]:
    """The header bytes and the data's length, from at least the file's first 8 + N bytes."""
    size = len(blob) if file_size is None else file_size
    if size < 8:
        raise SafetensorsError(f"a file of {size} bytes has no room for the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > MAX_HEADER:
        raise SafetensorsError(
            f"not a safetensors file: its first 8 bytes, read as the header length, say {n}, beyond the "
            f"limit of {MAX_HEADER} bytes"
        )
    if 8 + n > size:
        raise SafetensorsError(f"header length {n} runs beyond the file of {size} bytes")
    return bytes(blob[8 : 8 + n]), size - 8 - n


def _decode(blob: bytes | bytearray | np.ndarray, copy: bool) -> dict[str, np.ndarray]:
    head, n_data = _split(blob)
    _, entries = _parse_header(head, n_data)
    data = memoryview(blob)[8 + len(head) :]
    out = {}
    for key, code, shape, begin, end in entries:
        array = np.frombuffer(data[begin:end], dtype=DTYPES[code]).reshape(shape)
        if code == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
            raise SafetensorsError("a BOOL tensor holds a byte other than 0 and 1", key)
        out[key] = array.copy() if copy else array
    return out


def from_bytes(blob: bytes | bytearray) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file held in memory, by name, in header order.

    Each array has the file's shape and the little-endian dtype of :data:`DTYPES`, and is a copy,
    independent of ``blob``. Raises :class:`SafetensorsError` for anything the module's rules forbid.
    """
    return _decode(blob, copy=True)


def metadata_from_bytes(blob: bytes | bytearray) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory ({} if it has none), after validation."""
    head, n_data = _split(blob)
    metadata, _ = _parse_header(head, n_data)
    return dict(metadata or {})


def load(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, np.ndarray]:
    """The tensors of the safetensors file at ``path``, as :func:`from_bytes` returns them.

    The arrays are writable views into one buffer read from the file (no second copy of the data).
    mmap: map the file instead of reading it; the arrays are then read-only views of the mapping, and
    each tensor's bytes are read from disk only when used (for checkpoints larger than memory). The
    whole header is still validated first.
    """
    if mmap and os.path.getsize(path) > 0:  # numpy cannot map an empty file; _split refuses it below
        return _decode(np.memmap(path, dtype=np.uint8, mode="r"), copy=False)
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    return _decode(blob, copy=False)


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of the file at ``path`` ({} if none); reads and validates only the header."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        if len(first) == 8 and struct.unpack("<Q", first)[0] <= MAX_HEADER:  # else _split refuses it unread
            first += f.read(struct.unpack("<Q", first)[0])
        head, n_data = _split(first, size)
    metadata, _ = _parse_header(head, n_data)
    return dict(metadata or {})
