"""Where the host time of one tiny attn.gpu call goes (cProfile, GPU machine)."""
import cProfile
import pstats
import sys

import torch

import os

import attn

try:
    from attn import gpu
except ImportError:  # run from the source tree without an install (the GPU machine)
    attn.__path__.append(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    from attn import gpu

q, k, v = (torch.randn(1, 1, 16, 64, device="cuda") for _ in range(3))
for fn_name, fn in (("gpu.forward", lambda: gpu.forward(q, k, v)),
                    ("attn.sdpa", lambda: attn.scaled_dot_product_attention(q, k, v))):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(2000):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    print("=====", fn_name)
    pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(18)
