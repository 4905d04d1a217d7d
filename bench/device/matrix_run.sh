#!/usr/bin/env bash
# One device call: every GPU test file in parallel shards (compile-bound) with the
# current defaults (tensor-core forward and backward for float16/bfloat16), then the
# jagged-batch benchmark on the GPU. Usage (repository root, GPU machine):
#   bash bench/device/matrix_run.sh   (logs and results under $OUT)
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/matrix}
logs=$out/logs; mkdir -p $logs
t0=$(date +%s)
(timeout 400 bash bench/device/gpu_tests.sh $logs/sdpa > $logs/sdpa.txt 2>&1) &
p1=$!
(timeout 400 bash bench/device/gpu_flex_tests.sh $logs/flex > $logs/flex.txt 2>&1) &
p2=$!
(timeout 400 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_varlen.py \
    tests/test_torch_flash.py tests/test_compile.py > $logs/other.txt 2>&1) &
p3=$!
wait $p1 $p2 $p3
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/sdpa.txt $logs/flex.txt; do echo "== $f"; grep -E "passed|failed|error" $f | tail -12; done
echo "== others"; tail -15 $logs/other.txt
grep -h -B2 -A25 "^___\|Error\|assert" $logs/sdpa/*.log $logs/flex/*.log 2>/dev/null | head -120 > $out/failures.txt
timeout 150 python3 bench/bench_varlen.py --device cuda --out $out 2>&1 | tail -12
ls $out
