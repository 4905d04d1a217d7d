#!/usr/bin/env bash
# Second device call of the next session: the benchmarks behind the README's GPU
# tables with this session's kernels — summary (float32 now 3xTF32 forward), FlexAttention
# (all cases, bf16 and fp32, L = 16k) and varlen, then the host-overhead check.
# Usage (repository root, GPU machine): bash bench/device/next_session_b.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next-b}
mkdir -p $out
timeout 200 python3 bench/device/gpu_summary.py 2>&1 | tail -40
timeout 100 python3 bench/bench_varlen.py --device cuda --out $out 2>&1 | tail -7
timeout 220 python3 bench/bench_flex.py --device cuda --lens 16384 --out $out 2>&1 | grep -A3 "^## Summary"
timeout 60 python3 bench/device/fastpath_check.py 2>&1 | tail -12
ls $out
