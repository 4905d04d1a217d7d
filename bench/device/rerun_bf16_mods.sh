#!/usr/bin/env bash
# One device call: the float16/bfloat16 mod/varlen GPU tests (tensor-core backward with
# mods), the deterministic test, then the jagged and FlexAttention GPU benchmarks and the
# host-overhead check. Usage (repository root, GPU machine): bash bench/device/rerun_bf16_mods.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/rerun}
logs=$out/logs; mkdir -p $logs
t0=$(date +%s)
pids=()
for k in causal sliding_window document alibi_causal softcap relative_bias; do
  (timeout 300 python3 -m pytest -m gpu tests/test_gpu_flex.py -q -p no:cacheprovider -k "$k and dtype1" > $logs/flex-$k.log 2>&1) &
  pids+=($!)
done
(timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_varlen.py tests/test_torch_flash.py -k "varlen" > $logs/varlen.log 2>&1) &
pids+=($!)
(timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "deterministic" > $logs/det.log 2>&1) &
pids+=($!)
wait "${pids[@]}"
echo "tests wall $(( $(date +%s) - t0 )) s"
for f in $logs/*.log; do echo "== $f: $(grep -E 'passed|failed|error' $f | tail -1)"; done
timeout 120 python3 bench/bench_varlen.py --device cuda --out $out 2>&1 | tail -8
timeout 200 python3 bench/bench_flex.py --device cuda --lens 16384 --dtypes bfloat16 --out $out 2>&1 | tail -8
timeout 60 python3 bench/device/fastpath_check.py 2>&1 | tail -16
ls $out
