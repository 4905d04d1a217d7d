"""The oracle itself: attn.reference.attention against PyTorch SDPA in float64.

These tests need nothing but ``attn/reference.py`` (it imports nothing else from attn).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from attn.reference import attention

F64 = torch.float64


def _qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=F64, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=F64).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _lse_direct(q, k, mask, causal, scale, gqa):
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    return torch.logsumexp(s, -1)


CASES = [
    # B, Hq, Hkv, Lq, Lk, D, Dv, causal, mask, scale
    (2, 3, 3, 17, 17, 16, 16, False, None, None),
    (2, 3, 3, 17, 17, 16, 8, True, None, None),
    (1, 2, 2, 5, 11, 8, 8, True, None, None),
    (1, 2, 2, 11, 5, 8, 8, True, None, None),
    (1, 2, 2, 1, 9, 8, 8, True, None, None),
    (2, 8, 2, 13, 21, 8, 12, False, None, None),
    (2, 8, 1, 13, 13, 8, 8, True, None, 0.3),
    (2, 4, 4, 7, 9, 8, 8, False, "bool_LL", None),
    (2, 4, 4, 7, 9, 8, 8, False, "float_B11L", None),
    (2, 4, 2, 7, 9, 8, 8, False, "float_full", 2.0),
    (2, 4, 4, 7, 9, 8, 8, False, "bool_11LL", None),
]


def _mask(kind, B, H, Lq, Lk, seed=3):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    dt, shp = kind.split("_")
    shape = {"LL": (Lq, Lk), "11LL": (1, 1, Lq, Lk), "B11L": (B, 1, 1, Lk), "full": (B, H, Lq, Lk)}[shp]
    if dt == "bool":
        m = torch.rand(shape, generator=g) > 0.4
        m[..., 0] = True
        return m
    return torch.randn(shape, generator=g, dtype=F64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_torch_float64(case):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, mkind, scale = case
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, Dv)
    mask = _mask(mkind, B, Hq, Lq, Lk)
    gqa = Hq != Hkv
    out, lse = attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    if causal and mask is None:
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    assert out.dtype == F64 and lse.dtype == F64
    assert out.shape == (B, Hq, Lq, Dv) and lse.shape == (B, Hq, Lq)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, _lse_direct(q, k, mask, causal, scale, gqa), rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    g_ours = torch.autograd.grad((out * go).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * go).sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_causal_is_top_left():
    # Lq=3, Lk=5: row i sees keys 0..i. With one-hot values, out row i is the mean of
    # keys 0..i when all scores are equal (q = 0).
    q = torch.zeros(1, 1, 3, 4, dtype=F64)
    k = torch.randn(1, 1, 5, 4, dtype=F64)
    v = torch.eye(5, dtype=F64).view(1, 1, 5, 5)
    out, lse = attention(q, k, v, is_causal=True)
    for i in range(3):
        expect = torch.zeros(5, dtype=F64)
        expect[: i + 1] = 1.0 / (i + 1)
        torch.testing.assert_close(out[0, 0, i], expect)
        torch.testing.assert_close(lse[0, 0, i], torch.tensor(math.log(i + 1), dtype=F64))
    # Lq=5, Lk=3: rows 2..4 see every key
    q = torch.zeros(1, 1, 5, 4, dtype=F64)
    k = torch.randn(1, 1, 3, 4, dtype=F64)
    v = torch.eye(3, dtype=F64).view(1, 1, 3, 3)
    out, _ = attention(q, k, v, is_causal=True)
    for i in range(5):
        n = min(i + 1, 3)
        expect = torch.zeros(3, dtype=F64)
        expect[:n] = 1.0 / n
        torch.testing.assert_close(out[0, 0, i], expect)


def test_gqa_head_mapping_is_repeat_interleave():
    q, k, v = _qkv(1, 6, 2, 4, 5, 8, 8, requires_grad=False)
    out, _ = attention(q, k, v, enable_gqa=True)
    for h in range(6):
        o_h, _ = attention(q[:, h : h + 1], k[:, h // 3 : h // 3 + 1], v[:, h // 3 : h // 3 + 1])
        torch.testing.assert_close(out[:, h : h + 1], o_h, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_row(kind):
    q, k, v = _qkv(2, 2, 2, 4, 6, 8, 8)
    if kind == "bool":
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[1] = False
    else:
        mask = torch.zeros(4, 6, dtype=F64)
        mask[1] = -math.inf
        mask[2, 3] = -math.inf
    out, lse = attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.isneginf(lse[:, :, 1]).all()
    assert torch.isfinite(lse[:, :, [0, 2, 3]]).all()
    # gradient through out and lse (masking the -inf entries out of the loss)
    gl = torch.randn_like(lse)
    loss = out.sum() + torch.where(torch.isfinite(lse), lse * gl, torch.zeros_like(lse)).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
    for g in (dq, dk, dv):
        assert not torch.isnan(g).any()
    assert torch.equal(dq[:, :, 1], torch.zeros_like(dq[:, :, 1]))
    # a grad of 1 arriving at lse = -inf must also not produce NaN
    dq2, dk2, dv2 = torch.autograd.grad(lse.sum() + out.sum(), (q, k, v))
    for g in (dq2, dk2, dv2):
        assert not torch.isnan(g).any()
    torch.testing.assert_close(dq2[:, :, 1], torch.zeros_like(dq2[:, :, 1]))


@pytest.mark.parametrize("Lq,Lk", [(0, 5), (5, 0), (0, 0)])
def test_empty(Lq, Lk):
    q, k, v = _qkv(2, 2, 2, Lq, Lk, 4, 3)
    out, lse = attention(q, k, v, is_causal=True)
    assert out.shape == (2, 2, Lq, 3) and lse.shape == (2, 2, Lq)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(dtype):
    q, k, v = _qkv(1, 2, 2, 9, 9, 8, 8, dtype=dtype, requires_grad=False)
    out, lse = attention(q, k, v, is_causal=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    o32, l32 = attention(q.float(), k.float(), v.float(), is_causal=True)
    assert torch.equal(out, o32.to(dtype))
    assert torch.equal(lse, l32)


def test_strided_inputs():
    x = torch.randn(2, 9, 3, 16, dtype=F64).transpose(1, 2)
    y = torch.randn(2, 3, 9, 32, dtype=F64)[..., ::2]
    out, _ = attention(x, y, y)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(x, y, y), rtol=1e-12, atol=1e-12)


def test_large_magnitude_no_nan():
    q, k, v = _qkv(1, 2, 2, 33, 33, 16, 16)
    out, lse = attention(q * 1e3, k * 1e3, v, is_causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"is_causal": True},
        {"enable_gqa": True, "_hkv": 1},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
    ],
    ids=["plain", "causal", "mqa", "bool_mask", "float_mask"],
)
def test_gradcheck(kw):
    kw = dict(kw)
    hkv = kw.pop("_hkv", 2)
    q, k, v = _qkv(1, 2, hkv, 5, 6, 3, 4)
    if kw.get("attn_mask") == "bool":
        m = torch.rand(5, 6) > 0.5
        m[:, 0] = True
        m[2] = False  # one fully masked row
        kw["attn_mask"] = m
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(1, 1, 5, 6, dtype=F64, requires_grad=True)

    inputs = (q, k, v) + ((kw.pop("attn_mask"),) if isinstance(kw.get("attn_mask"), torch.Tensor) and kw["attn_mask"].requires_grad else ())

    def f(q, k, v, *m):
        kk = dict(kw)
        if m:
            kk["attn_mask"] = m[0]
        out, lse = attention(q, k, v, **kk)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, inputs)


def test_errors():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q, q)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention(q, q[:, :2], q[:, :2])
    with pytest.raises(ValueError, match="divisible"):
        attention(q, q[:, :3], q[:, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask"):
        attention(q, q, q, attn_mask=torch.ones(4, 3, dtype=torch.bool))


def test_reference_is_standalone():
    """The oracle imports nothing from the rest of attn (it must not share their code)."""
    import ast
    import attn.reference as ref_mod

    tree = ast.parse(open(ref_mod.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in attn/reference.py: line {node.lineno}"
            assert not (node.module or "").startswith("attn"), f"imports {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("attn"), f"imports {alias.name}"
