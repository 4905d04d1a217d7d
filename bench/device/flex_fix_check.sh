#!/usr/bin/env bash
# One device call after a change to the block-list path of the tensor-core kernels:
# the float16/bfloat16 FlexAttention and varlen GPU tests, kernel registers/local memory,
# then the jagged and FlexAttention GPU benchmarks (mask-only cases).
# Usage (repository root, GPU machine): bash bench/device/flex_fix_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/flexfix}
logs=$out/logs; mkdir -p $logs
t0=$(date +%s)
pids=()
for k in causal sliding_window document alibi_causal softcap relative_bias; do
  (timeout 240 python3 -m pytest -m gpu tests/test_gpu_flex.py -q -p no:cacheprovider -k "$k and dtype1" > $logs/flex-$k.log 2>&1) &
  pids+=($!)
done
(timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_varlen.py -k "gpu and bfloat16" > $logs/varlen.log 2>&1) &
pids+=($!)
(timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "masks or fully" > $logs/masks.log 2>&1) &
pids+=($!)
(timeout 240 python3 bench/device/kernel_resources.py $out/kernel-resources.json > $logs/resources.log 2>&1) &
pids+=($!)
wait "${pids[@]}"
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/*.log; do echo "== $f: $(grep -E 'passed|failed|error' $f | tail -1)"; done
cat $logs/resources.log | tail -30
timeout 100 python3 bench/bench_varlen.py --device cuda --out $out 2>&1 | tail -7
timeout 150 python3 bench/bench_flex.py --device cuda --lens 16384 --dtypes bfloat16 \
    --cases causal,sliding_window_512,document --out $out 2>&1 | grep -A3 "^## Summary\|wall"
ls $out
