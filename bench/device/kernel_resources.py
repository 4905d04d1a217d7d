"""Registers and local memory (spills) of every kernel specialisation that a set of
float16/bfloat16 calls compiles: dense, causal, FlexAttention block masks with and
without score_mod, varlen; forward and backward, head dims 64 and 128. Run on the GPU
machine from the repository root: python3 bench/device/kernel_resources.py [OUT.json]
(KR_DIMS=128: one head dim)"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import attn  # noqa: E402

attn.__path__.append(str(ROOT))
from attn import gpu, mods  # noqa: E402
from attn.gpu import _cuda  # noqa: E402
from attn.profile import _kattr  # noqa: E402  (Numba's attribute-or-method query)


def main():
    dev = "cuda"
    rows = []
    # KR_DIMS=128 (comma-separated) measures a subset: one process per head dim runs
    # the compiles side by side.
    for D in [int(x) for x in os.environ.get("KR_DIMS", "64,128").split(",")]:
        L = 1024
        q, k, v = (torch.randn(1, 4, L, D, device=dev, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        calls = {
            "dense": lambda: attn.scaled_dot_product_attention(q, k, v),
            "causal": lambda: attn.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        bm = attn.create_block_mask(mods.causal_mask, 1, 4, L, L, device=dev)
        calls["flex causal mask"] = lambda: attn.flex_attention(q, k, v, block_mask=bm)
        calls["flex alibi+causal"] = lambda: attn.flex_attention(
            q, k, v, score_mod=mods.alibi(4), block_mask=bm)
        # a padded document mask_mod (block lists and the bit sets, not a band) and an
        # attn_mask (the small tiles)
        docm = mods.document_mask(torch.tensor([0, 300, 310, 900], device=dev), length=L)
        bmd = attn.create_block_mask(docm, 1, 4, L, L, device=dev)
        calls["flex document"] = lambda: attn.flex_attention(q, k, v, block_mask=bmd)
        am = torch.rand(L, L, device=dev) > 0.3
        calls["sdpa bool mask"] = lambda: attn.scaled_dot_product_attention(
            q, k, v, attn_mask=am)
        bmw = attn.create_block_mask(mods.sliding_window(256), 1, 4, L, L, device=dev)
        calls["flex sliding 256"] = lambda: attn.flex_attention(q, k, v, block_mask=bmw)
        for name, fn in calls.items():
            before = set(_cuda._prepared)
            out = fn()
            out.float().sum().backward()
            torch.cuda.synchronize()
            for key in set(_cuda._prepared) - before:
                p = _cuda._prepared[key]
                kern = p.kern
                r = {
                    "call": name, "D": D,
                    "kernel": getattr(getattr(kern, "py_func", None), "__qualname__", "?"),
                    "registers": _kattr(kern, "regs_per_thread"),
                    "local_bytes": _kattr(kern, "local_mem_per_thread"),
                    "dynamic_shared_bytes": p.shmem,
                }
                rows.append(r)
                # as it goes: a run cut short by its time limit still says what it saw
                print(f"{r['call']:20s} D={r['D']:3d} {r['kernel']:28s} "
                      f"regs {r['registers']}  local {r['local_bytes']} B  "
                      f"smem {r['dynamic_shared_bytes']} B", flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
