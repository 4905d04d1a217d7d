"""Block classification shared by the kernel launchers.

The kernels walk, for every q block, a list of kv blocks: *full* blocks need no
masking, *partial* blocks evaluate the causal rule / attention mask per element.
Dense and causal attention are such lists too; this module classifies the blocks and
each launcher packs them in its kernels' format.

Jagged batches can instead be described by their offsets (:class:`JaggedBand`): the
CPU kernels and the GPU forward then tile every sequence from its own start and need
no lists.
"""
from __future__ import annotations

import heapq
from typing import NamedTuple

import torch

__all__ = ["JaggedBand", "JaggedSchedule", "band_of", "dense_block_classes", "seq_tiles"]


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


# "Unbounded" side of a band, for int64 range arithmetic: larger than any token count,
# small enough that sums of a few of them never overflow.
_BIG = 1 << 40


def _seq_major(seq, cost, seq_cost):
    """Order of tiles: by sequence, costliest sequence first, and inside a sequence
    costliest tile first. The kernels run the items of one (batch, head) in this order
    (so a thread keeps working on one sequence's K/V while it is in cache) and hand
    them out dynamically (so the long ones start early and short ones fill the end)."""
    order = torch.sort(cost, descending=True, stable=True).indices
    by_seq = torch.sort(seq_cost[seq[order]], descending=True, stable=True).indices
    order = order[by_seq]
    # Equal-cost sequences stay apart: a stable sort by sequence id inside equal costs.
    key = seq_cost[seq[order]] * (seq.numel() + 1) - seq[order]
    return order[torch.sort(key, descending=True, stable=True).indices]


class JaggedSchedule(NamedTuple):
    """Work items of a jagged band at one kernel tile size, in the order of
    _seq_major (seq_items: costliest sequence first). All int32 contiguous CPU tensors.

    items      (n, 2) (sequence, q tile): the forward and the dQ pass
    kv_items   (m, 2) (sequence, kv tile): the dK/dV pass
    seq_items  (s,)   sequences with keys: the fused backward (one item per sequence)
    seq_pairs  (s,)   (q tile, kv tile) pairs of each of seq_items, per head
    pairs      total (q tile, kv tile) pairs per head
    """

    items: torch.Tensor
    kv_items: torch.Tensor
    seq_items: torch.Tensor
    seq_pairs: torch.Tensor
    pairs: int


