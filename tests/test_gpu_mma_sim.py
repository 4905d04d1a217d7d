"""The tensor-core forward (gpu/_mma.py) in Numba's CUDA simulator (CI has no GPU).

Runs in a child process with NUMBA_ENABLE_CUDASIM=1 (see tests/_sim.py for
why). float16 inputs take the mma kernel there as on the GPU, with the simulator-safe
stand-ins of gpu/_ptx.py for the fragment operations (fragment loads gather each lane's
own elements, mma and the row reductions go through shared scratch with barriers). The
simulator kernel uses 2 warps (32-row q blocks) and 16-key kv blocks, so L in {1, 17,
33} gives several q and kv blocks, ragged edges in both, and the second warp's row
offsets. Checked against attn.reference in float64: the tiling and the kv-block lists
(dense, causal with diagonal blocks, Lq != Lk), the online softmax in the log2 domain,
GQA, both staging paths (16-byte copies for contiguous head dims; element loads for a
strided head dim or a misaligned view), attn_mask and FlexAttention block masks with
mask_mod/score_mod (the mods path), fully masked rows (out 0, lse -inf), Dv != D.

Only the real GPU covers (bench/device/mma_check.py, tests/test_gpu.py): the inline PTX
itself (mma.sync, ldmatrix(.trans), cp.async and its wait groups, shfl.sync, ex2,
cvt.rn.bf16x2/f16x2) and the register layout the hardware uses, bfloat16, the
64x64 tiles with 4 warps, double buffering racing against real asynchronous copies,
shared memory above 48 KiB, speed.
"""
from __future__ import annotations

import textwrap

import pytest

from _sim import FLEX, run_script

pytest.importorskip("numba")

_SCRIPT = FLEX + textwrap.dedent(
    r"""
    from attn.reference import attention, flex_attention as ref_flex
    dt = torch.float16
    assert not gpu.mma_reasons(dt, 16, 16), gpu.mma_reasons(dt, 16, 16)
    # float32 at Dv = 16 stays on the SIMT kernel (the 3xTF32 kind needs Dv % 32 == 0;
    # tests/test_gpu_mma_tf32_sim.py)
    assert gpu.mma_reasons(torch.float32, 16, 16)
    assert gpu.mma_reasons(dt, 8, 8)               # head dim not a multiple of 16

    def mk(g, B, H, L, W, layout):
        if layout == "blhd":
            return torch.randn(B, L, H, W, generator=g).to(dt).transpose(1, 2)
        if layout == "dmajor":
            return torch.randn(B, H, W, L, generator=g).to(dt).transpose(2, 3)
        if layout == "offset":
            return torch.randn(B * H * L * W + 1, generator=g).to(dt)[1:].view(B, H, L, W)
        return torch.randn(B, H, L, W, generator=g).to(dt)

    def check(name, out, lse, ro, rl):
        return check_forward(name, out, lse, ro, rl, dt)

    def case(B, Hq, Hkv, Lq, Lk, D, Dv, causal, layout=None, mask_kind=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        q = mk(g, B, Hq, Lq, D, layout)
        k = mk(g, B, Hkv, Lk, D, layout)
        v = mk(g, B, Hkv, Lk, Dv, layout)
        mask = make_mask(mask_kind, B, Lq, Lk, dt, g)
        out, lse = gpu.forward(q, k, v, mask, causal)
        ro, rl = attention(q.double(), k.double(), v.double(), mask, causal, None,
                           enable_gqa=Hq != Hkv)
        return check(f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D}/{Dv} causal={causal} "
                     f"{layout} {mask_kind}", out, lse, ro, rl)

    worst = 0.0
    for (Lq, Lk), causal in [((1, 1), False), ((17, 17), True), ((33, 17), True),
                             ((17, 33), False), ((33, 33), True)]:
        worst = max(worst, case(1, 2, 2, Lq, Lk, 16, 16, causal, seed=Lq * Lk))
    worst = max(worst, case(1, 1, 1, 33, 33, 32, 32, False, "blhd", seed=1))
    worst = max(worst, case(2, 2, 1, 17, 33, 16, 16, True, "dmajor", seed=2))  # GQA
    worst = max(worst, case(1, 2, 2, 33, 17, 16, 16, False, "offset", seed=3))
    worst = max(worst, case(1, 2, 1, 17, 33, 16, 32, False, None, "bool", 4))  # Dv != D
    worst = max(worst, case(1, 1, 1, 33, 17, 16, 16, True, None, "additive", 5))

    # FlexAttention through the same kernel: block lists per (batch, head), mask_mod on
    # partial blocks, score_mod, GQA. BLOCK_SIZE 32 is a multiple of the 32x16 tiles.
    g, q, k, v = mma_flex_inputs(6)
    for mask_mod, score_mod in MMA_FLEX_MODS:
        bm, spec = flex_spec(mask_mod, score_mod, 1, 2, MMA_FLEX_L, 32)
        assert not gpu.mma_reasons(dt, 16, 16, None, bm and bm.BLOCK_SIZE)
        out, lse = gpu.forward(q, k, v, None, False, None, flex=spec)
        ro, rl, _ = ref_flex(q.double(), k.double(), v.double(), score_mod, bm, None, True)
        worst = max(worst, check(f"flex {mask_mod} {score_mod}", out, lse, ro, rl))
    print("OK mma forward; worst abs error", worst)
    """
)


