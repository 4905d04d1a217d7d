"""Jagged (variable-length) batches on attn's FlexAttention path.

``varlen_attn`` has the names and semantics of ``torch.nn.attention.varlen.varlen_attn``
(torch 2.13): packed ``(total_tokens, heads, head_dim)`` inputs and cumulative offsets
``cu_seq_q`` / ``cu_seq_k`` of B sequences. ``nested_sdpa`` is SDPA on jagged nested
tensors, built on the same core.

How it runs, with no padding and no copy of the inputs: the packed tensors are viewed as
a batch of one, ``query.transpose(0, 1).unsqueeze(0)`` -> ``(1, Hq, total_q, D)`` (a
strided view), and handed to :func:`attn.flex_attention` with a block mask built
*directly from the offsets*: for each 128-query block, the kv blocks it may touch are
the union, over the sequences that meet the q block, of those sequences' visible key
ranges (window included); a kv block is *full* when every (query, key) pair of the tile
is visible (one sequence for all its queries and keys, all inside the window), *partial*
otherwise. The classification is computed with vectorised integer ops on the
``(n_q_blocks, n_kv_blocks)`` grid (the per-block first/last sequence ids and the bounds
of the visible ranges), never by evaluating the mask per element: a few milliseconds at
16k tokens. Only partial blocks run the element mask_mod (:func:`jagged_mask_mod`),
which reads at most three small captured tensors (the sequence id of every query token, of every
key token, and every query's diagonal key), so both backends — the CPU Cython kernels
and the GPU Numba kernels — compile it once and take new offsets as kernel arguments.

Sequence alignment (FlashAttention's): ``window_size=(left, right)`` is bottom-right
aligned in every sequence. Query ``i`` of a sequence with ``Lq`` queries and ``Lk`` keys
sees key ``j`` when ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right`` (``-1`` =
unbounded on that side).
"""
from __future__ import annotations

import math
import numbers
import threading
import weakref
from collections import OrderedDict
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._block_mask import BlockMask, _ordered
from ._blocks import JaggedBand

__all__ = [
    "document_block_mask",
    "jagged_mask_mod",
    "nested_sdpa",
    "varlen_attn",
]

_DEFAULT_BLOCK = 128

# "Unbounded" window side for the integer range arithmetic: larger than any token
# count, small enough that sums of a few of them never overflow int64.
_BIG = 1 << 40


# --------------------------------------------------------------------------- validation


# Host copies of device offsets already checked, by tensor: reading a CUDA tensor's values
# synchronises with the GPU, and every layer of a model passes the same offsets tensor.
# An entry is valid while the tensor object lives (weak reference) and its version
# counter, storage pointer and layout are unchanged; every in-place PyTorch op bumps the
# version, so a changed tensor is read again. (Writes that bypass PyTorch — DLPack, a
# Numba kernel on its memory — do not bump it: pass a new tensor after those.)
_HOST_COPIES: dict = {}
# The same for values read without the offsets checks (_host_values): a table of its own,
# so that an unchecked copy never passes for a checked one.
_HOST_VALUES: dict = {}
_HOST_COPIES_SIZE = 64


def _copy_costs_sync(cu: Tensor) -> bool:
    """Whether reading ``cu``'s values waits for its device (CPU offsets are read in place)."""
    return cu.device.type != "cpu"


def _host_copy(cu: Tensor, table=None):
    if not _copy_costs_sync(cu):
        return None
    hit = (_HOST_COPIES if table is None else table).get(id(cu))
    if hit is None:
        return None
    ref, stamp, copy = hit
    if ref() is not cu or stamp != _stamp(cu):
        return None
    return copy


def _stamp(cu: Tensor):
    return (cu._version, cu.data_ptr(), cu.dtype, cu.shape, cu.stride(), cu.device)


def _remember_host_copy(cu: Tensor, copy: Tensor, table=None) -> None:
    if not _copy_costs_sync(cu):
        return
    table = _HOST_COPIES if table is None else table
    with _LOCK:
        while len(table) >= _HOST_COPIES_SIZE:
            table.pop(next(iter(table)))
        table[id(cu)] = (weakref.ref(cu), _stamp(cu), copy)


def _host_values(t: Tensor) -> Tensor:
    """``t``'s values as a CPU int64 tensor, read from the device once per tensor and
    version (_HOST_VALUES)."""
    c = _host_copy(t, _HOST_VALUES)
    if c is None:
        c = t.detach().to("cpu", torch.int64)
        _remember_host_copy(t, c, _HOST_VALUES)
    return c


