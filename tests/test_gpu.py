"""attn.gpu on a real CUDA GPU (marker ``gpu``; skipped without CUDA and numba-cuda).

Run on the GPU machine from the repository root:

    python -m pytest -m gpu tests/test_gpu.py -q

Oracle: attn.reference in float64 on the same (rounded) inputs. Tolerance relative to
PyTorch's own error: |ours - oracle| <= 2 * |torch_same_dtype - oracle| + floor, with
max-abs errors over the tensor, where torch_same_dtype is F.scaled_dot_product_attention
on the same CUDA inputs in the same dtype.

float64 is not supported by the gpu backend (float32 accumulation only), so gradcheck
runs in float32-accumulated form is not meaningful; instead the float32 gradients are
checked against the float64 oracle with the same relative rule. The backend declares
float32/float16/bfloat16 only.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

try:
    import attn
    try:
        from attn import gpu
    except ImportError:
        # Running from a source tree without an install: let attn.gpu find gpu/.
        import os
        attn.__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from attn import gpu
except ImportError as e:  # numba-cuda missing
    pytest.skip(f"attn.gpu unavailable: {e}", allow_module_level=True)

from attn.reference import attention as ref_attention  # noqa: E402

DEV = "cuda"
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=0, transposed=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if transposed:
        # (B, L, H, D) storage viewed as (B, H, L, D): non-contiguous heads/sequence.
        q = torch.randn(B, Lq, Hq, D, device=DEV, generator=g, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Lk, Hkv, D, device=DEV, generator=g, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Lk, Hkv, Dv, device=DEV, generator=g, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Lq, D, device=DEV, generator=g, dtype=dtype)
        k = torch.randn(B, Hkv, Lk, D, device=DEV, generator=g, dtype=dtype)
        v = torch.randn(B, Hkv, Lk, Dv, device=DEV, generator=g, dtype=dtype)
    return q, k, v


def _oracle(q, k, v, mask, causal, go, gl):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, l = ref_attention(qd, kd, vd, mask, causal, None, enable_gqa=q.shape[1] != k.shape[1])
    outs, grads = [o], [go.double()]
    if gl is not None:
        outs.append(l)
        grads.append(gl.double())
    g = torch.autograd.grad(outs, (qd, kd, vd), grads)
    return o, l, g


def _torch_same_dtype(q, k, v, mask, causal, go):
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal,
                                       enable_gqa=q.shape[1] != k.shape[1])
    g = torch.autograd.grad(o, (qt, kt, vt), go)
    return o, g


def _err(a, b):
    return (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item() if a.numel() else 0.0


def _check(name, ours, oracle, torch_val, dtype):
    e_ours = _err(ours, oracle)
    e_torch = _err(torch_val, oracle) if torch_val is not None else 0.0
    bound = 2 * e_torch + FLOOR[dtype] * max(1.0, oracle.abs().max().item() if oracle.numel() else 1.0)
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    assert e_ours <= bound, f"{name}: err {e_ours:.3g} > bound {bound:.3g} (torch {e_torch:.3g})"


def _run_case(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, causal=False, mask_kind=None,
              transposed=False, seed=0):
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed, transposed)
    mask = None
    if mask_kind == "bool":
        g = torch.Generator(device=DEV).manual_seed(seed + 1)
        mask = torch.rand(B, 1, Lq, Lk, device=DEV, generator=g) > 0.3
        mask[..., 0] = True  # keep torch's reference finite (it NaNs fully masked rows)
    elif mask_kind == "additive":
        g = torch.Generator(device=DEV).manual_seed(seed + 1)
        mask = torch.randn(1, Hq, Lq, Lk, device=DEV, generator=g, dtype=dtype)
    out, lse = gpu.forward(q, k, v, mask, causal)
    go = torch.randn_like(out)
    dq, dk, dv = gpu.backward(q, k, v, out, lse, go, None, mask, causal)
    o_ref, l_ref, (dq_ref, dk_ref, dv_ref) = _oracle(q, k, v, mask, causal, go, None)
    o_t, (dq_t, dk_t, dv_t) = _torch_same_dtype(q, k, v, mask, causal, go)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _check("out", out, o_ref, o_t, dtype)
    # lse: no torch counterpart; float32 accumulation gives ~1e-6 relative.
    fin = torch.isfinite(l_ref)
    assert torch.equal(torch.isfinite(lse), fin)
    if fin.any():
        assert _err(lse[fin], l_ref[fin]) <= 1e-4 * max(1.0, l_ref[fin].abs().max().item()) + (
            2e-3 if dtype != torch.float32 else 0.0)
    _check("dq", dq, dq_ref, dq_t, dtype)
    _check("dk", dk, dk_ref, dk_t, dtype)
    _check("dv", dv, dv_ref, dv_t, dtype)


LS = [(1, 1), (17, 17), (97, 97), (128, 128), (1025, 1025), (17, 97), (97, 17), (128, 1025)]
DS = [8, 59, 64, 80, 111, 128, 256]


@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_fp32(D, causal):
    for Lq, Lk in [(17, 17), (97, 128), (128, 97)]:
        _run_case(1, 2, 2, Lq, Lk, D, D, torch.float32, causal)


@pytest.mark.parametrize("Lq,Lk", LS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_fp32(Lq, Lk, causal):
    _run_case(2, 2, 1, Lq, Lk, 64, 64, torch.float32, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 64, 111, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, D, causal):
    _run_case(1, 4, 2, 97, 1025 if D <= 128 else 128, D, D, dtype, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 1)])  # GQA and MQA
def test_gqa_mqa(dtype, Hq, Hkv):
    _run_case(2, Hq, Hkv, 97, 97, 64, 64, dtype, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_masks(dtype, mask_kind):
    _run_case(2, 2, 2, 97, 128, 64, 64, dtype, mask_kind=mask_kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transposed_inputs(dtype):
    _run_case(2, 4, 2, 97, 1025, 64, 64, dtype, causal=True, transposed=True)


def test_dv_differs_from_d():
    _run_case(1, 2, 2, 97, 97, 64, 128, torch.float32)


def test_fully_masked_rows_no_nan():
    q, k, v = _inputs(1, 2, 2, 17, 33, 64, 64, torch.float32)
    mask = torch.ones(1, 1, 17, 33, dtype=torch.bool, device=DEV)
    mask[:, :, 3] = False
    out, lse = gpu.forward(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert (out[:, :, 3] == 0).all() and torch.isneginf(lse[:, :, 3]).all()
    dq, dk, dv = gpu.backward(q, k, v, out, lse, torch.randn_like(out), None, mask)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[:, :, 3] == 0).all()


def test_causal_more_queries_than_keys_and_empty():
    # Top-left causal with Lq > Lk: rows past Lk see every key. Lk = 0: out 0, lse -inf.
    _run_case(1, 2, 2, 97, 17, 64, 64, torch.float32, causal=True)
    q, k, v = _inputs(1, 2, 2, 5, 0, 64, 64, torch.float32)
    out, lse = gpu.forward(q, k, v)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_grad_lse():
    q, k, v = _inputs(1, 2, 2, 97, 97, 64, 64, torch.float32)
    out, lse = gpu.forward(q, k, v, None, True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = gpu.backward(q, k, v, out, lse, go, gl, None, True)
    _, _, (dq_r, dk_r, dv_r) = _oracle(q, k, v, None, True, go, gl)
    for a, b in ((dq, dq_r), (dk, dk_r), (dv, dv_r)):
        assert _err(a, b) <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype):
    """Bitwise-equal results twice: always for the forward, dK and dV; for dQ under
    torch.use_deterministic_algorithms(True) (the default dQ adds by atomics, whose
    order varies, as PyTorch's flash backward does); the atomic dQ still agrees with
    the deterministic one to rounding."""
    q, k, v = _inputs(2, 4, 2, 300, 300, 64, 64, dtype)
    o1, l1 = gpu.forward(q, k, v, None, True)
    o2, l2 = gpu.forward(q, k, v, None, True)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    go = torch.randn_like(o1)
    g1 = gpu.backward(q, k, v, o1, l1, go, None, None, True)
    g2 = gpu.backward(q, k, v, o1, l1, go, None, None, True)
    assert torch.equal(g1[1], g2[1]) and torch.equal(g1[2], g2[2])
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        d1 = gpu.backward(q, k, v, o1, l1, go, None, None, True)
        d2 = gpu.backward(q, k, v, o1, l1, go, None, None, True)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(a, b) for a, b in zip(d1, d2))
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def close(a, ref):
        ref = ref.double()
        return (a.double() - ref).abs().max().item() <= tol * max(ref.abs().max().item(), 1)

    # Deterministic mode runs the split SIMT backward; the default may run the
    # tensor-core dK/dV kernel (float16/bfloat16), whose sums are ordered differently.
    if gpu.mma_bwd_reasons(dtype, 64, 64):
        assert torch.equal(d1[1], g1[1]) and torch.equal(d1[2], g1[2])
    else:
        assert close(g1[1], d1[1]) and close(g1[2], d1[2])
    assert close(g1[0], d1[0])


def test_runs_on_current_stream():
    q, k, v = _inputs(1, 2, 2, 128, 128, 64, 64, torch.float32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out, _ = gpu.forward(q, k, v)
    s.synchronize()
    ref, _ = ref_attention(q.double(), k.double(), v.double())
    assert _err(out, ref) < 1e-4


def test_public_api_autograd():
    from attn._gpu_backend import GpuBackend
    if "gpu" not in attn.list_backends():
        attn.register_backend("gpu", GpuBackend())
    q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 2, 97, 97, 64, 64, torch.float32))
    with attn.use_backend("gpu"):
        out = attn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.sum().backward()
    o_ref, _, g_ref = _oracle(q, k, v, None, True, torch.ones_like(out), None)
    assert _err(out, o_ref) < 1e-4
    for a, b in zip((q.grad, k.grad, v.grad), g_ref):
        assert _err(a, b) < 1e-3
