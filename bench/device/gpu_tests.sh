#!/usr/bin/env bash
# Run the real-GPU test matrix on the GPU machine in parallel shards: the run is
# dominated by Numba compiling one specialisation per (dtype, head dim, causal, mask),
# which is single-threaded per process, so shards compile side by side.
# Usage: bash bench/device/gpu_tests.sh OUTDIR
set -u
out=${1:-/tmp/gpu-tests}
mkdir -p "$out"
shards=("head_dims and False" "head_dims and True" "lengths" "low_precision and False" "low_precision and True"
        "not head_dims and not lengths and not low_precision")
pids=()
for i in "${!shards[@]}"; do
  python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -k "${shards[$i]}" \
      > "$out/shard$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for i in "${!shards[@]}"; do echo "== -k '${shards[$i]}'"; tail -3 "$out/shard$i.log"; done
exit $rc
