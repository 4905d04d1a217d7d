"""The tensor-core backward (gpu/_mma_bwd.py) in Numba's CUDA simulator (CI has no GPU).

Runs in a child process with NUMBA_ENABLE_CUDASIM=1 (see tests/_sim.py for
why). float16 backward calls take the mma dK/dV kernel (dQ by atomics) there as on the
GPU, with gpu/_ptx.py's simulator stand-ins for the fragment operations; the test
checks that it is the kernel launched. The simulator kernel has 2 warps (32-key kv
blocks) and 16-query q blocks, so L in {1, 17, 33} gives several kv and q blocks,
ragged edges in both, keys past Lk inside a warp's rows, and the double-buffered
q-block loop across the query heads of a GQA group. Checked against attn.reference's
float64 gradients with the tolerance relative to PyTorch's own float16 error
(tests/_util.py's rule): dense and causal (diagonal blocks partial, the rest full),
Lq != Lk, Dv != D, GQA, transposed inputs (element-load staging), a gradient on lse, a bool
attn_mask with a fully masked row (no NaN, zero gradients there), FlexAttention block
masks with mask_mod on partial blocks and score_mod's chain rule.

Only the real GPU covers (bench/device/mma_bwd_check.py): the inline PTX and the
hardware register layout (ldmatrix.trans for the transposed A operand of dS), bfloat16,
the 4-warp tiles, cp.async racing against the double buffer, float32 atomics under
contention, speed.
"""
from __future__ import annotations

import textwrap

import pytest

from _sim import FLEX, run_script

pytest.importorskip("numba")

