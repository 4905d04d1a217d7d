#!/usr/bin/env bash
# Session 21 (2026-12-04), second device call, after G23 (the tensor-core kernels' tile
# loader with one row step per pass: ptxas bf16 D 128 forward 237 -> 168 registers, the
# two-tile D 128 forward 255 + 40 B spill -> 249, 0 spill): fwd_tiles.py (correctness and
# timing of the default D 128 forward and of two m16 tiles x 32 keys, FLASH beside), then
# gpu_summary.py alone on the GPU for the README table ($OUT/gpu-summary.json).
# Usage (repository root, GPU machine): bash bench/device/session21_a.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s21a}; logs=/tmp/s21a-logs; mkdir -p $out $logs
t0=$(date +%s)
timeout ${FWD_LIMIT:-200} python3 bench/device/fwd_tiles.py 128:4,2,32,0 > $logs/fwd_tiles.txt 2>&1
grep -E "^CHECK|^TIME" $logs/fwd_tiles.txt | cut -c1-400
tail -n 3 $logs/fwd_tiles.txt | cut -c1-300
echo "fwd_tiles done at $(( $(date +%s) - t0 )) s"
OUT=$out timeout ${SUMMARY_LIMIT:-200} python3 bench/device/gpu_summary.py > $logs/summary.txt 2>&1
tail -n 40 $logs/summary.txt | cut -c1-200
tar czf $out/s21a.tgz -C /tmp s21a-logs
echo "total $(( $(date +%s) - t0 )) s"
