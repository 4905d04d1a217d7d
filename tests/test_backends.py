"""The backend registry: listing, forcing, custom backends, and its errors."""

import pytest
import torch

import attn
from attn.reference import attention


def _qkv(B=1, H=2, L=9, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def test_list_backends():
    names = attn.list_backends()
    assert isinstance(names, list)
    assert "cpu" in names and "reference" in names
    assert all(isinstance(n, str) for n in names)


def test_backend_not_supported_error_is_runtime_error():
    assert issubclass(attn.BackendNotSupportedError, RuntimeError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"enable_gqa": True}], ids=["plain", "causal", "gqa"])
def test_use_reference_equals_oracle(dtype, kw):
    g = torch.Generator().manual_seed(1)
    hkv = 1 if kw.get("enable_gqa") else 4
    q = torch.randn(2, 4, 13, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, hkv, 17, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, hkv, 17, 8, generator=g).to(dtype).requires_grad_()
    go = torch.randn(2, 4, 13, 8, generator=g).to(dtype)
    with attn.use_backend("reference"):
        out, lse = attn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    o_ref, l_ref = attention(q2, k2, v2, **kw)
    g_ref = torch.autograd.grad(o_ref, (q2, k2, v2), go)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.bfloat16:  # one bf16 ulp of slack for a different rounding path
        tol = dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(out, o_ref, **tol)
    torch.testing.assert_close(lse, l_ref, **(tol if dtype != torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)))
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, **tol)


def test_use_cpu_backend_works():
    q, k, v = _qkv()
    with attn.use_backend("cpu"):
        out = attn.scaled_dot_product_attention(q, k, v)
    out.sum().backward()
    o_ref, _ = attention(*(t.detach().double() for t in (q, k, v)))
    torch.testing.assert_close(out.double(), o_ref, rtol=1e-5, atol=1e-5)


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError) as ei:
        with attn.use_backend("no-such-backend"):
            pass
    msg = str(ei.value)
    assert "no-such-backend" in msg
    for name in attn.list_backends():
        assert name in msg, f"available backend {name!r} not listed in: {msg}"


def test_forced_backend_never_falls_back():
    # the cpu kernels do not produce a gradient for a float mask
    q, k, v = _qkv()
    mask = torch.randn(9, 9, requires_grad=True)
    with attn.use_backend("cpu"):
        with pytest.raises(attn.BackendNotSupportedError) as ei:
            attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert "cpu" in str(ei.value) or "mask" in str(ei.value)
    assert "attn_mask" in str(ei.value) or "mask" in str(ei.value)


def test_reference_serves_float_mask_with_grad():
    q, k, v = _qkv(dtype=torch.float64)
    mask = torch.randn(9, 9, dtype=torch.float64, requires_grad=True)
    with attn.use_backend("reference"):
        out = attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_auto_with_nothing_fitting_lists_reasons():
    q, k, v = _qkv()
    mask = torch.randn(9, 9, requires_grad=True)
    with pytest.raises(attn.BackendNotSupportedError) as ei:
        attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert "cpu" in str(ei.value)


def test_use_backend_restores_on_exit_and_on_error():
    calls = []
    name = "test-sentinel-restore"

    class Sentinel(Exception):
        pass

    class B:
        auto = False

        def __init__(self):
            self.name = name

        def not_supported_reasons(self, problem):
            return []

        def forward(self, problem):
            calls.append("fwd")
            raise Sentinel()

        def backward(self, problem, out, lse, grad_out, grad_lse):
            raise Sentinel()

    attn.register_backend(name, B())
    try:
        q, k, v = _qkv()
        with attn.use_backend(name):
            with pytest.raises(Sentinel):
                attn.scaled_dot_product_attention(q, k, v)
        assert calls == ["fwd"]
        attn.scaled_dot_product_attention(q, k, v)  # automatic again: not the sentinel
        with pytest.raises(Sentinel):
            with attn.use_backend(name):
                attn.scaled_dot_product_attention(q, k, v)
        attn.scaled_dot_product_attention(q, k, v)
        assert calls == ["fwd", "fwd"]
    finally:
        attn.unregister_backend(name)