def seq_tiles(n_tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, tile index within it) of every tile, given each sequence's tile count
    (CPU int64)."""
    seq = torch.repeat_interleave(torch.arange(n_tiles.numel()), n_tiles)
    first = torch.cumsum(n_tiles, 0) - n_tiles
    return seq, torch.arange(seq.numel()) - first[seq]


def band_of(flex) -> JaggedBand | None:
    """The jagged band a flex call's block mask carries (attn.document_block_mask's
    masks do): then the kernels schedule tiles per sequence and ignore the mask's
    lists."""
    if flex is None or flex.block_mask is None:
        return None
    band = getattr(flex.block_mask, "_attn_jagged", None)
    return band if isinstance(band, JaggedBand) else None


class JaggedBand:
    """The mask of packed variable-length sequences as the CPU kernels take it: per
    sequence ``s`` its queries ``q0[s]..q1[s]-1``, its used keys ``k0[s]..k1[s]-1``
    (global token indices) and a band, query ``t`` seeing key ``j`` when
    ``t + diag[s] - left <= j <= t + diag[s] + right`` (``-1``: unbounded side).

    With it the kernels start q tiles at each sequence's first query and kv tiles at
    its first key, so no tile straddles a boundary, and find each item's tiles from
    the offsets (FlashAttention's varlen schedule) instead of walking block lists.
    attn.varlen_attn's masks (attn.document_block_mask) carry one."""

    __slots__ = ("q0", "q1", "k0", "k1", "diag", "left", "right", "_schedules")

    def __init__(self, q0, q1, k0, k1, diag, left: int, right: int):
        def prep(t):
            return t.detach().to("cpu", torch.int64).contiguous()

        self.q0, self.q1, self.k0, self.k1, self.diag = map(prep, (q0, q1, k0, k1, diag))
        self.left, self.right = int(left), int(right)
        self._schedules: dict = {}

    @property
    def nseq(self) -> int:
        return self.q0.numel()

    def sides(self) -> tuple[int, int]:
        """(left, right) with unbounded sides as a large number, as the kernels take
        them."""
        return (_BIG if self.left < 0 else self.left, _BIG if self.right < 0 else self.right)

    def schedule(self, BM: int, BN: int) -> JaggedSchedule:
        """The work items at tile size BM x BN (cached)."""
        hit = self._schedules.get((BM, BN))
        if hit is None:
            hit = self._schedules[(BM, BN)] = self._build(BM, BN)
        return hit

    def _build(self, BM: int, BN: int) -> JaggedSchedule:
        L, R = self.sides()
        q0, q1, k0, k1, c = self.q0, self.q1, self.k0, self.k1, self.diag
        nseq = q0.numel()

        # q tiles and the kv tiles each one sees (the kernels' jg_kv_range).
        seq, t = seq_tiles((q1 - q0 + BM - 1) // BM)
        qa = q0[seq] + t * BM
        qz = torch.minimum(qa + BM - 1, q1[seq] - 1)
        ks, ke, cs = k0[seq], k1[seq], c[seq]
        a = torch.maximum(qa, ks - cs - R)
        z = torch.minimum(qz, ke - 1 - cs + L)
        lo = torch.maximum(ks, a + cs - L)
        hi = torch.minimum(ke - 1, z + cs + R)
        n_kv = torch.where((a <= z) & (lo <= hi), (hi - ks) // BN - (lo - ks) // BN + 1, 0)
        seq_pairs_all = torch.zeros(nseq, dtype=torch.int64).index_add_(0, seq, n_kv)
        items = torch.stack([seq, t], 1)[_seq_major(seq, n_kv, seq_pairs_all)]
        items = items.to(torch.int32).contiguous()

        # kv tiles and the q tiles that see each (jg_q_range).
        kseq, u = seq_tiles((k1 - k0 + BN - 1) // BN)
        ka = k0[kseq] + u * BN
        kz = torch.minimum(ka + BN - 1, k1[kseq] - 1)
        qs, qe, cs = q0[kseq], q1[kseq], c[kseq]
        lo = torch.maximum(qs, ka - cs - R)
        hi = torch.minimum(qe - 1, kz - cs + L)
        n_q = torch.where(lo <= hi, (hi - qs) // BM - (lo - qs) // BM + 1, 0)
        kv_items = torch.stack([kseq, u], 1)[_seq_major(kseq, n_q, seq_pairs_all)]
        kv_items = kv_items.to(torch.int32).contiguous()

        has_keys = (k1 > k0).nonzero().flatten()
        pairs = seq_pairs_all[has_keys]
        order = torch.sort(pairs, descending=True, stable=True).indices
        return JaggedSchedule(items, kv_items, has_keys[order].to(torch.int32).contiguous(),
                              pairs[order].contiguous(), int(n_kv.sum()))

    def fused_pays(self, sched: JaggedSchedule, kv_heads: int, group: int,
                   nthreads: int) -> bool:
        """Whether the fused backward (one item per sequence and kv head, doing the q
        heads of its group: 5 tile products per pair, but items as uneven as the
        sequences) beats the split one (7 products per pair, evenly spread): greedy
        longest-first makespan of the fused items against the split work per thread.
        ``kv_heads`` = B * Hkv."""
        if nthreads == 1:
            return True
        key = ("fused", id(sched), kv_heads, group, nthreads)
        hit = self._schedules.get(key)
        if hit is None:
            load = [0] * nthreads
            for w in sched.seq_pairs.tolist():
                for _ in range(kv_heads):
                    heapq.heapreplace(load, load[0] + w * group)
            hit = 5 * max(load) <= 7 * sched.pairs * kv_heads * group / nthreads
            self._schedules[key] = hit
        return hit
