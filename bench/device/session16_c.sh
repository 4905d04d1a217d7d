#!/usr/bin/env bash
# Third device call of 2026-12-02 (session 16), with the new defaults (3xTF32 float32
# backward on, flushes every 128 queries) and the branch-free mask bits (NOTES G15).
# A: GPU tests in parallel shards (flex, varlen, torch_flash, profile). B (GPU quiet):
# the block-list experiment, varlen and FlexAttention benchmarks, float32 fwd+bwd timing
# at L 1k-16k. Usage (repository root, GPU machine): bash bench/device/session16_c.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s16c}; logs=/tmp/s16c-logs; mkdir -p $out $logs
t0=$(date +%s)
pt="timeout 280 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
pids=()
for k in causal sliding_window document alibi_causal softcap relative_bias; do
  $pt tests/test_gpu_flex.py -k "$k" > $logs/flex-$k.txt 2>&1 & pids+=($!)
done
$pt tests/test_varlen.py -k "not float32" > $logs/varlen-lowp.txt 2>&1 & pids+=($!)
$pt tests/test_varlen.py -k float32 > $logs/varlen-f32.txt 2>&1 & pids+=($!)
$pt tests/test_torch_flash.py > $logs/torch_flash.txt 2>&1 & pids+=($!)
$pt tests/test_profile.py > $logs/profile.txt 2>&1 & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/*.txt; do echo "== $(basename $f): $(grep -E '[0-9]+ (passed|failed)' $f | tail -1)"; done
grep -h -B2 -A12 "^____" $logs/*.txt | cut -c1-220 | head -60
BLOCKS_ONLY=1 PROFILE=0 timeout 90 python3 bench/device/host_flex.py 2>&1 | tail -7
timeout 120 python3 bench/bench_varlen.py --device cuda --out $out/varlen 2>&1 | grep "^|" | head -8
left=$(( 540 - $(date +%s) + t0 ))
[ $left -gt 60 ] && timeout $(( left > 130 ? 130 : left )) python3 bench/bench_flex.py \
  --device cuda --lens 16384 --dtypes bfloat16 --cases causal,sliding_window_512,document \
  --warmup 1 --repeats 5 --out $out/flex 2>&1 | grep -E "^\| 16384 \| 1|Efficiency" | head -8
left=$(( 560 - $(date +%s) + t0 ))
[ $left -gt 40 ] && TF32_CHECK_MODES=on timeout $left python3 bench/device/tf32_bwd_check.py \
  $out/tf32 --timing-only 2>&1 | tail -13
tar czf $out/logs.tgz -C /tmp s16c-logs
echo "total $(( $(date +%s) - t0 )) s"
