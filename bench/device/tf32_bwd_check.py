import os
os.environ["ATTN_GPU_TF32X3_BWD"] = "1"  # the float32 tensor-core backward under test
__doc__ = """The float32 tensor-core backward (gpu/_mma_bwd.py kind "f32", 3xTF32; off by default,
so the first lines above switch it on) on the GPU machine, in one call (first run on an
H200 2026-12-02, bench/NOTES.md G11; bench/results/gpu-tf32-bwd-2026-12-02.json):

    python3 bench/device/tf32_bwd_check.py [OUTDIR] [--quick]   (OUTDIR: $OUT)

(--quick: timing at L = 4096 only; --timing-only: no correctness cases; TF32_CHECK_MODES=on
times the tensor-core backward alone.)

1. Correctness, in parallel worker processes (Numba compiles are single-threaded):
   float32 gradients of gpu.forward + gpu.backward, D = 64 and 128, L in {17, 97/128,
   1025} (Lq != Lk too), causal and not, GQA 4/1, (B, L, H, D) strided inputs, Dv != D,
   a bool mask with a fully masked row, FlexAttention block masks (causal + ALiBi
   score_mod, document mask_mod), the public attn.scaled_dot_product_attention
   backward. Oracle: attn.reference in float64; bound |ours - oracle| <= 2 |torch
   float32 - oracle| + 1e-5 max(|oracle|, |dO|) (tests/_util.py's rule). Every case
   asserts that the 3xTF32 dK/dV kernel ran (the spy on _mma_bwd.dkdv_kernel).
2. Registers / local memory of every kernel compiled (Numba's resource queries).
3. Speed: float32 forward+backward, B*L = 16k tokens, H*D = 2048, L 1k/4k/16k, D 64/128,
   causal and not: attn with the switch on (3xTF32 forward and backward), attn with it
   off (ATTN_GPU_TF32X3_BWD=0 in its own process: 3xTF32 forward, SIMT backward), and
   PyTorch SDPA EFFICIENT (TF32 matmuls off). CUDA events, median of 5 after 1 warm-up.

Writes OUTDIR/tf32_bwd_check.json and prints a table at the end. Each case and timing
point catches its own exception and reports it, so one failure hides nothing.
"""
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _checks import gpu_modules as _gpu  # noqa: E402
from _checks import kernels_used as _kernels_used  # noqa: E402
from _checks import max_err as _err  # noqa: E402
from _checks import print_kernels as _print_kernels  # noqa: E402

FLOOR = 1e-5  # tests/_util.py, float32


def _spy():
    """Count the dK/dV kernel factories called: 3xTF32 (_mma_bwd, kind f32) or SIMT."""
    from attn.gpu import _kernels, _mma_bwd
    used = {"tf32": 0, "simt": 0, "other": 0}
    f_mma, f_simt = _mma_bwd.dkdv_kernel, _kernels.dkdv_kernel

    def mma(kind, *a, **kw):
        used["tf32" if kind == "f32" else "other"] += 1
        return f_mma(kind, *a, **kw)

    def simt(*a, **kw):
        used["simt"] += 1
        return f_simt(*a, **kw)

    _mma_bwd.dkdv_kernel = mma  # the launcher calls them through the module attributes
    _kernels.dkdv_kernel = simt
    return used


def _grads(fn, ins, go):
    import torch
    ins = [t.detach().requires_grad_() for t in ins]
    return torch.autograd.grad(fn(*ins)[0], ins, go)


def _judge(name, grads, ref, tor, go, used, before, kernels=1):
    import torch
    r = {"case": name, "ok": True, "errs": {}}
    for n, a, o, t in zip(("dq", "dk", "dv"), grads, ref, tor):
        e, et = _err(a, o), _err(t, o)
        bound = 2 * et + FLOOR * max(o.abs().max().item(), go.abs().max().item())
        ok = bool(e <= bound and not torch.isnan(a).any())
        r["errs"][n] = {"err": e, "torch_err": et, "bound": bound}
        r["ok"] &= ok
    r["kernels"] = {k: used[k] - before[k] for k in used}
    if r["kernels"]["tf32"] != kernels or r["kernels"]["simt"]:
        r["ok"] = False
        r["why"] = "the 3xTF32 dK/dV kernel did not run"
    return r


