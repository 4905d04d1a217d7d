#!/usr/bin/env bash
# Session 18, second device call: the per-sequence GPU backward (gpu/_mma_bwd.py JAG,
# bench/NOTES.md G18) and document masks as bands. GPU tests of the flex mods that run
# as bands (causal, sliding window, document) and of varlen, forward and backward; then
# bench_flex (the same cases, L 16k bf16) and bench_varlen. Outputs tarred (the GPU
# machine returns a limited number of files).
# Usage (repository root, GPU machine): bash bench/device/session18_b.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s18b}; logs=/tmp/s18b-logs; mkdir -p $out $logs
t0=$(date +%s)
pt="timeout 175 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
pids=()
$pt tests/test_varlen.py > $logs/varlen-tests.txt 2>&1 & pids+=($!)
for k in "causal and not alibi and not softcap" sliding_window document; do
  $pt tests/test_gpu_flex.py -k "$k" > "$logs/flex-${k%% *}.txt" 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/*.txt; do echo "$(basename $f): $(tail -n 1 $f)"; done
grep -hE "^FAILED|^ERROR|Error" $logs/*.txt | cut -c1-300 | head -12
left=$(( 300 - $(date +%s) + t0 ))
timeout $left python3 bench/bench_flex.py --device cuda --lens 16384 \
  --dtypes bfloat16 --cases causal,sliding_window_512,document --warmup 1 --repeats 5 \
  --out $logs/flex > $logs/flex.txt 2>&1
grep -E "^\| 16384 \| 1|Efficiency target" $logs/flex.txt | head -8
left=$(( 305 - $(date +%s) + t0 ))
[ $left -gt 60 ] && timeout $left python3 bench/bench_varlen.py --device cuda \
  --out $logs/varlen > $logs/varlen.txt 2>&1
grep -E "^\|" $logs/varlen.txt | head -8
tar czf $out/s18b.tgz -C /tmp s18b-logs
echo "total $(( $(date +%s) - t0 )) s"
