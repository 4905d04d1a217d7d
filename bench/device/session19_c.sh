#!/usr/bin/env bash
# Session 19, last device call: GPU tests on the dQ reductions as red.global.add.v2.f32
# (NOTES G19; mma_bwd_check.py's 24 cases passed in session19_b.sh) through the public
# paths: varlen (per-sequence backward), test_gpu.py's subset, flex bands and the
# alibi -> softcap pair with the Dynamo reset.
# Usage (repository root, GPU machine): bash bench/device/session19_c.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s19c}; logs=/tmp/s19c-logs; mkdir -p $out $logs
t0=$(date +%s)
pt="timeout ${LIMIT:-190} python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_varlen.py > $logs/varlen.txt 2>&1 &
[ -n "${GPU_SUBSET:-}" ] && $pt tests/test_gpu.py -k "lengths or gqa or masks or public" > $logs/gpu-subset.txt 2>&1 &
$pt tests/test_gpu_flex.py -k "dtype1 and (sliding or document)" > $logs/flex-bands.txt 2>&1 &
$pt tests/test_gpu_flex.py -k "64 and dtype0 and (alibi or softcap)" > $logs/flex-pair.txt 2>&1 &
wait
for f in $logs/*.txt; do echo "$(basename $f): $(tail -n 1 $f)"; done
grep -hE "^FAILED|^ERROR|^E  " $logs/*.txt | cut -c1-300 | head -12
tar czf $out/s19c.tgz -C /tmp s19c-logs
echo "total $(( $(date +%s) - t0 )) s"
