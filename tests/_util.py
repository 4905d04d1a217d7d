"""Shared helpers for the attn test suite.

The testing method (DESIGN.md): the oracle is ``attn.reference.attention`` run in
float64 on the *same* low-precision inputs (upcast exactly), and the tolerance is
relative to PyTorch's own error in the input dtype:

    max|ours - oracle| <= 2 * max|torch_same_dtype - oracle| + floor(dtype) * max|oracle|

so a kernel is held to the accuracy PyTorch itself reaches, not to a fixed atol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import attn
from attn.reference import attention as reference_attention

# Rounding floor, relative to the largest magnitude of the oracle value. float16 /
# bfloat16 outputs are rounded to ~11 / ~8 significant bits (half an ulp is 2.4e-4 /
# 2e-3 relative); float32 kernels accumulate over L terms and may use a polynomial exp.
FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 4e-3,
}

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _finite_max_abs(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return x.abs().max().item() if x.numel() else 0.0


def assert_close_to_oracle(ours, torch_val, oracle, dtype, name: str = "value", term_scale=0.0):
    """Assert ``ours`` is within twice PyTorch's error of the float64 oracle, plus a floor.

    The floor is ``FLOOR[dtype] * max(max|oracle|, term_scale)``. ``term_scale`` is the
    magnitude of the terms that were summed to make the value (for gradients that
    cancel to ~0, e.g. dq when a row sees a single key, rounding noise scales with the
    terms, not with the tiny result).

    ``torch_val`` may be None (no PyTorch counterpart); then only the floor applies.
    Non-finite entries: ``ours`` must be non-finite exactly where the oracle is (e.g.
    ``lse = -inf`` for empty rows) and equal to it there; NaN is never accepted. Entries
    where PyTorch is not finite but the oracle is do not count towards PyTorch's error.
    """
    assert ours is not None, f"{name}: got None"
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    ours64 = ours.detach().to(torch.float64)
    oracle64 = oracle.detach().to(torch.float64)
    assert not torch.isnan(ours64).any(), f"{name}: NaN in result"
    assert not torch.isnan(oracle64).any(), f"{name}: NaN in oracle (test bug)"
    fin = torch.isfinite(oracle64)
    mismatch_inf = ~fin & (ours64 != oracle64)
    assert not mismatch_inf.any(), (
        f"{name}: non-finite oracle entries not matched, e.g. ours "
        f"{ours64[mismatch_inf][:5].tolist()} vs oracle {oracle64[mismatch_inf][:5].tolist()}"
    )
    assert torch.isfinite(ours64[fin]).all(), f"{name}: inf where the oracle is finite"
    if not fin.any():
        return
    err = (ours64[fin] - oracle64[fin]).abs().max().item()
    scale = max(oracle64[fin].abs().max().item(), term_scale, 1e-6)
    floor = FLOOR[dtype] * scale
    if torch_val is not None:
        t64 = torch_val.detach().to(torch.float64)
        assert t64.shape == oracle64.shape, f"{name}: torch baseline shape mismatch (test bug)"
        d = (t64 - oracle64)[fin]
        torch_err = _finite_max_abs(d)
    else:
        torch_err = 0.0
    allowed = 2.0 * torch_err + floor
    assert err <= allowed, (
        f"{name} ({dtype}): max|ours - oracle| = {err:.3e} > allowed {allowed:.3e} "
        f"(torch error {torch_err:.3e}, floor {floor:.3e}, scale {scale:.3e})"
    )


# ----------------------------------------------------------------------------- inputs


def _make(shape, dtype, layout, gen, scale=1.0):
    """A leaf tensor of logical ``shape`` (B, H, L, D) with the requested memory layout."""
    B, H, L, D = shape
    if layout == "contiguous":
        t = (torch.randn(B, H, L, D, generator=gen) * scale).to(dtype)
    elif layout == "transposed":
        # (B, L, H, D) storage, as a model's projection naturally produces it
        t = (torch.randn(B, L, H, D, generator=gen) * scale).to(dtype).transpose(1, 2)
    elif layout == "dstrided":
        # stride 2 along the head dim
        t = (torch.randn(B, H, L, 2 * D, generator=gen) * scale).to(dtype)[..., ::2]
    elif layout == "expanded":
        # batch dim with stride 0
        t = (torch.randn(1, H, L, D, generator=gen) * scale).to(dtype).expand(B, H, L, D)
    else:
        raise ValueError(layout)
    # detach() keeps the strides; the result is a leaf
    return t.detach().requires_grad_()


@dataclass
class Case:
    B: int = 2
    Hq: int = 2
    Hkv: int | None = None
    Lq: int = 17
    Lk: int | None = None
    D: int = 64
    Dv: int | None = None
    dtype: torch.dtype = torch.float32
    causal: bool = False
    mask: str | None = None  # None, "bool", "float"
    mask_shape: str = "full"  # "LL" (Lq,Lk), "11LL", "B11L", "full" (B,H,Lq,Lk)
    layout: str = "contiguous"
    scale: float | None = None
    seed: int = 0
    magnitude: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.Hkv is None:
            self.Hkv = self.Hq
        if self.Lk is None:
            self.Lk = self.Lq
        if self.Dv is None:
            self.Dv = self.D

    @property
    def gqa(self):
        return self.Hkv != self.Hq

    def id(self):
        s = f"B{self.B}-H{self.Hq}"
        if self.gqa:
            s += f"kv{self.Hkv}"
        s += f"-L{self.Lq}" + (f"x{self.Lk}" if self.Lk != self.Lq else "")
        s += f"-D{self.D}" + (f"v{self.Dv}" if self.Dv != self.D else "")
        s += "-" + str(self.dtype).replace("torch.", "")
        if self.causal:
            s += "-causal"
        if self.mask:
            s += f"-{self.mask}mask{self.mask_shape}"
        if self.layout != "contiguous":
            s += f"-{self.layout}"
        if self.scale is not None:
            s += f"-scale{self.scale}"
        if self.magnitude != 1.0:
            s += f"-x{self.magnitude:g}"
        return s


def make_inputs(case: Case):
    """Returns (q, k, v, attn_mask) as leaf tensors (mask does not require grad)."""
    gen = torch.Generator().manual_seed(case.seed)
    q = _make((case.B, case.Hq, case.Lq, case.D), case.dtype, case.layout, gen, case.magnitude)
    k = _make((case.B, case.Hkv, case.Lk, case.D), case.dtype, case.layout, gen, case.magnitude)
    v = _make((case.B, case.Hkv, case.Lk, case.Dv), case.dtype, case.layout, gen)
    mask = None
    if case.mask is not None:
        shape = {
            "LL": (case.Lq, case.Lk),
            "11LL": (1, 1, case.Lq, case.Lk),
            "B11L": (case.B, 1, 1, case.Lk),
            "full": (case.B, case.Hq, case.Lq, case.Lk),
        }[case.mask_shape]
        if case.mask == "bool":
            mask = torch.rand(shape, generator=gen) > 0.3
            # keep at least one visible key per row so PyTorch's baseline is meaningful
            # (fully masked rows have their own tests)
            if mask.shape[-1] > 0:
                mask[..., 0] = True
        else:
            mask = (torch.randn(shape, generator=gen) * 2).to(case.dtype)
            # some -inf entries, never a whole row
            if mask.shape[-1] > 1:
                drop = torch.rand(shape, generator=gen) > 0.8
                drop[..., 0] = False
                mask = mask.masked_fill(drop, float("-inf"))
    return q, k, v, mask


def make_grad(shape, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def fresh(*ts):
    """Fresh leaves sharing data and strides with ``ts`` (no accumulated .grad)."""
    return [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in ts]


def upcast(*ts):
    """Exact float64 copies (for the oracle), keeping requires_grad."""
    out = []
    for t in ts:
        if t is None:
            out.append(None)
        elif t.is_floating_point():
            out.append(t.detach().to(torch.float64).requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


# ------------------------------------------------------------------------- the three


def torch_lse(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """PyTorch's logsumexp of the scaled, masked scores, computed in q's dtype."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if enable_gqa and Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    Lq, Lk = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask
    return torch.logsumexp(s, dim=-1).float() if q.dtype != torch.float64 else torch.logsumexp(s, dim=-1)


