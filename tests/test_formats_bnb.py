"""reflora.formats.bnb against bitsandbytes 0.50 and transformers 5 on the CPU.

Byte identity is the bar: a state bitsandbytes writes goes through from_state_dict / to_state_dict to
the same keys, dtypes, shapes and bytes; a state reflora writes is read by bitsandbytes and
dequantized to the same bits as reflora's own dequantization; checkpoints go both ways through
transformers' loader.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflora import nf4
from reflora.double_quant import quantize as double_quantize
from reflora.dtypes import as_dtype
from reflora.formats import bnb as fb
from reflora.formats import safetensors as sft
from reflora.formats.bnb import StateDictError
from reflora.state import BLOCKSIZES

CI = settings(max_examples=25, deadline=None)
PREFIX = "model.layers.0.self_attn.q_proj.weight"  # dots in the prefix on purpose
CASES = [((33, 65), 64), ((5, 7), 32), ((1000,), 128), ((3, 100), 4096), ((1, 1), 64), ((130, 130), 64)]
DTYPE_NAMES = ["float32", "float16", "bfloat16"]


def assert_same_dict(
    mine: dict[str, np.ndarray], theirs: dict[str, np.ndarray], ordered: bool = True
) -> None:
    """The same keys (in the same order, if ``ordered``), dtypes, shapes and bytes."""
    assert list(mine) == list(theirs) if ordered else set(mine) == set(theirs)
    for k in theirs:
        assert (mine[k].dtype, mine[k].shape) == (theirs[k].dtype, theirs[k].shape), k
        assert mine[k].tobytes() == theirs[k].tobytes(), k


def sample(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Normal data with a zero block and a run of tiny values, in ``dtype`` (numpy)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[: min(64, flat.size // 3)] = 0.0
    flat[flat.size // 2 : flat.size // 2 + 5] *= 1e-3
    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


# --- pure reflora: no third-party package needed ------------------------------------------------------


@CI
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPE_NAMES),
    seed=st.integers(0, 2**16),
)
def test_reflora_state_round_trips(shape, blocksize, quant_type, double_quant, dtype, seed) -> None:
    state = nf4.quantize(
        sample(shape, dtype, seed), blocksize, quant_type=quant_type, double_quant=double_quant
    )
    d = fb.to_state_dict(state, PREFIX)
    n = math.prod(shape)
    assert d[PREFIX].shape == ((n + 1) // 2, 1) and d[PREFIX].dtype == np.uint8
    assert d[f"{PREFIX}.absmax"].dtype == (np.uint8 if double_quant else np.float32)
    assert fb.from_state_dict(d, PREFIX) == state
    assert_same_dict(fb.to_state_dict(fb.from_state_dict(d, PREFIX), PREFIX), d)


def test_json_field_order_and_format() -> None:
    state = nf4.quantize(sample((128, 128), "bfloat16", 0), 64, double_quant=True)
    text = fb.to_state_dict(state, "w")["w.quant_state.bitsandbytes__nf4"].tobytes().decode()
    offset = float(state.nested.offset)
    assert text == (
        '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 128], '
        f'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {offset!r}}}'
    )
    assert np.float32(json.loads(text)["nested_offset"]).tobytes() == state.nested.offset.tobytes()


# --- corruption: every bad state dict names the offending key ------------------------------------------


DROP = object()  # a with_json value that removes the field
QS = f"{PREFIX}.quant_state.bitsandbytes__nf4"


def good(double_quant: bool = True) -> dict[str, np.ndarray]:
    return fb.to_state_dict(
        nf4.quantize(sample((33, 65), "bfloat16", 1), 64, double_quant=double_quant), PREFIX
    )


def with_json(d: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    key = f"{PREFIX}.quant_state.bitsandbytes__nf4"
    fields = json.loads(d[key].tobytes()) | changes
    fields = {k: v for k, v in fields.items() if v is not DROP}
    return d | {key: np.frombuffer(json.dumps(fields).encode(), np.uint8)}


def _replace(d, key, value):
    return d | {key: value}


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


CORRUPT = {
    "missing packed": (lambda: _drop(good(), PREFIX), PREFIX, "missing"),
    "missing absmax": (lambda: _drop(good(), f"{PREFIX}.absmax"), f"{PREFIX}.absmax", "missing"),
    "missing quant_map": (lambda: _drop(good(), f"{PREFIX}.quant_map"), f"{PREFIX}.quant_map", "missing"),
    "missing quant_state": (lambda: _drop(good(), QS), QS, "no quant_state"),
    "packed wrong dtype": (lambda: _replace(good(), PREFIX, good()[PREFIX].view(np.int8)), PREFIX, "uint8"),
    "packed 1-D": (lambda: _replace(good(), PREFIX, good()[PREFIX].reshape(-1)), PREFIX, r"\(1073, 1\)"),
    "packed one byte short": (lambda: _replace(good(), PREFIX, good()[PREFIX][:-1]), PREFIX, r"\(1073, 1\)"),
    "packed a list": (lambda: _replace(good(), PREFIX, [1, 2]), PREFIX, "numpy array"),
    "absmax float32 when nested": (
        lambda: _replace(good(), f"{PREFIX}.absmax", good(False)[f"{PREFIX}.absmax"]),
        f"{PREFIX}.absmax",
        "uint8",
    ),
    "absmax count vs blocksize": (
        lambda: _replace(good(False), f"{PREFIX}.absmax", good(False)[f"{PREFIX}.absmax"][:-1]),
        f"{PREFIX}.absmax",
        r"\(34,\)",
    ),
    "absmax NaN": (
        lambda: _replace(good(False), f"{PREFIX}.absmax", np.full(34, np.nan, np.float32)),
        f"{PREFIX}.absmax",
        "finite",
    ),
    "absmax negative": (
        lambda: _replace(good(False), f"{PREFIX}.absmax", -np.ones(34, np.float32)),
        f"{PREFIX}.absmax",
        ">= 0",
    ),
    "quant_map 15 values": (
        lambda: _replace(good(), f"{PREFIX}.quant_map", good()[f"{PREFIX}.quant_map"][:15]),
        f"{PREFIX}.quant_map",
        r"\(16,\)",
    ),
    "quant_map float64": (
        lambda: _replace(good(), f"{PREFIX}.quant_map", good()[f"{PREFIX}.quant_map"].astype(np.float64)),
        f"{PREFIX}.quant_map",
        "float32",
    ),
    "quant_map of fp4 under nf4": (
        lambda: _replace(
            good(),
            f"{PREFIX}.quant_map",
            fb.to_state_dict(nf4.quantize(np.ones(2, np.float32), quant_type="fp4"), "x")["x.quant_map"],
        ),
        f"{PREFIX}.quant_map",
        "nf4 table",
    ),
    "nested_quant_map one bit flipped": (
        lambda: _replace(
            good(),
            f"{PREFIX}.nested_quant_map",
            (good()[f"{PREFIX}.nested_quant_map"].view(np.uint32) ^ np.uint32(1)).view(np.float32),
        ),
        f"{PREFIX}.nested_quant_map",
        "index 0",
    ),
    "nested_absmax count": (
        lambda: _replace(good(), f"{PREFIX}.nested_absmax", np.ones(2, np.float32)),
        f"{PREFIX}.nested_absmax",
        r"\(1,\)",
    ),
    "nested keys without nested JSON": (
        lambda: with_json(good(), nested_blocksize=DROP, nested_dtype=DROP, nested_offset=DROP),
        f"{PREFIX}.nested_absmax",
        "no nested fields",
    ),
    "nested JSON without nested keys": (
        lambda: _drop(_drop(good(), f"{PREFIX}.nested_absmax"), f"{PREFIX}.nested_quant_map"),
        f"{PREFIX}.nested_absmax",
        "has nested fields",
    ),
    "nested JSON partly there": (
        lambda: with_json(good(), nested_dtype=DROP),
        QS,
        r"missing \['nested_dtype'\]",
    ),
    "JSON not JSON": (lambda: _replace(good(), QS, np.frombuffer(b'{"quant_type": ', np.uint8)), QS, "JSON"),
    "JSON not UTF-8": (lambda: _replace(good(), QS, np.frombuffer(b'{"\xff": 1}', np.uint8)), QS, "UTF-8"),
    "JSON a list": (lambda: _replace(good(), QS, np.frombuffer(b"[1]", np.uint8)), QS, "object"),
    "JSON nested too deeply": (
        lambda: _replace(good(), QS, np.frombuffer(b"[" * 50_000 + b"]" * 50_000, np.uint8)),
        QS,
        "nested too deeply",
    ),
    "JSON field twice": (
        lambda: _replace(good(), QS, np.frombuffer(b'{"quant_type": "nf4", "quant_type": "nf4"}', np.uint8)),
        QS,
        "twice",
    ),
    "JSON as int8": (lambda: _replace(good(), QS, good()[QS].view(np.int8)), QS, "uint8"),
    "JSON unknown field": (lambda: with_json(good(), colour="blue"), QS, r"unknown \['colour'\]"),
    "JSON missing shape": (lambda: with_json(good(), shape=DROP), QS, r"missing \['shape'\]"),
    "shape vs packed size": (lambda: with_json(good(), shape=[33, 66]), PREFIX, r"\(1089, 1\)"),
    "shape negative": (lambda: with_json(good(), shape=[-33, 65]), QS, "non-negative"),
    "shape empty tensor": (lambda: with_json(good(), shape=[0, 65]), QS, "no elements"),
    "quant_type unknown": (lambda: with_json(good(), quant_type="int4"), QS, "quant_type 'int4'"),
    "quant_type vs key": (lambda: with_json(good(), quant_type="fp4"), QS, "match the key"),
    "blocksize not allowed": (lambda: with_json(good(), blocksize=48), QS, "blocksize 48"),
    "blocksize a string": (lambda: with_json(good(), blocksize="64"), QS, "blocksize '64'"),
    "blocksize changes absmax count": (
        lambda: with_json(good(), blocksize=128),
        f"{PREFIX}.absmax",
        r"\(17,\)",
    ),
    "dtype unknown": (lambda: with_json(good(), dtype="float8"), QS, "dtype 'float8'"),
    "dtype a list": (lambda: with_json(good(), dtype=["bfloat16"]), QS, "dtype"),
    "quant_type a list": (lambda: with_json(good(), quant_type=["nf4"]), QS, "quant_type"),
    "nested_offset an int": (lambda: with_json(good(), nested_offset=3), QS, "float32 value"),
    "nested_blocksize not allowed": (
        lambda: with_json(good(), nested_blocksize=100),
        QS,
        "nested_blocksize 100",
    ),
    "nested_dtype not float32": (lambda: with_json(good(), nested_dtype="float16"), QS, "nested_dtype"),
    "nested_offset not float32": (lambda: with_json(good(), nested_offset=0.1), QS, "float32 value"),
    "nested_offset NaN": (lambda: with_json(good(), nested_offset=float("nan")), QS, "float32 value"),
    "nested_offset a string": (lambda: with_json(good(), nested_offset="0.5"), QS, "float32 value"),
    # a negative mean of non-negative scales: every block rebuilt another (negative) scale, silently
    "nested_offset negative": (lambda: with_json(good(), nested_offset=-0.5), QS, "is negative"),
    "unknown key under prefix": (
        lambda: good() | {f"{PREFIX}.SCB": np.ones(3, np.float32)},
        f"{PREFIX}.SCB",
        "unknown key",
    ),
    "two quant_state keys": (
        lambda: good() | {f"{PREFIX}.quant_state.bitsandbytes__fp4": good()[QS]},
        f"{PREFIX}.quant_state.bitsandbytes__fp4",
        "second quant_state",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_state_dict_names_the_key(case: str) -> None:
    make, key, words = CORRUPT[case]
    with pytest.raises(StateDictError, match=words) as info:
        fb.from_state_dict(make(), PREFIX)
    assert info.value.key == key
    assert repr(key) in str(info.value)


def test_writer_refuses_a_nested_blocksize_bnb_cannot_hold() -> None:
    state = nf4.quantize(sample((33, 65), "float32", 5), 64, double_quant=True)
    odd = dataclasses.replace(state, nested=double_quantize(nf4.block_scales(state), blocksize2=100))
    with pytest.raises(ValueError, match="nested blocksize 100"):
        fb.to_state_dict(odd)


def test_unrelated_keys_are_ignored() -> None:
    d = {"model.embed.weight": np.ones(3, np.float32)} | good() | {f"{PREFIX}x": np.ones(1, np.uint8)}
    assert fb.from_state_dict(d, PREFIX) == fb.from_state_dict(good(), PREFIX)


# --- whole checkpoints -----------------------------------------------------------------------------------


def test_quantize_and_dequantize_state_dict() -> None:
    weights = {
        "embed.weight": sample((11, 8), "bfloat16", 2),
        "layer.q_proj.weight": sample((33, 65), "bfloat16", 3),
        "layer.norm.weight": np.ones(65, ml_dtypes.bfloat16),
        "layer.o_proj.weight": sample((65, 33), "float16", 4),
        "layer.o_proj.bias": np.zeros(65, np.float32),
    }
    targets = ["layer.q_proj.weight", "layer.o_proj.weight"]
    q = fb.quantize_state_dict(weights, targets=targets, blocksize=32, quant_type="fp4", double_quant=False)
    assert list(q)[:2] == ["embed.weight", "layer.q_proj.weight"]
    assert q["embed.weight"] is weights["embed.weight"] and "layer.o_proj.weight.absmax" in q
    for t in targets:
        state = nf4.quantize(weights[t], 32, quant_type="fp4")
        assert_same_dict({k: v for k, v in q.items() if k.startswith(t)}, fb.to_state_dict(state, t))
    back = fb.dequantize_state_dict(q)
    assert list(back) == list(weights)
    for k, w in weights.items():
        expected = nf4.dequantize(nf4.quantize(w, 32, quant_type="fp4")) if k in targets else w
        assert (back[k].dtype, back[k].shape, back[k].tobytes()) == (w.dtype, w.shape, expected.tobytes()), k


def test_quantized_prefixes_finds_every_weight_and_every_orphan() -> None:
    """One rule finds the 4-bit weights for every reader of whole state dicts: a quant_state key of any
    suffix (the reader then names a wrong one), or a statistic beside its own weight with none."""
    keys = [
        "a.weight", "a.weight.absmax", "a.weight.quant_map", f"a.weight.{fb.QUANT_STATE}nf4",
        "norm.weight", "norm.bias",  # not 4-bit
        "b.weight.quant_state.bitsandbytes__int8",  # garbled suffix: still a 4-bit weight to report
        "c.weight", "c.weight.absmax",  # lost its quant_state
        "d.absmax",  # a statistic without its weight: passes through
        "a.quant_state.x.quant_state.bitsandbytes__fp4",  # the last .quant_state. ends the prefix
    ]  # fmt: skip
    assert fb.quantized_prefixes(keys) == ["a.weight", "b.weight", "c.weight", "a.quant_state.x"]
    assert fb.quantized_prefixes({}) == []
    with pytest.raises(StateDictError, match="quant_type 'int4' must be 'nf4' or 'fp4'"):
        fb.dequantize_state_dict(
            {k.replace("__nf4", "__int4"): v for k, v in with_json(good(), quant_type="int4").items()}
        )


def test_checkpoint_helpers_reject_bad_input() -> None:
    w = {"a.weight": np.ones((4, 4), np.float32), "b.weight": np.ones(4, np.float32)}
    with pytest.raises(StateDictError, match="not in the weights") as info:
        fb.quantize_state_dict(w, targets=["c.weight"])
    assert info.value.key == "c.weight"
    with pytest.raises(StateDictError, match="2-D") as info:
        fb.quantize_state_dict(w, targets=["b.weight"])
    assert info.value.key == "b.weight"
    with pytest.raises(StateDictError, match="already in the weights") as info:
        fb.quantize_state_dict(w | {"a.weight.absmax": np.ones(1, np.float32)}, targets=["a.weight"])
    assert info.value.key == "a.weight.absmax"
    with pytest.raises(StateDictError, match="not float64") as info:
        fb.quantize_state_dict(w | {"a.weight": np.ones((4, 4))}, targets=["a.weight"])
    assert info.value.key == "a.weight"
    nan = np.ones((4, 4), np.float32)
    nan[2, 1] = np.nan
    with pytest.raises(StateDictError, match=r"not finite at index \(2, 1\)") as info:
        fb.quantize_state_dict(w | {"a.weight": nan}, targets=["a.weight"])
    assert info.value.key == "a.weight"
    with pytest.raises(TypeError, match=r"not the str 'a.weight'; use \['a.weight'\]"):
        fb.quantize_state_dict(w, targets="a.weight")
    orphan = {k: v for k, v in good().items() if "quant_state" not in k}
    with pytest.raises(StateDictError, match=rf"no quant_state key .*which has \['{PREFIX}.absmax'") as info:
        fb.dequantize_state_dict(orphan)
    assert info.value.key == f"{PREFIX}.{fb.QUANT_STATE}nf4"
    with pytest.raises(StateDictError, match="quant_type 'int4'"):
        fb.dequantize_state_dict(with_json(good(), quant_type="int4"))


# --- against bitsandbytes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bnb(torch):
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()


def to_torch(a: np.ndarray):
    import torch

    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def bnb_dequantize_matches(bnb, state, packed_t, qs) -> None:
    """bitsandbytes' dequantization of (packed_t, qs) equals reflora's of ``state``, bit for bit.

    One known exception, asserted as such: for an even number of elements bitsandbytes' native CPU
    kernel runs, and its scalar loop decodes FP4 nibble 8 to -0.0 though its own quant_map[8] is +0.0
    (its AVX-512 loop gives +0.0; which runs depends on the shape and the host, docs/dialects.md bnb-cpu
    rule 10): such values are asserted to be a zero of either sign.
    """
    theirs = to_numpy(bnb.functional.dequantize_4bit(packed_t, qs))
    mine = nf4.dequantize(state)
    assert theirs.size == mine.size and theirs.dtype == mine.dtype
    a, b = theirs.reshape(-1), mine.reshape(-1)
    differ = a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1)
    differ = differ.any(axis=1)
    if state.quant_type == "fp4" and state.numel % 2 == 0:
        nibble8 = nf4.unpack(state.packed, state.numel) == 8
        assert not (differ & ~nibble8).any()
        assert (a[nibble8] == 0).all() and (b[nibble8] == 0).all()
    else:
        assert not differ.any(), f"{differ.sum()} of {differ.size} values differ"


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "DQ"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize(("shape", "blocksize"), CASES, ids=[f"{s}-bs{b}" for s, b in CASES])
def test_bnb_state_round_trips_byte_identically(
    bnb, torch, shape, blocksize, dtype, quant_type, double_quant
):
    x = to_torch(sample(shape, dtype, seed=blocksize))
    packed, qs = bnb.functional.quantize_4bit(
        x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    theirs = {PREFIX: to_numpy(packed)}
    theirs |= {f"{PREFIX}.{k}": to_numpy(v) for k, v in qs.as_dict(packed=True).items()}
    state = fb.from_state_dict(theirs, PREFIX)
    assert_same_dict(fb.to_state_dict(state, PREFIX), theirs)
    assert state.shape == shape and state.dtype == as_dtype(dtype)
    bnb_dequantize_matches(bnb, state, packed, qs)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "DQ"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize(("shape", "blocksize"), CASES, ids=[f"{s}-bs{b}" for s, b in CASES])
def test_reflora_state_read_by_bnb(bnb, torch, shape, blocksize, dtype, quant_type, double_quant):
    state = nf4.quantize(
        sample(shape, dtype, seed=7), blocksize, quant_type=quant_type, double_quant=double_quant
    )
    d = fb.to_state_dict(state, PREFIX)
    qs = bnb.functional.QuantState.from_dict(
        {k[len(PREFIX) + 1 :]: to_torch(v) for k, v in d.items() if k != PREFIX}, device=torch.device("cpu")
    )
    assert (qs.blocksize, qs.quant_type, tuple(qs.shape), qs.nested) == (
        blocksize,
        quant_type,
        shape,
        double_quant,
    )
    if double_quant:
        assert np.float32(qs.offset.item()).tobytes() == state.nested.offset.tobytes()
    bnb_dequantize_matches(bnb, state, to_torch(d[PREFIX]), qs)


@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "DQ"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_state_dict_round_trips(bnb, torch, quant_type, compress_statistics) -> None:
    layer = bnb.nn.Linear4bit(
        65,
        33,
        bias=True,
        compute_dtype=torch.bfloat16,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
    )
    weight = to_torch(sample((33, 65), "bfloat16", 11))
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=compress_statistics, quant_type=quant_type
    )
    layer = layer.to("cpu")  # quantizes on the CPU
    sd = {k: to_numpy(v) for k, v in layer.state_dict().items()}
    theirs = {k: v for k, v in sd.items() if k == "weight" or k.startswith("weight.")}
    assert theirs["weight"].shape == ((33 * 65 + 1) // 2, 1)
    state = fb.from_state_dict(sd, "weight")  # "bias" is beside the prefix, not under it
    assert_same_dict(fb.to_state_dict(state, "weight"), theirs)
    assert state.dtype == ml_dtypes.bfloat16 and state.double_quant == compress_statistics


# --- Hugging Face checkpoints ---------------------------------------------------------------------------

HF_CONFIGS = {"nf4-DQ": ("nf4", True), "fp4-plain": ("fp4", False)}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, bnb):
    """A 1-layer Llama (hidden 128) with random bf16 weights saved by transformers, and its config."""
    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return transformers, path


def bnb_config(transformers, quant_type: str, double_quant: bool):
    import torch

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def linear_weight_keys(weights: dict[str, np.ndarray]) -> list[str]:
    # the Linear layers inside the decoder; transformers keeps lm_head and the embeddings unquantized
    return [k for k in weights if k.startswith("model.layers.") and k.endswith("_proj.weight")]


@pytest.mark.parametrize("config_id", list(HF_CONFIGS))
def test_transformers_loads_a_reflora_checkpoint(tiny_llama, tmp_path, config_id) -> None:
    transformers, plain = tiny_llama
    quant_type, double_quant = HF_CONFIGS[config_id]
    weights = sft.load(plain / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {np.dtype(ml_dtypes.bfloat16)}
    targets = linear_weight_keys(weights)
    assert len(targets) == 7
    ours = fb.quantize_state_dict(weights, targets=targets, quant_type=quant_type, double_quant=double_quant)
    sft.save(ours, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = bnb_config(transformers, quant_type, double_quant).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    loaded = {k: to_numpy(v) for k, v in model.state_dict().items()}
    assert set(loaded) == set(ours)
    for k in ours:
        assert (loaded[k].dtype, loaded[k].shape, loaded[k].tobytes()) == (
            ours[k].dtype,
            ours[k].shape,
            ours[k].tobytes(),
        ), k
    for t in targets:
        assert fb.from_state_dict(loaded, t) == fb.from_state_dict(ours, t)


def test_reads_a_transformers_quantized_checkpoint(tiny_llama, tmp_path, bnb) -> None:
    transformers, plain = tiny_llama
    config = bnb_config(transformers, "nf4", True)
    model = transformers.LlamaForCausalLM.from_pretrained(plain, quantization_config=config, device_map="cpu")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == config.to_dict()  # what the other test writes is what transformers writes

    blob = (tmp_path / "model.safetensors").read_bytes()
    d = sft.from_bytes(blob)
    assert sft.to_bytes(d, sft.metadata_from_bytes(blob)) == blob  # the writer reproduces the file
    modules = dict(model.named_modules())
    targets = linear_weight_keys(d)
    assert len(targets) == 7
    for t in targets:
        state = fb.from_state_dict(d, t)
        assert state.double_quant and state.quant_type == "nf4" and state.blocksize == 64
        in_file = {k: v for k, v in d.items() if k == t or k.startswith(f"{t}.")}
        assert_same_dict(fb.to_state_dict(state, t), in_file, ordered=False)  # a file sorts its keys
        weight = modules[t.removesuffix(".weight")].weight
        bnb_dequantize_matches(bnb, state, weight.data, weight.quant_state)

    dense = fb.dequantize_state_dict(d)
    assert set(dense) == set(sft.load(plain / "model.safetensors"))
    for t in targets:
        assert dense[t].tobytes() == nf4.dequantize(fb.from_state_dict(d, t)).tobytes()
