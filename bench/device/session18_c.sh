#!/usr/bin/env bash
# Session 18, last device call (little device time left): the GPU tests that run the
# per-sequence backward (gpu/_mma_bwd.py JAG, opt-in ATTN_GPU_JAGGED_BWD=1 until they
# pass here): varlen forward and backward, flex sliding window and document masks.
# Usage (repository root, GPU machine): bash bench/device/session18_c.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD ATTN_GPU_JAGGED_BWD=1
logs=${OUT:-/tmp/s18c}; mkdir -p $logs
t0=$(date +%s)
pt="timeout ${LIMIT:-170} python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_varlen.py > $logs/varlen-tests.txt 2>&1 & p1=$!
$pt tests/test_gpu_flex.py -k sliding_window > $logs/flex-sliding.txt 2>&1 & p2=$!
$pt tests/test_gpu_flex.py -k document > $logs/flex-document.txt 2>&1 & p3=$!
wait $p1 $p2 $p3
for f in $logs/*.txt; do echo "$(basename $f): $(tail -n 1 $f)"; done
grep -hE "^FAILED|^ERROR" $logs/*.txt | cut -c1-300 | head -12
echo "total $(( $(date +%s) - t0 )) s"
