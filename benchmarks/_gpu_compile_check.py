"""Compile every kernel launch of the GPU harness for sm_90 without a GPU, and read the machine code.

    python benchmarks/_gpu_compile_check.py [--arch 90] [--dump DIR] [--tiles] [--sweep | --corners]

Runs the public functions on ``meta`` tensors with each Triton kernel replaced by a recorder, then
compiles each recorded launch ahead of time (``triton.compile`` with a ``GPUTarget``, as Triton's own
AOT tool does, 16-byte alignment hints as the JIT would give them) and disassembles it with the
nvdisasm/cuobjdump that ship with Triton. For each kernel variant it prints registers, stack
(spills), local loads/stores, and an instruction census, and it checks the properties the numerics
rely on: no FFMA (fused multiply-add) in the dequantize kernel, whose double-quant reconstruction
must round twice; no ``.ftz`` in the PTX; tensor-core MMA (HGMMA on Hopper) in the 16-bit GEMMs. And
one that bandwidth relies on: the packed codes are read 16 bytes an instruction, by ``LDG.E.128`` in
the dequantize kernel and the GEMV, and by 16-byte asynchronous copies (never 8-byte ones) in the GEMM.
And one that issue rate relies on: a GEMV that rounds W to bfloat16 does it with the packed
``cvt.rn.bf16x2.f32`` (one instruction a weight, with the widening to float32).
Exit status 1 if a check fails. This is the "read what costs no device time" step: it proves the
kernels compile for the target and shows register pressure, not how fast they run.

``--sweep`` also compiles the GEMM over what a caller can make it launch: activation dtype (float32,
float16, bfloat16) x W layout (SCALE_MODE 1/2 with K even, SCALE_MODE 0 with K even and with K odd)
x orientation (forward with a bias, grad_x with a dropout mask) x M bucket (the fused decode at BM
16/32/64/128, and W dequantized first) x LoRA rank (none, 16, 256), with the default tiles, and fails
when a variant needs more shared memory than a block may have on the target (it would raise
OutOfResources at launch) or spills more than ``SWEEP_STACK_LIMIT`` bytes a thread. ``--corners`` is
the part of that sweep where shared memory and registers peak (largest fused M bucket, rank 256, every
dtype, layout and orientation, and the dense variant), plus the harness's GEMV under every activation
dtype (its state bfloat16, so float32 and float16 round W through the state's dtype) and under bfloat16
over a float16 state: what CI runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret: decided when kernels are decorated

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from reflora.backends.torch.quant_state import TorchQuantState

# The modules, not the functions of the same names that the package re-exports.
_common, dequant, gemv, lowrank, nf4_gemm, qlora_mod = (
    importlib.import_module(f"reflora.backends.triton.{m}")
    for m in ("_common", "dequant", "gemv", "lowrank", "gemm", "qlora")
)

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8"}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SMEM_LIMIT = {90: 232448}  # shared memory a block may have on sm_90 (227 KiB); more does not launch
# Spills a sweep variant may have, bytes of stack a thread. The worst seen: 16 B (3 LDL / 3 STL a
# kernel) in a few fused variants of 16 to 64 rows at 4 warps under Triton 3.9; 24 B under 3.6 in
# the 128x128 forward with a bias and a rank above 16, all in the LoRA epilogue's rank loop, none in
# the main loop. That costs nothing measurable; 150-300 B with 50-100 reloads (what 128x128 tiles on
# rows that are not multiples of 16 did) would.
SWEEP_STACK_LIMIT = 32
# The constexprs a variant's name shows.
SHOWN = ("W_T", "W_DTYPE", "DENSE_W", "HAS_LORA", "HAS_MASK", "PAIRED", "SCALE_MODE", "TABLE_SHARED")
SHOWN += ("MASK_ON", "PACK_BF16", "BM", "BP", "BQ", "BR", "BN", "BK")
OPS = ("HGMMA", "HMMA", "FFMA", "FMUL", "FADD", "F2FP", "LDG", "STG", "LDS", "STS", "LDL", "STL")


class Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _jit_key(v) -> tuple[str, str | None] | None:
    """How Triton's JIT specializes a non-constexpr argument at launch: an integer equal to 1 becomes
    the constant 1, other integers and pointers are marked when divisible by 16 (0 included), floats
    and bools are not specialized. None where Triton's own rule cannot be asked (older versions)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        return None
    if isinstance(v, (bool, float)):
        return None  # the JIT skips runtime specialization for these
    return native_specialize_impl(CUDABackend, v, False, True, True)


