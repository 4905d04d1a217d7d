#!/usr/bin/env bash
# First device call of the next session (written 2026-12-03, session 19). What session
# 19 did not run on a GPU after G19 (dQ by red.global.add.v2.f32): the whole test_gpu.py
# matrix and test_gpu_flex.py (both dtypes, every case), in four shards, then the
# backward speed (bwd_variants.py) for the record. Next work after it: per-variant
# backward tiles (D 128: 8 warps x 64 queries for the dense and mask_mod variants,
# bench/NOTES.md G19).
# Usage (repository root, GPU machine): bash bench/device/next_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next}; logs=/tmp/next-logs; mkdir -p $out $logs
t0=$(date +%s)
pt="timeout ${LIMIT:-360} python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_gpu.py -k "float32" > $logs/gpu-f32.txt 2>&1 &
$pt tests/test_gpu.py -k "not float32" > $logs/gpu-16.txt 2>&1 &
$pt tests/test_gpu_flex.py -k "dtype0" > $logs/flex-f32.txt 2>&1 &
$pt tests/test_gpu_flex.py -k "dtype1" tests/test_torch_flash.py tests/test_profile.py \
  > $logs/flex-bf16.txt 2>&1 &
wait
for f in $logs/*.txt; do echo "$(basename $f): $(tail -n 1 $f)"; done
grep -hE "^FAILED|^ERROR" $logs/*.txt | cut -c1-300 | head -12
NUMBA_CACHE_DIR=/tmp/nc-now timeout 120 python3 bench/device/bwd_variants.py now \
  > $logs/bwd.txt 2>&1
grep "^ROW" $logs/bwd.txt | cut -c1-400
tar czf $out/next.tgz -C /tmp next-logs
echo "total $(( $(date +%s) - t0 )) s"