def _case(gpu, used, B, Hq, Hkv, Lq, Lk, D, Dv, causal, layout=None, mask_kind=None,
          seed=0):
    import torch
    import torch.nn.functional as F
    from attn.reference import attention
    g = torch.Generator(device="cuda").manual_seed(seed)

    def mk(H, L, W):
        if layout == "blhd":
            return torch.randn(B, L, H, W, device="cuda", generator=g).transpose(1, 2)
        return torch.randn(B, H, L, W, device="cuda", generator=g)
    q, k, v = mk(Hq, Lq, D), mk(Hkv, Lk, D), mk(Hkv, Lk, Dv)
    go = torch.randn(B, Hq, Lq, Dv, device="cuda", generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, Lq, Lk, device="cuda", generator=g) > 0.4
        mask[..., 2, :] = False  # query 2 sees no key: zero dQ, no NaN
    gqa = Hq != Hkv
    out, lse = gpu.forward(q, k, v, mask, causal)
    before = dict(used)
    grads = gpu.backward(q, k, v, out, lse, go, None, mask, causal)
    ref_fn = lambda a, b, c: attention(a, b, c, mask, causal, None, enable_gqa=gqa)  # noqa
    ref = _grads(ref_fn, [t.double() for t in (q, k, v)], go.double())
    # PyTorch's EFFICIENT kernel has no enable_gqa and no strided (B, L, H, D) path in
    # every build ("No available kernel"): those cases compare with PyTorch's math in
    # float32, as masked ones do.
    if mask is None and not gqa and layout is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def tor_fn(a, b, c):
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return (F.scaled_dot_product_attention(a, b, c, is_causal=causal,
                                                       enable_gqa=gqa),)
    else:
        tor_fn = ref_fn  # PyTorch's math in float32 (the masked row gives 0, not NaN)
    tor = _grads(tor_fn, [q, k, v], go)
    name = f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D}/{Dv} causal={causal} {layout} {mask_kind}"
    r = _judge(name, grads, ref, tor, go, used, before)
    if mask is not None and not (grads[0][:, :, 2] == 0).all():
        r["ok"], r["why"] = False, "the query that sees no key has a nonzero dQ"
    return r


def _flex_case(attn, gpu, used, D, kind, seed=0):
    import torch
    from attn import mods, _modgen
    from attn._flex import KernelSpec
    from attn.reference import flex_attention as ref_flex
    L, H = 1000, 4
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, Hh, L, D, device="cuda", generator=g) for Hh in (H, 2, 2))
    go = torch.randn(1, H, L, D, device="cuda", generator=g)
    if kind == "causal+alibi":
        # mods.alibi takes the slopes as a tensor (a kernel argument), one per head.
        slopes = torch.tensor([2.0 ** (-(h + 1)) for h in range(H)], device="cuda")
        mask_mod, score_mod = mods.causal_mask, mods.alibi(slopes)
    elif kind == "relative_bias":  # failed tests/test_gpu_flex.py at D=64 (NOTES G11)
        mask_mod = attn.noop_mask
        score_mod = mods.relative_position_bias(
            torch.randn(H, 2 * L - 1, device="cuda", generator=g))
    else:
        mask_mod = mods.document_mask(torch.tensor([0, 300, 317, 800, L], device="cuda"))
        score_mod = None
    bm = attn.create_block_mask(mask_mod, 1, H, L, L, device="cuda", BLOCK_SIZE=128)
    spec = KernelSpec(None, bm, _modgen.trace_mask_mod(bm.mask_mod),
                      _modgen.trace_score_mod(score_mod) if score_mod else None, False, None)
    out, lse = gpu.forward(q, k, v, None, False, None, flex=spec)
    before = dict(used)
    grads = gpu.backward(q, k, v, out, lse, go, None, None, False, None, flex=spec)
    fn = lambda a, b, c: ref_flex(a, b, c, score_mod, bm, None, True)  # noqa: E731
    ref = _grads(fn, [t.double() for t in (q, k, v)], go.double())
    tor = _grads(fn, [q, k, v], go)
    return _judge(f"flex {kind} D{D} GQA {H}/2", grads, ref, tor, go, used, before)


