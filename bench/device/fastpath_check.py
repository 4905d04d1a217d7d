"""GPU machine: the bound-launch repeated-call path (gpu.forward and the public API's
repeat cache) computes the same function as the full path on fresh inputs, and its
host cost per call. Run from the repository root: python bench/device/fastpath_check.py"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import attn  # noqa: E402

try:
    from attn import gpu
except ImportError:  # source tree without an install
    attn.__path__.append(ROOT)
    from attn import gpu


def ref(q, k, v, causal, gqa):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          is_causal=causal, enable_gqa=gqa)


def check():
    fails, n = [], 0
    torch.manual_seed(0)
    cases = [((2, 4, 100, 64), (2, 4, 100, 64), False, False, torch.float32),
             ((2, 4, 100, 64), (2, 4, 100, 64), True, False, torch.bfloat16),
             ((1, 8, 77, 128), (1, 2, 130, 128), True, True, torch.float16),
             ((1, 8, 77, 128), (1, 2, 130, 128), True, True, torch.float32),
             ((1, 2, 33, 64), (1, 2, 33, 64), False, False, torch.float32)]
    want = os.environ.get("ATTN_CHECK_DTYPES", "float32,bfloat16,float16").split(",")
    for qs, ks, causal, gqa, dt in cases:
        if str(dt).split(".")[-1] not in want:
            continue
        print("case", qs, ks, causal, gqa, dt, flush=True)
        for it in range(5):  # call 1-2 learn and bind, 3+ use the bound launch
            for alias in (False, True):
                if alias and qs != ks:
                    continue
                q = torch.randn(qs, device="cuda", dtype=dt)
                k = q if alias else torch.randn(ks, device="cuda", dtype=dt)
                v = q if alias else torch.randn(ks, device="cuda", dtype=dt)
                if it % 2 and not alias:  # transposed storage, same logical shape
                    k = torch.randn(ks[0], ks[2], ks[1], ks[3], device="cuda",
                                    dtype=dt).transpose(1, 2)
                r = ref(q, k, v, causal, gqa)
                t = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
                for name, fn in (("gpu.forward", lambda: gpu.forward(q, k, v, None, causal)[0]),
                                 ("attn.sdpa", lambda: attn.scaled_dot_product_attention(
                                     q, k, v, is_causal=causal, enable_gqa=gqa))):
                    o = fn()
                    err = (o.double() - r).abs().max().item()
                    terr = (t.double() - r).abs().max().item()
                    n += 1
                    if not (err <= 2 * terr + 1e-5) or not torch.isfinite(o).all():
                        fails.append(f"{name} {qs} {ks} causal={causal} {dt} it={it} "
                                     f"alias={alias}: err {err:.3g} torch {terr:.3g}")
    plans = gpu._FWD_REPEATS.plans
    bound = sum(p[1] is not None for p in plans.values())
    return {"checks": n, "fails": fails, "bound_plans": bound, "plans": len(plans)}


def check_backward():
    """Gradients through the public API on repeated calls (bound backward from the
    third call) against float64 autograd, relative to PyTorch's own error."""
    fails, n = [], 0
    torch.manual_seed(1)
    want = os.environ.get("ATTN_CHECK_DTYPES", "float32,bfloat16,float16").split(",")
    for qs, ks, causal, gqa, dt in [((2, 4, 100, 64), (2, 4, 100, 64), False, False, torch.float32),
                                    ((1, 8, 77, 128), (1, 2, 130, 128), True, True, torch.float32),
                                    ((2, 4, 100, 64), (2, 4, 100, 64), True, False, torch.bfloat16)]:
        if str(dt).split(".")[-1] not in want:
            continue
        for it in range(4):
            q, k, v = (torch.randn(s_, device="cuda", dtype=dt) for s_ in (qs, ks, ks))
            do = torch.randn(qs, device="cuda", dtype=dt)
            grads = {}
            for name, fn, cast in (("ref", F.scaled_dot_product_attention, torch.float64),
                                   ("torch", F.scaled_dot_product_attention, None),
                                   ("attn", attn.scaled_dot_product_attention, None)):
                xs = [(x.to(cast) if cast else x).detach().requires_grad_() for x in (q, k, v)]
                o = fn(*xs, is_causal=causal, enable_gqa=gqa)
                o.backward(do.to(o.dtype))
                grads[name] = [x.grad.double() for x in xs]
            for j, gname in enumerate("qkv"):
                err = (grads["attn"][j] - grads["ref"][j]).abs().max().item()
                terr = (grads["torch"][j] - grads["ref"][j]).abs().max().item()
                n += 1
                if not err <= 2 * terr + 1e-5:
                    fails.append(f"d{gname} {qs} {ks} causal={causal} {dt} it={it}: "
                                 f"err {err:.3g} torch {terr:.3g}")
    plans = gpu._BWD_REPEATS.plans
    return {"checks": n, "fails": fails, "bound_plans": sum(p[1] is not None for p in plans.values()),
            "plans": len(plans)}