_SCRIPT = FLEX + textwrap.dedent(
    r"""
    import time
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    from _util import assert_close_to_oracle
    from attn.gpu import _mma_bwd, _kernels
    from attn.reference import attention, flex_attention as ref_flex
    assert gpu.MMA_BACKWARD
    dt = torch.float16
    assert not gpu.mma_bwd_reasons(dt, 16, 16), gpu.mma_bwd_reasons(dt, 16, 16)
    assert gpu.mma_bwd_reasons(torch.float32, 16, 16)
    assert gpu.mma_bwd_reasons(dt, 8, 8)
    assert gpu.mma_bwd_reasons(dt, 16, 16, atomic=False)  # deterministic mode: SIMT

    # Which dK/dV kernel runs: count the factories' calls.
    used = {"mma": 0, "simt": 0}
    def spy(f, key):
        def g(*a, **kw):
            used[key] += 1
            return f(*a, **kw)
        return g
    _mma_bwd.dkdv_kernel = spy(_mma_bwd.dkdv_kernel, "mma")
    _kernels.dkdv_kernel = spy(_kernels.dkdv_kernel, "simt")

    def grads_of(fn, ins, go, gl=None):
        ins = [t.detach().requires_grad_() for t in ins]
        outs = fn(*ins)
        if gl is None:
            return torch.autograd.grad(outs[0], ins, go)
        return torch.autograd.grad(outs, ins, (go, gl))

    def check(name, grads, ref, tor, scale):
        for n, a, r, t in zip(("dq", "dk", "dv"), grads, ref, tor):
            assert a.dtype == dt, name
            assert_close_to_oracle(a, t, r, dt, f"{name} {n}", term_scale=scale)
        return max((a.double() - r).abs().max().item() for a, r in zip(grads, ref))

    def case(B, Hq, Hkv, Lq, Lk, D, causal, transposed=False, mask_kind=None,
             lse_grad=False, Dv=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        def mk(H, L, W):
            if transposed:
                return torch.randn(B, L, H, W, generator=g).to(dt).transpose(1, 2)
            return torch.randn(B, H, L, W, generator=g).to(dt)
        q, k, v = mk(Hq, Lq, D), mk(Hkv, Lk, D), mk(Hkv, Lk, Dv or D)
        mask = make_mask(mask_kind, B, Lq, Lk, dt, g)  # "bool": query 2 sees no key
        out, lse = gpu.forward(q, k, v, mask, causal)
        go = torch.randn(out.shape, generator=g).to(dt)
        gqa = Hq != Hkv
        gl = None
        if lse_grad:
            gl = torch.randn(lse.shape, generator=g)
        before = dict(used)
        grads = gpu.backward(q, k, v, out, lse, go, gl, mask, causal)
        assert used["mma"] == before["mma"] + 1 and used["simt"] == before["simt"], used
        name = (f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D}/{Dv or D} causal={causal} "
                f"T={transposed} "
                f"mask={mask_kind} dlse={lse_grad}")
        ref_fn = lambda a, b, c: attention(a, b, c, mask, causal, None, enable_gqa=gqa)
        ref = grads_of(ref_fn, [t.double() for t in (q, k, v)], go.double(),
                       None if gl is None else gl.double())
        if gl is None and mask_kind is None:
            tor_fn = lambda a, b, c: (F.scaled_dot_product_attention(
                a, b, c, is_causal=causal, enable_gqa=gqa),)
        else:  # PyTorch's math in float16 (lse as an output, masked rows)
            tor_fn = lambda a, b, c: attention(a, b, c, mask, causal, None, enable_gqa=gqa)
        tor = grads_of(tor_fn, [q, k, v], go, gl)
        if mask_kind == "bool":
            assert (grads[0][:, :, 2] == 0).all(), name  # the query that sees no key
        return check(name, grads, ref, tor, go.abs().max().item())

    t0 = time.time()
    worst = 0.0
    worst = max(worst, case(1, 2, 2, 1, 1, 16, False, seed=1))
    worst = max(worst, case(1, 1, 1, 17, 17, 16, True, seed=2))
    worst = max(worst, case(1, 1, 1, 33, 33, 16, True, lse_grad=True, seed=3))
    worst = max(worst, case(1, 4, 2, 33, 17, 32, False, transposed=True, seed=4))
    worst = max(worst, case(1, 2, 1, 17, 33, 16, True, Dv=32, seed=5))  # Dv != D
    worst = max(worst, case(1, 1, 1, 17, 33, 16, False, mask_kind="bool", seed=6))

    # FlexAttention: per-(batch, head) transposed block lists at the kernel's 16x32
    # tiles (BLOCK_SIZE 32), full and partial blocks, mask_mod, score_mod, GQA.
    g, q, k, v = mma_flex_inputs(7)
    go = torch.randn(1, 2, MMA_FLEX_L, 16, generator=g).to(dt)
    for mask_mod, score_mod in MMA_FLEX_MODS:
        bm, spec = flex_spec(mask_mod, score_mod, 1, 2, MMA_FLEX_L, 32)
        assert not gpu.mma_bwd_reasons(dt, 16, 16, None, bm and bm.BLOCK_SIZE)
        out, lse = gpu.forward(q, k, v, None, False, None, flex=spec)
        before = dict(used)
        grads = gpu.backward(q, k, v, out, lse, go, None, None, False, None, flex=spec)
        assert used["mma"] == before["mma"] + 1 and used["simt"] == before["simt"], used
        fn = lambda a, b, c: ref_flex(a, b, c, score_mod, bm, None, True)
        ref = grads_of(fn, [t.double() for t in (q, k, v)], go.double())
        tor = grads_of(fn, [q, k, v], go)
        worst = max(worst, check(f"flex {mask_mod}", grads, ref, tor, go.abs().max().item()))

    # Jagged bands (gpu/_mma_bwd.py JAG): per-sequence kv tiles with column limits, for
    # varlen masks (empty sequences, Lq != Lk, windows with both edges, GQA) and a
    # library band mod at batch 2 (one sequence, the same band for every batch entry).
    gpu.JAGGED_BWD = True  # the default; ATTN_GPU_JAGGED_BWD=0 in the environment must not skip this
    calls = []
    items_fn = gpu.jagged_bwd_items
    gpu.jagged_bwd_items = lambda *a: calls.append(1) or items_fn(*a)
    cq = torch.tensor([0, 0, 1, 18, 51, 51, 84])
    ck = torch.tensor([0, 3, 3, 37, 60, 61, 100])
    g = torch.Generator().manual_seed(31)
    q = torch.randn(1, 2, 84, 16, generator=g).to(dt)
    k, v = (torch.randn(1, 1, 100, 16, generator=g).to(dt) for _ in range(2))
    go = torch.randn(1, 2, 84, 16, generator=g).to(dt)
    jag = [(attn.document_block_mask(cq, ck, window_size=w), q, k, v, go)
           for w in ((-1, -1), (-1, 0), (4, 0), (20, 3))]
    q2 = torch.randn(2, 2, MMA_FLEX_L, 16, generator=g).to(dt)
    k2, v2 = (torch.randn(2, 2, MMA_FLEX_L, 16, generator=g).to(dt) for _ in range(2))
    go2 = torch.randn(2, 2, MMA_FLEX_L, 16, generator=g).to(dt)
    jag.append((attn.create_block_mask(mods.sliding_window(5), None, None, MMA_FLEX_L,
                                       MMA_FLEX_L, device="cpu", BLOCK_SIZE=32),
                q2, k2, v2, go2))
    for bm, qq, kk, vv, gg in jag:
        assert bm._attn_jagged is not None
        spec = KernelSpec(None, bm, _modgen.trace_mask_mod(bm.mask_mod), None, False, None)
        out, lse = gpu.forward(qq, kk, vv, None, False, None, flex=spec)
        before = len(calls)
        grads = gpu.backward(qq, kk, vv, out, lse, gg, None, None, False, None, flex=spec)
        assert len(calls) == before + 1, "the jagged backward did not run"
        fn = lambda a, b, c: ref_flex(a, b, c, None, bm, None, True)
        ref = grads_of(fn, [t.double() for t in (qq, kk, vv)], gg.double())
        tor = grads_of(fn, [qq, kk, vv], gg)
        worst = max(worst, check(f"jagged {bm.mask_mod.__name__}", grads, ref, tor,
                                 gg.abs().max().item()))
    print("OK mma backward; worst abs error", worst, "in", round(time.time() - t0), "s")
    """
)


