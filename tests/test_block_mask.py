"""attn's BlockMask / create_block_mask / create_mask and the mods library.

Every expectation comes from PyTorch (``torch.nn.attention.flex_attention``, run on the
CPU) or from a dense definition written out here, never from attn's own output.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as tflex

import attn._block_mask as abm
from attn import mods
from attn._block_mask import (
    BlockMask,
    and_masks,
    create_block_mask,
    create_mask,
    noop_mask,
    or_masks,
)

FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


def torch_block_mask(mod, B, H, Lq, Lk, BLOCK_SIZE=128, **kw):
    return tflex.create_block_mask(mod, B, H, Lq, Lk, device="cpu", BLOCK_SIZE=BLOCK_SIZE, **kw)


def assert_same_lists(ours, theirs):
    """Every block list equal to torch's, including the padding order past each count
    (torch lists the visited blocks ascending, then the rest ascending)."""
    for name in FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.int32 and a.is_contiguous(), name
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.equal(a, b), name
    assert tuple(ours.BLOCK_SIZE) == tuple(theirs.BLOCK_SIZE)
    assert tuple(ours.seq_lengths) == tuple(theirs.seq_lengths)
    assert ours.shape == theirs.shape


def random_mask_mod(B, H, Lq, Lk, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(B, H, Lq, Lk, generator=g) < p

    def random_mask(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx, kv_idx]

    return random_mask, dense


def block_structured_mod(B, H, Lq, Lk, BQ, BKV, seed=0):
    """Random blocks that are all-True, all-False or mixed, so full blocks occur too."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-Lq // BQ), -(-Lk // BKV)
    kind = torch.randint(0, 3, (B, H, nqb, nkb), generator=g)
    noise = torch.rand(B, H, nqb * BQ, nkb * BKV, generator=g) < 0.5
    expand = kind.repeat_interleave(BQ, 2).repeat_interleave(BKV, 3)
    dense = torch.where(expand == 0, False, torch.where(expand == 1, True, noise))[
        :, :, :Lq, :Lk
    ].contiguous()

    def block_random(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx, kv_idx]

    return block_random, dense


# ----------------------------------------------------------------------------- mods: dense definitions


def dense_of(fn, B, H, Lq, Lk):
    """Loop-free dense evaluation written independently of attn: the definitions below."""
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(Lq).view(1, 1, Lq, 1)
    k = torch.arange(Lk).view(1, 1, 1, Lk)
    return fn(b, h, q, k).expand(B, H, Lq, Lk)


LIB_MASKS = [
    ("causal", lambda Lq, Lk, B: mods.causal_mask, lambda b, h, q, k: q >= k),
    (
        "causal_lower_right",
        lambda Lq, Lk, B: mods.causal_lower_right(Lq, Lk),
        lambda Lq, Lk: (lambda b, h, q, k: k - q <= Lk - Lq),
    ),
    (
        "sliding_window",
        lambda Lq, Lk, B: mods.sliding_window(5),
        lambda b, h, q, k: (q >= k) & (q - k <= 5),
    ),
    (
        "sliding_window_bidirectional",
        lambda Lq, Lk, B: mods.sliding_window(9, causal=False),
        lambda b, h, q, k: (q - k).abs() <= 9,
    ),
    ("prefix_lm", lambda Lq, Lk, B: mods.prefix_lm(11), lambda b, h, q, k: (k < 11) | (k <= q)),
    (
        "prefix_lm_tensor",
        lambda Lq, Lk, B: mods.prefix_lm(torch.tensor([3, 20, 0, 7][:B])),
        lambda b, h, q, k: (k < torch.tensor([3, 20, 0, 7])[b]) | (k <= q),
    ),
]


def _expected_dense(defn, Lq, Lk, B, H):
    fn = defn(Lq, Lk) if defn.__code__.co_argcount == 2 else defn
    return dense_of(fn, B, H, Lq, Lk)


def _doc_dense(offsets, L, causal):
    ids = torch.full((L,), -1)
    for d in range(len(offsets) - 1):
        ids[offsets[d] : offsets[d + 1]] = d
    m = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    if causal:
        m &= torch.ones(L, L, dtype=torch.bool).tril()
    return m


# ----------------------------------------------------------------------------- create_block_mask vs torch


