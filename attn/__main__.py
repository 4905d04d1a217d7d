"""``python -m attn``: a short demo comparing attn with PyTorch on one problem.

Prints, for a default problem (or the one given), the error of attn and of PyTorch's
own SDPA against the float64 reference, and the time of each, forward and
forward+backward.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import attn


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m attn", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    B, H, L, D = args.batch, args.heads, args.seqlen, args.headdim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3))
    do = torch.randn(B, H, L, D, generator=g, dtype=dtype)

    from attn import cpu

    print(f"attn {attn.__version__}: CPU kernels '{cpu.ISA}' build, "
          f"OpenMP {'on' if cpu.OPENMP else 'OFF'}, {cpu.num_threads()} threads; "
          f"torch {torch.__version__}")
    print(f"problem: B={B} H={H} L={L} D={D} {args.dtype}"
          f"{' causal' if args.causal else ''}")

    ref_out, _ = attn.reference.attention(q.double(), k.double(), v.double(),
                                          is_causal=args.causal)
    ours = attn.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    err_ours = (ours.double() - ref_out).abs().max().item()
    err_theirs = (theirs.double() - ref_out).abs().max().item()
    print(f"max |error| vs float64 reference: attn {err_ours:.2e}, torch {err_theirs:.2e}")

    flops = 4 * B * H * L * L * D / (2 if args.causal else 1)

    def fwd(fn):
        return lambda: fn(q, k, v, is_causal=args.causal)

    def fwd_bwd(fn):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

        def run():
            fn(qq, kk, vv, is_causal=args.causal).backward(do)

        return run

    rows = []
    for label, fn in (("attn", attn.scaled_dot_product_attention),
                      ("torch", F.scaled_dot_product_attention)):
        tf = _median_time(fwd(fn), args.repeats)
        tb = _median_time(fwd_bwd(fn), args.repeats)
        rows.append((label, tf, tb))
    print(f"{'':6} {'forward':>22} {'forward+backward':>26}")
    for label, tf, tb in rows:
        print(f"{label:6} {tf * 1e3:9.2f} ms {flops / tf / 1e9:7.1f} GFLOP/s "
              f"{tb * 1e3:11.2f} ms {3.5 * flops / tb / 1e9:7.1f} GFLOP/s")
    (_, af, ab), (_, tf, tb) = rows
    print(f"attn / torch speed: forward {tf / af:.2f}x, forward+backward {tb / ab:.2f}x")


if __name__ == "__main__":
    main()
