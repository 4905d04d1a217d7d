#!/usr/bin/env bash
# One device call: the float32 varlen/profiler/torch-flash GPU tests (attn.gpu reachable
# from subprocesses through a symlink, as an install would map it), then the benchmarks
# behind the README's GPU tables: varlen, FlexAttention at L = 16k (bf16 and float32) and
# the host-overhead check. Usage (repository root, GPU machine): bash bench/device/session_c.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/session-c}
mkdir -p $out
# attn.profile runs in a subprocess that does not see the tests' attn.__path__ extension.
[ -e attn/gpu ] || ln -s ../gpu attn/gpu
pt="timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_varlen.py -k float32 > $out/varlen-tests.txt 2>&1 &
p1=$!
$pt tests/test_profile.py tests/test_torch_flash.py > $out/profile-tests.txt 2>&1 &
p2=$!
wait $p1 $p2
for f in $out/varlen-tests.txt $out/profile-tests.txt; do
  echo "== $f"; grep -v "DEBUG" $f | grep -B2 -A25 "^___" | head -60; tail -2 $f; done
timeout 100 python3 bench/bench_varlen.py --device cuda --out $out 2>&1 | tail -7
timeout 240 python3 bench/bench_flex.py --device cuda --lens 16384 --warmup 1 --repeats 5 \
    --out $out 2>&1 | grep -A16 "^## Summary"
timeout 60 python3 bench/device/fastpath_check.py 2>&1 | tail -12
rm -f attn/gpu
ls $out