def test_mma_backward_in_cuda_simulator():
    # The defaults under test: the tensor-core backward on, dQ by atomics.
    run_script(_SCRIPT, timeout=900, unset=("ATTN_GPU_MMA_BWD", "ATTN_GPU_BWD"))


# The small tiles (gpu/_mma_bwd.py _SMALL_TILES) in a simulator of their own: 1 warp (16
# keys) x 16 queries against the default simulator tiles' 2 warps (32 keys) x 16. A block
# mask with BLOCK_SIZE 16, which the default tiles do not divide, takes them over its
# block lists (a document mask_mod); a library band mod at that BLOCK_SIZE takes the
# per-sequence kernel at the default tiles (it reads no block lists: the H200 caught a
# band run at the small tiles' item table with the default tiles' kernel); an attn_mask
# takes the small tiles whatever the BLOCK_SIZE.
_SMALL_SCRIPT = FLEX + textwrap.dedent(
    r"""
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    from _util import assert_close_to_oracle
    from attn.gpu import _mma_bwd
    from attn.reference import attention, flex_attention as ref_flex
    dt = torch.float16
    assert _mma_bwd.tile(16, 16, "f16") == (16, 32), _mma_bwd.tile(16, 16, "f16")
    assert _mma_bwd.tile(16, 16, "f16", True) == (16, 16)
    built = []
    make = _mma_bwd.dkdv_kernel
    _mma_bwd.dkdv_kernel = lambda *a: built.append(a) or make(*a)

    def grads_of(fn, ins, go):
        ins = [t.detach().requires_grad_() for t in ins]
        return torch.autograd.grad(fn(*ins)[0], ins, go)

    def check(name, grads, fn, ins, go):
        ref = grads_of(fn, [t.double() for t in ins], go.double())
        tor = grads_of(fn, ins, go)
        for n, a, r, t in zip(("dq", "dk", "dv"), grads, ref, tor):
            assert_close_to_oracle(a, t, r, dt, f"{name} {n}",
                                   term_scale=go.abs().max().item())

    g, q, k, v = mma_flex_inputs(41)
    go = torch.randn(1, 2, MMA_FLEX_L, 16, generator=g).to(dt)
    doc = mods.document_mask(torch.tensor([0, 10, 11, 40, 45]), length=MMA_FLEX_L)
    for mask_mod, small, jag in ((doc, True, False), (mods.causal_mask, False, True)):
        bm, spec = flex_spec(mask_mod, None, 1, 2, MMA_FLEX_L, 16)
        assert (getattr(bm, "_attn_jagged", None) is not None) == jag, mask_mod
        out, lse = gpu.forward(q, k, v, None, False, None, flex=spec)
        n = len(built)
        grads = gpu.backward(q, k, v, out, lse, go, None, None, False, None, flex=spec)
        assert len(built) == n + 1, built
        a = built[-1]
        assert bool(a[6] if len(a) > 6 else False) == jag, a
        assert bool(a[7] if len(a) > 7 else False) == small, a
        check(mask_mod.__name__, grads,
              lambda x, y, z: ref_flex(x, y, z, None, bm, None, True), [q, k, v], go)

    mask = make_mask("bool", 1, 33, 33, dt, g)
    q, k, v = (torch.randn(1, 1, 33, 16, generator=g).to(dt) for _ in range(3))
    go = torch.randn(1, 1, 33, 16, generator=g).to(dt)
    out, lse = gpu.forward(q, k, v, mask, False)
    grads = gpu.backward(q, k, v, out, lse, go, None, mask, False)
    assert built[-1][4], built[-1]  # the attn_mask variant (small tiles by MASK)
    check("bool mask", grads, lambda x, y, z: attention(x, y, z, mask, False, None),
          [q, k, v], go)
    print("OK small tiles")
    """
)


def test_mma_backward_small_tiles_in_cuda_simulator():
    run_script(_SMALL_SCRIPT, timeout=900, unset=("ATTN_GPU_MMA_BWD", "ATTN_GPU_BWD"),
               env={"ATTN_GPU_MMA_BWD_SMALL_CONFIG": "sim:1,16,0"})
