"""Key rows of a partial tile that no query of the tile sees are left out by the CPU
kernels (cpu/_kernels.pyx visible_keys): from the band of a jagged sequence, the
top-left causal rule, or the mask_mod evaluated once on the tile; a listed tile with no
visible element is skipped. Checked against attn.reference with masks built so that
partial tiles have hidden rows at their start, at their end, in the middle (kept), and
listed blocks with nothing visible; with a score_mod, GQA, forward and backward."""
from __future__ import annotations

import pytest
import torch

import attn
from attn import mods

from test_flex import _check, _inputs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _stripes(b, h, q_idx, kv_idx):
    # Inside a 128-block: keys 0..31 hidden, 32..63 visible, 64..95 hidden (a gap the
    # trimming keeps), 96..127 visible up to the causal diagonal.
    return ((kv_idx % 128) // 32 % 2 == 1) & (kv_idx <= q_idx + 40)


def _nothing_in_odd_blocks(b, h, q_idx, kv_idx):
    # Blocks listed (the block mask below lists every block as partial) whose every
    # element is hidden: kv blocks 1, 3, 5, ... and q rows 64..127 of each q block.
    return ((kv_idx // 128) % 2 == 0) & ((q_idx % 128) < 64) | (kv_idx == 0)


def test_trimmed_causal_and_sliding():
    L = 300
    q, k, v = _inputs(1, 4, 2, L, L, 32, torch.float32, seed=L)
    for mask in (mods.causal_mask, mods.sliding_window(70)):
        bm = attn.create_block_mask(mask, None, None, L, L)
        _check(q, k, v, score_mod=mods.alibi(4), bm=bm, gqa=True)


def test_trimmed_stripes_and_empty_listed_tiles():
    L = 390
    q, k, v = _inputs(2, 2, 2, L, L, 24, torch.float32, seed=3)
    _check(q, k, v, bm=attn.create_block_mask(_stripes, None, None, L, L))
    # Every block listed as partial, so the kernels see tiles that are entirely hidden.
    nb = -(-L // 128)
    num = torch.full((1, 1, nb), nb, dtype=torch.int32)
    idx = torch.arange(nb, dtype=torch.int32).expand(1, 1, nb, nb).contiguous()
    bm = attn.BlockMask.from_kv_blocks(num, idx, mask_mod=_nothing_in_odd_blocks,
                                       seq_lengths=(L, L))
    _check(q, k, v, score_mod=mods.alibi(2), bm=bm)


def test_sdpa_causal_diagonal_trim():
    """Top-left causal SDPA with Lq != Lk: diagonal tiles lose their keys past the last
    query."""
    from _util import Case, check_case

    check_case(Case(B=1, Hq=2, Lq=200, Lk=330, D=32, causal=True, seed=11), lse_grad=True)
    check_case(Case(B=1, Hq=2, Lq=330, Lk=200, D=32, causal=True, seed=12), lse_grad=True)
