"""Memory arithmetic of 4-bit storage and of QLoRA training, as in the QLoRA paper (Dettmers et al. 2023).

**Storage** (section 3, "Double Quantization"). A 4-bit weight costs 4 bits for its code plus its share
of the block scale:

* without double quantization a float32 absmax per block of ``blocksize``: 4 + 32/blocksize bits
  (4.5 at blocksize 64);
* with it, an 8-bit code per block plus a float32 absmax2 per group of ``blocksize2`` blocks:
  4 + 8/blocksize + 32/(blocksize·blocksize2) bits (4.127 at 64 and 256).

The saving, 0.373 bits a parameter, is 3.03 GB (10^9 bytes) at 65B, the paper's "approximately 3 GB".
The per-tensor constants (the 16-entry table, the 256-entry 8-bit map, the offset) do not grow with the
tensor and are left out, as the paper does.

**Training** (:func:`training_memory`). A decoder/encoder of ``layers`` blocks of width h (hidden),
MLP width f (intermediate, ``mlp_matrices`` = 2 for GELU MLPs, 3 for gated ones), a attention heads,
trained on batch b of sequence length s, holds

* the frozen base: the linear weights in 4 bits, every other parameter (embeddings, norms) in
  ``frozen_bytes`` a parameter;
* the adapters, their gradients and the optimizer's states (AdamW: two float32 moments a parameter);
* the activations kept for the backward. Per block, after Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", section 4.1), generalised to any f and either MLP:
  8sbh + mlp_matrices·sbf elements (2 norm inputs; the QKV input, Q, K, V and the output projection's
  input; the MLP's input and its f-wide inputs of the activation, the gate product and the down
  projection), plus 2as²b for an attention that keeps its softmax (none with flash attention), plus
  1-byte dropout masks (2sbh, + as²b with a stored softmax). With gradient checkpointing only each
  block's input is kept, plus one block's activations while it is recomputed;
* the transient of reflora's QLoRA op: one dequantized weight (h·f elements) at a time.

It is an estimate of tensors, not of an allocator: it leaves out the framework's own footprint and
fragmentation. Every term is stated with how it is computed (:class:`MemoryEstimate`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

from reflora.checks import check_flag
from reflora.cli import nonnegative_int, positive_float, positive_int

__all__ = [
    "LLAMA_SHAPES",
    "MemoryEstimate",
    "add_parser",
    "bits_per_parameter",
    "double_quant_saving",
    "nearest_llama",
    "quantized_bytes",
    "training_memory",
]


def bits_per_parameter(blocksize: int = 64, *, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Storage bits a parameter of a 4-bit tensor, scales included (see the module docstring)."""
    if blocksize <= 0 or blocksize2 <= 0:
        raise ValueError("block sizes must be positive")
    if check_flag("double_quant", double_quant):
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


def quantized_bytes(n_params: float, blocksize: int = 64, *, double_quant: bool = False) -> float:
    """Bytes of ``n_params`` parameters stored in 4 bits, scales included (per-tensor constants excluded)."""
    return n_params * bits_per_parameter(blocksize, double_quant=double_quant) / 8


def double_quant_saving(n_params: float, blocksize: int = 64, blocksize2: int = 256) -> float:
    """Bytes that double quantization saves on ``n_params`` 4-bit parameters (3.03e9 at 65e9)."""
    saved_bits = bits_per_parameter(blocksize) - bits_per_parameter(blocksize, double_quant=True,
                                                                     blocksize2=blocksize2)  # fmt: skip
    return n_params * saved_bits / 8


# (layers, hidden, intermediate, heads, vocab) of the LLaMA-1 models the QLoRA paper trains (its Table 9
# and the released configs); a gated MLP of three matrices.
LLAMA_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "7B": (32, 4096, 11008, 32, 32000),
    "13B": (40, 5120, 13824, 40, 32000),
    "33B": (60, 6656, 17920, 52, 32000),
    "65B": (80, 8192, 22016, 64, 32000),
}


def _llama_params(shape: tuple[int, int, int, int, int]) -> float:
    L, h, f, _, v = shape
    return L * (4 * h * h + 3 * h * f + 2 * h) + 2 * v * h + h  # blocks, embeddings + head, final norm


