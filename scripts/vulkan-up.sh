#!/usr/bin/env bash
# Makes a Vulkan adapter available for the GPU-backend tier (crates/models/tests/
# backend_parity_*.rs): installs Debian's `mesa-vulkan-drivers` (lavapipe, a software Vulkan
# on the CPU) when no Vulkan driver is installed. Idempotent. Needs root and apt-get.
# Prints one line; exits non-zero when it cannot.
set -uo pipefail

say() { echo "vulkan-up: $*"; }
fail() { say "$*"; exit 1; }

icd() { ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null | head -1; }
if [ -n "$(icd)" ]; then
    say "a Vulkan driver is installed ($(basename "$(icd)"))"
    exit 0
fi
[ "$(id -u)" = 0 ] || fail "no Vulkan driver and not root to install mesa-vulkan-drivers (skipped)"
command -v apt-get >/dev/null || fail "no Vulkan driver and no apt-get to install mesa-vulkan-drivers"
export DEBIAN_FRONTEND=noninteractive
log=/tmp/vulkan-up-apt.log
t0=$(date +%s)
{ apt-get update -q && apt-get install -y -q --no-install-recommends mesa-vulkan-drivers; } >"$log" 2>&1 \
    || fail "installing mesa-vulkan-drivers failed (see $log)"
[ -n "$(icd)" ] || fail "mesa-vulkan-drivers installed but no Vulkan ICD file appeared"
say "installed mesa-vulkan-drivers (lavapipe) in $(( $(date +%s) - t0 )) s"
