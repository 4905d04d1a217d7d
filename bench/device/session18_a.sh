#!/usr/bin/env bash
# Session 18, first device call (GPU quiet): varlen_attn after the host-time changes of
# bench/NOTES.md V3 (repeated-call memo, out in the packed layout, one trace per call,
# no max_scores fill): where a call's host time goes (host_flex.py, cumulative
# profile), then bench_varlen for the record (warm-up run first: its compiles).
# Usage (repository root, GPU machine): bash bench/device/session18_a.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
out=${OUT:-/tmp/s18a}; logs=$out/logs; mkdir -p $logs
t0=$(date +%s)
PROFILE_SORT=cumulative PROFILE_TOP=45 VARLEN_ONLY=1 timeout 240 \
  python3 bench/device/host_flex.py > $logs/host.txt 2>&1
grep -E "idle|Error" $logs/host.txt
echo "host profile $(( $(date +%s) - t0 )) s"
timeout 150 python3 bench/bench_varlen.py --device cuda --repeats 1 --out /tmp/warm \
  > $logs/varlen-warm.txt 2>&1
left=$(( 570 - $(date +%s) + t0 ))
timeout $left python3 bench/bench_varlen.py --device cuda --out $out/varlen \
  > $logs/varlen.txt 2>&1
grep -E "^\|" $logs/varlen.txt | head -8
echo "total $(( $(date +%s) - t0 )) s"
