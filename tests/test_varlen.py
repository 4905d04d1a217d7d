"""Jagged batches: attn._varlen.varlen_attn, document_block_mask, nested_sdpa.

Oracle: every sequence run on its own through attn.reference.attention in float64, with
an explicit bool mask built here from the bottom-right window rule (FlashAttention's:
query i of a sequence with Lq queries and Lk keys sees key j when
i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right). PyTorch's error baseline
(tests/_util.assert_close_to_oracle): F.scaled_dot_product_attention per sequence in the
input dtype with the same mask. The block lists are checked against create_block_mask of
a dense mask built here (attn's and torch's own, which shares no code with attn).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attn
from attn._varlen import document_block_mask, jagged_mask_mod, nested_sdpa, varlen_attn
from attn.reference import attention as ref_attention

from _util import assert_close_to_oracle

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Mixed lengths, zero included: 1025 crosses eight 128-blocks, 17/97 share blocks with
# their neighbours, the zero-length sequences sit at the start, inside and at the end.
LENS = [0, 1, 17, 97, 1025, 0, 3, 40, 0]
# Cross attention: other key lengths (a sequence with 0 keys and 1 query, one with 5
# keys and 0 queries, Lk > Lq and Lk < Lq).
KLENS = [5, 0, 30, 97, 1000, 0, 8, 129, 2]


def _cu(lens, dtype=torch.int32):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=dtype)


def _seq_mask(Lq, Lk, window, used=None, top_left=False):
    """Explicit bool (Lq, Lk) mask of one sequence."""
    left, right = window
    Lu = Lk if used is None else used
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    diag = i if top_left else i + (Lu - Lq)
    m = j < Lu
    if right >= 0:
        m = m & (j <= diag + right)
    if left >= 0:
        m = m & (j >= diag - left)
    return m


def _dense_truth(qlens, klens, window, used=None, top_left=False):
    Tq, Tk = sum(qlens), sum(klens)
    dense = torch.zeros(Tq, Tk, dtype=torch.bool)
    qo = ko = 0
    for d, (lq, lk) in enumerate(zip(qlens, klens)):
        u = None if used is None else used[d]
        dense[qo:qo + lq, ko:ko + lk] = _seq_mask(lq, lk, window, u, top_left)
        qo, ko = qo + lq, ko + lk
    return dense


def _per_sequence(fn, q, k, v, qlens, klens, window, used=None, top_left=False, gqa=False,
                  scale=None):
    """out (Tq, Hq, Dv), lse (Hq, Tq) from ``fn(q, k, v, mask)`` run per sequence on
    (1, H, L, D) slices."""
    outs, lses = [], []
    qo = ko = 0
    for d, (lq, lk) in enumerate(zip(qlens, klens)):
        u = None if used is None else used[d]
        m = _seq_mask(lq, lk, window, u, top_left).to(q.device)
        sl = lambda t, o, n: t[o:o + n].transpose(0, 1).unsqueeze(0)  # noqa: E731
        o, l = fn(sl(q, qo, lq), sl(k, ko, lk), sl(v, ko, lk), m, gqa, scale)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
        qo, ko = qo + lq, ko + lk
    return torch.cat(outs), torch.cat(lses, dim=1)


def _oracle_fn(q, k, v, m, gqa, scale):
    return ref_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=gqa)


def _torch_fn(q, k, v, m, gqa, scale):
    """PyTorch in the input dtype: SDPA and the logsumexp of its masked scores."""
    Lq, Lk = q.shape[2], k.shape[2]
    if Lk == 0:
        out = q.new_zeros(*q.shape[:3], v.shape[3]) + 0 * q.sum()
        return out, torch.full(q.shape[:3], float("-inf"), device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=gqa)
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1) if gqa else k
    sc = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    s = (q @ kk.transpose(-2, -1)) * sc
    lse = torch.logsumexp(s.masked_fill(~m, float("-inf")), -1).float()
    return out, lse


def _inputs(Tq, Tk, Hq, Hkv, D, Dv, dtype, layout="contiguous", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def mk(T, H, E):
        if layout == "contiguous":
            t = torch.randn(T, H, E, generator=g)
        elif layout == "heads_major":  # (H, T, E) storage viewed as (T, H, E)
            t = torch.randn(H, T, E, generator=g).transpose(0, 1)
        elif layout == "slice":  # tokens 3.. of a bigger tensor, every other head dim
            t = torch.randn(T + 5, H, 2 * E, generator=g)[3:3 + T, :, ::2]
        return t.to(device=device, dtype=dtype).detach().requires_grad_()

    return mk(Tq, Hq, D), mk(Tk, Hkv, D), mk(Tk, Hkv, Dv)


def _grads(out, lse, leaves, go, gl):
    fin = torch.isfinite(lse.detach())
    loss = (out.to(go.dtype) * go).sum() + (torch.where(fin, lse, 0) * gl.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _check(qlens, klens, window=(-1, -1), Hq=2, Hkv=2, D=32, Dv=None, dtype=torch.float32,
           layout="contiguous", backward=True, scale=None, int64=False, seed=0, device="cpu",
           torch_varlen=False):
    Dv = Dv or D
    gqa = Hq != Hkv
    Tq, Tk = sum(qlens), sum(klens)
    q, k, v = _inputs(Tq, Tk, Hq, Hkv, D, Dv, dtype, layout, seed, device)
    cdt = torch.int64 if int64 else torch.int32
    cu_q, cu_k = _cu(qlens, cdt).to(device), _cu(klens, cdt).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(Tq, Hq, Dv, generator=g).to(device=device, dtype=dtype)
    gl = torch.randn(Hq, Tq, generator=g).to(device)

    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max(qlens), max(klens),
                           return_aux=attn.AuxRequest(lse=True), window_size=window,
                           enable_gqa=gqa, scale=scale)
    assert out.shape == (Tq, Hq, Dv) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (Hq, Tq) and lse.dtype == torch.float32

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = _per_sequence(_oracle_fn, q64, k64, v64, qlens, klens, window, gqa=gqa,
                             scale=scale)
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if torch_varlen:
        # PyTorch's own varlen_attn (FlashAttention on CUDA) as the baseline.
        import inspect

        from torch.nn.attention.varlen import AuxRequest as TorchAux
        from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn

        params = inspect.signature(torch_varlen_attn).parameters
        torch_varlen = "window_size" in params and "enable_gqa" in params
    if torch_varlen:
        ot, lt = torch_varlen_attn(qt, kt, vt, cu_q, cu_k, max(qlens), max(klens),
                                   return_aux=TorchAux(lse=True), window_size=window,
                                   enable_gqa=gqa, scale=scale)
    else:
        ot, lt = _per_sequence(_torch_fn, qt, kt, vt, qlens, klens, window, gqa=gqa,
                               scale=scale)
    assert_close_to_oracle(out, ot, o64, dtype, "out")
    assert_close_to_oracle(lse, lt, l64, torch.float32, "lse")
    if not backward:
        return
    ours = _grads(out, lse, (q, k, v), go, gl)
    ref = _grads(o64, l64, (q64, k64, v64), go.double(), gl.double())
    tor = _grads(ot, lt, (qt, kt, vt), go, gl)
    for name, a, t, r in zip(("dq", "dk", "dv"), ours, tor, ref):
        assert a.shape == r.shape and a.dtype == dtype
        assert_close_to_oracle(a, t, r, dtype, name, term_scale=r.abs().max().item())


# --------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (16, 0), (0, 0), (5, 3), (40, -1)],
                         ids=lambda w: f"w{w[0]}_{w[1]}")
def test_self_attention_float32(window):
    _check(LENS, LENS, window)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (100, 0), (3, 20)],
                         ids=lambda w: f"w{w[0]}_{w[1]}")
def test_cross_lengths(window):
    # cu_seq_q != cu_seq_k: bottom-right alignment differs per sequence.
    _check(LENS, KLENS, window, int64=True)


@pytest.mark.parametrize("window", [(-1, 0), (33, 0)], ids=lambda w: f"w{w[0]}_{w[1]}")
def test_bfloat16(window):
    _check(LENS, KLENS, window, dtype=torch.bfloat16)


def test_gqa_and_value_dim():
    _check(LENS, KLENS, (-1, 0), Hq=4, Hkv=2, D=24, Dv=40, scale=0.3)


def test_mqa_windowed():
    _check([3, 200, 0, 77], [3, 200, 5, 77], (20, 4), Hq=3, Hkv=1)


@pytest.mark.parametrize("layout", ["heads_major", "slice"])
def test_non_contiguous_packed_views(layout):
    _check(LENS, KLENS, (-1, 0), layout=layout)


def test_single_sequence_equals_sdpa():
    # One sequence, causal (-1, 0) with Lq == Lk: plain causal SDPA.
    L = 300
    q, k, v = _inputs(L, L, 2, 2, 16, 16, torch.float64)
    out = varlen_attn(q, k, v, _cu([L]), _cu([L]), L, L, window_size=(-1, 0))
    want = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)),
                                          is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, want)


def test_no_keys_anywhere():
    q, k, v = _inputs(5, 0, 2, 2, 8, 8, torch.float32)
    out, lse = varlen_attn(q, k, v, _cu([2, 3]), _cu([0, 0]), 3, 0,
                           return_aux=attn.AuxRequest(lse=True))
    assert out.shape == (5, 2, 8) and bool((out == 0).all())
    assert bool(torch.isneginf(lse).all())
    out.sum().backward()
    assert q.grad is not None and bool((q.grad == 0).all())


def test_return_aux_like_torch():
    from torch.nn.attention.varlen import AuxRequest as TorchAux

    q, k, v = _inputs(20, 20, 2, 2, 8, 8, torch.float32)
    cu = _cu([7, 13])
    with torch.no_grad():
        a = varlen_attn(q, k, v, cu, cu, 13, 13)
        b, lse = varlen_attn(q, k, v, cu, cu, 13, 13, return_aux=TorchAux(lse=True))
        c = varlen_attn(q, k, v, cu, cu, 13, 13, return_aux=TorchAux(lse=False))
    assert isinstance(a, torch.Tensor) and isinstance(c, torch.Tensor)
    assert torch.equal(a, b) and lse.shape == (2, 20)


# --------------------------------------------------------------- seqused_k


def test_seqused_k_forward():
    qlens, klens = [4, 1, 30, 0, 150], [10, 6, 30, 3, 200]
    used = [7, 0, 12, 3, 200]
    q, k, v = _inputs(sum(qlens), sum(klens), 2, 2, 16, 16, torch.float32)
    with torch.no_grad():
        for window in [(-1, -1), (-1, 0), (5, 0)]:
            out, lse = varlen_attn(q, k, v, _cu(qlens), _cu(klens), 150, 200, window_size=window,
                                   seqused_k=torch.tensor(used, dtype=torch.int32),
                                   return_aux=attn.AuxRequest(lse=True))
            o64, l64 = _per_sequence(_oracle_fn, q.double(), k.double(), v.double(), qlens,
                                     klens, window, used=used)
            ot, lt = _per_sequence(_torch_fn, q, k, v, qlens, klens, window, used=used)
            assert_close_to_oracle(out, ot, o64, torch.float32, f"out {window}")
            assert_close_to_oracle(lse, lt, l64, torch.float32, f"lse {window}")


def test_seqused_k_is_inference_only():
    q, k, v = _inputs(10, 10, 1, 1, 8, 8, torch.float32)
    cu = _cu([4, 6])
    with pytest.raises(RuntimeError, match="seqused_k is an inference-only parameter"):
        varlen_attn(q, k, v, cu, cu, 6, 6, seqused_k=torch.tensor([2, 6]))
    with torch.no_grad():
        varlen_attn(q, k, v, cu, cu, 6, 6, seqused_k=torch.tensor([2, 6]))
    varlen_attn(q.detach(), k.detach(), v.detach(), cu, cu, 6, 6,
                seqused_k=torch.tensor([2, 6]))


# --------------------------------------------------------------- block lists


def _block_picture(bm):
    """Dense (nQB, nKB) int: 2 full, 1 partial, 0 absent."""
    n = bm.kv_indices.shape[-1]

    def dense(num, idx):
        d = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool)
        listed = torch.arange(n) < num.unsqueeze(-1)
        d.scatter_(-1, torch.where(listed, idx.long(), n), True)
        return d[..., :n]

    pic = dense(bm.kv_num_blocks, bm.kv_indices).int()
    if bm.full_kv_num_blocks is not None:
        pic = pic + 2 * dense(bm.full_kv_num_blocks, bm.full_kv_indices).int()
    return pic.reshape(pic.shape[-2:])


_NMAX = 1300  # one padded buffer shape for every case: one compile of the dense mod


def _dense_mod(dense):
    buf = torch.zeros(_NMAX, _NMAX, dtype=torch.bool)
    buf[: dense.shape[0], : dense.shape[1]] = dense

    def dense_mask(b, h, q_idx, kv_idx):
        return buf[q_idx, kv_idx]

    return dense_mask


BLOCK_CASES = [
    # (qlens, klens, window, BLOCK_SIZE, used)
    (LENS, LENS, (-1, -1), 128, None),
    (LENS, LENS, (-1, 0), 128, None),
    (LENS, KLENS, (16, 0), 128, None),
    (LENS, KLENS, (-1, 0), (64, 32), None),
    ([1] * 40 + [0, 300, 0] + [2] * 30, [3] * 40 + [1, 250, 4] + [2] * 30, (-1, -1), 16, None),
    ([1] * 40 + [0, 300, 0] + [2] * 30, [3] * 40 + [1, 250, 4] + [2] * 30, (2, 1), (16, 8),
     None),
    ([64, 64, 128, 256], [64, 64, 128, 256], (-1, 0), 64, None),  # block-aligned: full tiles
    ([64, 64, 128, 256], [64, 64, 128, 256], (63, 0), 32, None),
    ([10, 300, 5, 200], [40, 300, 9, 210], (7, -1), (32, 64), [40, 123, 0, 210]),
    ([10, 300, 5, 200], [40, 300, 9, 210], (-1, 0), 32, [1, 300, 9, 100]),
    # Found by a random search: a tile seen only through a sequence strictly inside both
    # blocks (neither end sequence sees into it).
    ([1, 5, 2, 1, 0, 3, 1, 5, 5, 3, 2, 1], [3, 0, 4, 3, 7, 4, 1, 0, 2, 4, 1, 7], (0, 1),
     (8, 16), None),
]


@pytest.mark.parametrize("case", range(len(BLOCK_CASES)))
def test_document_block_mask_equals_create_block_mask(case):
    qlens, klens, window, bs, used = BLOCK_CASES[case]
    Tq, Tk = sum(qlens), sum(klens)
    dense = _dense_truth(qlens, klens, window, used)
    u = None if used is None else torch.tensor(used)
    bm = document_block_mask(_cu(qlens), _cu(klens), window, BLOCK_SIZE=bs, seqused_k=u)
    want = attn.create_block_mask(_dense_mod(dense), None, None, Tq, Tk, device="cpu",
                                  BLOCK_SIZE=bs)
    assert bm.seq_lengths == (Tq, Tk)
    assert torch.equal(_block_picture(bm), _block_picture(want))
    # The q-side (transposed) lists the backward walks agree too.
    assert torch.equal(bm.full_q_num_blocks, want.full_q_num_blocks)
    assert torch.equal(bm.q_num_blocks, want.q_num_blocks)
    # The element mask_mod is the truth (evaluated by torch).
    got = attn.create_mask(bm.mask_mod, 1, 1, Tq, Tk, device="cpu")[0, 0]
    assert torch.equal(got, dense)


def _truth_classes(dense, BQ, BK):
    """(full, any) per block of the dense mask, padding counted as False (torch's rule)."""
    Tq, Tk = dense.shape
    nq, nk = -(-Tq // BQ), -(-Tk // BK)
    p = torch.zeros(nq * BQ, nk * BK, dtype=torch.bool)
    p[:Tq, :Tk] = dense
    p = p.view(nq, BQ, nk, BK)
    return p.all(3).all(1), p.any(3).any(1)


def test_document_block_mask_random_layouts():
    # Many short sequences in small blocks: several sequences per tile, both ends of a
    # tile's sequence range partial, windows on either side, seqused_k.
    g = torch.Generator().manual_seed(0)
    pick = lambda opts: opts[int(torch.randint(len(opts), (1,), generator=g))]  # noqa: E731
    n = 0
    while n < 250:
        B = int(torch.randint(1, 25, (1,), generator=g))
        ql = [pick([0, 1, 1, 2, 3, 5]) for _ in range(B)]
        kl = [pick([0, 1, 2, 3, 4, 7]) for _ in range(B)]
        if sum(ql) == 0 or sum(kl) == 0:
            continue
        n += 1
        window = (pick([-1, 0, 1, 2]), pick([-1, 0, 1]))
        used = [int(torch.randint(k + 1, (1,), generator=g)) for k in kl] if n % 3 == 0 else None
        BQ, BK = pick([1, 2, 4, 8]), pick([2, 4, 8, 16])
        bm = document_block_mask(_cu(ql), _cu(kl), window, BLOCK_SIZE=(BQ, BK),
                                 seqused_k=None if used is None else torch.tensor(used))
        full, any_ = _truth_classes(_dense_truth(ql, kl, window, used), BQ, BK)
        want = torch.where(full, 2, torch.where(any_, 1, 0)).int()
        assert torch.equal(_block_picture(bm), want), (ql, kl, window, used, BQ, BK)


def test_document_block_mask_matches_torch_create_block_mask():
    # torch's own create_block_mask shares no code with attn.
    from torch.nn.attention.flex_attention import create_block_mask as torch_cbm

    qlens, klens, window = LENS, KLENS, (16, 0)
    dense = _dense_truth(qlens, klens, window)
    bm = document_block_mask(_cu(qlens), _cu(klens), window)
    want = torch_cbm(lambda b, h, q, kv: dense[q, kv], None, None, sum(qlens), sum(klens),
                     device="cpu")
    assert torch.equal(_block_picture(bm), _block_picture(want))


def test_jagged_mask_mod_in_flex_attention():
    # document_block_mask for a flex_attention user with a (B=2, H) batch of packed rows.
    qlens = [30, 0, 150, 20]
    cu = _cu(qlens)
    T = sum(qlens)
    bm = document_block_mask(cu, cu, (-1, 0))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, T, 16, generator=g) for _ in range(3))
    out = attn.flex_attention(q, k, v, block_mask=bm)
    m = _dense_truth(qlens, qlens, (-1, 0))
    want, _ = ref_attention(q.double(), k.double(), v.double(), attn_mask=m)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    assert torch.equal(attn.create_mask(jagged_mask_mod(cu, cu, (-1, 0)), 1, 1, T, T,
                                        device="cpu")[0, 0], m)


