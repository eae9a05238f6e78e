#!/usr/bin/env bash
# One command for a machine with a GPU: is the GPU backend right, and what does a training step
# cost there? Builds what it needs (the first build of the `cuda` feature needs network or the
# offline LLVM folder, README "GPU backends"), then prints
#   1. forward / train-step / sampler-step parity of the device against flex, f32 and f16
#      (the backend tier, crates/models/tests/backend_parity_*.rs), and
#   2. s/step, the device allocator's high-water mark, nvidia-smi's peak (where there is one)
#      and peak RSS of one training step per model (crates/trainer/examples/step_bench.rs):
#      SD1.5 at 512 px and SDXL at 1024 px on random full-size checkpoints by default.
# Runs in under 8 minutes on one H100-class GPU once built (each model gets --budget seconds).
#
#   scripts/gpu-check.sh [--device cuda:0|wgpu:auto|wgpu:cpu|wgpu:N] [--models "sd15:512 sdxl:1024"]
#                        [--mixed-precision no|fp16|bf16] [--gradient-checkpointing] [--steps N]
#                        [--budget SECONDS] [--no-parity]
#
# Defaults: the device is cuda:0 where nvidia-smi sees a GPU and this build can have `cuda`
# (SLIDER_GPU_FEATURE=cuda), else wgpu:auto; precision bf16 on cuda, fp16 on wgpu (WGSL has no
# bf16), with --gradient-checkpointing. A precision or recompute the trainer refuses is said so
# and the step is measured without it. On a software Vulkan (lavapipe) use the tiny model:
#   scripts/gpu-check.sh --device wgpu:cpu --models tiny:64
set -euo pipefail
cd "$(dirname "$0")/.."

device="" models="sd15:512 sdxl:1024" precision="" recompute=1 steps=3 budget=200 parity=1
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --models) models="$2"; shift 2 ;;
        --mixed-precision) precision="$2"; shift 2 ;;
        --gradient-checkpointing) recompute=1; shift ;;
        --no-gradient-checkpointing) recompute=0; shift ;;
        --steps) steps="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        --no-parity) parity=0; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

say "building ($feature)"
cargo build -q -p slider-trainer --example step_bench --features "$feature"
cargo test -q -p slider-models --features "$feature" --no-run \
    --test backend_parity_f32 --test backend_parity_f16 2>&1 | grep -v '^ *Executable' || true
say "built"

if [ "$parity" = 1 ]; then
    say "parity of $device against flex (relative Frobenius error, max abs; tolerances in docs/benchmarks.md)"
    for p in f32 f16; do
        SLIDER_PARITY_DEVICE="$device" CI= cargo test -q -p slider-models --features "$feature" \
            --test "backend_parity_$p" -- --nocapture 2>&1 \
            | grep -E '^(\||backend tier|skipped|  [a-z])|panicked|off flex' || true
    done
fi

say "training steps on $device: rank 4, CAME, batch 1, 1 warm-up + $steps timed steps"
echo "| model | px | device | precision | s/step | allocator reserved | nvidia-smi peak | peak RSS |"
echo "|---|---|---|---|---|---|---|---|"
bench=(target/debug/examples/step_bench)
[ -n "${CARGO_TARGET_DIR:-}" ] && bench=("$CARGO_TARGET_DIR/debug/examples/step_bench")
for m in $models; do
    model="${m%%:*}" px="${m##*:}"
    args=(--device "$device" --model "$model" --resolution "$px" --steps "$steps" --mixed-precision "$precision")
    [ "$recompute" = 1 ] && args+=(--gradient-checkpointing)
    peak_file=$(mktemp)
    sampler=""
    if have_nvidia; then
        ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null \
            | head -1 >>"$peak_file"; sleep 0.5; done ) &
        sampler=$!
    fi
    row=$(timeout "$budget" "${bench[@]}" "${args[@]}" 2>/tmp/gpu-check-"$model".log) \
        || row="| $model | $px | $device | $precision | over ${budget} s or failed (see /tmp/gpu-check-$model.log) | | | |"
    if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true; fi
    peak=$(sort -n "$peak_file" | tail -1)
    rm -f "$peak_file"
    # Put nvidia-smi's figure in its column: the row ends with "| allocator | RSS |".
    echo "$row" | awk -v peak="${peak:+$peak MiB}" -F'|' 'NF >= 9 {
        printf "|%s|%s|%s|%s|%s|%s| %s |%s|\n", $2, $3, $4, $5, $6, $7, (peak == "" ? "-" : peak), $8; next }
        { print }'
    grep -h 'refused\|wrote' /tmp/gpu-check-"$model".log || true
done
say "done"
