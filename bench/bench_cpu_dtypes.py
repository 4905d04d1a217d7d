"""CPU attention per input dtype: attn against PyTorch's flash kernel in the same run.

    python bench/bench_cpu_dtypes.py [--out DIR] [--repeats N]

float32, bfloat16 and float16 inputs, B·H·L·D = (1, 8, 2048, 64) and (1, 8, 4096, 64),
causal and not, forward (no_grad) and forward+backward (loss (out·dout).sum()).
attn computes float16/bfloat16 in float32 (cpu/__init__.py: inputs upcast once per
call); PyTorch's CPU flash kernel runs 16-bit inputs on the CPU's bf16/fp16 dot-product
or AMX units where it has them, so this benchmark shows what that costs attn per
machine. GFLOP/s by the FlashAttention formula (bench/_common.py); medians after a
warm-up, the two contenders interleaved per repeat. Writes
``<out>/cpu-dtypes-<date>.json`` (and ``-latest.json``) and ``cpu-dtypes-latest.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import (attention_flops, fmt_num, fmt_ratio, machine_description,  # noqa: E402
                     make_call, markdown_table, write_json)

SHAPES = ((1, 8, 2048, 64), (1, 8, 4096, 64))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    import attn

    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, H, L, D in SHAPES:
            for causal in (False, True):
                q, k, v, dout = (torch.randn(B, H, L, D, dtype=dtype) for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_(True)
                for mode in ("fwd", "fwd+bwd"):
                    fns = {
                        "attn": lambda x, y, z: attn.scaled_dot_product_attention(
                            x, y, z, is_causal=causal),
                        "torch": lambda x, y, z: F.scaled_dot_product_attention(
                            x, y, z, is_causal=causal),
                    }
                    calls = {n: make_call(torch, f, q, k, v, dout, mode, {})
                             for n, f in fns.items()}
                    times = {n: [] for n in calls}
                    for n, (call, setup) in calls.items():  # warm-up (and compile)
                        setup()
                        call()
                    for _ in range(a.repeats):
                        for n, (call, setup) in calls.items():
                            setup()
                            t0 = time.perf_counter()
                            call()
                            times[n].append(time.perf_counter() - t0)
                    fl = attention_flops(B, H, L, L, D, causal, mode)
                    med = {n: statistics.median(ts) for n, ts in times.items()}
                    row = {"dtype": str(dtype).replace("torch.", ""), "B": B, "H": H,
                           "L": L, "D": D, "causal": causal, "mode": mode,
                           "attn_ms": med["attn"] * 1e3, "torch_ms": med["torch"] * 1e3,
                           "attn_gflops": fl / med["attn"] / 1e9,
                           "torch_gflops": fl / med["torch"] / 1e9,
                           "attn_over_torch": med["torch"] / med["attn"]}
                    rows.append(row)
                    print(f"{row['dtype']:8s} L={L} causal={causal!s:5s} {mode:7s} "
                          f"attn {row['attn_gflops']:6.1f} torch {row['torch_gflops']:6.1f}"
                          f" GF/s  attn/torch {row['attn_over_torch']:.2f}", flush=True)
    info = machine_description("cpu")
    res = {"machine": info, "rows": rows}
    paths = write_json(res, a.out, "cpu-dtypes")
    cpu = info["cpu"]
    head = (f"# CPU attention per dtype — {info['date']}\n\n"
            f"- machine: {cpu.get('model', '?')}, {torch.get_num_threads()} torch threads; "
            f"torch {info['torch']}; attn ISA {attn.cpu.ISA}; "
            f"git {info['git'].get('commit', '?')}\n"
            f"- `python bench/bench_cpu_dtypes.py`; GFLOP/s by the FlashAttention formula; "
            f"median of {a.repeats}, attn and torch interleaved; torch = "
            f"`F.scaled_dot_product_attention` (its CPU flash kernel); attn/torch = torch ms "
            f"÷ attn ms\n\n")
    table = markdown_table(
        ["dtype", "B,H,L,D", "causal", "mode", "attn GF/s", "torch GF/s", "attn/torch"],
        [[r["dtype"], f"{r['B']},{r['H']},{r['L']},{r['D']}", "yes" if r["causal"] else "no",
          r["mode"], fmt_num(r["attn_gflops"]), fmt_num(r["torch_gflops"]),
          fmt_ratio(r["attn_over_torch"])] for r in rows])
    md = Path(a.out) / "cpu-dtypes-latest.md"
    md.write_text(head + table + "\n")
    print("wrote", *paths, md)


if __name__ == "__main__":
    main()
