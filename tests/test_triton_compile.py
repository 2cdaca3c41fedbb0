"""The kernels compile for sm_90 (H100/H200) without a GPU, and their machine code has the properties
the numerics rely on: no fused multiply-add in the dequantize kernel (the double-quant scale rounds
twice), no flush-to-zero, tensor-core MMA (HGMMA) in the 16-bit GEMMs. Runs
benchmarks/_gpu_compile_check.py in a subprocess, because it needs compiled (not interpreted) kernels
and tests/conftest.py puts the test process on the interpreter when there is no GPU. It also checks that the
dequantize kernel, the GEMV and the GEMMs read their packed codes 16 bytes at a time, that a GEMV rounding W
to bfloat16 uses the packed cvt.rn.bf16x2.f32 (one instruction with the widening), and (``--tiles``) that
every candidate of the GPU harness's tile sweep compiles without spilling and within sm_90's shared memory;
and (``--corners``) that the GEMM's default tiles fit sm_90's 227 KB of shared memory without spills where
they need the most: every activation dtype, W layout (SCALE_MODE 0/1/2, odd K) and orientation, the largest
fused M bucket, rank 256, and W dequantized first; every GEMM there and the harness's GEMV run over a
bfloat16 state, so the float32 and float16 variants round W through the state's dtype. The full sweep
(``--sweep``: every M bucket and rank, about 10 minutes here) is run by
test_gemm_sweep_compiles_within_sm90_limits when REFLORA_SLOW_TESTS=1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton", reason="triton is not installed")

TOOL = Path(__file__).resolve().parent.parent / "benchmarks" / "_gpu_compile_check.py"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
def test_kernels_compile_for_sm90_without_fma_ftz_and_with_hgmma(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, str(TOOL), "--tiles", "--corners", "--dump", str(tmp_path / "sass")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for kernel in ("_dequant_kernel", "_nf4_gemm_kernel", "_nf4_gemv_kernel", "_lowrank_kernel"):
        assert any(line.startswith(kernel) for line in lines), f"{kernel} was not compiled:\n{done.stdout}"
    assert list((tmp_path / "sass").glob("*.sass"))
    gemms = [line for line in lines if line.startswith("_nf4_gemm_kernel[")]
    for dtype in ("fp32", "fp16", "bf16"):  # the corners of the sweep were compiled
        for variant in ("DENSE_W=True", "SCALE_MODE=0", "PAIRED=False"):
            found = [g for g in gemms if g.startswith(f"_nf4_gemm_kernel[{dtype},") and variant in g]
            assert found, f"no {dtype} GEMM with {variant} was compiled"
    for dtype in ("fp32", "fp16"):  # W rounded through a bfloat16 state's dtype, in the GEMM and the GEMV
        for kernel in ("_nf4_gemm_kernel", "_nf4_gemv_kernel"):
            assert any(line.startswith(f"{kernel}[{dtype},") and "W_DTYPE=bf16" in line for line in lines), (
                f"no {dtype} {kernel} over a bfloat16 state was compiled"
            )
    # ... and bfloat16 activations over a float16 state (rounded to float16, then packed to bfloat16).
    assert any(line.startswith("_nf4_gemv_kernel[bf16,") and "W_DTYPE=fp16" in line for line in lines)


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
@pytest.mark.skipif(os.environ.get("REFLORA_SLOW_TESTS") != "1", reason="~10 min: set REFLORA_SLOW_TESTS=1")
def test_gemm_sweep_compiles_within_sm90_limits(tmp_path):
    """Every GEMM variant of the sweep (dtype x W layout x orientation x M bucket x rank) fits sm_90's
    shared memory and spills no more than the compile check's SWEEP_STACK_LIMIT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, str(TOOL), "--sweep", "--dump", str(tmp_path / "sass")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout + done.stderr
