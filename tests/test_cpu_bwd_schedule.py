"""The cpu backward's two schedules (ATTN_CPU_BWD_SCHEDULE = fused | split | auto):
each within tolerance of the oracle, and equal to each other within rounding."""

import pytest
import torch

import attn
from _util import Case, assert_close_to_oracle, grad_term_scales, make_grad, make_inputs, run_oracle, run_ours, run_torch

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

CASES = [
    Case(B=2, Hq=4, Lq=97, Lk=200, D=64, causal=True, seed=1),
    Case(B=1, Hq=8, Hkv=2, Lq=150, D=80, seed=2),
    Case(B=1, Hq=2, Hkv=1, Lq=130, Lk=70, D=59, causal=True, dtype=BF16, seed=3),
    Case(B=2, Hq=2, Lq=70, D=32, mask="float", mask_shape="B11L", dtype=F64, seed=4),
    Case(B=1, Hq=3, Lq=129, D=128, mask="bool", mask_shape="full", layout="transposed", seed=5),
]

_TOL = {F32: 2e-6, F64: 1e-13, BF16: 8e-3}


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_schedules(case, monkeypatch):
    q, k, v, mask = make_inputs(case)
    go = make_grad((case.B, case.Hq, case.Lq, case.Dv), case.dtype)
    gl = make_grad((case.B, case.Hq, case.Lq), torch.float32, seed=2)
    ref = run_oracle(q, k, v, mask, case, go, gl)
    tor = run_torch(q, k, v, mask, case, go, gl)
    term = grad_term_scales(q, k, v, go, case)
    results = {}
    with attn.use_backend("cpu"):
        for sched in ("fused", "split", "auto"):
            monkeypatch.setenv("ATTN_CPU_BWD_SCHEDULE", sched)
            results[sched] = r = run_ours(q, k, v, mask, case, go, gl)
            for name in ("dq", "dk", "dv"):
                assert_close_to_oracle(r[name], tor[name], ref[name], case.dtype, f"{sched}:{name}", term[name])
    tol = _TOL[case.dtype]
    for name in ("out", "lse", "dq", "dk", "dv"):
        a, b = results["fused"][name].double(), results["split"][name].double()
        scale = max(a.abs().max().item(), 1e-6)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"fused vs split {name}: {m}")
    for name in ("dq", "dk", "dv"):
        ra = results["auto"][name]
        assert torch.equal(ra, results["fused"][name]) or torch.equal(ra, results["split"][name]), (
            f"auto schedule's {name} matches neither fused nor split bitwise"
        )