def _public_case(attn, gpu, used, D, causal):
    import torch
    from attn.reference import attention
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 4, 300, D, device="cuda", generator=g) for _ in range(3))
    go = torch.randn(2, 4, 300, D, device="cuda", generator=g)
    before = dict(used)
    grads = _grads(lambda a, b, c: (attn.scaled_dot_product_attention(
        a, b, c, is_causal=causal),), [q, k, v], go)
    ref_fn = lambda a, b, c: attention(a, b, c, None, causal, None)  # noqa: E731
    ref = _grads(ref_fn, [t.double() for t in (q, k, v)], go.double())
    tor = _grads(ref_fn, [q, k, v], go)
    return _judge(f"public sdpa D{D} causal={causal}", grads, ref, tor, go, used, before)


def worker(spec):
    """One group of correctness cases in a fresh process."""
    D, what = spec
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    attn, gpu = _gpu()
    assert gpu.TF32X3_BACKWARD, "ATTN_GPU_TF32X3_BWD=1 did not reach attn.gpu"
    used = _spy()
    out = []
    t0 = time.perf_counter()

    def run(f, *a, **kw):
        try:
            out.append(f(*a, **kw))
        except Exception:
            out.append({"case": f"{spec} {a[2:]}", "ok": False,
                        "error": traceback.format_exc()[-2000:]})

    if what in ("dense", "causal"):
        c = what == "causal"
        for Lq, Lk in ((17, 17), (97, 128), (128, 97), (1025, 1025)):
            run(_case, gpu, used, 1, 2, 2, Lq, Lk, D, D, c, seed=Lq + Lk)
        run(_case, gpu, used, 2, 4, 2, 300, 300, D, D, c, "blhd", seed=5)
        run(_case, gpu, used, 1, 4, 1, 200, 333, D, D, c, seed=6)  # GQA 4/1
        run(_case, gpu, used, 1, 2, 2, 97, 97, D, 128 if D == 64 else 64, c, seed=7)
        run(_public_case, attn, gpu, used, D, c)
    elif what == "mask":
        run(_case, gpu, used, 2, 2, 2, 97, 130, D, D, False, None, "bool", 8)
        run(_case, gpu, used, 1, 2, 1, 128, 200, D, D, True, None, "bool", 9)
    elif what == "flex":
        for kind in ("causal+alibi", "document", "relative_bias"):
            run(_flex_case, attn, gpu, used, D, kind)
    try:
        kern = _kernels_used()
    except Exception as e:
        kern = [{"kernel": f"query failed: {e}", "regs": None, "local_bytes": None,
                 "shared_dyn": None}]
    return {"spec": spec, "results": out, "kernels": kern,
            "wall_s": time.perf_counter() - t0}


