"""Block-sparse attention masks in FlexAttention's layout.

A drop-in for ``torch.nn.attention.flex_attention``'s ``BlockMask``, ``create_block_mask``,
``create_mask``, ``and_masks``, ``or_masks`` and ``noop_mask``: the same names, defaults
and tensor values, so code written for FlexAttention runs unchanged, and masks move
between the two libraries (``as_block_mask`` accepts torch's ``BlockMask``; torch's eager
``flex_attention`` accepts ours, because it reads a mask only through ``as_tuple``).

Layout (per batch ``b`` and head ``h``; ``nQB = ceil(Lq / Q_BLOCK)``, ``nKVB = ceil(Lk /
KV_BLOCK)``)::

    kv_num_blocks[b, h, i]          number of *partial* kv blocks of q block i
    kv_indices[b, h, i, :num]       which ones (torch lists them in ascending order)
    full_kv_num_blocks / _indices   the same for *full* blocks (mask_mod is all True there,
                                    so kernels skip it); None = every listed block is partial
    q_num_blocks / q_indices        the transposes, for the dK/dV pass (per kv block, the
    full_q_num_blocks / _indices    q blocks that see it)

Batch or head dims of size 1 broadcast. Entries of a row past ``num`` are padding: torch
fills them with the unlisted block indices in ascending order, and so do we.

Block classification follows torch exactly: a block is *full* when mask_mod is True on all
of its ``Q_BLOCK x KV_BLOCK`` elements, counting positions past the sequence end as False
(torch pads the dense mask with False), so an edge block of a ragged length is never full;
*partial* when some element is True; absent when none is.
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import re
import warnings
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BlockMask",
    "KernelLists",
    "ModSignatureError",
    "and_masks",
    "as_block_mask",
    "create_block_mask",
    "create_mask",
    "noop_mask",
    "or_masks",
]

_DEFAULT_SPARSE_BLOCK_SIZE = 128

# Elements of one (b, h, q, kv) box the torch evaluator materialises at a time. Mods such
# as ``q - kv <= w`` make int64 temporaries of the box's size; at 1 Mi elements (8 MiB)
# they stay in cache while per-call overhead stays small. Measured at L = 32k on 2 cores
# (sliding window / causal): 4 Mi 4.8 s / 1.0 s, 1 Mi 2.0 s / 1.0 s, 256 Ki 3.1 s / 1.7 s.
_EVAL_BUDGET = 1 << 20

# Every byte of a torch bool is 0 or 1, so 8 bools read as one int64 are all True exactly
# when the word equals this; it lets the block reductions run on 8x fewer elements.
_ALL_TRUE_WORD = 0x0101010101010101


class ModSignatureError(TypeError, AssertionError):
    """A mod with the wrong number of positional arguments, or the wrong kind of mod.

    A ``TypeError``; also an ``AssertionError`` because that is what FlexAttention raises
    for the same mistake, so code written against torch keeps catching it.
    """


class _NotCallableError(TypeError, RuntimeError):
    """torch's and_masks/or_masks raise RuntimeError for a non-callable; TypeError is the
    honest type, and inheriting both keeps torch-style handlers working."""


# --------------------------------------------------------------------------- mods


def noop_mask(batch: Tensor, head: Tensor, token_q: Tensor, token_kv: Tensor) -> Tensor:
    """The mask_mod that keeps every position."""
    return batch.new_ones(size=(), dtype=torch.bool, device=batch.device)


def _mod_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _identifier(text: str) -> str:
    """A readable Python identifier: generated code (FX graphs, Numba functions) names
    functions after ``__name__``."""
    out = re.sub(r"\W", "_", text)
    return out if out and not out[0].isdigit() else "_" + out


def _positional_arity(fn) -> int:
    """Positional parameters without defaults: 4 means a mask_mod, 5 a score_mod (the
    rule FlexAttention uses)."""
    if not callable(fn):
        raise _NotCallableError(f"expected a mask_mod or score_mod function, got {fn!r}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise ModSignatureError(f"cannot read the signature of {fn!r}: {e}") from e
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def _mod_kind(fn, arg_name: str = "mod_fn") -> int:
    n = _positional_arity(fn)
    if n not in (4, 5):
        raise ModSignatureError(
            f"{arg_name} {_mod_name(fn)!r} takes {n} positional arguments; a mask_mod takes 4 "
            f"(b, h, q_idx, kv_idx) and a score_mod 5 (score, b, h, q_idx, kv_idx). "
            f"Expected 4 or 5 positional args, got {n}"
        )
    return n


def and_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod that is True where every one of ``mask_mods`` is (all True if none)."""
    for m in mask_mods:
        if not callable(m):
            raise _NotCallableError(
                f"and_masks: every argument must be a callable mask_mod, got {m!r}"
            )

    def and_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = b.new_ones((), dtype=torch.bool)
        for mod in mask_mods:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    and_mask.__name__ = _identifier("and_masks_" + "_".join(_mod_name(m) for m in mask_mods))
    return and_mask


