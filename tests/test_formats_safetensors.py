"""reflora.formats.safetensors: round trips, byte identity with the real package, and every corruption."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reflora.formats import safetensors as sft
from reflora.formats.safetensors import DTYPES, SafetensorsError

CI = settings(max_examples=40, deadline=None)

# names exercise JSON escaping (quote, backslash, control characters) and non-ASCII UTF-8
names = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=0, max_size=12).filter(
    lambda s: s != "__metadata__"
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    code = draw(st.sampled_from(list(DTYPES)), label="dtype")
    shape = draw(shapes, label="shape")
    dt = DTYPES[code]
    n = int(np.prod(shape, dtype=np.int64))
    if code == "BOOL":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool).reshape(shape)
    raw = draw(
        st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize), label="bytes"
    )  # NaN payloads too
    return np.frombuffer(raw, dtype=dt).reshape(shape)


tensor_dicts = st.dictionaries(names, arrays(), max_size=6)
metadatas = st.none() | st.dictionaries(names, st.text(max_size=8), max_size=1)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert a[k].tobytes() == b[k].tobytes(), k


# --- round trips ------------------------------------------------------------------------------------


@CI
@given(tensors=tensor_dicts, metadata=metadatas)
def test_round_trip_every_dtype(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> None:
    blob = sft.to_bytes(tensors, metadata)
    same(sft.from_bytes(blob), tensors)
    assert sft.metadata_from_bytes(blob) == (metadata or {})
    assert struct.unpack("<Q", blob[:8])[0] % 8 == 0  # the header is padded to a multiple of 8


def test_round_trip_file_degenerate_shapes(tmp_path) -> None:
    tensors = {
        "scalar_bf16": np.array(1.5, dtype=ml_dtypes.bfloat16),
        "empty_f32": np.zeros((0, 3), np.float32),
        "empty_scalarless": np.zeros((0,), np.int8),
        "one_i64": np.array([-(2**63)], np.int64),
        "bools": np.array([[True, False, True]]),
        "nan_f16": np.array([np.nan, -0.0, np.inf], np.float16),
    }
    sft.save(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    loaded = sft.load(tmp_path / "t.safetensors")
    same(loaded, tensors)
    assert sft.load_metadata(tmp_path / "t.safetensors") == {"format": "pt"}
    loaded["one_i64"][0] = 7  # load returns writable arrays


def test_big_endian_input_is_written_little_endian() -> None:
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    back = sft.from_bytes(sft.to_bytes({"a": a}))["a"]
    assert back.dtype == np.dtype("<f4") and np.array_equal(back, a)


def test_header_order_is_dtype_rank_then_name() -> None:
    # one tensor of each dtype, inserted in a scrambled order, names sorting against the dtype order
    tensors = {f"{chr(ord('j') - i)}{code}": np.zeros(3, dt) for i, (code, dt) in enumerate(DTYPES.items())}
    blob = sft.to_bytes(dict(reversed(tensors.items())) | {"a_F32": np.zeros(1, np.float32)})
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    order = [(header[k]["dtype"], k) for k in header]
    assert [c for c, _ in order] == [
        "U64", "I64", "F64", "F32", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2",
        "I8", "U8", "BOOL",
    ]  # fmt: skip
    assert order[3:5] == [("F32", "a_F32"), ("F32", "gF32")]
    text = blob[8 : 8 + n]
    assert n % 8 == 0 and text.rstrip(b" ").endswith(b"}") and len(text) - len(text.rstrip(b" ")) < 8
    offsets = [header[k]["data_offsets"][0] for k in header]
    assert all(
        o % DTYPES[header[k]["dtype"]].itemsize == 0 for o, k in zip(offsets, header, strict=True)
    )  # aligned


# --- against the real package -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    """The real package's numpy API (the tests that compare with it skip without it)."""
    return pytest.importorskip("safetensors.numpy", reason="the safetensors package is not installed")


@CI
@given(tensors=tensor_dicts, metadata=metadatas)
def test_byte_identical_to_real_package(
    real, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None
) -> None:
    assume(tensors or metadata != {})  # the real package's output for that one case is broken (below)
    assert sft.to_bytes(tensors, metadata) == real.save(tensors, metadata=metadata)