SHAPES = [
    # B, H, Lq, Lk, BLOCK_SIZE
    (None, None, 97, 97, 16),
    (2, 3, 130, 61, (32, 16)),
    (1, 2, 17, 1025, (8, 128)),
    (3, 1, 256, 256, 64),
    (2, None, 1, 40, (16, 8)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", [m[0] for m in LIB_MASKS] + ["document", "document_causal"])
def test_library_masks_match_torch(name, shape):
    B, H, Lq, Lk, BS = shape
    if name.startswith("document"):
        L = max(Lq, Lk)
        mod = mods.document_mask(
            torch.tensor([0, L // 3, L // 3 + 1, L]), causal=name.endswith("causal")
        )
    else:
        mod = dict((n, f) for n, f, _ in LIB_MASKS)[name](Lq, Lk, B or 1)
    ours = create_block_mask(mod, B, H, Lq, Lk, device="cpu", BLOCK_SIZE=BS)
    assert_same_lists(ours, torch_block_mask(mod, B, H, Lq, Lk, BS))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "block_structured"])
def test_random_masks_match_torch(shape, kind):
    B, H, Lq, Lk, BS = shape
    Bn, Hn = B or 1, H or 1
    BQ, BKV = (BS, BS) if isinstance(BS, int) else BS
    for seed in range(3):
        if kind == "random":
            mod, _ = random_mask_mod(Bn, Hn, Lq, Lk, p=(0.02, 0.3, 0.97)[seed], seed=seed)
        else:
            mod, _ = block_structured_mod(Bn, Hn, Lq, Lk, BQ, BKV, seed=seed)
        ours = create_block_mask(mod, B, H, Lq, Lk, device="cpu", BLOCK_SIZE=BS)
        assert_same_lists(ours, torch_block_mask(mod, B, H, Lq, Lk, BS))


def test_block_structured_masks_have_full_and_empty_blocks():
    # Guards the test above: the generator must produce all three block kinds.
    mod, _ = block_structured_mod(2, 2, 128, 128, 16, 16)
    t = torch_block_mask(mod, 2, 2, 128, 128, 16)
    assert t.full_kv_num_blocks.sum() > 0 and t.kv_num_blocks.sum() > 0 and t.to_dense().eq(0).any()


def test_separate_full_blocks_false_matches_torch():
    mod = mods.sliding_window(20)
    ours = create_block_mask(
        mod, 1, 2, 100, 90, device="cpu", BLOCK_SIZE=16, separate_full_blocks=False
    )
    assert_same_lists(ours, torch_block_mask(mod, 1, 2, 100, 90, 16, separate_full_blocks=False))


@pytest.mark.parametrize("budget", [7, 300, 5000])
def test_chunked_evaluation_matches_torch(monkeypatch, budget):
    # A tiny element budget forces every tiling path: tiles inside one block, several
    # blocks per tile, and (b, h) chunks.
    monkeypatch.setattr(abm, "_EVAL_BUDGET", budget)
    mod, _ = block_structured_mod(3, 2, 70, 45, 16, 8, seed=4)
    ours = create_block_mask(mod, 3, 2, 70, 45, device="cpu", BLOCK_SIZE=(16, 8))
    assert_same_lists(ours, torch_block_mask(mod, 3, 2, 70, 45, (16, 8)))
    causal = create_block_mask(mods.causal_mask, 2, 2, 70, 45, device="cpu", BLOCK_SIZE=(16, 8))
    assert_same_lists(causal, torch_block_mask(mods.causal_mask, 2, 2, 70, 45, (16, 8)))


def test_seam_keeps_torch_edge_rule(monkeypatch):
    # An evaluator plugged in at _block_classes may look at in-range elements only and
    # call a ragged edge block full; create_block_mask must still give torch's lists
    # (torch pads with False, so such a block is partial).
    def in_range_only(mask_mod, B, H, Lq, Lk, BQ, BKV, device):
        dense = tflex.create_mask(mask_mod, B, H, Lq, Lk, device="cpu")
        nqb, nkb = -(-Lq // BQ), -(-Lk // BKV)
        full = torch.zeros(B, H, nqb, nkb, dtype=torch.bool)
        part = torch.zeros_like(full)
        for i, j in itertools.product(range(nqb), range(nkb)):
            tile = dense[:, :, i * BQ : (i + 1) * BQ, j * BKV : (j + 1) * BKV]
            full[:, :, i, j] = tile.flatten(2).all(-1)
            part[:, :, i, j] = tile.flatten(2).any(-1) & ~full[:, :, i, j]
        return full, part

    monkeypatch.setattr(abm, "_block_classes_torch", in_range_only)
    for Lq, Lk in [(70, 45), (64, 48)]:
        ours = create_block_mask(mods.causal_mask, 1, 2, Lq, Lk, device="cpu", BLOCK_SIZE=(16, 8))
        assert_same_lists(ours, torch_block_mask(mods.causal_mask, 1, 2, Lq, Lk, (16, 8)))


def test_mods_that_need_vmap_match_torch():
    # Chained indexing is right for scalar indices (torch's vmap) but indexes other axes
    # under broadcasting; attn must notice and fall back to vmap.
    _, dense = random_mask_mod(2, 2, 50, 40)

    def chained(b, h, q_idx, kv_idx):
        return dense[b][h][q_idx][kv_idx]

    ours = create_block_mask(chained, 2, 2, 50, 40, device="cpu", BLOCK_SIZE=8)
    assert_same_lists(ours, torch_block_mask(chained, 2, 2, 50, 40, 8))
    assert torch.equal(create_mask(chained, 2, 2, 50, 40, device="cpu"), dense)


def test_head_and_batch_dependent_mods_match_torch():
    def per_head(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 4 * h + b

    ours = create_block_mask(per_head, 2, 4, 64, 64, device="cpu", BLOCK_SIZE=8)
    assert_same_lists(ours, torch_block_mask(per_head, 2, 4, 64, 64, 8))


def test_default_block_size_and_device_match_torch():
    ours = create_block_mask(mods.causal_mask, None, None, 300, 300, device="cpu")
    assert_same_lists(
        ours, tflex.create_block_mask(mods.causal_mask, None, None, 300, 300, device="cpu")
    )
    assert ours.BLOCK_SIZE == (128, 128)
    expected = torch.accelerator.current_accelerator() or torch.device("cpu")
    assert create_block_mask(mods.causal_mask, 1, 1, 8, 8).kv_indices.device.type == expected.type


def test_compile_flag_is_accepted():
    with pytest.warns(DeprecationWarning):
        ours = create_block_mask(
            mods.causal_mask, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16, _compile=True
        )
    assert_same_lists(ours, torch_block_mask(mods.causal_mask, 1, 1, 64, 64, 16))


# ----------------------------------------------------------------------------- BlockMask methods vs torch


@pytest.fixture
def mask_pair():
    mod, _ = block_structured_mod(2, 3, 90, 70, 16, 8, seed=1)
    return (
        create_block_mask(mod, 2, 3, 90, 70, device="cpu", BLOCK_SIZE=(16, 8)),
        torch_block_mask(mod, 2, 3, 90, 70, (16, 8)),
        mod,
    )


def test_to_dense_sparsity_numel_shape_repr(mask_pair):
    ours, theirs, _ = mask_pair
    assert ours.to_dense().dtype == torch.int32
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert ours.sparsity() == pytest.approx(theirs.sparsity(), abs=1e-12)
    assert ours.numel() == theirs.numel() and ours.shape == theirs.shape
    assert repr(ours) == repr(theirs)
    assert str(ours) == str(theirs)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"grid_size": 4}, {"grid_size": (3, 7)}, {"grid_size": -1}, {"limit": 2}, {"limit": 10}],
)
def test_to_string_matches_torch(mask_pair, kwargs):
    ours, theirs, _ = mask_pair
    assert ours.to_string(**kwargs) == theirs.to_string(**kwargs)


def test_to_string_picture():
    ours = create_block_mask(mods.causal_mask, 1, 1, 4, 4, device="cpu", BLOCK_SIZE=1)
    assert ours.to_string() == "(0, 0)\n██      \n████    \n██████  \n████████\n"


def test_no_full_blocks_means_all_partial():
    ours = create_block_mask(
        mods.causal_mask, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16, separate_full_blocks=False
    )
    assert ours.full_kv_num_blocks is None and ours.full_q_indices is None
    assert torch.equal(ours.to_dense()[0, 0], torch.ones(4, 4, dtype=torch.int32).tril())
    assert ours.sparsity() == pytest.approx(100 * 6 / 16)


INDICES = [
    0,
    -1,
    (1,),
    (0, 2),
    (slice(0, 2), 1),
    (1, slice(1, 3)),
    (slice(None), torch.tensor([2, 0])),
    (0, 1, torch.tensor([3, 1])),
    (slice(None), slice(None), slice(1, 4)),
]


@pytest.mark.parametrize("index", INDICES, ids=str)
def test_indexing_matches_torch(mask_pair, index):
    ours, theirs, base_mod = mask_pair
    a, t = ours[index], theirs[index]
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(t, name)), name
    assert a.BLOCK_SIZE == t.BLOCK_SIZE
    # The sliced mask's mask_mod reads the selected entries: compare with torch's dense
    # mask of the base mod, indexed the same way.
    dense = tflex.create_mask(base_mod, 2, 3, 90, 70, device="cpu")
    idx = index if isinstance(index, tuple) else (index,)
    for dim, i in enumerate(idx[:2]):
        if isinstance(i, int):
            i = slice(i, i + 1) if i >= 0 else slice(dense.shape[dim] + i, dense.shape[dim] + i + 1)
        dense = dense[(slice(None),) * dim + (i,)]
    if len(idx) < 3:
        Bs, Hs = a.kv_num_blocks.shape[:2]
        assert torch.equal(tflex.create_mask(a.mask_mod, Bs, Hs, 90, 70, device="cpu"), dense)
    else:
        rows = torch.arange(6)[idx[2]]
        q_pos = (rows[:, None] * 16 + torch.arange(16)).flatten()
        q_pos = q_pos[q_pos < 90]
        Bs, Hs = a.kv_num_blocks.shape[:2]
        got = tflex.create_mask(a.mask_mod, Bs, Hs, len(q_pos), 70, device="cpu")
        assert torch.equal(got, dense[:, :, q_pos])


