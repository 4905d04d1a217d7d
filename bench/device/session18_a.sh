#!/usr/bin/env bash
# Session 18, first device call (device time was scarce: everything in one call).
# 1. GPU tests after this session's changes (varlen memo and bound jagged launch, out in
#    the packed layout, library band mods through the per-sequence forward at any
#    batch, the line-info fallback of f6c156f);
# 2. bench_varlen (bench/NOTES.md V3), then bench_flex for the band cases (causal,
#    sliding window 512) and the document mask, L 16k bf16 (NOTES F1);
# 3. with what is left: where a varlen call's host time goes (host_flex.py, cumulative).
# Usage (repository root, GPU machine): bash bench/device/session18_a.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s18a}; logs=$out/logs; mkdir -p $logs $logs/flex
t0=$(date +%s)
pt="timeout 230 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
pids=()
$pt tests/test_profile.py > $logs/profile.txt 2>&1 & pids+=($!)
$pt tests/test_varlen.py > $logs/varlen-tests.txt 2>&1 & pids+=($!)
for k in causal sliding_window document alibi_causal; do
  $pt tests/test_gpu_flex.py -k "$k" > $logs/flex/flex-$k.log 2>&1 & pids+=($!)
done
$pt tests/test_gpu.py -k "lengths or gqa or masks or public" > $logs/sdpa.txt 2>&1 & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/*.txt $logs/flex/*.log; do echo "$(basename $f): $(tail -n 1 $f)"; done
grep -hE "^FAILED|^ERROR" $logs/*.txt $logs/flex/*.log | cut -c1-300 | head -20
timeout 170 python3 bench/bench_varlen.py --device cuda --out $out/varlen \
  > $logs/varlen.txt 2>&1
grep -E "^\|" $logs/varlen.txt | head -8
echo "varlen done $(( $(date +%s) - t0 )) s"
left=$(( 560 - $(date +%s) + t0 ))
[ $left -gt 60 ] && timeout $left python3 bench/bench_flex.py --device cuda --lens 16384 \
  --dtypes bfloat16 --cases causal,sliding_window_512,document --warmup 1 --repeats 5 \
  --out $out/flex > $logs/flex.txt 2>&1
grep -E "^\| 16384|Efficiency target" $logs/flex.txt | head -12
left=$(( 585 - $(date +%s) + t0 ))
[ $left -gt 15 ] && PROFILE_SORT=cumulative PROFILE_TOP=40 VARLEN_ONLY=1 timeout $left \
  python3 bench/device/host_flex.py > $logs/host.txt 2>&1
grep -E "idle|Error" $logs/host.txt
echo "total $(( $(date +%s) - t0 )) s"