# --------------------------------------------------------------- nested tensors


def _nested(lens, H, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, H, D, generator=g).to(dtype) for n in lens]
    nt = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)
    return nt, parts


@pytest.mark.parametrize("is_causal", [False, True])
def test_nested_round_trip_with_gradients(is_causal):
    lens, H, D = [5, 1, 130, 17], 2, 16
    qn, qp = _nested(lens, H, D, 0)
    kn, kp = _nested(lens, H, D, 1)
    vn, vp = _nested(lens, H, D, 2)
    q, k, v = (t.transpose(1, 2) for t in (qn, kn, vn))
    out = nested_sdpa(q, k, v, is_causal=is_causal)
    assert out.is_nested and out.layout == torch.jagged
    assert out.shape == q.shape  # same ragged size as the query
    assert out._ragged_idx == 2
    g = torch.Generator().manual_seed(9)
    gos = [torch.randn(n, H, D, generator=g) for n in lens]
    go = torch.cat(gos)
    loss = (out.transpose(1, 2).values() * go).sum()
    loss.backward()
    # Oracle per sequence, float64.
    want, grads = [], [[], [], []]
    for i, n in enumerate(lens):
        leaves = [p[i].double().transpose(0, 1).unsqueeze(0).requires_grad_()
                  for p in (qp, kp, vp)]
        o, _ = ref_attention(*leaves, is_causal=is_causal)
        want.append(o[0].transpose(0, 1))
        for j, gr in enumerate(torch.autograd.grad(
                o, leaves, gos[i].double().transpose(0, 1).unsqueeze(0))):
            grads[j].append(gr[0].transpose(0, 1))
    torch.testing.assert_close(out.transpose(1, 2).values().double(), torch.cat(want),
                               atol=2e-5, rtol=1e-4)
    for leaf, gr in zip((qn, kn, vn), grads):
        assert leaf.grad is not None and leaf.grad.is_nested
        torch.testing.assert_close(leaf.grad.values().double(), torch.cat(gr), atol=2e-5,
                                   rtol=1e-4)