def test_mma_forward_in_cuda_simulator():
    run_script(_SCRIPT, timeout=900)


# mask_mod alone on partial blocks takes the bit-set register path (forward_kernel's
# MASKREG), written out per row slot for one or two m16 tiles per warp: the simulator's
# default tiles have one, so this runs a two-tile configuration (2 warps x 2 tiles =
# 64-row q blocks, 16-key kv blocks; BLOCK_SIZE (64, 32)) against the float64 reference.
# (ATTN_GPU_MASK_REGS=0 sends these blocks through the shared-memory copy of S; the
# score_mod cases above run in registers too, forward_kernel's SCOREREG.)
_MASK_BITS = FLEX + textwrap.dedent(
    r"""
    from attn.reference import flex_attention as ref_flex
    from attn.gpu import _mma
    dt = torch.float16
    assert _mma.config(16, 16, "f16").MT == 2, _mma.config(16, 16, "f16")
    L = 71
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, H, L, 16, generator=g).to(dt) for H in (2, 1, 1))
    docs = mods.document_mask(torch.tensor([0, 5, 40, 41, 66, 71]))
    worst = 0.0
    for mask_mod in (mods.sliding_window(7), docs, mods.sliding_window(20, causal=False)):
        bm = attn.create_block_mask(mask_mod, 1, 2, L, L, device="cpu", BLOCK_SIZE=(64, 32))
        spec = KernelSpec(None, bm, _modgen.trace_mask_mod(bm.mask_mod), None, False, None)
        out, lse = gpu.forward(q, k, v, None, False, None, flex=spec)
        ro, rl, _ = ref_flex(q.double(), k.double(), v.double(), None, bm, None, True)
        fin = torch.isfinite(rl)
        assert torch.equal(torch.isfinite(lse), fin) and (out[~fin] == 0).all(), mask_mod
        e = (out.double() - ro).abs().max().item()
        el = (lse[fin].double() - rl[fin]).abs().max().item()
        assert e <= 4e-3 and el <= 1e-4, f"{mask_mod}: out err {e}, lse err {el}"
        worst = max(worst, e)
    print("OK mask bits; MASK_REGS", _mma.MASK_REGS, "worst abs error", worst)
    """
)


def test_mma_forward_mask_bits_two_tiles_in_simulator(monkeypatch):
    monkeypatch.setenv("ATTN_GPU_MMA_CONFIG", "sim:2,2,16,1")
    monkeypatch.delenv("ATTN_GPU_MASK_REGS", raising=False)
    out = run_script(_MASK_BITS, timeout=900)
    assert "MASK_REGS True" in out


