"""Special cases as data: each is a readable name, the op and check it exercises, and the inputs.

A case becomes one test per dtype, with the id ``op[name, dtype]``, e.g.
``quantize_4bit[nf4 x exactly at threshold 3|4, float32]``. Cases pin the corners a random draw may
miss: exact ties, zero and ragged blocks, the largest blocksizes, views, degenerate LoRA shapes, and
each kind of bad input. Their values come from a generator seeded by the case's name, so a case is
the same on every run and every machine.

The list is :data:`CASES`; :func:`cases_for` gives the (op, name, dtype, build) of every test.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from reflora import codebooks, lora, nf4
from reflora.bounds import round_to
from reflora.conformance.bundle import Inputs
from reflora.conformance.strategies import TINY_LEVELS, _step_ulps, family_values, lora_values
from reflora.dialects import torchao_nf4
from reflora.dtypes import DTYPES, as_dtype

__all__ = ["CASES", "Case", "cases_for"]

ALL = tuple(DTYPES)


@dataclass(frozen=True)
class Case:
    """op: the op under test; name: the readable part of the id; check: the check it runs;
    build(dtype, rng) -> Inputs without a test id; dtypes: the dtypes it applies to."""

    op: str
    name: str
    check: str
    build: Callable[[str, np.random.Generator], Inputs]
    dtypes: tuple[str, ...] = ALL


def _rng(name: str, dtype: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{name}/{dtype}".encode()))


def _cast(v, dtype: str) -> np.ndarray:
    return round_to(np.asarray(v, dtype=np.float64), as_dtype(dtype))


def _q(x, dtype, *, blocksize=64, quant_type="nf4", double_quant=False, recipe=(), out_dtype=None, note="",
       check="quantize", blocksize2=None) -> Inputs:  # fmt: skip
    """Quantization inputs: x (float64 or already of dtype) cast to dtype, seen through ``recipe``;
    ``blocksize2``: a double-quantization group size other than 256 (params, where the check reads it)."""
    params = {"blocksize": blocksize, "quant_type": quant_type, "double_quant": double_quant}
    if blocksize2 is not None:
        params["blocksize2"] = blocksize2
    if check in ("dequantize", "roundtrip"):
        params["out_dtype"] = out_dtype
    inputs = Inputs("", "", check, dtype, params=params, note=note)
    inputs.put("x", _cast(x, dtype), recipe)
    return inputs


def _normal(rng, n, scale=1.0):
    return rng.standard_normal(n) * scale


def _mixed_scales(rng, blocks=600, blocksize=32):
    """``blocks`` blocks of ``blocksize`` normal values, each block scaled by 2^u, u uniform in [-8, 2]:
    scales spread over ten binades, for double quantization."""
    return _normal(rng, blocks * blocksize) * np.repeat(2.0 ** rng.uniform(-8, 2, blocks), blocksize)


# ---- quantize_4bit -------------------------------------------------------------------------------------


def _ragged(dtype, rng):
    x = _normal(rng, 3 * 64 + 17)
    x[-17:] *= 0.01  # the tail's absmax is far below the full blocks'
    return _q(x, dtype, note="3 full blocks and a tail of 17 whose absmax is smaller")


def _zero_block(dtype, rng):
    x = _normal(rng, 4 * 64)
    x[64:128] = 0.0
    x[64:128:3] = -0.0
    return _q(x, dtype, note="block 1 holds only +0.0 and -0.0")


def _zero_tail(dtype, rng):
    x = _normal(rng, 2 * 64 + 10)
    x[128:] = 0.0
    return _q(x, dtype, note="an all-zero ragged tail of 10")


def _constant(dtype, rng):
    x = np.repeat(_normal(rng, 5), 64)
    x[::7] *= -1  # +c and -c in one block: codes 15 and 0
    return _q(x, dtype, note="every block holds one magnitude")


def _exact_ties(quant_type: str, i: int, threshold: float):
    def build(dtype, rng):
        A = np.array([1.0, 0.125, 4.0, 0.75, 3.0])
        blocks = []
        for a in A:
            block = np.full(64, threshold * a)
            block[rng.integers(0, 64)] = a * rng.choice([-1.0, 1.0])
            blocks.append(block)
        x = np.concatenate(blocks)
        keep = _cast(x, dtype).astype(np.float64) == x  # only the exact ties this dtype can hold
        x = np.where(keep, x, 0.0)
        return _q(x, dtype, quant_type=quant_type, note=f"x/absmax == {threshold!r} exactly")

    return build


def _near_thresholds(quant_type: str):
    def build(dtype, rng):
        book = codebooks.get(quant_type)
        dt = as_dtype(dtype)
        blocks = []
        for a in (1.0, 0.75, 3.3, 2.0**-7):
            a = float(_cast(a, dtype))
            m = np.repeat(book.thresholds, 5)
            x = round_to(m * a, dt)
            x = _step_ulps(x, np.tile(np.array([-2, -1, 0, 1, 2]), book.thresholds.size))
            block = np.concatenate([[a], x.astype(np.float64)])
            blocks.append(np.pad(block, (0, -block.size % 128)))
        return _q(np.concatenate(blocks), dtype, quant_type=quant_type, blocksize=128,
                  note="each threshold times absmax, rounded to dtype, and -2 ... +2 ulps")  # fmt: skip

    return build


def _fp4_small(dtype, rng):
    x = np.concatenate([[1.0], rng.uniform(-0.002, 0.002, 63)])
    return _q(x, dtype, quant_type="fp4", note="|x/absmax| <= 0.002: every one rounds to zero, code 0")


def _subnormal(dtype, rng):
    tiny = float(ml_dtypes.finfo(as_dtype(dtype)).smallest_normal)
    x = rng.uniform(-tiny, tiny, 2 * 64)
    x[64:] *= 2.0**12  # one subnormal block, one of small normal numbers
    return _q(x, dtype, note="block 0 entirely subnormal (its absmax too)")


def _near_overflow(dtype, rng):
    big = float(ml_dtypes.finfo(as_dtype(dtype)).max)
    x = rng.uniform(-big, big, 3 * 64)
    x[[0, 64, 130]] = [big, -big, big]
    return _q(np.clip(x, -big, big), dtype, note="values up to the dtype's largest finite number")


def _large_block(dtype, rng):
    x = _normal(rng, 2 * 4096 + 100, 0.02)
    x[4095] = x[2 * 4096 - 1] = 1.0  # each full block's absmax sits in its last element
    return _q(
        x, dtype, blocksize=4096, note="blocksize 4096, the absmax of each full block in its last element"
    )


def _q_case(build_x: Callable, **kw):
    def build(dtype, rng):
        return _q(build_x(rng), dtype, **kw)

    return build


def _nonfinite(value: str, recipe=()):
    def build(dtype, rng):
        x = _normal(rng, 6 * 50).reshape(6, 50)
        index = (4, 37)
        x[index] = float(value)
        inputs = _q(x, dtype, recipe=recipe, check="rejects", note=f"x[4, 37] = {value}")
        inputs.params.update(bad=value, bad_index=list(index))
        return inputs

    return build


def _nonfinite_accepted_shape(dtype, rng):
    """NaN in a weight every dialect can quantize (torchao: NF4, double quant, 256 blocks of 64), so a
    backend that rejects only unusual shapes cannot pass by luck."""
    x = _normal(rng, 128 * 128).reshape(128, 128)
    x[77, 5] = np.nan
    inputs = _q(x, dtype, double_quant=True, check="rejects", note="x[77, 5] = nan in a 128 x 128 weight")
    inputs.params.update(bad="nan", bad_index=[77, 5])
    return inputs


def _near_overflow_roundtrip(dtype, rng):
    """256 blocks of 64 (a shape every dialect takes) with values up to the dtype's largest: a float32
    sum of the block absmax values overflows, an exact mean does not. Finite input must dequantize to
    finite values whatever the dialect (``require_finite``)."""
    big = float(ml_dtypes.finfo(as_dtype(dtype)).max)
    x = np.clip(rng.uniform(-big, big, 128 * 128), -big, big)
    x[::64] = big  # every block's absmax is the largest finite number
    inputs = _q(x.reshape(128, 128), dtype, double_quant=True, check="roundtrip",
                note="every block's absmax is the dtype's largest finite number")  # fmt: skip
    inputs.params["require_finite"] = True
    return inputs


# ---- quantize_4bit, torchao-shaped ----------------------------------------------------------------------
# torchao quantizes NF4 only, always double-quantized, and only shapes of whole groups of 256 blocks
# (rule 1 of reflora/dialects/torchao_nf4.py). The corners above fall outside, so torchao rejects them
# as its dialect does and passes without being called; these repeat them in shapes it takes. They stay
# canonical inputs for every other backend.

_AO_GROUP = torchao_nf4.SCALER_BLOCK_SIZE


def _ao(x, dtype, *, blocksize=64, recipe=(), note="", check="quantize", out_dtype=None,
        blocksize2=None) -> Inputs:  # fmt: skip
    """torchao-shaped quantization inputs: NF4, double quant, x (float64) of whole groups of
    ``blocksize2`` blocks (torchao's scaler_block_size, 256 unless given)."""
    assert x.size % (blocksize * (blocksize2 or _AO_GROUP)) == 0 and x.ndim <= 2, x.shape
    return _q(x, dtype, blocksize=blocksize, double_quant=True, recipe=recipe, note=note, check=check,
              out_dtype=out_dtype, blocksize2=blocksize2)  # fmt: skip


def _sparse_negative_scales(dtype, rng):
    """A sparse weight (5% of 128 x 128 nonzero, N(0, 0.05); blocksize 32, double quantization) in which
    the scale of some nonzero block rebuilds below zero, in the canonical rules and in torchao's
    (benchmarks/sparse_scales.py): those blocks dequantize with their signs flipped, and torchao's
    all-zero blocks to -scale. The first of the generator's draws where both dialects flip a nonzero
    block is the case."""
    from reflora import double_quant

    for _ in range(100):
        x = rng.standard_normal(128 * 128) * 0.05 * (rng.random(128 * 128) < 0.05)
        inputs = _ao(x.reshape(128, 128), dtype, blocksize=32, check="dequantize",
                     note="sparse: some double-quantized block scales rebuild below zero")  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", double_quant.NegativeScaleWarning)
            canonical = nf4.quantize(inputs["x"], 32, double_quant=True)
        ao = torchao_nf4.quantize(inputs["x"], 32)
        nonzero = np.abs(inputs["x"].astype(np.float32)).reshape(-1, 32).max(1) > 0
        if ((nf4.block_scales(canonical) < 0) & nonzero).any() and ((ao.scales() < 0) & nonzero).any():
            return inputs
    raise AssertionError(f"no sparse weight with negative rebuilt scales in 100 draws ({dtype})")


def _ao_ties(dtype, rng):
    """Every block holds the midpoints of torchao's own table (its 4-decimal NF4 values in T) that T
    holds exactly, times a power-of-two absmax, so T(x / absmax) is the midpoint and rule 4's argmin
    ties: torchao takes the first (lower) index."""
    table = torchao_nf4.codebook(dtype).astype(np.float64)
    mid = (table[:-1] + table[1:]) / 2  # (15,), exact in float64
    mid = mid[_cast(mid, dtype).astype(np.float64) == mid]
    blocks = []
    for b in range(_AO_GROUP):
        a = 2.0 ** [0, -3, 2, -6][b % 4]
        block = np.roll(np.resize(mid, 64), b) * a
        block[rng.integers(0, 64)] = a * rng.choice([-1.0, 1.0])
        blocks.append(block)
    return _ao(np.concatenate(blocks).reshape(128, 128), dtype,
               note=f"x/absmax exactly at {mid.size} midpoints of torchao's table in {dtype}")  # fmt: skip


def _ao_zero_block(dtype, rng):
    x = _normal(rng, _AO_GROUP * 64)
    x[64:128] = 0.0
    x[64:128:3] = -0.0
    return _ao(x.reshape(128, 128), dtype, note="block 1 of 256 holds only +0.0 and -0.0 (0/0 in torchao)")


def _ao_subnormal(dtype, rng):
    tiny = float(ml_dtypes.finfo(as_dtype(dtype)).smallest_normal)
    x = rng.uniform(-tiny, tiny, _AO_GROUP * 64)
    x[64:] *= 2.0**12  # block 0 subnormal, the other 255 small normal numbers
    return _ao(x.reshape(128, 128), dtype, note="block 0 of 256 entirely subnormal (its absmax too)")


def _ao_large_block(dtype, rng):
    x = _normal(rng, _AO_GROUP * 4096, 0.02).reshape(_AO_GROUP, 4096)
    x[::3, -1] = 1.0  # every third block's absmax in its last element
    return _ao(x.reshape(1024, 1024), dtype, blocksize=4096,
               note="256 blocks of 4096, every third one's absmax in its last element")  # fmt: skip


def _ao_case(shape: tuple[int, int], scale: float = 1.0, **kw):
    def build(dtype, rng):
        return _ao(_normal(rng, math.prod(shape), scale).reshape(shape), dtype, **kw)

    return build


def _tie_cases() -> list[Case]:
    cases = []
    for quant_type in ("nf4", "fp4"):
        book = codebooks.get(quant_type)
        distinct = np.unique(book.values)
        for i, m in enumerate(book.thresholds):
            dtypes = tuple(d for d in ALL if float(_cast(m, d)) == m)
            if not dtypes:
                continue
            lo, hi = (int(np.flatnonzero(book.values == v)[0]) for v in distinct[i : i + 2])
            name = f"{quant_type} x exactly at threshold {lo}|{hi}"
            cases.append(
                Case("quantize_4bit", name, "quantize", _exact_ties(quant_type, i, float(m)), dtypes)
            )
    return cases


# ---- LoRA ----------------------------------------------------------------------------------------------


def _positive(rng, shape, scale, dt) -> np.ndarray:
    """Values in [scale/2, scale] of dtype dt: sums of them never cancel."""
    return round_to(rng.uniform(0.5, 1.0, shape) * scale, dt)


def _lora(op, n_in, out, r, lead=(3,), *, alpha=16.0, rslora=False, bias=False, p=None, fan=False,
          zero_B=False, views=(), check=None, mask_zero=False, blocksize=64, quant_type="nf4",
          double_quant=False, positive=False, base_dtype=None, tiny=False, recipes=None,
          blocksize2=None):  # fmt: skip
    """A LoRA/QLoRA case builder: shapes, scaling and options; values from the case's generator
    (all positive with ``positive``; every value of the "tiny" family's "normal products" level with
    ``tiny``); a QLoRA base W in ``base_dtype`` instead of the case's dtype. ``views``: the operands
    handed over transposed; ``recipes``: other views by operand name (:mod:`.bundle`)."""

    def recipe(name: str, a: np.ndarray) -> tuple:
        if recipes and name in recipes:
            return recipes[name]
        return (("T",),) if name in views and a.ndim > 1 else ()

    def build(dtype, rng):
        def values(family, shape, scale, dt):
            if tiny:
                return lora_values("tiny", rng, shape, scale, dt, TINY_LEVELS[1])
            return lora_values(family, rng, shape, scale, dt)

        dt = as_dtype(dtype)
        w_dt = as_dtype(base_dtype or dtype)
        if positive:
            x = _positive(rng, (*lead, n_in), 1.0, dt)
            W = _positive(rng, (out, n_in), 1 / math.sqrt(n_in), w_dt)
            A = _positive(rng, (r, n_in), 1 / math.sqrt(n_in), dt)
            B = _positive(rng, (out, r), 1e-3, dt)  # s·x Aᵀ Bᵀ about 1% of x Wᵀ: the base path dominates
        else:
            x = values("normal", (*lead, n_in), 1.0, dt)
            W = values("normal", (out, n_in), 1 / math.sqrt(n_in), w_dt)
            A = values("uniform", (r, n_in), 1 / math.sqrt(n_in), dt)
            B = np.zeros((out, r), dtype=dt) if zero_B else values("normal", (out, r), 0.1, dt)
        params = {"in": n_in, "out": out, "r": r, "alpha": alpha, "rslora": rslora,
                  "scaling": lora.scaling(alpha, r, rslora), "seed": 0}  # fmt: skip
        inputs = Inputs("", op, check or op, dtype, params=params)
        if op == "lora_merge":
            params["fan_in_fan_out"] = fan
            W = W.T.copy() if fan else W
            inputs.put("W", W, recipe("W", W))
        else:
            inputs.put("x", x, recipe("x", x))
            inputs.put("W", W, recipe("W", W))
        inputs.put("A", A, recipe("A", A))
        inputs.put("B", B, recipe("B", B))
        if bias:
            inputs.put("bias", values("normal", (out,), 1.0, dt))
        if p is not None or mask_zero:
            keep = np.zeros(x.shape, dtype=bool) if mask_zero else rng.random(x.shape) >= p
            inputs.put("dropout_mask", round_to(keep / (1 - (p or 0.0)), dt))
        if op.endswith("backward"):
            grad_y = values("normal", (*lead, out), 1.0, dt)
            inputs.put("grad_y", grad_y, recipe("grad_y", grad_y))
        if op.startswith("qlora"):
            params.update(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
            if blocksize2 is not None:
                params["blocksize2"] = blocksize2
            if base_dtype is not None:
                params["base_dtype"] = base_dtype
        return inputs

    return build


def _one_hot(op: str, n_in: int, out: int):
    """A QLoRA case whose result *is* the dequantized base: one-hot rows (x = I for the forward, y = Ŵᵀ;
    grad_y = I for the backward, grad_x = Ŵ) and B = 0, so each output is one product by 1 and its
    bound is the output's declared roundings, with nothing from a long accumulation. A kernel that
    forms Ŵ another way (a 16-bit product of code and scale) is off by up to two ulps of it, which the
    bound of a random sum hides: tests/mutants' QLoRABackwardBase16Bit (declaring unfused float32
    accumulation) fails here in float16, and in no random float16 test of the state's own dtype."""
    forward = op.endswith("forward")
    build = _lora(op, n_in, out, 4, lead=(n_in if forward else out,), zero_B=True, double_quant=True,
                  blocksize=32)  # fmt: skip

    def one_hot(dtype, rng):
        inputs = build(dtype, rng)
        name = "x" if forward else "grad_y"
        inputs.put(name, np.eye(*inputs[name].shape).astype(as_dtype(dtype)))
        inputs.note = f"{name} = I and B = 0: the result is the dequantized base itself"
        return inputs

    return one_hot


def _broken(build: Callable, name: str, axis: int, *, state_1d: bool = False):
    """A valid case with operand ``name`` grown by one along ``axis``: the op must raise."""

    def broken(dtype, rng):
        inputs = build(dtype, rng)
        inputs.check = "rejects"
        if state_1d:
            inputs.params["state_1d"] = True
            inputs.note = "the state is 1-D, not a (out, in) weight"
            return inputs
        a = inputs[name]
        inputs.views.pop(name, None)
        inputs.put(name, np.concatenate([a, np.take(a, [0], axis=axis)], axis=axis))
        inputs.note = f"{name} has shape {inputs[name].shape}"
        return inputs

    return broken


def _lora_cases(op: str) -> list[Case]:
    forward = op.endswith("forward")
    cases = [
        Case(op, "rank 1", op, _lora(op, 24, 10, 1)),
        Case(op, "one row", op, _lora(op, 24, 10, 4, lead=(1,))),
        Case(op, "odd and prime dimensions", op, _lora(op, 31, 17, 5, lead=(11,))),
        Case(op, "3-D x", op, _lora(op, 16, 9, 3, lead=(2, 5))),
        Case(op, "rsLoRA scaling", op, _lora(op, 24, 10, 8, alpha=16.0, rslora=True)),
        Case(op, "dropout p=0.5", op, _lora(op, 24, 10, 4, p=0.5)),
        Case(op, "B = 0 (fresh adapter)", op, _lora(op, 24, 10, 4, zero_B=True)),
    ]
    # Products of three values at 2**20 float32 smallest normals: normal numbers throughout, but far
    # below any random family's. A backend that declares flush_to_zero is held to them, where the
    # tiny family's first level (products down in the subnormal range) holds it to nothing in grad_A
    # and grad_B; float16 has no such values.
    tiny = _lora(op, 64, 40, 4, lead=(8,), tiny=True)
    cases.append(Case(op, "tiny values, products normal in float32", op, tiny, ("bfloat16", "float32")))
    # Shapes and layouts a kernel may get wrong outside its usual tiles: a fourth dimension of x (a grid
    # sized from two leading dims), x and the adapters as slices of wider buffers (unit stride, rows
    # further apart than their length) and every other row of a matrix.
    padded = {"x": (("pad", 3, 5),), "A": (("pad", 1, 3),), "B": (("step", 0, 2),), "W": (("pad", 1, 7),)}
    cases += [
        Case(op, "4-D x", op, _lora(op, 16, 9, 3, lead=(2, 3, 2))),
        Case(
            op,
            # a QLoRA base reaches the backend as a state, whatever the view of W
            "row-padded x and A, every other row of B"
            if op.startswith("qlora")
            else "row-padded x, W and A, every other row of B",
            op,
            _lora(op, 24, 10, 4, lead=(2, 3, 2), recipes=padded),
        ),
    ]
    if not forward:
        # autograd hands a backward gradients in the layout the next op made: often transposed
        cases.append(Case(op, "transposed grad_y, A and B", op,
                          _lora(op, 24, 10, 4, lead=(7,), views=("grad_y", "A", "B"))))  # fmt: skip
        # the weight gradients reduce over rows: more rows than any fixed grid of row tiles
        cases.append(Case(op, "4099 rows", op, _lora(op, 8, 8, 2, lead=(4099,))))
        # grad_x reduces over out: a long one that is not a multiple of any tile
        cases.append(Case(op, "out 1031 (prime)", op, _lora(op, 8, 1031, 2, lead=(2,))))
    else:
        # a long reduction over in that is not a multiple of any tile or split
        cases.append(Case(op, "in 1031 (prime)", op, _lora(op, 1031, 8, 4, lead=(4,))))
    if not op.startswith("qlora"):
        cases += [
            Case(op, "rank 256", op, _lora(op, 16, 8, 256, lead=(4,))),
            Case(op, "transposed x and W", op, _lora(op, 24, 10, 4, lead=(7,), views=("x", "W"))),
        ]
    else:  # more than one 64-wide tile of rank
        cases.append(Case(op, "rank 65", op, _lora(op, 24, 10, 65, lead=(4,))))
    if forward:
        # A long sum that does not cancel: random draws keep in <= 512 and signed values, whose error
        # is far below the bound. Here x, W, A and B are all positive and in = 4096, so the bound is
        # close to the worst case and 16-bit accumulation, or split-K partial sums combined in 16 bits,
        # exceeds it (in bfloat16: by 107x, and by 3.2x for 64-wide chunks; tests/test_bounds.py). Four
        # rows and eight outputs keep it cheap under TRITON_INTERPRET=1 (about 2.5 s a dtype).
        cases.append(
            Case(
                op,
                "in 4096, all positive (no cancellation)",
                op,
                _lora(op, 4096, 8, 4, lead=(4,), positive=True),
            )
        )
        cases += [
            Case(op, "x 1-D", op, _lora(op, 24, 10, 4, lead=())),
            Case(op, "bias", op, _lora(op, 24, 10, 4, bias=True)),
            Case(op, "dropout mask all zero", op, _lora(op, 24, 10, 4, mask_zero=True)),
            Case(op, "negative scaling", op, _lora(op, 24, 10, 4, alpha=-8.0)),
        ]
    if op.startswith("qlora"):
        cases += [
            Case(op, "double-quantized base", op, _lora(op, 64, 40, 4, double_quant=True, blocksize=32)),
            # 192 blocks of 32 in two groups of 128 block scales (a group size other than bitsandbytes')
            Case(
                op,
                "double-quantized base in groups of 128",
                op,
                _lora(op, 96, 64, 4, double_quant=True, blocksize=32, blocksize2=128),
            ),
            Case(op, "fp4 base", op, _lora(op, 24, 10, 4, quant_type="fp4")),
            Case(op, "ragged blocks", op, _lora(op, 13, 11, 3, blocksize=64)),
            Case(op, "blocksize 4096 base", op, _lora(op, 96, 50, 4, blocksize=4096)),
            # W (2, 1) packs into one byte: the corner of bitsandbytes' single-row transpose shim
            Case(op, "2-element base weight (one packed byte)", op, _lora(op, 1, 2, 1, lead=(1,))),
            Case(op, "one-hot rows, B = 0: the result is the dequantized base", op, _one_hot(op, 64, 40)),
        ]
    if op.startswith("qlora"):
        # A base torchao quantizes (256 blocks of 64, double-quantized); the cases above fall outside
        # its shapes, and the suite reports them rejected for a torchao-dialect backend (no state to hand it).
        ao = _lora(op, 128, 128, 8, lead=(2, 5), bias=forward, p=0.1, views=("x",), double_quant=True)
        cases.append(Case(op, "3-D transposed x, mask, torchao-shaped base", op, ao))
        grouped = _lora(op, 128, 128, 4, double_quant=True, blocksize2=128)  # 2 groups of 128 blocks
        cases.append(Case(op, "torchao-shaped base in groups of 128", op, grouped))
        cases.append(Case(op, "x does not fit the state, torchao-shaped -> error", "rejects",
                          _broken(ao, "x", -1)))  # fmt: skip
        cases.append(Case(op, "1-D state, torchao-shaped -> error", "rejects",
                          _broken(ao, "W", 0, state_1d=True)))  # fmt: skip
        # The state's dtype differs from the activations' (a model loaded in one dtype, computed in
        # another): Ŵ is dequantized in the state's dtype and then rounded to the activations'.
        for base_dtype in ("bfloat16", "float16", "float32"):
            mixed = _lora(op, 128, 128, 4, lead=(3,), double_quant=True, base_dtype=base_dtype)
            cases.append(Case(op, f"base weight in {base_dtype}, torchao-shaped", op, mixed,
                              tuple(d for d in ALL if d != base_dtype)))  # fmt: skip
        if forward:
            positive = _lora(op, 4096, 4, 4, lead=(4,), positive=True, double_quant=True)
            cases.append(Case(op, "in 4096, all positive, torchao-shaped base", op, positive))
        else:
            cases.append(Case(op, "grad_y does not fit, torchao-shaped -> error", "rejects",
                              _broken(ao, "grad_y", -1)))  # fmt: skip
    base = _lora(op, 24, 10, 4, bias=forward and not op.startswith("qlora"), p=0.1)
    bad = [("A", -1, "A does not fit W"), ("B", 0, "B does not fit W"), ("x", -1, "x does not fit W")]
    if op.startswith("qlora"):
        bad = [("A", -1, "A does not fit the state"), ("x", -1, "x does not fit the state")]
        cases.append(Case(op, "1-D state -> error", "rejects", _broken(base, "W", 0, state_1d=True)))
    if forward and not op.startswith("qlora"):
        bad.append(("bias", -1, "bias does not fit -> error"))
    if not forward:
        bad.append(("grad_y", -1, "grad_y does not fit"))
    bad.append(("dropout_mask", -1, "dropout mask does not fit"))
    for name, axis, text in bad:
        title = text if text.endswith("-> error") else f"{text} -> error"
        cases.append(Case(op, title, "rejects", _broken(base, name, axis)))
    return cases


def _merge_cases() -> list[Case]:
    op = "lora_merge"

    def tiny_delta(dtype, rng):
        inputs = _lora(op, 24, 10, 4)(dtype, rng)
        inputs.put("B", (inputs["B"].astype(np.float64) * 2.0**-14).astype(inputs["B"].dtype))
        inputs.note = "ΔW far below half an ulp of W: W' = W"
        return inputs

    base = _lora(op, 24, 10, 4)
    return [
        Case(op, "fan_in_fan_out", op, _lora(op, 24, 10, 4, fan=True)),
        Case(op, "fan_in_fan_out, square W", op, _lora(op, 12, 12, 4, fan=True)),
        Case(op, "rank 1", op, _lora(op, 24, 10, 1)),
        Case(op, "rank 65", op, _lora(op, 24, 10, 65)),
        Case(op, "odd and prime dimensions", op, _lora(op, 31, 17, 5)),
        Case(op, "rsLoRA scaling", op, _lora(op, 24, 10, 8, rslora=True)),
        Case(
            op,
            "row-padded W, transposed A, every other row of B",
            op,
            _lora(op, 24, 10, 4, recipes={"W": (("pad", 1, 5),), "A": (("T",),), "B": (("step", 0, 2),)}),
        ),
        Case(op, "B = 0 (W unchanged)", op, _lora(op, 24, 10, 4, zero_B=True)),
        Case(op, "transposed W", op, _lora(op, 24, 10, 4, views=("W",))),
        Case(op, "tiny delta", op, tiny_delta),
        Case(op, "W does not fit B A -> error", "rejects", _broken(base, "W", 0)),
        Case(op, "A does not fit B -> error", "rejects", _broken(base, "A", 0)),
    ]


CASES: tuple[Case, ...] = (
    # quantize_4bit: the canonical rules' corners
    Case("quantize_4bit", "one element", "quantize", _q_case(lambda rng: [0.7])),
    Case("quantize_4bit", "one row", "quantize", _q_case(lambda rng: _normal(rng, 100).reshape(1, 100))),
    Case("quantize_4bit", "odd n", "quantize",
         _q_case(lambda rng: _normal(rng, 65), note="the last low nibble pads")),
    Case("quantize_4bit", "ragged tail", "quantize", _ragged),
    Case("quantize_4bit", "ragged tail of one element", "quantize",
         _q_case(lambda rng: _normal(rng, 2 * 64 + 1))),
    Case("quantize_4bit", "all-zero block", "quantize", _zero_block),
    Case("quantize_4bit", "all-zero tail", "quantize", _zero_tail),
    Case("quantize_4bit", "all zeros", "quantize", _q_case(lambda rng: np.zeros((3, 70)))),
    Case("quantize_4bit", "constant blocks", "quantize", _constant),
    *_tie_cases(),
    Case("quantize_4bit", "nf4 x within 2 ulps of every threshold", "quantize", _near_thresholds("nf4")),
    Case("quantize_4bit", "fp4 x within 2 ulps of every threshold", "quantize", _near_thresholds("fp4")),
    Case("quantize_4bit", "fp4 small values take the zero code", "quantize", _fp4_small),
    Case("quantize_4bit", "subnormal block", "quantize", _subnormal),
    Case("quantize_4bit", "near overflow", "quantize", _near_overflow),
    Case("quantize_4bit", "blocksize 32", "quantize",
         _q_case(lambda rng: _normal(rng, 5 * 32 + 3), blocksize=32)),
    Case("quantize_4bit", "blocksize 4096, absmax in the last element", "quantize", _large_block),
    Case("quantize_4bit", "blocksize 2048, ragged", "quantize",
         _q_case(lambda rng: _normal(rng, 2 * 2048 + 1000), blocksize=2048)),
    Case("quantize_4bit", "transposed view", "quantize",
         _q_case(lambda rng: _normal(rng, 37 * 20).reshape(37, 20), recipe=(("T",),))),
    Case("quantize_4bit", "strided view, NaN in the skipped memory", "quantize",
         _q_case(lambda rng: _normal(rng, 30 * 50).reshape(30, 50), recipe=(("step", 1, 3),))),
    Case("quantize_4bit", "row-padded view, NaN in the padding", "quantize",
         _q_case(lambda rng: _normal(rng, 20 * 40).reshape(20, 40), recipe=(("pad", 1, 9),))),
    Case("quantize_4bit", "every other row, NaN between", "quantize",
         _q_case(lambda rng: _normal(rng, 21 * 40).reshape(21, 40), recipe=(("step", 0, 2),))),
    Case("quantize_4bit", "3-D input", "quantize",
         _q_case(lambda rng: _normal(rng, 105).reshape(3, 5, 7), blocksize=32)),
    Case("quantize_4bit", "double quant, one block", "quantize",
         _q_case(lambda rng: _normal(rng, 50), double_quant=True)),
    Case("quantize_4bit", "double quant, 257 blocks", "quantize",
         _q_case(lambda rng: _normal(rng, 257 * 32), blocksize=32, double_quant=True)),
    Case("quantize_4bit", "double quant, equal absmax", "quantize",
         _q_case(lambda rng: np.tile(np.r_[1.0, np.linspace(-0.5, 0.5, 63)], 10), double_quant=True)),
    Case("quantize_4bit", "double quant, 600 blocks of mixed scales", "quantize",
         _q_case(_mixed_scales,
                 blocksize=32, double_quant=True)),
    # quantize_4bit: corners above in shapes torchao takes (it rejects the others)
    Case("quantize_4bit", "torchao nf4 x exactly at its midpoints, torchao-shaped", "quantize", _ao_ties),
    Case("quantize_4bit", "all-zero block, torchao-shaped", "quantize", _ao_zero_block),
    Case("quantize_4bit", "subnormal block, torchao-shaped", "quantize", _ao_subnormal),
    Case("quantize_4bit", "transposed view, torchao-shaped", "quantize",
         _ao_case((256, 64), recipe=(("T",),))),
    Case("quantize_4bit", "strided view, NaN in the skipped memory, torchao-shaped", "quantize",
         _ao_case((128, 128), recipe=(("step", 1, 3),))),
    Case("quantize_4bit", "row-padded view, NaN in the padding, torchao-shaped", "quantize",
         _ao_case((128, 128), recipe=(("pad", 1, 8),))),
    Case("quantize_4bit", "blocksize 128, torchao-shaped", "quantize", _ao_case((128, 256), blocksize=128)),
    Case("quantize_4bit", "blocksize 4096, absmax in the last element, torchao-shaped", "quantize",
         _ao_large_block),
    # quantize_4bit: bad input
    Case("quantize_4bit", "NaN weight -> error", "rejects", _nonfinite("nan")),
    Case("quantize_4bit", "+inf weight -> error", "rejects", _nonfinite("inf")),
    Case("quantize_4bit", "-inf weight -> error", "rejects", _nonfinite("-inf")),
    Case("quantize_4bit", "NaN in a transposed view -> error", "rejects", _nonfinite("nan", (("T",),))),
    Case("quantize_4bit", "NaN weight, double quant, 128 x 128 -> error", "rejects",
         _nonfinite_accepted_shape),
    # dequantize_4bit
    Case("dequantize_4bit", "all-zero block -> +0.0", "dequantize", lambda d, rng: _q(
        np.r_[np.zeros(64), _normal(rng, 64)], d, check="dequantize")),
    Case("dequantize_4bit", "odd n", "dequantize",
         lambda d, rng: _q(_normal(rng, 65), d, check="dequantize")),
    Case("dequantize_4bit", "ragged tail", "dequantize", lambda d, rng: _q(_normal(rng, 3 * 64 + 17), d,
                                                                           check="dequantize")),
    Case("dequantize_4bit", "double quant, 600 blocks", "dequantize",
         lambda d, rng: _q(_mixed_scales(rng), d, blocksize=32, double_quant=True, check="dequantize")),
    # A state may group its block scales other than by 256 (reflora.nf4.quantize's blocksize2; torchao's
    # scaler_block_size): the rebuild must read the state's group size.
    *(Case("dequantize_4bit", f"double quant, 600 blocks in groups of {b2}", "dequantize",
           lambda d, rng, b2=b2: _q(_mixed_scales(rng), d, blocksize=32, double_quant=True,
                                    check="dequantize", blocksize2=b2))
      for b2 in (128, 64)),
    # The same in a shape torchao takes (256 blocks of 64), for its scaler_block_size other than 256
    *(Case("dequantize_4bit", f"double quant in groups of {b2}, torchao-shaped", "dequantize",
           lambda d, rng, b2=b2: _ao(_mixed_scales(rng, 256, 64).reshape(128, 128), d, check="dequantize",
                                     blocksize2=b2))
      for b2 in (128, 64)),
    Case("dequantize_4bit", "output float16", "dequantize",
         lambda d, rng: _q(_normal(rng, 3 * 64, 3.0), d, out_dtype="float16", check="dequantize")),
    Case("dequantize_4bit", "output bfloat16", "dequantize",
         lambda d, rng: _q(_normal(rng, 3 * 64, 3.0), d, out_dtype="bfloat16", check="dequantize")),
    # One multiply in float32, then the conversion: past the output dtype's largest finite value it
    # overflows to inf (round to nearest), which a saturating conversion would turn into the maximum.
    Case("dequantize_4bit", "output float16 past its largest -> inf", "dequantize",
         lambda d, rng: _q(_normal(rng, 2 * 64, 3e4), d, out_dtype="float16", check="dequantize"),
         ("float32",)),
    Case("dequantize_4bit", "output bfloat16 past its largest -> inf", "dequantize",
         lambda d, rng: _q(np.r_[np.finfo(np.float32).max, _normal(rng, 63, 1e37)], d, out_dtype="bfloat16",
                           check="dequantize"), ("float32",)),
    Case("dequantize_4bit", "subnormal float16 outputs", "dequantize",
         lambda d, rng: _q(_normal(rng, 2 * 64, 2e-5), d, out_dtype="float16", check="dequantize")),
    Case("dequantize_4bit", "blocksize 4096", "dequantize",
         lambda d, rng: _q(family_values("mixed", rng, 2 * 4096 + 9, d, 4096, "nf4").astype(np.float64), d,
                           blocksize=4096, check="dequantize")),
    Case("dequantize_4bit", "3-D state of 2 elements", "dequantize",
         lambda d, rng: _q(_normal(rng, 2).reshape(2, 1, 1), d, check="dequantize")),
    # dequantize_4bit, torchao-shaped: its NF4Tensor.to(dtype), the conversion linear_nf4 makes
    *(Case("dequantize_4bit", f"output {out}, torchao-shaped", "dequantize",
           _ao_case((128, 128), 3.0, check="dequantize", out_dtype=out))
      for out in ("float16", "bfloat16", "float32")),
    Case("dequantize_4bit", "sparse weight, scales rebuilt below zero, torchao-shaped", "dequantize",
         _sparse_negative_scales),
    Case("dequantize_4bit", "own state round trip, near overflow, finite", "roundtrip",
         _near_overflow_roundtrip),
    Case("dequantize_4bit", "own state round trip, double quant, ragged", "roundtrip",
         lambda d, rng: _q(_normal(rng, 300 * 32 + 5), d, blocksize=32, double_quant=True,
                           check="roundtrip")),
    # LoRA
    *_lora_cases("lora_forward"),
    *_lora_cases("lora_backward"),
    *_lora_cases("qlora_forward"),
    *_lora_cases("qlora_backward"),
    *_merge_cases(),
)  # fmt: skip


def cases_for(op: str | None = None) -> list[tuple[Case, str]]:
    """(case, dtype) for every test the cases make (of one op if given), in the order of :data:`CASES`."""
    return [(c, d) for c in CASES if op in (None, c.op) for d in c.dtypes]


def build(case: Case, dtype: str, test_id: str) -> Inputs:
    """The inputs of ``case`` in ``dtype``, labelled with ``test_id``."""
    inputs = case.build(dtype, _rng(case.name, dtype))
    inputs.test_id, inputs.op, inputs.check = test_id, case.op, case.check
    return inputs