def test_no_tensors_and_empty_metadata(real) -> None:
    # safetensors 0.8.0 writes the header '{},"__metadata__":{}}' here, which is not JSON and which
    # its own reader rejects; reflora writes the valid header and reads it back.
    mine, theirs = sft.to_bytes({}, {}), real.save({}, metadata={})
    assert mine == struct.pack("<Q", 24) + b'{"__metadata__":{}}' + b" " * 5
    assert sft.metadata_from_bytes(mine) == {} and sft.from_bytes(mine) == {}
    try:
        json.loads(theirs[8:])
    except ValueError:
        with pytest.raises(SafetensorsError, match="not JSON"):
            sft.from_bytes(theirs)
        return
    assert mine == theirs  # fixed upstream: then the two must agree again


def test_many_metadata_keys_equal_up_to_their_order(real) -> None:
    # the real package writes metadata from a Rust HashMap: its order changes from call to call
    tensors = {"w": np.arange(5, dtype=np.float32)}
    metadata = {f"k{i}": str(i) for i in (5, 1, 9, 3, 7, 0)}
    mine = sft.to_bytes(tensors, metadata)
    theirs = real.save(tensors, metadata=metadata)
    assert len(mine) == len(theirs) and mine[:8] == theirs[:8]
    (n,) = struct.unpack("<Q", mine[:8])
    assert mine[8 + n :] == theirs[8 + n :]
    assert json.loads(mine[8 : 8 + n]) == json.loads(theirs[8 : 8 + n])
    assert list(json.loads(mine[8 : 8 + n])["__metadata__"]) == sorted(metadata)


@CI
@given(tensors=tensor_dicts, metadata=st.none() | st.dictionaries(names, st.text(max_size=8), max_size=4))
def test_reads_real_package_output(
    real, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None
) -> None:
    assume(tensors or metadata != {})  # see test_no_tensors_and_empty_metadata
    blob = real.save(tensors, metadata=metadata)
    same(sft.from_bytes(blob), tensors)
    assert sft.metadata_from_bytes(blob) == (metadata or {})
    # safetensors.numpy cannot read BF16 or the float8s (it has no numpy dtype for them); the torch test
    # covers BF16
    numpy_only = {
        k: v for k, v in tensors.items() if v.dtype not in [DTYPES[c] for c in ("BF16", "F8_E4M3", "F8_E5M2")]
    }
    same(real.load(sft.to_bytes(numpy_only, metadata)), numpy_only)


