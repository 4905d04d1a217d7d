"""GPU machine: where the time of a varlen_attn / flex_attention forward goes.

bench_varlen times each call from an idle GPU (events around one call), so a call's
host time counts in full; this script separates the two. Per call kind it prints:
  idle     events around one call started on an idle GPU (what the benchmarks report)
  queued   events around 20 back-to-back calls / 20 (GPU time when the host keeps up)
  host     host wall time of one call (no synchronisation inside the timing)
and a cProfile of 20 calls (top functions by own time).
Usage (repository root, GPU machine): python3 bench/device/host_flex.py
"""
import cProfile
import os
import pstats
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import attn  # noqa: E402

try:
    from attn import gpu  # noqa: F401
except ImportError:  # source tree without an install
    attn.__path__.append(ROOT)
    from attn import gpu  # noqa: F401

from bench_varlen import lengths  # noqa: E402


def measure(name, fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    idle = []
    for _ in range(10):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        idle.append(a.elapsed_time(b))
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    queued = a.elapsed_time(b) / n
    hosts = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        hosts.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    print(f"{name:34s} idle {sorted(idle)[5]:7.3f} ms  queued {queued:7.3f} ms  "
          f"host {sorted(hosts)[5]:7.3f} ms", flush=True)
    if os.environ.get("PROFILE", "1") == "1":
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        st = pstats.Stats(pr)
        # PROFILE_SORT=cumulative shows which layer a call's host time sits under.
        st.sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(
            int(os.environ.get("PROFILE_TOP", "18")))


def main():
    dev = "cuda"
    T, H, D = 16384, 16, 64
    lens = lengths(T)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    Lmax = max(lens)
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = mk(T, H, D), mk(T, H, D), mk(T, H, D)
    Ld = sorted(lens)[len(lens) // 2]
    qd, kd, vd = mk(T // Ld, H, Ld, D), mk(T // Ld, H, Ld, D), mk(T // Ld, H, Ld, D)
    bm = attn.document_block_mask(cu)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    with torch.no_grad():
        for causal in (False, True):
            w = (-1, 0) if causal else (-1, -1)
            measure(f"varlen_attn causal={causal}",
                    lambda: attn.varlen_attn(q, k, v, cu, cu, Lmax, Lmax, window_size=w))
            measure(f"dense sdpa causal={causal}",
                    lambda: attn.scaled_dot_product_attention(qd, kd, vd, is_causal=causal))
        measure("flex_attention document mask", lambda: attn.flex_attention(q4, k4, v4,
                                                                           block_mask=bm))
    if os.environ.get("VARLEN_ONLY") != "1":
        blocks(q4, k4, v4, bm)


def blocks(q, k, v, bm):
    """Where a sparse forward's time goes: the document mask's own lists with the
    mask_mod replaced by noop_mask (partial blocks evaluate a trivial mod), with every
    listed block full (no per-element work), a sliding window and causal for scale, and
    the dense flex call. GPU time of back-to-back calls, per visited 128x128 block."""
    from attn._block_mask import BlockMask, noop_mask
    from attn import mods
    L = q.shape[2]
    print("tilings", gpu.tilings(q.shape[3], v.shape[3]))
    n_p, i_p = bm.kv_num_blocks, bm.kv_indices
    n_f, i_f = bm.full_kv_num_blocks, bm.full_kv_indices
    allnum = n_p + n_f
    rows = []
    for r in range(allnum.shape[-1]):
        a, c = int(n_f[0, 0, r]), int(n_p[0, 0, r])
        rows.append(torch.cat([i_f[0, 0, r, :a], i_p[0, 0, r, :c]]))
    W = i_p.shape[-1]  # one column per kv block, as a BlockMask's lists have
    allidx = torch.zeros(1, 1, len(rows), W, dtype=torch.int32, device=q.device)
    for r, x in enumerate(rows):
        allidx[0, 0, r, :x.numel()] = x
    zero = torch.zeros_like(allnum)
    cases = {
        "document (real mod)": bm,
        "same lists, noop mod": BlockMask.from_kv_blocks(n_p, i_p, n_f, i_f, BLOCK_SIZE=128,
                                                         mask_mod=noop_mask,
                                                         seq_lengths=(L, L)),
        "same blocks, all full": BlockMask.from_kv_blocks(zero, torch.zeros_like(allidx), allnum,
                                                          allidx, BLOCK_SIZE=128,
                                                          mask_mod=noop_mask,
                                                          seq_lengths=(L, L)),
        "sliding window 512": attn.create_block_mask(mods.sliding_window(512), None, None,
                                                     L, L, device=q.device),
        "causal": attn.create_block_mask(mods.causal_mask, None, None, L, L, device=q.device),
        "dense (no block mask)": None,
    }
    nb = -(-L // 128)
    with torch.no_grad():
        for name, m in cases.items():
            vis = 1.0 if m is None else float((m.kv_num_blocks + m.full_kv_num_blocks).sum()) / nb ** 2
            fn = lambda m=m: attn.flex_attention(q, k, v, block_mask=m)  # noqa: E731
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                fn()
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b) / 20
            per = ms * 1e3 / (vis * nb * nb * q.shape[1])
            print(f"{name:26s} visited {vis:.3f}  {ms:7.3f} ms  {per:6.3f} us per block-head "
                  f"(partial {int(0 if m is None else m.kv_num_blocks.sum())}, full "
                  f"{int(0 if m is None else m.full_kv_num_blocks.sum())})", flush=True)


if __name__ == "__main__":
    if os.environ.get("BLOCKS_ONLY") == "1":
        T, H, D = 16384, 16, 64
        lens = lengths(T)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                          device="cuda")
        q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
        blocks(q, torch.randn_like(q), torch.randn_like(q), attn.document_block_mask(cu))
    else:
        main()
