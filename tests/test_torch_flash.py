"""attn as PyTorch's flash-attention implementation (attn/_torch_flash.py).

CPU (CI): registration without activation; activation overrides aten's CPU flash ops
and restore removes them (the original kernel runs again: counted); a small
transformer built from PyTorch modules trains one step on attn's kernels with outputs
and gradients within twice PyTorch's own error of a float64 run; fallback to PyTorch's
kernel and strict mode; a forced backend; a PyTorch without the registry; the op
schemas and output layouts against aten's meta functions.

The CUDA overrides cannot run here (the dispatcher sends only CUDA tensors to them), but
their Python implementations are plain functions: called directly with CPU tensors
they route to attn's CPU kernels, so the conversions (BSHD and packed layouts, windows
and bottom-right causal of FlashAttention-2, lse layouts, return tuples) are checked
here against the float64 reference and aten's meta functions. What only the GPU
machine covers (``@pytest.mark.gpu``): the dispatch of CUDA tensors to them from
F.scaled_dot_product_attention and torch's varlen_attn, the Numba kernels behind them,
and the fallback to PyTorch's CUDA flash kernel.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import attention as tna

import attn
from attn import _torch_flash as tf
from attn.reference import attention as ref_attention

from _util import assert_close_to_oracle

CUDA = torch.cuda.is_available()

CPU_FWD = "_scaled_dot_product_flash_attention_for_cpu"
CPU_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"


@pytest.fixture
def active():
    """attn activated for the test, restored after it whatever happens."""
    attn.reset_flash_attention_calls()
    tna.activate_flash_attention_impl("attn")
    try:
        yield
    finally:
        tna.restore_flash_attention_impl()
        attn.reset_flash_attention_calls()


def _calls(op, who="attn"):
    return attn.flash_attention_calls().get(op, {}).get(who, 0)


def _ours_registered(op: str) -> bool:
    return "_torch_flash.py" in torch._C._dispatch_dump(f"aten::{op}")


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# ------------------------------------------------------------------- registration
def test_registered_on_import_not_active():
    assert tf.AVAILABLE and tf.UNAVAILABLE_REASON is None
    assert "attn" in tna.list_flash_attention_impls()
    assert tna.current_flash_attention_impl() is None
    for name, _, _ in tf._OVERRIDES:
        assert not _ours_registered(name), name


def test_activate_overrides_and_restore_undoes_exactly():
    before = {name: torch._C._dispatch_dump(f"aten::{name}") for name, _, _ in tf._OVERRIDES}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 19, 16, generator=g) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    attn.reset_flash_attention_calls()
    tna.activate_flash_attention_impl("attn")
    try:
        assert tna.current_flash_attention_impl() == "attn"
        for name, _, _ in tf._OVERRIDES:  # the CUDA ones too, even on a CPU-only build
            assert _ours_registered(name), name
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert _calls(CPU_FWD) == 1
        oracle, _ = ref_attention(q.double(), k.double(), v.double(), is_causal=True)
        assert_close_to_oracle(out, expected, oracle, torch.float32, "out")
        # Activating again (another impl, or the same) first restores the previous one.
        tna.activate_flash_attention_impl("attn")
        assert tna.current_flash_attention_impl() == "attn"
    finally:
        tna.restore_flash_attention_impl()
    assert tna.current_flash_attention_impl() is None
    after = {name: torch._C._dispatch_dump(f"aten::{name}") for name, _, _ in tf._OVERRIDES}
    assert after == before  # the dispatch tables are exactly what they were
    attn.reset_flash_attention_calls()
    again = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert attn.flash_attention_calls() == {}  # PyTorch's own kernel ran
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_no_registry_gives_clear_message(monkeypatch):
    monkeypatch.delattr(tna, "register_flash_attention_impl")
    ok, why = tf._register()
    assert not ok and "no flash-attention registry" in why
    monkeypatch.setattr(tf, "AVAILABLE", False)
    monkeypatch.setattr(tf, "UNAVAILABLE_REASON", why)
    with pytest.raises(RuntimeError, match="no flash-attention registry"):
        attn.activate_flash_attention()


def test_import_without_registry_works():
    """A PyTorch without the registry: attn imports and runs; activation says why not."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, torch.nn.attention as tna
        del tna.register_flash_attention_impl
        import attn
        q = torch.randn(1, 2, 5, 8)
        out = attn.scaled_dot_product_attention(q, q, q)
        assert out.shape == (1, 2, 5, 8)
        try:
            attn.activate_flash_attention()
        except RuntimeError as e:
            print("refused:", e)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused: PyTorch" in res.stdout and "no flash-attention registry" in res.stdout


