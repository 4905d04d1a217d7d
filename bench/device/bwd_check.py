"""GPU machine: float32 backward schedules (dQ by atomics vs the separate dQ kernel)
against PyTorch's EFFICIENT backend, B·L = 16k tokens, H·D = 2048, L = 4096.
TFLOP/s by the FlashAttention formula (fwd 4·B·H·L²·D, halved when causal; fwd+bwd
3.5× that); CUDA events, median of 10 after 3 warm-ups."""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import attn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timed  # noqa: E402

try:
    from attn import gpu
except ImportError:
    attn.__path__.append(ROOT)
    from attn import gpu


rows = []
for D in (64, 128):
    H, L = 2048 // D, 4096
    B = 16384 // L
    for causal in (False, True):
        q, k, v = (torch.randn(B, H, L, D, device="cuda", requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        fl = 4 * B * H * L * L * D / (2 if causal else 1)
        res = {"D": D, "L": L, "causal": causal}

        def ours_fb():
            o = attn.scaled_dot_product_attention(q, k, v, is_causal=causal)
            o.backward(do)

        def ours_f():
            with torch.no_grad():
                attn.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def eff_fb():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)

        def eff_f():
            with torch.no_grad(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        res["attn fwd"] = fl / timed(ours_f, 10, 3) / 1e12
        for mode in ("split", "atomic"):
            os.environ["ATTN_GPU_BWD"] = mode
            res[f"attn fwd+bwd {mode}"] = 3.5 * fl / timed(ours_fb, 10, 3) / 1e12
        os.environ.pop("ATTN_GPU_BWD")
        res["EFFICIENT fwd"] = fl / timed(eff_f, 10, 3) / 1e12
        res["EFFICIENT fwd+bwd"] = 3.5 * fl / timed(eff_fb, 10, 3) / 1e12
        rows.append(res)
        print(json.dumps({k_: (round(v_, 2) if isinstance(v_, float) else v_)
                          for k_, v_ in res.items()}), flush=True)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "date": time.strftime("%Y-%m-%d"), "rows": rows}
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "bwd_check.json"), "w") as f:
        json.dump(out, f, indent=1)
