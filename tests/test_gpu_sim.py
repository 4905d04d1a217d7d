"""attn.gpu's kernels in Numba's CUDA simulator (CI has no GPU).

The simulator (NUMBA_ENABLE_CUDASIM=1) must be switched on before numba is imported,
and it changes numba.cuda for the whole process; so every check runs in a child
process with the variable set (tests/_sim.py), and the CPU tests in the same pytest
run are untouched.
The simulator runs each CUDA thread as a Python thread on host arrays, so shapes are
tiny: L in {1, 17, 33}, D in {8, 16}, causal and not, GQA, masks, transposed inputs;
forward (out, lse) and backward (dq, dk, dv, with a gradient on lse too) against
attn.reference in float64; the backward with dQ by atomics (default) and with the
deterministic separate dQ kernel.

Covered only on a real GPU (tests/test_gpu.py, marker ``gpu``): bfloat16 (its bit
conversion uses libdevice, which the simulator lacks), float16 arithmetic as the GPU
rounds it, launches on PyTorch's current (external) stream, the real block sizes
(the simulator uses 8x8 tiles; the GPU 64-row CTAs with 16-64 row tiles), head dims
above 16, long sequences, speed and determinism across runs.
"""
from __future__ import annotations

import textwrap

import pytest

from _sim import FLEX, run_script

pytest.importorskip("numba")

_SCRIPT = textwrap.dedent(
    r"""
    import itertools
    from attn.reference import attention

    def case(B, Hq, Hkv, Lq, Lk, D, Dv, causal, mask_kind, transposed, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        def mk(*s):
            return torch.randn(*s, generator=g).to(dtype)
        if transposed:
            q = mk(B, Lq, Hq, D).transpose(1, 2)
            k = mk(B, Lk, Hkv, D).transpose(1, 2)
            v = mk(B, Lk, Hkv, Dv).transpose(1, 2)
        else:
            q, k, v = mk(B, Hq, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, Dv)
        mask = make_mask(mask_kind, B, Lq, Lk, dtype, g)
        out, lse = gpu.forward(q, k, v, mask, causal)
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ro, rl = attention(qd, kd, vd, mask, causal, None, enable_gqa=Hq != Hkv)
        go = torch.randn(out.shape, generator=g).to(dtype)
        gl = torch.randn(lse.shape, generator=g)
        gl = torch.where(torch.isfinite(rl), gl, torch.zeros_like(gl))
        rg = torch.autograd.grad((ro, rl), (qd, kd, vd), (go.double(), gl.double()))
        grads = gpu.backward(q, k, v, out, lse, go, gl, mask, causal)
        tol = 2e-5 if dtype == torch.float32 else 4e-3
        name = f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D}/{Dv} causal={causal} mask={mask_kind} T={transposed} {dtype}"
        assert out.dtype == dtype and lse.dtype == torch.float32, name
        assert torch.equal(torch.isfinite(lse), torch.isfinite(rl)), name
        fin = torch.isfinite(rl)
        errs = {"out": (out.double() - ro).abs().max().item(),
                "lse": (lse[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0}
        for n, a, b in zip(("dq", "dk", "dv"), grads, rg):
            assert a.dtype == dtype, name
            errs[n] = (a.double() - b).abs().max().item()
        for n, e in errs.items():
            assert e == e and e <= tol * 10, f"{name}: {n} err {e}"
        return errs

    cases = []
    for (Lq, Lk), D, causal in itertools.product([(1, 1), (17, 17), (33, 17), (17, 33)],
                                                  [8, 16], [False, True]):
        cases.append((1, 2, 2, Lq, Lk, D, D, causal, None, False, torch.float32, len(cases)))
    cases += [
        (2, 4, 2, 17, 17, 8, 8, True, None, False, torch.float32, 100),   # GQA
        (1, 4, 1, 17, 33, 8, 16, False, None, False, torch.float32, 101),  # MQA, Dv != D
        (1, 2, 2, 17, 33, 8, 8, False, "bool", False, torch.float32, 102),
        (2, 2, 1, 17, 17, 16, 16, True, "additive", True, torch.float32, 103),
        (1, 2, 2, 33, 33, 16, 16, True, None, True, torch.float16, 104),
    ]
    worst = {}
    for c in cases:  # dQ by atomics from the dK/dV kernel (the default)
        for n, e in case(*c).items():
            worst[n] = max(worst.get(n, 0.0), e)
    # The deterministic schedule (separate dQ kernel), as under
    # torch.use_deterministic_algorithms(True).
    os.environ["ATTN_GPU_BWD"] = "split"
    for c in cases[5:8] + cases[-5:]:
        for n, e in case(*c).items():
            worst[n] = max(worst.get(n, 0.0), e)
    print("OK", len(cases) + 8, "cases; worst abs errors:", worst)
    """
)


