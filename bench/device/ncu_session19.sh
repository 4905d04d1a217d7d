#!/usr/bin/env bash
# Session 19: Nsight Compute on attn's tensor-core forward and backward against
# PyTorch's FLASH kernels (issue 8: where the backward's time goes), then the GPU tests
# that the per-sequence backward's new default touches.
# Usage (repository root, GPU machine): bash bench/device/ncu_session19.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s19}; logs=/tmp/s19-logs; mkdir -p $out $logs
t0=$(date +%s)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
sec="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats"
for cfg in "--D 64" "--D 128"; do
  tag=$(echo $cfg | tr -d ' -')
  timeout 150 $NCU --clock-control none --profile-from-start off $sec \
    python3 bench/device/ncu_attn.py $cfg > $logs/ncu-$tag.txt 2>&1
  echo "ncu $tag rc $? $(grep -c '^  [a-zA-Z_].*(.*)x(.*)' $logs/ncu-$tag.txt) kernels, $(( $(date +%s) - t0 )) s"
done
grep -E "^  [^ ].*\(|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Thr|Memory Thr|Issue Slots Busy|No Eligible|Bank Conflicts|Shared Load|Shared Store" $logs/ncu-D64.txt | cut -c1-150 | head -80
pt="timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short"
$pt tests/test_varlen.py > $logs/varlen-tests.txt 2>&1 & p1=$!
$pt tests/test_gpu_flex.py -k "causal and not alibi" > $logs/flex-causal.txt 2>&1 & p2=$!
$pt tests/test_gpu_flex.py -k "alibi or softcap or relative" > $logs/flex-mods.txt 2>&1 & p3=$!
$pt tests/test_gpu.py -k "lengths or gqa or masks or public" > $logs/gpu-subset.txt 2>&1 & p4=$!
wait $p1 $p2 $p3 $p4
for f in $logs/*tests.txt $logs/flex-*.txt $logs/gpu-subset.txt; do echo "$(basename $f): $(tail -n 1 $f)"; done
grep -hE "^FAILED|^ERROR" $logs/*.txt | cut -c1-300 | head -12
tar czf $out/s19.tgz -C /tmp s19-logs
echo "total $(( $(date +%s) - t0 )) s"
