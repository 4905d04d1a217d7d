#!/usr/bin/env bash
# Session 18, first device call: what session 17 left unverified (the line-info
# fallback, f6c156f; the FlexAttention GPU tests with the jagged forward) and where a
# varlen forward's host time goes on the GPU machine (cumulative profile), before the
# host-time changes of issue 5.
# Usage (repository root, GPU machine): bash bench/device/session18_a.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s18a}; logs=$out/logs; mkdir -p $logs
t0=$(date +%s)
pt="timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_profile.py > $logs/profile.txt 2>&1 & p1=$!
bash bench/device/gpu_flex_tests.sh $logs/flex > $logs/flex-tests.txt 2>&1 & p2=$!
wait $p1 $p2
echo "tests wall $(( $(date +%s) - t0 )) s"
tail -n 5 $logs/profile.txt; grep -E "passed|failed|error" $logs/flex-tests.txt | tail -10
PROFILE_SORT=cumulative PROFILE_TOP=40 VARLEN_ONLY=1 timeout 200 \
  python3 bench/device/host_flex.py > $logs/host.txt 2>&1
grep -E "idle|Error" $logs/host.txt
echo "total $(( $(date +%s) - t0 )) s"
