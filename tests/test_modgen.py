"""attn._modgen: FlexAttention-style mods traced to Numba element functions, CPU tile
callbacks and the create_block_mask evaluator.

Every check compares with the mod itself run by torch on a (B, H, Lq, Lk) grid, the
way FlexAttention's create_mask evaluates mods (nested torch.vmap under
TransformGetItemToIndex, int32 indices), and derivatives with torch.autograd on that
evaluation: never with our own output. The tile callbacks are called through ctypes
on ragged tiles with padded rows (ld > width), at offsets q0/k0 > 0, in both layouts,
for float32 and float64.
"""
from __future__ import annotations

import ctypes
import math
import random

import numpy as np
import pytest
import torch
from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

from attn import _modgen as mg


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    # Compile into a fresh folder: the suite measures (and never depends on) a cold
    # start, and leaves the user's cache alone.
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTN_MODGEN_CACHE", str(tmp_path_factory.mktemp("modgen")))
    yield
    mp.undo()


# ----------------------------------------------------------------------- oracles --
def torch_grid(mod, B, H, Lq, Lk, S=None):
    """mod evaluated by torch at every (b, h, q, kv): bool (B, H, Lq, Lk) for a mask,
    the scores for a score_mod applied to S."""
    idx = [torch.arange(n, dtype=torch.int32) for n in (B, H, Lq, Lk)]

    def f(*args):
        # a mod may return a Python constant; vmap wants tensors
        out = mod(*args)
        if isinstance(out, torch.Tensor):
            return out
        return torch.full_like(args[0], out, dtype=S.dtype if S is not None else torch.bool)

    pre = (0,) if S is not None else ()
    for d in (3, 2, 1, 0):
        dims = [None] * 4
        dims[d] = 0
        f = torch.vmap(f, in_dims=pre + tuple(dims))
    with TransformGetItemToIndex():
        out = f(*(([S] if S is not None else []) + idx))
    return out


def torch_score_and_grad(mod, S):
    """(mod(S), d mod / d S) elementwise, by torch autograd, in S's dtype."""
    B, H, Lq, Lk = S.shape
    S = S.detach().clone().requires_grad_(True)
    out = torch_grid(mod, B, H, Lq, Lk, S)
    if not isinstance(out, torch.Tensor):
        out = torch.full_like(S, float(out))
    out = out.expand(S.shape)
    if out.requires_grad:
        (g,) = torch.autograd.grad(out.sum(), S, allow_unused=True)
        g = torch.zeros_like(S) if g is None else g
    else:
        g = torch.zeros_like(S)
    return out.detach(), g.detach()