def _check_offsets(cu, name: str, n_tokens: int | None, device, tokens_name: str):
    """``cu`` as a CPU int64 copy (B+1,), after every check, with errors naming ``name``.
    Device offsets seen before, unchanged, are not read again (_HOST_COPIES)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of cumulative offsets, got "
                        f"{type(cu).__name__}")
    if cu.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of B+1 cumulative offsets, got shape "
                         f"{tuple(cu.shape)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {cu.dtype}")
    if device is not None and cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but query is on {device}; offsets must be "
                         "on the device of the inputs")
    if cu.numel() < 1:
        raise ValueError(f"{name} must have B+1 >= 1 entries (B+1 cumulative offsets), got 0")
    c = _host_copy(cu)
    if c is not None:
        _check_total(c, name, n_tokens, tokens_name)
        return c
    c = cu.detach().to("cpu", torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {int(c[0])}")
    if c.numel() > 1:
        bad = (c[1:] < c[:-1]).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{name} must be non-decreasing, got {name}[{i}] = {int(c[i])} > "
                             f"{name}[{i + 1}] = {int(c[i + 1])}")
    _check_total(c, name, n_tokens, tokens_name)
    _remember_host_copy(cu, c)
    return c


def _check_total(c: Tensor, name: str, n_tokens: int | None, tokens_name: str) -> None:
    if n_tokens is not None and int(c[-1]) != n_tokens:
        raise ValueError(f"{name}[-1] = {int(c[-1])} must equal the number of packed tokens: "
                         f"{tokens_name} has {n_tokens}")


def _check_window(window_size) -> tuple[int, int]:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    out = []
    for v in window_size:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < -1:
            raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got "
                             f"{tuple(window_size)!r}")
        out.append(int(v))
    return out[0], out[1]


def _check_seqused(seqused_k, k_lengths: Tensor, device) -> Tensor | None:
    if seqused_k is None:
        return None
    if not isinstance(seqused_k, Tensor):
        raise TypeError(f"seqused_k must be a torch.Tensor or None, got {type(seqused_k).__name__}")
    B = k_lengths.numel()
    if seqused_k.dim() != 1 or seqused_k.numel() != B:
        raise ValueError(f"seqused_k must have shape (B,) = ({B},), one count per sequence, got "
                         f"{tuple(seqused_k.shape)}")
    if seqused_k.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seqused_k must have dtype torch.int32 or torch.int64, got "
                        f"{seqused_k.dtype}")
    if device is not None and seqused_k.device != device:
        raise ValueError(f"seqused_k is on {seqused_k.device} but query is on {device}")
    u = seqused_k.detach().to("cpu", torch.int64)
    bad = ((u < 0) | (u > k_lengths)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"seqused_k[{i}] = {int(u[i])} must be in [0, {int(k_lengths[i])}] "
                         f"(sequence {i} has {int(k_lengths[i])} keys in cu_seq_k)")
    return u


def _check_packed(query, key, value, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise ValueError(f"{name} is a nested tensor: varlen_attn takes packed "
                             "(total_tokens, heads, head_dim) tensors; use nested_sdpa for "
                             "nested tensors")
        if t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D packed tensor (total_tokens, heads, "
                             f"head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError("query, key and value must have the same dtype, got "
                        f"query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError("query, key and value must be on the same device, got "
                         f"query {query.device}, key {key.device}, value {value.device}")
    Tk, Hkv, Dk = key.shape
    Tv, Hv, _ = value.shape
    if Tv != Tk:
        raise ValueError(f"key and value must have the same number of tokens, got key {Tk}, "
                         f"value {Tv}")
    if Hv != Hkv:
        raise ValueError(f"key and value must have the same number of heads, got key "
                         f"Hkv={Hkv}, value {Hv}")
    if Dk != query.shape[2]:
        raise ValueError(f"query and key must have the same head dim, got query "
                         f"D={query.shape[2]}, key D={Dk}")
    Hq = query.shape[1]
    # torch's varlen_attn messages, word for word.
    if not enable_gqa and Hq != Hkv:
        raise ValueError(
            f"Expect query and key/value to have the same number of heads "
            f"but got Hq={Hq} and Hkv={Hkv}. "
            f"Try setting enable_gqa=True for GQA."
        )
    if enable_gqa and (Hkv == 0 or Hq % Hkv != 0):
        raise ValueError(
            f"Expect number of query heads to be a multiple of kv heads for GQA "
            f"but got Hq={Hq} and Hkv={Hkv}."
        )


def _check_max(value, name: str, lengths: Tensor, what: str):
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if int(value) < longest:
        i = int(lengths.argmax())
        raise ValueError(f"{name} = {int(value)} is smaller than the longest {what}: sequence "
                         f"{i} has {longest}")


def _wants_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# --------------------------------------------------------------------------- the layout


class _Layout(NamedTuple):
    """Per-sequence integers (int64, on the device) of a packed jagged batch.

    For query token ``t`` of sequence ``d`` the visible keys are the global key indices
    ``kj`` with ``k0[d] <= kj < k1[d]`` and ``t + diag[d] - left <= kj <= t + diag[d] +
    right``; ``diag[d]`` puts each sequence's diagonal where its alignment says.
    """

    q0: Tensor    # (B,) first query token
    q1: Tensor    # (B,) one past the last query token
    k0: Tensor    # (B,) first key token
    k1: Tensor    # (B,) one past the last *used* key token (seqused_k)
    kend: Tensor  # (B,) one past the last key token of the sequence (cu_seq_k[d+1])
    diag: Tensor  # (B,) query token t (global index) has its diagonal at key t + diag[d]
    Tq: int
    Tk: int


def _layout(cq: Tensor, ck: Tensor, used: Tensor | None, top_left: bool, device) -> _Layout:
    """From the CPU int64 offsets (validated) to a _Layout on ``device``.

    Bottom-right (FlashAttention / varlen_attn): ``diag = k0 - q0 + (Lk_used - Lq)``, so
    the last query of a sequence sits on its last used key. Top-left (SDPA's is_causal):
    ``diag = k0 - q0``, query i's diagonal is key i of its sequence."""
    Tq, Tk = int(cq[-1]), int(ck[-1])
    cq = cq.to(device)
    ck = ck.to(device)
    q0, q1, k0, kend = cq[:-1], cq[1:], ck[:-1], ck[1:]
    k1 = kend if used is None else k0 + used.to(device)
    diag = k0 - q0
    if not top_left:
        diag = diag + (k1 - k0) - (q1 - q0)
    return _Layout(q0, q1, k0, k1, kend, diag, Tq, Tk)


def _token_docs(cu: Tensor, n: int) -> Tensor:
    """Sequence id of each of the n packed tokens: the d with cu[d] <= t < cu[d+1]
    (right-searchsorted skips empty sequences, which own no token)."""
    t = torch.arange(n, device=cu.device, dtype=torch.int64)
    return torch.searchsorted(cu, t, right=True) - 1


def _side(v: int) -> int:
    return _BIG if v < 0 else v


def _visible_range(lay: _Layout, d: Tensor, a: Tensor, b: Tensor, left: int, right: int):
    """Union of the visible key ranges of the queries ``a..b`` (inclusive, all in
    sequence ``d``): ``(lo, hi, nonempty)``, elementwise over broadcast tensors.

    Query t's range is ``[max(k0, t+c-L), min(k1-1, t+c+R)]`` with c its diagonal; it is
    non-empty exactly for ``k0-c-R <= t <= k1-1-c+L``. Consecutive queries' ranges shift
    by one and have width ``L+R+1 >= 1``, so over a run of queries with non-empty ranges
    they touch, and the union is the single interval from the first one's low end to
    the last one's high end."""
    L, R = _side(left), _side(right)
    k0, k1, c = lay.k0[d], lay.k1[d], lay.diag[d]
    a = torch.maximum(a, k0 - c - R)
    b = torch.minimum(b, k1 - 1 - c + L)
    lo = torch.maximum(k0, a + c - L)
    hi = torch.minimum(k1 - 1, b + c + R)
    return lo, hi, (a <= b) & (lo <= hi)


def _block_classes(lay: _Layout, q_doc: Tensor, k_doc: Tensor, left: int, right: int,
                   BQ: int, BK: int):
    """(full, partial) bool (nQB, nKB) grids, by range arithmetic on the block grid.

    A tile (r, c) is *visible* when some sequence d has a query in q block r and a key in
    kv block c that it sees. Only sequences in ``[D1, D2]`` — the intersection of the
    sequence-id ranges of the q block and of the kv block — can. The two ends are
    checked exactly (their visible key range intersected with the kv block); a sequence
    strictly inside lies wholly in both blocks, so it counts when it has any visible
    pair at all (a prefix count over sequences answers that for the whole run at once).
    A tile is *full* when one sequence owns every query and key of it (no padding, no
    unused key) and its window holds the tile's extreme pairs."""
    Tq, Tk, dev = lay.Tq, lay.Tk, lay.q0.device
    nqb, nkb = -(-Tq // BQ), -(-Tk // BK)
    r = torch.arange(nqb, device=dev, dtype=torch.int64)
    c = torch.arange(nkb, device=dev, dtype=torch.int64)
    qs, qe = r * BQ, torch.clamp((r + 1) * BQ, max=Tq) - 1  # first / last query
    ks, ke = c * BK, torch.clamp((c + 1) * BK, max=Tk) - 1  # first / last key
    dq_lo, dq_hi = q_doc[qs], q_doc[qe]
    dk_lo, dk_hi = k_doc[ks], k_doc[ke]
    D1 = torch.maximum(dq_lo[:, None], dk_lo[None, :])
    D2 = torch.minimum(dq_hi[:, None], dk_hi[None, :])
    B = lay.q0.numel()

    def hit(d):
        a = torch.maximum(qs[:, None], lay.q0[d])
        b = torch.minimum(qe[:, None], lay.q1[d] - 1)
        lo, hi, ok = _visible_range(lay, d, a, b, left, right)
        return ok & (lo <= ke[None, :]) & (hi >= ks[None, :])

    D1c, D2c = D1.clamp(0, B - 1), D2.clamp(0, B - 1)
    visible = hit(D1c) | hit(D2c)
    # Sequences strictly between D1 and D2 (wholly inside both blocks).
    all_d = torch.arange(B, device=dev)
    _, _, seq_any = _visible_range(lay, all_d, lay.q0, lay.q1 - 1, left, right)
    count = torch.cat([seq_any.new_zeros(1, dtype=torch.int64), seq_any.cumsum(0)])
    inner = count[D2c] - count[(D1c + 1).clamp(max=B)]
    visible = (visible | ((D2 - D1 >= 2) & (inner > 0))) & (D1 <= D2)

    d = dq_lo[:, None].expand(nqb, nkb)
    full = ((dq_lo == dq_hi)[:, None] & (dk_lo == dk_hi)[None, :] & (d == dk_lo[None, :])
            & ((r + 1) * BQ <= Tq)[:, None] & ((c + 1) * BK <= Tk)[None, :]
            & (((c + 1) * BK)[None, :] <= lay.k1[d]))
    diag = lay.diag[d]
    if left >= 0:   # the lowest pair: first key, last query
        full &= (c * BK)[None, :] - ((r + 1) * BQ - 1)[:, None] - diag >= -left
    if right >= 0:  # the highest pair: last key, first query
        full &= ((c + 1) * BK - 1)[None, :] - (r * BQ)[:, None] - diag <= right
    full &= visible
    return full, visible & ~full


def _mod_buffers(lay: _Layout, q_doc: Tensor, k_doc: Tensor):
    """The element mask's captured tensors: query and key sequence ids (a key past its
    sequence's seqused_k gets -1, which no query has) and each query's diagonal key."""
    k_doc = torch.where(torch.arange(lay.Tk, device=k_doc.device) < lay.k1[k_doc.clamp(min=0)],
                        k_doc, -1) if lay.Tk else k_doc
    q_center = torch.arange(lay.Tq, device=q_doc.device) + lay.diag[q_doc]
    # int32 halves the buffers and matches the kernels' int32 indices; int64 when the
    # values could overflow.
    lim = 1 << 30
    small = lay.Tq < lim and lay.Tk < lim and (
        q_center.numel() == 0 or int(q_center.abs().max()) < lim)
    dt = torch.int32 if small else torch.int64
    return q_doc.to(dt), k_doc.to(dt), q_center.to(dt)


def _make_mask_mod(q_doc: Tensor, k_doc: Tensor, q_center: Tensor, left: int, right: int):
    """The element mask_mod: same sequence and inside the window. Plain elementwise torch
    ops and indexing of captured tensors, so attn compiles it with Numba (CPU tile
    callbacks, CUDA device functions) and torch's own flex_attention runs it too."""
    if left < 0 and right < 0:
        def varlen_mask(b, h, q_idx, kv_idx):
            return q_doc[q_idx] == k_doc[kv_idx]
    elif left < 0:
        def varlen_mask(b, h, q_idx, kv_idx):
            return (q_doc[q_idx] == k_doc[kv_idx]) & (kv_idx - q_center[q_idx] <= right)
    elif right < 0:
        def varlen_mask(b, h, q_idx, kv_idx):
            return (q_doc[q_idx] == k_doc[kv_idx]) & (kv_idx - q_center[q_idx] >= -left)
    else:
        def varlen_mask(b, h, q_idx, kv_idx):
            rel = kv_idx - q_center[q_idx]
            return (q_doc[q_idx] == k_doc[kv_idx]) & (rel >= -left) & (rel <= right)
    varlen_mask.__name__ = varlen_mask.__qualname__ = (
        f"varlen_mask_{'l' if left >= 0 else ''}{'r' if right >= 0 else ''}".rstrip("_"))
    return varlen_mask


# Built masks, keyed by the *values* of the offsets (a few hundred ints at most), the
# window, the alignment and the device: every layer of a model calls with the same
# offsets, and a hit reuses the mask_mod object (so attn._modgen's trace cache hits) and
# the BlockMask (so its kernel_lists cache hits). Values, not tensor identities: an
# in-place change of the offsets can never serve a stale mask.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 16
_LOCK = threading.Lock()


def _build(cq, ck, used, window, top_left, BLOCK_SIZE, device):
    key = (tuple(cq.tolist()), tuple(ck.tolist()),
           None if used is None else tuple(used.tolist()),
           window, top_left, BLOCK_SIZE, str(device))
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    lay = _layout(cq, ck, used, top_left, device)
    cu_q = torch.cat([lay.q0, lay.q1[-1:]])
    cu_k = torch.cat([lay.k0, lay.kend[-1:]])
    q_doc, k_doc = _token_docs(cu_q, lay.Tq), _token_docs(cu_k, lay.Tk)
    left, right = window
    mask_mod = _make_mask_mod(*_mod_buffers(lay, q_doc, k_doc), left, right)
    bm = None
    if lay.Tq and lay.Tk:
        full, partial = _block_classes(lay, q_doc, k_doc, left, right, *BLOCK_SIZE)
        kv_num, kv_idx = _ordered(partial)
        fkv_num, fkv_idx = _ordered(full)
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, fkv_num, fkv_idx, BLOCK_SIZE=BLOCK_SIZE,
                                      mask_mod=mask_mod, seq_lengths=(lay.Tq, lay.Tk))
        # The CPU kernels and the GPU forward read the offsets and the band themselves
        # (q tiles per sequence, none straddling a boundary); the lists serve the
        # other kernels (the GPU backward, torch's flex_attention).
        bm._attn_jagged = JaggedBand(lay.q0, lay.q1, lay.k0, lay.k1, lay.diag, left, right)
    res = (mask_mod, bm)
    with _LOCK:
        _CACHE[key] = res
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return res


def _block_size(BLOCK_SIZE) -> tuple[int, int]:
    if isinstance(BLOCK_SIZE, numbers.Integral) and not isinstance(BLOCK_SIZE, bool):
        BLOCK_SIZE = (BLOCK_SIZE, BLOCK_SIZE)
    if (not isinstance(BLOCK_SIZE, (tuple, list)) or len(BLOCK_SIZE) != 2
            or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0
                   for s in BLOCK_SIZE)):
        raise ValueError(f"BLOCK_SIZE must be a positive int or a (Q_BLOCK_SIZE, "
                         f"KV_BLOCK_SIZE) pair of positive ints, got {BLOCK_SIZE!r}")
    return int(BLOCK_SIZE[0]), int(BLOCK_SIZE[1])