def pieces(n=2000):
    """Host µs of the parts of one tiny call."""
    q, k, v = (torch.randn(1, 1, 16, 64, device="cuda") for _ in range(3))
    for _ in range(5):
        gpu.forward(q, k, v)
    key = gpu._dense_key(q, k, v, False, None)
    bound = gpu._FWD_REPEATS.get(key)
    out, lse = gpu.forward(q, k, v)
    ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    from attn import _ops
    cands = {
        "q.new_empty": lambda: q.new_empty((1, 1, 16, 64)),
        "torch.empty(kw)": lambda: torch.empty((1, 1, 16, 64), dtype=q.dtype, device=q.device),
        "_dense_key": lambda: gpu._dense_key(q, k, v, False, None),
        "bound launch": lambda: bound[0](ptrs, 0),
        "gpu.forward": lambda: gpu.forward(q, k, v),
        "_EagerSdpa.apply (no grad)": lambda: _ops._EagerSdpa.apply(q, k, v, None, False, 0.125, "gpu"),
        "attn.sdpa": lambda: attn.scaled_dot_product_attention(q, k, v),
    }
    res = {}
    for name, fn in cands.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        best = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n)
            torch.cuda.synchronize()
        res[name] = best * 1e6
    return res


def host(n=400):
    q, k, v = (torch.randn(1, 1, 16, 64, device="cuda") for _ in range(3))
    qg = q.clone().requires_grad_()
    do = torch.randn_like(q)

    def fwd_bwd_attn():
        attn.scaled_dot_product_attention(qg, k, v).backward(do)

    def fwd_bwd_torch():
        F.scaled_dot_product_attention(qg, k, v).backward(do)

    cands = {
        "attn.gpu.forward": lambda: gpu.forward(q, k, v),
        "attn.sdpa (no grad)": lambda: attn.scaled_dot_product_attention(q, k, v),
        "attn.sdpa (q requires grad)": lambda: attn.scaled_dot_product_attention(qg, k, v),
        "attn.sdpa fwd+bwd": fwd_bwd_attn,
        "torch.sdpa (no grad)": lambda: F.scaled_dot_product_attention(q, k, v),
        "torch.sdpa (q requires grad)": lambda: F.scaled_dot_product_attention(qg, k, v),
        "torch.sdpa fwd+bwd": fwd_bwd_torch,
    }
    res = {}
    for name, fn in cands.items():
        for _ in range(30):
            fn()
        hs = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            hs.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        res[name] = {"host": sorted(hs)[n // 2] * 1e6, "end to end": (time.perf_counter() - t0) / n * 1e6}
    return res


if __name__ == "__main__":
    c = check()
    cb = check_backward()
    h = host()
    pc = pieces()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "check": c, "check_backward": cb,
           "host_us": h, "pieces_us": pc}
    d = os.environ.get("OUT")
    if d:
        with open(os.path.join(d, "fastpath.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(c, indent=1))
    print(json.dumps(cb, indent=1))
    for k_, v_ in pc.items():
        print(f"piece {k_:30s} {v_:7.2f} us (back-to-back, best of 5)")
    for k_, v_ in h.items():
        print(f"{k_:34s} host {v_['host']:7.1f} us   end-to-end {v_['end to end']:7.1f} us")
