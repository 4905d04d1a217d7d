#!/usr/bin/env bash
# First device call of the next session (written 2026-12-03, session 18, whose device
# time ran out on refused starts). What session 18 could not check on a GPU:
# 1. the per-sequence backward (gpu/_mma_bwd.py JAG, bench/NOTES.md G18; opt-in
#    ATTN_GPU_JAGGED_BWD=1): varlen and flex band tests with it on;
# 2. its speed: bench_flex (causal, sliding window 512, document) and bench_varlen with
#    it on, against session 18's numbers with the lists (flex-cuda-latest.md,
#    varlen-cuda-latest.md). If 1 passes, flip the default in gpu/__init__.py
#    (JAGGED_BWD) and drop the opt-in notes (README, NOTES G18).
# 3. time permitting, G16: score_mod in registers (ALiBi / soft-cap + causal).
# Usage (repository root, GPU machine): bash bench/device/next_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD ATTN_GPU_JAGGED_BWD=1
out=${OUT:-/tmp/next}; logs=/tmp/next-logs; mkdir -p $out $logs
t0=$(date +%s)
LIMIT=240 OUT=$logs/tests bash bench/device/session18_c.sh
left=$(( 400 - $(date +%s) + t0 ))
timeout $left python3 bench/bench_flex.py --device cuda --lens 16384 --dtypes bfloat16 \
  --cases causal,sliding_window_512,document --warmup 1 --repeats 5 --out $logs/flex \
  > $logs/flex.txt 2>&1
grep -E "^\| 16384 \| 1|Efficiency target" $logs/flex.txt | head -8
left=$(( 560 - $(date +%s) + t0 ))
[ $left -gt 60 ] && timeout $left python3 bench/bench_varlen.py --device cuda \
  --out $logs/varlen > $logs/varlen.txt 2>&1
grep -E "^\|" $logs/varlen.txt | head -8
tar czf $out/next.tgz -C /tmp next-logs
echo "total $(( $(date +%s) - t0 )) s"