def test_nested_causal_is_top_left_when_lengths_differ():
    qlens, klens, H, D = [3, 20, 7], [5, 9, 7], 2, 8
    qn, qp = _nested(qlens, H, D, 0)
    kn, kp = _nested(klens, H, D, 1)
    vn, vp = _nested(klens, H, D, 2)
    with torch.no_grad():
        out = nested_sdpa(qn.transpose(1, 2), kn.transpose(1, 2), vn.transpose(1, 2),
                          is_causal=True)
    for i, o in enumerate(out.unbind()):
        want, _ = ref_attention(*(p[i].double().transpose(0, 1).unsqueeze(0)
                                  for p in (qp, kp, vp)), is_causal=True)
        torch.testing.assert_close(o.double(), want[0], atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_nested_matches_torch_sdpa_and_holes():
    lens, H, D = [4, 9, 33], 2, 8
    qn, _ = _nested(lens, H, D, 0)
    kn, _ = _nested(lens, H, D, 1)
    vn, _ = _nested(lens, H, D, 2)
    q, k, v = (t.transpose(1, 2) for t in (qn, kn, vn))
    with torch.no_grad():
        ours = nested_sdpa(q, k, v)
        theirs = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours.transpose(1, 2).values(),
                               theirs.transpose(1, 2).values(), atol=1e-5, rtol=1e-5)
    # A nested tensor with holes (offsets + lengths): gathered, result in its layout.
    vals = [torch.randn(12, H, D, requires_grad=True) for _ in range(3)]
    off, ln = torch.tensor([0, 5, 12]), torch.tensor([3, 6])
    q, k, v = (torch.nested.nested_tensor_from_jagged(t, off, ln).transpose(1, 2)
               for t in vals)
    out = nested_sdpa(q, k, v, is_causal=True)
    assert out.shape == q.shape
    res = out.unbind()
    for b, (s, n) in enumerate([(0, 3), (5, 6)]):
        want, _ = ref_attention(*(t.detach()[s:s + n].double().transpose(0, 1).unsqueeze(0)
                                  for t in vals), is_causal=True)
        torch.testing.assert_close(res[b].double(), want[0], atol=2e-5, rtol=1e-4)
    out.transpose(1, 2).values().sum().backward()
    assert vals[0].grad[3:5].abs().sum() == 0 and vals[0].grad[:3].abs().sum() > 0