def test_gpu_kernels_in_cuda_simulator():
    run_script(_SCRIPT, timeout=600)


_FLEX_SCRIPT = FLEX + textwrap.dedent(
    r"""
    from attn.reference import flex_attention as ref_flex

    def case(name, B, Hq, Hkv, L, D, score_mod, mask_mod, block, seed):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(B, Hq, L, D, generator=g)
        k = torch.randn(B, Hkv, L, D, generator=g)
        v = torch.randn(B, Hkv, L, D, generator=g)
        bm, spec = flex_spec(mask_mod, score_mod, B, Hq, L, block)
        reasons = gpu.flex_reasons(bm, spec.mask_mod, spec.score_mod,
                                   gpu.tilings(D, D))
        assert not reasons, reasons
        out, lse = gpu.forward(q, k, v, None, False, None, flex=spec)
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ro, rl, _ = ref_flex(qd, kd, vd, score_mod, bm, None, Hq != Hkv)
        go = torch.randn(out.shape, generator=g)
        rg = torch.autograd.grad(ro, (qd, kd, vd), go.double())
        grads = gpu.backward(q, k, v, out, lse, go, None, None, False, None, flex=spec)
        assert torch.equal(torch.isfinite(lse), torch.isfinite(rl)), name
        fin = torch.isfinite(rl)
        errs = {"out": (out.double() - ro).abs().max().item(),
                "lse": (lse[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0}
        for n, a, b in zip(("dq", "dk", "dv"), grads, rg):
            errs[n] = (a.double() - b).abs().max().item()
        for n, e in errs.items():
            assert e == e and e <= 2e-4, f"{name}: {n} err {e}"
        return errs

    doc = torch.tensor([0, 5, 5, 14, 25])
    bias = torch.randn(2, 2 * 25 - 1, generator=torch.Generator().manual_seed(1))
    cases = [
        ("causal blocks 8", 1, 2, 2, 25, 8, None, mods.causal_mask, 8),
        ("window+alibi, GQA, per-head mask", 1, 2, 1, 25, 8, mods.alibi(2),
         lambda b, h, q, kv: (q - kv <= 6 + 3 * h) & (q >= kv), 16),
        ("document+softcap", 2, 2, 2, 25, 8, mods.tanh_softcap(2.0),
         mods.document_mask(doc), 8),
        ("relative bias, dense", 1, 2, 2, 25, 8, mods.relative_position_bias(bias), None, 8),
    ]
    worst = {}
    for c in cases:
        for n, e in case(*c, seed=len(worst)).items():
            worst[n] = max(worst.get(n, 0.0), e)
    print("OK", len(cases), "flex cases; worst abs errors:", worst)
    """
)


def test_gpu_flex_kernels_in_cuda_simulator():
    """Block masks (per batch and head, kv blocks split into kernel tiles), mask_mod on
    partial blocks, score_mod and its derivative as device functions, GQA."""
    run_script(_FLEX_SCRIPT, timeout=900)
