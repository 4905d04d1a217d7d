"""attn.scaled_dot_product_attention (automatic backend) against the float64 oracle.

Every case checks out, lse, dq, dk and dv with the rule of ``assert_close_to_oracle``:
at most twice PyTorch's own error in the same dtype, plus a rounding floor.

The cases are chosen, not a cartesian product: each hostile dimension (L, D, Lq != Lk,
GQA / MQA, masks and their broadcast shapes, strides, dtypes) is swept with the others
held at a cheap, varied setting.
"""

import itertools

import pytest
import torch

from _util import Case, check_case

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16

LS = [1, 17, 97, 128]
DS = [8, 59, 64, 80, 111, 128, 256]


def _param(cases):
    return pytest.mark.parametrize("case", cases, ids=[c.id() for c in cases])


# L x D sweep in float32; causal, batch and heads rotate so every D meets both modes.
_ld = [
    Case(B=1 + i % 2, Hq=1 + i % 3, Lq=L, D=D, causal=bool(i % 2), seed=i)
    for i, (L, D) in enumerate(itertools.product(LS, DS))
]


@_param(_ld)
def test_lengths_and_head_dims(case):
    check_case(case)


# every dtype, causal and not, a few shapes (D=59 and D=111: odd head dims)
_dt = [
    Case(B=2, Hq=3, Lq=L, Lk=Lk, D=D, dtype=dt, causal=c, seed=j)
    for j, (dt, (L, Lk, D), c) in enumerate(
        itertools.product(
            [F32, F64, F16, BF16],
            [(17, 17, 64), (97, 45, 59), (33, 128, 111)],
            [False, True],
        )
    )
]


@_param(_dt)
def test_dtypes(case):
    check_case(case)


# Lq != Lk, both directions, causal (top-left) and not, including a single query / key
_lqlk = [
    Case(B=2, Hq=2, Lq=Lq, Lk=Lk, D=64, causal=c, dtype=dt, seed=i)
    for i, ((Lq, Lk), c, dt) in enumerate(
        itertools.product(
            [(17, 97), (97, 17), (1, 128), (128, 1), (128, 97)],
            [False, True],
            [F32],
        )
    )
] + [
    Case(B=1, Hq=2, Lq=33, Lk=70, D=80, causal=True, dtype=BF16, seed=50),
    Case(B=1, Hq=2, Lq=70, Lk=33, D=80, causal=True, dtype=F16, seed=51),
]


@_param(_lqlk)
def test_lq_ne_lk(case):
    check_case(case)


# Dv != D
_dv = [
    Case(B=1, Hq=2, Lq=33, Lk=40, D=64, Dv=32, seed=60),
    Case(B=1, Hq=2, Lq=33, D=32, Dv=80, causal=True, seed=61),
    Case(B=1, Hq=2, Lq=17, D=8, Dv=128, dtype=BF16, seed=62),
]


@_param(_dv)
def test_value_head_dim_differs(case):
    check_case(case)


# GQA (Hq=8, Hkv=2) and MQA (Hkv=1)
_gqa = [
    Case(B=2, Hq=8, Hkv=hkv, Lq=L, Lk=Lk, D=D, causal=c, dtype=dt, seed=i)
    for i, (hkv, c, (dt, L, Lk, D)) in enumerate(
        itertools.product(
            [2, 1],
            [False, True],
            [(F32, 97, 97, 64), (F16, 33, 47, 80), (BF16, 17, 17, 128)],
        )
    )
]


@_param(_gqa)
def test_gqa_mqa(case):
    check_case(case)


