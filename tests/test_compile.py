"""The custom-op route (what torch.compile traces) equals the eager route.

Eager calls go through an autograd.Function and compiled graphs through the
attn::sdpa_forward / attn::sdpa_backward custom ops (attn/_ops.py); both must give the
same outputs and gradients. The aot_eager backend traces with the fake implementations
and runs the ops for real without generating code, so this runs in CI in seconds.
"""
from __future__ import annotations

import pytest
import torch

import attn


def _run(fn, q, k, v, go):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(qs, ks, vs)
    torch.autograd.backward((out, lse), (go, torch.ones_like(lse)))
    return out.detach(), lse.detach(), qs.grad, ks.grad, vs.grad


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_fullgraph_equals_eager(causal):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 33, 16, generator=g)
    k = torch.randn(2, 2, 40, 16, generator=g)
    v = torch.randn(2, 2, 40, 16, generator=g)
    go = torch.randn(2, 4, 33, 16, generator=g)

    def f(q, k, v):
        return attn.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                 enable_gqa=True, return_lse=True)

    eager = _run(f, q, k, v, go)
    compiled = _run(torch.compile(f, backend="aot_eager", fullgraph=True), q, k, v, go)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_op_passes_opcheck():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 17, 8, generator=g, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.attn.sdpa_forward.default,
                          (q, k, v, None, False, 8 ** -0.5, "cpu"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


# --------------------------------------------------- flex_attention and varlen_attn
def _grads(fn, inputs, go):
    """(out, lse, *grads) of fn(*inputs) -> (out, lse), with a gradient on both."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*leaves)
    torch.autograd.backward((out, lse), (go, torch.ones_like(lse)))
    return (out.detach(), lse.detach(), *(t.grad for t in leaves))


def _alibi(slopes):
    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return alibi


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize("mods", ["dense", "score_and_block_mask"])
def test_flex_compiled_fullgraph_equals_eager(mods):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 40, 16, generator=g)
    k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(2))
    go = torch.randn(1, 4, 40, 16, generator=g)
    score_mod = bm = None
    if mods != "dense":
        score_mod = _alibi(torch.rand(4, generator=g))
        bm = attn.create_block_mask(_causal, 1, 1, 40, 40, BLOCK_SIZE=16, device="cpu")

    def f(q, k, v, bm):
        out, aux = attn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                       enable_gqa=True, return_aux=attn.AuxRequest(lse=True))
        return out, aux.lse

    eager = _grads(lambda q, k, v: f(q, k, v, bm), (q, k, v), go)
    compiled_f = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled = _grads(lambda q, k, v: compiled_f(q, k, v, bm), (q, k, v), go)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flex_compiled_follows_mod_objects_and_their_tensors():
    """Two closures of one factory share their code, which is all dynamo guards a
    function by; attn makes it guard on identity, so each runs its own mod. A captured
    tensor changed in place is read at run time."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g) for _ in range(3))
    slopes_a, slopes_b = torch.tensor([0.5, 1.0]), torch.tensor([2.0, -1.0])
    mod_a, mod_b = _alibi(slopes_a), _alibi(slopes_b)
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, score_mod):
        return attn.flex_attention(q, k, v, score_mod=score_mod)

    cf = torch.compile(f, backend=counter, fullgraph=True)
    with torch.no_grad():
        for mod in (mod_a, mod_b, mod_a):
            torch.testing.assert_close(cf(q, k, v, mod), f(q, k, v, mod), rtol=0, atol=0)
        assert counter.frame_count == 2
        slopes_a.mul_(-3.0)
        torch.testing.assert_close(cf(q, k, v, mod_a), f(q, k, v, mod_a), rtol=0, atol=0)
    assert counter.frame_count == 2


def test_varlen_compiled_fullgraph_equals_eager_and_takes_new_offsets():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    T, Hq, Hkv, D = 47, 4, 2, 16
    q = torch.randn(T, Hq, D, generator=g)
    k, v = (torch.randn(T, Hkv, D, generator=g) for _ in range(2))
    go = torch.randn(T, Hq, D, generator=g)
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, cu):
        return attn.varlen_attn(q, k, v, cu, cu, 30, 30, window_size=(-1, 0),
                                enable_gqa=True, return_aux=attn.AuxRequest(lse=True))

    cf = torch.compile(f, backend=counter, fullgraph=True)
    # A zero-length sequence, then other offsets with the same shapes: no recompile.
    for cu in (torch.tensor([0, 5, 5, 30, 47]), torch.tensor([0, 20, 21, 47, 47])):
        eager = _grads(lambda q, k, v: f(q, k, v, cu), (q, k, v), go)
        compiled = _grads(lambda q, k, v: cf(q, k, v, cu), (q, k, v), go)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counter.frame_count == 1
    with pytest.raises(ValueError, match=r"cu_seq_q must start at 0"):
        cf(q, k, v, torch.tensor([1, 5, 5, 30, 47]))


def test_sdpa_compiled_with_inductor():
    """The default backend (inductor): the custom ops are extern calls in generated code."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 17, 8, generator=g) for _ in range(3))
    go = torch.randn(1, 2, 17, 8, generator=g)

    def f(q, k, v):
        return attn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)

    eager = _grads(f, (q, k, v), go)
    compiled = _grads(torch.compile(f, fullgraph=True), (q, k, v), go)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flex_and_varlen_ops_pass_opcheck():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g, requires_grad=True) for _ in range(3))
    bm = attn.create_block_mask(_causal, 1, 1, 20, 20, BLOCK_SIZE=16, device="cpu")
    from attn._flex import _BM_FIELDS, _mods_key

    lists = [getattr(bm, f) for f in _BM_FIELDS]
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.attn.flex_forward.default,
                          (q, k, v, *lists, [16, 16], [20, 20], 0.35, False, False, True,
                           _mods_key(None, _causal)), test_utils=utils)
    cu = torch.tensor([0, 7, 20])
    pq, pk, pv = (t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.attn.varlen_forward.default,
                          (pq, pk, pv, cu, cu, None, 13, 13, None, -1, -1, False, False, True),
                          test_utils=utils)
