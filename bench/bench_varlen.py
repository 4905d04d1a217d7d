"""Jagged batches: attn.varlen_attn against dense attention and PyTorch, same run.

A batch of sequence lengths drawn uniformly from 64..4096 (fixed seed) until the total
reaches T tokens. Work is counted on the real pairs: FlashAttention FLOPs summed per
sequence (4·H·Lᵢ²·D, halved when causal, ×3.5 fwd+bwd). Peers on the same inputs:

* attn dense: attn.scaled_dot_product_attention on a dense batch of the same total
  tokens (B = T / L_dense sequences of length L_dense, the median length) — the
  throughput issue 5 asks varlen to reach (target ≥ 85%);
* torch padded: F.scaled_dot_product_attention on the batch padded to the longest
  sequence with a key-padding mask (what padding costs);
* torch nested: F.scaled_dot_product_attention on jagged nested tensors;
* torch varlen_attn: torch.nn.attention.varlen.varlen_attn (CUDA only in PyTorch).

The two attn calls, whose ratio is the target, are timed interleaved (varlen, dense,
varlen, dense, ...; medians of each), so a load change on a shared machine moves both
alike; the peers are timed after them. On CPU the share of the machine other processes
used while a row was timed is recorded (``other_cpu_fraction``).

    python bench/bench_varlen.py [--device cuda] [--tokens 16384] [--out DIR]
                                 [--causal both|yes|no] [--modes fwd,fwd+bwd]
                                 [--wait-idle SECONDS]
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import attn  # noqa: E402
from _common import (CpuMonitor, machine_description, summarize, time_cpu,  # noqa: E402
                     time_cuda, wait_until_idle, write_json)


def time_interleaved(timer, calls: dict, warmup: int, repeats: int) -> dict:
    """Per name, the summary of ``calls[name] = (fn, setup)`` timed in rounds that run
    every call once, after ``warmup`` rounds."""
    times = {name: [] for name in calls}
    for r in range(warmup + repeats):
        for name, (fn, setup) in calls.items():
            t = timer(fn, warmup=0, repeats=1, setup=setup)
            if r >= warmup:
                times[name].append(t["median_s"])
    return {name: summarize(ts) for name, ts in times.items()}


def platform_name() -> str:
    import platform
    return platform.processor() or platform.machine()


def lengths(total: int, seed: int = 0, lo: int = 64, hi: int = 4096) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(out) < total:
        out.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    out[-1] -= sum(out) - total  # exactly `total` tokens
    if out[-1] < lo:
        out[-2] += out.pop()
    return out


def flops(lens, H, D, causal, mode):
    f = sum(4.0 * H * n * n * D for n in lens)
    f = f / 2 if causal else f
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    p.add_argument("--modes", default="fwd,fwd+bwd",
                   help="comma list out of fwd, fwd+bwd")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="CPU: wait up to SECONDS for the CPUs to be <25%% busy first")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("fwd", "fwd+bwd"):
            p.error(f"unknown mode {m!r} (choose from fwd, fwd+bwd)")
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    dev = args.device
    cuda = dev == "cuda"
    if cuda:
        try:
            from attn import gpu  # noqa: F401
        except ImportError:  # source tree without an install (the GPU machine)
            attn.__path__.append(str(HERE.parent))
            from attn import gpu  # noqa: F401,F811
        torch.backends.cuda.matmul.allow_tf32 = False
    T = args.tokens or (16384 if cuda else 8192)
    H = args.heads or (16 if cuda else 4)
    D = 64
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    timer = time_cuda if cuda else time_cpu
    lens = lengths(T)
    Ld = int(sorted(lens)[len(lens) // 2])
    Bd = max(1, T // Ld)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                      device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g)  # noqa: E731
    q, k, v = mk(T, H, D), mk(T, H, D), mk(T, H, D)
    qd, kd, vd = mk(Bd, H, Ld, D), mk(Bd, H, Ld, D), mk(Bd, H, Ld, D)
    Lmax = max(lens)
    busy = None if cuda else wait_until_idle(args.wait_idle, sample_s=1.0)
    if busy is not None and busy > 0.25:
        print(f"WARNING: CPUs {busy:.0%} busy before start; timings will be noisy.",
              flush=True)
    rows = []
    for causal in causals:
        for mode in modes:
            real = flops(lens, H, D, causal, mode)
            dense_f = flops([Ld] * Bd, H, D, causal, mode)
            cands = {}

            def wrap(fn, ins):
                if mode == "fwd":
                    def run():
                        with torch.no_grad():
                            fn(*ins)
                    return run, None
                leaves = [t.detach().clone().requires_grad_() for t in ins]

                def run():
                    o = fn(*leaves)
                    o = o.values() if getattr(o, "is_nested", False) else o
                    o.sum().backward()

                def setup():
                    for t in leaves:
                        t.grad = None
                return run, setup

            window = (-1, 0) if causal else (-1, -1)
            cands["attn varlen"] = (wrap(lambda a, b, c: attn.varlen_attn(
                a, b, c, cu, cu, Lmax, Lmax, window_size=window), (q, k, v)), real)
            cands["attn dense (same tokens)"] = (wrap(
                lambda a, b, c: attn.scaled_dot_product_attention(a, b, c, is_causal=causal),
                (qd, kd, vd)), dense_f)
            # Padded: every sequence to Lmax, keys past a sequence's end masked.
            B = len(lens)
            pad = lambda t: torch.nn.utils.rnn.pad_sequence(  # noqa: E731
                list(t.split(lens)), batch_first=True).transpose(1, 2)
            qp, kp, vp = pad(q), pad(k), pad(v)
            keep = (torch.arange(Lmax, device=dev)[None, :] <
                    torch.tensor(lens, device=dev)[:, None])
            m = keep[:, None, None, :]
            if causal:
                m = m & torch.ones(Lmax, Lmax, dtype=torch.bool, device=dev).tril()
            if (B * H * Lmax * Lmax) * 4 < 8e9:
                cands["torch padded"] = (wrap(lambda a, b, c: F.scaled_dot_product_attention(
                    a, b, c, attn_mask=m), (qp, kp, vp)), real)
            nq, nk, nv = (torch.nested.nested_tensor(list(t.split(lens)), layout=torch.jagged)
                          .transpose(1, 2) for t in (q, k, v))
            cands["torch nested"] = (wrap(lambda a, b, c: F.scaled_dot_product_attention(
                a, b, c, is_causal=causal), (nq, nk, nv)), real)
            try:
                from torch.nn.attention.varlen import varlen_attn as tva
                cands["torch varlen_attn"] = (wrap(lambda a, b, c: tva(
                    a, b, c, cu, cu, Lmax, Lmax, window_size=window), (q, k, v)), real)
            except ImportError:
                pass
            row = {"causal": causal, "mode": mode, "ms": {}, "tflops": {}, "errors": {}}
            mon = None if cuda else CpuMonitor().start()
            pair = ("attn varlen", "attn dense (same tokens)")
            timed = time_interleaved(timer, {n: cands[n][0] for n in pair}, warmup=2,
                                     repeats=args.repeats)
            for name, ((fn, setup), f) in cands.items():
                try:
                    t = timed[name] if name in timed else timer(
                        fn, warmup=1, repeats=args.repeats, setup=setup)
                except Exception as e:  # a peer that cannot run this case
                    row["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
                    continue
                row["ms"][name] = t["median_s"] * 1e3
                row["tflops"][name] = f / t["median_s"] / 1e12
            if mon is not None:
                row["other_cpu_fraction"] = mon.stop().get("other_fraction")
            tf = row["tflops"]
            if "attn varlen" in tf and "attn dense (same tokens)" in tf:
                row["varlen / dense"] = tf["attn varlen"] / tf["attn dense (same tokens)"]
            for peer in ("torch padded", "torch nested", "torch varlen_attn"):
                if peer in row["ms"] and "attn varlen" in row["ms"]:
                    row[f"speed-up over {peer}"] = row["ms"][peer] / row["ms"]["attn varlen"]
            rows.append(row)
            print(causal, mode, json.dumps({k: round(x, 3) for k, x in tf.items()}),
                  row["errors"], flush=True)
    result = {"machine": machine_description(dev), "cpu_busy_before": busy,
              "attn_cpu_isa": None if cuda else importlib.import_module("attn.cpu").ISA,
              "tokens": T, "heads": H, "D": D,
              "dtype": str(dtype), "lengths": lens, "dense_L": Ld, "dense_B": Bd,
              "rows": rows, "date": time.strftime("%Y-%m-%d")}
    write_json(result, args.out, f"varlen-{dev}")
    unit = "TFLOP/s" if cuda else "TFLOP/s (×1000 = GFLOP/s)"
    names = sorted({n for r in rows for n in r["tflops"]})
    mach = result["machine"]
    where = (mach.get("gpu") or {}).get("name") if cuda else (
        f"{(mach.get('cpu') or {}).get('model') or platform_name()}, attn.cpu ISA "
        f"{result['attn_cpu_isa']}")
    lines = [f"# varlen benchmark ({dev}, {result['date']})", "",
             f"machine: {where}; {mach.get('torch_threads')} torch threads, torch "
             f"{mach.get('torch')}; load average at start "
             f"{mach.get('load_average_at_start')}", "",
             f"{len(lens)} sequences, lengths 64..4096 (seed 0), {T} tokens, H={H}, D={D}, "
             f"{dtype}; dense peer: B={Bd} × L={Ld}. {unit} counted on real work "
             "(Σ per-sequence FLOPs); dense counts its own. attn varlen and attn dense "
             f"timed interleaved, median of {args.repeats}.", "",
             "| causal | mode | " + " | ".join(names) + " | varlen / dense |"
             + ("" if cuda else " other CPU load |"),
             "|---|---|" + "---|" * (len(names) + (1 if cuda else 2))]
    for r in rows:
        load = r.get("other_cpu_fraction")
        lines.append(f"| {r['causal']} | {r['mode']} | " + " | ".join(
            f"{r['tflops'][n] * (1 if cuda else 1000):.1f}" if n in r["tflops"] else "—"
            for n in names) + f" | {r.get('varlen / dense', math.nan):.2f} |"
            + ("" if cuda else (f" {load:.0%} |" if load is not None else " — |")))
    errs = {n: e for r in rows for n, e in r["errors"].items()}
    if errs:
        lines += ["", "Not run:"] + [f"- {n}: {e}" for n, e in errs.items()]
    Path(args.out, f"varlen-{dev}-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