# Packed jagged batches (attn.document_block_mask / varlen_attn masks carry a
# JaggedBand): the forward schedules q tiles per sequence (gpu/_mma.py JAG, item table
# gpu.jagged_items) instead of walking the block lists. Simulator tiles are 32 queries x
# 16 keys, so the lengths give empty sequences, a one-token one, ragged tiles in both
# dims, Lq != Lk per sequence (bottom-right causal diagonals, rows that see no key),
# GQA 2/1; non-causal, causal, right and left windows (column limits on both sides).
_JAGGED = FLEX + textwrap.dedent(
    r"""
    from attn.reference import flex_attention as ref_flex
    dt = torch.float16
    cq = torch.tensor([0, 0, 1, 18, 51, 51, 84])
    ck = torch.tensor([0, 3, 3, 37, 60, 61, 100])
    g = torch.Generator().manual_seed(21)
    q = torch.randn(1, 2, int(cq[-1]), 16, generator=g).to(dt)
    k, v = (torch.randn(1, 1, int(ck[-1]), 16, generator=g).to(dt) for _ in range(2))
    worst = 0.0
    for window, kv in (((-1, -1), ck), ((-1, 0), ck), ((-1, 0), None), ((-1, 5), ck),
                       ((4, 0), ck), ((20, 3), None)):
        kk, vv = (k, v) if kv is not None else (k[:, :, :84], v[:, :, :84])
        bm = attn.document_block_mask(cq, kv, window_size=window)
        spec = KernelSpec(None, bm, _modgen.trace_mask_mod(bm.mask_mod), None, False,
                          None)
        why = gpu.jagged_reasons(dt, 16, 16, spec)
        assert not why, (window, why)
        out, lse = gpu.forward(q, kk, vv, None, False, None, flex=spec)
        ro, rl, _ = ref_flex(q.double(), kk.double(), vv.double(), None, bm, None, True)
        name = f"window {window} {'own keys' if kv is not None else 'self'}"
        worst = max(worst, check_forward(name, out, lse, ro, rl, dt))
    # Packed (tokens, heads, D) storage viewed as (1, H, tokens, D), as varlen_attn
    # passes it: out comes back in the packed layout (a view for varlen_attn, no copy),
    # written through its strides.
    qp = q[0].transpose(0, 1).contiguous().transpose(0, 1).unsqueeze(0)
    kp, vp = (t[0].transpose(0, 1).contiguous().transpose(0, 1).unsqueeze(0)
              for t in (kk, vv))
    out_p, lse_p = gpu.forward(qp, kp, vp, None, False, None, flex=spec)
    assert out_p.stride(1) < out_p.stride(2), out_p.stride()
    assert torch.equal(out_p, out) and torch.equal(lse_p, lse), "packed layout"
    items = gpu.jagged_items(bm._attn_jagged, 32, 16, "cpu")
    print("OK jagged forward, worst abs error", worst, "items", items.shape[0])
    """
)


def test_mma_forward_jagged_in_simulator():
    run_script(_JAGGED, timeout=900)


# FlexAttention's max_scores from the tensor-core forward (gpu/_mma.py MAXS, the second
# plane of the lse buffer), switched on for the test whatever the environment says
# (gpu.MAX_SCORES, on by default): the library cases (a causal mask with ALiBi, a padded
# document mask, a soft-cap score_mod on every block), a block mask that leaves a query
# row no key (max_scores -inf there), and a jagged band (the per-sequence kernel, rows
# that see no key). Against attn.reference's max_scores; out and lse unchanged by the request.
_MAX_SCORES = FLEX + textwrap.dedent(
    r"""
    from attn.reference import flex_attention as ref_flex
    assert gpu.MAX_SCORES
    dt = torch.float16
    g, q, k, v = mma_flex_inputs(51)
    # (name, mask_mod, score_mod, inputs): the library cases, and a mask under which
    # rows 0..9 of head 0 see no key (a partial block, per element)
    late = lambda b, h, q_idx, kv_idx: (q_idx >= 10) | (h > 0)
    cases = [(f"case {i}", mm, sm, (q, k, v)) for i, (mm, sm) in enumerate(MMA_FLEX_MODS)]
    cases.append(("no key for some rows", late, None, (q, k, v)))
    specs = [flex_spec(mm, sm, 1, 2, MMA_FLEX_L, 32) for _, mm, sm, _ in cases]
    # a jagged band: the per-sequence kernel (bottom-right causal, rows without keys)
    cq = torch.tensor([0, 0, 1, 18, 51, 51, 84])
    ck = torch.tensor([0, 3, 3, 37, 60, 61, 100])
    bm = attn.document_block_mask(cq, ck, window_size=(-1, 0))
    qj = torch.randn(1, 2, 84, 16, generator=g).to(dt)
    kj, vj = (torch.randn(1, 1, 100, 16, generator=g).to(dt) for _ in range(2))
    cases.append(("jagged", None, None, (qj, kj, vj)))
    specs.append((bm, KernelSpec(None, bm, _modgen.trace_mask_mod(bm.mask_mod), None,
                                 False, None)))
    assert not gpu.jagged_reasons(dt, 16, 16, specs[-1][1])
    empty = 0
    for (name, _, sm, (a, b, c)), (bm, spec) in zip(cases, specs):
        out0, lse0 = gpu.forward(a, b, c, None, False, None, flex=spec)
        out, lse, mx = gpu.forward(a, b, c, None, False, None,
                                   flex=spec._replace(max_scores=True))
        assert torch.equal(out, out0) and torch.equal(lse, lse0), name
        _, _, rm = ref_flex(a.double(), b.double(), c.double(), sm, bm, None, True)
        assert mx.shape == rm.shape and mx.dtype == torch.float32, name
        fin = torch.isfinite(rm)
        assert torch.equal(torch.isfinite(mx), fin), name
        assert (mx[~fin] == float("-inf")).all(), name
        e = (mx[fin].double() - rm[fin]).abs().max().item()
        assert e <= 5e-3 * max(1.0, rm[fin].abs().max().item()), f"{name}: {e}"
        empty += int((~fin).sum())
        print(name, "max_scores err", e, "rows without keys", int((~fin).sum()))
    assert empty >= 8 + 10 + 22, empty  # rows without keys: document, mask, jagged
    print("OK max_scores")
    """
)


