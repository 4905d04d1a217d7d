#!/usr/bin/env bash
# First device call of the next session (written 2026-12-02, session 17; its device time
# was spent). What session 17 changed but could not check on a GPU:
# 1. tests/test_profile.py::test_gpu_lineinfo_build with the fixed fallback (f6c156f,
#    NOTES L1), beside the FlexAttention tests (all mods) with the jagged forward in;
# 2. with the GPU quiet: G16 (score_mod in registers: ALiBi / soft-cap forward against
#    causal, L 16k bf16; its compiles need minutes, hence the long limit) and the
#    varlen benchmark for the record.
# Usage (repository root, GPU machine): bash bench/device/next_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next}; logs=/tmp/next-logs; mkdir -p $out $logs
t0=$(date +%s)
pt="timeout 250 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_profile.py > $logs/profile.txt 2>&1 & p1=$!
bash bench/device/gpu_flex_tests.sh $logs/flex > $logs/flex-tests.txt 2>&1 & p2=$!
wait $p1 $p2
echo "tests wall $(( $(date +%s) - t0 )) s"
tail -n 3 $logs/profile.txt; grep -E "passed|failed" $logs/flex-tests.txt | tail -8
left=$(( 560 - $(date +%s) + t0 ))
timeout $left python3 bench/bench_flex.py --device cuda --lens 16384 --dtypes bfloat16 \
  --cases causal,alibi+causal,softcap+causal --warmup 1 --repeats 5 --out $out/flex \
  > $logs/flex.txt 2>&1
grep -E "^\|" $logs/flex.txt | head -12
tar czf $out/logs.tgz -C /tmp next-logs
echo "total $(( $(date +%s) - t0 )) s"
