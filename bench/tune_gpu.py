"""Tiling sweep for attn.gpu's SIMT kernels (run on the GPU machine).

    python bench/tune_gpu.py [--D 64 128] [--L 4096] [--dtype float32] [--out DIR]

For each head dim it times the forward with each candidate forward tiling, and the
backward with each candidate dK/dV tiling (dQ fixed) and each dQ tiling (dK/dV fixed),
at B*L = 16k tokens, H*D = 2048, non-causal. Beside each time it prints what Numba
reports for the compiled kernel (registers per thread, local memory per thread: spills
show up there) and the dynamic shared memory per CTA, and checks the result against
PyTorch's SDPA. The chosen defaults live in gpu/__init__.py (_TILINGS); the outcome goes
to bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import attn  # noqa: E402

try:
    from attn import gpu  # noqa: E402
except ImportError:
    attn.__path__.append(str(ROOT))
    from attn import gpu  # noqa: E402

from attn.gpu import _cuda, _kernels  # noqa: E402
from attn.gpu import Tiling as T  # noqa: E402

from _common import time_cuda  # noqa: E402

CANDIDATES = {
    64: {
        "fwd": [T(16, 16, 4, 4), T(16, 16, 4, 4, 4), T(8, 16, 8, 8, 4), T(16, 8, 8, 4, 4)],
        "dkdv": [T(16, 8, 8, 4), T(16, 8, 4, 4), T(8, 16, 4, 8)],
        "dq": [T(16, 8, 8, 4), T(16, 8, 4, 4), T(16, 16, 4, 4)],
    },
    128: {
        "fwd": [T(16, 16, 4, 4), T(16, 16, 4, 4, 4), T(16, 16, 8, 4, 4)],
        "dkdv": [T(16, 8, 4, 4), T(16, 8, 4, 2), T(16, 16, 4, 4)],
        "dq": [T(16, 8, 8, 4), T(16, 8, 4, 4), T(16, 16, 4, 4)],
    },
}


def _one(x):
    return next(iter(x.values())) if isinstance(x, dict) else x


def resources(kernel, t, kname, D):
    """Numba's view of the compiled kernel: registers and local memory per thread (spills
    land in local memory), the dynamic shared memory we ask for, and an opcode census of
    the SASS (FFMA: the useful work; LDS: shared loads; LDL/STL: local memory)."""
    res = {"shared_bytes": 4 * _kernels.shared_floats(kname, t, D, D)}
    for key, fn in (("regs", "get_regs_per_thread"), ("local_bytes", "get_local_mem_per_thread")):
        try:
            res[key] = _one(getattr(kernel, fn)())
        except Exception as e:  # another numba-cuda spelling
            res[key] = repr(e)[:80]
    try:
        sass = _one(kernel.inspect_sass())
        ops = {}
        for line in sass.splitlines():
            parts = line.split("*/")
            if len(parts) < 2:
                continue
            tok = parts[1].strip().split()
            if not tok:
                continue
            op = tok[0] if not tok[0].startswith("@") else (tok[1] if len(tok) > 1 else "")
            op = op if op.startswith("LDS") else op.split(".")[0]
            ops[op] = ops.get(op, 0) + 1
        res["sass"] = {k: ops.get(k, 0) for k in ("FFMA", "LDS", "LDS.128", "LDL", "STL",
                                                  "LDG", "IMAD", "MUFU", "BAR", "F2F")}
        res["sass_total"] = sum(ops.values())
    except Exception as e:
        res["sass_error"] = repr(e)[:120]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", nargs="*", default=["fwd", "dkdv", "dq"])
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    rows = []
    for D in a.D:
        H = 2048 // D
        B = max(1, 16384 // a.L)
        L = a.L
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dt, generator=g)
                   for _ in range(3))
        go = torch.randn_like(q)
        with torch.no_grad():
            o_ref = F.scaled_dot_product_attention(q, k, v)
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
        og = F.scaled_dot_product_attention(qg, kg, vg)
        g_ref = torch.autograd.grad(og, (qg, kg, vg), go)
        flops = 4 * B * H * L * L * D
        base = gpu.tilings(D, D)
        jobs = [(kn, t) for kn in a.kernels for t in CANDIDATES[D][kn]]
        out, lse = gpu.forward(q, k, v)
        for kname, t in jobs:
            ts = dict(base)
            ts[kname] = t
            row = {"D": D, "L": L, "dtype": a.dtype, "kernel": kname, "tiling": str(t)}
            try:
                if kname == "fwd":
                    fn = lambda: gpu.forward(q, k, v, tiling=t)  # noqa: E731
                    o, _ = fn()
                    row["err"] = (o.float() - o_ref.float()).abs().max().item()
                    kern = _kernels.forward_kernel(gpu._KIND[dt], D, D, t, False, False)
                    work = flops
                else:
                    fn = lambda: gpu.backward(q, k, v, out, lse, go, tiling=ts)  # noqa: E731
                    grads = fn()
                    row["err"] = max((x.float() - y.float()).abs().max().item()
                                     for x, y in zip(grads, g_ref))
                    fac = _kernels.dkdv_kernel if kname == "dkdv" else _kernels.dq_kernel
                    kern = fac(gpu._KIND[dt], D, D, t, False, False)
                    work = 2.5 * flops
                ms = 1e3 * time_cuda(fn, warmup=2, repeats=10)["median_s"]
                row["ms"] = ms
                row["tflops"] = work / ms / 1e9
                row.update(resources(kern, t, kname, D))
            except Exception as e:  # a tiling the GPU refuses: report and go on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "tune.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
