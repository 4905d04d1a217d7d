"""The tensor-core forward (gpu/_mma.py) on the GPU machine: correctness, resources, speed.

    python bench/device/mma_check.py OUTDIR [--quick]

1. Correctness, in parallel worker processes (Numba compiles are single-threaded, one
   specialisation per (dtype, head dim, causal, mask, mods)): float16 and bfloat16,
   D = 64 and 128, lengths {1, 17, 97, 128, 1025} (Lq != Lk too), causal and not, GQA,
   (B, L, H, D) strided inputs (cp.async path), a non-contiguous head dim and a
   misaligned view (element-load path), bool and additive masks with a fully masked
   row, FlexAttention block masks with mask_mod/score_mod; determinism. Oracle:
   attn.reference in float64; bound |ours - oracle| <= 2 |torch same dtype - oracle| +
   floor (tests/test_gpu.py's rule).
2. Registers / local memory of every kernel compiled (numba's resource queries).
3. Speed: bf16 (and one fp16 point) forward, B*L = 16k tokens, H*D = 2048, against
   PyTorch SDPA FLASH, EFFICIENT and CUDNN in the same process; CUDA-event medians.

Writes OUTDIR/mma_check.json and prints a table at the end.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checks import gpu_modules as _gpu  # noqa: E402
from _checks import kernels_used as _kernels_used  # noqa: E402
from _checks import max_err as _err  # noqa: E402
from _checks import print_kernels as _print_kernels  # noqa: E402

FLOOR = {"float16": 2e-3, "bfloat16": 1.6e-2}


def _case(gpu, dtype, B, Hq, Hkv, Lq, Lk, D, Dv, causal, layout=None, mask_kind=None,
          seed=0):
    import torch
    import torch.nn.functional as F
    from attn.reference import attention

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)

    def mk(H, L, W):
        if layout == "blhd":  # (B, L, H, D) storage: 16-byte rows, cp.async path
            return torch.randn(B, L, H, W, device=dev, generator=g).to(dtype).transpose(1, 2)
        if layout == "dmajor":  # head dim strided: element-load path
            return torch.randn(B, H, W, L, device=dev, generator=g).to(dtype).transpose(2, 3)
        if layout == "offset":  # data pointer 2 bytes past 16-byte alignment
            x = torch.randn(B * H * L * W + 1, device=dev, generator=g).to(dtype)
            return x[1:].view(B, H, L, W)
        return torch.randn(B, H, L, W, device=dev, generator=g).to(dtype)

    q, k, v = mk(Hq, Lq, D), mk(Hkv, Lk, D), mk(Hkv, Lk, Dv)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, device=dev, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "bool_empty_row":
        mask = torch.rand(1, 1, Lq, Lk, device=dev, generator=g) > 0.3
        mask[..., min(2, Lq - 1), :] = False
    elif mask_kind == "additive":
        mask = torch.randn(1, Hq, Lq, Lk, device=dev, generator=g).to(dtype)
    out, lse = gpu.forward(q, k, v, mask, causal)
    out2, lse2 = gpu.forward(q, k, v, mask, causal)
    qd, kd, vd = (t.double() for t in (q, k, v))
    ro, rl = attention(qd, kd, vd, mask, causal, None, enable_gqa=Hq != Hkv)
    name = (f"{str(dtype)[6:]} B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D}/{Dv} causal={causal} "
            f"layout={layout} mask={mask_kind}")
    res = {"case": name}
    fin_rows = torch.isfinite(rl)
    e_ours = _err(out, ro)
    if mask_kind == "bool_empty_row":
        e_torch = None
        bound = FLOOR[str(dtype)[6:]] * max(1.0, ro.abs().max().item())
    else:
        ot = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                            enable_gqa=Hq != Hkv)
        e_torch = _err(ot, ro)
        bound = 2 * e_torch + FLOOR[str(dtype)[6:]] * max(1.0, ro.abs().max().item())
    e_lse = _err(lse[fin_rows], rl[fin_rows]) if fin_rows.any() else 0.0
    res.update(err=e_ours, torch_err=e_torch, bound=bound, lse_err=e_lse)
    ok = (e_ours <= bound and not torch.isnan(out).any().item()
          and torch.equal(torch.isfinite(lse), fin_rows)
          and e_lse <= 1e-4 * max(1.0, rl[fin_rows].abs().max().item() if fin_rows.any()
                                  else 1.0) + 2e-3
          and torch.equal(out, out2) and torch.equal(lse, lse2))
    if not fin_rows.all():
        ok = ok and bool((out[~fin_rows] == 0).all().item())
    res["ok"] = bool(ok)
    return res


def _flex_case(attn, gpu, dtype, D, kind, seed=0):
    import torch
    from attn import mods
    from attn.reference import flex_attention as ref_flex

    g = torch.Generator(device="cuda").manual_seed(seed)
    B, Hq, Hkv, L = 1, 4, 2, 517
    q = torch.randn(B, Hq, L, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, device="cuda", generator=g).to(dtype)

    def make(dev):
        score = None
        if kind == "causal+alibi":
            mm = mods.causal_mask
            score = mods.alibi(Hq)
        elif kind == "document":
            mm = mods.document_mask(torch.tensor([0, 100, 101, 300, 517], device=dev))
        else:
            mm = mods.sliding_window(128)
        return attn.create_block_mask(mm, B, Hq, L, L, device=dev), score

    bm, score = make("cuda")
    out = attn.flex_attention(q, k, v, score_mod=score, block_mask=bm, enable_gqa=True)
    # The float64 oracle on the CPU (a mask built there too).
    bmc, scorec = make("cpu")
    ro, rl, _ = ref_flex(q.cpu().double(), k.cpu().double(), v.cpu().double(), scorec,
                         bmc, None, True)
    res = {"case": f"flex {kind} {str(dtype)[6:]} D{D} L{L} GQA 4/2 BLOCK {bm.BLOCK_SIZE}",
           "mma": not gpu.mma_reasons(dtype, D, D, None, bm.BLOCK_SIZE)}
    e_ours = _err(out.cpu(), ro)
    try:  # torch's own flex (eager) in the same dtype for the error scale
        from torch.nn.attention.flex_attention import create_block_mask as tcbm
        from torch.nn.attention.flex_attention import flex_attention as tflex
        tbm = tcbm(bm.mask_mod, B, Hq, L, L, device="cuda")
        ot = tflex(q, k, v, score_mod=score, block_mask=tbm, enable_gqa=True)
        e_torch = _err(ot.cpu(), ro)
    except Exception as e:
        res["torch_error"] = str(e)[:300]
        e_torch = 0.0
    bound = 2 * e_torch + FLOOR[str(dtype)[6:]] * max(1.0, ro.abs().max().item())
    res.update(err=e_ours, torch_err=e_torch, bound=bound,
               ok=bool(e_ours <= bound and not torch.isnan(out).any().item()))
    return res


def worker(spec):
    """One group of correctness cases (one kernel specialisation family), in a fresh
    process (the tile configuration is read at import)."""
    dname, D, what, cfg = spec
    if cfg:
        os.environ["ATTN_GPU_MMA_CONFIG"] = cfg
    import torch
    attn, gpu = _gpu()
    dtype = getattr(torch, dname)
    out = []
    t0 = time.perf_counter()
    try:
        if what in ("dense", "causal"):
            c = what == "causal"
            for Lq, Lk in ((1, 1), (17, 17), (97, 128), (128, 97), (1025, 1025)):
                out.append(_case(gpu, dtype, 1, 2, 2, Lq, Lk, D, D, c, seed=Lq + Lk))
            out.append(_case(gpu, dtype, 2, 4, 2, 300, 300, D, D, c, "blhd", seed=5))
            out.append(_case(gpu, dtype, 1, 4, 1, 200, 333, D, D, c, "dmajor", seed=6))
            out.append(_case(gpu, dtype, 1, 2, 2, 150, 150, D, D, c, "offset", seed=7))
        elif what == "mask":
            out.append(_case(gpu, dtype, 2, 2, 2, 97, 130, D, D, False, None, "bool", 8))
            out.append(_case(gpu, dtype, 1, 2, 2, 97, 97, D, D, False, None,
                             "bool_empty_row", 9))
            out.append(_case(gpu, dtype, 1, 2, 1, 128, 200, D, D, True, None, "additive", 10))
        elif what == "flex":
            for kind in ("causal+alibi", "document", "window"):
                out.append(_flex_case(attn, gpu, dtype, D, kind))
    except Exception as e:  # report, don't hide
        import traceback
        out.append({"case": f"{spec}", "ok": False, "error": traceback.format_exc()[-2000:]})
    for r in out:
        if cfg:
            r["case"] += f" config={cfg}"
    try:
        kern = _kernels_used()
    except Exception as e:
        kern = [{"kernel": f"query failed: {e}", "regs": None, "local_bytes": None,
                 "shared_dyn": None}]
    for kk in kern:
        kk["config"] = cfg
    return {"spec": spec, "results": out, "kernels": kern,
            "wall_s": time.perf_counter() - t0}


def timing(args):
    cfg, pts = args
    if cfg:
        os.environ["ATTN_GPU_MMA_CONFIG"] = cfg
    return _timing(pts, cfg)


def _points(quick, Ds=(64, 128), lens=(1024, 4096, 16384), extra=True):
    pts = []
    for D in Ds:
        for L in ((4096,) if quick else lens):
            for causal in (False, True):
                pts.append(("bfloat16", D, L, causal))
    if extra:
        pts.append(("float16", 128, 4096, False))
        pts.append(("float16", 64, 4096, True))
    return pts


def _timing(pts, cfg):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from _common import attention_flops, time_cuda

    attn, gpu = _gpu()
    rows = []
    backends = {"FLASH": SDPBackend.FLASH_ATTENTION,
                "EFFICIENT": SDPBackend.EFFICIENT_ATTENTION,
                "CUDNN": SDPBackend.CUDNN_ATTENTION}
    for dname, D, L, causal in pts:
        dtype = getattr(torch, dname)
        B, H = 16384 // L, 2048 // D
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3))
        fl = attention_flops(B, H, L, L, D, causal, "fwd")
        row = {"dtype": dname, "D": D, "L": L, "B": B, "H": H, "causal": causal,
               "config": str(gpu._mma.config(D, D)), "tile": gpu._mma.tile(D, D)}
        t0 = time.perf_counter()
        r = time_cuda(lambda: gpu.forward(q, k, v, None, causal), warmup=3, repeats=15)
        row["attn_mma_first_s"] = time.perf_counter() - t0
        row["attn_mma"] = fl / r["median_s"] / 1e12
        if cfg:  # an alternative tiling: ours only
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        for name, be in backends.items():
            try:
                def f(be=be):
                    with sdpa_kernel(be):
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                r = time_cuda(f, warmup=3, repeats=15)
                row[name] = fl / r["median_s"] / 1e12
            except Exception as e:
                row[name] = None
                row[name + "_error"] = str(e)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    try:
        kern = _kernels_used()
    except Exception as e:
        kern = [{"kernel": f"query failed: {e}"}]
    return {"cfg": cfg, "rows": rows, "kernels": kern}


def main():
    outdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mma_check")
    quick = "--quick" in sys.argv
    outdir.mkdir(parents=True, exist_ok=True)
    import torch
    import numba
    from numba import cuda  # noqa: F401  (version report only)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "numba": numba.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
        import importlib.metadata as md
        res["numba_cuda"] = md.version("numba-cuda")
    except Exception:
        pass
    specs = []
    for dname in ("bfloat16", "float16"):
        for D in (64, 128):
            for what in ("dense", "causal"):
                specs.append((dname, D, what, ""))
    specs += [("bfloat16", 64, "mask", ""), ("bfloat16", 128, "flex", ""),
              ("float16", 64, "flex", "")]
    # Alternative tilings (bench/NOTES.md G7): checked, then timed.
    alts = {"64:4,2,64,1": 64, "64:8,1,64,1": 64, "128:8,1,64,1": 128}
    for cfg, D in alts.items():
        for what in ("dense", "causal"):
            specs.append(("bfloat16", D, what, cfg))
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(len(specs), 15), maxtasksperchild=1) as pool:
        groups = pool.map(worker, specs, chunksize=1)
    res["correctness_wall_s"] = time.perf_counter() - t0
    res["groups"] = groups
    (outdir / "mma_check.json").write_text(json.dumps(res, indent=1))
    t0 = time.perf_counter()
    runs = [("", _points(quick, lens=(4096, 16384)))]
    runs += [(cfg, _points(quick, (D,), (4096, 16384), False)) for cfg, D in alts.items()]
    res["timing_runs"] = []
    for run in runs:  # one at a time: timings must not share the GPU
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            res["timing_runs"].append(pool.map(timing, [run])[0])
        (outdir / "mma_check.json").write_text(json.dumps(res, indent=1))
    res["timing_wall_s"] = time.perf_counter() - t0
    res["timing"] = res["timing_runs"][0]["rows"]
    (outdir / "mma_check.json").write_text(json.dumps(res, indent=1))

    print("\n== correctness (err / torch err / bound)")
    nbad = 0
    for gr in groups:
        for r in gr["results"]:
            if not r["ok"]:
                nbad += 1
            flag = "ok " if r["ok"] else "BAD"
            if "error" in r:
                print(flag, r["case"], r["error"][-600:])
            else:
                te = r.get("torch_err")
                print(f"{flag} {r['case']}: {r['err']:.3g} / "
                      f"{te if te is None else f'{te:.3g}'} / {r['bound']:.3g}"
                      + (f" mma={r['mma']}" if "mma" in r else ""))
    print(f"{sum(len(g['results']) for g in groups)} cases, {nbad} bad; "
          f"wall {res['correctness_wall_s']:.0f}s")
    print("\n== kernels (regs, local bytes, dyn shared)")
    _print_kernels(groups + res["timing_runs"],
                   ("kernel", "config", "regs", "local_bytes", "shared_dyn"))
    print("\n== forward TFLOP/s (B*L=16k, H*D=2048)")
    print("dtype D L causal | attn.mma FLASH EFFICIENT CUDNN | mma/FLASH")
    for r in res["timing"]:
        fl = r.get("FLASH")
        print(f"{r['dtype']} {r['D']} {r['L']} {r['causal']} | {r['attn_mma']:.1f} "
              f"{fl if fl is None else f'{fl:.1f}'} {r.get('EFFICIENT') or 0:.1f} "
              f"{r.get('CUDNN') or 0:.1f} | {r['attn_mma'] / fl if fl else 0:.2f}")
    print("\n== alternative tilings (attn.mma TFLOP/s; default in parentheses)")
    base = {(r["dtype"], r["D"], r["L"], r["causal"]): r["attn_mma"] for r in res["timing"]}
    for tr in res["timing_runs"][1:]:
        for r in tr["rows"]:
            b0 = base.get((r["dtype"], r["D"], r["L"], r["causal"]))
            print(f"{tr['cfg']} tile {r['tile']} {r['dtype']} D{r['D']} L{r['L']} "
                  f"causal={r['causal']}: {r['attn_mma']:.1f} ({b0 or 0:.1f})")


if __name__ == "__main__":
    main()