def test_nested_ragged_batch_dim_runs_dense():
    # Ragged dim 1 of a 5-D nested tensor is a batch-like dim (PyTorch's special path).
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 2, 5, 8, generator=g) for n in (3, 4)]
    q = torch.nested.nested_tensor(parts, layout=torch.jagged)
    out = nested_sdpa(q, q, q, is_causal=True)
    assert out.shape == q.shape
    for o, p in zip(out.unbind(), parts):
        want, _ = ref_attention(p.double(), p.double(), p.double(), is_causal=True)
        torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=1e-4)


def test_nested_errors():
    nt, _ = _nested([3, 4], 2, 8, 0)
    q = nt.transpose(1, 2)
    with pytest.raises(ValueError, match="nested tensors"):
        nested_sdpa(q, torch.randn(2, 2, 4, 8), q)
    with pytest.raises(ValueError, match="attn_mask"):
        nested_sdpa(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="dropout"):
        nested_sdpa(q, q, q, dropout_p=0.1)
    other, _ = _nested([3, 5], 2, 8, 1)
    with pytest.raises(ValueError, match="key and value must have the same sequence lengths"):
        nested_sdpa(q, q, other.transpose(1, 2))


# --------------------------------------------------------------- validation


def _ok():
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    return q, k, v, _cu([4, 6]), _cu([4, 6])