def _offsets_pair(cu_seq_q, cu_seq_k, seqused_k):
    if cu_seq_k is None:
        cu_seq_k = cu_seq_q
    cq = _check_offsets(cu_seq_q, "cu_seq_q", None, None, "query")
    device = cu_seq_q.device
    ck = _check_offsets(cu_seq_k, "cu_seq_k", None, device, "key")
    if cq.numel() != ck.numel():
        raise ValueError(f"cu_seq_q and cu_seq_k must have the same length B+1, got "
                         f"{cq.numel()} and {ck.numel()}")
    used = _check_seqused(seqused_k, ck[1:] - ck[:-1], device)
    return cq, ck, used, device


def jagged_mask_mod(cu_seq_q: Tensor, cu_seq_k: Tensor | None = None,
                    window_size: tuple[int, int] = (-1, -1), seqused_k: Tensor | None = None):
    """The element ``mask_mod(b, h, q_idx, kv_idx)`` of a packed jagged batch: query and
    key in the same sequence, key among the sequence's first ``seqused_k`` keys, and
    inside ``window_size`` (bottom-right aligned; see :func:`varlen_attn`). ``q_idx`` /
    ``kv_idx`` index the packed tokens. Works in :func:`attn.create_block_mask` /
    :func:`attn.flex_attention` and in torch's own FlexAttention; prefer
    :func:`document_block_mask`, which builds the block lists without evaluating it."""
    cq, ck, used, device = _offsets_pair(cu_seq_q, cu_seq_k, seqused_k)
    mod, _ = _build(cq, ck, used, _check_window(window_size), False, (_DEFAULT_BLOCK,) * 2,
                    device)
    return mod


