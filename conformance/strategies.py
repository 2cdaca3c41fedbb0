"""Every hypothesis strategy of the suite, in one module; every draw labelled; sizes capped by the profile.

A property receives hypothesis' ``data`` object and calls one ``draw_*`` function below, which returns
the :class:`reflora.conformance.bundle.Inputs` of one example. Each draw carries a label, so a failure
prints as ``Draw 3 (blocksize): 4096`` and a reader sees which choice mattered.

Structure is drawn by hypothesis (shapes, blocksizes, dtypes, views, ranks, the value family, flags)
and shrinks to the smallest failing case; the values themselves come from a numpy generator seeded by
a drawn integer (label ``seed``), which keeps large arrays fast to draw and still reproducible.

Sizes: no drawn array holds more than ``profile.max_elements`` elements and no rank exceeds
``profile.max_rank`` (:mod:`reflora.conformance.profiles`).

What is drawn:

* shapes: one element, one row, ragged last blocks, odd n, primes, 1-D to 3-D, up to the cap;
* views: contiguous, transposed, strided (every k-th element), both; the backend gets the view itself,
  and the memory it skips holds NaN;
* blocksizes 32 ... 4096; quant_type nf4 / fp4; double quantization on or off;
* value families (:data:`FAMILIES`): normal, uniform, heavy-tailed, outliers, constant blocks, all-zero
  blocks (with -0.0), values exactly on the code thresholds and a few ulps either side, subnormals,
  near-overflow, and a per-block mixture of all of them;
* LoRA: dimensions (1, primes, powers of two and their neighbours, anything up to the cap), ranks
  1 ... max_rank, alpha and rsLoRA scaling, bias, dropout masks (0 or 1/(1-p), rounded to the dtype),
  ``fan_in_fan_out``, and a broken operand for the bad-input properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from reflora import codebooks, lora
from reflora.backends.protocol import DTYPES
from reflora.bounds import round_to
from reflora.conformance.bundle import Inputs
from reflora.conformance.profiles import Profile
from reflora.dtypes import as_dtype
from reflora.state import BLOCKSIZES

__all__ = [
    "FAMILIES",
    "INPUT_RULES",
    "LORA_FAMILIES",
    "InputRules",
    "draw_bad_lora",
    "draw_bad_quantize",
    "draw_lora",
    "draw_qlora",
    "draw_quantize",
    "family_values",
    "lora_values",
]

FAMILIES = (
    "normal",
    "uniform",
    "heavy-tailed",
    "outliers",
    "constant blocks",
    "zero blocks",
    "thresholds",
    "subnormal",
    "near overflow",
    "mixed",
)
LORA_FAMILIES = ("normal", "uniform", "heavy-tailed", "wide range", "sparse", "tiny")
B_SCALES = (0.1, 1e-2, 1e-3, 1e-4)  # B's typical magnitude (the "tiny" family has its own)
# Where the "tiny" family puts a product of three values (lora_values); the second is drawn only for
# bfloat16 and float32, whose range float32 accumulation shares (label "tiny level").
TINY_LEVELS = ("subnormal products", "normal products")
SPECIAL_DIMS = (1, 2, 3, 5, 7, 8, 13, 16, 31, 63, 64, 65, 97, 127, 128, 257)
SEEDS = st.integers(0, 2**32 - 1)


@dataclass(frozen=True)
class InputRules:
    """What a dialect accepts, so that about half the quantize draws are inputs it quantizes (the rest
    check that the backend rejects what its dialect rejects) and every QLoRA base is one it quantizes.
    granule_blocks: numel must be a multiple of blocksize * granule_blocks."""

    quant_types: tuple[str, ...] = ("nf4", "fp4")
    double_quant: tuple[bool, ...] = (False, True)
    max_ndim: int = 3
    granule_blocks: int = 0  # numel a multiple of blocksize * granule_blocks (0: no constraint)


# torchao's NF4Tensor: NF4 only, always double-quantized, at most 2-D, numel a multiple of
# blocksize * 256 (reflora/dialects/torchao_nf4.py, rule 1).
INPUT_RULES: dict[str, InputRules] = {
    "torchao": InputRules(quant_types=("nf4",), double_quant=(True,), max_ndim=2, granule_blocks=256),
}


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _step_ulps(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """x with its magnitude moved by k ulps of its own dtype (sign kept; never below zero)."""
    bits_type = {2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    sign = np.array(1 << (8 * x.dtype.itemsize - 1), dtype=np.int64)
    bits = x.view(bits_type).astype(np.int64)
    magnitude = np.clip((bits & (sign - 1)) + k, 0, None)
    return ((bits & sign) | magnitude).astype(bits_type).view(x.dtype)


def _finite(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """v (float64) rounded once to dtype, clipped first so that nothing becomes inf."""
    big = float(ml_dtypes.finfo(dtype).max)
    return round_to(np.clip(v, -big, big), dtype)


def family_values(family: str, rng: np.random.Generator, n: int, dtype, blocksize: int, quant_type: str):
    """n values of ``dtype`` (flat) from one value family; every value finite."""
    dtype = as_dtype(dtype)
    fi = ml_dtypes.finfo(dtype)
    n_blocks = math.ceil(n / blocksize)
    if family == "mixed":
        parts = [
            family_values(rng.choice(FAMILIES[:-1]), rng, min(blocksize, n - b * blocksize), dtype, blocksize,
                          quant_type)
            for b in range(n_blocks)
        ]  # fmt: skip
        return np.concatenate(parts)
    scale = float(rng.choice([0.02, 1.0, 300.0]))
    if family == "normal":
        v = rng.standard_normal(n) * scale
    elif family == "uniform":
        v = rng.uniform(-scale, scale, n)
    elif family == "heavy-tailed":
        v = rng.standard_t(1.5, n) * scale
    elif family == "outliers":
        v = rng.standard_normal(n) * 0.02
        hit = rng.choice(n, size=max(1, n // 97), replace=False)
        v[hit] *= rng.choice([50.0, 1000.0], size=hit.size)
    elif family == "constant blocks":
        v = np.repeat(rng.standard_normal(n_blocks) * scale, blocksize)[:n]
    elif family == "zero blocks":
        v = rng.standard_normal(n) * scale
        zero = np.repeat(rng.random(n_blocks) < 0.4, blocksize)[:n]
        v[zero] = np.where(rng.random(int(zero.sum())) < 0.5, 0.0, -0.0)  # -0.0 is a zero too
        v[rng.random(n) < 0.05] = 0.0
    elif family == "thresholds":
        return _threshold_values(rng, n, dtype, blocksize, quant_type)
    elif family == "subnormal":
        tiny = float(fi.smallest_normal)
        v = rng.uniform(-tiny, tiny, n)
        normal_blocks = np.repeat(rng.random(n_blocks) < 0.3, blocksize)[:n]
        v[normal_blocks] *= 2.0 ** rng.integers(1, 30, int(normal_blocks.sum()))
    elif family == "near overflow":
        big = float(fi.max)
        v = rng.uniform(-big, big, n)
        v[rng.random(n) < 0.1] = big * rng.choice([-1.0, 1.0])
    else:
        raise ValueError(f"unknown value family {family!r}")
    return _finite(v, dtype)


def _threshold_values(rng: np.random.Generator, n: int, dtype: np.dtype, blocksize: int, quant_type: str):
    """Each block: one element ±A (so the block's absmax is A) and the others at m·A for code
    thresholds m, rounded to dtype and moved by -2 ... +2 ulps: exactly on a threshold where m·A is
    representable (ties), on either side of it otherwise; some exactly on table values."""
    book = codebooks.get(quant_type)
    fi = ml_dtypes.finfo(dtype)
    n_blocks = math.ceil(n / blocksize)
    # A power of two keeps m·A exact for every dtype that can hold m; other A test rounded products.
    exponent = rng.integers(-6, 6, n_blocks).astype(np.float64)
    mantissa = np.where(rng.random(n_blocks) < 0.5, 1.0, rng.uniform(1.0, 2.0, n_blocks))
    A = round_to(np.ldexp(mantissa, exponent.astype(int)), dtype).astype(np.float64)
    A = np.maximum(A, float(fi.smallest_normal))
    a = np.repeat(A, blocksize)[:n]
    on_table = rng.random(n) < 0.15
    m = np.where(
        on_table,
        book.values[rng.integers(0, book.values.size, n)].astype(np.float64),
        book.thresholds[rng.integers(0, book.thresholds.size, n)],
    )
    x = round_to(m * a, dtype)
    x = _step_ulps(x, rng.choice([-2, -1, 0, 0, 0, 1, 2], size=n))
    starts = np.arange(n_blocks) * blocksize
    lengths = np.minimum(blocksize, n - starts)
    where = starts + (rng.random(n_blocks) * lengths).astype(int)  # the absmax element of each block
    x[where] = round_to(A * rng.choice([-1.0, 1.0], n_blocks), dtype)
    return x


VIEW_KINDS = ("contiguous", "transposed", "strided", "both", "row-padded", "every k-th row")


def _view_recipe(data, ndim: int, name: str) -> tuple:
    """A view of an array of ``ndim`` dims (:mod:`.bundle`): contiguous; transposed; every k-th element
    of a row ("strided"); both; rows of unit stride further apart than a row is long ("row-padded", a
    slice ``buf[..., :n]`` of a wider buffer: a kernel that takes unit stride for density reads the
    padding); every k-th row (a step along the first axis). NaN fills the memory the view skips."""
    kinds = ["contiguous", "strided"] if ndim == 1 else list(VIEW_KINDS)
    kind = data.draw(st.sampled_from(kinds), label=f"{name} view")
    if kind == "contiguous":
        return ()
    if kind == "row-padded":
        return (("pad", ndim - 1, data.draw(st.sampled_from([1, 3, 8]), label=f"{name} row padding")),)
    step = data.draw(st.sampled_from([2, 3]), label=f"{name} stride") if kind != "transposed" else 0
    if kind == "every k-th row":
        return (("step", 0, step),)
    recipe = [("T",)] if kind in ("transposed", "both") else []
    if step:
        recipe.append(("step", ndim - 1, step))
    return tuple(recipe)


def _quantize_shape(data, profile: Profile, blocksize: int, rules: InputRules) -> tuple[int, ...]:
    cap = profile.max_elements
    if rules.granule_blocks and data.draw(st.booleans(), label="shape the dialect accepts"):
        granule = blocksize * rules.granule_blocks
        n = granule * data.draw(st.integers(1, max(1, cap // granule)), label="granules")
    else:
        layout = data.draw(st.sampled_from(["blocks and a tail", "any n", "one element"]), label="layout")
        if layout == "one element":
            n = 1
        elif layout == "any n":
            n = data.draw(st.integers(1, cap), label="n")
        else:
            blocks = data.draw(st.integers(1, max(1, cap // blocksize)), label="full blocks")
            tail = data.draw(st.sampled_from([0, 1, 3, blocksize // 2 + 1, blocksize - 1]), label="tail")
            n = blocks * blocksize + tail if blocks * blocksize + tail <= cap else blocks * blocksize
    ndim = data.draw(st.integers(1, min(3, rules.max_ndim)), label="ndim")
    if ndim == 3 and n <= 2:
        # A 3-D state of <= 2 elements is pinned by dequantize_4bit[3-D state of 2 elements, *], where
        # bitsandbytes' failure is declared; drawn here it would fail, and so hide, the whole random test.
        ndim = 2
    shape = []
    rest = n
    for _ in range(ndim - 1):
        d = data.draw(st.sampled_from(_divisors(rest)), label="dim")
        shape.append(d)
        rest //= d
    return (*shape, rest)


def draw_quantize(data, test_id: str, check: str, dtype: str, profile: Profile, rules: InputRules) -> Inputs:
    """Inputs of quantize_4bit / dequantize_4bit: x (a view), blocksize, quant_type, double_quant
    (and for dequantize the output dtype)."""
    blocksize = data.draw(st.sampled_from(BLOCKSIZES), label="blocksize")
    quant_type = data.draw(st.sampled_from(rules.quant_types), label="quant_type")
    double_quant = data.draw(st.sampled_from(rules.double_quant), label="double_quant")
    shape = _quantize_shape(data, profile, blocksize, rules)
    family = data.draw(st.sampled_from(FAMILIES), label="values")
    seed = data.draw(SEEDS, label="seed")
    rng = np.random.default_rng(seed)
    x = family_values(family, rng, math.prod(shape), dtype, blocksize, quant_type).reshape(shape)
    params = {"blocksize": blocksize, "quant_type": quant_type, "double_quant": double_quant,
              "values": family, "seed": seed}  # fmt: skip
    if check == "dequantize":
        params["out_dtype"] = data.draw(
            st.sampled_from([None, "float32", "float16", "bfloat16"]), label="out dtype"
        )
    inputs = Inputs(test_id, test_id.split("[")[0], check, dtype, params=params)
    inputs.put("x", x, _view_recipe(data, x.ndim, "x"))
    return inputs


def draw_bad_quantize(
    data, test_id: str, dtype: str, profile: Profile, rules: InputRules | None = None
) -> Inputs:
    """A valid x with one non-finite element (NaN, +inf or -inf) at a drawn logical index; x of a shape
    the dialect takes (``rules``) in about half the draws, where its rejection is about the non-finite
    value (the others are reported as outside the dialect)."""
    inputs = draw_quantize(data, test_id, "rejects", dtype, profile, rules or InputRules())
    x = inputs["x"].copy()
    bad = data.draw(st.sampled_from(["nan", "inf", "-inf"]), label="bad value")
    flat = data.draw(st.integers(0, x.size - 1), label="bad index")
    index = np.unravel_index(flat, x.shape)
    x[index] = np.array(float(bad), dtype=x.dtype)
    inputs.put("x", x, inputs.views.get("x", ()))
    inputs.params.update(bad=bad, bad_index=[int(i) for i in index])
    inputs.note = f"x{list(map(int, index))} = {bad}"
    return inputs


# ---- LoRA --------------------------------------------------------------------------------------------


def _dim(data, hi: int, label: str) -> int:
    hi = max(1, hi)
    special = [d for d in SPECIAL_DIMS if d <= hi]
    return data.draw(st.one_of(st.sampled_from(special), st.integers(1, hi)), label=label)


def lora_values(
    family: str,
    rng: np.random.Generator,
    shape: tuple[int, ...],
    scale: float,
    dtype,
    level: str = TINY_LEVELS[0],
) -> np.ndarray:
    """Values of ``dtype`` and ``shape`` from a LoRA value family, typical magnitude ``scale`` (the
    "tiny" family ignores it and takes ``level``, one of :data:`TINY_LEVELS`, instead)."""
    dtype = as_dtype(dtype)
    n = math.prod(shape)
    if family == "normal":
        v = rng.standard_normal(n) * scale
    elif family == "uniform":
        v = rng.uniform(-scale, scale, n)
    elif family == "heavy-tailed":
        v = np.clip(rng.standard_t(2.0, n), -1e3, 1e3) * scale
    elif family == "wide range":
        v = rng.choice([-1.0, 1.0], n) * 2.0 ** rng.uniform(-12, 4, n) * scale
    elif family == "sparse":
        v = rng.standard_normal(n) * scale * (rng.random(n) < 0.2)
    elif family == "tiny":
        # Products of three such values (grad_A, grad_B, the low-rank path) land midway down the
        # subnormal range, at smallest_normal·2^(-mantissa bits/2); of two, above it. Values of 64·tiny
        # (as before) made float32's and bfloat16's three-factor products underflow far below the
        # bound's η terms: a backend returning zeros passed every grad_A and grad_B of this family.
        # "normal products": products of three at 2**20 smallest normals, normal in float32 too. At
        # the first level a backend that flushes subnormals (flush_to_zero, whose bound then allows an
        # error of (2K - 1) float32 smallest normals) is held to nothing in grad_A and grad_B: one that
        # returned them as zeros for such inputs passed (tests/mutants FlushingSkipsTinyGradients).
        # Here the values are still far below any other family's, and below float16's range.
        fi = ml_dtypes.finfo(dtype)
        tiny = float(fi.smallest_normal)
        if level not in TINY_LEVELS:
            raise ValueError(f"unknown tiny level {level!r}; one of {TINY_LEVELS}")
        product = tiny * 2.0 ** (-int(fi.nmant) / 2) if level == TINY_LEVELS[0] else tiny * 2.0**20
        v = rng.standard_normal(n) * product ** (1 / 3)
    else:
        raise ValueError(f"unknown LoRA value family {family!r}")
    return _finite(v, dtype).reshape(shape)


def _float32_range(dtype) -> bool:
    """Whether ``dtype`` has float32's exponent range (float32, bfloat16): the tiny family's second level."""
    return float(ml_dtypes.finfo(as_dtype(dtype)).smallest_normal) == float(np.finfo(np.float32).tiny)


def _lora_dims(data, profile: Profile, base: tuple[int, int] | None = None):
    """(in, out, r, x's leading dims); ``base`` fixes (out, in) instead of drawing them."""
    cap = profile.max_elements
    if base is None:
        n_in = _dim(data, min(512, cap // 2), "in")
        out = _dim(data, min(512, cap // n_in), "out")
    else:
        out, n_in = base
    rank = _dim(data, min(profile.max_rank, max(1, cap // (n_in + out))), "r")
    lead_ndim = data.draw(st.sampled_from([1, 0, 2, 3]), label="x leading dims")
    rows_cap = max(1, cap // max(n_in, out))
    if lead_ndim == 0:
        lead: tuple[int, ...] = ()
    elif lead_ndim == 1:
        lead = (_dim(data, rows_cap, "rows"),)
    else:
        # (batch, seq), or (batch, heads, seq): a kernel that sizes its grid from two leading dims
        # misses the rows of a third
        lead = ()
        for label in ("batch", "heads")[: lead_ndim - 1]:
            lead += (_dim(data, min(8, max(1, rows_cap // math.prod(lead))), label),)
        lead += (_dim(data, max(1, rows_cap // math.prod(lead)), "seq"),)
    return n_in, out, rank, lead


def draw_lora(
    data, test_id: str, op: str, dtype: str, profile: Profile, base: tuple[int, int] | None = None
) -> Inputs:
    """Inputs of lora_forward, lora_backward and lora_merge: x, W, A, B (views), bias, dropout mask,
    grad_y, scaling (alpha / r, or alpha / sqrt(r) with rsLoRA), fan_in_fan_out. ``base``: W's shape
    (out, in), given instead of drawn."""
    n_in, out, rank, lead = _lora_dims(data, profile, base)
    alpha = data.draw(st.sampled_from([16.0, 1.0, 8.0, 32.0, 0.5, -2.0, 3.0]), label="alpha")
    rslora = data.draw(st.booleans(), label="rslora")
    family = data.draw(st.sampled_from(LORA_FAMILIES), label="values")
    dt = as_dtype(dtype)
    level = TINY_LEVELS[0]
    if family == "tiny" and _float32_range(dt):
        level = data.draw(st.sampled_from(TINY_LEVELS), label="tiny level")
    # B's typical size: a trained adapter's, or an early one's, whose low-rank term is small but not
    # negligible (a backend that skips it below some size must fail; with B near 0.1 alone one that
    # skipped |s·B| < 1e-3 passed every test)
    b_scale = data.draw(st.sampled_from(B_SCALES), label="B scale")
    seed = data.draw(SEEDS, label="seed")
    rng = np.random.default_rng(seed)
    x = lora_values(family, rng, (*lead, n_in), 1.0, dt, level)
    W = lora_values(family, rng, (out, n_in), 1 / math.sqrt(n_in), dt, level)
    A = lora_values(family, rng, (rank, n_in), 1 / math.sqrt(n_in), dt, level)
    B = lora_values(family, rng, (out, rank), b_scale, dt, level)
    params = {"in": n_in, "out": out, "r": rank, "alpha": alpha, "rslora": rslora,
              "scaling": lora.scaling(alpha, rank, rslora), "values": family, "B scale": b_scale,
              "seed": seed}  # fmt: skip
    if family == "tiny":
        params["tiny level"] = level
    inputs = Inputs(test_id, op, op, dtype, params=params)  # the LoRA checks are named after their ops
    if op == "lora_merge":
        fan = data.draw(st.booleans(), label="fan_in_fan_out")
        inputs.params["fan_in_fan_out"] = fan
        inputs.put("W", W.T.copy() if fan else W, _view_recipe(data, 2, "W"))
    else:
        inputs.put("x", x, _view_recipe(data, x.ndim, "x"))
        inputs.put("W", W, _view_recipe(data, 2, "W"))
    # The adapters and grad_y are views too: autograd hands a backward gradients in whatever layout the
    # next op produced (a transposed grad_y is common), and adapters may be slices of fused weights.
    inputs.put("A", A, _view_recipe(data, 2, "A"))
    inputs.put("B", B, _view_recipe(data, 2, "B"))
    if op == "lora_forward" and data.draw(st.booleans(), label="bias"):
        inputs.put("bias", lora_values(family, rng, (out,), 1.0, dt, level))
    if op != "lora_merge":
        p = data.draw(st.sampled_from([None, 0.1, 0.5]), label="dropout p")
        if p is not None:
            keep = rng.random(x.shape) >= p
            inputs.put("dropout_mask", round_to(keep / (1 - p), dt))
            inputs.params["dropout_p"] = p
    if op == "lora_backward":
        grad_y = lora_values(family, rng, (*lead, out), 1.0, dt, level)
        inputs.put("grad_y", grad_y, _view_recipe(data, grad_y.ndim, "grad_y"))
    return inputs


def draw_qlora(
    data,
    test_id: str,
    op: str,
    dtype: str,
    profile: Profile,
    rules: InputRules | None = None,
    other_base_dtype: bool = False,
) -> Inputs:
    """Inputs of qlora_forward / qlora_backward: as :func:`draw_lora`, and the base weight W (out, in)
    with the blocksize, quant_type and double_quant the check quantizes it with. The base is one the
    claimed dialect can quantize (``rules``): a dialect that takes only whole groups of blocks
    (torchao) gets an (out, in) of such a size, with out and in at most 512, and its quant types.

    ``other_base_dtype``: W is drawn afresh (same value family and shape) in one of the two dtypes other
    than ``dtype`` (label ``base dtype``, also ``params["base_dtype"]``), so the state's dtype differs
    from the activations' (x, A, B, bias, mask, grad_y stay in ``dtype``)."""
    rules = rules or InputRules()
    base, blocksize = None, None
    if rules.granule_blocks:
        # The check hands the backend the dialect's own state of W, so W must be one it quantizes.
        cap = profile.max_elements
        sizes = [b for b in BLOCKSIZES if b * rules.granule_blocks <= cap]
        if not sizes:
            raise ValueError(f"profile {profile.name} caps arrays below {rules.granule_blocks} blocks")
        blocksize = data.draw(st.sampled_from(sizes), label="blocksize")
        granule = blocksize * rules.granule_blocks
        n = granule * data.draw(st.integers(1, cap // granule), label="granules")
        outs = [d for d in _divisors(n) if d <= 512 and n // d <= 512] or _divisors(n)
        out = data.draw(st.sampled_from(outs), label="base out")
        base = (out, n // out)
    inputs = draw_lora(
        data, test_id, "lora_backward" if op == "qlora_backward" else "lora_forward", dtype, profile, base
    )
    inputs.op, inputs.check = op, op
    W = inputs["W"]
    # A base weight of <= 2 elements (one packed byte) is pinned by the special case
    # qlora_backward[2-element base weight (one packed byte), *], where bitsandbytes' backward failure is
    # declared; drawn here it would fail, and so hide, the whole random test.
    assume(op != "qlora_backward" or W.size > 2)
    inputs.views.pop("W", None)
    inputs.put("W", W)  # the check quantizes W; the backend only ever sees its state
    if blocksize is None:
        blocksize = data.draw(st.sampled_from(BLOCKSIZES), label="blocksize")
    if other_base_dtype:
        others = [d for d in DTYPES if d != dtype]
        base_dtype = data.draw(st.sampled_from(others), label="base dtype")
        rng = np.random.default_rng(inputs.params["seed"] + 2)  # +1 is the broken-shape draw's
        level = inputs.params.get("tiny level", TINY_LEVELS[0])
        if not _float32_range(base_dtype):  # the second level is not tiny in float16 (values near 3)
            level = TINY_LEVELS[0]
        W = lora_values(inputs.params["values"], rng, W.shape, 1 / math.sqrt(W.shape[1]), base_dtype, level)
        inputs.put("W", W)
        inputs.params["base_dtype"] = base_dtype
    inputs.params["blocksize"] = blocksize
    inputs.params["quant_type"] = data.draw(st.sampled_from(rules.quant_types), label="quant_type")
    if rules.double_quant == (False, True):  # the draw the default rules have always made (same stream)
        inputs.params["double_quant"] = data.draw(st.booleans(), label="double_quant")
    else:
        inputs.params["double_quant"] = data.draw(st.sampled_from(rules.double_quant), label="double_quant")
    return inputs


BREAKS = {
    "lora_forward": ("A in", "B out", "B r", "x in", "bias", "dropout_mask"),
    "lora_backward": ("A in", "B out", "B r", "x in", "grad_y", "dropout_mask"),
    "lora_merge": ("A in", "B out", "B r"),
    "qlora_forward": ("A in", "B out", "B r", "x in"),
    "qlora_backward": ("A in", "B out", "B r", "x in", "grad_y"),
}


def _grow(a: np.ndarray, axis: int, rng: np.random.Generator) -> np.ndarray:
    """``a`` with one more (random) entry along ``axis``, or one fewer when it has more than one."""
    axis = axis % a.ndim
    if a.shape[axis] > 1 and rng.random() < 0.5:
        return np.take(a, range(a.shape[axis] - 1), axis=axis)
    extra = np.take(a, [0], axis=axis)
    return np.concatenate([a, extra], axis=axis)


def draw_bad_lora(
    data, test_id: str, op: str, dtype: str, profile: Profile, rules: InputRules | None = None
) -> Inputs:
    """Valid LoRA/QLoRA inputs with one operand's shape broken by one (label ``broken operand``); a
    QLoRA base as :func:`draw_qlora` draws it for ``rules``."""
    rules = rules or InputRules()
    if op.startswith("qlora"):
        inputs = draw_qlora(data, test_id, op, dtype, profile, rules)
    else:
        inputs = draw_lora(data, test_id, op, dtype, profile)
    inputs.check = "rejects"
    choices = [b for b in BREAKS[op] if b.split()[0] in inputs.arrays]
    broken = data.draw(st.sampled_from(choices), label="broken operand")
    rng = np.random.default_rng(inputs.params["seed"] + 1)
    name, _, which = broken.partition(" ")
    axis = {"in": -1, "out": 0, "r": -1, "": -1}[which]
    if name == "bias" or name == "dropout_mask" or name == "grad_y":
        axis = -1
    operand = inputs[name]
    inputs.views.pop(name, None)
    inputs.put(name, _grow(operand, axis, rng))
    inputs.params["broken"] = broken
    inputs.note = f"{name} has shape {inputs[name].shape}"
    return inputs
