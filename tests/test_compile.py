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