def document_block_mask(cu_seq_q: Tensor, cu_seq_k: Tensor | None = None,
                        window_size: tuple[int, int] = (-1, -1),
                        BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK,
                        seqused_k: Tensor | None = None) -> BlockMask:
    """A BlockMask for a packed jagged batch, built from the offsets alone.

    For :func:`attn.flex_attention` users whose batch is B sequences packed into one:
    queries ``(1, H, total_q, D)`` (or any batch size, as the mask broadcasts), keys
    ``(1, H, total_k, D)``; ``cu_seq_q`` / ``cu_seq_k`` are the ``(B+1,)`` cumulative
    offsets (``cu_seq_k=None``: the same as ``cu_seq_q``). A query sees the keys of its
    own sequence (the first ``seqused_k[d]`` of them, if given) inside ``window_size``,
    bottom-right aligned as in :func:`varlen_attn`. The mask's ``mask_mod`` is
    :func:`jagged_mask_mod`; the lists are what :func:`attn.create_block_mask` would give
    for it (full / partial / absent per block), computed by range arithmetic on the
    ``(n_q_blocks, n_kv_blocks)`` grid in O(nQB * nKB), not by evaluating the mask.

    The mask lives on the offsets' device; ``total_q`` and ``total_k`` must be positive.
    """
    cq, ck, used, device = _offsets_pair(cu_seq_q, cu_seq_k, seqused_k)
    window = _check_window(window_size)
    BLOCK_SIZE = _block_size(BLOCK_SIZE)
    if int(cq[-1]) == 0 or int(ck[-1]) == 0:
        raise ValueError(f"document_block_mask needs at least one query and one key token, "
                         f"got total_q={int(cq[-1])}, total_k={int(ck[-1])}")
    _, bm = _build(cq, ck, used, window, False, BLOCK_SIZE, device)
    return bm


