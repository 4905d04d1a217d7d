"""attn.flex_attention on the CPU kernels: block masks, mask_mod and score_mod, forward
and backward.

Oracle: attn.reference.flex_attention in float64 on the same inputs, itself checked
against PyTorch's own flex_attention (eager) in float64. Tolerance relative to
PyTorch's error: PyTorch's flex_attention in the input dtype is the baseline
(DESIGN.md's rule, tests/_util.assert_close_to_oracle)."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import flex_attention as tfa

import attn
from attn import mods
from attn.reference import flex_attention as ref_flex

from _util import assert_close_to_oracle

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda H, L: torch.randn(B, H, L, D, generator=g).to(dtype)  # noqa: E731
    return mk(Hq, Lq), mk(Hkv, Lk), mk(Hkv, Lk)


def _leaf(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _torch_flex(q, k, v, score_mod, bm, gqa, go):
    """PyTorch's eager flex_attention for out and lse. It has no backward on CPU, so the
    gradient baseline is PyTorch autograd through the dense reference computed in the
    input dtype (PyTorch's own ops, the same rounding a PyTorch user would get)."""
    tbm = None
    if bm is not None:
        tbm = tfa.BlockMask.from_kv_blocks(
            bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
            BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)
    out, aux = tfa.flex_attention(q, k, v, score_mod=score_mod, block_mask=tbm,
                                  enable_gqa=gqa, return_aux=tfa.AuxRequest(lse=True))
    q, k, v = _leaf(q, k, v)
    o, _, _ = ref_flex(q, k, v, score_mod, bm, None, gqa)
    grads = torch.autograd.grad(o, (q, k, v), go)
    return out, aux.lse, grads


def _check(q, k, v, score_mod=None, bm=None, gqa=False, backward=True, torch_baseline=True):
    dtype = q.dtype
    go = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3],
                     generator=torch.Generator().manual_seed(7)).to(dtype)
    # Oracle: float64 on the same (rounded) inputs.
    q64, k64, v64 = _leaf(*(t.double() for t in (q, k, v)))
    o64, l64, _ = ref_flex(q64, k64, v64, score_mod, bm, None, gqa)
    g64 = torch.autograd.grad(o64, (q64, k64, v64), go.double())
    # Ours.
    qa, ka, va = _leaf(q, k, v)
    out, aux = attn.flex_attention(qa, ka, va, score_mod=score_mod, block_mask=bm,
                                   enable_gqa=gqa, return_aux=attn.AuxRequest(lse=True))
    tout = tlse = tg = None
    if torch_baseline and dtype != torch.float64:
        tout, tlse, tg = _torch_flex(q, k, v, score_mod, bm, gqa, go)
    assert_close_to_oracle(out, tout, o64, dtype, "out")
    assert_close_to_oracle(aux.lse, tlse, l64, torch.float32 if dtype != torch.float64
                           else dtype, "lse")
    if backward:
        grads = torch.autograd.grad(out, (qa, ka, va), go)
        for i, name in enumerate(("dq", "dk", "dv")):
            assert grads[i].dtype == dtype
            assert_close_to_oracle(grads[i], tg[i] if tg else None, g64[i], dtype, name,
                                   term_scale=g64[i].abs().max().item())
    return out, aux