def test_indexing_a_broadcast_dim(mask_pair):
    theirs = torch_block_mask(mods.causal_mask, None, 2, 64, 64, 16)
    ours = create_block_mask(mods.causal_mask, None, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
    # B was None (broadcast): any batch index selects the one stored entry.
    for name in FIELDS:
        assert torch.equal(getattr(ours[5, 1], name), getattr(theirs[0, 1], name)), name
    with pytest.raises(IndexError, match="head index 2 is out of range"):
        ours[0, 2]
    import numpy as np

    assert torch.equal(ours[np.int64(0), np.int64(1)].kv_indices, theirs[0, 1].kv_indices)


def test_to_device_and_as_tuple(mask_pair):
    ours, theirs, _ = mask_pair
    moved = ours.to("cpu")
    assert_same_lists(moved, theirs)
    tup, ttup = ours.as_tuple(), theirs.as_tuple()
    assert len(tup) == len(ttup)
    for x, y in zip(tup, ttup):
        if isinstance(y, torch.Tensor):
            assert torch.equal(x, y)
        elif not callable(y):
            assert x == y
    assert ours.as_tuple(flatten=False)[0] == theirs.as_tuple(flatten=False)[0]


def test_from_kv_blocks_round_trip(mask_pair):
    _, theirs, _ = mask_pair
    ours = BlockMask.from_kv_blocks(
        theirs.kv_num_blocks,
        theirs.kv_indices,
        theirs.full_kv_num_blocks,
        theirs.full_kv_indices,
        BLOCK_SIZE=(16, 8),
        seq_lengths=(90, 70),
    )
    assert_same_lists(ours, theirs)
    # Any order of the listed blocks describes the same mask; the transposes are derived.
    n = theirs.kv_num_blocks.long()
    perm = torch.argsort(torch.rand(theirs.kv_indices.shape), dim=-1)
    listed = torch.arange(theirs.kv_indices.shape[-1]) < n[..., None]
    shuffled = torch.where(listed, perm, perm + 1000).argsort(-1)
    kv_idx = theirs.kv_indices.gather(-1, shuffled).to(torch.int32)
    shuffled_mask = BlockMask.from_kv_blocks(
        theirs.kv_num_blocks,
        kv_idx,
        theirs.full_kv_num_blocks,
        theirs.full_kv_indices,
        BLOCK_SIZE=(16, 8),
        seq_lengths=(90, 70),
    )
    assert torch.equal(shuffled_mask.to_dense(), theirs.to_dense())
    assert torch.equal(shuffled_mask.q_indices, theirs.q_indices)


def test_from_kv_blocks_defaults_match_torch():
    kv_num = torch.tensor([[[1, 2, 0]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[1, 0, 2], [2, 0, 1], [0, 1, 2]]]], dtype=torch.int32)
    ours = BlockMask.from_kv_blocks(kv_num, kv_idx)
    theirs = tflex.BlockMask.from_kv_blocks(kv_num, kv_idx)
    assert_same_lists(ours, theirs)
    assert ours.mask_mod is noop_mask and ours.BLOCK_SIZE == (128, 128)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert repr(ours).replace("noop_mask", "") == repr(theirs).replace("noop_mask", "")


