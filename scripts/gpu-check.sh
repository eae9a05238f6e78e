#!/usr/bin/env bash
# One command for a machine with a GPU: is the GPU backend right, and what does a training step
# cost there? Builds what it needs (the first build of the `cuda` feature needs network or the
# offline LLVM folder, README "GPU backends"), then prints
#   1. forward / train-step / sampler-step / attention parity of the device against flex, f32 and f16
#      (the backend tier, crates/models/tests/backend_parity_*.rs), and
#   2. `slider-run bench train --device ...` for each model: s/step, peak RSS, the backend
#      allocator's high-water mark and nvidia-smi's peak (where there is one) of one training
#      step, rank 4 on kohya's targets, batch 1, on a random full-size checkpoint: SD1.5 at
#      512 px and SDXL at 1024 px by default.
# Runs in under 8 minutes on one H100-class GPU once built (each model gets --budget seconds).
#
#   scripts/gpu-check.sh [--device cuda:0|wgpu:auto|wgpu:cpu|wgpu:N] [--models "sd15:512 sdxl:1024"]
#                        [--mixed-precision no|fp16|bf16] [--no-gradient-checkpointing]
#                        [--steps N] [--budget SECONDS] [--no-parity]
#
# Defaults: the device is cuda:0 where nvidia-smi sees a GPU and SLIDER_GPU_FEATURE=cuda, else
# wgpu:auto; precision bf16 on cuda, fp16 on wgpu (WGSL has no bf16); block recompute on. On a
# software Vulkan (lavapipe) use the tiny model:
#   scripts/gpu-check.sh --device wgpu:cpu --models tiny:64
set -euo pipefail
cd "$(dirname "$0")/.."

device="" models="sd15:512 sdxl:1024" precision="" recompute=1 steps=3 budget=200 parity=1
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --models) models="$2"; shift 2 ;;
        --mixed-precision) precision="$2"; shift 2 ;;
        --no-gradient-checkpointing) recompute=0; shift ;;
        --steps) steps="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        --no-parity) parity=0; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
done

have_nvidia() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }
if [ -z "$device" ]; then
    if have_nvidia && [ "${SLIDER_GPU_FEATURE:-wgpu}" = cuda ]; then device=cuda:0; else device=wgpu:auto; fi
fi
case "$device" in
    cuda*) feature=slider-models/cuda; : "${precision:=bf16}" ;;
    wgpu*) feature=slider-models/wgpu; : "${precision:=fp16}" ;;
    *) echo "gpu-check: --device must be cuda:N or wgpu:... (cpu has nothing to check)" >&2; exit 2 ;;
esac
t0=$SECONDS
say() { echo "gpu-check [$((SECONDS - t0)) s]: $*"; }

# One build for both parts: the workspace's, with the backend's feature.
say "building ($feature)"
cargo build -q --workspace --features "$feature"
cargo test -q --workspace --features "$feature" --no-run \
    --test backend_parity_f32 --test backend_parity_f16 2>&1 | grep -v '^ *Executable' || true
say "built"

if [ "$parity" = 1 ]; then
    say "parity of $device against flex (relative Frobenius error, max abs; tolerances in docs/benchmarks.md)"
    for p in f32 f16; do
        SLIDER_PARITY_DEVICE="$device" CI= cargo test -q --workspace --features "$feature" \
            --test "backend_parity_$p" -- --include-ignored --nocapture 2>&1 \
            | grep -E '^(\||backend tier|skipped|  [a-z])|panicked|off flex' || true
    done
fi

bench=target/debug/slider-run
[ -n "${CARGO_TARGET_DIR:-}" ] && bench="$CARGO_TARGET_DIR/debug/slider-run"
flags=(--device "$device" --mixed-precision "$precision" --steps "$steps" --no-baseline)
[ "$recompute" = 1 ] && flags+=(--gradient-checkpointing)
for m in $models; do
    model="${m%%:*}" px="${m##*:}"
    say "bench train --model $model --resolution $px ${flags[*]}"
    peak_file=$(mktemp)
    sampler=""
    if have_nvidia; then
        ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null \
            | head -1 >>"$peak_file"; sleep 0.5; done ) &
        sampler=$!
    fi
    timeout "$budget" "$bench" bench train --model "$model" --resolution "$px" "${flags[@]}" \
        || say "$model at $px px: over $budget s or failed"
    if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true; fi
    peak=$(sort -n "$peak_file" | tail -1)
    rm -f "$peak_file"
    [ -n "$peak" ] && say "nvidia-smi's peak while it ran: $peak MiB"
done
say "done"