def or_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod that is True where any one of ``mask_mods`` is (all False if none)."""
    for m in mask_mods:
        if not callable(m):
            raise _NotCallableError(
                f"or_masks: every argument must be a callable mask_mod, got {m!r}"
            )

    def or_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = b.new_zeros((), dtype=torch.bool)
        for mod in mask_mods:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    or_mask.__name__ = _identifier("or_masks_" + "_".join(_mod_name(m) for m in mask_mods))
    return or_mask


# --------------------------------------------------------------------------- evaluation


class _BroadcastFailed(Exception):
    """The mod does not evaluate correctly under plain broadcasting; use torch.vmap."""


class _ModReturnTypeError(TypeError):
    """A mask_mod returned something other than bool: a user error, not a reason to
    retry under vmap."""


def _get_item_to_index():
    # torch evaluates mods under vmap inside this context so that ``table[idx]`` with a
    # batched 0-d index becomes aten.index; it is private, so degrade to plain vmap
    # (which handles most mods) if a later torch moves it.
    try:
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

        return TransformGetItemToIndex()
    except Exception:  # pragma: no cover - depends on torch internals
        import contextlib

        return contextlib.nullcontext()


class _ModEvaluator:
    """Evaluates a mask_mod (or a score_mod on a zero score) on boxes of indices.

    FlexAttention's mods are written for scalars and run under ``torch.vmap``; nearly all
    of them are also correct under broadcasting, which is several times faster, so we
    try broadcasting first (index tensors of shapes (B,1,1,1), (1,H,1,1), (1,1,Q,1),
    (1,1,1,K)) and fall back to vmap when the mod raises or returns a shape that is not
    the broadcast of its inputs (e.g. ``table[q][kv]``, which indexes a different axis
    once q is not a scalar).
    """

    def __init__(self, fn, n_args: int, B: int, H: int, device, mode: str):
        self.fn = fn
        self.is_score = n_args == 5
        self.device = device
        self.mode = mode
        self.b_dep = self.h_dep = True
        if mode == "broadcast":
            # One (q, kv) point over every b and h tells whether the result depends on b
            # or h at all; a mod that does not is evaluated once and broadcast, which
            # saves a factor B*H for causal-like masks.
            out = self._broadcast(0, B, 0, H, 0, 1, 0, 1)
            self.b_dep, self.h_dep = out.shape[0] > 1, out.shape[1] > 1
        else:
            fn = self.fn
            prefix = (0,) if self.is_score else ()
            for dims in (
                (None, None, None, 0),
                (None, None, 0, None),
                (None, 0, None, None),
                (0, None, None, None),
            ):
                fn = torch.vmap(fn, in_dims=prefix + dims)
            self._vmapped = fn

    def _ranges(self, b0, b1, h0, h1, q0, q1, k0, k1):
        return [
            torch.arange(lo, hi, device=self.device)
            for lo, hi in ((b0, b1), (h0, h1), (q0, q1), (k0, k1))
        ]

    def _check(self, out):
        if not isinstance(out, Tensor):
            out = torch.as_tensor(out, device=self.device)
        if not self.is_score and out.dtype != torch.bool:
            raise _ModReturnTypeError(
                f"mask_mod {_mod_name(self.fn)!r} must return a bool tensor, got {out.dtype}"
            )
        return out

    def _broadcast(self, b0, b1, h0, h1, q0, q1, k0, k1) -> Tensor:
        b, h, q, k = self._ranges(b0, b1, h0, h1, q0, q1, k0, k1)
        args = [b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), q.view(1, 1, -1, 1), k.view(1, 1, 1, -1)]
        if self.is_score:
            args.insert(0, torch.zeros((), device=self.device))
        want = torch.Size((b1 - b0, h1 - h0, q1 - q0, k1 - k0))
        try:
            out = self._check(self.fn(*args))
        except _ModReturnTypeError:
            raise
        except Exception as e:
            raise _BroadcastFailed(repr(e)) from e
        if out.dim() > 4:
            raise _BroadcastFailed(f"result has shape {tuple(out.shape)}, more than 4 dims")
        out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
        try:
            ok = torch.broadcast_shapes(out.shape, want) == want
        except RuntimeError:
            ok = False
        if not ok:
            raise _BroadcastFailed(
                f"result shape {tuple(out.shape)} does not broadcast to {tuple(want)}"
            )
        return out

    def __call__(self, b0, b1, h0, h1, q0, q1, k0, k1) -> Tensor:
        """The mod on the box; a bool tensor broadcastable to (b1-b0, h1-h0, q1-q0, k1-k0)
        (a float one for a score_mod)."""
        if self.mode == "broadcast":
            return self._broadcast(b0, b1, h0, h1, q0, q1, k0, k1)
        b, h, q, k = self._ranges(b0, b1, h0, h1, q0, q1, k0, k1)
        args = (b, h, q, k)
        if self.is_score:
            args = (torch.zeros(b1 - b0, h1 - h0, q1 - q0, k1 - k0, device=self.device),) + args
        with _get_item_to_index():
            return self._check(self._vmapped(*args))


def _evaluate_with_fallback(fn, n_args, B, H, device, work):
    """Run ``work(evaluator)`` under broadcasting, and again under vmap if broadcasting
    turns out not to be valid for this mod."""
    try:
        return work(_ModEvaluator(fn, n_args, B, H, device, "broadcast"))
    except _BroadcastFailed as first:
        try:
            return work(_ModEvaluator(fn, n_args, B, H, device, "vmap"))
        except _ModReturnTypeError:
            raise
        except Exception as e:
            raise RuntimeError(
                f"could not evaluate {_mod_name(fn)!r}: under broadcasting it failed with {first}; "
                f"under torch.vmap with {e!r}. Mods must be elementwise functions of 0-d tensors "
                f"(no Python control flow on tensor values, no .item())."
            ) from e


def _segments(padded_len: int, block: int, chunk: int):
    """Split [0, padded_len) into pieces of about ``chunk`` that never straddle a block
    boundary: whole runs of blocks when chunk >= block, else sub-pieces of one block.
    Yields (start, stop, first_block, n_blocks)."""
    if chunk >= block:
        step = chunk // block * block
        for s in range(0, padded_len, step):
            e = min(s + step, padded_len)
            yield s, e, s // block, (e - s) // block
    else:
        for blk in range(padded_len // block):
            for s in range(blk * block, (blk + 1) * block, chunk):
                yield s, min(s + chunk, (blk + 1) * block), blk, 1


def _reduce_blocks(m: Tensor, n_rb: int, n_cb: int):
    """(any, all) per block of a bool (b, h, R, C) tile holding n_rb x n_cb blocks."""
    nb, nh, R, C = m.shape
    rows, cols = R // n_rb, C // n_cb
    m = m.contiguous()
    if cols % 8 == 0 and m.storage_offset() % 8 == 0:
        w = m.view(torch.int64).view(nb, nh, n_rb, rows, n_cb, cols // 8)
        row_any = (w != 0).any(-1)
        row_all = (w == _ALL_TRUE_WORD).all(-1)
    else:
        m = m.reshape(nb, nh, n_rb, rows, n_cb, cols)
        row_any = m.any(-1)
        row_all = m.all(-1)
    return row_any.any(3), row_all.all(3)


def _block_classes_torch(mask_mod, B, H, Lq, Lk, BQ, BKV, device):
    nqb, nkb = -(-Lq // BQ), -(-Lk // BKV)
    Qp, Kp = nqb * BQ, nkb * BKV

    def work(ev: _ModEvaluator):
        Be = B if ev.b_dep else 1
        He = H if ev.h_dep else 1
        any_acc = torch.zeros(Be, He, nqb, nkb, dtype=torch.bool, device=device)
        all_acc = torch.ones(Be, He, nqb, nkb, dtype=torch.bool, device=device)
        # Tile: whole rows first (the reductions run along contiguous kv), then more rows,
        # then more (b, h) pairs, within the element budget.
        C = min(Kp, _EVAL_BUDGET)
        R = min(Qp, max(1, _EVAL_BUDGET // C))
        bh = max(1, _EVAL_BUDGET // (R * C))
        hc = min(He, bh)
        bc = min(Be, max(1, bh // hc))
        for b0 in range(0, Be, bc):
            b1 = min(b0 + bc, Be)
            for h0 in range(0, He, hc):
                h1 = min(h0 + hc, He)
                for q0, q1, qb, n_rb in _segments(Qp, BQ, R):
                    for k0, k1, kb, n_cb in _segments(Kp, BKV, C):
                        blocks = (
                            slice(b0, b1),
                            slice(h0, h1),
                            slice(qb, qb + n_rb),
                            slice(kb, kb + n_cb),
                        )
                        qv, kv = min(q1, Lq), min(k1, Lk)
                        if qv <= q0 or kv <= k0:  # the tile is all padding
                            all_acc[blocks] = False
                            continue
                        m = ev(b0, b1, h0, h1, q0, qv, k0, kv).expand(
                            b1 - b0, h1 - h0, qv - q0, kv - k0
                        )
                        if qv < q1 or kv < k1:
                            # Positions past the sequence end count as False, as in torch.
                            padded = m.new_zeros(b1 - b0, h1 - h0, q1 - q0, k1 - k0)
                            padded[:, :, : qv - q0, : kv - k0] = m
                            m = padded
                        a, f = _reduce_blocks(m, n_rb, n_cb)
                        any_acc[blocks] |= a
                        all_acc[blocks] &= f
        return all_acc, any_acc

    full, visible = _evaluate_with_fallback(mask_mod, 4, B, H, device, work)
    full = full.expand(B, H, nqb, nkb)
    partial = (visible & ~full).expand(B, H, nqb, nkb)
    return full, partial


def _block_classes(mask_mod, B, H, Lq, Lk, BQ, BKV, device="cpu"):
    """(full, partial): bool (B, H, ceil(Lq/BQ), ceil(Lk/BKV)) tensors on ``device``.

    The single place create_block_mask evaluates a mask_mod, so a faster evaluator (the
    Numba-compiled ``attn._modgen.block_classes``) replaces this one call. This one runs
    the mod with torch ops in bounded chunks: memory O(_EVAL_BUDGET + B*H*nQB*nKVB),
    never O(Lq * Lk).
    """
    try:
        from . import _modgen

        compiled = _modgen.trace_mask_mod(mask_mod)
    except (TypeError, NotImplementedError, ValueError):
        # A mod the compiler cannot translate still gets a block mask, evaluated by
        # torch (slower); running it in a kernel is what will then fail, clearly.
        compiled = None
    if compiled is not None:
        full, partial = _modgen.block_classes(compiled, B, H, Lq, Lk, BQ, BKV)
        full, partial = full.to(device), partial.to(device)
    else:
        full, partial = _block_classes_torch(mask_mod, B, H, Lq, Lk, BQ, BKV, device)
    return _demote_ragged_edges(full, partial, Lq, Lk, BQ, BKV)


def _demote_ragged_edges(full: Tensor, partial: Tensor, Lq: int, Lk: int, BQ: int, BKV: int):
    """torch pads the dense mask with False to whole blocks, so a block that sticks out
    past Lq or Lk is never full there, only partial. Evaluators that look at in-range
    elements only would call it full; this keeps every evaluator's lists equal to
    torch's."""
    ragged = torch.zeros(full.shape[-2:], dtype=torch.bool, device=full.device)
    if Lq % BQ:
        ragged[-1, :] = True
    if Lk % BKV:
        ragged[:, -1] = True
    if not bool(ragged.any()):
        return full, partial
    return full & ~ragged, partial | (full & ragged)