def test_schemas_match_implementations():
    for name, _, impl in tf._OVERRIDES:
        op = getattr(torch.ops.aten, name).default
        assert tf._schema_mismatch(op, impl) is None, name


# ------------------------------------------------------------------------ CPU ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["plain", "causal", "gqa", "mask", "transposed"])
def test_cpu_sdpa_runs_on_attn(active, kind, dtype):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, L, D = 2, 4, 4, 33, 16
    if kind == "gqa":
        Hkv = 2
    mk = lambda H: torch.randn(B, H, L, D, generator=g).to(dtype)  # noqa: E731
    if kind == "transposed":
        mk = lambda H: torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2)  # noqa: E731
    q, k, v = mk(Hq), mk(Hkv), mk(Hkv)
    go = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    mask = torch.rand(B, 1, L, L, generator=g) > 0.3 if kind == "mask" else None
    causal = kind == "causal"
    kw = dict(attn_mask=mask, is_causal=causal, enable_gqa=kind == "gqa")

    def run(q, k, v):
        q, k, v = _leaves(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        out.backward(go.to(out.dtype))
        return out.detach(), q.grad, k.grad, v.grad

    ours = run(q, k, v)
    assert (_calls(CPU_FWD), _calls(CPU_BWD)) == (1, 1)
    tna.restore_flash_attention_impl()
    theirs = run(q, k, v)
    tna.activate_flash_attention_impl("attn")
    oracle = run(q.double(), k.double(), v.double())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, theirs, oracle):
        assert a.dtype == dtype and a.stride() == b.stride(), name  # aten's layouts
        assert_close_to_oracle(a, b, c, dtype, name)


def test_cpu_outputs_have_aten_layouts(active):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 9, 3, 8, generator=g).transpose(1, 2)  # (B, L, H, D) memory
    k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(2))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    m_out, m_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *(t.to("meta") for t in (q, k, v)))
    go = torch.randn_like(out)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        go, q, k, v, out, lse, 0.0, False)
    m_grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(t.to("meta") for t in (go, q, k, v, out, lse)), 0.0, False)
    assert _calls(CPU_FWD) == 1 and _calls(CPU_BWD) == 1
    for a, m in zip((out, lse, *grads), (m_out, m_lse, *m_grads)):
        assert (a.shape, a.stride(), a.dtype) == (m.shape, m.stride(), m.dtype)


# ------------------------------------------------------------ a small transformer
class _GqaBlock(nn.Module):
    """Pre-norm causal self-attention with grouped KV heads, calling F.sdpa directly."""

    def __init__(self, d, hq, hkv):
        super().__init__()
        self.hq, self.hkv, self.dh = hq, hkv, d // hq
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * hkv * self.dh)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, L, d = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, L, self.hq, self.dh).transpose(1, 2)
        k, v = self.kv(h).view(B, L, 2, self.hkv, self.dh).unbind(2)
        a = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).reshape(B, L, d))


def _model(d=32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True),
        _GqaBlock(d, 4, 2),
        nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True,
                                   norm_first=True),
    ).train()


def _forward(model, x, padding=None):
    return model[2](model[1](model[0](x, src_key_padding_mask=padding)))


