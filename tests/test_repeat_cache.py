"""The public API's repeated-call path (attn.functional._REPEAT): a cached choice of
backend must follow use_backend and the registry, keep validating what the key does
not cover, and compute the same function as the first call on fresh inputs."""

import pytest
import torch

import attn
from attn import functional
from attn.backends import CpuBackend
from attn.reference import attention


def _qkv(seed, B=2, H=2, L=19, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(3)]


class _Counting(CpuBackend):
    """The cpu kernels, counting the calls that reach them."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def forward(self, problem):
        self.calls += 1
        return super().forward(problem)

    def forward_dense(self, query, key, value, is_causal, scale):
        self.calls += 1
        return super().forward_dense(query, key, value, is_causal, scale)


@pytest.mark.parametrize("causal", [False, True])
def test_repeated_calls_equal_oracle_on_fresh_inputs(causal):
    functional._REPEAT.clear()
    for seed in range(4):  # the first call fills the cache, the others hit it
        q, k, v = _qkv(seed)
        q.requires_grad_(seed % 2 == 1)
        out = attn.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ref, _ = attention(q.detach().double(), k.double(), v.double(), is_causal=causal)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        if q.requires_grad:
            out.sum().backward()
            qr = q.detach().double().requires_grad_()
            attention(qr, k.double(), v.double(), is_causal=causal)[0].sum().backward()
            torch.testing.assert_close(q.grad.double(), qr.grad, rtol=1e-5, atol=1e-5)
    assert len(functional._REPEAT) >= 1


def test_cache_follows_use_backend_and_registry():
    functional._REPEAT.clear()
    q, k, v = _qkv(0)
    attn.scaled_dot_product_attention(q, k, v)  # cached: automatic choice, cpu
    counting = _Counting()
    attn.register_backend("counting", counting)
    try:
        with attn.use_backend("counting"):
            attn.scaled_dot_product_attention(q, k, v)
            attn.scaled_dot_product_attention(q, k, v)
        assert counting.calls == 2
        attn.scaled_dot_product_attention(q, k, v)  # automatic again: not "counting"
        assert counting.calls == 2
        with attn.use_backend("reference"):  # explicit-only backend: never cached
            out = attn.scaled_dot_product_attention(q, k, v)
        ref, _ = attention(q.double(), k.double(), v.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    finally:
        attn.unregister_backend("counting")
    # The cpu backend after unregistering: the registry generation changed the key.
    out = attn.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_cache_keeps_validating_what_its_key_does_not_cover():
    functional._REPEAT.clear()
    q, k, v = _qkv(0)
    attn.scaled_dot_product_attention(q, k, v)
    attn.scaled_dot_product_attention(q, k, v)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        attn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    with pytest.raises(TypeError, match="is_causal"):
        attn.scaled_dot_product_attention(q, k, v, is_causal=1)
    with pytest.raises(ValueError, match="scale"):
        attn.scaled_dot_product_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="head dim"):
        attn.scaled_dot_product_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="enable_gqa"):
        attn.scaled_dot_product_attention(q, k[:, :1], v[:, :1])