def test_mma_forward_max_scores_in_simulator():
    run_script(_MAX_SCORES, timeout=900, env={"ATTN_GPU_MAX_SCORES": "1"})


# The forward's small tiles (gpu/_mma.py _SMALL_TILES) in a simulator of their own: 1 warp
# x 16 queries against the default simulator tiles' 2 warps (32 queries), 16 keys each.
# A block mask with BLOCK_SIZE 16, which the default tiles do not divide, takes them over
# its block lists (a padded document mask_mod); a library band mod at that BLOCK_SIZE
# takes the per-sequence kernel at the default tiles (it reads no block lists, and its
# item table is laid out at those tiles), one with a left window edge at the small
# tiles whatever the BLOCK_SIZE; an attn_mask takes the small tiles whatever the
# BLOCK_SIZE. out and lse against attn.reference.
_SMALL = FLEX + textwrap.dedent(
    r"""
    from attn.reference import attention, flex_attention as ref_flex
    from attn.gpu import _mma
    dt = torch.float16
    assert _mma.tile(16, 16, "f16") == (32, 16), _mma.tile(16, 16, "f16")
    assert _mma.tile(16, 16, "f16", True) == (16, 16)
    built = []
    make = _mma.forward_kernel
    _mma.forward_kernel = lambda *a: built.append(a) or make(*a)

    def small_of(a):
        return bool(a[8] if len(a) > 8 else False) or bool(a[4])

    g, q, k, v = mma_flex_inputs(43)
    doc = mods.document_mask(torch.tensor([0, 10, 11, 40, 45]), length=MMA_FLEX_L)
    # (mask_mod, small tiles, the jagged kernel's JAG): a left window edge (JAG 2) takes
    # the small tiles (its two-tile D 128 variant spilled)
    for mask_mod, small, jag in ((doc, True, 0), (mods.causal_mask, False, 1),
                                 (mods.sliding_window(8), True, 2)):
        bm, spec = flex_spec(mask_mod, None, 1, 2, MMA_FLEX_L, 16)
        assert (getattr(bm, "_attn_jagged", None) is not None) == bool(jag), mask_mod
        n = len(built)
        out, lse = gpu.forward(q, k, v, None, False, None, flex=spec)
        assert len(built) == n + 1, built
        a = built[-1]
        assert (a[6] if len(a) > 6 else 0) == jag, a
        assert small_of(a) == small, a
        ro, rl, _ = ref_flex(q.double(), k.double(), v.double(), None, bm, None, True)
        check_forward(mask_mod.__name__, out, lse, ro, rl, dt)

    mask = make_mask("bool", 1, 33, 33, dt, g)
    q, k, v = (torch.randn(1, 1, 33, 16, generator=g).to(dt) for _ in range(3))
    out, lse = gpu.forward(q, k, v, mask, False)
    assert built[-1][4] and small_of(built[-1]), built[-1]
    ro, rl = attention(q.double(), k.double(), v.double(), mask, False, None)
    check_forward("bool mask", out, lse, ro, rl, dt)
    print("OK forward small tiles")
    """
)