def _step(model, x, padding=None, forward=_forward):
    """Outputs and every gradient of one training step (mask: key padding of layer 1)."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = forward(model, x, padding)
    (y.square().mean() + y.sum()).backward()
    return {"y": y.detach(), "dx": x.grad,
            **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("padding", [False, True])
def test_transformer_trains_on_attn_kernels(padding):
    model = _model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 21, 32, generator=g)
    pad = None
    if padding:
        pad = torch.zeros(3, 21, dtype=torch.bool)
        pad[0, 15:] = True  # some padded keys per sequence, never all of them
        pad[2, 3:9] = True
    theirs = _step(model, x, pad)
    oracle = _step(copy.deepcopy(model).double(), x.double(), pad)
    attn.reset_flash_attention_calls()
    tna.activate_flash_attention_impl("attn")
    try:
        ours = _step(model, x, pad)
        calls = attn.flash_attention_calls()
    finally:
        tna.restore_flash_attention_impl()
    # Three attention layers: each forward and each backward ran on attn's kernels.
    assert calls == {CPU_FWD: {"attn": 3, "torch": 0}, CPU_BWD: {"attn": 3, "torch": 0}}
    assert set(ours) == set(theirs)
    for name in ours:
        assert_close_to_oracle(ours[name], theirs[name], oracle[name], torch.float32, name)


def test_compiled_model_runs_attn_kernels(active):
    """torch.compile traces F.sdpa to aten's flash op; the compiled graph dispatches it
    at run time, to attn's kernel while attn is active."""
    torch._dynamo.reset()
    model = _model()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 13, 32, generator=g)
    eager = _step(model, x)
    attn.reset_flash_attention_calls()
    compiled = torch.compile(_forward, backend="aot_eager", fullgraph=True)
    comp = _step(model, x, forward=compiled)
    assert _calls(CPU_FWD) == 3 and _calls(CPU_BWD) == 3
    for name in eager:
        torch.testing.assert_close(comp[name], eager[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ fallback and strict
def test_fallback_runs_pytorch_kernel(active):
    # attn's CPU kernels take head dims up to 1024; PyTorch's flash kernel takes more.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 5, 1040, generator=g) for _ in range(3))
    go = torch.randn(1, 2, 5, 1040, generator=g)

    def run():
        qq, kk, vv = _leaves(q, k, v)
        out = F.scaled_dot_product_attention(qq, kk, vv)
        out.backward(go)
        return out.detach(), qq.grad, kk.grad, vv.grad

    ours = run()
    assert attn.flash_attention_calls() == {CPU_FWD: {"attn": 0, "torch": 1},
                                            CPU_BWD: {"attn": 0, "torch": 1}}
    tna.restore_flash_attention_impl()
    try:
        theirs = run()
    finally:
        tna.activate_flash_attention_impl("attn")
    for a, b in zip(ours, theirs):  # PyTorch's kernel, bit for bit
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_strict_mode_raises(active, monkeypatch):
    q = torch.randn(1, 2, 5, 8)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # Default: PyTorch's kernel gets the call, and says what it thinks of dropout.
    with pytest.raises(RuntimeError, match="do not support dropout"):
        op(q, q, q, 0.5)
    assert _calls(CPU_FWD, "torch") == 1
    monkeypatch.setenv(tf.STRICT_ENV, "1")
    with pytest.raises(attn.FlashAttentionFallbackError, match="dropout_p=0.5.*no attention "
                                                               "dropout.*ATTN_FLASH_STRICT"):
        op(q, q, q, 0.5)
    big = torch.randn(1, 1, 3, 1040)
    with pytest.raises(attn.FlashAttentionFallbackError, match="head dim 1040 > 1024"):
        F.scaled_dot_product_attention(big, big, big)
    assert _calls(CPU_FWD, "torch") == 1
    monkeypatch.setenv(tf.STRICT_ENV, "maybe")
    with pytest.raises(ValueError, match="ATTN_FLASH_STRICT='maybe'"):
        op(q, q, q, 0.5)


def test_strict_argument_and_restore_resets_it(monkeypatch):
    monkeypatch.delenv(tf.STRICT_ENV, raising=False)
    big = torch.randn(1, 1, 3, 1040)
    attn.activate_flash_attention(strict=True)
    try:
        assert tna.current_flash_attention_impl() == "attn"
        with pytest.raises(attn.FlashAttentionFallbackError):
            F.scaled_dot_product_attention(big, big, big)
    finally:
        tna.restore_flash_attention_impl()
    assert tf._strict_override is None
    with pytest.raises(TypeError, match="strict must be a bool"):
        attn.activate_flash_attention(strict="yes")
    assert tna.current_flash_attention_impl() is None


def test_forced_backend(active):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    with attn.use_backend("reference"):
        out = F.scaled_dot_product_attention(q, k, v)
    assert _calls(CPU_FWD) == 1
    oracle, _ = ref_attention(q.double(), k.double(), v.double())
    assert_close_to_oracle(out, F.scaled_dot_product_attention(q, k, v), oracle,
                           torch.float32)
    # A forced backend that cannot run the call raises, never falls back silently.
    with attn.use_backend("gpu"), pytest.raises(attn.BackendNotSupportedError,
                                                match="forced by use_backend"):
        F.scaled_dot_product_attention(q, k, v)


# ------------------------------------- the CUDA overrides' conversions, on CPU tensors
def _window_mask(Lq, Lk, left, right):
    """FlashAttention's bottom-right window: query i sees key j when
    i + Lk - Lq - left <= j <= i + Lk - Lq + right (-1 = unbounded)."""
    i = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None, :]
    m = torch.ones(Lq, Lk, dtype=torch.bool)
    if left >= 0:
        m &= j >= i - left
    if right >= 0:
        m &= j <= i + right
    return m


def _dense_oracle_and_torch(q, k, v, go, mask, scale):
    """(oracle float64, PyTorch same dtype) of (out, lse, dq, dk, dv), BHSD."""
    res = []
    for dt in (torch.float64, q.dtype):
        qq, kk, vv = _leaves(*(t.to(dt) for t in (q, k, v)))
        if dt == torch.float64:
            out, lse = ref_attention(qq, kk, vv, attn_mask=mask, scale=scale,
                                     enable_gqa=qq.shape[1] != kk.shape[1])
        else:
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale,
                                                 enable_gqa=qq.shape[1] != kk.shape[1])
            lse = None
        grads = torch.autograd.grad(out, (qq, kk, vv), go.to(dt))
        res.append((out.detach(), lse, *grads))
    return res