# --------------------------------------------------------------------------- the call


class _Empty(torch.autograd.Function):
    """out 0 / lse -inf when there is no query or no key at all: connected to the
    inputs so a loss can still be differentiated (the gradients are zero)."""

    @staticmethod
    def forward(ctx, query, key, value, Dv):
        Tq, Hq, _ = query.shape
        ctx.shapes = (query, key, value)
        ldt = torch.float64 if query.dtype == torch.float64 else torch.float32
        out = query.new_zeros(Tq, Hq, Dv)
        lse = torch.full((Hq, Tq), float("-inf"), dtype=ldt, device=query.device)
        return out, lse

    @staticmethod
    def backward(ctx, *_):
        q, k, v = ctx.shapes
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


def _run(query, key, value, cq, ck, used, window, top_left, scale, enable_gqa):
    """out ``(total_q, Hq, Dv)`` (contiguous) and lse ``(Hq, total_q)``."""
    from ._flex import AuxRequest, flex_attention

    Dv = value.shape[2]
    _check_scale(scale)
    if query.shape[0] == 0 or key.shape[0] == 0:
        return _Empty.apply(query, key, value, Dv)
    _, bm = _build(cq, ck, used, window, top_left, (_DEFAULT_BLOCK,) * 2, query.device)
    # (T, H, D) -> (1, H, T, D): a strided view, the kernels take any strides.
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    out, aux = flex_attention(q4, k4, v4, block_mask=bm, scale=scale, enable_gqa=enable_gqa,
                              return_aux=AuxRequest(lse=True))
    # torch's varlen_attn returns a contiguous (total_q, Hq, Dv) output and a
    # (Hq, total_q) logsumexp (FlashAttention's unpadded layout).
    return out[0].transpose(0, 1).contiguous(), aux.lse[0]


def varlen_attn(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: Tensor | None = None,
):
    r"""Drop-in for :func:`torch.nn.attention.varlen.varlen_attn`: attention over B
    sequences packed along the token dim, with no padding.

    Sequence ``d`` owns query tokens ``cu_seq_q[d] : cu_seq_q[d+1]`` and key/value tokens
    ``cu_seq_k[d] : cu_seq_k[d+1]``; its queries see only its keys. Runs on attn's
    FlexAttention kernels (CPU and GPU) with a block mask built from the offsets
    (:func:`document_block_mask`), forward and backward.

    Args:
        query: ``(total_q, Hq, D)``; key ``(total_k, Hkv, D)``; value ``(total_k, Hkv,
            Dv)``; any strides (the kernels read them in place).
        cu_seq_q, cu_seq_k: ``(B+1,)`` int32 or int64 cumulative offsets, starting at 0,
            non-decreasing, ending at total_q / total_k, on the inputs' device.
            Zero-length sequences are allowed (a sequence with no keys gives its queries
            out 0 and lse -inf). ``cu_seq_k=None`` means the same offsets as queries.
        max_q, max_k: the longest query / key sequence (checked: they must not be smaller
            than a real length; the kernels do not need them).
        return_aux: an ``AuxRequest`` (torch's ``varlen.AuxRequest`` or attn's); with
            ``lse=True`` the result is ``(out, lse)``.
        scale: default ``1 / sqrt(D)``.
        window_size: ``(left, right)``, ``-1`` = unbounded on that side; bottom-right
            aligned per sequence as in FlashAttention: query ``i`` of a sequence with
            ``Lq`` queries and ``Lk`` keys sees key ``j`` when
            ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right``. ``(-1, 0)`` is
            causal, ``(W, 0)`` causal with a sliding window of ``W`` keys back. For
            ``Lq = 3, Lk = 5`` (``Lk - Lq = 2``)::

                 (-1, -1)        (-1, 0) causal    (1, 0)            (1, 1)
                   k 0 1 2 3 4     k 0 1 2 3 4       k 0 1 2 3 4       k 0 1 2 3 4
                 q 0 █ █ █ █ █   q 0 █ █ █         q 0   █ █         q 0   █ █ █
                   1 █ █ █ █ █     1 █ █ █ █         1     █ █         1     █ █ █
                   2 █ █ █ █ █     2 █ █ █ █ █       2       █ █       2       █ █

            With ``Lq > Lk`` and ``right >= 0`` the first queries may see no key.
        enable_gqa: query head ``h`` reads kv head ``h // (Hq // Hkv)``; without it
            ``Hq`` must equal ``Hkv``.
        seqused_k: ``(B,)`` int tensor: only the first ``seqused_k[d]`` keys of sequence
            ``d`` are used (KV-cache decoding); the window is then aligned to that used
            length. Inference-only, as in torch: a call that needs gradients raises.

    Returns:
        ``out (total_q, Hq, Dv)`` contiguous, in query's dtype; with ``return_aux.lse``,
        ``(out, lse)`` with ``lse (Hq, total_q)`` — the layout of torch's
        ``varlen_attn`` (its docstring says ``(T_q, H_q)``, its kernels and fake
        implementation return ``(H_q, T_q)``) — float32 (float64 for float64 inputs),
        natural log.
    """
    rkey = _repeat_key(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux,
                       scale, window_size, enable_gqa, seqused_k)
    hit = _repeat_hit(rkey, cu_seq_q, cu_seq_k)
    if hit is not None:
        out, lse = _repeat_run(hit, query, key, value)
        return (out, lse) if hit.want_lse else out
    _check_packed(query, key, value, enable_gqa)
    if torch.compiler.is_compiling():
        return _compiled_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                return_aux, scale, window_size, enable_gqa, seqused_k)
    cq, ck, used = _checked_offsets(query, key, cu_seq_q, cu_seq_k, seqused_k, max_q, max_k)
    window = _check_window(window_size)
    want_lse = _wants_lse(return_aux)
    _check_seqused_grad(used, query, key, value)
    out, lse = _run(query, key, value, cq, ck, used, window, False, scale, enable_gqa)
    if rkey is not None:
        _repeat_learn(rkey, cu_seq_q, cu_seq_k, query, key, value, cq, ck, window, scale,
                      enable_gqa, want_lse)
    return (out, lse) if want_lse else out


