#!/usr/bin/env bash
# The float32 part of the GPU test matrix (3xTF32 forward; the 3xTF32 backward too when
# the caller sets ATTN_GPU_TF32X3_BWD=1), in parallel shards (compile-bound), plus the
# profiler tests. Usage (repository root, GPU machine): bash bench/device/fp32_matrix.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/fp32-matrix}
logs=$out/logs; mkdir -p $logs
t0=$(date +%s)
pt="timeout 400 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
pids=()
i=0
for k in "head_dims_fp32 and False" "head_dims_fp32 and True" "lengths_fp32 and False" \
         "lengths_fp32 and True" \
         "not head_dims and not lengths and not low_precision and not dtype1 and not dtype2"; do
  $pt tests/test_gpu.py -k "$k" > $logs/sdpa$i.txt 2>&1 & pids+=($!); i=$((i+1))
done
for k in causal sliding_window document alibi_causal softcap relative_bias; do
  $pt tests/test_gpu_flex.py -k "$k and dtype0" > $logs/flex-$k.txt 2>&1 & pids+=($!)
done
$pt tests/test_varlen.py -k float32 > $logs/varlen.txt 2>&1 & pids+=($!)
$pt tests/test_profile.py tests/test_torch_flash.py > $logs/profile.txt 2>&1 & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/*.txt; do echo "== $f: $(grep -E '[0-9]+ (passed|failed)' $f | tail -1)"; done
grep -h -A40 "^FAILED\|^___\|Error" $logs/*.txt | head -120