def _check5(ours, theirs, oracle, dtype):
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), ours, theirs, oracle):
        assert_close_to_oracle(a, b, c.to(a.dtype) if name == "lse" else c,
                               torch.float32 if name == "lse" else dtype, name)


def _meta(t):
    return None if t is None else t.to("meta")


def _same_layouts(ours, meta):
    assert len(ours) == len(meta)
    for a, m in zip(ours, meta):
        if isinstance(m, torch.Tensor):
            assert (a.shape, a.stride(), a.dtype) == (m.shape, m.stride(), m.dtype)
        else:
            assert a == m


@pytest.mark.parametrize("Lq,Lk,causal", [(17, 17, True), (5, 17, True), (17, 6, True),
                                          (9, 20, False)])
def test_cuda_sdpa_impl_on_cpu_tensors(Lq, Lk, causal):
    """aten::_scaled_dot_product_flash_attention(+_backward) as attn implements it: FA-2
    causal is bottom-right (queries past the keys see none: out 0, lse -inf)."""
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g) for _ in range(2))
    go = torch.randn(B, Hq, Lq, D, generator=g)
    scale = 0.3
    res = tf._cuda_sdpa_forward(q, k, v, 0.0, causal, False, scale=scale)
    meta = torch.ops.aten._scaled_dot_product_flash_attention(
        *(_meta(t) for t in (q, k, v)), 0.0, causal, False, scale=scale)
    _same_layouts(res, meta)
    out, lse = res[0], res[1]
    grads = tf._cuda_sdpa_backward(go, q, k, v, out, lse, None, None, Lq, Lk, 0.0, causal,
                                   res[6], res[7], scale=scale)
    _same_layouts(grads, torch.ops.aten._scaled_dot_product_flash_attention_backward(
        *(_meta(t) for t in (go, q, k, v, out, lse)), None, None, Lq, Lk, 0.0, causal,
        _meta(res[6]), _meta(res[7]), scale=scale))
    mask = _window_mask(Lq, Lk, -1, 0 if causal else -1)
    oracle, theirs = _dense_oracle_and_torch(q, k, v, go, mask, scale)
    _check5((out, lse, *grads), theirs, oracle, torch.float32)


