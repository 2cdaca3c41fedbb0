#!/usr/bin/env bash
# Build .gpu/site on this (networked) machine: what a bare, offline GPU machine lacks to run
# benchmarks/gpu_session.sh. The device image has Python 3.12 with its own torch, triton, peft,
# transformers, hypothesis and pytest; it lacks reflora, bitsandbytes and torchao.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_bundle.sh   # then carry .gpu (git-ignored) to the device
# (PYTHON: one whose setuptools builds this project, as the venv of the README's install does)
#
# Wheels are unpacked, not installed: the session puts .gpu/site on PYTHONPATH, and the .dist-info
# folders that come with them register reflora's entry points (backends, commands, pytest plug-in).
set -euo pipefail
cd "$(dirname "$0")/.."

BNB=bitsandbytes==0.50.2
TORCHAO=torchao==0.18.0

rm -rf .gpu
mkdir -p .gpu/wheels .gpu/site
"${PYTHON:-python}" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir .gpu/wheels .
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
"${PYTHON:-python}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --dest .gpu/wheels "$BNB" "$TORCHAO"
for wheel in .gpu/wheels/*.whl; do
    "${PYTHON:-python}" -m zipfile -e "$wheel" .gpu/site
done
# bitsandbytes ships one native library per CUDA/ROCm/XPU release (~150 MB together); the device's torch
# is a CUDA 13 build, so keep CUDA 13's and the CPU one. It picks the library from torch.version.cuda.
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' \
    ! -name 'libbitsandbytes_cpu.so' ! -name 'libbitsandbytes_cuda13*.so' -delete
rm -rf .gpu/wheels
dirty=$(git diff --quiet HEAD -- . ':!.gpu' || echo " plus uncommitted changes")
echo "built .gpu/site for Python 3.12 ($(du -sh .gpu | cut -f1)); reflora from $(git rev-parse --short HEAD)$dirty"
ls .gpu/site | grep dist-info