# Repeated calls (every layer of a model, every step) with device offsets seen before and
# unchanged (identity and version, as _HOST_COPIES) and the same metadata: the key holds
# everything validation, the mask and the backend choice depend on, so a hit goes
# straight to the kernels with the problem of the first call (its tensors replaced).
# The host work of a call is what a GPU forward of this size waits on (bench/NOTES.md V3).
# CPU offsets are read in place every call (a write through a numpy view of them bumps
# no version), as before.
_REPEAT: dict = {}
_REPEAT_MAX = 256


class _Repeat(NamedTuple):
    cu_q: object        # weak references to the offsets tensors
    cu_k: object
    problem: object     # the first call's AttentionProblem (flex, the BlockMask)
    backend: object
    want_lse: bool


def _repeat_key(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux, scale,
                window_size, enable_gqa, seqused_k):
    if (seqused_k is not None or type(query) is not Tensor or type(key) is not Tensor
            or type(value) is not Tensor or type(cu_seq_q) is not Tensor
            or not (cu_seq_k is None or type(cu_seq_k) is Tensor)
            or type(max_q) is not int or type(max_k) is not int
            or type(window_size) is not tuple or not (scale is None or type(scale) is float)
            or type(enable_gqa) is not bool or not _copy_costs_sync(cu_seq_q)
            or torch.compiler.is_compiling()):
        return None
    want = _wants_lse(return_aux)  # raises for a bad return_aux, as the full path does
    from .backends import selection_state

    ks = None if cu_seq_k is None else (id(cu_seq_k), _stamp(cu_seq_k))
    return (query.shape, key.shape, value.shape, query.stride(), key.stride(),
            value.stride(), query.dtype, key.dtype, value.dtype, query.device, key.device,
            value.device, id(cu_seq_q), _stamp(cu_seq_q), ks, max_q, max_k, window_size,
            scale, enable_gqa, want, selection_state(), torch.is_grad_enabled())


def _repeat_hit(rkey, cu_seq_q, cu_seq_k):
    if rkey is None:
        return None
    hit = _REPEAT.get(rkey)
    if hit is None or hit.cu_q() is not cu_seq_q or (
            cu_seq_k is not None and hit.cu_k() is not cu_seq_k):
        return None
    return hit


def _repeat_run(hit: _Repeat, query, key, value):
    from ._flex import _apply, _share_trace

    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    # The mask_mod of a varlen mask reads only the mask's own index tensors, which
    # nothing writes: the first call's trace stays valid.
    problem = _share_trace(replace(hit.problem, query=q4, key=k4, value=v4), hit.problem)
    out, lse, _ = _apply(q4, k4, v4, problem, hit.backend)
    return out[0].transpose(0, 1).contiguous(), lse[0]


def _repeat_learn(rkey, cu_seq_q, cu_seq_k, query, key, value, cq, ck, window, scale,
                  enable_gqa, want_lse):
    if query.shape[0] == 0 or key.shape[0] == 0:
        return
    from .backends import select_backend

    problem = _packed_problem(query, key, value, cq, ck, None, window, False, scale,
                              enable_gqa)
    backend = select_backend(problem)
    if getattr(backend, "autograd_native", False):
        return
    # The memo holds no tensors of the call: the problem's are replaced per call.
    problem = _strip(problem)
    cu_k = cu_seq_q if cu_seq_k is None else cu_seq_k
    with _LOCK:
        if len(_REPEAT) >= _REPEAT_MAX:
            _REPEAT.clear()
        _REPEAT[rkey] = _Repeat(weakref.ref(cu_seq_q), weakref.ref(cu_k), problem, backend,
                                want_lse)


def _strip(problem):
    from ._flex import _share_trace

    e = problem.query.new_empty(0)
    return _share_trace(replace(problem, query=e, key=e, value=e), problem)


def _checked_offsets(query, key, cu_seq_q, cu_seq_k, seqused_k, max_q, max_k):
    """varlen_attn's offsets, seqused_k, max_q and max_k checked: CPU int64 (cq, ck, used)."""
    Tq, Tk = query.shape[0], key.shape[0]
    cq = _check_offsets(cu_seq_q, "cu_seq_q", Tq, query.device, "query")
    if cu_seq_k is None:
        cu_seq_k = cu_seq_q
    ck = _check_offsets(cu_seq_k, "cu_seq_k", Tk, query.device, "key")
    if cq.numel() != ck.numel():
        raise ValueError(f"cu_seq_q and cu_seq_k must have the same length B+1, got "
                         f"{cq.numel()} and {ck.numel()}")
    k_len = ck[1:] - ck[:-1]
    used = _check_seqused(seqused_k, k_len, query.device)
    _check_max(max_q, "max_q", cq[1:] - cq[:-1], "query sequence")
    _check_max(max_k, "max_k", k_len if used is None else used, "key sequence")
    return cq, ck, used


def _wants_lse(return_aux) -> bool:
    if return_aux is None:
        return False
    if not hasattr(return_aux, "lse"):
        raise TypeError(f"return_aux must be an AuxRequest or None, got "
                        f"{type(return_aux).__name__}")
    if getattr(return_aux, "max_scores", False):
        raise ValueError("varlen_attn returns only lse: AuxRequest(max_scores=True) is "
                         "not supported")
    return bool(return_aux.lse)


def _check_seqused_grad(seqused_k, query, key, value):
    if seqused_k is not None and _wants_grad(query, key, value):
        raise RuntimeError(
            "seqused_k is an inference-only parameter (as in torch's varlen_attn): it gives "
            "no gradients. Run under torch.no_grad() / torch.inference_mode(), or detach "
            "query, key and value"
        )