def test_bf16_identical_to_torch_save_file(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tt = {
        "model.w": torch.randn(33, 65, generator=g).to(torch.bfloat16),
        "model.b": torch.randn(7, generator=g).to(torch.bfloat16),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }
    safetensors_torch.save_file(tt, tmp_path / "torch.safetensors", metadata={"format": "pt"})
    as_np = {
        k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
        for k, v in tt.items()
    }
    sft.save(as_np, tmp_path / "mine.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "torch.safetensors").read_bytes()
    same(sft.load(tmp_path / "torch.safetensors"), as_np)
    back = safetensors_torch.load_file(tmp_path / "mine.safetensors")
    for k, v in tt.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


# --- corruption: each case names what is wrong, and the key when there is one -----------------------


def raw(header: dict | str | bytes, data: bytes = b"", pad: bool = True) -> bytes:
    text = (
        header
        if isinstance(header, bytes)
        else (header if isinstance(header, str) else json.dumps(header)).encode()
    )
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = raw({"a": entry("F32", [2], 0, 8), "b": entry("U8", [3], 8, 11)}, bytes(11))

CORRUPT = {
    "file shorter than 8 bytes": (b"\x01\x00", None, "no room"),
    "header length beyond file": (GOOD[:-12], None, "beyond the file"),
    "header length over the limit": (
        struct.pack("<Q", sft.MAX_HEADER + 1) + b"{}",
        None,
        "not a safetensors file: its first 8 bytes",
    ),
    "header not JSON": (raw('{"a": {"dtype": "F32"'), None, "not JSON"),
    "header nested too deeply": (raw(b"[" * 50_000 + b"]" * 50_000), None, "nested too deeply"),
    "header not UTF-8": (raw(b'{"\xff": 1}'), None, "not UTF-8"),
    "header not an object": (raw("[1, 2]"), None, "must be a JSON object"),
    "unknown dtype": (raw({"w": entry("C64", [1], 0, 8)}, bytes(8)), "w", "unknown dtype 'C64'"),
    "missing field": (raw({"w": {"dtype": "F32", "shape": [1]}}, bytes(4)), "w", "exactly the fields"),
    "extra field": (raw({"w": entry("F32", [1], 0, 4) | {"x": 1}}, bytes(4)), "w", "exactly the fields"),
    "negative dimension": (raw({"w": entry("F32", [-1], 0, 4)}, bytes(4)), "w", "non-negative integers"),
    "float dimension": (raw({"w": entry("F32", [1.0], 0, 4)}, bytes(4)), "w", "non-negative integers"),
    "three offsets": (
        raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, bytes(4)),
        "w",
        "two",
    ),
    "offsets not matching shape": (raw({"w": entry("F32", [3], 0, 8)}, bytes(8)), "w", "needs 12"),
    "offsets out of order": (raw({"w": entry("U8", [0], 4, 0)}, bytes(4)), "w", "out of order"),
    "offsets past the data": (raw({"w": entry("F32", [2], 0, 8)}, bytes(4)), "w", "past the end"),
    "overlapping offsets": (
        raw({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)),
        "b",
        "overlap those of 'a'",
    ),
    "gap between tensors": (
        raw({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)),
        "b",
        "no tensor",
    ),
    "gap before the first tensor": (raw({"a": entry("F32", [1], 4, 8)}, bytes(8)), "a", "no tensor"),
    "trailing bytes": (raw({"a": entry("F32", [1], 0, 4)}, bytes(5)), None, "1 trailing bytes"),
    "duplicate tensor key": (
        raw(
            '{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
            '"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
            bytes(2),
        ),
        "w",
        "twice",
    ),
    "duplicate field in an entry": (
        raw('{"w": {"dtype": "U8", "dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}', bytes(1)),
        "dtype",
        "twice",
    ),
    "metadata not str to str": (raw({"__metadata__": {"a": 1}}), "__metadata__", "string to string"),
    "bool byte not 0 or 1": (raw({"flags": entry("BOOL", [2], 0, 2)}, b"\x01\x02"), "flags", "BOOL"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_raises_naming_the_key(case: str) -> None:
    blob, key, words = CORRUPT[case]
    with pytest.raises(SafetensorsError, match=words) as info:
        sft.from_bytes(blob)
    assert info.value.key == key
    if key is not None:
        assert repr(key) in str(info.value)


def test_good_file_is_accepted_in_any_header_order() -> None:
    # the header may list tensors in any order; only their offsets must tile the data
    swapped = raw({"b": entry("U8", [3], 8, 11), "a": entry("F32", [2], 0, 8)}, bytes(11))
    assert set(sft.from_bytes(swapped)) == {"a", "b"}
    assert set(sft.from_bytes(GOOD)) == {"a", "b"}


def test_load_metadata_validates_the_header(tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(CORRUPT["overlapping offsets"][0])
    with pytest.raises(SafetensorsError, match="overlap"):
        sft.load_metadata(path)
    path.write_bytes(CORRUPT["header length beyond file"][0])
    with pytest.raises(SafetensorsError, match="beyond"):
        sft.load_metadata(path)
    for case in ("header length over the limit", "file shorter than 8 bytes", "header not JSON"):
        path.write_bytes(CORRUPT[case][0])
        with pytest.raises(SafetensorsError, match=CORRUPT[case][2]):
            sft.load_metadata(path)


@pytest.mark.parametrize(
    ("tensors", "metadata", "key", "words"),
    [
        ({"t": np.zeros(2, "<M8[s]")}, None, "t", "not one of"),
        ({"c": np.zeros(2, np.complex64)}, None, "c", "not one of"),
        ({"l": [1.0, 2.0]}, None, "l", "numpy array"),
        ({"__metadata__": np.zeros(1, np.uint8)}, None, "__metadata__", "other than"),
        ({"w": np.zeros(1, np.uint8)}, {"a": 1}, "__metadata__", "str to str"),
        ({"\ud800": np.zeros(1, np.uint8)}, None, "\ud800", "UTF-8 form"),
        ({"w": np.zeros(1, np.uint8)}, {"\udfff": "v"}, "__metadata__", "UTF-8 form"),
        ({"w": np.zeros(1, np.uint8)}, {"k": "v\ud800"}, "__metadata__", "UTF-8 form"),
    ],
)
def test_writer_rejects_what_the_format_cannot_hold(tensors, metadata, key, words) -> None:
    with pytest.raises(SafetensorsError, match=words) as info:
        sft.to_bytes(tensors, metadata)
    assert info.value.key == key
    str(info.value).encode("utf-8")  # the message is printable even where the name is not


def test_formats_never_import_torch() -> None:
    # reflora.formats is part of the oracle: reading and writing files must not pull torch in
    import subprocess
    import sys

    code = "import sys, reflora.formats; sys.exit('torch' in sys.modules or 'safetensors' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