# ------------------------------------------------------- calling our compiled code --
_TILE = ctypes.CFUNCTYPE(None, *([ctypes.c_int64] * 6), ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p)
_GRAD = ctypes.CFUNCTYPE(None, *([ctypes.c_int64] * 6), ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_NP = {torch.float32: np.float32, torch.float64: np.float64}


def run_tiles(compiled, S, dtype, q_major, grad=False, tile=(5, 7), pad=3):
    """Apply the tile callback of ``compiled`` to all of S (numpy (B, H, Lq, Lk))
    tile by tile; returns the new S (and G for grad)."""
    fns = mg.cpu_tile_fns(compiled, dtype)
    ptrs, keep = mg.buffer_pointer_array(compiled)
    kind = "mask" if compiled.kind == "mask" else ("score_grad" if grad else "score")
    fn = (_GRAD if grad else _TILE)(fns[kind])
    S = S.astype(_NP[dtype])
    out, gout = S.copy(), np.zeros_like(S)
    B, H, Lq, Lk = S.shape
    tq, tk = tile
    for b in range(B):
        for h in range(H):
            for q0 in range(0, Lq, tq):
                for k0 in range(0, Lk, tk):
                    nq, nk = min(tq, Lq - q0), min(tk, Lk - k0)
                    blk = S[b, h, q0:q0 + nq, k0:k0 + nk]
                    if not q_major:
                        blk = blk.T
                    ld = blk.shape[1] + pad
                    buf = np.full((blk.shape[0], ld), np.nan, dtype=S.dtype)
                    buf[:, :blk.shape[1]] = blk
                    gbuf = np.full_like(buf, np.nan)
                    args = [b, h, q0, nq, k0, nk, buf.ctypes.data]
                    if grad:
                        args.append(gbuf.ctypes.data)
                    fn(*args, ld, int(q_major), ptrs.ctypes.data)
                    # the padding between rows must be left alone
                    assert np.isnan(buf[:, blk.shape[1]:]).all()
                    res, gres = buf[:, :blk.shape[1]], gbuf[:, :blk.shape[1]]
                    if not q_major:
                        res, gres = res.T, gres.T
                    out[b, h, q0:q0 + nq, k0:k0 + nk] = res
                    gout[b, h, q0:q0 + nq, k0:k0 + nk] = gres
    del keep
    return (out, gout) if grad else out


def check_scores(ours, ref, ref64, rtol):
    """|ours - ref64| <= 2 |ref - ref64| + rtol (1 + |ref64|): the error budget is
    torch's own error in this dtype plus a rounding floor; infinities must match."""
    ours = torch.as_tensor(ours, dtype=torch.float64)
    ref = ref.to(torch.float64)
    ref64 = ref64.to(torch.float64)
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(ours), inf), "infinities differ"
    assert torch.equal(ours[inf], ref[inf])
    assert not torch.isnan(ours[~torch.isnan(ref)]).any(), "NaN where torch has none"
    fin = ~inf & ~torch.isnan(ref)
    err = (ours - ref64)[fin].abs()
    budget = 2 * (ref - ref64)[fin].abs() + rtol * (1 + ref64[fin].abs())
    worst = (err - budget).max().item() if err.numel() else -1
    assert worst <= 0, f"max excess error {worst:.3g}"


# --------------------------------------------------------------------- the mods --
L_Q, L_K = 13, 19
_G = torch.Generator().manual_seed(1234)  # the captured tables are the same every run
DOC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 4, 4, 4, 5, 5, 5, 5, 6])
KEEP = torch.rand(L_K, generator=_G) > 0.3
PAIR = torch.randint(0, 2, (4, 5), dtype=torch.int32, generator=_G)
T8 = torch.tensor([1, -2, 3], dtype=torch.int8)
U8 = torch.tensor([250, 3, 7], dtype=torch.uint8)
I16 = torch.tensor([30000, -30000, 5], dtype=torch.int16)
LENGTHS = torch.tensor([11, 19])
BIAS = torch.randn(3, L_Q + L_K - 1, generator=_G)
SLOPES = torch.tensor([0.5, 0.25, 0.125])
CAP = torch.tensor(2.5)
BIAS64 = torch.randn(3, dtype=torch.float64, generator=_G)
BIAS_BF16 = torch.randn(3, 4, generator=_G).to(torch.bfloat16)

