"""The CPU forward runs groups of q tiles of one (batch, head) in lockstep, each kv tile
fetched (and packed when its rows are strided) once per group (cpu/_kernels.pyx,
fwd_item / fwd_item_jagged). Every q tile still meets its own kv tiles in its own
order, so out and lse must be bitwise the same for every group size
(ATTN_CPU_FWD_GROUP = 1..4): checked here on dense, causal with Lq != Lk, GQA,
strided and odd-width inputs, block masks whose q tiles have shifted or empty lists,
mods, jagged batches (zero-length sequences, causal, window, cross lengths) and
float64; a forced group of 4 is also checked against attn.reference."""
from __future__ import annotations

import pytest
import torch

import attn
from attn import mods
from attn._varlen import varlen_attn

from _util import assert_close_to_oracle
from test_flex import _inputs
from test_varlen import KLENS, LENS, _cu

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _per_group(monkeypatch, fn):
    outs = []
    for G in ("1", "2", "3", "4"):
        monkeypatch.setenv("ATTN_CPU_FWD_GROUP", G)
        with torch.no_grad():
            outs.append(fn())
    return outs


def _same(outs):
    first = outs[0]
    for other in outs[1:]:
        for a, b in zip(first, other):
            assert torch.equal(a, b), "a forward group size changed the result"


def _strided(t):
    # (B, L, H, D) storage viewed as (B, H, L, D): rows 1 head apart, packed by the kernel.
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _sdpa(q, k, v, **kw):
    out, aux = attn.flex_attention(q, k, v, return_aux=attn.AuxRequest(lse=True), **kw)
    return out, aux.lse


@pytest.mark.parametrize("D", [32, 59])
def test_dense_causal_gqa_strided(monkeypatch, D):
    q, k, v = _inputs(2, 4, 2, 333, 517, D, torch.float32, seed=D)
    causal = attn.create_block_mask(mods.causal_mask, None, None, 333, 517)
    for kw in ({}, {"block_mask": causal}):
        _same(_per_group(monkeypatch, lambda: _sdpa(q, k, v, enable_gqa=True, **kw)))
        _same(_per_group(monkeypatch, lambda: _sdpa(_strided(q), _strided(k), _strided(v),
                                                    enable_gqa=True, **kw)))
    _same(_per_group(monkeypatch, lambda: (attn.scaled_dot_product_attention(
        _strided(q), k, v, is_causal=True, enable_gqa=True),)))


def test_block_masks_with_shifted_and_empty_lists(monkeypatch):
    L = 700
    q, k, v = _inputs(1, 2, 2, L, L, 32, torch.float32, seed=5)
    window = attn.create_block_mask(mods.sliding_window(200), None, None, L, L)
    # Rows 128..255 see nothing; other rows see a band: q tiles of one group have
    # different list lengths, one of them none at all.
    def gaps(b, h, q_idx, kv_idx):
        return ((q_idx < 128) | (q_idx >= 256)) & ((q_idx - kv_idx).abs() < 300)

    gapped = attn.create_block_mask(gaps, None, None, L, L, BLOCK_SIZE=64)
    for bm in (window, gapped):
        _same(_per_group(monkeypatch, lambda: _sdpa(_strided(q), k, v, block_mask=bm,
                                                    score_mod=mods.alibi(2))))
    # A forced group of 4 against the float64 reference.
    monkeypatch.setenv("ATTN_CPU_FWD_GROUP", "4")
    from attn.reference import flex_attention as ref_flex

    with torch.no_grad():
        out, lse = _sdpa(_strided(q), k, v, block_mask=gapped)
    o64, l64, _ = ref_flex(q.double(), k.double(), v.double(), None, gapped, None, False)
    assert_close_to_oracle(out, None, o64, torch.float32, "out")
    assert_close_to_oracle(lse, None, l64, torch.float32, "lse")


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (50, 0)])
def test_jagged(monkeypatch, window):
    g = torch.Generator().manual_seed(3)
    for qlens, klens in ((LENS, LENS), (LENS, KLENS)):
        Tq, Tk = sum(qlens), sum(klens)
        q = torch.randn(Tq, 2, 32, generator=g)
        k = torch.randn(Tk, 2, 32, generator=g)
        v = torch.randn(Tk, 2, 24, generator=g)
        cq, ck = _cu(qlens), _cu(klens)

        def run():
            return varlen_attn(q, k, v, cq, ck, max(qlens), max(klens),
                               window_size=window, return_aux=attn.AuxRequest(lse=True))

        _same(_per_group(monkeypatch, run))


def test_float64(monkeypatch):
    q, k, v = _inputs(1, 2, 2, 300, 300, 40, torch.float64, seed=9)
    causal = attn.create_block_mask(mods.causal_mask, None, None, 300, 300)
    _same(_per_group(monkeypatch, lambda: _sdpa(_strided(q), k, v, block_mask=causal)))
