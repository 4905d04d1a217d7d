#!/usr/bin/env bash
# First device call of the next session (written 2026-12-02, device time spent): checks
# the 3xTF32 backward's dK/dV flush (bench/NOTES.md G13) on the GPU — the float32 test
# matrix with the backward switched on (the two dK misses of G11 must pass), then the
# check script (its fixed GQA/strided/flex cases, and its timing with the flush on; the
# flush-off timing is in bench/results/gpu-tf32-bwd-2026-12-02.json). If both hold, make
# ATTN_GPU_TF32X3_BWD default to 1. Second call: bench_flex --device cuda --lens 16384.
# Usage (repository root, GPU machine): bash bench/device/next_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next}
mkdir -p $out
ATTN_GPU_TF32X3_BWD=1 OUT=$out/matrix bash bench/device/fp32_matrix.sh 2>&1 | tail -40
timeout 200 python3 bench/device/tf32_bwd_check.py $out --quick 2>&1 | tail -25