def nearest_llama(params: float) -> str:
    """The LLaMA size in :data:`LLAMA_SHAPES` whose parameter count is nearest ``params`` (by ratio)."""
    return min(LLAMA_SHAPES, key=lambda k: abs(_llama_params(LLAMA_SHAPES[k]) / params - 1))


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated training memory: ``terms`` is a tuple of (name, bytes, how it was computed)."""

    terms: tuple[tuple[str, float, str], ...]

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.terms)

    def __getitem__(self, name: str) -> float:
        for n, b, _ in self.terms:
            if n == name:
                return b
        raise KeyError(f"no term {name!r}; terms: {', '.join(n for n, _, _ in self.terms)}")

    def as_dict(self) -> dict:
        return {"terms": {n: {"bytes": b, "how": how} for n, b, how in self.terms}, "total_bytes": self.total}

    def __str__(self) -> str:
        rows = [f"  {n:<22} {_fmt(b):>11}   {how}" for n, b, how in self.terms]
        return "\n".join([*rows, f"  {'total':<22} {_fmt(self.total):>11}"])


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _block_activations(b, s, h, f, a, mlp, e, dropout, flash) -> tuple[float, str]:
    """Bytes one block keeps for its backward: e bytes an activation element, 1 byte a dropout mask."""
    elems = b * s * h * 8 + b * s * f * mlp
    how = f"{e}·(8sbh + {mlp}sbf"
    if not flash:
        elems += 2 * a * s * s * b  # softmax output and its dropout's output
        how += " + 2as²b"
    masks = 0.0
    if dropout:
        masks = 2 * b * s * h + (0 if flash else a * s * s * b)
        how += ") + masks (2sbh" + ("" if flash else " + as²b") + ")"
    else:
        how += ")"
    return elems * e + masks, how


def training_memory(
    params: float,
    r: int,
    *,
    layers: int,
    hidden: int,
    intermediate: int | None = None,
    heads: int | None = None,
    mlp_matrices: int = 3,
    batch: int = 1,
    seq: int = 512,
    vocab: int = 0,
    quantized_params: float | None = None,
    adapter_params: float | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    frozen_bytes: int = 2,
    activation_bytes: int = 2,
    adapter_bytes: int = 4,
    optimizer_bytes: int = 8,
    checkpointing: bool = True,
    dropout: bool = False,
    flash_attention: bool = True,
) -> MemoryEstimate:
    """Estimate the memory of QLoRA training, term by term (module docstring).

    params: all parameters of the model. r: LoRA rank, adapters on every linear layer of every block
    (4 attention projections h×h, ``mlp_matrices`` of h×f) unless ``adapter_params`` is given.
    layers, hidden (h), intermediate (f, default 4h), heads (a, default h/64): the block shape.
    batch, seq: b and s. vocab: a language-model head's logits are kept in float32 (b·s·vocab·4
    bytes); 0 for a classifier. quantized_params: the parameters held in 4 bits (default: every block's
    linear weights, L·(4h² + mlp·h·f)); the rest cost ``frozen_bytes`` each.
    activation_bytes: bytes of an activation element (2 for bf16, 4 for float32);
    adapter_bytes: of an adapter weight and of its gradient; optimizer_bytes: optimizer state a
    trainable parameter (8 for AdamW's two float32 moments, 0 for SGD).
    checkpointing: keep only each block's input (plus one block's activations); dropout: masks are
    kept; flash_attention: the attention keeps no s×s matrices.
    Returns a :class:`MemoryEstimate`. ValueError for non-positive sizes or more quantized than total
    parameters; TypeError for a flag (double_quant, checkpointing, dropout, flash_attention) that is not
    True or False.
    """
    flags = {"double_quant": double_quant, "checkpointing": checkpointing, "dropout": dropout,
             "flash_attention": flash_attention}  # fmt: skip
    for name, v in flags.items():
        check_flag(name, v)
    f = 4 * hidden if intermediate is None else intermediate
    a = max(1, hidden // 64) if heads is None else heads
    sizes = {"params": params, "r": r, "layers": layers, "hidden": hidden, "intermediate": f, "heads": a,
             "batch": batch, "seq": seq}  # fmt: skip
    for name, v in sizes.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive, got {v!r}")
    if vocab < 0:
        raise ValueError(f"vocab must be >= 0, got {vocab!r}")
    if mlp_matrices not in (2, 3):
        raise ValueError(f"mlp_matrices must be 2 or 3, got {mlp_matrices!r}")
    h, L, b, s = hidden, layers, batch, seq
    q = L * (4 * h * h + mlp_matrices * h * f) if quantized_params is None else quantized_params
    if not 0 <= q <= params:
        raise ValueError(f"quantized_params ({q:.4g}) must be between 0 and params ({params:.4g})")
    n_adapt = L * r * (4 * 2 * h + mlp_matrices * (h + f)) if adapter_params is None else adapter_params
    bits = bits_per_parameter(blocksize, double_quant=double_quant)
    block, block_how = _block_activations(
        b, s, h, f, a, mlp_matrices, activation_bytes, dropout, flash_attention
    )
    # reflora's op keeps x_d Aᵀ (N, r) for every adapted layer
    lora_t = L * (4 + mlp_matrices) * b * s * r * activation_bytes
    if checkpointing:
        acts = L * b * s * h * activation_bytes + block
        acts_how = f"L·sbh·{activation_bytes} (block inputs) + one block: {block_how}"
    else:
        acts = L * block
        acts_how = f"L·[{block_how}]"
    terms = [
        ("base (4-bit)", q * bits / 8, f"{q:.4g} params × {bits:.4g} bits / 8"),
        ("frozen (other)", (params - q) * frozen_bytes, f"{params - q:.4g} params × {frozen_bytes} B"),
        ("adapters", n_adapt * adapter_bytes, f"{n_adapt:.4g} params × {adapter_bytes} B"),
        ("adapter gradients", n_adapt * adapter_bytes, f"{n_adapt:.4g} params × {adapter_bytes} B"),
        ("optimizer states", n_adapt * optimizer_bytes, f"{n_adapt:.4g} params × {optimizer_bytes} B"),
        ("activations", acts + lora_t, acts_how + f"; + x_d·Aᵀ: L·{4 + mlp_matrices}·sbr·{activation_bytes}"),
        ("dequantized weight", h * f * activation_bytes, f"one h×f weight × {activation_bytes} B, transient"),
    ]
    if vocab:
        terms.append(("logits", b * s * vocab * 4.0, "b·s·vocab × 4 B (float32)"))
    return MemoryEstimate(tuple(terms))


# ---- reflora memory ----------------------------------------------------------------------------------


# A model of --params borrows a LLaMA shape for its training estimate only within this ratio of it.
BORROW_RATIO = 1.25
MAX_PARAMS = 1e15  # the largest --params the command takes (1e308 gave inf bytes and invalid JSON)


class UsageError(ValueError):
    """Options of ``reflora memory`` that cannot describe a model (exit status 2)."""


def _training_shape(args: argparse.Namespace) -> tuple[float, dict] | None:
    """(parameters, shape) the training estimate is for, or None when no shape is known."""
    given = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads")}
    if args.layers is not None and args.hidden is not None:
        shape, defaults = {**given, "vocab": args.vocab or 0}, []
        if shape["intermediate"] is None:  # the defaults training_memory takes, reported as used
            shape["intermediate"] = 4 * args.hidden
            defaults.append("intermediate 4h")
        if shape["heads"] is None:
            shape["heads"] = max(1, args.hidden // 64)
            defaults.append("heads h/64")
        shape["source"] = "given" + (f"; {', '.join(defaults)} by default" if defaults else "")
        return args.params, shape
    named = [f"--{k}" for k, v in given.items() if v is not None]
    if named:
        raise UsageError(f"{', '.join(named)} alone is part of a shape: give --layers and --hidden "
                         "(--intermediate and --heads optional), or none for a LLaMA size")  # fmt: skip
    name = nearest_llama(args.params)
    L, h, f, a, v = LLAMA_SHAPES[name]
    n = _llama_params(LLAMA_SHAPES[name])
    if not 1 / BORROW_RATIO <= args.params / n <= BORROW_RATIO:
        return None
    vocab = v if args.vocab is None else args.vocab
    source = f"LLaMA-{name}'s shape and {n:.4g} params, the nearest to {args.params:.3g}"
    return n, {"layers": L, "hidden": h, "intermediate": f, "heads": a, "vocab": vocab, "source": source}


def _no_shape_note(params: float) -> str:
    sizes = ", ".join(f"{k}: {_llama_params(v):.3g}" for k, v in LLAMA_SHAPES.items())
    return (f"no training estimate: {params:.3g} params is not within {BORROW_RATIO}x of a LLaMA size "
            f"({sizes}); give --layers and --hidden (and --intermediate, --heads) for its shape")  # fmt: skip


def _rank_note(r: int, shape: dict) -> str | None:
    """A note when the rank passes the hidden size: the estimate counts those adapters, which cost
    memory but cannot raise any layer's update past rank h (every adapted layer has a side of h)."""
    if r <= shape["hidden"]:
        return None
    return (f"note: r={r} is above the hidden size {shape['hidden']}: every adapted layer has a side of "
            f"{shape['hidden']}, so no update can have rank above it; the estimate counts the adapters "
            f"as allocated")  # fmt: skip


