"""Block classification shared by the kernel launchers.

The kernels walk, for every q block, a list of kv blocks: *full* blocks need no
masking, *partial* blocks evaluate the causal rule / attention mask per element.
Dense and causal attention are such lists too; this module classifies the blocks and
each launcher packs them in its kernels' format.
"""
from __future__ import annotations

import torch

__all__ = ["dense_block_classes"]


def dense_block_classes(Lq: int, Lk: int, BM: int, BN: int, causal: bool, masked: bool):
    """(full, part): bool (n_q_blocks, n_kv_blocks) tensors for dense or top-left
    causal attention with BM-query by BN-key tiles. With an attention mask every
    visible block is partial (the mask must be read)."""
    nqb = -(-Lq // BM)
    nkb = -(-Lk // BN)
    qi = torch.arange(nqb).view(-1, 1)
    kj = torch.arange(nkb).view(1, -1)
    if causal:
        q_first = qi * BM
        q_last = torch.clamp((qi + 1) * BM, max=Lq) - 1
        k_first = kj * BN
        k_last = torch.clamp((kj + 1) * BN, max=Lk) - 1
        visible = k_first <= q_last           # some key of the block is <= some query
        full = k_last <= q_first              # every key <= every query of the block
    else:
        visible = torch.ones(nqb, nkb, dtype=torch.bool)
        full = visible.clone()
    if masked:
        full = torch.zeros_like(full)
    return full, visible & ~full