ERRORS = [
    # (description, mutate(args dict), exception, message regex)
    ("offsets 2-D", lambda a: a.update(cu_seq_q=a["cu_seq_q"].view(1, 3)), ValueError,
     r"cu_seq_q must be a 1-D tensor"),
    ("offsets float", lambda a: a.update(cu_seq_k=a["cu_seq_k"].float()), TypeError,
     r"cu_seq_k must have dtype torch.int32 or torch.int64"),
    ("offsets on meta", lambda a: a.update(cu_seq_q=a["cu_seq_q"].to("meta")), ValueError,
     r"cu_seq_q is on meta but query is on cpu"),
    ("not from 0", lambda a: a.update(cu_seq_q=torch.tensor([1, 4, 10])), ValueError,
     r"cu_seq_q must start at 0"),
    ("decreasing", lambda a: a.update(cu_seq_k=torch.tensor([0, 6, 4, 10])), ValueError,
     r"cu_seq_k must be non-decreasing, got cu_seq_k\[1\] = 6 > cu_seq_k\[2\] = 4"),
    ("last != total", lambda a: a.update(cu_seq_q=torch.tensor([0, 4, 9])), ValueError,
     r"cu_seq_q\[-1\] = 9 must equal the number of packed tokens: query has 10"),
    ("lengths differ", lambda a: a.update(cu_seq_k=torch.tensor([0, 10])), ValueError,
     r"cu_seq_q and cu_seq_k must have the same length B\+1, got 3 and 2"),
    ("max_q small", lambda a: a.update(max_q=5), ValueError,
     r"max_q = 5 is smaller than the longest query sequence: sequence 1 has 6"),
    ("max_k small", lambda a: a.update(max_k=0), ValueError, r"max_k = 0 is smaller"),
    ("max_q float", lambda a: a.update(max_q=6.0), TypeError, r"max_q must be an int"),
    ("query 4-D", lambda a: a.update(query=a["query"].unsqueeze(0)), ValueError,
     r"query must be a 3-D packed tensor"),
    ("value 2-D", lambda a: a.update(value=a["value"][:, 0]), ValueError,
     r"value must be a 3-D packed tensor"),
    ("head dim", lambda a: a.update(key=torch.randn(10, 2, 4)), ValueError,
     r"query and key must have the same head dim"),
    ("kv heads", lambda a: a.update(value=torch.randn(10, 1, 8)), ValueError,
     r"key and value must have the same number of heads"),
    ("kv tokens", lambda a: a.update(value=torch.randn(9, 2, 8)), ValueError,
     r"key and value must have the same number of tokens"),
    ("gqa off", lambda a: a.update(key=torch.randn(10, 1, 8), value=torch.randn(10, 1, 8)),
     ValueError, r"Expect query and key/value to have the same number of heads but got "
     r"Hq=2 and Hkv=1\. Try setting enable_gqa=True"),
    ("gqa not dividing", lambda a: a.update(query=torch.randn(10, 3, 8), enable_gqa=True),
     ValueError, r"multiple of kv heads for GQA but got Hq=3 and Hkv=2"),
    ("window length", lambda a: a.update(window_size=(-1,)), ValueError,
     r"window_size must be a \(left, right\) pair"),
    ("window < -1", lambda a: a.update(window_size=(-2, 0)), ValueError,
     r"window_size must be a pair of ints >= -1"),
    ("window float", lambda a: a.update(window_size=(1.5, 0)), ValueError,
     r"window_size must be a pair of ints >= -1"),
    ("seqused shape", lambda a: a.update(seqused_k=torch.tensor([1])), ValueError,
     r"seqused_k must have shape \(B,\) = \(2,\)"),
    ("seqused range", lambda a: a.update(seqused_k=torch.tensor([5, 1])), ValueError,
     r"seqused_k\[0\] = 5 must be in \[0, 4\]"),
    ("dtype mix", lambda a: a.update(key=a["key"].double()), TypeError,
     r"query, key and value must have the same dtype"),
]


