"""GPU machine: attn's gpu backend against PyTorch's SDPA backends in one process, for
the README summary: float32 and bfloat16, head dims 64 and 128, L = 4096 and 16384 with
B·L = 16k tokens and H·D = 2048, causal and not, forward and forward+backward.
TFLOP/s by the FlashAttention formula (fwd 4·B·H·L²·D, halved when causal; fwd+bwd
3.5× that); CUDA events, median of 7 after 2 warm-ups; new inputs per configuration.
Writes $OUT/gpu-summary.json; prints one line per configuration."""
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
    from attn import gpu  # noqa: F401
except ImportError:
    attn.__path__.append(ROOT)
    from attn import gpu  # noqa: F401

torch.backends.cuda.matmul.allow_tf32 = False


PEERS = {"EFFICIENT": SDPBackend.EFFICIENT_ATTENTION, "FLASH": SDPBackend.FLASH_ATTENTION,
         "CUDNN": SDPBackend.CUDNN_ATTENTION}
rows = []
t_start = time.time()
# SUMMARY_DTYPES=bfloat16 (comma-separated torch dtype names) measures a subset.
for dtype in [getattr(torch, n) for n in
              os.environ.get("SUMMARY_DTYPES", "float32,bfloat16").split(",")]:
    for D in (64, 128):
        H = 2048 // D
        for L in (4096, 16384):
            B = 16384 // L
            for causal in (False, True):
                q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype,
                                       requires_grad=True) for _ in range(3))
                do = torch.randn_like(q)
                fl = 4 * B * H * L * L * D / (2 if causal else 1)
                row = {"dtype": str(dtype).split(".")[-1], "D": D, "L": L, "B": B, "H": H,
                       "causal": causal, "fwd": {}, "fwd+bwd": {}}

                def runner(f):
                    def fwd():
                        with torch.no_grad():
                            f(q, k, v, is_causal=causal)

                    def fb():
                        f(q, k, v, is_causal=causal).backward(do)
                    return fwd, fb

                cands = {"attn": runner(attn.scaled_dot_product_attention)}
                for name, be in PEERS.items():
                    if dtype == torch.float32 and name != "EFFICIENT":
                        continue  # no float32 FLASH / cuDNN kernels in PyTorch

                    def peer(*a, _be=be, **kw):
                        with sdpa_kernel(_be):
                            return F.scaled_dot_product_attention(*a, **kw)
                    cands[name] = runner(peer)
                for name, (fwd, fb) in cands.items():
                    for mode, fn, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fb, 3.5)):
                        try:
                            row[mode][name] = mult * fl / timed(fn, 7, 2) / 1e12
                        except Exception as e:  # a peer refusing a shape
                            row[mode][name] = None
                            row.setdefault("errors", {})[f"{name} {mode}"] = str(e)[:120]
                rows.append(row)
                print(row["dtype"], D, L, "causal" if causal else "full",
                      " fwd " + " ".join(f"{n}={x:.1f}" for n, x in row["fwd"].items() if x),
                      " | fwd+bwd " + " ".join(f"{n}={x:.1f}" for n, x in row["fwd+bwd"].items() if x),
                      flush=True)
                del q, k, v, do
                torch.cuda.empty_cache()
try:
    from importlib.metadata import version
    numba_cuda = version("numba-cuda")
except Exception:  # not installed as a distribution
    numba_cuda = None
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "numba_cuda": numba_cuda,
       "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t_start, "rows": rows}
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu-summary.json"), "w") as f:
        json.dump(out, f, indent=1)
