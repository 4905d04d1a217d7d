"""The CPU kernels' per-sequence schedule for jagged batches (attn._blocks.JaggedBand).

attn.varlen_attn's block masks carry their offsets and band; the CPU kernels then start
q tiles at every sequence's first query and kv tiles at its first key (no tile
straddles a boundary) and find each item's tiles from the offsets instead of block
lists. Checked here: the path is taken; forward and both backward schedules against
per-sequence attn.reference (tests/test_varlen._check: the relative tolerance rule);
agreement with the block-list path on the same mask; bitwise determinism and one
thread equal to two; flex_attention with a document mask, a score_mod and B > 1.
"""
from __future__ import annotations

import pytest
import torch

import attn
import attn.cpu as cpu
from attn._blocks import JaggedBand
from attn._varlen import document_block_mask, varlen_attn
from attn.reference import flex_attention as ref_flex

from _util import assert_close_to_oracle
from test_varlen import LENS, KLENS, _check, _cu, _inputs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Issue 5's hostile mix: empty sequences at the start, inside and at the end.
MIX = [0, 1, 17, 97, 1025, 0, 3, 40, 0]


class _Spy:
    """Stands in for the compiled kernel module and records the args of each call."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def forward(self, args, *rest):
        self.calls.append(("forward", args))
        return self.real.forward(args, *rest)

    def backward(self, args, *rest):
        self.calls.append(("backward", args))
        return self.real.backward(args, *rest)


def test_varlen_takes_the_per_sequence_path(monkeypatch):
    spy = _Spy(cpu._k)
    monkeypatch.setattr(cpu, "_k", spy)
    q, k, v = _inputs(sum(MIX), sum(MIX), 2, 2, 16, 16, torch.float32)
    cu = _cu(MIX)
    out = varlen_attn(q, k, v, cu, cu, max(MIX), max(MIX), window_size=(-1, 0))
    out.sum().backward()
    kinds = [c[0] for c in spy.calls]
    assert kinds == ["forward", "backward"]
    for _, args in spy.calls:
        assert "jagged" in args, "the kernels were given block lists, not the band"
        assert args["kv_full"] is None and args["kv_part"] is None
        assert args["mods"][0] == 0, "the band replaces the element mask_mod"
    bm = document_block_mask(cu, cu, (-1, 0))
    assert isinstance(bm._attn_jagged, JaggedBand)
    # The same mask on another device keeps its band; an indexed one (another mask)
    # falls back to the lists.
    assert bm.to("cpu")._attn_jagged is bm._attn_jagged
    assert getattr(bm[0], "_attn_jagged", None) is None


@pytest.mark.parametrize("schedule", ["fused", "split"])
@pytest.mark.parametrize("window", [(-1, 0), (100, 0), (5, 3)],
                         ids=lambda w: f"w{w[0]}_{w[1]}")
def test_schedules_against_reference(schedule, window, monkeypatch):
    monkeypatch.setenv("ATTN_CPU_BWD_SCHEDULE", schedule)
    _check(MIX, MIX, window, Hq=4, Hkv=2, D=40, seed=3)


@pytest.mark.parametrize("schedule", ["fused", "split"])
def test_schedules_cross_lengths_gqa(schedule, monkeypatch):
    # Lq != Lk per sequence (bottom-right bands differ), sequences with no keys / no
    # queries, MQA.
    monkeypatch.setenv("ATTN_CPU_BWD_SCHEDULE", schedule)
    _check(LENS, KLENS, (-1, 0), Hq=3, Hkv=1, D=24, Dv=40, int64=True, seed=4)
    _check(LENS, KLENS, (30, 7), Hq=2, Hkv=2, D=32, seed=5)


def _varlen_all(q, k, v, cu_q, cu_k, window, go):
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max(MIX), max(MIX), window_size=window,
                           return_aux=attn.AuxRequest(lse=True), enable_gqa=True)
    grads = torch.autograd.grad((out * go).sum(), (q, k, v))
    return (out, lse, *grads)


@pytest.mark.parametrize("window", [(-1, 0), (64, 0), (-1, -1)], ids=str)
def test_matches_block_list_path(window):
    """The band and the block lists of one mask describe the same attention."""
    cu = _cu(MIX)
    q, k, v = _inputs(sum(MIX), sum(MIX), 4, 2, 32, 32, torch.float64)
    go = torch.randn(sum(MIX), 4, 32, dtype=torch.float64)
    a = _varlen_all(q, k, v, cu, cu, window, go)
    bm = document_block_mask(cu, cu, window).to("cpu")  # a copy, then lists only
    del bm._attn_jagged
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, aux = attn.flex_attention(q4, k4, v4, block_mask=bm, enable_gqa=True,
                                   return_aux=attn.AuxRequest(lse=True))
    out = out[0].transpose(0, 1)
    b = (out, aux.lse[0], *torch.autograd.grad((out * go).sum(), (q, k, v)))
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), a, b):
        fin = torch.isfinite(y)
        assert torch.equal(torch.isfinite(x), fin), name
        torch.testing.assert_close(x[fin], y[fin], rtol=1e-10, atol=1e-10, msg=name)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("schedule", ["fused", "split"])
def test_deterministic_and_thread_independent(schedule, monkeypatch, restore_threads):
    monkeypatch.setenv("ATTN_CPU_BWD_SCHEDULE", schedule)
    cu = _cu(MIX)
    q, k, v = _inputs(sum(MIX), sum(MIX), 4, 2, 32, 32, torch.float32)
    go = torch.randn(sum(MIX), 4, 32)
    runs = []
    for nt in (1, 2, 2):
        torch.set_num_threads(nt)
        runs.append(_varlen_all(q, k, v, cu, cu, (100, 0), go))
    for name, *xs in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert torch.equal(xs[0], xs[1]) and torch.equal(xs[1], xs[2]), name


def test_flex_document_mask_with_score_mod_and_batch():
    """flex_attention users of document_block_mask get the band too: B = 2, GQA, a
    score_mod (applied with global token indices), max_scores."""
    from attn import mods

    lens = [100, 0, 257, 31]
    cu = _cu(lens)
    T, B, Hq, Hkv, D = sum(lens), 2, 4, 2, 32
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, generator=g, requires_grad=True)
    go = torch.randn(B, Hq, T, D, generator=g)
    bm = document_block_mask(cu, cu, (-1, 0))
    assert isinstance(bm._attn_jagged, JaggedBand)
    score_mod = mods.alibi(Hq)
    out, aux = attn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                   enable_gqa=True,
                                   return_aux=attn.AuxRequest(lse=True, max_scores=True))
    grads = torch.autograd.grad((out * go).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = ref_flex(q64, k64, v64, score_mod, bm, D ** -0.5, True)[:2]
    r64 = torch.autograd.grad((o64 * go.double()).sum(), (q64, k64, v64))
    # PyTorch's own error: the same dense computation in float32.
    q32, k32, v32 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o32, l32 = ref_flex(q32, k32, v32, score_mod, bm, D ** -0.5, True)[:2]
    r32 = torch.autograd.grad((o32 * go).sum(), (q32, k32, v32))
    assert_close_to_oracle(out, o32, o64, torch.float32, "out")
    assert_close_to_oracle(aux.lse, l32, l64, torch.float32, "lse")
    assert bool(torch.isfinite(aux.max_scores[:, :, :100]).all())
    for name, a, t, r in zip(("dq", "dk", "dv"), grads, r32, r64):
        assert_close_to_oracle(a, t, r, torch.float32, name, term_scale=r.abs().max().item())
