#!/usr/bin/env bash
# Session 18, second device call: the GPU tests after this session's changes (varlen
# memo and bound jagged launch, out in the packed layout, library band mods through the
# per-sequence forward at any batch; the line-info fallback of f6c156f), then
# bench_flex for the band cases (causal, sliding window 512) and the document mask at
# L 16k bf16 (bench/NOTES.md V3, F1).
# Usage (repository root, GPU machine): bash bench/device/session18_b.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s18b}; logs=$out/logs; mkdir -p $logs
t0=$(date +%s)
pt="timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_profile.py > $logs/profile.txt 2>&1 & p1=$!
$pt tests/test_varlen.py > $logs/varlen-tests.txt 2>&1 & p2=$!
bash bench/device/gpu_flex_tests.sh $logs/flex > $logs/flex-tests.txt 2>&1 & p3=$!
wait $p1 $p2 $p3
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/profile.txt $logs/varlen-tests.txt; do tail -n 2 $f; done
grep -E "passed|failed|error" $logs/flex-tests.txt | tail -10
grep -hE "^FAILED|^ERROR" $logs/*.txt $logs/flex/*.log | head -20
left=$(( 575 - $(date +%s) + t0 ))
[ $left -gt 60 ] && timeout $left python3 bench/bench_flex.py --device cuda --lens 16384 \
  --dtypes bfloat16 --cases causal,sliding_window_512,document --warmup 1 --repeats 5 \
  --out $out/flex > $logs/flex.txt 2>&1
grep -E "^\| 16384|Efficiency target" $logs/flex.txt | head -12
echo "total $(( $(date +%s) - t0 )) s"
