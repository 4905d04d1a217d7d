#!/usr/bin/env bash
# First device call of the next session (written 2026-12-04, session 21). What session 21
# could not run on a GPU: the tensor-core forward's lazy rescaling (gpu/_mma.py
# LAZY_RESCALE, NOTES G24) and three K/V stages (FWD_STAGES, G25), both off by default
# and simulator-tested, and the jagged forward with left window edges on the small tiles
# (G23: the two-tile D 128 variant spilled 56 B).
# 1. fwd_flags.py: mma_check's correctness groups with both flags on, then the bf16
#    forward timing per combination (FLASH beside the first, the default again last).
# 2. The GPU test files with both flags on in pytest-xdist workers (carry the
#    pytest_xdist and execnet wheels in .whl beside numpy's), and beside them
#    kernel_resources.py at D 128 (expect 0 local bytes for "flex sliding 256").
# Each flag that passes and gains: its default to on (gpu/_mma.py), NOTES G24 / G25 and
# the README; else say why there.
# Usage (repository root, GPU machine): bash bench/device/next_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next}; logs=/tmp/next-logs; mkdir -p $out $logs
t0=$(date +%s)
timeout ${FLAGS_LIMIT:-300} python3 bench/device/fwd_flags.py > $logs/flags.txt 2>&1
grep -E "^CHECK|^TIME" $logs/flags.txt | cut -c1-300
tail -n 3 $logs/flags.txt | cut -c1-300
echo "fwd_flags done at $(( $(date +%s) - t0 )) s"
KR_DIMS=128 timeout 200 python3 bench/device/kernel_resources.py $out/kr128.json \
  > $logs/kr128.txt 2>&1 &
ATTN_GPU_LAZY_RESCALE=1 ATTN_GPU_FWD_STAGES=3 timeout ${LIMIT:-250} \
  python3 -m pytest -m gpu -v -p no:cacheprovider -rfE --tb=short -n ${WORKERS:-14} --dist load tests/test_gpu.py \
  tests/test_gpu_flex.py tests/test_varlen.py tests/test_torch_flash.py \
  tests/test_profile.py > $logs/tests.txt 2>&1
wait
grep -cE " PASSED" $logs/tests.txt | sed 's/^/passed: /'
grep -hE "FAILED|ERROR" $logs/tests.txt | cut -c1-300 | head -20
tail -n 1 $logs/tests.txt | cut -c1-200
grep regs $logs/kr128.txt
tar czf $out/next.tgz -C /tmp next-logs
echo "total $(( $(date +%s) - t0 )) s"
