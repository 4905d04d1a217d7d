#!/usr/bin/env bash
# First device call of the next session (written 2026-12-01 when device time ran out):
# the whole GPU test matrix with this session's defaults (float32 3xTF32 forward, the
# mask bit-set path for partial blocks), the mask-path kernels' resources, and the
# float32 tensor-core backward check if it exists. Usage (repository root, GPU machine):
#   bash bench/device/next_session_a.sh   (logs under $OUT)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next-a}
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
[ -f bench/device/tf32_bwd_check.py ] && timeout 150 python3 bench/device/tf32_bwd_check.py 2>&1 | tail -30
ls $out
