#!/usr/bin/env bash
# First device call of the next session (written 2026-12-01 when device time ran out):
# the whole GPU test matrix with this session's defaults (float32 3xTF32 forward, the
# mask bit-set path for partial blocks) and the float32 tensor-core backward check.
# Usage (repository root, GPU machine): bash bench/device/next_session_a.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
bash bench/device/matrix_run.sh
timeout 150 python3 bench/device/tf32_bwd_check.py 2>&1 | tail -30
ls ${OUT:-/tmp/matrix}