@pytest.mark.parametrize("desc,mutate,exc,msg", ERRORS, ids=[e[0] for e in ERRORS])
def test_validation_errors(desc, mutate, exc, msg):
    q, k, v, cq, ck = _ok()
    args = dict(query=q, key=k, value=v, cu_seq_q=cq, cu_seq_k=ck, max_q=6, max_k=6)
    mutate(args)
    kw = {n: args.pop(n) for n in ("window_size", "enable_gqa", "seqused_k") if n in args}
    with torch.no_grad(), pytest.raises(exc, match=msg):
        varlen_attn(args["query"], args["key"], args["value"], args["cu_seq_q"],
                    args["cu_seq_k"], args["max_q"], args["max_k"], **kw)


def test_zero_length_sequences_are_valid():
    q, k, v = (torch.randn(6, 1, 8) for _ in range(3))
    cu = _cu([0, 6, 0])
    varlen_attn(q, k, v, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="at least one query and one key"):
        document_block_mask(_cu([0, 0]), _cu([0, 3]))


# --------------------------------------------------------------- GPU (marker gpu)


def _gpu_ready():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        from attn import gpu  # noqa: F401
    except ImportError:
        import os

        attn.__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            from attn import gpu  # noqa: F401,F811
        except ImportError as e:
            pytest.skip(f"attn.gpu unavailable: {e}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (100, 0), (3, 20)],
                         ids=lambda w: f"w{w[0]}_{w[1]}")