def test_as_block_mask_and_torch_flex_attention_accepts_ours():
    mod = mods.sliding_window(6)
    theirs = torch_block_mask(mod, 1, 2, 40, 40, 8)
    converted = abm.as_block_mask(theirs)
    assert_same_lists(converted, theirs)
    ours = create_block_mask(mod, 1, 2, 40, 40, device="cpu", BLOCK_SIZE=8)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_ours = tflex.flex_attention(q, k, v, block_mask=ours)
        out_theirs = tflex.flex_attention(q, k, v, block_mask=theirs)
    assert torch.equal(out_ours, out_theirs)


# ----------------------------------------------------------------------------- kernel_lists


def _lists_to_set(num, idx):
    out = set()
    for pos in itertools.product(*(range(s) for s in num.shape)):
        for e in idx[pos][: int(num[pos])].tolist():
            out.add(pos + (e,))
    return out


@pytest.mark.parametrize("BM", [64, 32, 16])
@pytest.mark.parametrize("lengths", [(200, 150), (64, 64), (1, 33)], ids=str)
def test_kernel_lists_against_dense(BM, lengths):
    Lq, Lk = lengths
    QB, KB = 64, 16
    mod, dense = block_structured_mod(2, 1, Lq, Lk, QB, KB, seed=2)
    theirs = torch_block_mask(mod, 2, 1, Lq, Lk, (QB, KB))
    ours = create_block_mask(mod, 2, 1, Lq, Lk, device="cpu", BLOCK_SIZE=(QB, KB))
    kl = ours.kernel_lists(BM, KB)
    n_qt, n_kb = -(-Lq // BM), -(-Lk // KB)
    assert kl.BLOCK_M == BM and kl.BLOCK_N == KB
    assert kl.kv_indices.shape == (2, 1, n_qt, n_kb) and kl.q_indices.shape == (2, 1, n_kb, n_qt)
    for t in kl[:8]:
        assert t.dtype == torch.int32 and t.is_contiguous()
    partial = _lists_to_set(kl.kv_num_blocks, kl.kv_indices)
    full = _lists_to_set(kl.full_kv_num_blocks, kl.full_kv_indices)
    # Against the element-level mask: every True element is in a listed tile, every
    # full tile is all True, and the tile classes are torch's block classes inherited.
    tp, tf = theirs.to_dense(), _lists_to_set(theirs.full_kv_num_blocks, theirs.full_kv_indices)
    for b, h, i, j in itertools.product(range(2), range(1), range(n_qt), range(n_kb)):
        tile = dense[b, h, i * BM : (i + 1) * BM, j * KB : (j + 1) * KB]
        key = (b, h, i, j)
        if tile.any():
            assert key in partial or key in full
        if key in full:
            assert tile.all() and tile.shape == (BM, KB)
        assert (key in partial or key in full) == bool(tp[b, h, i * BM // QB, j])
        assert (key in full) == ((b, h, i * BM // QB, j) in tf)
    assert not partial & full
    # Transposes: the same (tile, block) pairs seen from the kv side.
    qp = {(b, h, i, j) for b, h, j, i in _lists_to_set(kl.q_num_blocks, kl.q_indices)}
    qf = {(b, h, i, j) for b, h, j, i in _lists_to_set(kl.full_q_num_blocks, kl.full_q_indices)}
    assert qp == partial and qf == full
    for idx in (kl.kv_indices, kl.full_kv_indices):
        assert ((idx >= 0) & (idx < n_kb)).all()


def test_kernel_lists_drop_blocks_past_seq_lengths():
    # A mask built for 256 x 256, declared for 100 x 70: tiles and blocks wholly past
    # the lengths disappear; the rest keeps its lists (and their order).
    theirs = torch_block_mask(lambda b, h, q, k: (q + k) % 3 == 0, 1, 1, 256, 256, 32)
    ours = BlockMask.from_kv_blocks(
        theirs.kv_num_blocks,
        theirs.kv_indices.flip(-1).contiguous(),
        BLOCK_SIZE=32,
        seq_lengths=(100, 70),
    )
    dense = theirs.to_dense()[0, 0]
    kl = ours.kernel_lists(16, 32)
    assert kl.kv_num_blocks.shape == (1, 1, 7) and kl.q_num_blocks.shape == (1, 1, 3)
    for i in range(7):
        n = int(kl.kv_num_blocks[0, 0, i])
        expected = [j for j in range(3) if dense[i // 2, j]]
        got = kl.kv_indices[0, 0, i, :n].tolist()
        assert got == expected[::-1]  # flipped input order preserved
        assert kl.full_kv_num_blocks[0, 0, i] == 0
    for j in range(3):
        n = int(kl.q_num_blocks[0, 0, j])
        assert kl.q_indices[0, 0, j, :n].tolist() == [i for i in range(7) if dense[i // 2, j]]


def test_kernel_lists_errors():
    ours = create_block_mask(mods.causal_mask, 1, 1, 128, 128, device="cpu", BLOCK_SIZE=(64, 32))
    with pytest.raises(ValueError, match=r"BN \(64\) must divide .*BLOCK_SIZE\[1\] \(32\)"):
        ours.kernel_lists(32, 64)
    with pytest.raises(ValueError, match=r"BM \(48\) must divide .*BLOCK_SIZE\[0\] \(64\)"):
        ours.kernel_lists(48, 32)
    with pytest.raises(ValueError, match="BM must be a positive int"):
        ours.kernel_lists(0, 32)


# ----------------------------------------------------------------------------- create_mask, and/or


@pytest.mark.parametrize("B,H", [(None, None), (2, 3)])
def test_create_mask_matches_torch(B, H):
    mod, _ = random_mask_mod(B or 1, H or 1, 19, 23)
    for fn in (mods.causal_mask, mods.sliding_window(4, causal=False), mod, noop_mask):
        assert torch.equal(
            create_mask(fn, B, H, 19, 23, device="cpu"),
            tflex.create_mask(fn, B, H, 19, 23, device="cpu"),
        )


def test_create_mask_of_score_mods_matches_torch():
    def masking_score(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    for fn in (masking_score, mods.alibi(3), mods.tanh_softcap(5.0)):
        ours = create_mask(fn, 2, 3, 11, 13, device="cpu")
        theirs = tflex.create_mask(fn, 2, 3, 11, 13, device="cpu")
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_and_or_masks_match_torch():
    a, b = mods.sliding_window(3, causal=False), mods.prefix_lm(4)
    cases = [
        ((a, b), and_masks, tflex.and_masks),
        ((a, b), or_masks, tflex.or_masks),
        ((), and_masks, tflex.and_masks),
        ((), or_masks, tflex.or_masks),
    ]
    for args, ours_fn, torch_fn in cases:
        ours = create_mask(ours_fn(*args), 2, 1, 17, 15, device="cpu")
        theirs = tflex.create_mask(torch_fn(*args), 2, 1, 17, 15, device="cpu")
        assert torch.equal(ours, theirs)
        assert_same_lists(
            create_block_mask(ours_fn(*args), 2, 1, 17, 15, device="cpu", BLOCK_SIZE=4),
            torch_block_mask(torch_fn(*args), 2, 1, 17, 15, 4),
        )
    assert create_mask(and_masks(), 1, 1, 3, 3, device="cpu").all()
    assert not create_mask(or_masks(), 1, 1, 3, 3, device="cpu").any()
    assert and_masks(a, b).__name__.isidentifier()


# ----------------------------------------------------------------------------- the mods library


@pytest.mark.parametrize("Lq,Lk", [(37, 37), (20, 45), (45, 20)])
@pytest.mark.parametrize("name", [m[0] for m in LIB_MASKS])
def test_library_masks_match_dense_definitions(name, Lq, Lk):
    make, defn = {n: (f, d) for n, f, d in LIB_MASKS}[name]
    mod = make(Lq, Lk, 2)
    expected = _expected_dense(defn, Lq, Lk, 2, 1)
    assert torch.equal(create_mask(mod, 2, 1, Lq, Lk, device="cpu"), expected)
    assert torch.equal(tflex.create_mask(mod, 2, 1, Lq, Lk, device="cpu"), expected)
    assert mod.__name__.isidentifier() and mod.__name__ != "mask_mod"


@pytest.mark.filterwarnings("ignore:Lower right causal bias")
def test_causal_lower_right_matches_torch_bias():
    from torch.nn.attention.bias import causal_lower_right as torch_clr

    for Lq, Lk in [(3, 5), (5, 3), (4, 4)]:
        expected = torch_clr(Lq, Lk)._materialize(device="cpu")
        got = create_mask(mods.causal_lower_right(Lq, Lk), 1, 1, Lq, Lk, device="cpu")[0, 0]
        assert torch.equal(got, expected)


@pytest.mark.parametrize("causal", [False, True])
def test_document_mask_matches_dense(causal):
    offsets = [0, 5, 5, 12, 30]
    mod = mods.document_mask(torch.tensor(offsets), causal=causal)
    assert torch.equal(
        create_mask(mod, 1, 1, 30, 30, device="cpu")[0, 0], _doc_dense(offsets, 30, causal)
    )
    padded = mods.document_mask(torch.tensor([2, 9, 20]), causal=causal, length=32)
    expected = _doc_dense([2, 9, 20], 32, causal)
    assert torch.equal(tflex.create_mask(padded, 1, 1, 32, 32, device="cpu")[0, 0], expected)
    assert not expected[:2].any() and not expected[20:].any()


def test_score_mods_match_dense_definitions():
    H, Lq, Lk = 4, 9, 13
    q = torch.arange(Lq).view(Lq, 1).double()
    k = torch.arange(Lk).view(1, Lk).double()
    score = torch.randn(2, H, Lq, Lk, dtype=torch.float64) * 10
    b = torch.arange(2).view(2, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    qi, ki = torch.arange(Lq).view(1, 1, Lq, 1), torch.arange(Lk).view(1, 1, 1, Lk)

    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)])
    assert torch.equal(mods.alibi_slopes(H), slopes.float())
    s64 = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    got = mods.alibi(s64)(score, b, h, qi, ki)
    assert torch.allclose(got, score + s64.view(1, H, 1, 1) * (k - q), rtol=0, atol=1e-12)

    got = mods.tanh_softcap(7.5)(score, b, h, qi, ki)
    assert torch.allclose(got, 7.5 * torch.tanh(score / 7.5), rtol=0, atol=1e-12)

    bias = torch.randn(H, Lq + Lk - 1, dtype=torch.float64)
    got = mods.relative_position_bias(bias, kv_len=Lk)(score, b, h, qi, ki)
    expected = score.clone()
    for hh, i, j in itertools.product(range(H), range(Lq), range(Lk)):
        expected[:, hh, i, j] += bias[hh, (i - j) + (Lk - 1)]
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def _dense_attention(q, k, v, score_fn=None, mask=None):
    """float64 softmax attention written out: rows with no visible key give 0."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if score_fn is not None:
        s = score_fn(s)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mods_in_torch_flex_attention_float64():
    B, H, Lq, Lk, D = 2, 4, 21, 17, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in (Lq, Lk, Lk))
    i = torch.arange(Lq).view(Lq, 1)
    j = torch.arange(Lk).view(1, Lk)
    s64 = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    bias = torch.randn(H, Lq + Lk - 1, dtype=torch.float64, generator=g)
    cases = [
        (mods.alibi(s64), lambda s: s + s64.view(H, 1, 1) * (j - i), None),
        (mods.tanh_softcap(0.7), lambda s: 0.7 * torch.tanh(s / 0.7), None),
        (mods.relative_position_bias(bias, kv_len=Lk), lambda s: s + bias[:, i - j + Lk - 1], None),
        (None, None, (mods.causal_lower_right(Lq, Lk), j <= i + (Lk - Lq))),
        (None, None, (mods.sliding_window(3), (i >= j) & (i - j <= 3))),
        (
            mods.alibi(s64),
            lambda s: s + s64.view(H, 1, 1) * (j - i),
            (mods.prefix_lm(5), (j < 5) | (j <= i)),
        ),
    ]
    for score_mod, score_fn, masking in cases:
        mask_mod, dense_mask = masking if masking else (None, None)
        expected = _dense_attention(q, k, v, score_fn, dense_mask)
        kw = {}
        if mask_mod is not None:
            kw["block_mask"] = create_block_mask(mask_mod, B, H, Lq, Lk, device="cpu", BLOCK_SIZE=8)
        out = tflex.flex_attention(q, k, v, score_mod=score_mod, **kw)
        assert torch.allclose(out, expected, rtol=0, atol=1e-12), (score_mod, mask_mod)


# ----------------------------------------------------------------------------- errors


def test_mod_arity_errors():
    def three(b, h, q):
        return q >= 0

    with pytest.raises(TypeError, match="Expected 4 or 5 positional args, got 3"):
        create_block_mask(three, 1, 1, 8, 8, device="cpu")
    with pytest.raises(AssertionError, match="Expected 4 or 5 positional args, got 3"):
        create_mask(three, 1, 1, 8, 8, device="cpu")
    with pytest.raises(TypeError, match="create_block_mask requires a mask_mod .* score_mod"):
        create_block_mask(mods.tanh_softcap(1.0), 1, 1, 8, 8, device="cpu")
    with pytest.raises(TypeError, match="every argument must be a callable"):
        and_masks(mods.causal_mask, 3)
    with pytest.raises(RuntimeError, match="every argument must be a callable"):
        or_masks(None)


def test_mask_mod_result_errors():
    with pytest.raises(TypeError, match="must return a bool tensor, got torch.int64"):
        create_block_mask(lambda b, h, q, k: q - k, 1, 1, 8, 8, device="cpu")

    def data_dependent(b, h, q, k):
        return q >= k if q.item() > 2 else q < k

    with pytest.raises(RuntimeError, match="could not evaluate 'data_dependent'"):
        create_block_mask(data_dependent, 1, 1, 8, 8, device="cpu")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"Q_LEN": 0}, ValueError, "Q_LEN must be a positive int, got 0"),
        ({"KV_LEN": -3}, ValueError, "KV_LEN must be a positive int, got -3"),
        ({"B": 0}, ValueError, "B must be a positive int"),
        ({"BLOCK_SIZE": 0}, ValueError, "BLOCK_SIZE must be positive"),
        ({"BLOCK_SIZE": (16, -1)}, ValueError, "BLOCK_SIZE must be positive"),
        ({"BLOCK_SIZE": (16, 16, 16)}, TypeError, "BLOCK_SIZE must be a positive int or a"),
        ({"compute_dq_write_order": True}, NotImplementedError, "compute_dq_write_order"),
    ],
)
def test_create_block_mask_argument_errors(kwargs, error, match):
    args = {"B": 1, "H": 1, "Q_LEN": 16, "KV_LEN": 16, "device": "cpu"} | kwargs
    with pytest.raises(error, match=match):
        create_block_mask(mods.causal_mask, **args)


def _lists():
    num = torch.tensor([[[1, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32)
    return num, idx


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (
            lambda n, i: (n.long(), i),
            TypeError,
            "kv_num_blocks must have dtype torch.int32, got torch.int64",
        ),
        (
            lambda n, i: (n, i.float()),
            TypeError,
            "kv_indices must have dtype torch.int32, got torch.float32",
        ),
        (lambda n, i: (n, i[0, 0, 0]), ValueError, "kv_indices must have 2 to 4 dims"),
        (
            lambda n, i: (n[..., :1], i),
            ValueError,
            r"kv_num_blocks must have shape kv_indices.shape\[:-1\]",
        ),
        (lambda n, i: (n + 1, i), ValueError, r"kv_num_blocks\[0, 0, 1\] = 3 is outside \[0, 2\]"),
        (
            lambda n, i: (n, i.masked_fill(i == 1, 5)),
            ValueError,
            r"kv_indices\[0, 0, 1, 0\] = 5 is out of range \[0, 2\)",
        ),
        (lambda n, i: (n, torch.zeros_like(i)), ValueError, "lists a block twice"),
    ],
)
def test_from_kv_blocks_errors(mutate, error, match):
    num, idx = mutate(*_lists())
    with pytest.raises(error, match=match):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=8)


def test_from_kv_blocks_consistency_errors():
    num, idx = _lists()
    with pytest.raises(ValueError, match="listed as both partial and full"):
        BlockMask.from_kv_blocks(num, idx, num, idx, BLOCK_SIZE=8)
    with pytest.raises(ValueError, match="both given or both None"):
        BlockMask.from_kv_blocks(num, idx, num, None)
    with pytest.raises(ValueError, match=r"needs 3 q blocks .* covers 2 x 2"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=8, seq_lengths=(17, 16))
    with pytest.raises(ValueError, match="BLOCK_SIZE must be positive"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(8, 0))
    # Lists with fewer dims get broadcast batch/head dims, as a convenience.
    assert BlockMask.from_kv_blocks(num[0, 0], idx[0, 0], BLOCK_SIZE=8).kv_indices.shape == (
        1,
        1,
        2,
        2,
    )


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: mods.sliding_window(-1), "window must be a non-negative int"),
        (lambda: mods.causal_lower_right(0, 4), "Lq must be positive"),
        (
            lambda: mods.prefix_lm(torch.tensor([1.5])),
            "prefix_length must be an int or a 1-D integer",
        ),
        (lambda: mods.document_mask(torch.tensor([0, 5, 3])), "offsets must be non-decreasing"),
        (
            lambda: mods.document_mask(torch.tensor([[0, 5]])),
            "offsets must be a 1-D integer tensor",
        ),
        (lambda: mods.alibi(torch.ones(2, 2)), "slopes must be a 1-D float tensor"),
        (lambda: mods.tanh_softcap(0), "cap must be a positive finite number"),
        (lambda: mods.relative_position_bias(torch.zeros(2, 6)), "pass kv_len"),
        (
            lambda: mods.relative_position_bias(torch.zeros(2, 6), kv_len=7),
            r"kv_len must be in \[1, ",
        ),
    ],
)
def test_mod_factory_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("BM,BN", [(64, 64), (32, 32), (128, 64)])
def test_kernel_lists_split_kv_blocks(BM, BN):
    """Kernel tiles smaller than the kv block (the GPU's 64-key tiles under 128-key
    blocks): every sub-tile inherits its block's class, compared with an independent
    expansion of the block-level picture."""
    L = 300
    bm = create_block_mask(mods.sliding_window(70), 2, 3, L, L, device="cpu")
    kl = bm.kernel_lists(BM, BN)
    QB, KB = bm.BLOCK_SIZE
    nqt, nkt = -(-L // BM), -(-L // BN)

    def blocks(num, idx):
        nq, nk = idx.shape[-2], idx.shape[-1]
        d = torch.zeros(*idx.shape[:2], nq, nk, dtype=torch.bool)
        for b in range(idx.shape[0]):
            for h in range(idx.shape[1]):
                for i in range(nq):
                    for t in range(int(num[b, h, i])):
                        d[b, h, i, int(idx[b, h, i, t])] = True
        return d

    def expand(d):
        return d.repeat_interleave(QB // BM, -2)[..., :nqt, :].repeat_interleave(
            KB // BN, -1)[..., :nkt]

    for num, idx, fnum, fidx in ((kl.kv_num_blocks, kl.kv_indices, bm.kv_num_blocks,
                                  bm.kv_indices),
                                 (kl.full_kv_num_blocks, kl.full_kv_indices,
                                  bm.full_kv_num_blocks, bm.full_kv_indices)):
        want = expand(blocks(fnum, fidx))
        assert torch.equal(blocks(num, idx), want)
    got_q = blocks(kl.q_num_blocks, kl.q_indices)
    assert torch.equal(got_q, expand(blocks(bm.kv_num_blocks, bm.kv_indices)).transpose(-2, -1))


def test_create_block_mask_keeps_torch_thread_count():
    # Numba's OpenMP layer sets the process-wide OpenMP thread count when it first runs,
    # which PyTorch reads back: a fresh process, so that the layer starts here.
    import subprocess
    import sys

    code = (
        "import torch, attn\n"
        "from attn import mods\n"
        "torch.set_num_threads(1)\n"
        "docs = mods.document_mask(torch.tensor([0, 100, 256]))\n"
        "attn.create_block_mask(docs, 1, 1, 256, 256)\n"
        "attn.create_mask(docs, 1, 1, 256, 256)\n"
        "print('threads', torch.get_num_threads())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "threads 1" in r.stdout, r.stdout
