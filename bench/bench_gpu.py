"""GPU benchmark: attn's gpu backend against PyTorch's SDPA backends and FlexAttention.

    python bench/bench_gpu.py [--quick] [--out bench/results]

Same inputs for every contender in one process: B*L = 16k tokens, H*D = 2048, head dims
64 and 128, L from 1k to 16k, causal and not, forward and forward+backward, float32 /
float16 / bfloat16. TFLOP/s with the FlashAttention formula (forward 4*B*H*L^2*D, halved
when causal; forward+backward 3.5x). Times are medians of CUDA-event timings after a
warm-up. Also measured: the first call's compile time per kernel specialisation, and
the host overhead per call on a tiny problem (end-to-end wall time, device idle).

Writes bench/results/gpu-<date>.json and bench/results/gpu-latest.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
    attn.__path__.append(str(ROOT))  # source tree without an install: attn.gpu -> gpu/
    from attn import gpu  # noqa: E402

from _common import attention_flops, machine_description, time_cuda  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ours(q, k, v, causal, mode):
    if mode == "fwd":
        return lambda: gpu.forward(q, k, v, None, causal)
    go = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)

    def f():
        out, lse = gpu.forward(q, k, v, None, causal)
        gpu.backward(q, k, v, out, lse, go, None, None, causal)
    return f


def _torch(backend, q, k, v, causal, mode):
    if mode == "fwd":
        def f():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return f
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)

    def f():
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        torch.autograd.grad(o, (qg, kg, vg), go)
    return f


_flex = None


def _flex_fn(q, k, v, causal, mode):
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    bm = None
    if causal:
        L = q.shape[2]
        bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L,
                               device=q.device)
    if mode == "fwd":
        return lambda: _flex(q, k, v, block_mask=bm)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)

    def f():
        o = _flex(qg, kg, vg, block_mask=bm)
        torch.autograd.grad(o, (qg, kg, vg), go)
    return f


def host_overhead(n=300):
    """µs per call on a tiny problem (B=H=1, L=16, D=64). "host" is the Python + launch
    time of one call with the device idle (synchronised before the call, not after):
    what a call costs the CPU. "end to end" is n back-to-back calls then one sync, per
    call: bounded below by the GPU time of the kernels, so it shows the larger of the
    two."""
    res = {}
    q, k, v = (torch.randn(1, 1, 16, 64, device="cuda") for _ in range(3))
    qg = q.clone().requires_grad_()
    cands = {
        "attn.gpu.forward": lambda: gpu.forward(q, k, v),
        "attn.scaled_dot_product_attention": lambda: attn.scaled_dot_product_attention(q, k, v),
        "attn.scaled_dot_product_attention (q requires grad)":
            lambda: attn.scaled_dot_product_attention(qg, k, v),
        "torch.sdpa (auto)": lambda: F.scaled_dot_product_attention(q, k, v),
        "torch.sdpa (q requires grad)": lambda: F.scaled_dot_product_attention(qg, k, v),
    }
    for name, fn in cands.items():
        for _ in range(20):
            fn()
        host = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        res[name] = {"host": sorted(host)[n // 2] * 1e6,
                     "end to end": (time.perf_counter() - t0) / n * 1e6}
    return res


_COMPILE_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import attn
try:
    from attn import gpu
except ImportError:
    attn.__path__.append(sys.argv[1]); from attn import gpu
res = {}
for dtype in (torch.float32, torch.bfloat16):
    for D in (64, 128):
        q, k, v = (torch.randn(1, 2, 256, D, device="cuda", dtype=dtype) for _ in range(3))
        torch.cuda.synchronize(); t0 = time.perf_counter()
        out, lse = gpu.forward(q, k, v, None, True)
        torch.cuda.synchronize(); t1 = time.perf_counter()
        gpu.backward(q, k, v, out, lse, torch.randn_like(out), None, None, True)
        torch.cuda.synchronize(); t2 = time.perf_counter()
        name = str(dtype).split(".")[-1]
        res[f"{name} D={D} causal fwd"] = t1 - t0
        res[f"{name} D={D} causal bwd (2 kernels)"] = t2 - t1
print(json.dumps(res))
"""