def timing(args):
    """One timing process: mode "on" (attn with the switch on, and EFFICIENT) or "off"
    (ATTN_GPU_TF32X3_BWD=0: attn only, SIMT backward)."""
    mode, pts = args
    os.environ["ATTN_GPU_TF32X3_BWD"] = "1" if mode == "on" else "0"
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from _timing import timed
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    attn, gpu = _gpu()
    assert gpu.TF32X3_BACKWARD == (mode == "on")
    rows = []
    for D, L, causal in pts:
        B, H = 16384 // L, 2048 // D
        g = torch.Generator(device="cuda").manual_seed(L + D)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g,
                               requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        fl = 4.0 * B * H * L * L * D / (2 if causal else 1) * 3.5
        row = {"mode": mode, "D": D, "L": L, "B": B, "H": H, "causal": causal,
               "bwd_reasons": gpu.mma_bwd_reasons(torch.float32, D, D)}

        def eff(*a, **kw):
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(*a, **kw)
        cands = {"attn": attn.scaled_dot_product_attention}
        if mode == "on":
            cands["EFFICIENT"] = eff
        for name, f in cands.items():
            try:
                s = timed(lambda: f(q, k, v, is_causal=causal).backward(do), 5, 1)
                row[name] = fl / s / 1e12
            except Exception as e:
                row[name] = None
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    try:
        kern = _kernels_used()
    except Exception as e:
        kern = [{"kernel": f"query failed: {e}"}]
    return {"mode": mode, "rows": rows, "kernels": kern}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    outdir = Path(args[0] if args else os.environ.get("OUT", "/tmp/tf32_bwd_check"))
    outdir.mkdir(parents=True, exist_ok=True)
    import torch
    import numba
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "numba": numba.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    specs = [(D, what) for D in (64, 128) for what in ("dense", "causal", "mask", "flex")]
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    groups = []
    if "--timing-only" not in sys.argv:
        with ctx.Pool(len(specs), maxtasksperchild=1) as pool:
            groups = pool.map(worker, specs, chunksize=1)
    res["correctness_wall_s"] = time.perf_counter() - t0
    res["groups"] = groups
    (outdir / "tf32_bwd_check.json").write_text(json.dumps(res, indent=1))

    pts = [(D, L, c) for D in (64, 128) for L in ((4096,) if quick else (1024, 4096, 16384))
           for c in (False, True)]
    res["timing_runs"] = []
    modes = os.environ.get("TF32_CHECK_MODES", "on,off").split(",")
    for mode in modes:  # one at a time: timings must not share the GPU
        try:
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                res["timing_runs"].append(pool.map(timing, [(mode, pts)])[0])
        except Exception:
            res["timing_runs"].append({"mode": mode, "rows": [],
                                       "error": traceback.format_exc()[-2000:]})
        (outdir / "tf32_bwd_check.json").write_text(json.dumps(res, indent=1))

    print("\n== correctness (dq/dk/dv err vs bound)")
    nbad = 0
    for gr in groups:
        for r in gr["results"]:
            nbad += not r["ok"]
            flag = "ok " if r["ok"] else "BAD"
            if "error" in r:
                print(flag, r["case"], r["error"][-600:])
                continue
            es = " ".join(f"{n} {x['err']:.2g}/{x['bound']:.2g}" for n, x in r["errs"].items())
            print(f"{flag} {r['case']}: {es} {r.get('why', '')}")
    print(f"{sum(len(g['results']) for g in groups)} cases, {nbad} bad; "
          f"wall {res['correctness_wall_s']:.0f}s")
    print("\n== kernels (regs, local bytes, dyn shared)")
    _print_kernels(groups + res["timing_runs"])
    print("\n== float32 fwd+bwd TFLOP/s (B*L=16k, H*D=2048): on off EFFICIENT | on/EFF off/EFF")
    by = {}
    for run in res["timing_runs"]:
        for row in run.get("rows", []):
            key = (row["D"], row["L"], row["causal"])
            by.setdefault(key, {})[row["mode"]] = row.get("attn")
            if row.get("EFFICIENT") is not None:
                by[key]["EFFICIENT"] = row["EFFICIENT"]

    def f(x):
        return "-" if x is None else f"{x:.1f}"
    for key, r in sorted(by.items()):
        e = r.get("EFFICIENT")
        on, off = r.get("on"), r.get("off")
        print(key, f(on), f(off), f(e), "|",
              f(on / e) if on and e else "-", f(off / e) if off and e else "-")


if __name__ == "__main__":
    main()
