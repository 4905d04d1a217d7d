#!/usr/bin/env bash
# Second device call of the next session (written 2026-12-04, session 21): the 16-bit
# backward at D 64 with K/V fragments in registers (ATTN_GPU_MMA_BWD_CONFIG
# "64:4,64,1"). G8 kept them in shared memory because that variant needed 255 registers
# and spilled; after G23's loader ptxas gives it 252 (causal 238) registers and 0 spill.
# mma_bwd_check.py twice, each in its own process: the default tiles, then KREG (24
# gradient cases each, bf16 fwd / bwd timing with FLASH beside). If KREG passes and its
# backward is faster: the D 64 entry of gpu/_mma_bwd.py _TILES, NOTES, README.
# Usage (repository root, GPU machine): bash bench/device/next_session_2.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/next2}; logs=/tmp/next2-logs; mkdir -p $out/default $out/kreg $logs
t0=$(date +%s)
OUT=$out/default timeout 200 python3 bench/device/mma_bwd_check.py > $logs/default.txt 2>&1
sed -n '/== correctness/,$p' $logs/default.txt | grep -vE "^ok " | cut -c1-200
echo "default done at $(( $(date +%s) - t0 )) s"
ATTN_GPU_MMA_BWD_CONFIG="64:4,64,1" OUT=$out/kreg timeout 200 \
  python3 bench/device/mma_bwd_check.py > $logs/kreg.txt 2>&1
sed -n '/== correctness/,$p' $logs/kreg.txt | grep -vE "^ok " | cut -c1-200
tar czf $out/next2.tgz -C /tmp next2-logs
echo "total $(( $(date +%s) - t0 )) s"
