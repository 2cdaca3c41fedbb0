"""The kernels compile for sm_90 (H100/H200) without a GPU, and their machine code has the properties
the numerics rely on: no fused multiply-add in the dequantize kernel (the double-quant scale rounds
twice), no flush-to-zero, tensor-core MMA (HGMMA) in the 16-bit GEMMs. Runs
benchmarks/_gpu_compile_check.py in a subprocess, because it needs compiled (not interpreted) kernels
and tests/conftest.py puts the test process on the interpreter when there is no GPU. It also checks that the
dequantize kernel, the GEMV and the GEMMs read their packed codes 16 bytes at a time, and (``--tiles``) that
every candidate of the GPU harness's tile sweep compiles without spilling and within sm_90's shared memory."""

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
        [sys.executable, str(TOOL), "--tiles", "--dump", str(tmp_path / "sass")],
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
