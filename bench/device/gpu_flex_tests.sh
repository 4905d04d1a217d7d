#!/usr/bin/env bash
# The FlexAttention GPU tests in parallel shards (one per mod: each compiles its own
# kernel specialisations), plus a regression subset of the SDPA GPU tests.
# Usage: bash bench/device/gpu_flex_tests.sh OUTDIR
set -u
out=${1:-/tmp/gpu-flex-tests}
mkdir -p "$out"
pids=()
for k in causal sliding_window document alibi_causal softcap relative_bias; do
  python -m pytest -m gpu tests/test_gpu_flex.py -q -p no:cacheprovider -k "$k" \
      > "$out/flex-$k.log" 2>&1 &
  pids+=($!)
done
python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    -k "lengths or gqa or masks or public or fully or deterministic" > "$out/sdpa.log" 2>&1 &
pids+=($!)
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for f in "$out"/*.log; do echo "== $f"; tail -3 "$f"; done
exit $rc
