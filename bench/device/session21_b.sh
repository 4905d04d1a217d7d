#!/usr/bin/env bash
# Session 21 (2026-12-04), third device call, after the D 128 forward's default moved to
# two m16 tiles x 32 keys (gpu/_mma.py _TILES; attn_mask and BLOCK_SIZE 64 on the small
# tiles, one tile x 64 keys): fwd_tiles.py (correctness of both, timing with FLASH
# beside), mma_bwd_check.py (24 gradient cases, bf16 fwd / bwd timing), gpu_summary.py
# for bfloat16 (the README table; its float32 rows came from session21_a.sh), the
# registers and local memory of each variant, then the GPU test files in pytest-xdist
# workers for the time that is left of DEADLINE seconds.
# Usage (repository root, GPU machine): bash bench/device/session21_b.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s21b}; logs=/tmp/s21b-logs; mkdir -p $out $logs
t0=$(date +%s)
left() { echo $(( ${DEADLINE:-540} - ($(date +%s) - t0) )); }
timeout 100 python3 bench/device/fwd_tiles.py 128:4,1,64,1 > $logs/fwd_tiles.txt 2>&1
grep -E "^CHECK|^TIME" $logs/fwd_tiles.txt | cut -c1-260
echo "fwd_tiles done at $(( $(date +%s) - t0 )) s"
OUT=$out timeout 90 python3 bench/device/mma_bwd_check.py > $logs/mma_bwd.txt 2>&1
sed -n '/== correctness/,$p' $logs/mma_bwd.txt | grep -vE "^ok |^\('" | cut -c1-200
echo "mma_bwd done at $(( $(date +%s) - t0 )) s"
OUT=$out SUMMARY_DTYPES=bfloat16 timeout 110 python3 bench/device/gpu_summary.py > $logs/summary.txt 2>&1
tail -n 10 $logs/summary.txt | cut -c1-200
echo "summary done at $(( $(date +%s) - t0 )) s"
timeout 70 python3 bench/device/kernel_resources.py $out/kernel-resources.json > $logs/res.txt 2>&1
tail -n 40 $logs/res.txt | cut -c1-160
echo "resources done at $(( $(date +%s) - t0 )) s"
timeout $(( $(left) - 15 )) python3 -m pytest -m gpu -v -p no:cacheprovider -rfE --tb=short \
  -n ${WORKERS:-14} --dist load tests/test_gpu.py tests/test_gpu_flex.py tests/test_varlen.py \
  tests/test_torch_flash.py tests/test_profile.py > $logs/tests.txt 2>&1
grep -cE " PASSED" $logs/tests.txt | sed 's/^/passed: /'
grep -hE "FAILED|ERROR" $logs/tests.txt | cut -c1-300 | head -20
tail -n 2 $logs/tests.txt | cut -c1-200
tar czf $out/s21b.tgz -C /tmp s21b-logs
echo "total $(( $(date +%s) - t0 )) s"