# ------------------------------------------------------------ without autograd, compile


def _packed_problem(query, key, value, cq, ck, used, window, top_left, scale, enable_gqa):
    from ._flex import flex_problem

    _, bm = _build(cq, ck, used, window, top_left, (_DEFAULT_BLOCK,) * 2, query.device)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    return flex_problem(q4, k4, v4, None, bm, scale, enable_gqa)


def _check_scale(scale):
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(float(scale))):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")


def packed_forward(query, key, value, cq, ck, used, window, top_left, scale, enable_gqa,
                   grad_enabled=None):
    """out ``(total_q, Hq, Dv)`` and lse ``(Hq, total_q)`` of a packed jagged batch
    without autograd (validated offsets as CPU int64 tensors, the window resolved):
    the backend layer's kernels, for callers below autograd (the custom ops
    torch.compile traces, aten's flash ops when attn is PyTorch's flash implementation)."""
    from ._flex import forward_problem

    _check_scale(scale)
    Tq, Hq, _ = query.shape
    if Tq == 0 or key.shape[0] == 0:
        ldt = torch.float64 if query.dtype == torch.float64 else torch.float32
        return (query.new_zeros(Tq, Hq, value.shape[2]),
                torch.full((Hq, Tq), float("-inf"), dtype=ldt, device=query.device))
    problem = _packed_problem(query, key, value, cq, ck, used, window, top_left, scale,
                              enable_gqa)
    out, lse, _ = forward_problem(problem, grad_enabled)
    return out[0].transpose(0, 1).contiguous(), lse[0]


def packed_backward(grad_out, grad_lse, query, key, value, out, lse, cq, ck, window,
                    top_left, scale, enable_gqa):
    """dq, dk, dv (packed, contiguous) of :func:`packed_forward`."""
    from ._flex import backward_problem

    if query.shape[0] == 0 or key.shape[0] == 0:
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    problem = _packed_problem(query, key, value, cq, ck, None, window, top_left, scale,
                              enable_gqa)
    go4, o4 = (t.transpose(0, 1).unsqueeze(0) for t in (grad_out, out))
    gl4 = None if grad_lse is None else grad_lse.unsqueeze(0)
    dq, dk, dv = backward_problem(problem, o4, lse.unsqueeze(0), go4, gl4)
    return tuple(t[0].transpose(0, 1).contiguous() for t in (dq, dk, dv))


# While torch.compile traces, varlen_attn is one custom op: the offsets are read (and
# checked) on the host and the block mask is built from them at run time, which a
# trace cannot do (their values decide shapes); the fake implementation needs only the
# packed shapes.
@torch.library.custom_op("attn::varlen_forward", mutates_args=())
def varlen_forward_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor,
    seqused_k: Optional[Tensor],
    max_q: int,
    max_k: int,
    scale: Optional[float],
    window_left: int,
    window_right: int,
    top_left: bool,
    enable_gqa: bool,
    grad_enabled: bool,
) -> tuple[Tensor, Tensor]:
    cq, ck, used = _checked_offsets(query, key, cu_seq_q, cu_seq_k, seqused_k, max_q, max_k)
    out, lse = packed_forward(query, key, value, cq, ck, used, (window_left, window_right),
                              top_left, scale, enable_gqa, grad_enabled)
    return out, lse.contiguous()


@varlen_forward_op.register_fake
def _(query, key, value, *args):
    Tq, Hq, _ = query.shape
    ldt = torch.float64 if query.dtype == torch.float64 else torch.float32
    return query.new_empty(Tq, Hq, value.shape[2]), query.new_empty(Hq, Tq, dtype=ldt)


@torch.library.custom_op("attn::varlen_backward", mutates_args=())
def varlen_backward_op(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor,
    scale: Optional[float],
    window_left: int,
    window_right: int,
    top_left: bool,
    enable_gqa: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    cq = _check_offsets(cu_seq_q, "cu_seq_q", query.shape[0], query.device, "query")
    ck = _check_offsets(cu_seq_k, "cu_seq_k", key.shape[0], query.device, "key")
    return packed_backward(grad_out, grad_lse, query, key, value, out, lse, cq, ck,
                           (window_left, window_right), top_left, scale, enable_gqa)


@varlen_backward_op.register_fake
def _(grad_out, grad_lse, query, key, value, *rest):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _varlen_setup_context(ctx, inputs, output):
    query, key, value, cu_seq_q, cu_seq_k = inputs[:5]
    scale, wl, wr, top_left, enable_gqa = inputs[8:13]
    out, lse = output
    ctx.save_for_backward(query, key, value, cu_seq_q, cu_seq_k, out, lse)
    ctx.args = (scale, wl, wr, top_left, enable_gqa)


def _varlen_backward(ctx, grad_out, grad_lse):
    query, key, value, cu_seq_q, cu_seq_k, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = varlen_backward_op(grad_out, grad_lse, query, key, value, out, lse,
                                    cu_seq_q, cu_seq_k, *ctx.args)
    return (dq, dk, dv) + (None,) * 11


varlen_forward_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _compiled_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux,
                     scale, window_size, enable_gqa, seqused_k):
    """varlen_attn while torch.compile traces: one attn::varlen_forward op."""
    left, right = _check_window(window_size)
    want_lse = _wants_lse(return_aux)
    _check_seqused_grad(seqused_k, query, key, value)
    _check_scale(scale)
    out, lse = varlen_forward_op(query, key, value, cu_seq_q,
                                 cu_seq_q if cu_seq_k is None else cu_seq_k, seqused_k,
                                 max_q, max_k, None if scale is None else float(scale),
                                 left, right, False, bool(enable_gqa),
                                 torch.is_grad_enabled())
    return (out, lse) if want_lse else out


# --------------------------------------------------------------------------- nested


