"""Invariants: determinism, thread-count independence, no NaN, fully masked rows."""

import math

import pytest
import torch

import attn
from _util import FLOOR, Case, assert_close_to_oracle, make_grad, make_inputs, run_oracle, run_ours, run_torch

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(case, lse_grad=True):
    q, k, v, mask = make_inputs(case)
    go = make_grad((case.B, case.Hq, case.Lq, case.Dv), case.dtype)
    gl = make_grad((case.B, case.Hq, case.Lq), torch.float32, seed=2) if lse_grad else None
    return run_ours(q, k, v, mask, case, go, gl)


DET_CASES = [
    Case(B=2, Hq=4, Lq=97, Lk=130, D=64, causal=True, seed=1),
    Case(B=1, Hq=8, Hkv=2, Lq=200, D=80, dtype=BF16, seed=2),
    Case(B=1, Hq=2, Lq=300, D=59, mask="float", mask_shape="LL", dtype=F64, seed=3),
    Case(B=1, Hq=1, Lq=513, D=128, dtype=F16, causal=True, seed=4),
]


@pytest.mark.parametrize("case", DET_CASES, ids=[c.id() for c in DET_CASES])
def test_bitwise_deterministic(case):
    a = _run(case)
    b = _run(case)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(a[name], b[name]), f"{name} differs between two identical calls"


THREAD_CASES = [
    Case(B=1, Hq=2, Lq=257, Lk=300, D=64, causal=True, seed=5),
    Case(B=1, Hq=1, Lq=200, D=80, seed=6),  # one head: parallelism must come from blocks
    Case(B=2, Hq=8, Hkv=1, Lq=130, D=64, dtype=BF16, seed=7),
    Case(B=1, Hq=2, Lq=150, D=32, dtype=F64, mask="bool", mask_shape="full", seed=8),
]

# "Within rounding": a different split of the work may change summation order.
_THREAD_TOL = {F32: 2e-6, F64: 1e-13, BF16: 8e-3, F16: 1e-3}


@pytest.mark.parametrize("case", THREAD_CASES, ids=[c.id() for c in THREAD_CASES])
def test_one_thread_equals_two(case, restore_threads):
    torch.set_num_threads(1)
    one = _run(case)
    torch.set_num_threads(2)
    two = _run(case)
    tol = _THREAD_TOL[case.dtype]
    for name in ("out", "lse", "dq", "dk", "dv"):
        a, b = one[name].double(), two[name].double()
        scale = max(a.abs().max().item(), 1e-6)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


NAN_CASES = [
    Case(B=1, Hq=2, Lq=97, D=64, magnitude=30.0, seed=10),
    Case(B=1, Hq=2, Lq=97, Lk=40, D=64, magnitude=30.0, causal=True, seed=11),
    Case(B=1, Hq=2, Lq=64, D=128, magnitude=30.0, dtype=F16, seed=12),
    Case(B=1, Hq=2, Lq=64, D=128, magnitude=30.0, dtype=BF16, causal=True, seed=13),
    Case(B=1, Hq=4, Hkv=1, Lq=33, D=59, magnitude=100.0, mask="bool", mask_shape="11LL", seed=14),
    Case(B=1, Hq=2, Lq=33, D=64, magnitude=30.0, dtype=F64, seed=15),
]


@pytest.mark.parametrize("case", NAN_CASES, ids=[c.id() for c in NAN_CASES])
def test_large_inputs_no_nan(case):
    """Scores of magnitude 1e3..1e4: everything finite, and as accurate as PyTorch.

    A score s is only known to about eps * |s|, and softmax turns that absolute error
    into the same relative error of P, for PyTorch as for us. The kernels keep their
    own share of it at PyTorch's level by recomputing the backward's scores bitwise as
    the forward computed them and carrying lse in log2 units as a float pair (before
    that, dv at |s| ~ 4e3 was 10x PyTorch's error): the ordinary rule applies."""
    q, k, v, mask = make_inputs(case)
    go = make_grad((case.B, case.Hq, case.Lq, case.Dv), case.dtype)
    gl = make_grad((case.B, case.Hq, case.Lq), torch.float32, seed=2)
    ours = run_ours(q, k, v, mask, case, go, gl)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.isfinite(ours[name]).all(), f"{name} has non-finite entries"
    ref = run_oracle(q, k, v, mask, case, go, gl)
    tor = run_torch(q, k, v, mask, case, go, gl)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_close_to_oracle(ours[name], tor[name], ref[name], case.dtype, name)


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16])
@pytest.mark.parametrize("kind", ["bool", "float", "causal_and_bool"])
def test_fully_masked_rows(kind, dtype):
    B, H, Lq, Lk, D = 2, 2, 9, 13, 16
    g = torch.Generator().manual_seed(20)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_() for L in (Lq, Lk, Lk))
    dead = [1, 4, 8]
    if kind == "float":
        mask = (torch.randn(B, 1, Lq, Lk, generator=g)).to(dtype)
        mask[:, :, dead] = -math.inf
    else:
        mask = torch.rand(B, H, Lq, Lk, generator=g) > 0.3
        mask[..., 0] = True
        mask[:, :, dead] = False
    out, lse = attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    live = [i for i in range(Lq) if i not in dead]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    assert torch.isneginf(lse[:, :, dead]).all()
    assert torch.isfinite(lse[:, :, live]).all()
    # gradients through out and lse; a gradient arriving at the -inf lse entries must
    # not poison anything (lse is constant -inf there: its derivative is 0)
    go = torch.randn(out.shape, generator=g).to(dtype)
    gl = torch.randn(lse.shape, generator=g)  # nonzero at the -inf entries too
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), grad_outputs=(go, gl))
    for name, gr in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(gr).any(), f"{name} has NaN"
        assert torch.isfinite(gr).all(), f"{name} has inf"
    assert torch.equal(dq[:, :, dead], torch.zeros_like(dq[:, :, dead]))
    # compare with the oracle (the -inf entries excluded from the lse loss the same way)
    from attn.reference import attention

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask64 = mask if mask.dtype == torch.bool else mask.double()
    o64, l64 = attention(q64, k64, v64, attn_mask=mask64)
    r = torch.autograd.grad((o64, l64), (q64, k64, v64), grad_outputs=(go.double(), gl.double()))
    assert_close_to_oracle(out, None, o64, dtype, "out")
    assert_close_to_oracle(lse, None, l64, dtype, "lse")
    sm = 1 / math.sqrt(D)
    gmax = go.abs().max().item() + 1
    for name, a, b, ts in (("dq", dq, r[0], gmax * 16 * sm), ("dk", dk, r[1], gmax * 16 * sm), ("dv", dv, r[2], gmax)):
        assert_close_to_oracle(a, None, b, dtype, name, term_scale=ts)


@pytest.mark.parametrize("Lq,Lk", [(0, 17), (17, 0), (0, 0)])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_empty_sequences(Lq, Lk, dtype):
    q = torch.randn(2, 2, Lq, 64).to(dtype).requires_grad_()
    k = torch.randn(2, 2, Lk, 64).to(dtype).requires_grad_()
    v = torch.randn(2, 2, Lk, 32).to(dtype).requires_grad_()
    for causal in (False, True):
        out, lse = attn.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
        assert out.shape == (2, 2, Lq, 32) and out.dtype == dtype
        assert lse.shape == (2, 2, Lq) and lse.dtype == torch.float32
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()
        dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
        for gr, t in ((dq, q), (dk, k), (dv, v)):
            assert gr.shape == t.shape
            assert torch.equal(gr, torch.zeros_like(gr))
