"""torch.compile over the Triton QLoRA layer gives the eager layer's bits, outputs and gradients.

Before, compiling a model whose 4-bit layers ran on the Triton kernels stopped in Dynamo: it traced
into the launchers (the launch registry, cached tile heuristics, the interpreter's own Python) and
failed there. Now a compiled graph calls the layer as two opaque ops, ``reflora::triton_linear`` and
its backward, that run the same launchers, so compiled and eager calls launch the same kernels on the
same tiles and must agree bit for bit: that is what is asserted, under ``aot_eager`` and under
inductor, whole models as one graph (``fullgraph=True``).

Runs under the Triton CPU interpreter where tests/conftest.py chose it (no CUDA), else on CUDA.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed")

from torch import nn  # noqa: E402
from triton_helpers import kernel_device  # noqa: E402

from reflora import nf4  # noqa: E402
from reflora.backends.torch.backend import cpu_compiler  # noqa: E402
from reflora.backends.torch.modules import NF4Linear, QLoRALinear, apply_lora  # noqa: E402
from reflora.backends.torch.quant_state import TorchQuantState  # noqa: E402
from reflora.dtypes import as_dtype  # noqa: E402

DEVICE = kernel_device()

from reflora.backends.triton import launch_counts, nf4_matmul, qlora_linear, reset_launch_counts  # noqa: E402

# inductor compiles the graph around the ops: C++ on the CPU, Triton on CUDA
BACKENDS = ["aot_eager"] + (["inductor"] if DEVICE == "cuda" or cpu_compiler() else [])


def _state(n, k, seed, dtype="float32", blocksize=64):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.02, 0.5, size=(n, 1))).astype(as_dtype(dtype))
    return TorchQuantState.from_state(nf4.quantize(w, blocksize, double_quant=True), DEVICE)


def _leaf(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE).requires_grad_(True)


def _run(fn, *leaves):
    """fn's output and the gradients of its leaves for the loss sum(y * weights), all detached."""
    y = fn()
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
    grads = torch.autograd.grad((y * weights).sum(), leaves)
    return y.detach(), [g.detach() for g in grads]


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1), b.view(-1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("rows", "dtype"),
    [(3, torch.bfloat16), (37, torch.float32), (37, torch.float16)],
    ids=["gemv-bf16", "gemm-f32", "gemm-f16"],
)
def test_compiled_qlora_linear_gives_eager_bits(backend, rows, dtype) -> None:
    """x 3-D and transposed (not contiguous), a dropout mask, a bias, double-quantized W of 40 x 72 in a
    float32 state: y and the gradients of x, A, B and bias equal eager's bit for bit, and the compiled
    call launches the same kernels as the eager one."""
    n, k, r = 40, 72, 5
    ts = _state(n, k, seed=1)
    x = _leaf((k, rows, 1), dtype, 2).detach().permute(2, 1, 0).requires_grad_(True)  # (1, rows, k), strided
    a, b, bias = _leaf((r, k), dtype, 3, 0.1), _leaf((n, r), dtype, 4, 0.1), _leaf((n,), dtype, 5)
    mask = (
        (torch.rand((1, rows, k), generator=torch.Generator().manual_seed(6)) > 0.25).to(dtype).to(DEVICE)
        * 4
        / 3
    )

    def layer(x, a, b, bias):
        return qlora_linear(x, ts, a, b, 0.75, bias=bias, dropout_mask=mask)

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    reset_launch_counts()
    y0, g0 = _run(lambda: layer(x, a, b, bias), x, a, b, bias)
    eager_launches = launch_counts()
    reset_launch_counts()
    y1, g1 = _run(lambda: compiled(x, a, b, bias), x, a, b, bias)
    assert launch_counts() == eager_launches
    assert _same(y1, y0)
    assert all(_same(g, h) for g, h in zip(g1, g0, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_nf4_matmul_gives_eager_bits(backend) -> None:
    """No adapter: y = x Ŵᵀ + bias, gradients for x and bias only."""
    ts = _state(24, 80, seed=7, dtype="bfloat16")
    x, bias = _leaf((9, 80), torch.bfloat16, 8), _leaf((24,), torch.bfloat16, 9)
    compiled = torch.compile(lambda x, bias: nf4_matmul(x, ts, bias), backend=backend, fullgraph=True)
    y0, g0 = _run(lambda: nf4_matmul(x, ts, bias), x, bias)
    y1, g1 = _run(lambda: compiled(x, bias), x, bias)
    assert _same(y1, y0) and all(_same(g, h) for g, h in zip(g1, g0, strict=True))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(48, 96)
        self.down = nn.Linear(96, 40, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _triton_model():
    """(model, its two QLoRALinear layers, its trainable parameters): _Block in QLoRA form on DEVICE,
    impl='triton', B drawn nonzero so that every adapter gradient is."""
    torch.manual_seed(0)
    model = apply_lora(_Block(), r=4, alpha=8, target_modules=["up", "down"], quantize="nf4", verbose=False)
    model.to(DEVICE)
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    with torch.no_grad():
        for m in layers:
            m.impl = "triton"
            m.lora_B.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    return model, layers, [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_qlora_model_on_the_kernels_trains_as_the_eager_one(backend) -> None:
    """A model of two 4-bit layers (their double-quant offsets differ) with impl='triton', compiled as one
    graph: outputs and every adapter gradient equal eager's, and the layers report the kernels served."""
    model, layers, params = _triton_model()
    assert len({m.base_layer.offset for m in layers}) == 2
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y0, g0 = _run(lambda: model(x), *params)
    for m in layers:
        m.last_impl = None
    y1, g1 = _run(lambda: torch.compile(model, backend=backend, fullgraph=True)(x), *params)
    assert [m.last_impl for m in layers] == ["triton", "triton"]
    assert _same(y1, y0) and all(_same(g, h) for g, h in zip(g1, g0, strict=True))


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
def test_one_dynamic_graph_serves_several_batch_sizes_under_autocast(autocast) -> None:
    """dynamic=True (the row count and the scaling symbolic) and autocast: eager's bits at every size,
    the GEMV's (2 rows) and the GEMM's (9, 17)."""
    model, _, params = _triton_model()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    for rows in (9, 2, 17):
        x = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            y0, g0 = _run(functools.partial(model, x), *params)
            y1, g1 = _run(functools.partial(compiled, x), *params)
        assert y1.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert _same(y1, y0) and all(_same(g, h) for g, h in zip(g1, g0, strict=True))


def test_a_compiled_4bit_base_without_adapter_gives_eager_bits() -> None:
    torch.manual_seed(1)
    layer = NF4Linear.from_linear(nn.Linear(64, 24), 64).to(DEVICE)
    layer.impl = "triton"
    x = torch.randn(6, 64).to(DEVICE)
    assert _same(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))


def test_an_empty_batch_compiles_to_an_empty_output_and_zero_gradients() -> None:
    ts = _state(16, 64, seed=3)
    x, a, b = (
        _leaf((0, 64), torch.float32, 1),
        _leaf((2, 64), torch.float32, 2),
        _leaf((16, 2), torch.float32, 3),
    )
    compiled = torch.compile(
        lambda x, a, b: qlora_linear(x, ts, a, b, 2.0), backend="aot_eager", fullgraph=True
    )
    y, (gx, ga, gb) = _run(lambda: compiled(x, a, b), x, a, b)
    assert y.shape == (0, 16) and gx.shape == (0, 64)
    assert not ga.any() and not gb.any()


def test_tile_overrides_are_refused_under_compile_not_ignored() -> None:
    from reflora.backends.triton.gemm import GemmConfig

    ts = _state(16, 64, seed=4)
    x = torch.randn(8, 64).to(DEVICE)
    cfg = GemmConfig(bm=16, bp=16, bq=32)
    compiled = torch.compile(lambda x: nf4_matmul(x, ts, gemm=cfg), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="tile overrides \\['gemm'\\] are for eager calls"):
        compiled(x)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_mode_replays_the_kernels_from_a_cuda_graph() -> None:
    """mode="reduce-overhead" records the compiled forward and backward, the ops' kernel launches and
    their scratch allocations (300 rows: W dequantized first) included, into CUDA graphs and replays
    them: warm-up, recording and two replays each give eager's bits."""
    model, _, params = _triton_model()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = torch.randn(300, 48, generator=torch.Generator().manual_seed(step)).to(DEVICE, torch.bfloat16)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y0, g0 = _run(functools.partial(model, x), *params)
            y1, g1 = _run(functools.partial(compiled, x), *params)
        assert _same(y1, y0) and all(_same(g, h) for g, h in zip(g1, g0, strict=True)), f"step {step}"


def test_the_kernels_run_under_inference_mode() -> None:
    """The Triton layer read the state's version counters as the torch path did, which inference tensors
    do not have: under torch.inference_mode() it now gives no_grad's bits, on the kernels."""
    model, layers, _ = _triton_model()
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():
        got = model(x)
    assert torch.equal(got, want) and [m.last_impl for m in layers] == ["triton", "triton"]