def _signature(fn, args, kwargs):
    """The signature, constants and attributes the JIT would compile this launch with, so that the
    machine code read here is the machine code that runs: without the integer-1 rule, unit strides
    would stay runtime values and every load of a contiguous row would compile to scalar loads."""
    sig, consts, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        v = values[name]
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            sig[name], aligned = _PTR[v.dtype], True  # the caching allocator aligns to far more than 16 B
        elif isinstance(v, bool):
            sig[name], aligned = "i1", False
        elif isinstance(v, int) and v == 1:
            sig[name], consts[name], aligned = "constexpr", 1, False
        elif isinstance(v, int):
            sig[name], aligned = "i32", v % 16 == 0
        elif isinstance(v, float):
            sig[name], aligned = "fp32", False
        else:
            raise TypeError(f"{name}: cannot type {type(v).__name__}")
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
        key = _jit_key(v)
        if key is not None:
            ours = ("constexpr", 1) if sig[name] == "constexpr" else (sig[name], "D" if aligned else "")
            theirs = (key[0], key[1] or "")
            if ours[0].startswith("*"):
                theirs = (theirs[0].replace("*k", "*"), theirs[1])  # const-ness is not part of this check
            if ours != theirs:
                raise AssertionError(
                    f"{fn.__name__}.{name}={v!r}: specialized as {ours}, Triton's JIT: {key}"
                )
    return sig, consts, attrs


def _record(run) -> list:
    """Calls ``run()`` with every kernel replaced by a Recorder; returns the recorded launches."""
    calls: list = []
    patched = [
        (dequant, "_dequant_kernel"),
        (nf4_gemm, "_nf4_gemm_kernel"),
        (gemv, "_nf4_gemv_kernel"),
        (lowrank, "_lowrank_kernel"),
    ]
    saved = [(m, n, getattr(m, n)) for m, n in patched]
    saved_check = _common.check_device
    try:
        for m, n, fn in saved:
            setattr(m, n, Recorder(fn, calls))
        for m in (_common, dequant, gemv, lowrank, nf4_gemm, qlora_mod):
            if hasattr(m, "check_device"):
                m.check_device = lambda *t: None  # meta tensors stand in for CUDA ones
        run()
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)
        for m in (_common, dequant, gemv, lowrank, nf4_gemm, qlora_mod):
            if hasattr(m, "check_device"):
                m.check_device = saved_check
    return calls