# (window_size_left, window_size_right), is_causal -> the window FlashAttention-2 applies
# (bottom-right; causal sets the right side to 0; a side >= the key length is unbounded).
@pytest.mark.parametrize("window,causal,applied", [
    ((-1, -1), True, (-1, 0)), ((3, 0), False, (3, 0)), ((2, 2), False, (2, 2)),
    ((4, -1), True, (4, 0)), ((50, 50), False, (-1, -1))])
def test_cuda_flash_dense_impl_on_cpu_tensors(window, causal, applied):
    """aten::_flash_attention_forward(+_backward) on dense (B, L, H, D) inputs."""
    g = torch.Generator().manual_seed(8)
    B, Lq, Lk, Hq, Hkv, D = 2, 13, 19, 2, 1, 8
    q = torch.randn(B, Lq, Hq, D, generator=g)
    k, v = (torch.randn(B, Lk, Hkv, D, generator=g) for _ in range(2))
    go = torch.randn(B, Lq, Hq, D, generator=g)
    kw = dict(scale=None, window_size_left=window[0], window_size_right=window[1])
    res = tf._cuda_flash_forward(q, k, v, None, None, Lq, Lk, 0.0, causal, False, **kw)
    _same_layouts(res, torch.ops.aten._flash_attention_forward(
        *(_meta(t) for t in (q, k, v)), None, None, Lq, Lk, 0.0, causal, False, **kw))
    out, lse = res[0], res[1]
    grads = tf._cuda_flash_backward(go, q, k, v, out, lse, None, None, Lq, Lk, 0.0, causal,
                                    res[2], res[3], **kw)
    _same_layouts(grads, torch.ops.aten._flash_attention_backward(
        *(_meta(t) for t in (go, q, k, v, out, lse)), None, None, Lq, Lk, 0.0, causal,
        _meta(res[2]), _meta(res[3]), **kw))
    mask = _window_mask(Lq, Lk, *applied)
    bhsd = lambda t: t.transpose(1, 2)  # noqa: E731
    oracle, theirs = _dense_oracle_and_torch(bhsd(q), bhsd(k), bhsd(v), bhsd(go), mask, None)
    ours = (bhsd(out), lse, *(bhsd(t) for t in grads))
    _check5(ours, theirs, oracle, torch.float32)


@pytest.mark.parametrize("window,causal,applied", [
    ((-1, -1), False, (-1, -1)), ((-1, -1), True, (-1, 0)), ((2, 1), False, (2, 1))])