# --------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("case", ["dense", "causal", "alibi_window", "softcap_doc"])
def test_reference_matches_torch_flex(case):
    B, H, L, D = 2, 3, 150, 16
    q, k, v = _inputs(B, H, H, L, L, D, torch.float64)
    sm, mm = None, None
    if case == "causal":
        mm = mods.causal_mask
    elif case == "alibi_window":
        sm, mm = mods.alibi(H), mods.sliding_window(40)
    elif case == "softcap_doc":
        sm, mm = mods.tanh_softcap(3.0), mods.document_mask(torch.tensor([0, 50, 51, 150]))
    bm = attn.create_block_mask(mm, B, H, L, L, device="cpu", BLOCK_SIZE=64) if mm else None
    tbm = tfa.create_block_mask(mm, B, H, L, L, device="cpu", BLOCK_SIZE=64) if mm else None
    o, lse, _ = ref_flex(q, k, v, sm, bm)
    to, aux = tfa.flex_attention(q, k, v, score_mod=sm, block_mask=tbm,
                                 return_aux=tfa.AuxRequest(lse=True))
    torch.testing.assert_close(o, to, atol=1e-12, rtol=1e-10)
    fin = torch.isfinite(aux.lse)
    assert torch.equal(fin, torch.isfinite(lse))
    torch.testing.assert_close(lse[fin], aux.lse[fin], atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------- kernels vs oracle

LIB = {
    "causal": (None, lambda L: mods.causal_mask),
    "causal_lower_right": (None, lambda L: mods.causal_lower_right(L, L)),
    "sliding_window": (None, lambda L: mods.sliding_window(37)),
    "bidirectional_window": (None, lambda L: mods.sliding_window(50, causal=False)),
    "prefix_lm": (None, lambda L: mods.prefix_lm(30)),
    "document": (None, lambda L: mods.document_mask(torch.tensor([0, 1, 40, 40, 130, L]))),
    "alibi": (lambda H, L: mods.alibi(H), None),
    "softcap_causal": (lambda H, L: mods.tanh_softcap(2.5), lambda L: mods.causal_mask),
    "relative_bias": (lambda H, L: mods.relative_position_bias(
        torch.randn(H, 2 * L - 1, generator=torch.Generator().manual_seed(3))), None),
}


@pytest.mark.parametrize("name", list(LIB))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_library_mods(name, dtype):
    B, H, L, D = 2, 2, 197, 32
    smf, mmf = LIB[name]
    sm = smf(H, L) if smf else None
    bm = attn.create_block_mask(mmf(L), None, None, L, L, device="cpu") if mmf else None
    q, k, v = _inputs(B, H, H, L, L, D, dtype)
    _check(q, k, v, sm, bm)


@pytest.mark.parametrize("block", [(128, 128), (64, 64), (32, 128), (256, 64)])
def test_block_sizes_and_gqa(block):
    B, Hq, Hkv, L, D = 1, 4, 2, 300, 24
    bm = attn.create_block_mask(mods.sliding_window(70), B, Hq, L, L, device="cpu",
                                BLOCK_SIZE=block)
    q, k, v = _inputs(B, Hq, Hkv, L, L, D, torch.float32)
    _check(q, k, v, mods.tanh_softcap(4.0), bm, gqa=True)


def test_bf16():
    B, H, L, D = 1, 2, 200, 64
    bm = attn.create_block_mask(mods.causal_mask, None, None, L, L, device="cpu")
    q, k, v = _inputs(B, H, H, L, L, D, torch.bfloat16)
    _check(q, k, v, mods.alibi(H), bm)


def test_random_block_masks_and_empty_rows():
    """Random block lists (partial and full, with rows that list nothing) plus a random
    element mask on the partial blocks."""
    g = torch.Generator().manual_seed(5)
    B, H, Lq, Lk, D = 2, 2, 257, 190, 16
    QB, KB = 64, 32
    nq, nk = -(-Lq // QB), -(-Lk // KB)
    cls = torch.randint(0, 3, (B, H, nq, nk), generator=g)  # 0 empty, 1 partial, 2 full
    cls[0, 0, 1] = 0                       # a q block that sees nothing
    cls[1, 1] = 2                          # a head with every block full
    dense = torch.rand(B, H, Lq, Lk, generator=g) < 0.6
    dense[0, 1, 5] = False                 # one row fully masked inside partial blocks

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx, kv_idx]

    def lists(sel):
        num = sel.sum(-1).to(torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    pn, pi = lists(cls == 1)
    fn, fi = lists(cls == 2)
    bm = attn.BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=(QB, KB),
                                       mask_mod=mask_mod, seq_lengths=(Lq, Lk))
    q, k, v = _inputs(B, H, H, Lq, Lk, D, torch.float32)
    out, aux = _check(q, k, v, None, bm, torch_baseline=False)
    assert (out[0, 0, QB:2 * QB] == 0).all()
    assert torch.isneginf(aux.lse[0, 0, QB:2 * QB]).all()


def test_user_mods_random_compositions():
    """User-written mods the compiler has to translate (arithmetic, where, abs,
    remainder, exp, captured tensors) with their derivative."""
    H, L = 2, 150
    w = torch.rand(H, generator=torch.Generator().manual_seed(2)) + 0.5

    def score_mod(score, b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx).abs()
        s = torch.where(d % 3 == 0, score * w[h], score - 0.01 * d)
        return s + 0.1 * torch.exp(-score * score)

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx + kv_idx + h) % 5 != 0) | (q_idx == kv_idx)

    bm = attn.create_block_mask(mask_mod, 1, H, L, L, device="cpu", BLOCK_SIZE=64)
    q, k, v = _inputs(1, H, H, L, L, 16, torch.float32)
    _check(q, k, v, score_mod, bm)