def test_gpu(window, dtype, monkeypatch):
    """The Numba CUDA kernels serve varlen_attn: the forward per sequence from the
    mask's jagged band (gpu/_mma.py JAG; left window edges too); the backward per
    sequence too wherever the tensor-core backward serves the dtype (gpu/_mma_bwd.py
    JAG: bfloat16, and float32 by 3xTF32 unless that is switched off), checked below to
    have run for bfloat16. bfloat16 is held to PyTorch's own varlen_attn
    (FlashAttention) as the baseline."""
    _gpu_ready()
    from attn import gpu

    jagged = []
    make = gpu._mma_bwd.dkdv_kernel
    monkeypatch.setattr(gpu._mma_bwd, "dkdv_kernel",
                        lambda *a, **kw: jagged.append(kw.get("JAG", a[6:7] == (True,)))
                        or make(*a, **kw))
    _check(LENS, KLENS, window, Hq=4, Hkv=2, D=64, dtype=dtype, device="cuda",
           torch_varlen=dtype == torch.bfloat16)
    if dtype == torch.bfloat16 and gpu.JAGGED_BWD:
        assert any(jagged), "the bfloat16 backward did not run per sequence"


def test_public_sdpa_accepts_nested():
    """attn.scaled_dot_product_attention on jagged nested tensors (as PyTorch's nested
    SDPA gets them) equals per-sequence float64 attention; gradients reach the inputs."""
    import attn as _attn
    from attn.reference import attention as _ref

    g = torch.Generator().manual_seed(11)
    lens, H, D = [5, 0, 33, 17], 2, 16
    seqs = [[torch.randn(n, H, D, generator=g, dtype=torch.float64) for n in lens]
            for _ in range(3)]
    q, k, v = (torch.nested.nested_tensor(s, layout=torch.jagged, requires_grad=True)
               for s in seqs)
    out = _attn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
    assert out.is_nested
    out = out.transpose(1, 2)
    loss = sum((o * (i + 1)).sum() for i, o in enumerate(out.unbind()))
    loss.backward()
    for i, n in enumerate(lens):
        if n == 0:
            continue
        qi, ki, vi = (s[i].transpose(0, 1).unsqueeze(0).detach().requires_grad_()
                      for s in seqs)
        ro, _ = _ref(qi, ki, vi, None, True)
        torch.testing.assert_close(out.unbind()[i], ro[0].transpose(0, 1))
        (ro * (i + 1)).sum().backward()
        torch.testing.assert_close(q.grad.unbind()[i], qi.grad[0].transpose(0, 1))
        torch.testing.assert_close(v.grad.unbind()[i], vi.grad[0].transpose(0, 1))
    with pytest.raises(NotImplementedError, match="return_lse"):
        _attn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), return_lse=True)


def test_device_offsets_host_copy_cache(monkeypatch):
    """Device offsets are read (a GPU synchronisation) once per tensor and version: a
    repeat call reuses the checked host copy, an in-place change is read and checked
    again, and the per-call token-count check still runs on a hit. CPU tensors stand in
    for device ones here (the cache is keyed on the device only through
    _copy_costs_sync)."""
    from attn import _varlen

    monkeypatch.setattr(_varlen, "_copy_costs_sync", lambda cu: True)
    monkeypatch.setattr(_varlen, "_HOST_COPIES", {})
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    first = _varlen._check_offsets(cu, "cu_seq_q", 7, None, "query")
    again = _varlen._check_offsets(cu, "cu_seq_q", 7, None, "query")
    assert again is first and first.tolist() == [0, 3, 7]
    with pytest.raises(ValueError, match=r"cu_seq_q\[-1\] = 7 must equal"):
        _varlen._check_offsets(cu, "cu_seq_q", 8, None, "query")
    cu[1] = 9  # in place: the version counter moves, so the values are read again
    with pytest.raises(ValueError, match="non-decreasing"):
        _varlen._check_offsets(cu, "cu_seq_q", 7, None, "query")
    other = torch.tensor([0, 2, 7], dtype=torch.int32)
    assert _varlen._check_offsets(other, "cu_seq_q", 7, None, "query").tolist() == [0, 2, 7]
    # End to end: the same offsets tensor twice, then changed in place.
    q = torch.randn(7, 2, 8)
    cu2 = torch.tensor([0, 3, 7], dtype=torch.int32)
    o1 = attn.varlen_attn(q, q, q, cu2, cu2, 4, 4)
    o2 = attn.varlen_attn(q, q, q, cu2, cu2, 4, 4)
    torch.testing.assert_close(o1, o2)
    cu2[1] = 5
    o3 = attn.varlen_attn(q, q, q, cu2, cu2, 5, 5)
    seqs = [q[a:b].transpose(0, 1).unsqueeze(0).double() for a, b in ((0, 5), (5, 7))]
    ref = torch.cat([ref_attention(x, x, x)[0][0].transpose(0, 1) for x in seqs])
    torch.testing.assert_close(o3.double(), ref, atol=1e-5, rtol=1e-5)


