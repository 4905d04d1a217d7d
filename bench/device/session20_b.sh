#!/usr/bin/env bash
# Session 20, second device call, after G20 and its fix (the jagged backward on the
# large tiles whatever the BLOCK_SIZE): every GPU test file in pytest-xdist workers
# (the wheels carried in .whl), then fwd_tiles.py (two m16 tiles per warp at D = 128,
# NOTES G21) and gpu_summary.py alone on the GPU for the README table
# ($OUT/gpu-summary.json).
# Usage (repository root, GPU machine): bash bench/device/session20_b.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s20b}; logs=/tmp/s20b-logs; mkdir -p $out $logs
t0=$(date +%s)
timeout ${LIMIT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short \
  -n ${WORKERS:-12} --dist load tests/test_gpu.py tests/test_gpu_flex.py \
  tests/test_varlen.py tests/test_torch_flash.py tests/test_profile.py > $logs/tests.txt 2>&1
tail -n 2 $logs/tests.txt
grep -hE "^FAILED|^ERROR" $logs/tests.txt | cut -c1-300 | head -20
echo "tests done at $(( $(date +%s) - t0 )) s"
timeout ${FWD_LIMIT:-180} python3 bench/device/fwd_tiles.py > $logs/fwd_tiles.txt 2>&1
grep -E "^CHECK|^TIME" $logs/fwd_tiles.txt | cut -c1-400
echo "fwd_tiles done at $(( $(date +%s) - t0 )) s"
OUT=$out timeout ${SUMMARY_LIMIT:-120} python3 bench/device/gpu_summary.py > $logs/summary.txt 2>&1
tail -n 40 $logs/summary.txt | cut -c1-200
tar czf $out/s20b.tgz -C /tmp s20b-logs
echo "total $(( $(date +%s) - t0 )) s"