def _report(args: argparse.Namespace) -> dict:
    P = args.params
    if P < 1:
        raise UsageError(f"--params {P:g} is less than one parameter")
    if P > MAX_PARAMS:
        raise UsageError(f"--params {P:g} is more than {MAX_PARAMS:g} parameters")
    found = _training_shape(args)
    est = None
    if found is not None:
        n, shape = found
        try:
            est = training_memory(
                n, args.r, layers=shape["layers"], hidden=shape["hidden"], intermediate=shape["intermediate"],
                heads=shape["heads"], batch=args.batch, seq=args.seq, vocab=shape["vocab"],
                blocksize=args.blocksize, double_quant=not args.no_double_quant,
                checkpointing=not args.no_checkpointing, flash_attention=not args.eager_attention,
            )  # fmt: skip
        except ValueError as e:
            hint = ""
            if "quantized_params" in str(e) and args.intermediate is None:
                hint = (
                    " (the MLP width f is 4h by default; give --intermediate, e.g. LLaMA's 11008 for h 4096)"
                )
            raise UsageError(f"the given shape does not fit --params {P:.4g}: {e}{hint}") from None
    bpp = {
        "nf4": bits_per_parameter(args.blocksize),
        "nf4+dq": bits_per_parameter(args.blocksize, double_quant=True),
    }
    return {
        "params": P,
        "shape": None if found is None else found[1],
        "bits_per_param": bpp,
        "base_bytes": {
            "fp32": 4 * P,
            "bf16": 2 * P,
            "nf4": P * bpp["nf4"] / 8,
            "nf4+dq": P * bpp["nf4+dq"] / 8,
        },
        "double_quant_saving_bytes": double_quant_saving(P, args.blocksize),
        "double_quant_saving_65B_bytes": double_quant_saving(65e9, args.blocksize),
        "training": None
        if est is None
        else {"r": args.r, "batch": args.batch, "seq": args.seq, **est.as_dict()},
        "training_note": _no_shape_note(P) if est is None else _rank_note(args.r, found[1]),
        "_estimate": est,
    }


