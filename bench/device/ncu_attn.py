"""One bf16/fp16 attention problem for Nsight Compute: attn's forward+backward and
PyTorch's FLASH backend on the same inputs, inside torch.cuda.profiler.start/stop so
`ncu --profile-from-start off` sees only these kernels (the warm-up calls compile and
bind first). Used by bench/device/ncu_session19.sh; prints nothing useful by itself.

    python3 bench/device/ncu_attn.py [--D 64] [--L 4096] [--causal] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from _checks import gpu_modules  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--D", type=int, default=64)
p.add_argument("--L", type=int, default=4096)
p.add_argument("--causal", action="store_true")
p.add_argument("--dtype", default="bfloat16")
a = p.parse_args()
attn, _ = gpu_modules()
dt = getattr(torch, a.dtype)
B, H = 16384 // a.L, 2048 // a.D
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, H, a.L, a.D, device="cuda", dtype=dt, generator=g)
           .requires_grad_() for _ in range(3))
do = torch.randn(B, H, a.L, a.D, device="cuda", dtype=dt, generator=g)


def step(fn):
    out = fn(q, k, v, is_causal=a.causal)
    torch.autograd.grad(out, (q, k, v), do)


for _ in range(2):
    step(attn.scaled_dot_product_attention)
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    step(torch.nn.functional.scaled_dot_product_attention)
torch.cuda.synchronize()
torch.cuda.profiler.start()
step(attn.scaled_dot_product_attention)
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    step(torch.nn.functional.scaled_dot_product_attention)
torch.cuda.synchronize()
torch.cuda.profiler.stop()
