#!/usr/bin/env bash
# Short device call: the GPU profiler report, the CUDA transformer test of the flash
# registry, and the tensor-core backward check. Run from the repository root.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/last}
timeout 60 python3 -c "
import sys, attn; attn.__path__.append('.')
from attn.profile import main
main(['--device', 'cuda', '--dtype', 'bfloat16', '--seqlen', '2048', '--headdim', '64', '--causal', '--out', '$out/prof'])
" 2>&1 | tail -40
timeout 70 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_torch_flash.py -k "transformer" 2>&1 | tail -4
[ -f bench/device/mma_bwd_check.py ] && timeout 150 python3 bench/device/mma_bwd_check.py 2>&1 | tail -40
ls $out $out/prof 2>/dev/null | head
