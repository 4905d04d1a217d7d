#!/usr/bin/env bash
# Second device call of session 17 (2026-12-02): the per-sequence jagged forward
# (gpu/_mma.py JAG, bench/NOTES.md V2) and the line-info fallback (gpu/_cuda.py
# _compile). A: GPU tests in parallel (varlen in 2 shards, flex document, profile).
# B (GPU quiet): host_flex with the jagged forward on and off, the varlen benchmark,
# then the G16 score_mod-in-registers measurement (bench_flex ALiBi / soft-cap).
# Usage (repository root, GPU machine): bash bench/device/session17.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s17}; logs=/tmp/s17-logs; mkdir -p $out $logs
t0=$(date +%s)
pt="timeout 250 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
pids=()
$pt tests/test_varlen.py -k "not float32" > $logs/varlen-lowp.txt 2>&1 & pids+=($!)
$pt tests/test_varlen.py -k float32 > $logs/varlen-f32.txt 2>&1 & pids+=($!)
$pt tests/test_gpu_flex.py -k document > $logs/flex-document.txt 2>&1 & pids+=($!)
$pt tests/test_profile.py > $logs/profile.txt 2>&1 & pids+=($!)
# compiles the benchmark's kernels into Numba's disk cache while the tests run
(timeout 250 python3 bench/bench_varlen.py --device cuda --repeats 1 --out /tmp/warm \
  > $logs/warm.txt 2>&1) & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/*.txt; do echo "== $(basename $f): $(grep -E '[0-9]+ (passed|failed)' $f | tail -1)"; done
grep -h -B2 -A14 "^____" $logs/*.txt | cut -c1-220 | head -50
for j in 1 0; do
  echo "-- ATTN_GPU_JAGGED=$j"
  ATTN_GPU_JAGGED=$j PROFILE=$j timeout 60 python3 bench/device/host_flex.py \
    > $logs/host-jagged$j.txt 2>&1
  grep -E "idle|visited" $logs/host-jagged$j.txt | head -12
done
sed -n '/^varlen_attn causal=False/,/^dense/p' $logs/host-jagged1.txt | head -30
timeout 120 python3 bench/bench_varlen.py --device cuda --out $out/varlen > $logs/varlen.txt 2>&1
grep "^|" $logs/varlen.txt | head -8
left=$(( 570 - $(date +%s) + t0 ))
[ $left -gt 60 ] && timeout $left python3 bench/bench_flex.py --device cuda --lens 16384 \
  --dtypes bfloat16 --cases causal,alibi+causal,softcap+causal --warmup 1 --repeats 5 \
  --out $out/flex > $logs/flex.txt 2>&1
grep -E "^\|" $logs/flex.txt | head -12
tar czf $out/logs.tgz -C /tmp s17-logs
echo "total $(( $(date +%s) - t0 )) s"