def _jagged_parts(t: Tensor):
    """(packed (T, H, D) view, offsets, lengths or None) of a (B, H, j, D) jagged NT."""
    t_t = t.transpose(1, 2)  # (B, j, H, D): values() is the (T, H, D) buffer, no copy
    return t_t.values(), t_t.offsets(), t_t.lengths()


def _pack_holes(values: Tensor, offsets: Tensor, lengths: Tensor):
    """A jagged NT with holes (offsets + lengths, e.g. from narrow()): gather its tokens
    into a packed copy, differentiably. Returns (packed, cu, token index)."""
    starts = offsets[:-1].to(torch.int64)
    lengths = lengths.to(torch.int64)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    T = int(cu[-1])
    doc = _token_docs(cu, T)
    idx = starts[doc] + torch.arange(T, device=values.device) - cu[doc] if T else doc
    return values.index_select(0, idx), cu, idx


def nested_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p=0.0,
                is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> Tensor:
    r"""``scaled_dot_product_attention`` on jagged nested tensors, as PyTorch's SDPA takes
    them: ``torch.nested.nested_tensor([...], layout=torch.jagged)`` of ``(j, H, D)``
    components, transposed to ``(B, H, j, D)``. Returns a jagged nested tensor
    ``(B, Hq, j_q, Dv)`` on the query's offsets (the same ragged size as ``query``),
    with gradients to the nested inputs.

    The packed ``(total, H, D)`` buffers are read in place (``values()`` of the
    ``(B, j, H, D)`` view, no copy) and run through :func:`varlen_attn`'s kernels; key
    and value must share their offsets. A nested tensor with holes (offsets plus
    lengths, e.g. from ``narrow``) is gathered into a packed copy first.

    ``is_causal`` is top-left aligned per sequence, SDPA's documented rule (query ``i``
    sees keys ``j <= i``; PyTorch's nested EFFICIENT kernel does the same). When the
    query and key lengths of a sequence are equal it coincides with varlen's
    bottom-right causal; when they differ, PyTorch's nested FLASH path, which passes
    ``is_causal`` to FlashAttention's varlen kernel, aligns bottom-right instead, so
    PyTorch's own result depends on its backend there. For ``Lq = 3, Lk = 5``::

          k 0 1 2 3 4
        q 0 █
          1 █ █
          2 █ █ █

    ``attn_mask`` must be None (PyTorch's jagged SDPA does not take masks either);
    ``dropout_p`` must be 0. A nested tensor whose ragged dim is dim 1 (a ragged *batch*
    dim, ``(B, j, H, L, D)``-like) runs as dense SDPA on its buffer, as in PyTorch.
    """
    from .functional import scaled_dot_product_attention

    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or not t.is_nested:
            raise ValueError(f"nested_sdpa expects query, key and value to be nested tensors; "
                             f"{name} is not")
        if t.layout != torch.jagged:
            raise ValueError(f"{name} must be a jagged-layout nested tensor "
                             f"(layout=torch.jagged), got {t.layout}")
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported with nested tensors (as in PyTorch's "
                         "jagged SDPA); express the mask with is_causal or varlen_attn's "
                         "window_size")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: attn has no attention dropout; pass "
                                  "dropout_p=0.0")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    ragged = {query._ragged_idx, key._ragged_idx, value._ragged_idx}
    if len(ragged) != 1:
        raise ValueError("query, key and value must be ragged on the same dim, got "
                         f"{query._ragged_idx}, {key._ragged_idx}, {value._ragged_idx}")
    if query._ragged_idx == 1 and min(t.dim() for t in (query, key, value)) > 3:
        # A ragged batch-like dim: the buffers are ordinary dense SDPA inputs.
        out = scaled_dot_product_attention(query.values(), key.values(), value.values(),
                                           is_causal=is_causal, scale=scale,
                                           enable_gqa=enable_gqa)
        return torch.nested.nested_tensor_from_jagged(
            out, query.offsets(), query.lengths(), min_seqlen=query._maybe_min_seqlen,
            max_seqlen=query._maybe_max_seqlen)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4 or t._ragged_idx != 2:
            raise ValueError(f"{name} must be a (B, H, j, D) jagged nested tensor (components "
                             f"(j, H, D), then .transpose(1, 2)), got shape {tuple(t.shape)} "
                             f"ragged on dim {t._ragged_idx}")
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(f"query, key and value must have the same batch size, got "
                         f"{query.shape[0]}, {key.shape[0]}, {value.shape[0]}")
    qv, q_off, q_len = _jagged_parts(query)
    kv_, k_off, k_len = _jagged_parts(key)
    vv, v_off, v_len = _jagged_parts(value)
    same_kv = (v_off is k_off or torch.equal(_host_values(v_off), _host_values(k_off))) and (
        (k_len is None) == (v_len is None)
        and (k_len is None or torch.equal(_host_values(k_len), _host_values(v_len))))
    if not same_kv:
        raise ValueError("key and value must have the same sequence lengths (offsets)")
    q_idx = None
    if q_len is not None:
        qv, cu_q, q_idx = _pack_holes(qv, q_off, q_len)
    else:
        cu_q = q_off
    if k_len is not None:
        kv_, cu_k, _ = _pack_holes(kv_, k_off, k_len)
        vv, _, _ = _pack_holes(vv, v_off, v_len)
    else:
        cu_k = k_off
    _check_packed(qv, kv_, vv, enable_gqa)
    cq = _check_offsets(cu_q, "query offsets", qv.shape[0], None, "query")
    ck = _check_offsets(cu_k, "key offsets", kv_.shape[0], None, "key")
    window = (-1, 0) if is_causal else (-1, -1)
    out, _ = _run(qv, kv_, vv, cq, ck, None, window, True, scale, enable_gqa)
    if q_idx is not None:
        # Back into the query's holey buffer layout; the holes hold zeros.
        full = out.new_zeros(query.transpose(1, 2).values().shape[0], *out.shape[1:])
        out = full.index_copy(0, q_idx, out)
    res = torch.nested.nested_tensor_from_jagged(
        out, q_off, q_len, min_seqlen=query._maybe_min_seqlen,
        max_seqlen=query._maybe_max_seqlen)
    return res.transpose(1, 2)