MASKS = {
    "causal": lambda b, h, q, kv: q >= kv,
    "sliding_prefix": lambda b, h, q, kv: ((q >= kv) & ((q - kv).abs() <= 4)) | (kv < 2),
    "document": lambda b, h, q, kv: DOC[q] == DOC[kv],
    "negative_index": lambda b, h, q, kv: DOC[q - 3] <= DOC[kv - L_K],
    "bool_buffer": lambda b, h, q, kv: KEEP[kv] & ~(q < kv),
    # narrow integers wrap as in torch: int8 * 100, uint8 + 10, int16 * 2
    "table_2d_narrow_ints": lambda b, h, q, kv: (PAIR[q % 4, kv % 5] == 1)
    ^ (T8[h] * 100 > kv) ^ ((U8[h] + 10) > kv * 20) ^ ((I16[h] * 2 + q) % 7 == kv % 7)
    ^ (T8[h] * T8[2 - h] * 50 > 0),
    "integer_ops": lambda b, h, q, kv: (
        ((q // 4) == (kv // 4))
        | (q % 3 == kv.remainder(5))
        | (torch.div(q - kv, 3, rounding_mode="trunc") == -1)
    ),
    "float_ops_casts": lambda b, h, q, kv: (
        ((q.float() / 3).floor() * 1.5 >= torch.sqrt(kv * 2.0))
        ^ ((q.to(torch.float64) * 0.5).to(torch.int64) + (kv > 4).int() > kv.double().sqrt().long())
    ),
    "logic": lambda b, h, q, kv: torch.logical_xor(~(q < kv) & (q != 3), kv == 0)
    | torch.logical_not(torch.logical_or(q > 5, kv > 2)),
    "head_batch": lambda b, h, q, kv: (kv < LENGTHS[b]) & ((q - kv) <= h * 3),
}


def _softcap(s, b, h, q, kv):
    return 2.5 * torch.tanh(s / 2.5)


SCORES = {
    "identity": lambda s, b, h, q, kv: s,
    "alibi": lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q),
    "bias_table": lambda s, b, h, q, kv: s + BIAS[h, q - kv + L_K - 1] + BIAS[2, q] * 0.5
    + BIAS[-1][kv] * 0.25,
    "softcap": _softcap,
    "softcap_tensor_where": lambda s, b, h, q, kv: torch.where(
        q >= kv, CAP * torch.tanh(s / CAP), -float("inf")),
    "where_shift": lambda s, b, h, q, kv: torch.where(q >= kv, s, s - 1.0) * 2,
    "gates": lambda s, b, h, q, kv: s * torch.sigmoid(s) + torch.exp(-(s * s)) - torch.relu(-s),
    "clamps_abs_sign": lambda s, b, h, q, kv: torch.clamp(s, -1.0, 1.5) + s.clamp(min=0.25)
    + torch.clamp_max(s * 2, 0.5) + torch.maximum(s, torch.zeros_like(s) + 0.1)
    - torch.minimum(s, q * 0.1) - s.abs() + torch.sign(s) * 0.5 - (-s) * torch.sgn(q - kv),
    "powers": lambda s, b, h, q, kv: (s ** 2) / 3 + (s.abs() + 1) ** 0.5 + (s.abs() + 0.5) ** -1
    + torch.rsqrt(s * s + 1) + torch.pow(1.5, s) + (s.abs() + 1) ** 1.7,
    "transcendental": lambda s, b, h, q, kv: torch.log(s.abs() + 1) + torch.log1p(s.abs())
    + torch.sin(s) * torch.cos(s * 0.5) + torch.atan(s) + torch.sqrt(s.abs() + 1) / (1 + kv),
    "division_remainder": lambda s, b, h, q, kv: s / (1.5 + q) + torch.remainder(s, 1.25)
    + torch.fmod(s, 0.75) - 1.0 / (s.abs() + 2) + torch.div(s, 0.5, rounding_mode="floor")
    + torch.div(s, 0.75, rounding_mode="trunc") + torch.floor_divide(q - kv, 3),
    "mixed_dtypes": lambda s, b, h, q, kv: (s + BIAS64[h]) * 0.5
    + BIAS_BF16[h, kv % 4] + s.to(torch.float64).float() * (q > kv).float(),
    "constant_out": lambda s, b, h, q, kv: 0.5,
}


# ------------------------------------------------------------------ mask checks --
@pytest.mark.parametrize("name", list(MASKS))
def test_mask_tiles_match_torch(name):
    mod = MASKS[name]
    B, H = 2, 3
    ref = torch_grid(mod, B, H, L_Q, L_K)
    c = mg.trace_mask_mod(mod)
    S = np.random.default_rng(0).standard_normal((B, H, L_Q, L_K))
    for dtype in (torch.float32, torch.float64):
        for q_major in (True, False):
            out = run_tiles(c, S, dtype, q_major)
            expect = np.where(ref.numpy(), S.astype(_NP[dtype]), -np.inf)
            np.testing.assert_array_equal(out, expect, err_msg=f"{dtype} q_major={q_major}")


@pytest.mark.parametrize("name", ["causal", "document", "table_2d_narrow_ints", "head_batch"])
def test_mask_element_function_matches_torch(name):
    mod = MASKS[name]
    B, H = 2, 3
    ref = torch_grid(mod, B, H, L_Q, L_K)
    c = mg.trace_mask_mod(mod)
    elem = mg.element_function(c, torch.float32)
    bufs = mg.buffer_arrays(c)
    rng = random.Random(1)
    for _ in range(60):
        b, h, q, kv = rng.randrange(B), rng.randrange(H), rng.randrange(L_Q), rng.randrange(L_K)
        assert bool(elem(b, h, q, kv, *bufs)) == bool(ref[b, h, q, kv]), (b, h, q, kv)


def _block_reference(dense, BQ, BKV):
    B, H, Lq, Lk = dense.shape
    nqb, nkb = -(-Lq // BQ), -(-Lk // BKV)
    full = torch.zeros(B, H, nqb, nkb, dtype=torch.bool)
    part = torch.zeros_like(full)
    for i in range(nqb):
        for j in range(nkb):
            blk = dense[:, :, i * BQ:(i + 1) * BQ, j * BKV:(j + 1) * BKV]
            full[:, :, i, j] = blk.flatten(2).all(-1)
            part[:, :, i, j] = blk.flatten(2).any(-1) & ~full[:, :, i, j]
    return full, part


@pytest.mark.parametrize("name", ["causal", "document", "head_batch"])
def test_block_classes_and_dense_mask_match_torch(name):
    mod = MASKS[name]
    c = mg.trace_mask_mod(mod)
    for B, H, Lq, Lk, BQ, BKV in ((2, 3, 13, 19, 4, 8), (1, 1, 13, 19, 16, 16), (2, 3, 9, 17, 3, 5)):
        dense = torch_grid(mod, B, H, Lq, Lk)
        assert torch.equal(mg.dense_mask(c, B, H, Lq, Lk), dense)
        full, part = mg.block_classes(c, B, H, Lq, Lk, BQ, BKV)
        rfull, rpart = _block_reference(dense, BQ, BKV)
        assert full.shape == (B, H, -(-Lq // BQ), -(-Lk // BKV))
        assert torch.equal(full, rfull) and torch.equal(part, rpart), (B, H, Lq, Lk, BQ, BKV)


def test_block_classes_long_ragged_causal():
    # Blocks straddling Lq / Lk: out-of-range rows and columns must be ignored.
    c = mg.trace_mask_mod(MASKS["causal"])
    Lq, Lk, BQ, BKV = 1000, 777, 64, 128
    full, part = mg.block_classes(c, 1, 1, Lq, Lk, BQ, BKV)
    rfull, rpart = _block_reference(torch_grid(MASKS["causal"], 1, 1, Lq, Lk), BQ, BKV)
    assert torch.equal(full, rfull) and torch.equal(part, rpart)


def test_all_true_masks_are_detected():
    from torch.nn.attention.flex_attention import noop_mask

    for mod in (noop_mask, lambda b, h, q, kv: True, lambda b, h, q, kv: torch.ones_like(q) > 0):
        c = mg.trace_mask_mod(mod)
        assert c.is_all_true
        full, part = mg.block_classes(c, 1, 2, 10, 10, 4, 4)
        assert full.all() and not part.any()
        assert mg.dense_mask(c, 1, 1, 3, 5).all()
    assert not mg.trace_mask_mod(MASKS["causal"]).is_all_true
    c = mg.trace_mask_mod(lambda b, h, q, kv: False)
    assert not mg.dense_mask(c, 1, 1, 3, 4).any()


# ----------------------------------------------------------------- score checks --
def _scores(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _check_score_mod(mod, B=2, H=3, tile=(5, 7)):
    c = mg.trace_score_mod(mod)
    S64 = _scores(1, (B, H, L_Q, L_K))
    for dtype, rtol in ((torch.float64, 1e-11), (torch.float32, 2e-6)):
        S = S64.to(dtype)
        ref, g = torch_score_and_grad(mod, S)
        # the oracle for float32 is the float64 evaluation of the same float32 inputs
        oref, og = torch_score_and_grad(mod, S.to(torch.float64))
        for q_major in (True, False):
            out = run_tiles(c, S.numpy(), dtype, q_major, tile=tile)
            check_scores(out, ref, oref, rtol)
            out2, gout = run_tiles(c, S.numpy(), dtype, q_major, grad=True, tile=tile)
            np.testing.assert_array_equal(out2, out)  # same value from both callbacks
            check_scores(gout, g, og, rtol)
    return c


@pytest.mark.parametrize("name", list(SCORES))
def test_score_tiles_and_derivative_match_torch(name):
    _check_score_mod(SCORES[name])


def test_score_element_functions_match_torch():
    for mod in (SCORES["bias_table"], SCORES["softcap"], SCORES["clamps_abs_sign"]):
        c = mg.trace_score_mod(mod)
        S = _scores(2, (2, 3, L_Q, L_K))
        ref, g = torch_score_and_grad(mod, S)
        bufs = mg.buffer_arrays(c)
        f = mg.element_function(c, torch.float64)
        fg = mg.element_function(c, torch.float64, grad=True)
        rng = random.Random(3)
        for _ in range(40):
            i = (rng.randrange(2), rng.randrange(3), rng.randrange(L_Q), rng.randrange(L_K))
            s = float(S[i])
            v = f(s, *i, *bufs)
            v2, d = fg(s, *i, *bufs)
            assert v == v2
            assert math.isclose(v, float(ref[i]), rel_tol=1e-12, abs_tol=1e-12)
            assert math.isclose(d, float(g[i]), rel_tol=1e-12, abs_tol=1e-12)


def test_identity_score_mod_is_detected():
    from torch.nn.attention.flex_attention import _identity

    assert mg.trace_score_mod(_identity).is_identity
    assert mg.trace_score_mod(SCORES["identity"]).is_identity
    assert not mg.trace_score_mod(SCORES["alibi"]).is_identity


# ------------------------------------------------------- random compositions --
def _random_score_mod(seed):
    rng = random.Random(seed)
    leaves = [
        lambda s, b, h, q, kv: s,
        lambda s, b, h, q, kv: s * 0.5 + 0.25,
        lambda s, b, h, q, kv: (q - kv) * 0.125,
        lambda s, b, h, q, kv: SLOPES[h] * kv,
        lambda s, b, h, q, kv: BIAS[h, q - kv + L_K - 1],
        lambda s, b, h, q, kv: (b + 1) * 0.5 * s,
    ]
    unary = [
        torch.tanh, torch.sigmoid, torch.abs, torch.relu, torch.neg, torch.sin,
        lambda x: torch.exp(-x.abs()),
        lambda x: torch.clamp(x, -1.5, 2.0),
        lambda x: x * x,
        lambda x: torch.sqrt(x.abs() + 1),
        lambda x: torch.log1p(x.abs()),
    ]
    binary = [
        torch.add, torch.sub, torch.mul, torch.maximum, torch.minimum,
        lambda x, y: x / (1 + y.abs()),
        lambda x, y: torch.where(x > y, x, y * 0.5),
    ]

    def build(depth):
        if depth == 0 or rng.random() < 0.2:
            return rng.choice(leaves)
        if rng.random() < 0.45:
            f, a = rng.choice(unary), build(depth - 1)
            return lambda s, b, h, q, kv: f(a(s, b, h, q, kv))
        f, a, c = rng.choice(binary), build(depth - 1), build(depth - 1)
        return lambda s, b, h, q, kv: f(a(s, b, h, q, kv), c(s, b, h, q, kv))

    return build(4)


def _random_mask_mod(seed):
    rng = random.Random(seed)
    atoms = [
        lambda b, h, q, kv: q >= kv,
        lambda b, h, q, kv: (q - kv).abs() <= 3,
        lambda b, h, q, kv: DOC[q] == DOC[kv],
        lambda b, h, q, kv: KEEP[kv],
        lambda b, h, q, kv: kv < LENGTHS[b],
        lambda b, h, q, kv: (q + h) % 3 == 0,
    ]
    ops = [torch.logical_and, torch.logical_or, torch.logical_xor,
           lambda x, y: x & ~y, lambda x, y: x | y]

    def build(depth):
        if depth == 0 or rng.random() < 0.25:
            return rng.choice(atoms)
        f, a, c = rng.choice(ops), build(depth - 1), build(depth - 1)
        return lambda b, h, q, kv: f(a(b, h, q, kv), c(b, h, q, kv))

    return build(3)


@pytest.mark.parametrize("seed", range(3))
def test_random_score_compositions(seed):
    _check_score_mod(_random_score_mod(seed), tile=(8, 8))


@pytest.mark.parametrize("seed", range(2))
def test_random_mask_compositions(seed):
    mod = _random_mask_mod(seed)
    c = mg.trace_mask_mod(mod)
    ref = torch_grid(mod, 2, 3, L_Q, L_K)
    S = np.random.default_rng(seed).standard_normal((2, 3, L_Q, L_K))
    for dtype in (torch.float32, torch.float64):
        for q_major in (True, False):
            out = run_tiles(c, S, dtype, q_major, tile=(6, 4))
            np.testing.assert_array_equal(out, np.where(ref.numpy(), S.astype(_NP[dtype]), -np.inf))
    assert torch.equal(mg.dense_mask(c, 2, 3, L_Q, L_K), ref)


# ------------------------------------------------------------------ semantics --
def test_out_of_range_indices_are_clamped():
    # torch raises here; a kernel cannot, so reads clamp to the nearest end
    mod = lambda b, h, q, kv: DOC[q + 100] == DOC[kv - 100]  # noqa: E731
    c = mg.trace_mask_mod(mod)
    n = len(DOC)
    expect = torch_grid(lambda b, h, q, kv: DOC[(q + 100).clamp(max=n - 1)] == DOC[(kv - 100).clamp(min=0)],
                        1, 1, L_Q, L_K)
    assert torch.equal(mg.dense_mask(c, 1, 1, L_Q, L_K), expect)


def test_buffer_values_are_arguments_not_constants():
    doc = DOC.clone()
    mod = lambda b, h, q, kv: doc[q] == doc[kv]  # noqa: E731
    c = mg.trace_mask_mod(mod)
    assert mg.trace_mask_mod(mod) is c  # cached on the function and its tensors
    before = mg.dense_mask(c, 1, 1, L_Q, L_K)
    doc.copy_(torch.arange(L_K))  # in place: the compiled mod reads the new values
    after = mg.dense_mask(c, 1, 1, L_Q, L_K)
    assert torch.equal(after, torch_grid(mod, 1, 1, L_Q, L_K)) and not torch.equal(before, after)
    # Same shapes and dtypes, other values: same key, so the same compiled code.
    other = DOC.flip(0).contiguous()
    c2 = mg.trace_mask_mod(lambda b, h, q, kv: other[q] == other[kv])
    assert c2.key == c.key and mg.cpu_tile_fns(c2, torch.float32) == mg.cpu_tile_fns(c, torch.float32)
    # A new shape is a new key.
    longer = torch.arange(L_K + 1)
    assert mg.trace_mask_mod(lambda b, h, q, kv: longer[q] == longer[kv]).key != c.key


def test_closure_over_a_new_tensor_is_retraced():
    def make(t):
        return lambda s, b, h, q, kv: s + t[h]

    t = torch.zeros(3)
    holder = {"t": t}
    mod = lambda s, b, h, q, kv: s + holder["t"][h]  # noqa: E731
    c1 = mg.trace_score_mod(mod)
    holder["t"] = torch.ones(3)
    c2 = mg.trace_score_mod(mod)
    assert c2 is not c1 and c2.buffers[0][0] == 1 and c1.buffers[0][0] == 0
    assert mg.trace_score_mod(make(t)).key == c1.key


def test_copied_buffers_follow_in_place_updates():
    # bfloat16 buffers are widened (copied) for the kernels: an in-place change of the
    # original must re-trace rather than leave a stale copy.
    t = torch.zeros(3, dtype=torch.bfloat16)
    mod = lambda s, b, h, q, kv: s + t[h]  # noqa: E731
    c1 = mg.trace_score_mod(mod)
    t.add_(1)
    c2 = mg.trace_score_mod(mod)
    assert c2 is not c1 and float(c2.buffers[0][0]) == 1.0 and c2.key == c1.key


def test_buffers_requiring_grad_are_recorded():
    w = torch.randn(3, requires_grad=True)
    c = mg.trace_score_mod(lambda s, b, h, q, kv: s * SLOPES[h] + w[h])
    assert c.requires_grad and c.requires_grad_buffers == (1,)
    assert not any(b.requires_grad for b in c.buffers)
    assert not mg.trace_score_mod(SCORES["alibi"]).requires_grad


def test_float64_tile_follows_the_score_dtype():
    # torch: float32 constants and buffers promote to float64 with a float64 score,
    # and an explicit cast to float32 stays float32. 0.1 is not a float32.
    mod = lambda s, b, h, q, kv: s * 0.1 + s.double().float() * 0.1 + CAP  # noqa: E731
    c = mg.trace_score_mod(mod)
    S = torch.full((1, 1, 2, 2), 1.0 / 3.0, dtype=torch.float64)
    out = run_tiles(c, S.numpy(), torch.float64, True, tile=(2, 2))
    ref, _ = torch_score_and_grad(mod, S)
    np.testing.assert_array_equal(out, ref.numpy())


def test_comparisons_follow_the_score_dtype():
    # s > c with a float32 buffer c compares in float64 for a float64 score:
    # 0.100000002 > float32(0.1) = 0.10000000149..., though float32(0.100000002)
    # equals float32(0.1).
    c32 = torch.tensor(0.1)
    mod = lambda s, b, h, q, kv: torch.where(s > c32, s * 2, s - 1)  # noqa: E731
    c = mg.trace_score_mod(mod)
    S = torch.tensor([0.100000002, 0.1000000001, 0.2, 0.0], dtype=torch.float64).view(1, 1, 2, 2)
    ref, g = torch_score_and_grad(mod, S)
    out, gout = run_tiles(c, S.numpy(), torch.float64, True, grad=True, tile=(2, 2))
    np.testing.assert_array_equal(out, ref.numpy())
    np.testing.assert_array_equal(gout, g.numpy())


def test_derivatives_at_kinks_follow_torch():
    # Bounds of clamp, zero of abs / relu, ties of maximum / minimum: torch's choices.
    mod = lambda s, b, h, q, kv: (  # noqa: E731
        torch.clamp(s, -1.0, 1.5) + s.clamp(min=0.25) + torch.clamp_max(s, 0.5) + s.abs()
        + torch.relu(s) + torch.maximum(s, torch.zeros_like(s)) + torch.minimum(s, (q - kv) * 0.5)
        + torch.where(s > 0, s, 2 * s) + torch.clamp(s, min=SLOPES[h] * 2)
    )
    c = mg.trace_score_mod(mod)
    vals = torch.tensor([-2.0, -1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    i = torch.arange(10)
    S = vals[(i.view(-1, 1) + i.view(1, -1)) % 10].expand(1, 3, 10, 10).contiguous()
    for dtype in (torch.float64, torch.float32):
        ref, g = torch_score_and_grad(mod, S.to(dtype))
        for q_major in (True, False):
            out, gout = run_tiles(c, S.to(dtype).numpy(), dtype, q_major, grad=True, tile=(4, 6))
            np.testing.assert_array_equal(gout, g.numpy())
            np.testing.assert_allclose(out, ref.numpy(), rtol=1e-6, atol=1e-6)


def test_generated_source_runs_as_plain_python():
    # The GPU side compiles element_function_source with numba.cuda; the CUDA
    # simulator runs it as Python, as here.
    for mod in (SCORES["bias_table"], SCORES["softcap"], SCORES["division_remainder"]):
        c = mg.trace_score_mod(mod)
        ns = {}
        exec(mg.element_function_source(c, torch.float64), ns)
        S = _scores(4, (1, 3, L_Q, L_K))
        ref, g = torch_score_and_grad(mod, S)
        bufs = mg.buffer_arrays(c)
        for h in range(3):
            for q in range(0, L_Q, 3):
                for kv in range(0, L_K, 4):
                    s = float(S[0, h, q, kv])
                    v = ns[c.fn_name](s, 0, h, q, kv, *bufs)
                    v2, d = ns[c.grad_fn_name](s, 0, h, q, kv, *bufs)
                    assert math.isclose(float(v), float(ref[0, h, q, kv]), rel_tol=1e-9, abs_tol=1e-9)
                    assert math.isclose(float(d), float(g[0, h, q, kv]), rel_tol=1e-9, abs_tol=1e-9)
    c = mg.trace_mask_mod(MASKS["document"])
    ns = {}
    exec(mg.element_function_source(c), ns)
    ref = torch_grid(MASKS["document"], 1, 1, L_Q, L_K)
    got = [[bool(ns["mask_elem"](0, 0, q, kv, *mg.buffer_arrays(c))) for kv in range(L_K)]
           for q in range(L_Q)]
    assert torch.equal(torch.tensor(got), ref[0, 0])


def test_element_source_uses_no_numba_cuda_and_only_scalar_code():
    src = mg.element_function_source(mg.trace_score_mod(SCORES["gates"]))
    assert "cuda" not in src and "numpy" not in src and "np." not in src
    assert "import math" in src


# --------------------------------------------------------------------- errors --
def test_wrong_number_of_arguments():
    with pytest.raises(TypeError, match="4 positional arguments, got 5.*score_mod"):
        mg.trace_mask_mod(lambda s, b, h, q, kv: s)
    with pytest.raises(TypeError, match="5 positional arguments, got 4.*mask_mod"):
        mg.trace_score_mod(lambda b, h, q, kv: q >= kv)
    with pytest.raises(TypeError, match="got 3"):
        mg.trace_mask_mod(lambda b, q, kv: q >= kv)
    # defaults do not count, as in FlexAttention
    assert mg.trace_mask_mod(lambda b, h, q, kv, w=3: q - kv <= w).source


def test_untranslatable_op_is_named():
    with pytest.raises(NotImplementedError, match=r"aten\.sort.*precompute"):
        mg.trace_mask_mod(lambda b, h, q, kv: torch.sort(DOC)[0][q] > kv)
    with pytest.raises(NotImplementedError, match="whole captured tensor"):
        mg.trace_score_mod(lambda s, b, h, q, kv: s + (BIAS * 2)[h, q])
    with pytest.raises(NotImplementedError, match="slicing"):
        mg.trace_score_mod(lambda s, b, h, q, kv: s + BIAS[:, q][h])


def test_data_dependent_python_control_flow_is_rejected():
    def branchy(b, h, q, kv):
        if q > kv:
            return q > 0
        return kv < 3

    with pytest.raises(TypeError, match=r"value.*torch\.where"):
        mg.trace_mask_mod(branchy)
    with pytest.raises(TypeError, match=r"float\(t\)"):
        mg.trace_score_mod(lambda s, b, h, q, kv: s * float(q))


def test_mask_must_return_bool():
    with pytest.raises(TypeError, match="bool tensor"):
        mg.trace_mask_mod(lambda b, h, q, kv: q - kv)


def test_supported_ops_lists_the_common_ones():
    ops = set(mg.supported_ops())
    assert {"add", "where", "index", "tanh", "clamp", "_to_copy", "remainder", "bitwise_and",
            "logical_not", "lift_fresh_copy", "scalar_tensor", "ones_like"} <= ops