def run_ours(q, k, v, mask, case, grad_out=None, grad_lse=None):
    q, k, v = fresh(q, k, v)
    out, lse = attn.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=case.causal, scale=case.scale,
        enable_gqa=case.gqa, return_lse=True,
    )
    return _finish(out, lse, q, k, v, grad_out, grad_lse)


def run_oracle(q, k, v, mask, case, grad_out=None, grad_lse=None):
    q, k, v, mask = upcast(q, k, v, mask)
    out, lse = reference_attention(
        q, k, v, attn_mask=mask, is_causal=case.causal, scale=case.scale, enable_gqa=case.gqa
    )
    return _finish(out, lse, q, k, v, upcast(grad_out)[0], upcast(grad_lse)[0])


def run_torch(q, k, v, mask, case, grad_out=None, grad_lse=None):
    """PyTorch SDPA (and a logsumexp of its scores) in the input dtype."""
    q, k, v = fresh(q, k, v)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=case.causal, scale=case.scale, enable_gqa=case.gqa
    )
    lse = torch_lse(q, k, mask, case.causal, case.scale, case.gqa)
    return _finish(out, lse, q, k, v, grad_out, grad_lse)


def _finish(out, lse, q, k, v, grad_out, grad_lse):
    res = {"out": out.detach(), "lse": lse.detach()}
    if grad_out is None and grad_lse is None:
        return res
    terms = []
    if grad_out is not None:
        terms.append((out.to(grad_out.dtype) * grad_out).sum())
    if grad_lse is not None:
        # -inf rows have zero weight; mask them so 0 * inf does not enter the loss
        fin = torch.isfinite(lse.detach())
        terms.append((torch.where(fin, lse, torch.zeros_like(lse)) * grad_lse.to(lse.dtype)).sum())
    loss = sum(terms)
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    res["dq"] = dq if dq is not None else torch.zeros_like(q)
    res["dk"] = dk if dk is not None else torch.zeros_like(k)
    res["dv"] = dv if dv is not None else torch.zeros_like(v)
    return res


