#!/usr/bin/env bash
# Second device call of 2026-12-02 (session 16): the float32 tensor-core backward's flush
# period (bench/NOTES.md G13/G14) and the sparse forward's per-block cost (G15).
# A: test shards in parallel (3xTF32 backward on; flush every 32 and every 128 queries);
# the torch_flash tests alone with default settings. B (GPU quiet): block-list
# experiment, 3xTF32 backward timing at flush 128 and 64, FlexAttention at L = 16k.
# Usage (repository root, GPU machine): bash bench/device/session16_b.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s16b}; logs=/tmp/s16b-logs; mkdir -p $out $logs
t0=$(date +%s)
pt="timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=line"
pids=()
for fl in 32 128; do
  i=0
  for k in "head_dims_fp32 and False" "head_dims_fp32 and True" "lengths_fp32" \
           "not head_dims and not lengths and not low_precision and not dtype1 and not dtype2"; do
    ATTN_GPU_TF32X3_BWD=1 ATTN_GPU_TF32_BWD_FLUSH=$fl $pt tests/test_gpu.py -k "$k" \
      > $logs/f$fl-sdpa$i.txt 2>&1 & pids+=($!); i=$((i+1))
  done
  ATTN_GPU_TF32X3_BWD=1 ATTN_GPU_TF32_BWD_FLUSH=$fl $pt tests/test_varlen.py -k float32 \
    > $logs/f$fl-varlen.txt 2>&1 & pids+=($!)
  ATTN_GPU_TF32X3_BWD=1 ATTN_GPU_TF32_BWD_FLUSH=$fl $pt tests/test_gpu_flex.py \
    -k "dtype0 and (relative_bias or document or alibi)" > $logs/f$fl-flex.txt 2>&1 & pids+=($!)
done
$pt tests/test_torch_flash.py > $logs/torch_flash.txt 2>&1 & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/*.txt; do echo "== $(basename $f): $(grep -E '[0-9]+ (passed|failed)' $f | tail -1)"; done
grep -h "^FAILED\|Error:\|assert" $logs/*.txt | cut -c1-300 | head -30
BLOCKS_ONLY=1 timeout 90 python3 bench/device/host_flex.py 2>&1 | tail -9
for fl in 128 64; do
  echo "== 3xTF32 backward timing, flush every $fl queries"
  ATTN_GPU_TF32_BWD_FLUSH=$fl TF32_CHECK_MODES=on timeout 100 python3 \
    bench/device/tf32_bwd_check.py $out/f$fl --quick --timing-only 2>&1 | tail -5
done
echo "elapsed $(( $(date +%s) - t0 )) s"
left=$(( 560 - $(date +%s) + t0 ))
if [ $left -gt 60 ]; then
  timeout $left python3 bench/bench_flex.py --device cuda --lens 16384 --dtypes bfloat16 \
    --cases sliding_window_512,document --warmup 1 --repeats 5 --out $out/flex 2>&1 | tail -25
fi
tar czf $out/logs.tgz -C /tmp s16b-logs
