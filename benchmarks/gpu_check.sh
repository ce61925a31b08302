#!/usr/bin/env bash
# One table of GPU throughput: training (eager vs compiled, micro-batch 32/64/128, bf16, MFU, peak
# memory; the original code beside it with --original PATH), sampling at NFE 250 with and without
# guidance, encoding, Inception and DINOv2 features. Writes JSON (--out, default ./gpu_check.json)
# and nothing else. Under 8 minutes on one H100/H200; --quick runs tiny sizes on the CPU.
#
#   bash benchmarks/gpu_check.sh [--quick] [--original PATH] [--out FILE.json] [--device cuda]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
# a private, throw-away compile cache: the check leaves nothing behind
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
export TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton"
"$python" "$here/gpu_check.py" "$@"