def test_cuda_flash_varlen_impl_on_cpu_tensors(window, causal, applied):
    """aten::_flash_attention_forward(+_backward) on packed (T, H, D) inputs, as torch's
    varlen_attn calls it; and the in-place variant varlen_attn_out calls."""
    g = torch.Generator().manual_seed(9)
    cq, ck = torch.tensor([0, 5, 5, 22], dtype=torch.int32), torch.tensor([0, 7, 9, 20],
                                                                        dtype=torch.int32)
    Hq, Hkv, D = 2, 2, 8
    Tq, Tk = int(cq[-1]), int(ck[-1])
    q = torch.randn(Tq, Hq, D, generator=g)
    k, v = (torch.randn(Tk, Hkv, D, generator=g) for _ in range(2))
    go = torch.randn(Tq, Hq, D, generator=g)
    max_q, max_k = 17, 11
    kw = dict(scale=0.4, window_size_left=window[0], window_size_right=window[1])
    args = (cq, ck, max_q, max_k, 0.0, causal, False)
    res = tf._cuda_flash_forward(q, k, v, *args, **kw)
    _same_layouts(res, torch.ops.aten._flash_attention_forward(
        *(_meta(t) for t in (q, k, v, cq, ck)), *args[2:], **kw))
    out, lse = res[0], res[1]
    buf = torch.empty_like(q)
    lse2 = tf._cuda_flash_forward_inplace(buf, q, k, v, *args, **kw)
    torch.testing.assert_close(buf, out, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)
    grads = tf._cuda_flash_backward(go, q, k, v, out, lse, cq, ck, max_q, max_k, 0.0, causal,
                                    res[2], res[3], **kw)
    # Oracle: each sequence on its own, with its bottom-right window.
    left, right = applied
    oracle = [torch.zeros(Tq, Hq, D, dtype=torch.float64),
              torch.full((Hq, Tq), float("-inf"), dtype=torch.float64),
              torch.zeros(Tq, Hq, D, dtype=torch.float64),
              torch.zeros(Tk, Hkv, D, dtype=torch.float64),
              torch.zeros(Tk, Hkv, D, dtype=torch.float64)]
    theirs = [torch.zeros(Tq, Hq, D), None, torch.zeros(Tq, Hq, D), torch.zeros(Tk, Hkv, D),
              torch.zeros(Tk, Hkv, D)]
    for d in range(3):
        a, b, c, e = int(cq[d]), int(cq[d + 1]), int(ck[d]), int(ck[d + 1])
        if b == a:
            continue
        seq = lambda t, x, y: t[x:y].transpose(0, 1).unsqueeze(0)  # noqa: E731
        o64, t32 = _dense_oracle_and_torch(seq(q, a, b), seq(k, c, e), seq(v, c, e),
                                           seq(go, a, b), _window_mask(b - a, e - c, left,
                                                                       right), 0.4)
        unseq = lambda t: t[0].transpose(0, 1)  # noqa: E731
        for res_, src in ((oracle, o64), (theirs, t32)):
            res_[0][a:b] = unseq(src[0])
            if src[1] is not None:
                res_[1][:, a:b] = src[1][0]
            res_[2][a:b] = unseq(src[2])
            res_[3][c:e] = unseq(src[3])
            res_[4][c:e] = unseq(src[4])
    _check5((out, lse, *grads), theirs, oracle, torch.float32)


def test_cuda_impls_refuse_what_attn_lacks():
    q = torch.randn(1, 4, 2, 8)
    for kw in (dict(alibi_slopes=torch.ones(2)), dict(block_table=torch.zeros(1, 1))):
        with pytest.raises(tf._Unservable):
            tf._cuda_flash_forward(q, q, q, None, None, 4, 4, 0.0, False, False, **kw)
    with pytest.raises(tf._Unservable, match="dropout"):
        tf._cuda_flash_forward(q, q, q, None, None, 4, 4, 0.1, False, False)
    with pytest.raises(tf._Unservable, match="return_debug_mask"):
        tf._cuda_sdpa_forward(q, q, q, 0.0, False, True)
    with pytest.raises(tf._Unservable, match="value head dim"):
        tf._cuda_sdpa_forward(q, q, torch.randn(1, 4, 2, 6))


