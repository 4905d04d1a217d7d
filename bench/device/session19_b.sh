#!/usr/bin/env bash
# Session 19, second device call: the dQ reductions as red.global.add.v2.f32 (NOTES G19)
# — correctness (mma_bwd_check.py, 24 cases) and speed against the scalar atomics and
# 8-warp (128-key) tiles, all against FLASH in the same processes; then the float32
# soft-cap flex test that failed in ncu_session19.sh (alone and after alibi_causal).
# Usage (repository root, GPU machine): bash bench/device/session19_b.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s19b}; logs=/tmp/s19b-logs; mkdir -p $out $logs
t0=$(date +%s)
OUT=$logs/check timeout 200 python3 bench/device/mma_bwd_check.py > $logs/check.txt 2>&1
grep -E "cases,|^BAD|^ROW|^\{" $logs/check.txt | cut -c1-400 | head -30
echo "check $(( $(date +%s) - t0 )) s"
run() {  # name [config]
  NUMBA_CACHE_DIR=/tmp/nc-$1 ATTN_GPU_MMA_BWD_CONFIG="${2:-}" timeout 100 \
    python3 bench/device/bwd_variants.py $1 > $logs/var-$1.txt 2>&1
  grep "^ROW" $logs/var-$1.txt | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l[4:]); print(r['variant'], r['D'], r['causal'], r.get('mma_bwd_config'),
      *(f\"{k} {r[k]:.1f}\" for k in ('attn_fwd','attn_bwd','attn_fwdbwd','flash_fwd','flash_bwd','flash_fwdbwd') if k in r),
      f\"ratio {r.get('fwdbwd_ratio',0):.2f}\", r.get('error','')[-200:])"
  echo "$1 $(( $(date +%s) - t0 )) s"
}
run scalar_red
run w8 "64:8,64,0;128:8,32,0"
run w8b "128:8,64,0"
pt="timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_gpu_flex.py -k "64 and dtype0 and softcap" > $logs/softcap.txt 2>&1 & p1=$!
$pt tests/test_gpu_flex.py -k "64 and dtype0 and (alibi or softcap)" > $logs/alibi-softcap.txt 2>&1 & p2=$!
wait $p1 $p2
for f in $logs/softcap.txt $logs/alibi-softcap.txt; do echo "$(basename $f): $(tail -n 1 $f)"; done
grep -hE "^E |Error|mismatch|assert" $logs/softcap.txt $logs/alibi-softcap.txt | cut -c1-300 | head -16
tar czf $out/s19b.tgz -C /tmp s19b-logs
echo "total $(( $(date +%s) - t0 )) s"
