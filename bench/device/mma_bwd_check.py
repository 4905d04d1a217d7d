"""The tensor-core backward (gpu/_mma_bwd.py) on the GPU machine: correctness, resources,
speed. One call, about 2 minutes including Numba compiles:

    python3 bench/device/mma_bwd_check.py          (writes $OUT/mma_bwd.json)

1. Correctness of gpu.backward for bfloat16 and float16, D = 64 and 128 (four worker
   processes in parallel: Numba compiles are single-threaded): L in {1, 17, 97, 1025}
   (Lq != Lk once), causal and not, GQA 8/2, (B, L, H, D) strided inputs once, a bool
   attn_mask with a fully masked row (zero dQ there, no NaN), and the public autograd
   path called three times on fresh tensors (the third runs the bound launches).
   Oracle: attn.reference in float64 with autograd; bound |ours - oracle| <= 2 |torch
   same dtype - oracle| + floor * max|oracle| (tests/_util.py's rule and floors).
   Every case also asserts that the mma kernel is the one launched.
2. Registers / local memory of each kernel compiled (Numba's resource queries).
3. Speed: bf16 forward and forward+backward through attn.scaled_dot_product_attention
   against SDPBackend.FLASH_ATTENTION, B = 4, L = 4096, H*D = 2048, D = 64 and 128,
   causal and not; CUDA events, medians. TFLOP/s by the FlashAttention formula
   (forward 4 B H L^2 D, halved when causal; forward+backward 3.5x that).

Each case catches its own exception and reports it, so one failure hides nothing.
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

FLOOR = {"float16": 1e-3, "bfloat16": 4e-3}  # tests/_util.py
DEADLINE_S = 110  # correctness groups; the timing runs after (kernels from the disk cache)
DEV = "cuda"  # (a dry run of _case in the CUDA simulator sets "cpu")


def _spy():
    """Count which dK/dV kernel factory each backward asks for."""
    from attn.gpu import _kernels, _mma_bwd
    used = {"mma": 0, "simt": 0}

    def wrap(f, key):
        def g(*a, **kw):
            used[key] += 1
            return f(*a, **kw)
        return g

    _mma_bwd.dkdv_kernel = wrap(_mma_bwd.dkdv_kernel, "mma")
    _kernels.dkdv_kernel = wrap(_kernels.dkdv_kernel, "simt")
    return used


def _grads(fn, ins, go):
    import torch
    ins = [t.detach().requires_grad_() for t in ins]
    return torch.autograd.grad(fn(*ins), ins, go)


def _case(attn, gpu, used, dname, B, Hq, Hkv, Lq, Lk, D, causal, layout=None,
          mask_kind=None, public=False, seed=0):
    import torch
    import torch.nn.functional as F
    from attn.reference import attention

    dtype = getattr(torch, dname)
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(seed)

    def mk(H, L):
        if layout == "blhd":  # (B, L, H, D) storage: strided rows, 16-byte copies
            return torch.randn(B, L, H, D, device=dev, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, H, L, D, device=dev, generator=g).to(dtype)

    q, k, v = mk(Hq, Lq), mk(Hkv, Lk), mk(Hkv, Lk)
    go = torch.randn(B, Hq, Lq, D, device=dev, generator=g).to(dtype)
    mask = None
    if mask_kind == "bool_empty_row":
        mask = torch.rand(1, 1, Lq, Lk, device=dev, generator=g) > 0.3
        mask[..., min(2, Lq - 1), :] = False
    gqa = Hq != Hkv
    name = (f"{dname} B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D} causal={causal} layout={layout} "
            f"mask={mask_kind}{' public x3' if public else ''}")
    res = {"case": name}
    n0 = dict(used)
    if public:
        # Through the autograd layer three times on fresh tensors: the first call
        # records its launches, the second binds them, the third runs the bound
        # launches of _Repeats (only the tensor pointers written).
        runs = []
        for rep in range(3):
            qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
            o = attn.scaled_dot_product_attention(qq, kk, vv, is_causal=causal,
                                                  enable_gqa=gqa)
            o.backward(go)
            runs.append((qq.grad, kk.grad, vv.grad))
        ours = runs[2]
        res["public_runs_equal_dkdv"] = bool(torch.equal(runs[0][1], runs[2][1])
                                             and torch.equal(runs[0][2], runs[2][2]))
    else:
        out, lse = gpu.forward(q, k, v, mask, causal)
        ours = gpu.backward(q, k, v, out, lse, go, None, mask, causal)
    if dev == "cuda":
        torch.cuda.synchronize()
    res["mma_launched"] = used["mma"] > n0["mma"] and used["simt"] == n0["simt"]
    ref = _grads(lambda a, b, c: attention(a, b, c, mask, causal, None, enable_gqa=gqa)[0],
                 [t.double() for t in (q, k, v)], go.double())
    if mask_kind is None:
        tor = _grads(lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, is_causal=causal, enable_gqa=gqa), [q, k, v], go)
    else:  # PyTorch's math in the same dtype (SDPA gives NaN for the masked row)
        tor = _grads(lambda a, b, c: attention(a, b, c, mask, causal, None,
                                               enable_gqa=gqa)[0], [q, k, v], go)
    ok = bool(res["mma_launched"])
    for i, n in enumerate(("dq", "dk", "dv")):
        e = _err(ours[i], ref[i])
        te = _err(tor[i], ref[i])
        scale = max(ref[i].abs().max().item(), go.abs().max().item() * 0.1, 1e-6)
        bound = 2 * te + FLOOR[dname] * scale
        nan = bool(torch.isnan(ours[i]).any().item())
        res[n] = {"err": e, "torch_err": te, "bound": bound, "nan": nan}
        ok = ok and e <= bound and not nan and ours[i].dtype == dtype
    if mask_kind == "bool_empty_row":
        r = min(2, Lq - 1)
        zero = bool((ours[0][:, :, r] == 0).all().item())
        res["empty_row_dq_zero"] = zero
        ok = ok and zero
    if public:
        ok = ok and res["public_runs_equal_dkdv"]
    res["ok"] = bool(ok)
    return res


def worker(spec):
    dname, D = spec
    t0 = time.perf_counter()
    out = []
    try:
        attn, gpu = _gpu()
        used = _spy()
    except Exception:
        return {"spec": spec, "results": [{"case": f"import {spec}", "ok": False,
                                           "error": traceback.format_exc()[-2000:]}],
                "kernels": [], "wall_s": time.perf_counter() - t0}
    cases = [
        (1, 2, 2, 1, 1, D, False),
        (1, 2, 2, 17, 17, D, True),
        (2, 8, 2, 97, 97, D, False),
        (1, 8, 2, 1025, 1025, D, True),
        (1, 2, 2, 97, 1025, D, False),
    ]
    extra = []
    if (dname, D) == ("bfloat16", 128):
        extra.append(((2, 4, 2, 300, 300, D, True), {"layout": "blhd"}))
    if (dname, D) == ("bfloat16", 64):
        extra.append(((1, 2, 2, 97, 130, D, False), {"mask_kind": "bool_empty_row"}))
        extra.append(((2, 8, 2, 513, 513, D, True), {"public": True}))
    if (dname, D) == ("float16", 128):
        extra.append(((1, 8, 2, 200, 200, D, False), {"public": True}))
    for i, c in enumerate([(c, {}) for c in cases] + extra):
        args, kw = c
        try:
            out.append(_case(attn, gpu, used, dname, *args, seed=i, **kw))
        except Exception:
            out.append({"case": f"{dname} {args} {kw}", "ok": False,
                        "error": traceback.format_exc()[-2000:]})
        print(("ok " if out[-1]["ok"] else "BAD ") + out[-1]["case"], flush=True)
    try:
        kern = _kernels_used()
    except Exception as e:
        kern = [{"kernel": f"query failed: {e}"}]
    return {"spec": spec, "results": out, "kernels": kern,
            "wall_s": time.perf_counter() - t0}


def timing():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from _timing import timed

    attn, gpu = _gpu()
    rows = []
    for D in (64, 128):
        for causal in (False, True):
            row = {"dtype": "bfloat16", "D": D, "L": 4096, "B": 4, "H": 2048 // D,
                   "causal": causal, "mma_bwd_tile": gpu._mma_bwd.tile(D, D),
                   "mma_bwd_config": str(gpu._mma_bwd.config(D, D))}
            try:
                B, H, L = 4, 2048 // D, 4096
                q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                do = torch.randn_like(q)
                fl = 4 * B * H * L * L * D / (2 if causal else 1)

                def ours_f():
                    with torch.no_grad():
                        attn.scaled_dot_product_attention(q, k, v, is_causal=causal)

                def ours_fb():
                    attn.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)

                def fl_f():
                    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                def fl_fb():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do)

                t0 = time.perf_counter()
                ours_fb()
                torch.cuda.synchronize()
                row["attn_first_call_s"] = time.perf_counter() - t0
                tf, tfb = timed(ours_f, 10, 3), timed(ours_fb, 10, 3)
                ff, ffb = timed(fl_f, 10, 3), timed(fl_fb, 10, 3)
                row.update(attn_fwd=fl / tf / 1e12, attn_fwdbwd=3.5 * fl / tfb / 1e12,
                           attn_bwd=2.5 * fl / max(tfb - tf, 1e-9) / 1e12,
                           flash_fwd=fl / ff / 1e12, flash_fwdbwd=3.5 * fl / ffb / 1e12,
                           flash_bwd=2.5 * fl / max(ffb - ff, 1e-9) / 1e12)
                row["fwdbwd_ratio"] = row["attn_fwdbwd"] / row["flash_fwdbwd"]
            except Exception:
                row["error"] = traceback.format_exc()[-1500:]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    out = Path(os.environ.get("OUT") or (sys.argv[1] if len(sys.argv) > 1 else
                                         "/tmp/mma_bwd"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    import torch
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
           "ATTN_GPU_MMA_BWD": os.environ.get("ATTN_GPU_MMA_BWD")}
    try:
        import importlib.metadata as md
        res["numba_cuda"] = md.version("numba-cuda")
    except Exception:
        pass
    specs = [(d, D) for d in ("bfloat16", "float16") for D in (64, 128)]
    ctx = mp.get_context("spawn")
    groups = []
    pool = ctx.Pool(len(specs), maxtasksperchild=1)
    pending = [(s, pool.apply_async(worker, (s,))) for s in specs]
    for s, p in pending:
        left = DEADLINE_S - (time.perf_counter() - t_start)
        try:
            groups.append(p.get(timeout=max(left, 1)))
        except Exception as e:
            groups.append({"spec": s, "results": [{"case": f"group {s}", "ok": False,
                                                   "error": f"{type(e).__name__}: {e}"}],
                           "kernels": []})
    pool.terminate()
    res["correctness_wall_s"] = time.perf_counter() - t_start
    res["groups"] = groups
    (out / "mma_bwd.json").write_text(json.dumps(res, indent=1))
    t0 = time.perf_counter()
    try:
        res["timing"] = timing()
    except Exception:
        res["timing"] = [{"error": traceback.format_exc()[-1500:]}]
    res["timing_wall_s"] = time.perf_counter() - t0
    try:
        res["timing_kernels"] = _kernels_used()
    except Exception:
        pass
    (out / "mma_bwd.json").write_text(json.dumps(res, indent=1))

    print("\n== correctness: err / torch err / bound per gradient")
    nbad = ncase = 0
    for gr in groups:
        for r in gr["results"]:
            ncase += 1
            nbad += not r["ok"]
            flag = "ok " if r["ok"] else "BAD"
            if "error" in r:
                print(flag, r["case"], r["error"][-800:])
                continue
            parts = []
            for n in ("dq", "dk", "dv"):
                x = r[n]
                parts.append(f"{n} {x['err']:.2g}/{x['torch_err']:.2g}/{x['bound']:.2g}"
                             + (" NaN" if x["nan"] else ""))
            print(f"{flag} {r['case']}: " + "  ".join(parts)
                  + ("" if r["mma_launched"] else "  (SIMT kernel ran!)"))
    print(f"{ncase} cases, {nbad} bad; correctness wall {res['correctness_wall_s']:.0f}s")
    print("\n== kernels (regs, local bytes, dyn shared)")
    _print_kernels(groups)
    print("\n== bf16 TFLOP/s, B=4 L=4096 H*D=2048 (bwd = from fwd+bwd minus fwd)")
    print("D causal | attn fwd bwd fwd+bwd | FLASH fwd bwd fwd+bwd | fwd+bwd ratio")
    for r in res["timing"]:
        if "error" in r:
            print(r.get("D"), r.get("causal"), "ERROR", r["error"][-600:])
            continue
        print(f"{r['D']} {r['causal']} | {r['attn_fwd']:.1f} {r['attn_bwd']:.1f} "
              f"{r['attn_fwdbwd']:.1f} | {r['flash_fwd']:.1f} {r['flash_bwd']:.1f} "
              f"{r['flash_fwdbwd']:.1f} | {r['fwdbwd_ratio']:.2f}")
    print(f"total wall {time.perf_counter() - t_start:.0f}s; json {out / 'mma_bwd.json'}")


if __name__ == "__main__":
    main()