# masks: bool and additive, every broadcast shape, with GQA and dtypes mixed in
_mask = [
    Case(B=2, Hq=4, Hkv=hkv, Lq=Lq, Lk=Lk, D=D, mask=kind, mask_shape=shape, dtype=dt, seed=i)
    for i, (kind, (shape, hkv, Lq, Lk, D), dt) in enumerate(
        itertools.product(
            ["bool", "float"],
            [("LL", 4, 17, 17, 64), ("11LL", 2, 33, 97, 59), ("B11L", 4, 97, 33, 80), ("full", 1, 65, 65, 128)],
            [F32, BF16],
        )
    )
] + [
    Case(B=2, Hq=2, Lq=17, Lk=23, D=64, mask="float", mask_shape="full", dtype=F64, seed=80),
    Case(B=2, Hq=2, Lq=17, Lk=23, D=64, mask="bool", mask_shape="B11L", dtype=F16, seed=81),
]


@_param(_mask)
def test_masks(case):
    check_case(case)


# non-contiguous inputs: (B, L, H, D) transposed, stride-2 head dim, stride-0 batch
_strided = [
    Case(B=2, Hq=3, Lq=97, D=64, layout="transposed", seed=90),
    Case(B=2, Hq=4, Hkv=2, Lq=33, Lk=65, D=80, layout="transposed", causal=True, dtype=BF16, seed=91),
    Case(B=2, Hq=2, Lq=17, D=59, layout="dstrided", seed=92),
    Case(B=1, Hq=2, Lq=40, Lk=50, D=128, layout="dstrided", causal=True, dtype=F16, seed=93),
    Case(B=3, Hq=2, Lq=17, D=64, layout="expanded", mask="bool", mask_shape="B11L", seed=94),
    Case(B=2, Hq=2, Lq=33, D=64, layout="transposed", mask="float", mask_shape="LL", dtype=F64, seed=95),
]


@_param(_strided)
def test_strided_inputs(case):
    check_case(case)


# explicit scale
_scale = [
    Case(B=1, Hq=2, Lq=33, D=64, scale=0.5, seed=100),
    Case(B=1, Hq=2, Lq=33, D=64, scale=3.0, causal=True, dtype=BF16, seed=101),
    Case(B=1, Hq=2, Lq=33, D=64, scale=1e-3, dtype=F64, seed=102),
]


@_param(_scale)
def test_scale(case):
    check_case(case)


# the long sequence: only a few, it is the slow one
_long = [
    Case(B=1, Hq=2, Lq=1025, D=64, causal=True, seed=110),
    Case(B=1, Hq=2, Lq=1025, D=128, dtype=BF16, seed=111),
    Case(B=1, Hq=4, Hkv=2, Lq=1025, Lk=1025, D=80, causal=True, mask=None, dtype=F32, seed=112),
    Case(B=1, Hq=1, Lq=17, Lk=1025, D=256, causal=False, dtype=F16, seed=113),
]


@_param(_long)
def test_long_sequence(case):
    check_case(case)


# gradient through lse: loss = <out, g_out> + <lse, g_lse>
_lse = [
    Case(B=2, Hq=2, Lq=17, D=64, seed=120),
    Case(B=1, Hq=4, Hkv=2, Lq=97, Lk=33, D=59, causal=True, seed=121),
    Case(B=2, Hq=2, Lq=33, D=64, mask="float", mask_shape="11LL", dtype=F64, seed=122),
    Case(B=2, Hq=2, Lq=33, D=80, mask="bool", mask_shape="full", dtype=BF16, seed=123),
    Case(B=1, Hq=2, Lq=128, D=128, causal=True, dtype=F16, layout="transposed", seed=124),
]


@_param(_lse)
def test_grad_through_lse(case):
    check_case(case, lse_grad=True)


def test_sum_of_out_and_lse():
    """The brief's literal loss: out.sum() + lse.sum()."""
    import attn
    from attn.reference import attention

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 29, 64, generator=g).requires_grad_() for _ in range(3))
    out, lse = attn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    (out.sum() + lse.sum()).backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = attention(q64, k64, v64, is_causal=True)
    (o64.sum() + l64.sum()).backward()
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_returns_tensor_without_return_lse():
    import attn

    q = torch.randn(1, 2, 5, 8)
    out = attn.scaled_dot_product_attention(q, q, q)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 5, 8)