# --------------------------------------------------------------------------- layout helpers


def _ordered(dense: Tensor):
    """Bool (..., R, C) -> (num (..., R), indices (..., R, C)) int32, listed columns
    first in ascending order, then the unlisted ones ascending (torch's order: its
    stable descending argsort of the 0/1 matrix)."""
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.sort((~dense).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return num.contiguous(), idx.contiguous()


def _listed(num: Tensor, idx: Tensor) -> Tensor:
    """Bool (..., W): which entries of each row are within its count."""
    return torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)


def _to_dense_bool(num: Tensor, idx: Tensor, n_cols: int) -> Tensor:
    """Bool (..., R, n_cols) with True at every listed (row, column)."""
    listed = _listed(num, idx)
    # Unlisted entries write to a spare column that is then cut off.
    target = torch.where(listed, idx.long(), n_cols)
    dense = torch.zeros(*idx.shape[:-1], n_cols + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, target, True)
    return dense[..., :n_cols]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _normalize_block_size(BLOCK_SIZE, arg: str = "BLOCK_SIZE") -> tuple[int, int]:
    if isinstance(BLOCK_SIZE, int) and not isinstance(BLOCK_SIZE, bool):
        sizes = (BLOCK_SIZE, BLOCK_SIZE)
    elif isinstance(BLOCK_SIZE, (tuple, list)) and len(BLOCK_SIZE) == 2:
        sizes = tuple(BLOCK_SIZE)
    else:
        raise TypeError(
            f"{arg} must be a positive int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair, got {BLOCK_SIZE!r}"
        )
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
            raise ValueError(f"{arg} must be positive ints, got {BLOCK_SIZE!r}")
    return sizes


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _first_bad(bad: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _check_lists(num, idx, num_name: str, idx_name: str):
    """Validate one (num, indices) pair; returns them as 4-D tensors (B, H, R, W)."""
    for t, name in ((num, num_name), (idx, idx_name)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(
                f"{name} must have dtype torch.int32, got {t.dtype} (convert with .to(torch.int32))"
            )
    if not 2 <= idx.dim() <= 4:
        raise ValueError(
            f"{idx_name} must have 2 to 4 dims ([B, [H,]] rows, max_blocks), got shape {tuple(idx.shape)}"
        )
    if num.dim() != idx.dim() - 1 or num.shape != idx.shape[:-1]:
        raise ValueError(
            f"{num_name} must have shape {idx_name}.shape[:-1] = {tuple(idx.shape[:-1])}, got {tuple(num.shape)}"
        )
    if num.device != idx.device:
        raise ValueError(f"{num_name} is on {num.device} but {idx_name} on {idx.device}")
    while idx.dim() < 4:
        idx, num = idx.unsqueeze(0), num.unsqueeze(0)
    W = idx.shape[-1]
    bad = (num < 0) | (num > W)
    if bad.any():
        pos = _first_bad(bad)
        raise ValueError(
            f"{num_name}{list(pos)} = {int(num[pos])} is outside [0, {W}] "
            f"({idx_name} has {W} columns, one per kv block)"
        )
    listed = _listed(num, idx)
    bad = listed & ((idx < 0) | (idx >= W))
    if bad.any():
        pos = _first_bad(bad)
        raise ValueError(
            f"{idx_name}{list(pos)} = {int(idx[pos])} is out of range [0, {W}): a BlockMask has one column "
            f"per block, so block indices are < {idx_name}.shape[-1]"
        )
    dense = _to_dense_bool(num, idx, W)
    dup = dense.sum(-1, dtype=torch.int32) != num
    if dup.any():
        pos = _first_bad(dup)
        raise ValueError(f"{idx_name}{list(pos)} lists a block twice; kernels would visit it twice")
    return num, idx, dense


def _sliced_mod(base, maps, BQ):
    """base's mask_mod seen through an index selection: (bmap, hmap, qmap), each None for
    an untouched dim, an int for a dim reduced to one entry (it broadcasts, so every b
    reads that entry), or an index tensor."""
    bmap, hmap, qmap = maps

    def remap(x, m):
        if m is None:
            return x
        if isinstance(m, int):
            return x * 0 + m
        return m[x]

    def sliced_mask_mod(b, h, q_idx, kv_idx):
        if qmap is not None:
            q_idx = remap(q_idx // BQ, qmap) * BQ + q_idx % BQ
        return base(remap(b, bmap), remap(h, hmap), q_idx, kv_idx)

    sliced_mask_mod.__name__ = _identifier(f"{_mod_name(base)}_sliced")
    return sliced_mask_mod


def _split_lists(self, BM: int, BN: int) -> "KernelLists":
    """kernel_lists for tiles that also split the kv blocks (BN < KV_BLOCK_SIZE): every
    sub-tile inherits its block's class. Through the block-level dense picture, which
    is B*H*nQT*nKT booleans (tiny next to the mask it describes), in ascending order."""
    QB, KB = self.BLOCK_SIZE
    Lq, Lk = self.seq_lengths
    n_qt, n_kt = _cdiv(Lq, BM), _cdiv(Lk, BN)
    device = self.kv_indices.device
    rows = torch.arange(n_qt, device=device) // (QB // BM)
    cols = torch.arange(n_kt, device=device) // (KB // BN)
    n_kb = self.kv_indices.shape[-1]

    def tiles(num, idx):
        if num is None:
            B, H = self.kv_indices.shape[:2]
            return torch.zeros(B, H, n_qt, n_kt, dtype=torch.bool, device=device)
        return _to_dense_bool(num, idx, n_kb)[:, :, rows][..., cols]

    part = tiles(self.kv_num_blocks, self.kv_indices)
    full = tiles(self.full_kv_num_blocks, self.full_kv_indices)
    kv_num, kv_idx = _ordered(part)
    fkv_num, fkv_idx = _ordered(full)
    q_num, q_idx = _ordered(part.transpose(-2, -1))
    fq_num, fq_idx = _ordered(full.transpose(-2, -1))
    return KernelLists(kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx, BM, BN)


class KernelLists(NamedTuple):
    """Block lists re-expressed at a kernel's tile size (``BLOCK_M`` queries by
    ``BLOCK_N`` keys); all int32, contiguous, with batch/head dims as in the mask (size 1
    broadcasts). ``nQT = ceil(Lq / BLOCK_M)``, ``nKB = ceil(Lk / BLOCK_N)``.

    kv_num_blocks, kv_indices            (B, H, nQT), (B, H, nQT, nKB): partial kv blocks
    full_kv_num_blocks, full_kv_indices  the same for full blocks (count 0 when the mask
                                         has no full-block distinction)
    q_num_blocks, q_indices              (B, H, nKB), (B, H, nKB, nQT): per kv block, the
    full_q_num_blocks, full_q_indices    q tiles that see it (partially / fully)

    Entries past a row's count are in range but meaningless.
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor
    full_q_indices: Tensor
    BLOCK_M: int
    BLOCK_N: int


# --------------------------------------------------------------------------- BlockMask


class BlockMask:
    """A block-sparse attention mask in FlexAttention's layout (see the module docstring).

    Build one with :func:`create_block_mask` from a mask_mod, or with
    :meth:`from_kv_blocks` from block lists; both compute the ``q_*`` transposes.
    Kernels take :meth:`kernel_lists`.
    """

    # Deterministic-dQ metadata of torch >= 2.13's BlockMask; always None here, kept so
    # ``as_tuple`` has torch's layout and torch's flex_attention accepts this class.
    dq_write_order = None
    dq_write_order_full = None
    dq_kv_order = None
    dq_kv_order_spt = None

    def __init__(
        self,
        seq_lengths: tuple[int, int],
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Tensor | None = None,
        full_kv_indices: Tensor | None = None,
        q_num_blocks: Tensor | None = None,
        q_indices: Tensor | None = None,
        full_q_num_blocks: Tensor | None = None,
        full_q_indices: Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = (
            _DEFAULT_SPARSE_BLOCK_SIZE,
            _DEFAULT_SPARSE_BLOCK_SIZE,
        ),
        mask_mod: Callable | None = None,
    ) -> None:
        BLOCK_SIZE = _normalize_block_size(BLOCK_SIZE)
        kv_num_blocks, kv_indices, dense = _check_lists(
            kv_num_blocks, kv_indices, "kv_num_blocks", "kv_indices"
        )
        _, _, R, W = kv_indices.shape
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError(
                "full_kv_num_blocks and full_kv_indices must be both given or both None"
            )
        if full_kv_num_blocks is not None:
            full_kv_num_blocks, full_kv_indices, full_dense = _check_lists(
                full_kv_num_blocks, full_kv_indices, "full_kv_num_blocks", "full_kv_indices"
            )
            if (
                full_kv_indices.shape[2:] != kv_indices.shape[2:]
                or full_kv_indices.device != kv_indices.device
            ):
                raise ValueError(
                    f"full_kv_indices has shape {tuple(full_kv_indices.shape)} on "
                    f"{full_kv_indices.device}; its last two dims and device must match kv_indices "
                    f"{tuple(kv_indices.shape)} on {kv_indices.device}"
                )
            try:
                overlap = dense & full_dense
            except RuntimeError:
                raise ValueError(
                    f"the batch/head dims of full_kv_indices {tuple(full_kv_indices.shape[:2])} and kv_indices "
                    f"{tuple(kv_indices.shape[:2])} must be equal or 1"
                ) from None
            if overlap.any():
                pos = _first_bad(overlap)
                raise ValueError(
                    f"block (b, h, q_block, kv_block) = {pos} is listed as both partial and full; "
                    "kernels would visit it twice"
                )
        if not isinstance(seq_lengths, (tuple, list)) or len(seq_lengths) != 2:
            raise TypeError(f"seq_lengths must be a (Q_LEN, KV_LEN) pair, got {seq_lengths!r}")
        Lq = _check_positive_int(seq_lengths[0], "seq_lengths[0]")
        Lk = _check_positive_int(seq_lengths[1], "seq_lengths[1]")
        if _cdiv(Lq, BLOCK_SIZE[0]) > R or _cdiv(Lk, BLOCK_SIZE[1]) > W:
            raise ValueError(
                f"seq_lengths {(Lq, Lk)} with BLOCK_SIZE {BLOCK_SIZE} needs "
                f"{_cdiv(Lq, BLOCK_SIZE[0])} q blocks and {_cdiv(Lk, BLOCK_SIZE[1])} kv blocks, but "
                f"kv_indices covers {R} x {W} (shape {tuple(kv_indices.shape)})"
            )
        if (q_num_blocks is None) != (q_indices is None) or (full_q_num_blocks is None) != (
            full_q_indices is None
        ):
            raise ValueError(
                "q_num_blocks/q_indices and full_q_num_blocks/full_q_indices come in pairs"
            )
        if q_num_blocks is not None:
            q_num_blocks, q_indices, _ = _check_lists(
                q_num_blocks, q_indices, "q_num_blocks", "q_indices"
            )
        if full_q_num_blocks is not None:
            full_q_num_blocks, full_q_indices, _ = _check_lists(
                full_q_num_blocks, full_q_indices, "full_q_num_blocks", "full_q_indices"
            )
        if mask_mod is not None and not callable(mask_mod):
            raise TypeError(f"mask_mod must be callable or None, got {mask_mod!r}")

        self.seq_lengths = (Lq, Lk)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = BLOCK_SIZE
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Tensor | None = None,
        full_kv_indices: Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_SPARSE_BLOCK_SIZE,
        mask_mod: Callable | None = None,
        seq_lengths: tuple[int, int] | None = None,
        compute_q_blocks: bool = True,
    ) -> "BlockMask":
        """A BlockMask from kv block lists; computes the ``q_*`` transposes.

        ``seq_lengths`` defaults, as in torch, to the lengths the lists cover
        (``rows * Q_BLOCK_SIZE, columns * KV_BLOCK_SIZE``). Lists with fewer than 4 dims
        get leading batch/head dims of size 1.
        """
        BLOCK_SIZE = _normalize_block_size(BLOCK_SIZE)
        if seq_lengths is None and isinstance(kv_indices, Tensor) and kv_indices.dim() >= 2:
            seq_lengths = (
                kv_indices.shape[-2] * BLOCK_SIZE[0],
                kv_indices.shape[-1] * BLOCK_SIZE[1],
            )
        mask = cls(
            seq_lengths,
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            BLOCK_SIZE=BLOCK_SIZE,
            mask_mod=mask_mod,
        )
        if compute_q_blocks:
            partial, full = mask._dense_pair()
            mask.q_num_blocks, mask.q_indices = _ordered(partial.transpose(-2, -1))
            if full is not None:
                mask.full_q_num_blocks, mask.full_q_indices = _ordered(full.transpose(-2, -1))
        return mask

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields in torch 2.13's order: (Lq, Lk, kv_num_blocks, kv_indices,
        full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks,
        full_q_indices, dq_write_order, dq_write_order_full, dq_kv_order,
        dq_kv_order_spt, Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_mod); with ``flatten=False``
        the lengths and the block sizes stay pairs."""
        lengths = tuple(self.seq_lengths) if flatten else (self.seq_lengths,)
        sizes = tuple(self.BLOCK_SIZE) if flatten else (self.BLOCK_SIZE,)
        return (
            *lengths,
            self.kv_num_blocks,
            self.kv_indices,
            self.full_kv_num_blocks,
            self.full_kv_indices,
            self.q_num_blocks,
            self.q_indices,
            self.full_q_num_blocks,
            self.full_q_indices,
            self.dq_write_order,
            self.dq_write_order_full,
            self.dq_kv_order,
            self.dq_kv_order_spt,
            *sizes,
            self.mask_mod,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """(B, H, Q_LEN, KV_LEN), with B/H as stored (1 where the mask broadcasts)."""
        return tuple(self.kv_indices.shape[:-2]) + tuple(self.seq_lengths)

    def numel(self) -> int:
        """Elements of the (unsparsified) mask: the product of :attr:`shape`."""
        return math.prod(self.shape)

    def sparsity(self) -> float:
        """Percent of the mask's elements in blocks that are never visited, counting
        every visited block as a whole ``Q_BLOCK x KV_BLOCK`` (torch's definition; with
        ragged lengths it can therefore go slightly negative)."""
        visited = int(self.kv_num_blocks.sum())
        if self.full_kv_num_blocks is not None:
            visited += int(self.full_kv_num_blocks.sum())
        return 100 * (1 - visited * self.BLOCK_SIZE[0] * self.BLOCK_SIZE[1] / self.numel())

    def _dense_pair(self):
        W = self.kv_indices.shape[-1]
        partial = _to_dense_bool(self.kv_num_blocks, self.kv_indices, W)
        full = None
        if self.full_kv_num_blocks is not None:
            full = _to_dense_bool(self.full_kv_num_blocks, self.full_kv_indices, W)
        return partial, full

    def to_dense(self) -> Tensor:
        """Block-level (B, H, nQB, nKVB) int32: 1 where a block is visited (partial or
        full), 0 where it is skipped."""
        partial, full = self._dense_pair()
        if full is not None:
            partial = partial | full
        return partial.to(torch.int32)

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """A picture of the visited blocks, one per (batch, head) up to ``limit``.

        Each character pair summarises a cell of at most ``grid_size`` rows x columns of
        blocks: '██' all visited, '░░' some, '  ' none. ``grid_size=-1`` draws every block.
        """
        dense = self.to_dense()
        *batch_dims, n_rows, n_cols = dense.shape
        if grid_size == -1:
            max_rows, max_cols = n_rows, n_cols
        elif isinstance(grid_size, int):
            max_rows = max_cols = grid_size
        else:
            max_rows, max_cols = grid_size
        row_step = max(1, _cdiv(n_rows, max_rows))
        col_step = max(1, _cdiv(n_cols, max_cols))

        def picture(grid: Tensor) -> str:
            lines = []
            for r in range(0, n_rows, row_step):
                line = ""
                for c in range(0, n_cols, col_step):
                    frac = grid[r : r + row_step, c : c + col_step].float().mean().item()
                    line += ("█" if frac == 1 else " " if frac == 0 else "░") * 2
                lines.append(line)
            return "\n".join(lines) + "\n"

        parts = []
        for n, idx in enumerate(itertools.product(*(range(d) for d in batch_dims))):
            if n == limit:
                parts += [
                    "...",
                    "To print out more, set BlockMask.to_string(limit=N)",
                    "You can also index (BlockMask[batch, head]) to choose a specific batch or head",
                ]
                break
            parts.append(f"{idx}\n" + picture(dense[idx]))
        return "\n".join(parts)

    def __str__(self) -> str:
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, \n{self.to_string().strip()}\n)"

    def __repr__(self) -> str:
        def shape_of(t):
            return t.shape if t is not None else None

        return (
            "BlockMask(\n"
            f"    kv_num_blocks={self.kv_num_blocks.shape},\n"
            f"    kv_indices={self.kv_indices.shape},\n"
            f"    full_kv_num_blocks={shape_of(self.full_kv_num_blocks)},\n"
            f"    full_kv_indices={shape_of(self.full_kv_indices)},\n"
            f"    q_num_blocks={shape_of(self.q_num_blocks)},\n"
            f"    q_indices={shape_of(self.q_indices)},\n"
            f"    full_q_num_blocks={shape_of(self.full_q_num_blocks)},\n"
            f"    full_q_indices={shape_of(self.full_q_indices)},\n"
            f"    BLOCK_SIZE={self.BLOCK_SIZE},\n"
            f"    shape={self.shape},\n"
            f"    sparsity={self.sparsity():.2f}%,\n"
            f"    mask_mod={_mod_name(self.mask_mod)}\n"
            ")"
        )

    def __getitem__(self, index) -> "BlockMask":
        """Select batch entries, heads and (optionally) q-block rows, as torch does.

        ``mask[b]``, ``mask[b, h]``, ``mask[b0:b1, h]``, ``mask[:, :, q_block_tensor]``.
        An int keeps its dim with size 1 (torch's behaviour). Each index applies to its own
        dim (outer indexing, also for several tensors). An int on a batch/head dim of size
        1 selects that broadcast entry whatever its value. The result's mask_mod reads the
        selected entries (torch instead installs a mod that raises when called). A q-block
        selection makes ``seq_lengths[0] = min(Q_LEN, rows * Q_BLOCK_SIZE)``.
        """
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 3:
            raise IndexError(
                f"BlockMask takes at most 3 indices (batch, head, q block), got {len(index)}"
            )
        index = index + (slice(None),) * (3 - len(index))
        names = ("batch", "head", "q-block")
        device = self.kv_indices.device
        sizes = list(self.kv_indices.shape[:3])
        if self.full_kv_indices is not None:
            sizes[:2] = torch.broadcast_shapes(
                self.kv_indices.shape[:2], self.full_kv_indices.shape[:2]
            )
        positions, maps = [], []
        for dim, (i, n) in enumerate(zip(index, sizes)):
            pos = torch.arange(n, device=device)
            if isinstance(i, bool):
                raise TypeError(
                    f"BlockMask {names[dim]} index must be an int, slice or tensor, got a bool"
                )
            if isinstance(i, numbers.Integral):
                i = int(i)
                if n == 1 and dim < 2:
                    sel = pos
                elif -n <= i < n:
                    sel = pos[i : i + 1] if i >= 0 else pos[n + i : n + i + 1]
                else:
                    raise IndexError(
                        f"BlockMask {names[dim]} index {i} is out of range for size {n}"
                    )
            elif isinstance(i, slice):
                sel = pos[i]
            elif isinstance(i, Tensor):
                if i.dim() != 1 or not (i.dtype == torch.bool or not i.is_floating_point()):
                    raise IndexError(
                        f"BlockMask {names[dim]} index tensor must be 1-D integer or bool, "
                        f"got {i.dtype} {tuple(i.shape)}"
                    )
                sel = pos[i.to(device)]
            else:
                raise TypeError(
                    f"BlockMask {names[dim]} index must be an int, slice or tensor, got {type(i).__name__}"
                )
            if sel.numel() == 0:
                raise IndexError(f"BlockMask index {index} selects no {names[dim]} entries")
            positions.append(sel)
            if sel.numel() == n and bool((sel == pos).all()):
                maps.append(None)
            elif sel.numel() == 1 and dim < 2:
                maps.append(int(sel[0]))
            else:
                maps.append(sel)

        def take(t):
            if t is None:
                return None
            for dim, sel in enumerate(positions):
                # A size-1 batch/head dim broadcasts: it stays as it is.
                if t.shape[dim] != 1 or dim == 2:
                    t = t.index_select(dim, sel)
            return t.contiguous()

        Lq, Lk = self.seq_lengths
        if maps[2] is not None:
            Lq = min(Lq, positions[2].numel() * self.BLOCK_SIZE[0])
        mask_mod = self.mask_mod
        if any(m is not None for m in maps):
            mask_mod = _sliced_mod(self.mask_mod, maps, self.BLOCK_SIZE[0])
        return BlockMask.from_kv_blocks(
            take(self.kv_num_blocks),
            take(self.kv_indices),
            take(self.full_kv_num_blocks),
            take(self.full_kv_indices),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=mask_mod,
            seq_lengths=(Lq, Lk),
            compute_q_blocks=self.q_indices is not None,
        )

    _kernel_lists_split = _split_lists

    def to(self, device) -> "BlockMask":
        """A copy with every tensor on ``device`` (tensors a mask_mod captured stay put,
        as in torch)."""

        def move(t):
            return t.to(device) if t is not None else None

        moved = BlockMask(
            self.seq_lengths,
            move(self.kv_num_blocks),
            move(self.kv_indices),
            move(self.full_kv_num_blocks),
            move(self.full_kv_indices),
            move(self.q_num_blocks),
            move(self.q_indices),
            move(self.full_q_num_blocks),
            move(self.full_q_indices),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=self.mask_mod,
        )
        band = getattr(self, "_attn_jagged", None)
        if band is not None:
            # The same mask elsewhere: its band (host tensors, attn._blocks) goes along.
            moved._attn_jagged = band
        return moved

    def kernel_lists(self, BM: int, BN: int) -> KernelLists:
        """The block lists at a kernel's tile size: ``BM`` queries (dividing Q_BLOCK_SIZE)
        by ``BN`` keys (equal to KV_BLOCK_SIZE).

        q tile i lies inside q block ``i // (Q_BLOCK_SIZE // BM)`` and inherits its kv
        lists (in the mask's own order); each kv block's q-tile list holds every sub-tile
        of the q blocks that see it. Tiles and blocks wholly past ``seq_lengths`` are
        dropped. Index arithmetic on the lists, O(B*H*nQT*nKB); no mask_mod call.
        """
        QB, KB = self.BLOCK_SIZE
        for v, name in ((BM, "BM"), (BN, "BN")):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if KB % BN != 0:
            raise ValueError(f"BN ({BN}) must divide the mask's KV block size BLOCK_SIZE[1] ({KB})")
        if QB % BM != 0:
            raise ValueError(f"BM ({BM}) must divide the mask's Q block size BLOCK_SIZE[0] ({QB})")
        Lq, Lk = self.seq_lengths
        n_qt, n_kb = _cdiv(Lq, BM), _cdiv(Lk, BN)
        device = self.kv_indices.device
        rows = torch.arange(n_qt, device=device) // (QB // BM)

        def kv_side(num, idx):
            num, idx = num[:, :, rows], idx[:, :, rows, :]
            keep = _listed(num, idx) & (idx < n_kb)
            # A stable sort of the drop flags moves the kept entries to the front in
            # their original order.
            order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n_kb]
            kept = keep.gather(-1, order)
            idx = torch.where(kept, idx.gather(-1, order), 0)
            return keep.sum(-1, dtype=torch.int32).contiguous(), idx.to(torch.int32).contiguous()

        def q_side(num, idx):
            dense = _to_dense_bool(num, idx, idx.shape[-1])[:, :, rows, :n_kb]
            return _ordered(dense.transpose(-2, -1))

        if BN != KB:
            return self._kernel_lists_split(BM, BN)
        kv_num, kv_idx = kv_side(self.kv_num_blocks, self.kv_indices)
        q_num, q_idx = q_side(self.kv_num_blocks, self.kv_indices)
        if self.full_kv_num_blocks is not None:
            fkv_num, fkv_idx = kv_side(self.full_kv_num_blocks, self.full_kv_indices)
            fq_num, fq_idx = q_side(self.full_kv_num_blocks, self.full_kv_indices)
        else:
            B, H = self.kv_indices.shape[:2]
            fkv_num = torch.zeros(B, H, n_qt, dtype=torch.int32, device=device)
            fkv_idx = torch.zeros(B, H, n_qt, n_kb, dtype=torch.int32, device=device)
            fq_num = torch.zeros(B, H, n_kb, dtype=torch.int32, device=device)
            fq_idx = torch.zeros(B, H, n_kb, n_qt, dtype=torch.int32, device=device)
        return KernelLists(kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx, BM, BN)


def as_block_mask(block_mask) -> BlockMask:
    """``block_mask`` as an attn BlockMask: ours is returned as is; torch's (or anything
    with its fields) is converted, keeping its lists, sizes and mask_mod."""
    if isinstance(block_mask, BlockMask):
        return block_mask
    try:
        fields = (
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.BLOCK_SIZE,
            block_mask.seq_lengths,
        )
    except AttributeError:
        raise TypeError(
            f"expected a BlockMask (attn's or torch's), got {type(block_mask).__name__}"
        ) from None
    return BlockMask.from_kv_blocks(
        fields[0],
        fields[1],
        getattr(block_mask, "full_kv_num_blocks", None),
        getattr(block_mask, "full_kv_indices", None),
        BLOCK_SIZE=tuple(fields[2]),
        mask_mod=getattr(block_mask, "mask_mod", None),
        seq_lengths=tuple(fields[3]),
    )


# --------------------------------------------------------------------------- builders


def _default_device(device):
    # torch's default: the current accelerator if there is one, else the CPU.
    if device is None:
        return torch.accelerator.current_accelerator() or torch.device("cpu")
    return torch.device(device)


def _batch_heads(B, H):
    B = 1 if B is None else _check_positive_int(B, "B")
    H = 1 if H is None else _check_positive_int(H, "H")
    return B, H


def create_mask(
    mod_fn: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device=None
) -> Tensor:
    """The dense (B, H, Q_LEN, KV_LEN) mask of a mask_mod, or for a score_mod the bool
    mask of where ``score_mod(0, ...)`` is not -inf (torch's behaviour). ``B``/``H`` of
    None mean 1. Materialises Q_LEN * KV_LEN elements per (b, h): for inspection and
    tests, not for long sequences."""
    n_args = _mod_kind(mod_fn)
    B, H = _batch_heads(B, H)
    _check_positive_int(Q_LEN, "Q_LEN")
    _check_positive_int(KV_LEN, "KV_LEN")
    device = _default_device(device)

    def work(ev: _ModEvaluator):
        return ev(0, B, 0, H, 0, Q_LEN, 0, KV_LEN).expand(B, H, Q_LEN, KV_LEN).contiguous()

    out = _evaluate_with_fallback(mod_fn, n_args, B, H, device, work)
    if n_args == 5:
        return ~torch.isneginf(out)
    return out


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device=None,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_SPARSE_BLOCK_SIZE,
    _compile: bool = False,
    separate_full_blocks: bool = True,
    compute_dq_write_order: bool = False,
    dq_kv_order: bool = True,
) -> BlockMask:
    """A BlockMask from a mask_mod ``(b, h, q_idx, kv_idx) -> bool``, with torch's
    signature and block lists.

    ``B``/``H`` of None mean 1 (the mask broadcasts over them). ``device`` defaults to
    the current accelerator, else the CPU, as in torch. ``BLOCK_SIZE`` is an int or a
    (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair. With ``separate_full_blocks=False`` every
    visited block is listed as partial and ``full_*`` are None. ``_compile`` is accepted
    for compatibility (deprecated in torch; it changes nothing here).
    ``compute_dq_write_order`` (torch's deterministic-dQ metadata) is not supported.

    Memory stays O(B*H*nQB*nKVB) plus a fixed evaluation buffer, never Q_LEN * KV_LEN.
    """
    n_args = _mod_kind(mask_mod, "mask_mod")
    if n_args != 4:
        raise ModSignatureError(
            f"create_block_mask requires a mask_mod (b, h, q_idx, kv_idx) -> bool; {_mod_name(mask_mod)!r} "
            f"takes 5 positional arguments, which is a score_mod"
        )
    B, H = _batch_heads(B, H)
    _check_positive_int(Q_LEN, "Q_LEN")
    _check_positive_int(KV_LEN, "KV_LEN")
    BQ, BKV = _normalize_block_size(BLOCK_SIZE)
    if not isinstance(dq_kv_order, bool):
        raise ValueError("dq_kv_order must be a bool when using create_block_mask")
    if compute_dq_write_order:
        raise NotImplementedError(
            "compute_dq_write_order=True (torch's deterministic block-sparse FLASH backward metadata) is not "
            "supported by attn; attn's backward does not need it"
        )
    if _compile:
        warnings.warn(
            "_compile is deprecated in torch's create_block_mask and has no effect in attn's",
            DeprecationWarning,
            stacklevel=2,
        )
    device = _default_device(device)
    full, partial = _block_classes(mask_mod, B, H, Q_LEN, KV_LEN, BQ, BKV, device)
    if separate_full_blocks:
        kv_num, kv_idx = _ordered(partial)
        fkv_num, fkv_idx = _ordered(full)
        q_num, q_idx = _ordered(partial.transpose(-2, -1))
        fq_num, fq_idx = _ordered(full.transpose(-2, -1))
    else:
        visible = partial | full
        kv_num, kv_idx = _ordered(visible)
        q_num, q_idx = _ordered(visible.transpose(-2, -1))
        fkv_num = fkv_idx = fq_num = fq_idx = None
    bm = BlockMask(
        (Q_LEN, KV_LEN),
        kv_num,
        kv_idx,
        fkv_num,
        fkv_idx,
        q_num,
        q_idx,
        fq_num,
        fq_idx,
        BLOCK_SIZE=(BQ, BKV),
        mask_mod=mask_mod,
    )
    make_band = getattr(mask_mod, "_attn_band", None)
    band = make_band(Q_LEN, KV_LEN) if make_band is not None else None
    if band is not None:
        # A library band mod (attn.mods: causal, sliding window, documents): the kernels
        # that read a JaggedBand run it per sequence with column limits (attn._blocks).
        bm._attn_jagged = band
    return bm