def grad_term_scales(q, k, v, go, case):
    """Magnitudes of the products summed into dq, dk, dv (see assert_close_to_oracle)."""
    def m(t):
        return t.detach().abs().max().item() if t is not None and t.numel() else 0.0

    sm = case.scale if case.scale is not None else 1.0 / math.sqrt(case.D)
    g = m(go)
    return {
        "dq": g * m(v) * m(k) * abs(sm),
        "dk": g * m(v) * m(q) * abs(sm),
        "dv": g,
    }


def check_case(case: Case, backward=True, lse_grad=False):
    """Forward (out, lse) and, optionally, backward of ``case`` against the oracle."""
    q, k, v, mask = make_inputs(case)
    go = make_grad((case.B, case.Hq, case.Lq, case.Dv), case.dtype) if backward else None
    gl = make_grad((case.B, case.Hq, case.Lq), torch.float32, seed=2) if lse_grad else None
    ours = run_ours(q, k, v, mask, case, go, gl)
    ref = run_oracle(q, k, v, mask, case, go, gl)
    tor = run_torch(q, k, v, mask, case, go, gl)
    assert ours["out"].dtype == case.dtype, f"out dtype {ours['out'].dtype}"
    assert ours["out"].shape == (case.B, case.Hq, case.Lq, case.Dv)
    lse_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert ours["lse"].dtype == lse_dtype, f"lse dtype {ours['lse'].dtype}"
    assert ours["lse"].shape == (case.B, case.Hq, case.Lq)
    term = {}
    if backward:
        term = grad_term_scales(q, k, v, go, case)
    for name in ("out", "lse") + (("dq", "dk", "dv") if backward else ()):
        if name.startswith("d"):
            assert ours[name].dtype == case.dtype, f"{name} dtype {ours[name].dtype}"
        assert_close_to_oracle(
            ours[name], tor[name], ref[name], case.dtype, name, term.get(name, 0.0)
        )
    return ours, ref
