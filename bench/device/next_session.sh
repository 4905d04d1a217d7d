#!/usr/bin/env bash
# First device call of the next session (written 2026-12-02, session 16; its device time
# was spent). What session 16 changed but could not check on a GPU:
# 1. the whole test_gpu.py matrix (its 16-bit shards were not re-run after the
#    3xTF32-backward default), test_profile.py (a line-info build now runs the SIMT
#    float32 backward: test_gpu_lineinfo_build failed in NVVM before), in parallel;
# 2. with the GPU quiet: score_mod in registers (NOTES G16: ALiBi / soft-cap flex
#    forward against causal), varlen_attn's host time without the per-call offsets
#    synchronisation (host_flex.py, NOTES V1), and the README summary benchmark with the
#    current defaults (gpu_summary.py: the table still shows the SIMT float32 kernels).
# Usage (repository root, GPU machine): bash bench/device/next_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next}; logs=/tmp/next-logs; mkdir -p $out $logs
t0=$(date +%s)
(timeout 300 bash bench/device/gpu_tests.sh $logs/sdpa > $logs/sdpa.txt 2>&1) & p1=$!
(timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short \
   tests/test_profile.py > $logs/profile.txt 2>&1) & p2=$!
wait $p1 $p2
echo "tests wall $(( $(date +%s) - t0 )) s"
cat $logs/sdpa.txt | grep -E "^==|passed|failed" ; tail -n 15 $logs/profile.txt
timeout 130 python3 bench/bench_flex.py --device cuda --lens 16384 --dtypes bfloat16 \
  --cases causal,alibi+causal,softcap+causal --warmup 1 --repeats 5 --out $out/flex 2>&1 \
  | grep -E "^\| 16384 \| 1" | head -6
PROFILE=0 timeout 50 python3 bench/device/host_flex.py 2>&1 | grep -E "idle|^document|^same|^sliding"
left=$(( 570 - $(date +%s) + t0 ))
[ $left -gt 30 ] && OUT=$out timeout $left python3 bench/device/gpu_summary.py 2>&1 | tail -20
tar czf $out/logs.tgz -C /tmp next-logs
echo "total $(( $(date +%s) - t0 )) s"