def compile_times():
    """Wall seconds of the first call of each specialisation (compile or cache load +
    run), in two fresh processes: the first finds Numba's on-disk cache empty for these
    kernels (cleared here), the second loads what the first wrote."""
    import subprocess

    for cache in (ROOT / "gpu" / "__pycache__",):
        for f in cache.glob("_kernels*.nb*"):
            f.unlink()
    res = {}
    for run in ("cold (compile)", "warm (disk cache)"):
        r = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, str(ROOT)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            res[run] = {"error": r.stderr.strip().splitlines()[-1][:200]}
        else:
            res[run] = json.loads(r.stdout.strip().splitlines()[-1])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sizes (smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lens", default="1024,4096,16384")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = machine_description("cuda")
    result = {"machine": dev, "compile_s": compile_times(), "host_us_per_call": host_overhead(),
              "rows": []}
    from attn.gpu import _cuda
    result["fast_launch_errors"] = list(_cuda.fast_launch_errors)
    print("compile s:", json.dumps(result["compile_s"], indent=1))
    print("host µs/call:", json.dumps(result["host_us_per_call"], indent=1))

    lens = [int(x) for x in args.lens.split(",")]
    if args.quick:
        lens = lens[:2]
    backends = {"FLASH": SDPBackend.FLASH_ATTENTION, "EFFICIENT": SDPBackend.EFFICIENT_ATTENTION,
                "CUDNN": SDPBackend.CUDNN_ATTENTION, "MATH": SDPBackend.MATH}
    for dtype in args.dtypes.split(","):
        for D in (64, 128):
            H = 2048 // D
            for L in lens:
                B = max(1, 16384 // L)
                for causal in (False, True):
                    g = torch.Generator(device="cuda").manual_seed(0)
                    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=DT[dtype],
                                           generator=g) for _ in range(3))
                    for mode in ("fwd", "fwd+bwd"):
                        flops = attention_flops(B, H, L, L, D, causal, mode)
                        cands = {"attn.gpu": _ours(q, k, v, causal, mode)}
                        for name, be in backends.items():
                            if name == "MATH" and L > 4096:
                                continue  # materialises B*H*L^2 scores
                            cands[f"torch {name}"] = _torch(be, q, k, v, causal, mode)
                        # torch.compile of flex_attention recompiles per shape (tens of
                        # seconds each): measured at one length, bfloat16, to fit the lease.
                        if not args.no_flex and dtype == "bfloat16" and L == 4096:
                            try:
                                cands["flex_attention"] = _flex_fn(q, k, v, causal, mode)
                            except Exception:
                                pass
                        row = {"dtype": dtype, "B": B, "H": H, "L": L, "D": D,
                               "causal": causal, "mode": mode, "tflops": {}, "ms": {},
                               "errors": {}}
                        for name, fn in cands.items():
                            try:
                                t = time_cuda(fn, warmup=1, repeats=3 if L >= 16384 else 5)
                            except Exception as e:
                                row["errors"][name] = str(e).splitlines()[0][:160]
                                continue
                            row["ms"][name] = t["median_s"] * 1e3
                            row["tflops"][name] = flops / t["median_s"] / 1e12
                        result["rows"].append(row)
                        tf = row["tflops"]
                        print(f"{dtype:8s} D={D:3d} L={L:5d} B={B:2d} causal={causal!s:5s} "
                              f"{mode:7s} " + " ".join(f"{n}={x:6.1f}" for n, x in tf.items()),
                              flush=True)
                    del q, k, v
                    torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = dev.get("date", time.strftime("%Y-%m-%d"))
    (out / f"gpu-{date}.json").write_text(json.dumps(result, indent=1))
    (out / "gpu-latest.md").write_text(markdown(result))
    try:
        plot(result, out / "gpu-latest.png")
        if os.environ.get("OUT"):
            plot(result, Path(os.environ["OUT"], "gpu-latest.png"))
    except ImportError:  # matplotlib is the bench extra
        print("matplotlib missing: no plot")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"gpu-{date}.json").write_text(json.dumps(result, indent=1))
        Path(os.environ["OUT"], "gpu-latest.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result) -> str:
    g = result["machine"].get("gpu", {})
    lines = [f"# attn gpu benchmark ({result['machine'].get('date')}, {g.get('name')}, "
             f"torch {result['machine'].get('torch')})", "",
             "TFLOP/s, FlashAttention formula (fwd 4·B·H·L²·D, /2 causal; fwd+bwd ×3.5); "
             "B·L = 16k tokens, H·D = 2048. attn.gpu is the SIMT (no tensor core) kernel.", ""]
    names = []
    for r in result["rows"]:
        for n in r["tflops"]:
            if n not in names:
                names.append(n)
    lines.append("| dtype | D | L | causal | mode | " + " | ".join(names) +
                 " | attn / EFFICIENT |")
    lines.append("|" + "---|" * (6 + len(names)))
    for r in result["rows"]:
        tf = r["tflops"]
        ratio = (tf["attn.gpu"] / tf["torch EFFICIENT"]
                 if "attn.gpu" in tf and tf.get("torch EFFICIENT") else float("nan"))
        lines.append(f"| {r['dtype']} | {r['D']} | {r['L']} | {r['causal']} | {r['mode']} | "
                     + " | ".join(f"{tf[n]:.1f}" if n in tf else "–" for n in names)
                     + f" | {ratio:.2f} |")
    lines += ["", "First call of a specialisation (compile or disk-cache load, plus run), "
              "seconds, in fresh processes:", ""]
    runs = result["compile_s"]
    keys = next((list(v) for v in runs.values() if "error" not in v), [])
    lines.append("| kernel | " + " | ".join(runs) + " |")
    lines.append("|---|" + "---|" * len(runs))
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(
            f"{runs[r][k]:.2f}" if k in runs[r] else str(runs[r].get("error", "–"))
            for r in runs) + " |")
    lines += ["", "Host overhead, µs per call (B=H=1, L=16, D=64): host = CPU time of one "
              "call with the device idle; end to end = back-to-back calls, per call:", ""]
    lines.append("| call | host | end to end |")
    lines.append("|---|---|---|")
    for k, v in result["host_us_per_call"].items():
        lines.append(f"| {k} | {v['host']:.1f} | {v['end to end']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Bar chart: TFLOP/s of attn.gpu and PyTorch's backends per shape, one panel per
    (dtype, mode)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = sorted({(r["dtype"], r["mode"]) for r in rows})
    names = ["attn.gpu", "torch EFFICIENT", "torch FLASH", "torch CUDNN", "flex_attention"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, (dt, mode) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["dtype"] == dt and r["mode"] == mode]
        labels = [f"D{r['D']} L{r['L']}{' c' if r['causal'] else ''}" for r in sel]
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            ys = [r["tflops"].get(n, 0.0) for r in sel]
            if any(ys):
                ax.bar([x + i * w for x in range(len(sel))], ys, w, label=n)
        ax.set_xticks([x + 0.4 - w / 2 for x in range(len(sel))])
        ax.set_xticklabels(labels, rotation=45, fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{dt} {mode} ({result['machine'].get('gpu', {}).get('name')}, "
                     f"{result['machine'].get('date')})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
