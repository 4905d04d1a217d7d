#!/usr/bin/env bash
# One device call: the repeated-call check, the summary benchmark, then every GPU test
# file in parallel shards (compile-bound). Usage (repository root, GPU machine):
#   bash bench/device/final_run.sh   (writes logs and JSON under $OUT)
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/final}
python3 bench/device/fastpath_check.py 2>&1 | tail -16
timeout 200 python3 bench/device/gpu_summary.py 2>&1 | tail -20
logs=/tmp/final-logs; mkdir -p $logs
(timeout 330 bash bench/device/gpu_tests.sh $logs/sdpa > $logs/sdpa.txt 2>&1) &
p1=$!
(timeout 330 bash bench/device/gpu_flex_tests.sh $logs/flex > $logs/flex.txt 2>&1) &
p2=$!
others=()
for f in tests/test_varlen.py tests/test_torch_flash.py tests/test_profile.py tests/test_compile.py; do
  [ -f "$f" ] && others+=("$f")
done
(timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider "${others[@]}" > $logs/other.txt 2>&1) &
p3=$!
wait $p1 $p2 $p3
for f in $logs/sdpa.txt $logs/flex.txt; do echo "== $f"; grep -E "passed|failed|error" $f | tail -12; done
echo "== others (${others[*]})"; tail -15 $logs/other.txt
tar czf $out/final-logs.tgz $logs 2>/dev/null