def test_max_scores_and_deprecated_return_lse():
    H, L = 2, 100
    q, k, v = _inputs(1, H, H, L, L, 16, torch.float64)
    bm = attn.create_block_mask(mods.causal_mask, None, None, L, L, device="cpu")
    sm = mods.tanh_softcap(2.0)
    out, aux = attn.flex_attention(q, k, v, sm, bm,
                                   return_aux=attn.AuxRequest(lse=True, max_scores=True))
    o, lse, mx = ref_flex(q, k, v, sm, bm)
    torch.testing.assert_close(aux.max_scores, mx)
    torch.testing.assert_close(aux.lse, lse)
    with pytest.warns(FutureWarning):
        o2, lse2 = attn.flex_attention(q, k, v, sm, bm, return_lse=True)
    torch.testing.assert_close(lse2, lse)
    with pytest.raises(ValueError, match="return_lse and return_aux"):
        attn.flex_attention(q, k, v, return_lse=True, return_aux=attn.AuxRequest(lse=True))


def test_bias_requiring_grad():
    """A bias tensor that requires grad: the kernels refuse it with a clear error; the
    reference backend differentiates through it."""
    H, L = 2, 40
    bias = torch.randn(H, 2 * L - 1, requires_grad=True)
    sm = mods.relative_position_bias(bias)
    q, k, v = _inputs(1, H, H, L, L, 8, torch.float64)
    with pytest.raises(attn.BackendNotSupportedError, match="requires grad"):
        attn.flex_attention(q, k, v, sm)
    with attn.use_backend("reference"):
        out = attn.flex_attention(q, k, v, sm)
    (gb,) = torch.autograd.grad(out.sum(), bias)
    assert gb.abs().sum() > 0
    with torch.no_grad():
        attn.flex_attention(q, k, v, sm)  # no gradient wanted: the kernels serve it


