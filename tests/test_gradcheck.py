"""torch.autograd.gradcheck in float64 through attn.scaled_dot_product_attention."""

import pytest
import torch

import attn

F64 = torch.float64


def _t(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_()


CASES = {
    "plain": dict(B=1, Hq=2, Hkv=2, Lq=5, Lk=5, D=3),
    "causal": dict(B=1, Hq=2, Hkv=2, Lq=5, Lk=5, D=3, is_causal=True),
    "causal_lq_lt_lk": dict(B=1, Hq=2, Hkv=2, Lq=4, Lk=7, D=3, is_causal=True),
    "causal_lq_gt_lk": dict(B=1, Hq=2, Hkv=2, Lq=7, Lk=4, D=3, is_causal=True),
    "gqa": dict(B=2, Hq=4, Hkv=2, Lq=5, Lk=6, D=3, enable_gqa=True),
    "mqa_causal": dict(B=1, Hq=3, Hkv=1, Lq=5, Lk=5, D=4, enable_gqa=True, is_causal=True),
    "bool_mask": dict(B=1, Hq=2, Hkv=2, Lq=5, Lk=6, D=3, mask="bool"),
    "float_mask": dict(B=1, Hq=2, Hkv=2, Lq=5, Lk=6, D=3, mask="float"),
    "dv_ne_d": dict(B=1, Hq=2, Hkv=2, Lq=5, Lk=5, D=3, Dv=5, scale=0.7),
}


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name, with_lse):
    c = dict(CASES[name])
    B, Hq, Hkv, Lq, Lk, D = (c.pop(x) for x in ("B", "Hq", "Hkv", "Lq", "Lk", "D"))
    Dv = c.pop("Dv", D)
    mask = c.pop("mask", None)
    q, k, v = _t(B, Hq, Lq, D, seed=0), _t(B, Hkv, Lk, D, seed=1), _t(B, Hkv, Lk, Dv, seed=2)
    if mask == "bool":
        g = torch.Generator().manual_seed(3)
        m = torch.rand(Lq, Lk, generator=g) > 0.4
        m[:, 0] = True
        c["attn_mask"] = m
    elif mask == "float":
        g = torch.Generator().manual_seed(3)
        c["attn_mask"] = torch.randn(B, 1, Lq, Lk, generator=g, dtype=F64)

    def f(q, k, v):
        if with_lse:
            return attn.scaled_dot_product_attention(q, k, v, return_lse=True, **c)
        return attn.scaled_dot_product_attention(q, k, v, **c)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_fully_masked_row():
    """A row with no visible key: out = 0 and its gradients are 0 (finite differences agree)."""
    q, k, v = _t(1, 2, 4, 3, seed=0), _t(1, 2, 5, 3, seed=1), _t(1, 2, 5, 3, seed=2)
    m = torch.ones(4, 5, dtype=torch.bool)
    m[2] = False

    def f(q, k, v):
        return attn.scaled_dot_product_attention(q, k, v, attn_mask=m)

    assert torch.autograd.gradcheck(f, (q, k, v))