def _state(
    out_f: int, in_f: int, blocksize: int = 64, double_quant: bool = True, dtype=torch.bfloat16
) -> TorchQuantState:
    n = out_f * in_f
    nb = -(-n // blocksize)
    meta = dict(device="meta")
    plain = not double_quant
    return TorchQuantState(
        packed=torch.empty((n + 1) // 2, dtype=torch.uint8, **meta),
        absmax=torch.empty(nb, **meta) if plain else None,
        code=torch.empty(16, **meta),
        shape=(out_f, in_f),
        dtype=dtype,
        blocksize=blocksize,
        quant_type="nf4",
        absmax_q=None if plain else torch.empty(nb, dtype=torch.uint8, **meta),
        absmax2=None if plain else torch.empty(-(-nb // 256), **meta),
        code2=None if plain else torch.empty(256, **meta),
        offset=0.0 if plain else 0.01,
    )


def _layer(out_f: int, in_f: int, tokens: int, rank: int) -> tuple:
    """(W's 4-bit state, x (tokens, in), grad_y (tokens, out), A (r, in), B (out, r)): one QLoRA layer's
    operands, bf16, on the meta device."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    return (
        _state(out_f, in_f),
        torch.empty(tokens, in_f, **meta),
        torch.empty(tokens, out_f, **meta),
        torch.empty(rank, in_f, **meta),
        torch.empty(out_f, rank, **meta),
    )


def harness_launches(tokens: int = 8192, hidden: int = 4096, inter: int = 11008, rank: int = 16) -> list:
    """The launches of benchmarks/gpu.py: dequantize, batch-1 GEMV, and one QLoRA layer fwd + bwd in
    both MLP orientations (the gate/up shape and the down shape), bf16 activations, bf16 LoRA (at
    8192 tokens W is dequantized first); then the masked (LoRA dropout) and biased variants, and the
    fused in-tile decode the harness times beside the default."""
    meta = dict(device="meta")

    def run():
        ts = _state(hidden, inter)
        dequant.dequantize(ts, torch.bfloat16)
        qlora_mod.nf4_matmul(torch.empty(1, inter, dtype=torch.bfloat16, **meta), ts)
        for out_f, in_f in ((inter, hidden), (hidden, inter)):
            w, x, g, a, b = _layer(out_f, in_f, tokens, rank)
            cfg = qlora_mod.LinearConfig(weight=w, scaling=2.0)
            _, t = qlora_mod._forward(x, a, b, None, None, cfg)
            u = lowrank.lowrank_matmul(g, b)
            nf4_gemm.nf4_gemm(g, w, transposed=True, lora=(u, a, 2.0))
            lowrank.lowrank_matmul(u.t(), x)
            lowrank.lowrank_matmul(g.t(), t)
        # With LoRA dropout (a mask on the LoRA branch) and a bias, as PEFT training often runs.
        w, x, g, a, b = _layer(inter, hidden, tokens, rank)
        mask = torch.empty_like(x)
        bias = torch.empty(inter, dtype=torch.bfloat16, **meta)
        _, t = qlora_mod._forward(x, a, b, bias, mask, qlora_mod.LinearConfig(weight=w, scaling=2.0))
        u = lowrank.lowrank_matmul(g, b)
        nf4_gemm.nf4_gemm(g, w, transposed=True, lora=(u, a, 2.0), mask=mask)
        lowrank.lowrank_matmul(u.t(), x, mask=mask, mask_on="right")
        # The 4-bit table read with tl.gather (table="shared"), which the harness times beside the default.
        x1 = torch.empty(1, inter, dtype=torch.bfloat16, **meta)
        cfg = gemv.default_config(1, hidden, inter)
        gemv.nf4_gemv(x1, ts, config=dataclasses.replace(cfg, table="shared"))
        fused = nf4_gemm.default_config(nf4_gemm.DEQUANT_FIRST_MIN_M - 1, inter, hidden, w.blocksize)
        for cfg in (fused, dataclasses.replace(fused, table="shared")):  # the harness's fused rows
            nf4_gemm.nf4_gemm(x, w, lora=(t, b.t(), 2.0), config=cfg)
            nf4_gemm.nf4_gemm(g, w, transposed=True, lora=(u, a, 2.0), config=cfg)

    return _record(run)


def tile_launches(tokens: int = 8192, hidden: int = 4096, inter: int = 11008, rank: int = 16) -> list:
    """The launches of ``benchmarks/gpu.py --only tiles``: every candidate GemmConfig on the MLP's
    forward and grad_x GEMMs (gate/up and down shapes, LoRA epilogues), every GemvConfig on the GEMV."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _gpu_cases as cases

    meta = dict(device="meta")

    def run():
        for out_f, in_f in ((inter, hidden), (hidden, inter)):
            w, x, g, a, b = _layer(out_f, in_f, tokens, rank)
            t = torch.empty(tokens, rank, device="meta")  # float32, as x Aᵀ and g B are kept
            for cfg in cases.GEMM_TILES:
                nf4_gemm.nf4_gemm(x, w, lora=(t, b.t(), 2.0), config=cfg)
                nf4_gemm.nf4_gemm(g, w, transposed=True, lora=(t, a, 2.0), config=cfg)
        ts = _state(hidden, inter)
        x1 = torch.empty(1, inter, dtype=torch.bfloat16, **meta)
        for cfg in cases.GEMV_TILES:
            gemv.nf4_gemv(x1, ts, config=cfg)

    return _record(run)


# W layouts of the sweep: (out, in, blocksize) -> SCALE_MODE 1 forward / 2 grad_x (K even, K % bs == 0),
# SCALE_MODE 0 with whole bytes a row (K even) and with rows starting mid-byte (K odd), and (full
# sweep only) a blocksize wider than the grad_x tile (SCALE_MODE 1 both ways).
SWEEP_LAYOUTS = {"mode1/2": (96, 256, 64), "mode0 even K": (96, 200, 64), "mode0 odd K": (37, 131, 64)}
SWEEP_LAYOUTS_FULL = {**SWEEP_LAYOUTS, "blocksize 256": (96, 512, 256)}
SWEEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sweep_launches(full: bool) -> list:
    """The GEMM launches a caller can cause with the default tiles (module docstring, ``--sweep``);
    ``full`` False: only the corners, where shared memory and registers peak."""
    meta = dict(device="meta")
    dense_m = nf4_gemm.DEQUANT_FIRST_MIN_M
    # One M per BM bucket of the fused decode (16, 32, 64, 128 rows), and one M where W is dequantized first.
    ms = (5, 19, 40, 100, dense_m) if full else (100, dense_m)
    ranks = (None, 16, 256) if full else (256,)

    def run():
        for dtype in SWEEP_DTYPES:
            for out_f, in_f, bs in (SWEEP_LAYOUTS_FULL if full else SWEEP_LAYOUTS).values():
                w = _state(out_f, in_f, bs, double_quant=True)
                for m in ms:
                    x = torch.empty(m, in_f, dtype=dtype, **meta)
                    g = torch.empty(m, out_f, dtype=dtype, **meta)
                    for r in ranks:
                        lt = None if r is None else torch.empty(m, r, **meta)
                        fwd = None if r is None else (lt, torch.empty(out_f, r, dtype=dtype, **meta).t(), 2.0)
                        bwd = None if r is None else (lt, torch.empty(r, in_f, dtype=dtype, **meta), 2.0)
                        bias = torch.empty(out_f, dtype=dtype, **meta)
                        mask = None if r is None else torch.empty(m, in_f, dtype=dtype, **meta)
                        nf4_gemm.nf4_gemm(x, w, lora=fwd, bias=bias)
                        nf4_gemm.nf4_gemm(g, w, transposed=True, lora=bwd, mask=mask)
            # The harness's GEMV (4096 x 11008, a bfloat16 state) under each activation dtype: under
            # float32 and float16 it rounds W through the state's dtype (_common.base_operand_f32).
            gemv.nf4_gemv(torch.empty(1, 11008, dtype=dtype, **meta), _state(4096, 11008))
        # And bfloat16 activations over a float16 state: W rounded to float16, then to bfloat16.
        gemv.nf4_gemv(
            torch.empty(1, 11008, dtype=torch.bfloat16, **meta), _state(4096, 11008, dtype=torch.float16)
        )

    kernels = ("_nf4_gemm_kernel", "_nf4_gemv_kernel")
    return [c for c in _record(run) if c[0].__name__ in kernels]


def census(kernel, workdir: Path, name: str) -> dict:
    cubin = workdir / f"{name}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    (workdir / f"{name}.ptx").write_text(kernel.asm["ptx"])
    sass = subprocess.run([BIN / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
    (workdir / f"{name}.sass").write_text(sass)
    ops = Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z0-9]+)", sass, re.M))
    usage = subprocess.run(
        [BIN / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
    ).stdout
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "regs": int(res.get("REG", 0)),
        "stack": int(res.get("STACK", 0)),
        "dyn_shared": kernel.metadata.shared,
        "ftz_in_ptx": len(re.findall(r"\.ftz", kernel.asm["ptx"])),
        "LDG.E.128": len(re.findall(r"\bLDG\.E\.128\b", sass)),
        "LDG.E.U8": len(re.findall(r"\bLDG\.E\.U8\b", sass)),
        # _common.rounded_f32's packed conversion: bf16(w) in the high half, a zero (RZ) low half.
        "bf16 packed": len(re.findall(r"\bF2FP\.BF16\.F32\.PACK_AB R\d+, R\d+, RZ\b", sass)),
        "cp.async 8 B": len(
            re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], 0x8\b", kernel.asm["ptx"])
        ),
        **{op: ops[op] for op in OPS},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    p.add_argument("--dump", type=Path, default=None, help="keep PTX/SASS/cubin here (default: a temp dir)")
    p.add_argument("--tiles", action="store_true", help="also the candidates of gpu.py --only tiles")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sweep", action="store_true", help="also every GEMM variant of the sweep (slow)")
    which.add_argument("--corners", action="store_true", help="also the sweep's corners (what CI runs)")
    args = p.parse_args(argv)
    if args.arch < 80:  # _common.pack_bf16 takes a meta device for sm_80 or newer
        p.error("--arch must be 80 or more: the GEMV's bfloat16 rounding is cvt.rn.bf16x2.f32 (sm_80+)")
    workdir = args.dump or Path(tempfile.mkdtemp(prefix="reflora-sass-"))
    workdir.mkdir(parents=True, exist_ok=True)
    target = GPUTarget("cuda", args.arch, 32)
    failures = []
    seen = set()
    print(f"{'kernel variant':<150} {'regs':>4} {'stack':>5} {'smem':>6} " + " ".join(f"{o:>5}" for o in OPS))
    launches = [(*c, "harness") for c in harness_launches()]
    launches += [(*c, "tile") for c in tile_launches()] if args.tiles else []
    launches += [(*c, "sweep") for c in sweep_launches(args.sweep)] if args.sweep or args.corners else []
    for fn, call_args, kwargs, kind in launches:
        sig, consts, attrs = _signature(fn, call_args, kwargs)
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
        key = (
            fn.__name__,
            tuple(sorted(sig.items())),
            tuple(sorted((k, str(v)) for k, v in consts.items())),
            tuple(sorted(attrs)),
            tuple(sorted(opts.items())),
        )
        if key in seen:
            continue
        seen.add(key)
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts)
        flags = [f"{k}={v}" for k, v in consts.items() if k in SHOWN]
        if fn.__name__ in ("_nf4_gemm_kernel", "_nf4_gemv_kernel"):  # the activation dtype
            flags.insert(0, sig["a_ptr" if fn.__name__ == "_nf4_gemm_kernel" else "x_ptr"].removeprefix("*"))
        flags += [f"{k.removeprefix('num_')[0]}{v}" for k, v in opts.items() if k.startswith("num_")]
        name = f"{fn.__name__}[{','.join(flags)}]"
        c = census(kernel, workdir, f"{fn.__name__}_{len(seen)}")
        print(
            f"{name[:150]:<150} {c['regs']:>4} {c['stack']:>5} {c['dyn_shared']:>6} "
            + " ".join(f"{c[o]:>5}" for o in OPS)
        )
        if c["ftz_in_ptx"]:
            failures.append(f"{name}: .ftz in PTX")
        if fn.__name__ == "_dequant_kernel" and c["FFMA"]:
            failures.append(f"{name}: {c['FFMA']} FFMA: the double-quant reconstruction may be contracted")
        if fn.__name__ == "_dequant_kernel" and (not c["LDG.E.128"] or c["LDG.E.U8"] > 2):
            # One 16-byte load of codes a thread; the byte loads left are the 8-bit double-quant scales.
            failures.append(
                f"{name}: {c['LDG.E.128']} LDG.E.128 and {c['LDG.E.U8']} LDG.E.U8: the packed codes are "
                "not read 16 bytes at a time"
            )
        if fn.__name__ == "_nf4_gemv_kernel" and not c["LDG.E.128"]:
            failures.append(f"{name}: no LDG.E.128: the packed codes are not read 16 bytes at a time")
        # The GEMV rounds W to bfloat16 (the state's or the activations' dtype) and widens it in one
        # packed conversion with a zero low half (_common.rounded_f32): one a weight a thread a step
        # (two loop bodies when K is even, the full steps and the tail; one when it is odd).
        bf16_w = fn.__name__ == "_nf4_gemv_kernel" and "*bf16" in (sig["x_ptr"], f"*{consts['W_DTYPE']}")
        if bf16_w and c["bf16 packed"] < consts["BN"] * consts["BK"] // (32 * kwargs["num_warps"]):
            failures.append(
                f"{name}: {c['bf16 packed']} F2FP.BF16.F32.PACK_AB with a zero low half: W is not rounded "
                "to bfloat16 and widened by one cvt.rn.bf16x2.f32 a weight (PACK_BF16 off?)"
            )
        # The 16-byte checks hold for the harness's shapes, whose rows are whole multiples of 16 bytes.
        if fn.__name__ == "_nf4_gemm_kernel" and kind == "harness" and c["cp.async 8 B"]:
            failures.append(
                f"{name}: {c['cp.async 8 B']} 8-byte async copies: the codes are not copied 16 at a time"
            )
        # Tensor cores for 16-bit operands: HGMMA (wgmma) where a warpgroup gets 64 rows, HMMA below.
        sixteen_bit = fn.__name__ == "_nf4_gemm_kernel" and sig.get("a_ptr") in ("*fp16", "*bf16")
        mma = "HGMMA" if args.arch >= 90 and consts.get("BM", 0) >= 64 else "HMMA"
        if sixteen_bit and not c[mma]:
            failures.append(f"{name}: no {mma}: the 16-bit GEMM is not on the tensor-core path")
        if c["dyn_shared"] > SMEM_LIMIT.get(args.arch, 1 << 30):
            failures.append(f"{name}: {c['dyn_shared']} B of shared memory, more than a block may have")
        if c["stack"] or c["LDL"] or c["STL"]:
            spill = f"{name} spills ({c['stack']} B stack, {c['LDL']} LDL / {c['STL']} STL)"
            if kind == "tile":  # a sweep candidate that spills would spend GPU time on a known loser
                failures.append(f"{spill}: not a tile candidate worth timing")
            elif kind == "sweep" and c["stack"] > SWEEP_STACK_LIMIT:
                failures.append(f"{spill}: more than the {SWEEP_STACK_LIMIT} B a default may spill")
            else:
                print(f"  note: {spill}")
    print(f"PTX/SASS in {workdir}")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