def test_unchecked_host_values_never_pass_as_checked(monkeypatch):
    """Values read for the nested path's key/value comparison (_host_values) are cached
    apart from checked offsets: bad offsets read that way first still fail the check."""
    from attn import _varlen

    monkeypatch.setattr(_varlen, "_copy_costs_sync", lambda cu: True)
    monkeypatch.setattr(_varlen, "_HOST_COPIES", {})
    monkeypatch.setattr(_varlen, "_HOST_VALUES", {})
    bad = torch.tensor([0, 5, 3], dtype=torch.int32)
    assert _varlen._host_values(bad).tolist() == [0, 5, 3]
    assert _varlen._host_values(bad) is _varlen._host_values(bad)
    with pytest.raises(ValueError, match="non-decreasing"):
        _varlen._check_offsets(bad, "cu_seq_q", 3, None, "query")


def test_repeated_call_memo(monkeypatch):
    """Repeated varlen_attn calls with device offsets skip validation, the mask build and
    the backend choice (_varlen._REPEAT): a hit gives the oracle's result and gradients,
    and anything that changes the call (offsets changed in place, another offsets
    tensor, other shapes, a forced backend, the grad mode) misses and is validated
    again. CPU tensors stand in for device ones (_copy_costs_sync)."""
    from attn import _varlen

    monkeypatch.setattr(_varlen, "_copy_costs_sync", lambda cu: True)
    monkeypatch.setattr(_varlen, "_HOST_COPIES", {})
    monkeypatch.setattr(_varlen, "_REPEAT", {})
    lens = [5, 0, 130, 17]
    q, k, v = _inputs(sum(lens), sum(lens), 2, 2, 16, 16, torch.float32)
    cu = _cu(lens)

    def oracle(lens, window=(-1, -1)):
        q64, k64, v64 = (t.detach().double() for t in (q, k, v))
        return _per_sequence(_oracle_fn, q64, k64, v64, lens, lens, window)[0]

    runs = []
    full_path = _varlen._run
    monkeypatch.setattr(_varlen, "_run", lambda *a: runs.append(1) or full_path(*a))
    with torch.no_grad():
        for _ in range(3):
            o = varlen_attn(q, k, v, cu, cu, 130, 130, window_size=(4, 0))
            assert_close_to_oracle(o, o, oracle(lens, (4, 0)), torch.float32, "out")
    assert len(_varlen._REPEAT) == 1 and len(runs) == 1  # two hits
    # A hit with gradients (grad mode is part of the key: a first call learns it).
    for _ in range(2):
        out, lse = varlen_attn(q, k, v, cu, cu, 130, 130,
                               return_aux=attn.AuxRequest(lse=True))
        assert out.shape == (sum(lens), 2, 16) and lse.shape == (2, sum(lens))
        dq, = torch.autograd.grad(out.square().sum(), (q,))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = _per_sequence(_oracle_fn, q64, k64, v64, lens, lens, (-1, -1))[0]
    dq64, = torch.autograd.grad(o64.square().sum(), (q64,))
    assert_close_to_oracle(dq, dq, dq64, torch.float32, "dq",
                           term_scale=dq64.abs().max().item())
    with torch.no_grad():
        # Changed in place: the version moves, the new offsets are checked and used.
        cu[2] = 40
        new = [5, 35, 95, 17]
        o = varlen_attn(q, k, v, cu, cu, 95, 95)
        assert_close_to_oracle(o, o, oracle(new), torch.float32, "out")
        with pytest.raises(ValueError, match="max_q = 94 is smaller"):
            varlen_attn(q, k, v, cu, cu, 94, 95)
        cu[2] = 3  # not non-decreasing: caught though the shapes are those of a hit
        with pytest.raises(ValueError, match="non-decreasing"):
            varlen_attn(q, k, v, cu, cu, 130, 130)
        # Another tensor with the first values: its own entry, same result.
        o = varlen_attn(q, k, v, _cu(lens), None, 130, 130)
        assert_close_to_oracle(o, o, oracle(lens), torch.float32, "out")
        # A forced backend is part of the key.
        with attn.use_backend("reference"):
            o = varlen_attn(q, k, v, _cu(lens), None, 130, 130)
        assert_close_to_oracle(o, o, oracle(lens), torch.float32, "out")
        # Other shapes with the same offsets tensor miss and are validated.
        cu[2] = 5
        with pytest.raises(ValueError, match="must equal the number of packed tokens"):
            varlen_attn(q[:-1], k[:-1], v[:-1], cu, cu, 130, 130)
