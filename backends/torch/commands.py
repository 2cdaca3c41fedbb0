"""``reflora demo``: the command-line entry of :mod:`reflora.backends.torch.demo`.

Kept apart from the demo itself so that building the ``reflora`` parser imports neither torch nor
transformers; they are imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from reflora.cli import positive_int, seed_int

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from an installed package, never the hub
    from reflora.backends.torch import demo

    try:
        m = demo.run(args.steps, args.out, device=args.device, seed=args.seed, batch_size=args.batch_size)
    except demo.DemoError as e:
        print(f"reflora demo: {e}", file=sys.stderr)
        return 2
    loss = m["loss"]
    k = max(1, min(10, len(loss) // 4))
    first, last = sum(loss[:k]) / k, sum(loss[-k:]) / k
    mib = 1 / 2**20
    base = m["base_bytes"]
    ratio = m["estimate_vs_peak"]
    lines = [
        f"loss (mean of {k} step{'s' if k != 1 else ''}): {first:.4f} at the start -> {last:.4f} at the end",
        f"accuracy on {m['eval_examples']} held-out pairs: {m['accuracy_before']:.1%} before -> "
        f"{m['accuracy_after']:.1%} after",
        f"best cosine threshold: {m['best_threshold_accuracy_before']:.1%} before -> "
        f"{m['best_threshold_accuracy_after']:.1%} after",
        f"{m['train_seconds']:.1f} s training, {m['tokens_per_s']:.0f} tokens/s on {m['device']} "
        f"(4-bit layers served by {', '.join(m['impl'])})",
        f"base: fp32 {base['fp32'] * mib:.2f} MiB, NF4 {base['nf4'] * mib:.2f} MiB, "
        f"NF4+DQ {base['nf4_dq'] * mib:.2f} MiB; adapters and head {m['adapter_bytes'] * mib:.2f} MiB",
        f"peak memory {m['peak_memory_bytes'] * mib:.1f} MiB ({m['peak_memory_kind']}); "
        f"estimate {m['estimate']['total_bytes'] * mib:.1f} MiB"
        + (f" ({ratio:.2f} of the peak)" if ratio else ""),
    ]
    print("\n".join(lines))
    print(f"wrote {args.out}/metrics.json, loss.png, adapter/ (PEFT format), head.safetensors")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reflora demo``."""
    p = subparsers.add_parser(
        "demo", help="QLoRA-fine-tune the pretrained MiniLM offline on a stdlib-docstring pair task"
    )
    p.add_argument("--steps", type=positive_int, default=120, help="optimizer steps (default 120)")
    p.add_argument("--out", default="reflora-demo", help="output directory (default reflora-demo)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=seed_int, default=0, help="in [0, 2**32) (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="pairs a step (default 16)")
    p.set_defaults(func=_run)
