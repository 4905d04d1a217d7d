#!/usr/bin/env bash
# One device call: every GPU test file in parallel shards (compile-bound) with the
# current defaults, and the registers/local memory of the kernels the mask paths
# compile. Usage (repository root, GPU machine):
#   bash bench/device/matrix_run.sh   (logs under $OUT)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/matrix}
logs=$out/logs; mkdir -p $logs
t0=$(date +%s)
(timeout 420 bash bench/device/gpu_tests.sh $logs/sdpa > $logs/sdpa.txt 2>&1) &
p1=$!
(timeout 420 bash bench/device/gpu_flex_tests.sh $logs/flex > $logs/flex.txt 2>&1) &
p2=$!
(timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_varlen.py \
    tests/test_torch_flash.py tests/test_compile.py tests/test_profile.py > $logs/other.txt 2>&1) &
p3=$!
(timeout 300 python3 bench/device/kernel_resources.py $out/kernel-resources.json > $logs/resources.txt 2>&1) &
p4=$!
wait $p1 $p2 $p3 $p4
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/sdpa.txt $logs/flex.txt; do echo "== $f"; grep -E "passed|failed|error" $f | tail -12; done
echo "== others"; tail -6 $logs/other.txt
tail -20 $logs/resources.txt
grep -h -B2 -A30 "^___" $logs/sdpa/*.log $logs/flex/*.log $logs/other.txt 2>/dev/null | head -150 > $out/failures.txt
