#!/usr/bin/env bash
# First device call of the next session (written 2026-12-03, session 20). What session
# 20 could not run on a GPU after G20's fix (the jagged backward on the large tiles
# whatever the BLOCK_SIZE) and GPU max_scores (gpu/_mma.py MAXS, off by default until it
# has run here: test_flex_gpu_max_scores switches it on): the BLOCK_SIZE 64 and
# max_scores flex cases first (if they pass, set gpu.MAX_SCORES's default to on and say
# so in the README), then every GPU test file
# in pytest-xdist workers (carry the pytest_xdist and execnet wheels in .whl beside
# numpy's: 12 workers ran 110 tests in 230 s), verbose so the log names each test.
# Then mma_bwd_check.py alone on the GPU (24 gradient cases and the bf16 timing).
# Next work after it: NOTES G20/G21 (forward at D 128: two m16 tiles x 32 keys ran +7-10%
# but spills 40 bytes; free registers first).
# Usage (repository root, GPU machine): bash bench/device/next_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next}; logs=/tmp/next-logs; mkdir -p $out $logs
t0=$(date +%s)
pt="python3 -m pytest -m gpu -p no:cacheprovider -rfE --tb=short"
timeout 150 $pt -q -n 4 tests/test_gpu_flex.py -k "block64 or max_scores" > $logs/block64.txt 2>&1
tail -n 3 $logs/block64.txt
timeout ${LIMIT:-330} $pt -v -n ${WORKERS:-12} --dist load tests/test_gpu.py \
  tests/test_gpu_flex.py tests/test_varlen.py tests/test_torch_flash.py \
  tests/test_profile.py > $logs/tests.txt 2>&1
grep -cE " PASSED" $logs/tests.txt | sed 's/^/passed: /'
grep -hE "FAILED|ERROR" $logs/tests.txt | cut -c1-300 | head -20
echo "tests done at $(( $(date +%s) - t0 )) s"
OUT=$out timeout 200 python3 bench/device/mma_bwd_check.py > $logs/mma_bwd.txt 2>&1
sed -n '/== correctness/,$p' $logs/mma_bwd.txt | grep -vE "^ok " | cut -c1-300
tar czf $out/next.tgz -C /tmp next-logs
echo "total $(( $(date +%s) - t0 )) s"
