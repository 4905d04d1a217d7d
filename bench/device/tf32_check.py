"""The float32 tensor-core forward (gpu/_mma.py kind "f32", 3xTF32) on the GPU machine:
correctness, resources, speed, in one call (about 3-4 minutes with the Numba compiles):

    python3 bench/device/tf32_check.py [OUTDIR] [--quick] [--final]   (OUTDIR: $OUT)

(--final: the default tiles only, forward timing against PyTorch without the SIMT and
alternative-tiling runs and without forward+backward; --quick: L = 4096 only.)

1. Correctness, in parallel worker processes (Numba compiles are single-threaded):
   float32, D = 64 and 128, lengths {1, 17, 97, 128, 1025} (Lq != Lk too), causal and
   not, GQA, (B, L, H, D) strided inputs (cp.async path), a strided head dim and a
   misaligned view (element-load path), Dv != D, bool and additive masks with a fully
   masked row, FlexAttention block masks with mask_mod/score_mod, determinism, and the
   public attn.scaled_dot_product_attention three times (the third runs the bound
   launch). Oracle: attn.reference in float64; bound |ours - oracle| <= 2 |torch
   float32 - oracle| + 2e-5 max(1, |oracle|) (tests/test_gpu.py's rule). Every case
   asserts which kernel ran (the 3xTF32 one; the SIMT one in the ATTN_GPU_TF32X3=0
   group). The alternative tile configurations timed below are checked too.
2. Registers / local memory of every kernel compiled (Numba's resource queries).
3. Speed: float32 forward, B*L = 16k tokens, H*D = 2048, L 1k..16k, D 64/128, causal and
   not: attn 3xTF32, attn SIMT (ATTN_GPU_TF32X3=0, its own process), PyTorch SDPA
   EFFICIENT, FLASH and CUDNN (float32 where PyTorch has it; the refusal is recorded
   otherwise), TF32 matmuls off; then forward+backward at L = 4096 (attn: 3xTF32 forward
   and the SIMT backward) against EFFICIENT; then the alternative tilings (attn only).
   CUDA events, median of 7 after 2 warm-ups.

Writes OUTDIR/tf32_check.json and prints a table at the end. Each case and timing point
catches its own exception and reports it, so one failure hides nothing.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _checks import gpu_modules as _gpu  # noqa: E402
from _checks import kernels_used as _kernels_used  # noqa: E402
from _checks import max_err as _err  # noqa: E402
from _checks import print_kernels as _print_kernels  # noqa: E402

FLOOR = 2e-5  # tests/test_gpu.py, float32
DEV = os.environ.get("TF32_CHECK_DEV", "cuda")  # "cpu": a dry run in the CUDA simulator
# Alternative tilings (NW, MT, BN, QREG), checked then timed (bench/NOTES.md G10).
ALTS = {"64:4,1,64,0": 64, "64:4,1,32,0": 64, "128:4,1,16,0": 128, "128:8,1,32,0": 128}


def _spy():
    """Count the forward kernel factories called: 3xTF32 (_mma, kind f32) or SIMT."""
    from attn.gpu import _kernels, _mma
    used = {"tf32": 0, "simt": 0}
    f_mma, f_simt = _mma.forward_kernel, _kernels.forward_kernel

    def mma(kind, *a, **kw):
        key = "tf32" if kind == "f32" else "other"
        used[key] = used.get(key, 0) + 1
        return f_mma(kind, *a, **kw)

    def simt(*a, **kw):
        used["simt"] += 1
        return f_simt(*a, **kw)

    # The launcher's plan cache calls these through the module attributes.
    _mma.forward_kernel = mma
    _kernels.forward_kernel = simt
    return used


def _case(gpu, used, want, B, Hq, Hkv, Lq, Lk, D, Dv, causal, layout=None, mask_kind=None,
          seed=0):
    import torch
    import torch.nn.functional as F
    from attn.reference import attention

    dev = DEV
    g = torch.Generator(device=dev).manual_seed(seed)

    def mk(H, L, W):
        if layout == "blhd":  # (B, L, H, D) storage: 16-byte rows, cp.async path
            return torch.randn(B, L, H, W, device=dev, generator=g).transpose(1, 2)
        if layout == "dmajor":  # head dim strided: element-load path
            return torch.randn(B, H, W, L, device=dev, generator=g).transpose(2, 3)
        if layout == "offset":  # data pointer 4 bytes past 16-byte alignment
            x = torch.randn(B * H * L * W + 1, device=dev, generator=g)
            return x[1:].view(B, H, L, W)
        return torch.randn(B, H, L, W, device=dev, generator=g)

    q, k, v = mk(Hq, Lq, D), mk(Hkv, Lk, D), mk(Hkv, Lk, Dv)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, device=dev, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "bool_empty_row":
        mask = torch.rand(1, 1, Lq, Lk, device=dev, generator=g) > 0.3
        mask[..., min(2, Lq - 1), :] = False
    elif mask_kind == "additive":
        mask = torch.randn(1, Hq, Lq, Lk, device=dev, generator=g)
    before = dict(used)
    out, lse = gpu.forward(q, k, v, mask, causal)
    out2, lse2 = gpu.forward(q, k, v, mask, causal)
    ran = {kk: used.get(kk, 0) - before.get(kk, 0) for kk in used}
    qd, kd, vd = (t.double() for t in (q, k, v))
    ro, rl = attention(qd, kd, vd, mask, causal, None, enable_gqa=Hq != Hkv)
    name = (f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D}/{Dv} causal={causal} layout={layout} "
            f"mask={mask_kind}")
    res = {"case": name}
    fin = torch.isfinite(rl)
    e_ours = _err(out, ro)
    floor = FLOOR * max(1.0, ro.abs().max().item() if ro.numel() else 1.0)
    if mask_kind == "bool_empty_row":
        e_torch = None
        bound = floor
    else:
        tmask, tcausal = mask, causal
        if mask is not None and causal:  # PyTorch takes one or the other: combine them
            above = torch.ones(Lq, Lk, dtype=torch.bool, device=dev).triu(1)
            tmask, tcausal = mask.float().masked_fill(above, float("-inf")), False
        tq, tk, tv = q, k, v
        if layout == "offset":
            # PyTorch's SDPA (EFFICIENT) on a float32 view 4 bytes past 16-byte alignment
            # stops with "CUDA error: misaligned address" (H200, torch 2.11, first run of
            # this script): its error scale comes from aligned copies of the same values.
            tq, tk, tv = q.clone(), k.clone(), v.clone()
        ot = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, is_causal=tcausal,
                                            enable_gqa=Hq != Hkv)
        e_torch = _err(ot, ro)
        bound = 2 * e_torch + floor
    e_lse = _err(lse[fin], rl[fin]) if fin.any() else 0.0
    res.update(err=e_ours, torch_err=e_torch, bound=bound, lse_err=e_lse,
               kernels=ran)
    ok = (e_ours <= bound and not torch.isnan(out).any().item()
          and torch.equal(torch.isfinite(lse), fin)
          and e_lse <= 1e-5 * max(1.0, rl[fin].abs().max().item() if fin.any() else 1.0)
          and torch.equal(out, out2) and torch.equal(lse, lse2))
    if not fin.all():
        ok = ok and bool((out[~fin] == 0).all().item())
    # A new specialisation compiles once per process; a cached plan calls nothing.
    ok = ok and all(ran.get(kk, 0) == 0 for kk in ran if kk != want)
    res["ok"] = bool(ok)
    return res


def _public_case(attn, gpu, used, D, causal):
    """attn.scaled_dot_product_attention three times on fresh tensors (the second call
    binds the launch, the third runs the bound one); each result against the oracle."""
    import torch
    import torch.nn.functional as F
    from attn.reference import attention
    out = []
    for rep in range(3):
        g = torch.Generator(device="cuda").manual_seed(40 + rep)
        q, k, v = (torch.randn(2, 4, 333, D, device="cuda", generator=g) for _ in range(3))
        o = attn.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ro, _ = attention(q.double(), k.double(), v.double(), None, causal, None)
        et = _err(F.scaled_dot_product_attention(q, k, v, is_causal=causal), ro)
        e = _err(o, ro)
        bound = 2 * et + FLOOR * max(1.0, ro.abs().max().item())
        out.append({"case": f"public sdpa call {rep + 1} D{D} causal={causal}", "err": e,
                    "torch_err": et, "bound": bound, "lse_err": 0.0,
                    "ok": bool(e <= bound and not torch.isnan(o).any().item())})
    return out


def _flex_case(attn, gpu, D, kind, seed=0):
    import torch
    from attn import mods
    from attn.reference import flex_attention as ref_flex

    g = torch.Generator(device="cuda").manual_seed(seed)
    B, Hq, Hkv, L = 1, 4, 2, 517
    q = torch.randn(B, Hq, L, D, device="cuda", generator=g)
    k = torch.randn(B, Hkv, L, D, device="cuda", generator=g)
    v = torch.randn(B, Hkv, L, D, device="cuda", generator=g)

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
    bmc, scorec = make("cpu")
    ro, rl, _ = ref_flex(q.cpu().double(), k.cpu().double(), v.cpu().double(), scorec,
                         bmc, None, True)
    ot, _, _ = ref_flex(q.cpu(), k.cpu(), v.cpu(), scorec, bmc, None, True)
    res = {"case": f"flex {kind} D{D} L{L} GQA 4/2 BLOCK {bm.BLOCK_SIZE}",
           "mma": not gpu.mma_reasons(torch.float32, D, D, None, bm.BLOCK_SIZE)}
    e_ours = _err(out.cpu(), ro)
    e_torch = _err(ot, ro)  # the reference evaluated in float32: float32's error scale
    bound = 2 * e_torch + FLOOR * max(1.0, ro.abs().max().item())
    res.update(err=e_ours, torch_err=e_torch, bound=bound,
               ok=bool(e_ours <= bound and not torch.isnan(out).any().item()
                       and res["mma"]))
    return res


def worker(spec):
    """One group of correctness cases in a fresh process (tile configuration and the
    TF32X3 switch are read at import)."""
    D, what, cfg = spec
    if cfg:
        os.environ["ATTN_GPU_TF32_CONFIG"] = cfg
    if what == "simt":
        os.environ["ATTN_GPU_TF32X3"] = "0"
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    attn, gpu = _gpu()
    used = _spy()
    want = "simt" if what == "simt" else "tf32"
    out = []
    t0 = time.perf_counter()

    def run(f, *a, **kw):
        try:
            r = f(*a, **kw)
            out.extend(r if isinstance(r, list) else [r])
        except Exception:
            out.append({"case": f"{spec} {a[3:] if len(a) > 3 else a}", "ok": False,
                        "error": traceback.format_exc()[-2000:]})

    if what == "alt":  # an alternative tiling: a few dense and causal cases
        for c in (False, True):
            for Lq, Lk in ((17, 17), (97, 128), (1025, 1025)):
                run(_case, gpu, used, want, 1, 2, 2, Lq, Lk, D, D, c, seed=Lq + Lk)
            run(_case, gpu, used, want, 2, 4, 2, 300, 300, D, D, c, "blhd", seed=5)
    elif what in ("dense", "causal"):
        c = what == "causal"
        for Lq, Lk in ((1, 1), (17, 17), (97, 128), (128, 97), (1025, 1025)):
            run(_case, gpu, used, want, 1, 2, 2, Lq, Lk, D, D, c, seed=Lq + Lk)
        run(_case, gpu, used, want, 2, 4, 2, 300, 300, D, D, c, "blhd", seed=5)
        run(_case, gpu, used, want, 1, 4, 1, 200, 333, D, D, c, "dmajor", seed=6)
        run(_case, gpu, used, want, 1, 2, 2, 150, 150, D, D, c, "offset", seed=7)
        run(_public_case, attn, gpu, used, D, c)
    elif what == "mask":
        run(_case, gpu, used, want, 2, 2, 2, 97, 130, D, D, False, None, "bool", 8)
        run(_case, gpu, used, want, 1, 2, 2, 97, 97, D, D, False, None, "bool_empty_row", 9)
        run(_case, gpu, used, want, 1, 2, 1, 128, 200, D, D, True, None, "additive", 10)
        run(_case, gpu, used, want, 1, 2, 2, 97, 97, D, 2 * D if D == 64 else D // 2,
            True, seed=11)  # Dv != D
    elif what == "flex":
        for kind in ("causal+alibi", "document", "window"):
            run(_flex_case, attn, gpu, D, kind)
    elif what == "simt":  # the switch: SIMT kernel, same results within the rule
        for c in (False, True):
            run(_case, gpu, used, want, 1, 2, 2, 1025, 1025, D, D, c, seed=20)
    for r in out:
        if cfg:
            r["case"] += f" config={cfg}"
    try:
        kern = _kernels_used()
    except Exception as e:
        kern = [{"kernel": f"query failed: {e}", "regs": None, "local_bytes": None,
                 "shared_dyn": None}]
    for kk in kern:
        kk["config"] = cfg or ("simt" if what == "simt" else "default")
    return {"spec": spec, "results": out, "kernels": kern,
            "wall_s": time.perf_counter() - t0}


def _points(quick, Ds=(64, 128), lens=(1024, 4096, 16384)):
    return [(D, L, c) for D in Ds for L in ((4096,) if quick else lens)
            for c in (False, True)]


def timing(args):
    """One timing process: ``mode`` "tf32" (attn and PyTorch's backends), "simt"
    (ATTN_GPU_TF32X3=0, attn only) or a tile configuration (attn only)."""
    mode, pts, fb_pts = args
    if mode == "simt":
        os.environ["ATTN_GPU_TF32X3"] = "0"
    elif mode != "tf32":
        os.environ["ATTN_GPU_TF32_CONFIG"] = mode
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from _timing import timed
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    attn, gpu = _gpu()
    peers = {"EFFICIENT": SDPBackend.EFFICIENT_ATTENTION,
             "FLASH": SDPBackend.FLASH_ATTENTION,
             "CUDNN": SDPBackend.CUDNN_ATTENTION} if mode == "tf32" else {}
    rows = []

    def point(D, L, causal, fwdbwd):
        B, H = 16384 // L, 2048 // D
        g = torch.Generator(device="cuda").manual_seed(L + D)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g,
                               requires_grad=fwdbwd) for _ in range(3))
        do = torch.randn_like(q)
        fl = 4.0 * B * H * L * L * D / (2 if causal else 1) * (3.5 if fwdbwd else 1.0)
        row = {"mode": mode, "D": D, "L": L, "B": B, "H": H, "causal": causal,
               "pass": "fwd+bwd" if fwdbwd else "fwd"}
        if not fwdbwd:
            row["tile"] = list(gpu._mma.tile(D, D, "f32"))

        def run(f):
            if fwdbwd:
                return lambda: f(q, k, v, is_causal=causal).backward(do)

            def fwd():
                with torch.no_grad():
                    f(q, k, v, is_causal=causal)
            return fwd

        cands = {"attn": attn.scaled_dot_product_attention}
        for name, be in peers.items():
            if fwdbwd and name != "EFFICIENT":
                continue

            def peer(*a, _be=be, **kw):
                with sdpa_kernel(_be):
                    return F.scaled_dot_product_attention(*a, **kw)
            cands[name] = peer
        for name, f in cands.items():
            try:
                t0 = time.perf_counter()
                s = timed(run(f), 7 if not fwdbwd else 5, 2 if not fwdbwd else 1)
                row[name] = fl / s / 1e12
                if name == "attn":
                    row["attn_wall_s"] = time.perf_counter() - t0
            except Exception as e:  # a backend refusing float32 or a shape
                row[name] = None
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()

    for D, L, c in pts:
        point(D, L, c, False)
    for D, L, c in fb_pts:
        point(D, L, c, True)
    try:
        kern = _kernels_used()
    except Exception as e:
        kern = [{"kernel": f"query failed: {e}"}]
    for kk in kern:
        kk["config"] = mode
    return {"mode": mode, "rows": rows, "kernels": kern}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    outdir = Path(args[0] if args else os.environ.get("OUT", "/tmp/tf32_check"))
    outdir.mkdir(parents=True, exist_ok=True)
    import torch
    import numba
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "numba": numba.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
        import importlib.metadata as md
        res["numba_cuda"] = md.version("numba-cuda")
    except Exception:
        pass
    specs = [(D, what, "") for D in (64, 128)
             for what in ("dense", "causal", "mask", "flex", "simt")]
    final = "--final" in sys.argv  # the default tiles only: no alternatives, no SIMT
    if not final:
        specs += [(D, "alt", cfg) for cfg, D in ALTS.items()]
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(len(specs), 16), maxtasksperchild=1) as pool:
        groups = pool.map(worker, specs, chunksize=1)
    res["correctness_wall_s"] = time.perf_counter() - t0
    res["groups"] = groups
    (outdir / "tf32_check.json").write_text(json.dumps(res, indent=1))

    t0 = time.perf_counter()
    fb = [(D, 4096, c) for D in (64, 128) for c in (False, True)]
    runs = [("tf32", _points(quick), [] if final else fb)]
    if not final:
        runs.append(("simt", _points(quick), []))
        runs += [(cfg, _points(quick, (D,), (4096, 16384)), []) for cfg, D in ALTS.items()]
    res["timing_runs"] = []
    for run in runs:  # one at a time: timings must not share the GPU
        try:
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                res["timing_runs"].append(pool.map(timing, [run])[0])
        except Exception:
            res["timing_runs"].append({"mode": run[0], "rows": [],
                                       "error": traceback.format_exc()[-2000:]})
        (outdir / "tf32_check.json").write_text(json.dumps(res, indent=1))
    res["timing_wall_s"] = time.perf_counter() - t0
    (outdir / "tf32_check.json").write_text(json.dumps(res, indent=1))

    print("\n== correctness (err / torch err / bound)")
    nbad = 0
    for gr in groups:
        for r in gr["results"]:
            nbad += not r["ok"]
            flag = "ok " if r["ok"] else "BAD"
            if "error" in r:
                print(flag, r["case"], r["error"][-600:])
            else:
                te = r.get("torch_err")
                print(f"{flag} {r['case']}: {r['err']:.3g} / "
                      f"{te if te is None else f'{te:.3g}'} / {r['bound']:.3g}"
                      + (f" lse {r['lse_err']:.2g}" if r.get("lse_err") else "")
                      + (f" ran {r['kernels']}" if r.get("kernels") else ""))
    print(f"{sum(len(g['results']) for g in groups)} cases, {nbad} bad; "
          f"wall {res['correctness_wall_s']:.0f}s")
    print("\n== kernels (regs, local bytes, dyn shared)")
    _print_kernels(groups + res["timing_runs"],
                   ("kernel", "config", "regs", "local_bytes", "shared_dyn"))
    by = {}
    for tr in res["timing_runs"]:
        for r in tr["rows"]:
            by[(tr["mode"], r["pass"], r["D"], r["L"], r["causal"])] = r
    print("\n== float32 TFLOP/s (B*L=16k, H*D=2048): 3xTF32 SIMT EFFICIENT FLASH CUDNN | "
          "3xTF32/EFFICIENT SIMT/EFFICIENT")

    def f(x):
        return "-" if x is None else f"{x:.1f}"
    for (mode, ps, D, L, c), r in by.items():
        if mode != "tf32":
            continue
        s = by.get(("simt", ps, D, L, c), {}).get("attn")
        e = r.get("EFFICIENT")
        print(f"{ps} D{D} L{L} causal={c}: {f(r.get('attn'))} {f(s)} {f(e)} "
              f"{f(r.get('FLASH'))} {f(r.get('CUDNN'))} | "
              f"{r['attn'] / e if e and r.get('attn') else 0:.2f} "
              f"{s / e if e and s else 0:.2f}")
    print("\n== alternative tilings (attn TFLOP/s; default in parentheses)")
    for (mode, ps, D, L, c), r in by.items():
        if mode in ("tf32", "simt"):
            continue
        b0 = by.get(("tf32", ps, D, L, c), {}).get("attn")
        print(f"{mode} tile {r.get('tile')} D{D} L{L} causal={c}: {f(r.get('attn'))} "
              f"({f(b0)})")
    print(f"timing wall {res['timing_wall_s']:.0f}s")


if __name__ == "__main__":
    main()
