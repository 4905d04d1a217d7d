"""Does Numba's disk cache serve the forward kernel? Run twice in fresh processes."""
import os
import sys
import time

import torch

import attn

try:
    from attn import gpu
except ImportError:
    attn.__path__.append(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    from attn import gpu
from attn.gpu import _kernels

q = torch.randn(1, 2, 256, 64, device="cuda")
torch.cuda.synchronize()
t0 = time.perf_counter()
kern = _kernels.forward_kernel("f32", 64, 64, gpu.tilings(64, 64)["fwd"], True, False)
t1 = time.perf_counter()
gpu.forward(q, q, q, None, True)
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"forward_kernel() {t1 - t0:.2f}s, first call {t2 - t1:.2f}s", type(kern))
d = getattr(kern, "dispatcher", kern)
print("stats", getattr(d, "stats", None), "cache", getattr(d, "_cache", None))
