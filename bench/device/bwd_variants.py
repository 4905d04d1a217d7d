"""Speed of the 16-bit tensor-core backward under one variant (bench/NOTES.md G19), in a
process of its own: ``python3 bench/device/bwd_variants.py NAME`` prints
mma_bwd_check.timing()'s rows (bf16, B 4, L 4096, H·D 2048, D 64/128, causal and not,
against PyTorch's FLASH backend in the same process) tagged with NAME.

NAME ``scalar_red``: dQ by two scalar float32 atomics per register pair (the kernel
before G19) instead of red.global.add.v2.f32; any other name runs the kernel as it is
(tile configs come from ATTN_GPU_MMA_BWD_CONFIG). Give each process its own
NUMBA_CACHE_DIR: the on-disk cache does not see the swapped device function.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _checks import gpu_modules  # noqa: E402

name = sys.argv[1]
attn, gpu = gpu_modules()
if name == "scalar_red":
    from numba import cuda

    @cuda.jit(device=True, inline=True)
    def _two(a, i, x, y):
        cuda.atomic.add(a, i, x)
        cuda.atomic.add(a, i + 1, y)

    gpu._mma_bwd.red_add2 = _two

import mma_bwd_check  # noqa: E402

for row in mma_bwd_check.timing():
    row["variant"] = name
    print("ROW " + json.dumps(row), flush=True)