def test_errors():
    q, k, v = _inputs(1, 4, 4, 128, 128, 16, torch.float32)
    bm = attn.create_block_mask(mods.causal_mask, None, None, 256, 256, device="cpu")
    with pytest.raises(ValueError, match="block_mask was created for"):
        attn.flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(NotImplementedError, match="4D"):
        attn.flex_attention(q[0], k[0], v[0])
    q6 = torch.randn(1, 6, 128, 16)
    k4 = torch.randn(1, 4, 128, 16)
    with pytest.raises(ValueError, match="multiple"):
        attn.flex_attention(q6, k4, k4, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        attn.flex_attention(q6, k4, k4)
    with pytest.raises(TypeError, match="5 positional"):
        attn.flex_attention(q, k, v, score_mod=lambda s, b, h, i: s)

    def sorts(score, b, h, q_idx, kv_idx):
        return torch.sort(score).values

    with pytest.raises(attn.BackendNotSupportedError, match="sort"):
        attn.flex_attention(q, k, v, score_mod=sorts)


def test_device_mismatch_error():
    """q/k/v and the block mask on different devices (a meta-device copy stands in for
    a CUDA mask on this CPU-only machine)."""
    q = torch.randn(1, 2, 128, 16)
    bm = attn.create_block_mask(mods.causal_mask, None, None, 128, 128, device="cpu")
    bm.kv_num_blocks = bm.kv_num_blocks.to("meta")
    with pytest.raises(RuntimeError, match="same device"):
        attn.flex_attention(q, q, q, block_mask=bm)


@pytest.mark.parametrize("make", [
    lambda Lq, Lk: mods.causal_mask,
    lambda Lq, Lk: mods.causal_lower_right(Lq, Lk),
    lambda Lq, Lk: mods.sliding_window(45),
    lambda Lq, Lk: mods.sliding_window(0),
    lambda Lq, Lk: mods.sliding_window(60, causal=False),
], ids=["causal", "lower_right", "window45", "window0", "bidirectional60"])
@pytest.mark.parametrize("lens", [(200, 200), (90, 230), (230, 90)], ids=str)
def test_band_mods_run_as_bands(make, lens, request):
    """The library band mods give create_block_mask a JaggedBand (the kernels then run
    the mask by column limits, no mod evaluated): same result as the oracle, forward
    and backward, at every alignment (Lq != Lk, rows that see no key); the mask's
    ``to()`` keeps the band, a composed mask has none (block lists)."""
    Lq, Lk = lens
    mm = make(Lq, Lk)
    bm = attn.create_block_mask(mm, None, None, Lq, Lk, device="cpu", BLOCK_SIZE=64)
    assert bm._attn_jagged is not None and bm.to("cpu")._attn_jagged is bm._attn_jagged
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 16, torch.float32, seed=5)
    # Window 0: one key per row, so dq is 0 exactly in the oracle and in PyTorch's
    # autograd (P = 1), and float32 rounding of delta = rowsum(dO * O) is all that is
    # left: forward only (the gradients of the band path are checked by the others).
    out, aux = _check(q, k, v, None, bm, gqa=True,
                      backward="window0" not in request.node.callspec.id)
    lists = attn.create_block_mask(mm, None, None, Lq, Lk, device="cpu", BLOCK_SIZE=64)
    del lists._attn_jagged
    o2, a2 = attn.flex_attention(q, k, v, block_mask=lists, enable_gqa=True,
                                 return_aux=attn.AuxRequest(lse=True))
    torch.testing.assert_close(out.detach(), o2, atol=2e-6, rtol=2e-6)
    assert torch.equal(torch.isfinite(aux.lse), torch.isfinite(a2.lse))
    both = attn.and_masks(mm, attn.noop_mask)
    assert getattr(attn.create_block_mask(both, None, None, Lq, Lk, device="cpu"),
                   "_attn_jagged", None) is None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_document_mask_band(causal):
    """A document mask whose documents tile the sequence (empty ones included) runs as
    a band, same result as the oracle and the block lists; with padding around the
    documents, or at other lengths, it keeps the lists (rows outside every document
    must still get out 0 and lse -inf)."""
    L = 230
    offs = torch.tensor([0, 0, 1, 70, 70, 199, L])
    mm = mods.document_mask(offs, causal=causal)
    bm = attn.create_block_mask(mm, None, None, L, L, device="cpu", BLOCK_SIZE=64)
    assert bm._attn_jagged is not None
    q, k, v = _inputs(2, 2, 2, L, L, 16, torch.float32, seed=9)
    out, _ = _check(q, k, v, None, bm)
    del bm._attn_jagged
    torch.testing.assert_close(out.detach(), attn.flex_attention(q, k, v, block_mask=bm),
                               atol=2e-6, rtol=2e-6)
    padded = mods.document_mask(torch.tensor([10, 70, 200]), causal=causal, length=L)
    bp = attn.create_block_mask(padded, None, None, L, L, device="cpu", BLOCK_SIZE=64)
    assert getattr(bp, "_attn_jagged", None) is None
    _check(q, k, v, None, bp)
    short = attn.create_block_mask(mm, None, None, 200, 200, device="cpu", BLOCK_SIZE=64)
    assert getattr(short, "_attn_jagged", None) is None