# ------------------------------------------------------------------- GPU machine
def _cuda_inputs(shape_q, shape_kv, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(*shape_q, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(*shape_kv, device="cuda", generator=g).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_sdpa_flash_runs_on_attn(active, dtype, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _cuda_inputs((2, 4, 257, 64), (2, 4, 257, 64), dtype, 0)
    go = torch.randn_like(q)

    def run(q, k, v):
        q, k, v = _leaves(q, k, v)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(go)
        return out.detach(), q.grad, k.grad, v.grad

    ours = run(q, k, v)
    calls = attn.flash_attention_calls()
    assert calls["_scaled_dot_product_flash_attention"] == {"attn": 1, "torch": 0}
    assert calls["_scaled_dot_product_flash_attention_backward"] == {"attn": 1, "torch": 0}
    tna.restore_flash_attention_impl()
    theirs = run(q, k, v)
    tna.activate_flash_attention_impl("attn")
    leaves = _leaves(q.double(), k.double(), v.double())
    o64, _ = ref_attention(*leaves, is_causal=causal)
    g64 = torch.autograd.grad(o64, leaves, go.double())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, theirs, (o64.detach(), *g64)):
        assert_close_to_oracle(a, b, c, dtype, name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_torch_varlen_attn_runs_on_attn(active):
    from torch.nn.attention.varlen import varlen_attn as torch_varlen

    cu = torch.tensor([0, 100, 100, 357, 400], dtype=torch.int32, device="cuda")
    q, k, v = _cuda_inputs((400, 4, 64), (400, 4, 64), torch.bfloat16, 1)
    go = torch.randn_like(q)

    def run(fn, q, k, v):
        q, k, v = _leaves(q, k, v)
        out = fn(q, k, v)
        out.backward(go)
        return out.detach(), q.grad, k.grad, v.grad

    ours = run(lambda q, k, v: torch_varlen(q, k, v, cu, cu, 257, 257, window_size=(-1, 0)),
               q, k, v)
    calls = attn.flash_attention_calls()
    assert calls["_flash_attention_forward"]["attn"] == 1
    assert calls["_flash_attention_backward"]["attn"] == 1
    tna.restore_flash_attention_impl()
    theirs = run(lambda q, k, v: torch_varlen(q, k, v, cu, cu, 257, 257, window_size=(-1, 0)),
                 q, k, v)
    tna.activate_flash_attention_impl("attn")
    with attn.use_backend("reference"):
        oracle = run(lambda q, k, v: attn.varlen_attn(q, k, v, cu, cu, 257, 257,
                                                      window_size=(-1, 0)),
                     q.double(), k.double(), v.double())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, theirs, oracle):
        assert_close_to_oracle(a, b, c, torch.bfloat16, name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_fallback_and_transformer(active):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Dropout: PyTorch's CUDA flash kernel runs it.
    q, k, v = _cuda_inputs((1, 2, 64, 64), (1, 2, 64, 64), torch.float16, 2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert _calls("_scaled_dot_product_flash_attention", "torch") == 1
    # A bf16 transformer step on attn's GPU kernels, against a float64 run. PyTorch's
    # automatic choice on CUDA may prefer cuDNN or EFFICIENT over FLASH (seen on an
    # H200 with torch 2.11: no flash call at all), and the registry replaces only the
    # flash kernels: the step selects FLASH explicitly, as users of a flash
    # implementation do.
    attn.reset_flash_attention_calls()
    model = _model(64).cuda()
    x = torch.randn(2, 77, 64, device="cuda")
    oracle = _step(copy.deepcopy(model).double(), x.double())
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ours = _step(model, x)
    assert _calls("_scaled_dot_product_flash_attention") == 3
    tna.restore_flash_attention_impl()
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        theirs = _step(model, x)
    tna.activate_flash_attention_impl("attn")
    for name in ours:
        assert_close_to_oracle(ours[name], theirs[name], oracle[name], torch.bfloat16, name)
