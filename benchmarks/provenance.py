"""Which implementation does a transformers + bitsandbytes 4-bit checkpoint come from, byte for byte?

A random Llama (bfloat16, seed 0) is saved by transformers, loaded again with a ``BitsAndBytesConfig``
on this machine's device (bitsandbytes quantizes it there), saved in 4 bits, and inspected against the
bfloat16 original with :func:`reflora.checkpoint.inspect`: each 4-bit weight is quantized again by the
canonical rules and the bnb-cpu and bnb-cuda dialects and compared byte for byte. The dialect of the
device (``bnb-cpu`` on the CPU, ``bnb-cuda`` on CUDA) must reproduce every weight of every
configuration; the exit status is 1 when one does not. On a GPU this confirms the bnb-cuda dialect,
which was written from bitsandbytes' CUDA source, on whole checkpoints.

Usage: ``python benchmarks/provenance.py [--device cpu|cuda] [--hidden H] [--layers L] [--out DIR]``
(needs torch, transformers and bitsandbytes). Default: CUDA when available; hidden 1024, intermediate
2816, 2 layers (14 Linear weights, 25.7M weights); nf4 with double quantization, nf4 and fp4 without.
Writes ``provenance-<device>.json`` to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

CONFIGS = {"nf4-DQ": ("nf4", True), "nf4": ("nf4", False), "fp4": ("fp4", False)}
EXPECTED = {"cpu": "bnb-cpu", "cuda": "bnb-cuda"}


def save_original(path: Path, hidden: int, layers: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def quantize_with_bitsandbytes(original: Path, out: Path, quant_type: str, double_quant: bool, device: str):
    import torch
    import transformers

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.LlamaForCausalLM.from_pretrained(
        original, quantization_config=config, device_map=device, dtype=torch.bfloat16
    )
    model.save_pretrained(out)


def run(device: str, hidden: int, layers: int) -> dict:
    import bitsandbytes
    import torch
    import transformers

    from reflora import checkpoint

    record = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "hidden": hidden,
        "layers": layers,
        "expected": EXPECTED[device],
        "configs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "original"
        save_original(original, hidden, layers)
        for name, (quant_type, double_quant) in CONFIGS.items():
            quantized = Path(tmp) / name
            quantize_with_bitsandbytes(original, quantized, quant_type, double_quant, device)
            reports = checkpoint.inspect(quantized, original)
            elements = sum(math.prod(r.shape) for r in reports if r.shape is not None)
            row = {
                "weights": len(reports),
                "elements": elements,
                "reproduced_by": {
                    d: sum(d in (r.reproduced_by or ()) for r in reports) for d in checkpoint.DIALECTS
                },
                "not_reproduced": [
                    {
                        "key": r.key,
                        "error": r.error,
                        "first_diff": r.first_diff,
                        "code_diffs": r.code_diffs,
                        "scale_diffs": r.scale_diffs,
                    }
                    for r in reports
                    if EXPECTED[device] not in (r.reproduced_by or ())
                ],
            }
            record["configs"][name] = row
            per = ", ".join(f"{d} {k}" for d, k in row["reproduced_by"].items())
            print(f"{name:7} {len(reports)} weights, {elements} elements; reproduced by {per}", flush=True)
            for bad in row["not_reproduced"]:
                d = EXPECTED[device]
                why = (
                    bad["error"]
                    or f"{d}: {bad['code_diffs'][d]} codes, {bad['scale_diffs'][d]} scales differ"
                )
                print(f"  {bad['key']}: {why}", flush=True)
    record["passed"] = not any(row["not_reproduced"] for row in record["configs"].values())
    return record


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--hidden", type=int, default=1024, help="hidden size, a multiple of 128 (default 1024)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", help="a directory for provenance-<device>.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("provenance.py: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    record = run(args.device, args.hidden, args.layers)
    print(f"{'PASS' if record['passed'] else 'FAIL'}: {record['expected']} must reproduce every weight")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"provenance-{args.device}.json").write_text(json.dumps(record, indent=1))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
