#!/usr/bin/env bash
# The GPU work of issue #4, in phases that each fit one call of the device tool (10 minutes at most).
# Run from the repository root on the GPU machine, with .gpu carried (build it first, here, with
# benchmarks/gpu_bundle.sh):
#
#   bash benchmarks/gpu_session.sh check harness     # phases run in the order given
#
# Phases:
#   check    the device, the versions, and that reflora, bitsandbytes (its CUDA library) and torchao load
#   harness  benchmarks/gpu.py at full size: ceilings, dequantize, GEMV, QLoRA MLP (JSON for benchmarks/results/)
#   tiles    benchmarks/gpu.py --only tiles: candidate tiles for the MLP's GEMMs and the GEMV, each checked,
#            timed beside the default (JSON too)
#   audit    `reflora conform --profile audit --backend triton`, the kernels compiled for the GPU, as the
#            three phases below in turn (one device call may not fit all three: run them one a call)
#   audit-dequant, audit-forward, audit-backward
#            the audit profile's dequantize_4bit, qlora_forward or qlora_backward tests (the ops the Triton
#            backend implements), each with its own JSON; seed $AUDIT_SEED (default 3133993599, the seed
#            of the CPU backends' audit runs in docs/conformance.md, for a like-for-like comparison)
#   conform  `reflora conform` (ci profile) on every backend, on CUDA: torch on the GPU, bitsandbytes' CUDA
#            path held to the bnb-cuda dialect
#   provenance
#            benchmarks/provenance.py: a random Llama quantized by transformers + bitsandbytes on CUDA, every
#            4-bit weight of it reproduced byte for byte by the bnb-cuda dialect (reflora inspect); ~1 min
#   tests    the project's tests with TRITON_INTERPRET unset: Triton compiled, torch and bitsandbytes on CUDA
#
# Logs and JSON go to $OUT (the device tool brings them back), else to ./gpu-out. The exit status is
# non-zero when any phase failed or was skipped; every phase still runs while the call has time
# (CALL_LIMIT_S, default 570 s: the device tool's 600 s less a margin; PHASE_LIMIT_S caps each phase).
# `reflora conform` keeps its results so far in its JSON ("complete": false; rewritten every 30 s and on
# SIGTERM), but an audit phase stopped early is still a partial audit: give each one a call of its own.
set -uo pipefail
cd "$(dirname "$0")/.."
phases="check harness tiles audit audit-dequant audit-forward audit-backward conform provenance tests"
[ $# -gt 0 ] || { echo "usage: gpu_session.sh PHASE... (phases: $phases)" >&2; exit 2; }
for name in "$@"; do
    case " $phases " in
        *" $name "*) ;;
        *) echo "gpu_session.sh: unknown phase '$name' (phases: $phases)" >&2; exit 2 ;;
    esac
done
if [ ! -d .gpu/site ]; then
    echo "gpu_session.sh: .gpu/site is missing: run benchmarks/gpu_bundle.sh on a networked machine and carry .gpu" >&2
    exit 2
fi
# The code under test is this working tree's, not the wheel gpu_bundle.sh packed: lay its three source
# folders out as the installed package (reflora/, reflora/backends/, reflora/conformance/) over the
# wheel's, and record a digest of them with the results.
rm -rf .gpu/site/reflora
mkdir -p .gpu/site/reflora
cp -r reflora/. .gpu/site/reflora/
cp -r backends .gpu/site/reflora/backends
cp -r conformance .gpu/site/reflora/conformance
# PYTHONSAFEPATH: `python -m` must not put the repository root first on sys.path, where ./reflora (the
# oracle's folder alone, without backends/ and conformance/) would hide the package laid out above.
export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
py=${PYTHON:-python3}
out=${OUT:-gpu-out}
mkdir -p "$out"
status=0
find reflora backends conformance benchmarks -name '*.py' -o -name '*.toml' | LC_ALL=C sort \
    | xargs sha256sum > "$out/sources.sha256"
echo "sources: $(sha256sum < "$out/sources.sha256" | cut -c1-16) (per file: $out/sources.sha256)"
limit=${PHASE_LIMIT_S:-540}  # a phase that hangs is stopped (SIGTERM: gpu.py saves what it has) in time
# The device tool kills a whole call at 600 s, logs and JSON included: every phase of this call must end
# by the call's deadline, so a phase gets at most what is left of it (and is skipped with under 30 s).
deadline=$((SECONDS + ${CALL_LIMIT_S:-570}))

phase() {  # phase NAME COMMAND...: run it, log to $out/NAME.log, report its exit status and duration
    local name=$1 start=$SECONDS rc
    shift
    local left=$((deadline - SECONDS - 25))  # 20 s for timeout's KILL, 5 s to write the report
    local lim=$((left < limit ? left : limit))
    if [ "$lim" -lt 30 ]; then
        echo "== $name: skipped: ${left} s left of this call's ${CALL_LIMIT_S:-570} s; run it in another call"
        status=1
        return
    fi
    echo "== $name (at most $lim s): $*"
    local run=(timeout -s TERM -k 20 "$lim")
    declare -F "$1" >/dev/null && run=()  # a shell function (check) runs as it is: it is quick
    "${run[@]}" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 124 ] || echo "== $name: stopped after its ${lim} s limit"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

check() {  # fails when any of its three steps fails
    local rc=0
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || rc=1
    "$py" - <<'EOF' || rc=1
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
failed = False
for name in ("triton", "numpy", "reflora", "bitsandbytes", "torchao", "peft", "transformers", "hypothesis"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:13} {getattr(mod, '__version__', '?'):12} {mod.__file__}")
    except Exception as e:  # report every missing piece, not just the first
        failed = True
        print(f"{name:13} NOT IMPORTABLE: {type(e).__name__}: {e}")
import bitsandbytes.functional as F
x = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
packed, qs = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
print("bitsandbytes CUDA quantize_4bit:", packed.device, tuple(packed.shape))
sys.exit(1 if failed else 0)
EOF
    "$py" -m reflora backends || rc=1
    return $rc
}

audit_op() {  # audit_op dequant|forward|backward: the audit profile on the tests of one op
    local select
    case $1 in
        dequant) select="dequantize_4bit*" ;;
        forward) select="qlora_forward*" ;;
        backward) select="qlora_backward*" ;;
    esac
    phase "audit-$1" "$py" -m reflora conform --backend triton --profile audit --seed "${AUDIT_SEED:-3133993599}" \
        -k "$select" --json "$out/conform-audit-triton-$1.json" --bundle-dir "$out/failures"
}

for name in "$@"; do
    case $name in
        check) phase check check ;;
        harness) phase harness "$py" benchmarks/gpu.py --out "$out" ;;
        tiles) phase tiles "$py" benchmarks/gpu.py --only tiles --out "$out" ;;
        audit) for op in dequant forward backward; do audit_op "$op"; done ;;
        audit-dequant | audit-forward | audit-backward) audit_op "${name#audit-}" ;;
        conform) phase conform "$py" -m reflora conform --json "$out/conform-ci-cuda.json" \
            --bundle-dir "$out/failures" ;;
        provenance) phase provenance "$py" benchmarks/provenance.py --device cuda --out "$out" ;;
        tests)
            xdist=()
            "$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
            # The wheel test runs `pip wheel`, which fetches build dependencies: the device is offline.
            phase tests "$py" -m pytest -q -p no:cacheprovider "${xdist[@]}" tests \
                --deselect tests/test_packaging.py::test_a_wheel_install_works_like_the_editable_one ;;
    esac
done
exit $status
