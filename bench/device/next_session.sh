#!/usr/bin/env bash
# First device call of the next session (written 2026-12-04, session 21). What session 21
# could not run on a GPU: lazy rescaling in the tensor-core forward (gpu/_mma.py
# LAZY_RESCALE, NOTES G24; off by default, simulator-tested) and the jagged forward with
# left window edges on the small tiles (G23: the two-tile D 128 variant spilled 56 B).
# 1. lazy_check.py: mma_check's correctness groups with ATTN_GPU_LAZY_RESCALE=1, then the
#    bf16 forward timing off / on / off / on (FLASH beside the first).
# 2. The GPU test files with ATTN_GPU_LAZY_RESCALE=1 in pytest-xdist workers (carry the
#    pytest_xdist and execnet wheels in .whl beside numpy's), and beside them
#    kernel_resources.py at D 128 (expect 0 local bytes for "flex sliding 256").
# If 1 and 2 pass and the timing gains: LAZY_RESCALE's default to on (gpu/_mma.py), NOTES
# G24 and the README; else say why in G24.
# Usage (repository root, GPU machine): bash bench/device/next_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next}; logs=/tmp/next-logs; mkdir -p $out $logs
t0=$(date +%s)
timeout ${LAZY_LIMIT:-240} python3 bench/device/lazy_check.py > $logs/lazy.txt 2>&1
grep -E "^CHECK|^TIME" $logs/lazy.txt | cut -c1-300
tail -n 3 $logs/lazy.txt | cut -c1-300
echo "lazy_check done at $(( $(date +%s) - t0 )) s"
KR_DIMS=128 timeout 200 python3 bench/device/kernel_resources.py $out/kr128.json \
  > $logs/kr128.txt 2>&1 &
ATTN_GPU_LAZY_RESCALE=1 timeout ${LIMIT:-260} python3 -m pytest -m gpu -v \
  -p no:cacheprovider -rfE --tb=short -n ${WORKERS:-12} --dist load tests/test_gpu.py \
  tests/test_gpu_flex.py tests/test_varlen.py tests/test_torch_flash.py \
  tests/test_profile.py > $logs/tests.txt 2>&1
wait
grep -cE " PASSED" $logs/tests.txt | sed 's/^/passed: /'
grep -hE "FAILED|ERROR" $logs/tests.txt | cut -c1-300 | head -20
tail -n 1 $logs/tests.txt | cut -c1-200
grep regs $logs/kr128.txt
tar czf $out/next.tgz -C /tmp next-logs
echo "total $(( $(date +%s) - t0 )) s"
