"""attn.flex_attention on a real CUDA GPU (marker ``gpu``): block masks and mods on the
Numba kernels against the float64 oracle, with PyTorch's own (eager) flex_attention on
the same CUDA inputs as the error baseline (DESIGN.md's rule).

    python -m pytest -m gpu tests/test_gpu_flex.py -q
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.filterwarnings("ignore:flex_attention called without")]

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import attn  # noqa: E402

try:
    from attn import gpu  # noqa: E402,F401
except ImportError:
    # Running from a source tree without an install: let attn.gpu find gpu/.
    import os

    attn.__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from attn import gpu  # noqa: E402,F401
    except ImportError as e:  # numba-cuda missing
        pytest.skip(f"attn.gpu unavailable: {e}", allow_module_level=True)
from attn import mods  # noqa: E402
from attn.reference import flex_attention as ref_flex  # noqa: E402
from torch.nn.attention import flex_attention as tfa  # noqa: E402

from _util import assert_close_to_oracle  # noqa: E402

CASES = {
    "causal": (None, lambda L: mods.causal_mask),
    "sliding_window": (None, lambda L: mods.sliding_window(100)),
    "document": (None, lambda L: mods.document_mask(torch.tensor([0, 3, 200, 200, L],
                                                                  device="cuda"))),
    "alibi_causal": (lambda H, L: mods.alibi(torch.tensor(
        [2.0 ** (-(h + 1)) for h in range(H)], device="cuda")), lambda L: mods.causal_mask),
    "softcap": (lambda H, L: mods.tanh_softcap(3.0), None),
    "relative_bias": (lambda H, L: mods.relative_position_bias(
        torch.randn(H, 2 * L - 1, device="cuda")), None),
    # BLOCK_SIZE 64: at D = 128 the tensor-core backward's 64x128 tiles do not divide
    # it, so it takes the small tiles (gpu._small_tiles).
    "causal_block64": (None, lambda L: mods.causal_mask),
}
BLOCK_SIZE = {"causal_block64": 64}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_flex_gpu(name, dtype, D):
    B, Hq, Hkv, L = 2, 4, 2, 517
    smf, mmf = CASES[name]
    sm = smf(Hq, L) if smf else None
    bs = BLOCK_SIZE.get(name, 128)
    bm = (attn.create_block_mask(mmf(L), B, Hq, L, L, device="cuda", BLOCK_SIZE=bs)
          if mmf else None)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, L, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, device="cuda", generator=g).to(dtype)
    go = torch.randn(B, Hq, L, D, device="cuda", generator=g).to(dtype)

    def run(fn, *ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        out, lse = fn(*ts)
        return out, lse, torch.autograd.grad(out, ts, go.to(out.dtype))

    def attn_flex(a, b, c):
        out, aux = attn.flex_attention(a, b, c, sm, bm, enable_gqa=True,
                                       return_aux=attn.AuxRequest(lse=True))
        return out, aux.lse

    def torch_flex(a, b, c):
        out, aux = tfa.flex_attention(a, b, c, score_mod=sm, block_mask=tbm,
                                      enable_gqa=True, return_aux=tfa.AuxRequest(lse=True))
        return out, aux.lse

    ours = run(attn_flex, q, k, v)
    # PyTorch's compiled flex_attention, recompiled in a process that compiled it for
    # another case, raised in its fake-tensor pass on the H200 (alibi_causal, then
    # softcap: TorchRuntimeError; softcap alone passed): a fresh Dynamo state per case.
    torch._dynamo.reset()
    tbm = None
    if bm is not None:
        tbm = tfa.create_block_mask(mmf(L), B, Hq, L, L, device="cuda", BLOCK_SIZE=bs)
    theirs = run(torch_flex, q, k, v)
    oracle = run(lambda a, b, c: ref_flex(a, b, c, sm, bm, None, True)[:2],
                 q.double(), k.double(), v.double())
    assert_close_to_oracle(ours[0], theirs[0], oracle[0], dtype, "out")
    assert_close_to_oracle(ours[1], theirs[1], oracle[1], torch.float32, "lse")
    for i, n in enumerate(("dq", "dk", "dv")):
        assert_close_to_oracle(ours[2][i], theirs[2][i], oracle[2][i], dtype, n,
                               term_scale=oracle[2][i].abs().max().item())


@pytest.mark.parametrize("name", ["causal", "document", "alibi_causal", "softcap"])
def test_flex_gpu_max_scores(name, monkeypatch):
    """AuxRequest(max_scores=True) served by the GPU backend (gpu/_mma.py MAXS; on by
    default, set here so that ATTN_GPU_MAX_SCORES=0 in the environment cannot turn the
    test into a check of another backend), bf16, D 64, against the float64 oracle's
    max_scores; out and lse as without the request."""
    monkeypatch.setattr(gpu, "MAX_SCORES", True)
    B, Hq, Hkv, L, D, dtype = 2, 4, 2, 517, 64, torch.bfloat16
    smf, mmf = CASES[name]
    sm = smf(Hq, L) if smf else None
    bm = attn.create_block_mask(mmf(L), B, Hq, L, L, device="cuda") if mmf else None
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g).to(dtype)
               for H in (Hq, Hkv, Hkv))
    with attn.use_backend("gpu"):
        out, aux = attn.flex_attention(q, k, v, sm, bm, enable_gqa=True,
                                       return_aux=attn.AuxRequest(lse=True,
                                                                  max_scores=True))
        out0, aux0 = attn.flex_attention(q, k, v, sm, bm, enable_gqa=True,
                                         return_aux=attn.AuxRequest(lse=True))
    _, _, rm = ref_flex(q.double(), k.double(), v.double(), sm, bm, None, True)
    assert torch.equal(out, out0) and torch.equal(aux.lse, aux0.lse)
    mx = aux.max_scores
    fin = torch.isfinite(rm)
    assert torch.equal(torch.isfinite(mx), fin)
    # bf16 inputs, float32 scores: the oracle's scores differ by the inputs' rounding
    # only (the same bf16 values in float64), so float32 accumulation error remains
    err = (mx[fin].double() - rm[fin]).abs().max().item()
    assert err <= 1e-3 * max(1.0, rm[fin].abs().max().item()), err
