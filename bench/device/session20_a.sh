#!/usr/bin/env bash
# Session 20, first G20 device call: the 16-bit backward at D = 128 on 8 warps x 64
# queries (causal and jagged partial blocks by bit sets; attn_mask and BLOCK_SIZE 64 on
# the small tiles). 1. mma_bwd_check.py alone on the GPU (its 24 correctness cases, the
# kernels' registers / local memory, then the bf16 timing against FLASH); 2. the GPU
# test files in pytest-xdist workers (pytest_xdist + execnet wheels carried in .whl:
# Numba compiles are single-threaded, so the 16 cores compile in parallel).
# Usage (repository root, GPU machine): bash bench/device/session20_a.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s20a}; logs=/tmp/s20a-logs; mkdir -p $out $logs
t0=$(date +%s)
OUT=$out timeout 200 python3 bench/device/mma_bwd_check.py > $logs/mma_bwd.txt 2>&1
sed -n '/== correctness/,$p' $logs/mma_bwd.txt | grep -vE "^ok " | cut -c1-300
echo "mma_bwd_check done at $(( $(date +%s) - t0 )) s"
timeout ${LIMIT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short \
  -n ${WORKERS:-12} --dist load tests/test_gpu.py tests/test_gpu_flex.py \
  tests/test_varlen.py > $logs/tests.txt 2>&1
tail -n 3 $logs/tests.txt
grep -hE "^FAILED|^ERROR" $logs/tests.txt | cut -c1-300 | head -20
tar czf $out/s20a.tgz -C /tmp s20a-logs
echo "total $(( $(date +%s) - t0 )) s"
