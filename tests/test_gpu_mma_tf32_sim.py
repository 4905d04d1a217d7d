"""The float32 tensor-core forward (gpu/_mma.py, kind "f32": mma.sync m16n8k8 tf32 with the
3xTF32 split) in Numba's CUDA simulator (CI has no GPU).

Runs in a child process with NUMBA_ENABLE_CUDASIM=1 (tests/_sim.py says why). float32
inputs with Dv a multiple of 32 take the tensor-core kernel there as on the GPU, with the
simulator-safe stand-ins of gpu/_ptx.py: fragment loads gather each lane's own elements,
``split`` rounds to tf32 on the bits as the GPU code does, and the stand-in of the three
products reads every operand register as the tensor core does (sign, exponent, 10
mantissa bits), so the float32-level accuracy of the split is checked here, not assumed.
The simulator kernel uses 2 warps (32-row q blocks) and 16-key kv blocks (two 8-key
steps of P.V), so L in {1, 17, 33} gives several q and kv blocks and ragged edges.

Checked against attn.reference in float64 with the GPU tests' rule, |ours - oracle| <=
2 |torch float32 - oracle| + 2e-5 max(1, |oracle|): the permuted P.V operands (keys 2t,
2t+1 per step; head dims 32J + 4n + q per n-tile) and the output columns that follow
them, the online softmax, dense and causal block lists, Lq != Lk, GQA, Dv != D, the
16-byte copy path and the element-load path (strided head dim), a bool mask with a fully
masked row (out 0, lse -inf), a FlexAttention block mask with mask_mod and score_mod. The
bound is below 1e-4 in every case, far under a single-TF32 product's error (~1e-3), so a
lost correction term fails the test.

Only the real GPU covers (bench/device/tf32_check.py): the inline PTX (mma.sync
m16n8k8 tf32, ldmatrix of 32-bit elements, ld.shared.v4.f32, cp.async), the hardware
register layout, the 4-warp tiles, speed.
"""
from __future__ import annotations

import textwrap

import pytest

from _sim import FLEX, run_script

pytest.importorskip("numba")

_SCRIPT = FLEX + textwrap.dedent(
    r"""
    import torch.nn.functional as F
    from attn.reference import attention, flex_attention as ref_flex
    dt = torch.float32
    assert gpu.TF32X3
    assert not gpu.mma_reasons(dt, 16, 32), gpu.mma_reasons(dt, 16, 32)
    assert gpu.mma_reasons(dt, 16, 16)  # Dv not a multiple of 32: the SIMT kernel
    assert gpu.mma_reasons(dt, 12, 32)  # D not a multiple of 8

    def mk(g, B, H, L, W, layout):
        if layout == "dmajor":
            return torch.randn(B, H, W, L, generator=g).transpose(2, 3)
        if layout == "blhd":
            return torch.randn(B, L, H, W, generator=g).transpose(1, 2)
        return torch.randn(B, H, L, W, generator=g)

    def check(name, out, lse, ro, rl, ot):
        fin = torch.isfinite(rl)
        assert out.dtype == dt and lse.dtype == torch.float32, name
        assert not torch.isnan(out).any(), name
        assert torch.equal(torch.isfinite(lse), fin), name
        assert (out[~fin] == 0).all(), name
        rows = fin[..., None].expand_as(ro)
        e = (out.double() - ro).abs().max().item()
        et = (ot.double() - ro)[rows].abs().max().item() if rows.any() else 0.0
        bound = 2 * et + 2e-5 * max(1.0, ro.abs().max().item())
        assert bound < 1e-4, f"{name}: bound {bound} too loose to catch a TF32 error"
        el = (lse[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0
        assert e <= bound and el <= 1e-5, f"{name}: out err {e} (bound {bound}), lse {el}"
        return e

    def case(B, Hq, Hkv, Lq, Lk, D, Dv, causal, layout=None, mask_kind=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        q = mk(g, B, Hq, Lq, D, layout)
        k = mk(g, B, Hkv, Lk, D, layout)
        v = mk(g, B, Hkv, Lk, Dv, layout)
        mask = make_mask(mask_kind, B, Lq, Lk, dt, g)
        out, lse = gpu.forward(q, k, v, mask, causal)
        ro, rl = attention(q.double(), k.double(), v.double(), mask, causal, None,
                           enable_gqa=Hq != Hkv)
        ot = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                            enable_gqa=Hq != Hkv)
        return check(f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D}/{Dv} causal={causal} "
                     f"{layout} {mask_kind}", out, lse, ro, rl, ot)

    worst = 0.0
    worst = max(worst, case(1, 1, 1, 1, 1, 16, 32, False, seed=1))
    worst = max(worst, case(1, 2, 2, 33, 17, 16, 32, True, "blhd", seed=2))
    worst = max(worst, case(2, 2, 1, 17, 33, 8, 32, False, "dmajor", seed=3))   # GQA
    worst = max(worst, case(1, 1, 1, 33, 33, 32, 32, True, seed=4))
    worst = max(worst, case(1, 2, 1, 17, 17, 16, 64, False, None, "bool", 5))  # Dv != D

    # FlexAttention through the same kernel: a causal block mask with ALiBi, GQA 2/1.
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, H, 33, W, generator=g) for H, W in ((2, 16), (1, 16), (1, 32)))
    mask_mod, score_mod = mods.causal_mask, mods.alibi(2)
    bm, spec = flex_spec(mask_mod, score_mod, 1, 2, 33, 32)
    assert not gpu.mma_reasons(dt, 16, 32, None, bm.BLOCK_SIZE)
    out, lse = gpu.forward(q, k, v, None, False, None, flex=spec)
    ro, rl, _ = ref_flex(q.double(), k.double(), v.double(), score_mod, bm, None, True)
    ot, _ = ref_flex(q, k, v, score_mod, bm, None, True)[:2]
    worst = max(worst, check("flex causal+alibi", out, lse, ro, rl, ot))
    print("OK tf32x3 forward; worst abs error", worst)
    """
)


def test_tf32x3_forward_in_cuda_simulator():
    run_script(_SCRIPT, timeout=600, unset=("ATTN_GPU_TF32X3",))