def _run(args: argparse.Namespace) -> int:
    try:
        rep = _report(args)
    except UsageError as e:
        print(f"reflora memory: {e}", file=sys.stderr)
        return 2
    est = rep.pop("_estimate")
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    P, bpp = rep["params"], rep["bits_per_param"]
    print(f"{P:.4g} parameters, blocksize {args.blocksize}")
    print(f"  bits/param: NF4 {bpp['nf4']:.4g}, NF4 + double quantization {bpp['nf4+dq']:.4g}")
    for k, v in rep["base_bytes"].items():
        print(f"  all weights in {k:<7} {v / 1e9:8.2f} GB  ({_fmt(v)})")
    print(f"  double quantization saves {rep['double_quant_saving_bytes'] / 1e9:.2f} GB here, "
          f"{rep['double_quant_saving_65B_bytes'] / 1e9:.2f} GB at 65B")  # fmt: skip
    s = rep["shape"]
    if est is None:
        print(rep["training_note"])
        return 0
    ckpt = "off" if args.no_checkpointing else "on"
    print(f"training estimate, r={args.r}, batch {args.batch}, seq {args.seq}, {s['layers']} layers, "
          f"hidden {s['hidden']} ({s['source']}), checkpointing {ckpt}:")  # fmt: skip
    print(est)
    if rep["training_note"]:
        print(rep["training_note"])
    return 0


def _blocksizes() -> tuple[int, ...]:
    from reflora.state import BLOCKSIZES  # the oracle's rule; numpy is imported for the command only

    return BLOCKSIZES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``reflora memory``: 4-bit storage and QLoRA training memory for a model size."""
    p = subparsers.add_parser("memory", help="bits per parameter and a QLoRA training-memory estimate")
    p.add_argument("--params", type=positive_float, required=True, help="parameters of the model, e.g. 7e9")
    p.add_argument("--r", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--layers", type=positive_int, help="blocks (default: the nearest LLaMA shape)")
    p.add_argument("--hidden", type=positive_int, help="hidden size h")
    p.add_argument("--intermediate", type=positive_int, help="MLP width f (default 4h)")
    p.add_argument("--heads", type=positive_int,
                   help="attention heads (default h/64); they count only with --eager-attention")  # fmt: skip
    p.add_argument("--vocab", type=nonnegative_int, help="vocabulary of a language-model head (0: none)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--seq", type=positive_int, default=512)
    p.add_argument("--blocksize", type=int, default=64, choices=_blocksizes(), metavar="BLOCKSIZE",
                   help="NF4 blocksize, a power of two from 32 to 4096 (default 64)")  # fmt: skip
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--eager-attention", action="store_true",
                   help="the attention keeps its s×s score matrices, a of them a layer (default: a flash "
                   "attention, which keeps none)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=_run)
