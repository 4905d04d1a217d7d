"""The float32 tensor-core backward (gpu/_mma_bwd.py, kind "f32": mma.sync m16n8k8 tf32
with the 3xTF32 split) in Numba's CUDA simulator (CI has no GPU).

Runs in a child process with NUMBA_ENABLE_CUDASIM=1 (tests/_sim.py says why) and
ATTN_GPU_TF32X3_BWD=1 (the default, set explicitly so an outer setting cannot turn it
off), and the test also checks that with the switch off the SIMT dK/dV kernel runs and
mma_bwd_reasons says why. float32 inputs with D, Dv multiples of
32 take the tensor-core dK/dV kernel (dQ by atomics), with gpu/_ptx.py's stand-ins:
``split`` rounds to tf32 on the bits as the GPU code does, and the stand-in of the three
products reads every operand register as the tensor core does (sign, exponent, 10
mantissa bits), so the float32-level accuracy of the split is checked, not assumed. The
simulator kernel has 2 warps (32-key kv blocks) and 16-query q blocks, so L in {17, 33}
gives several kv and q blocks, ragged edges, keys past Lk inside a warp's rows and the
q-block loop across the query heads of a GQA group.

Gradients against attn.reference's float64 ones with the tolerance relative to
PyTorch's own float32 error (tests/_util.py's rule; its float32 floor is 1e-5 of the
largest term): the permuted query order of the dV/dK A fragments, the permuted head dims
of the dO/Q/K B fragments and of the dK/dV/dQ outputs, the swizzled dS^T tile, dense and
causal block lists, GQA, Dv != D, a bool attn_mask with a fully masked row (zero dQ
there), a FlexAttention block mask with mask_mod and score_mod (partial blocks through
the shared copy of S^T/dP^T, full blocks on the register path). The inputs' out and lse
come from the float64 reference, so only the backward is under test. Last, one
correction term of the split is dropped from the stand-in and the same check must fail:
the test can tell 3xTF32 from a cheaper product.

Only the real GPU covers (bench/device/tf32_bwd_check.py): the inline PTX (mma.sync
m16n8k8 tf32, ldmatrix of 32-bit elements, ld.shared.v4.f32, cp.async), the hardware
register layout, bank conflicts, the 4-warp tiles, float32 atomics under contention,
speed.
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
    from attn.gpu import _mma_bwd, _kernels, _ptx
    from attn.reference import attention, flex_attention as ref_flex
    dt = torch.float32
    assert gpu.TF32X3_BACKWARD
    assert not gpu.mma_bwd_reasons(dt, 32, 64), gpu.mma_bwd_reasons(dt, 32, 64)
    assert gpu.mma_bwd_reasons(dt, 16, 32)  # D not a multiple of 32: SIMT
    assert gpu.mma_bwd_reasons(dt, 32, 32, atomic=False)  # deterministic mode: SIMT

    used = {"mma": 0, "simt": 0}
    def spy(f, key):
        def g(*a, **kw):
            used[key] += 1
            return f(*a, **kw)
        return g
    build = _mma_bwd.dkdv_kernel  # the cached factory
    _mma_bwd.dkdv_kernel = spy(build, "mma")
    _kernels.dkdv_kernel = spy(_kernels.dkdv_kernel, "simt")

    def grads_of(fn, ins, go):
        ins = [t.detach().requires_grad_() for t in ins]
        return torch.autograd.grad(fn(*ins)[0], ins, go)

    def check(name, grads, ref, tor, scale):
        for n, a, r, t in zip(("dq", "dk", "dv"), grads, ref, tor):
            assert a.dtype == dt, name
            assert_close_to_oracle(a, t, r, dt, f"{name} {n}", term_scale=scale)
        return max((a.double() - r).abs().max().item() for a, r in zip(grads, ref))

    def run(q, k, v, go, ref_fn, tor_fn, mask=None, causal=False, flex=None, kernel="mma"):
        # out and lse from the float64 reference: only the backward is under test.
        out, lse = (x.float() for x in ref_fn(q.double(), k.double(), v.double())[:2])
        before = dict(used)
        grads = gpu.backward(q, k, v, out, lse, go, None, mask, causal, None, flex=flex)
        other = "simt" if kernel == "mma" else "mma"
        assert used[kernel] == before[kernel] + 1 and used[other] == before[other], used
        ref = grads_of(ref_fn, [t.double() for t in (q, k, v)], go.double())
        tor = grads_of(tor_fn, [q, k, v], go)
        return grads, ref, tor

    def dense(B, Hq, Hkv, Lq, Lk, D, Dv, causal, mask_kind=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(B, Hq, Lq, D, generator=g)
        k = torch.randn(B, Hkv, Lk, D, generator=g)
        v = torch.randn(B, Hkv, Lk, Dv, generator=g)
        mask = make_mask(mask_kind, B, Lq, Lk, dt, g)  # "bool": query 2 sees no key
        go = torch.randn(B, Hq, Lq, Dv, generator=g)
        gqa = Hq != Hkv
        ref_fn = lambda a, b, c: attention(a, b, c, mask, causal, None, enable_gqa=gqa)
        if mask is None:
            tor_fn = lambda a, b, c: (F.scaled_dot_product_attention(
                a, b, c, is_causal=causal, enable_gqa=gqa),)
        else:  # PyTorch's math in float32 (the masked row gives 0, not NaN)
            tor_fn = ref_fn
        name = f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D}/{Dv} causal={causal} mask={mask_kind}"
        return name, (q, k, v, go, ref_fn, tor_fn, mask, causal), go.abs().max().item()

    t0 = time.time()
    worst = 0.0
    cases = [dense(1, 1, 1, 17, 17, 32, 32, False, seed=1),
             dense(1, 2, 1, 33, 33, 32, 32, True, seed=2),            # causal, GQA
             dense(1, 1, 1, 17, 33, 32, 64, False, "bool", seed=3)]   # Dv != D, masked row
    for name, args, sc in cases:
        grads, ref, tor = run(*args)
        if args[6] is not None:
            assert (grads[0][:, :, 2] == 0).all(), name  # the query that sees no key
        worst = max(worst, check(name, grads, ref, tor, sc))
        print(name, round(time.time() - t0), "s")

    # FlexAttention: a causal block mask (BLOCK_SIZE 32, the kernel's 16x32 tiles
    # divide it) with ALiBi, GQA 2/1.
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, H, 33, 32, generator=g) for H in (2, 1, 1))
    go = torch.randn(1, 2, 33, 32, generator=g)
    bm, spec = flex_spec(mods.causal_mask, mods.alibi(2), 1, 2, 33, 32)
    assert not gpu.mma_bwd_reasons(dt, 32, 32, None, bm.BLOCK_SIZE)
    fn = lambda a, b, c: ref_flex(a, b, c, mods.alibi(2), bm, None, True)
    grads, ref, tor = run(q, k, v, go, fn, fn, flex=spec)
    worst = max(worst, check("flex causal+alibi", grads, ref, tor, go.abs().max().item()))
    print("flex", round(time.time() - t0), "s")

    # The dK/dV flushes (bench/NOTES.md G13): with the child's ATTN_GPU_TF32_BWD_FLUSH=32
    # the simulator's 16-query blocks flush every 2 q blocks (the causal GQA case above: 6 q blocks in kv block 0, 2 in
    # kv block 1, which never flushes); here after every q block, non-causal GQA 2/1 at
    # L 33, so the kv block with 31 keys past Lk flushes too (its row tests).
    assert _mma_bwd.FLUSH_QUERIES == 32, _mma_bwd.FLUSH_QUERIES
    _mma_bwd.FLUSH_QUERIES = 16
    build.cache_clear()
    name, args, sc = dense(1, 2, 1, 33, 33, 32, 32, False, seed=5)
    grads, ref, tor = run(*args)
    worst = max(worst, check(name + " flush per q block", grads, ref, tor, sc))
    _mma_bwd.FLUSH_QUERIES = 32
    build.cache_clear()
    print("flush per q block", round(time.time() - t0), "s")

    # One correction term (Asmall * Bbig) dropped from the stand-in: the check must fail.
    name, args, sc = cases[0]
    f32 = _ptx.ops("f32")
    full = f32.mma3
    def two_terms(scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, bb0, bb1, bs0, bs1,
                  c0, c1, c2, c3):
        return full(scr, ab0, ab1, ab2, ab3, 0, 0, 0, 0, bb0, bb1, bs0, bs1,
                    c0, c1, c2, c3)
    f32.mma3 = two_terms
    build.cache_clear()
    grads, ref, tor = run(*args)
    f32.mma3 = full
    build.cache_clear()
    try:
        check(name + " (2 terms)", grads, ref, tor, sc)
    except AssertionError as e:
        print("dropped term caught:", str(e).splitlines()[0], round(time.time() - t0), "s")
    else:
        raise AssertionError("a 2-term product passed the 3xTF32 check: it cannot fail")

    # The switch off: the SIMT dK/dV kernel, with the reason stated.
    gpu.TF32X3_BACKWARD = False
    r = gpu.mma_bwd_reasons(dt, 32, 32)
    assert any("ATTN_GPU_TF32X3_BWD=0" in x for x in r), r
    grads, ref, tor = run(*cases[0][1], kernel="simt")
    print("OK tf32x3 backward; worst abs error", worst, "in", round(time.time() - t0), "s")
    """
)


def test_tf32x3_backward_in_cuda_simulator():
    # The switch on in the child (read when attn.gpu is imported); the other defaults:
    # the tensor-core backward on, dQ by atomics. Flushes every 32 queries, not the
    # GPU's default 128: at the simulator's tiny L only a short period makes the cases
    # above flush at all.
    print(run_script(_SCRIPT, timeout=900, unset=("ATTN_GPU_MMA_BWD", "ATTN_GPU_BWD"),
               env={"ATTN_GPU_TF32X3_BWD": "1", "ATTN_GPU_TF32_BWD_FLUSH": "32"}))