def test_mma_forward_small_tiles_in_simulator():
    run_script(_SMALL, timeout=900, env={"ATTN_GPU_MMA_SMALL_CONFIG": "sim:1,1,16,1"})


# Lazy rescaling (gpu/_mma.py LAZY_RESCALE, off by default until measured on a GPU):
# keys whose norms grow along the sequence move each row's maximum by far more than the
# threshold several times, so the reference maximum moves, stays and moves again;
# causal, GQA, a negative and a zero scale (which keep the multiply), block masks with
# and without score_mod (scores scaled before the exponent), and max_scores (the true
# row maxima beside the reference). Against attn.reference.
_LAZY = FLEX + textwrap.dedent(
    r"""
    from attn.reference import attention, flex_attention as ref_flex
    from attn.gpu import _mma
    assert _mma.LAZY_RESCALE
    dt = torch.float16

    def check(name, out, lse, ro, rl):
        # (the growing keys give lse values far above 1: the lse bound is relative)
        print(name, "out err", check_forward(name, out, lse, ro, rl, dt, lse_relative=True))

    g = torch.Generator().manual_seed(31)
    L = 97
    grow = (1 + torch.arange(L) / 6.0).view(1, 1, L, 1)
    q = torch.randn(1, 2, L, 16, generator=g).to(dt)
    k = (torch.randn(1, 1, L, 16, generator=g) * grow).to(dt)
    v = torch.randn(1, 1, L, 16, generator=g).to(dt)
    s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    # the row maxima climb by many times the threshold (8 in log2 units) across blocks
    assert (s.amax(-1) - s[..., :16].amax(-1)).max().item() * 1.4427 > 3 * 8
    for causal in (False, True):
        for scale in (None, -0.3, 0.0):
            out, lse = gpu.forward(q, k, v, None, causal, scale)
            ro, rl = attention(q.double(), k.double(), v.double(), None, causal, scale,
                               enable_gqa=True)
            check(f"causal={causal} scale={scale}", out, lse, ro, rl)
    g, q2, k2, v2 = mma_flex_inputs(32)
    for mask_mod, score_mod in MMA_FLEX_MODS:
        bm, spec = flex_spec(mask_mod, score_mod, 1, 2, MMA_FLEX_L, 32)
        out, lse = gpu.forward(q2, k2, v2, None, False, None, flex=spec)
        ro, rl, _ = ref_flex(q2.double(), k2.double(), v2.double(), score_mod, bm, None,
                             True)
        check(f"flex {mask_mod} {score_mod}", out, lse, ro, rl)
    bm, spec = flex_spec(mods.causal_mask, None, 1, 2, L, 32)
    out0, lse0 = gpu.forward(q, k, v, None, False, None, flex=spec)
    out, lse, mx = gpu.forward(q, k, v, None, False, None,
                               flex=spec._replace(max_scores=True))
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    _, _, rm = ref_flex(q.double(), k.double(), v.double(), None, bm, None, True)
    e = (mx.double() - rm).abs().max().item()
    assert e <= 5e-3 * rm.abs().max().item(), e
    print("OK lazy rescale; max_scores err", e)
    """
)


def test_mma_forward_lazy_rescale_in_simulator():
    run_script(_LAZY, timeout=900, env={"ATTN_GPU_LAZY_RESCALE": "1"})


# Three K/V stages (gpu/_mma.py FWD_STAGES, off by default until measured on a GPU): the
# forward cases and the jagged ones again with ATTN_GPU_FWD_STAGES=3 (the simulator's
# tiles fit three stages; the prefetch two blocks ahead into the previous block's
# buffer, the jagged items' key tiles by offset).
@pytest.mark.parametrize("script", ["forward", "jagged"])
def test_mma_forward_three_stages_in_simulator(script):
    body = {"forward": _SCRIPT, "jagged": _JAGGED}[script]
    check = "\nfrom attn.gpu import _mma\nassert _mma.stages(16, 16, False, 'f16') == 3\n"
    run_script(check + body, timeout=900, env={"ATTN_GPU_FWD_STAGES": "3"})