class _DelegatingBackend:
    """A user backend: computes with the oracle on tensors the test captured, so it
    needs nothing from the problem object beyond being called."""

    def __init__(self, name, q, k, v, auto=False, reasons=()):
        self.name = name
        self.auto = auto
        self._reasons = list(reasons)
        self._qkv = (q, k, v)
        self.calls = []

    def not_supported_reasons(self, problem):
        self.calls.append("reasons")
        return list(self._reasons)

    def forward(self, problem):
        self.calls.append("forward")
        with torch.no_grad():
            return attention(*(t.detach() for t in self._qkv))

    def backward(self, problem, out, lse, grad_out, grad_lse):
        # Analytic gradients (a backend's backward runs inside a custom op, below
        # autograd, so it is written without torch.autograd).
        self.calls.append("backward")
        q, k, v = (t.detach() for t in self._qkv)
        scale = q.shape[-1] ** -0.5
        p = torch.exp(q @ k.transpose(-2, -1) * scale - lse.unsqueeze(-1))
        dv = p.transpose(-2, -1) @ grad_out
        dp = grad_out @ v.transpose(-2, -1)
        delta = (grad_out * out).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse.unsqueeze(-1)
        ds = p * (dp - delta)
        return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, dv


def test_register_custom_backend_forced():
    q, k, v = _qkv(dtype=torch.float64)
    be = _DelegatingBackend("test-custom", q, k, v)
    attn.register_backend("test-custom", be)
    try:
        assert "test-custom" in attn.list_backends()
        with attn.use_backend("test-custom"):
            out, lse = attn.scaled_dot_product_attention(q, k, v, return_lse=True)
        assert "forward" in be.calls
        o_ref, l_ref = attention(q.detach(), k.detach(), v.detach())
        torch.testing.assert_close(out, o_ref)
        torch.testing.assert_close(lse, l_ref)
        (out.sum() + lse.sum()).backward()
        assert "backward" in be.calls
        q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
        o2, l2 = attention(q2, k2, v2)
        (o2.sum() + l2.sum()).backward()
        torch.testing.assert_close(q.grad, q2.grad)
        torch.testing.assert_close(k.grad, k2.grad)
        torch.testing.assert_close(v.grad, v2.grad)
    finally:
        attn.unregister_backend("test-custom")
    assert "test-custom" not in attn.list_backends()
    with pytest.raises(ValueError):
        with attn.use_backend("test-custom"):
            pass


def test_custom_backend_reasons_when_forced():
    q, k, v = _qkv()
    be = _DelegatingBackend("test-picky", q, k, v, reasons=["picky: needs L == 1000"])
    attn.register_backend("test-picky", be)
    try:
        with attn.use_backend("test-picky"):
            with pytest.raises(attn.BackendNotSupportedError, match="needs L == 1000"):
                attn.scaled_dot_product_attention(q, k, v)
        assert "forward" not in be.calls
    finally:
        attn.unregister_backend("test-picky")


def test_custom_auto_backend_reasons_in_combined_error():
    q, k, v = _qkv()
    mask = torch.randn(9, 9, requires_grad=True)  # cpu cannot serve this
    be = _DelegatingBackend("test-auto", q, k, v, auto=True, reasons=["auto-dummy: refuses everything"])
    attn.register_backend("test-auto", be)
    try:
        with pytest.raises(attn.BackendNotSupportedError) as ei:
            attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        msg = str(ei.value)
        assert "auto-dummy: refuses everything" in msg
        assert "cpu" in msg
        assert "forward" not in be.calls
        # and when it does fit the input, the cpu backend still serves what it can
        out = attn.scaled_dot_product_attention(q, k, v)
        assert "forward" not in be.calls
        assert torch.isfinite(out).all()
    finally:
        attn.unregister_backend("test-auto")


def test_custom_auto_backend_chosen_when_only_fit():
    q, k, v = _qkv()
    mask = torch.randn(9, 9, requires_grad=True)  # cpu cannot serve this; we can
    be = _DelegatingBackend("test-auto-fit", q, k, v, auto=True)
    attn.register_backend("test-auto-fit", be)
    try:
        out = attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert "forward" in be.calls
        torch.testing.assert_close(out, attention(q.detach(), k.detach(), v.detach())[0])
    finally:
        attn.unregister_backend("test-auto-fit")
