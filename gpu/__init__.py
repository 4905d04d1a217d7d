"""attn.gpu: the Numba CUDA kernels and their launcher.

Same contract as attn.cpu: ``forward(q, k, v, attn_mask, is_causal, scale, blocks)
-> (out, lse)`` and ``backward(q, k, v, out, lse, grad_out, grad_lse, attn_mask,
is_causal, scale, blocks) -> (dq, dk, dv)`` on CUDA tensors (on CPU tensors when
``NUMBA_ENABLE_CUDASIM=1``: the simulator works on host memory).

The launcher wraps tensors without copies (flat views plus element strides), builds the
kv-block lists (dense and causal attention are block lists: full blocks need no
masking, diagonal blocks do) once per shape and keeps them on the device, allocates
outputs with PyTorch's caching allocator and launches on PyTorch's current stream. It
never synchronises with the host.

Importing attn.gpu imports numba.cuda (through attn.gpu._cuda); attn itself imports
attn.gpu only when the gpu backend is asked to run.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import torch

from attn._blocks import band_of, dense_block_classes, seq_tiles

from . import _cuda
from ._cuda import SIM, launch
from . import _kernels, _mma, _mma_bwd

__all__ = ["SIM", "available", "forward", "backward", "tilings", "Tiling", "GpuMods",
           "flex_reasons"]

available = _cuda.available

_KIND = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
DTYPES = tuple(_KIND)


Tiling = _kernels.Tiling

# Per head-dim bucket (the larger of D and Dv): forward, dK/dV and dQ tilings. Each
# keeps a thread's register micro-tiles (scores plus its share of the output rows)
# near 100-130 floats, under the 255-register limit with no local-memory spill, and
# the CTA's shared tiles under the 227 KiB an H100 CTA may take. bench/NOTES.md has
# the measurements behind them.
_TILINGS = (
    (64, {"fwd": Tiling(16, 16, 4, 4, 4), "dkdv": Tiling(16, 8, 8, 4),
          "dq": Tiling(16, 8, 8, 4)}),
    (128, {"fwd": Tiling(16, 16, 4, 4, 4), "dkdv": Tiling(16, 8, 4, 2),
           "dq": Tiling(16, 8, 4, 4)}),
    (256, {"fwd": Tiling(16, 16, 4, 4, 4), "dkdv": Tiling(16, 8, 4, 2),
           "dq": Tiling(16, 8, 4, 4)}),
)
# The simulator runs every CUDA thread as a Python thread: 2x2 threads of 2x2 tiles
# (4x4 with runs of 4 for the forward) still exercise the strided micro-tiles, the
# 128-bit runs, ragged edges and multi-block lists.
_SIM_TILING = Tiling(2, 2, 2, 2)
_SIM_FWD_TILING = Tiling(2, 2, 4, 4, 4)


def tilings(D: int, Dv: int) -> dict:
    """The Tiling of each kernel ("fwd", "dkdv", "dq") for head dims D, Dv."""
    if SIM:
        return {"fwd": _SIM_FWD_TILING, "dkdv": _SIM_TILING, "dq": _SIM_TILING}
    w = max(D, Dv)
    for limit, t in _TILINGS:
        if w <= limit:
            return t
    raise ValueError(f"attn.gpu supports head dims up to 256, got {w}")


@lru_cache(maxsize=None)
def _shmem(kernel: str, t: Tiling, D: int, Dv: int) -> int:
    return 4 * _kernels.shared_floats(kernel, t, D, Dv)


@lru_cache(maxsize=512)
def _dense_lists(Lq: int, Lk: int, BM: int, BN: int, causal: bool, masked: bool,
                 device: torch.device):
    """kv-block lists per q block and their transposes (q-block lists per kv block),
    as flat int32 tensors on ``device``: (full_num, full_idx, part_num, part_idx, ncols)
    for each direction; idx is row-major (rows, ncols). With an attention mask every
    visible block is partial (the mask must be read). Built on the host once per shape
    and cached, so a call costs no host-to-device copy after the first."""
    full, part = dense_block_classes(Lq, Lk, BM, BN, causal, masked)

    def pack(sel: torch.Tensor):
        num = sel.sum(-1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        ncols = max(order.shape[-1], 1)
        if order.numel() == 0:
            order = torch.zeros(max(order.shape[0], 1), 1, dtype=torch.int32)
        if num.numel() == 0:
            num = torch.zeros(1, dtype=torch.int32)
        return (num.contiguous().to(device), order.contiguous().view(-1).to(device), ncols)

    kf, kp = pack(full), pack(part)
    qf, qp = pack(full.t()), pack(part.t())
    kv = (kf[0], kf[1], kp[0], kp[1], kf[2])
    qv = (qf[0], qf[1], qp[0], qp[1], qf[2])
    return kv, qv


def _strides4(t: torch.Tensor):
    # A size-1 dimension broadcasts: stride 0 lets the kernel index it with anything.
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


@lru_cache(maxsize=8)
def _dummy(device: torch.device):
    return torch.zeros(1, dtype=torch.float32, device=device)


def _mask(attn_mask, B, Hq, Lq, Lk, device):
    """attn_mask as a float32 additive mask expanded (stride 0) to (B, Hq, Lq, Lk):
    bool True/False -> 0/-inf. Only the user's (unexpanded) mask is converted."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(
            ~m, float("-inf"))
    elif m.dtype != torch.float32:
        m = m.to(torch.float32)
    return m.expand(B, Hq, Lq, Lk)


def _check(*ts):
    for t in ts:
        if SIM:
            if t.device.type != "cpu":
                raise ValueError("attn.gpu in the CUDA simulator takes CPU tensors")
        elif t.device.type != "cuda":
            raise ValueError(f"attn.gpu takes CUDA tensors, got a {t.device.type} tensor")
    if ts[0].dtype not in _KIND:
        raise TypeError(f"attn.gpu supports {list(_KIND)}, got {ts[0].dtype}")


# ------------------------------------------------------------------ FlexAttention --
# Buffer slots of the kernels: the tensors mask_mod and score_mod read, mask's first.
NBUF = 4


class GpuMods:
    """A call's mask_mod and score_mod (attn._modgen.CompiledMod) as CUDA device
    functions with the kernels' fixed buffer slots x0..x3. Equal (and hashed) by the
    generated code, so kernels compiled for one are reused for another with new buffer
    values; one instance per code (``get``)."""

    _cache: dict = {}

    def __init__(self, mask_c, score_c):
        from attn import _modgen

        self.key = (mask_c.key if mask_c is not None else None,
                    score_c.key if score_c is not None else None)
        slot = 0
        self.mask = self.score = None
        if mask_c is not None:
            self.mask, slot = self._wrap(_modgen, mask_c, mask_c.fn_name, slot,
                                         "b, h, q, kv")
        if score_c is not None:
            self.score, slot = self._wrap(_modgen, score_c, score_c.grad_fn_name, slot,
                                          "s, b, h, q, kv")

    @staticmethod
    def _wrap(_modgen, compiled, name, slot, params):
        ns: dict = {}
        exec(compile(_modgen.element_function_source(compiled), f"<attn mod {name}>",
                     "exec"), ns)
        elem = _cuda.cuda.jit(device=True, inline=True)(ns[name])
        used = ", ".join(f"x{slot + i}" for i in range(compiled.num_buffers))
        call = f"{params}, {used}" if used else params
        src = (f"def wrapped({params}, x0, x1, x2, x3):\n"
               f"    return elem({call})\n")
        wns = {"elem": elem}
        exec(compile(src, f"<attn mod wrapper {name}>", "exec"), wns)
        return (_cuda.cuda.jit(device=True, inline=True)(wns["wrapped"]),
                slot + compiled.num_buffers)

    @classmethod
    def get(cls, mask_c, score_c):
        key = (mask_c.key if mask_c is not None else None,
               score_c.key if score_c is not None else None)
        m = cls._cache.get(key)
        if m is None:
            m = cls._cache[key] = cls(mask_c, score_c)
        return m

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, GpuMods) and other.key == self.key


def flex_reasons(block_mask, mask_c, score_c, tiles) -> list[str]:
    """Why these kernels cannot run a FlexAttention call (empty when they can)."""
    reasons = []
    n = sum(c.num_buffers for c in (mask_c, score_c) if c is not None)
    if n > NBUF:
        reasons.append(f"the mods read {n} tensors; the GPU kernels take at most {NBUF}")
    if block_mask is not None:
        QB, KB = block_mask.BLOCK_SIZE
        for name, t in tiles.items():
            rows, cols = (t.cols, t.rows) if name == "dkdv" else (t.rows, t.cols)
            if QB % rows or KB % cols:
                reasons.append(
                    f"BLOCK_SIZE {(QB, KB)} is not a multiple of the {name} kernel's "
                    f"{rows}x{cols} tiles")
                break
    return reasons


def _flex_lists(flex, rows: int, cols: int, device):
    """Kernel lists of a FlexAttention call at (rows queries x cols keys) tiles, on the
    device, cached on the BlockMask: (kv side, q side, (lb, lh) of the kv side, (lb, lh)
    of the q side); lb, lh are the row strides per batch and head, 0 to broadcast."""
    bm = flex.block_mask
    cache = bm.__dict__.setdefault("_attn_gpu_lists", {})
    key = (rows, cols, str(device))
    hit = cache.get(key)
    if hit is not None:
        return hit
    kl = bm.kernel_lists(rows, cols)
    # One (batch, head) shape for all four lists: the kernel indexes them alike.
    Bm = max(t.shape[0] for t in kl[:8])
    Hm = max(t.shape[1] for t in kl[:8])

    def dev(num, idx):
        R, C = idx.shape[-2], idx.shape[-1]
        num = num.expand(Bm, Hm, R)
        idx = idx.expand(Bm, Hm, R, C)
        if C == 0:
            idx = torch.zeros(Bm, Hm, R, 1, dtype=torch.int32)
        return (num.contiguous().view(-1).to(device), idx.contiguous().view(-1).to(device),
                max(C, 1))

    def strides(R):
        return (Hm * R if Bm > 1 else 0), (R if Hm > 1 else 0)

    kf, kp = dev(kl.full_kv_num_blocks, kl.full_kv_indices), dev(kl.kv_num_blocks,
                                                                   kl.kv_indices)
    qf, qp = dev(kl.full_q_num_blocks, kl.full_q_indices), dev(kl.q_num_blocks,
                                                                kl.q_indices)
    hit = cache[key] = ((kf[0], kf[1], kp[0], kp[1], kf[2]),
                        (qf[0], qf[1], qp[0], qp[1], qf[2]),
                        strides(kl.kv_indices.shape[-2]), strides(kl.q_indices.shape[-2]))
    return hit


def _flex_args(flex, device):
    """(GpuMods or None, the four buffer tensors on the device)."""
    if flex is None or (flex.mask_mod is None and flex.score_mod is None):
        d = _dummy(device)
        return None, (d, d, d, d)
    mods = GpuMods.get(flex.mask_mod, flex.score_mod)
    bufs = [b.to(device) for c in (flex.mask_mod, flex.score_mod) if c is not None
            for b in c.buffers]
    bufs += [_dummy(device)] * (NBUF - len(bufs))
    return mods, tuple(bufs)


def _mask_args(m, device):
    if m is None:
        return _dummy(device), (0, 0, 0, 0)
    return m, _strides4(m)


class _Repeats:
    """Bound launches of repeated dense calls (no mask, no flex), one entry per key of
    everything the launches depend on besides the data pointers.

    The first call with a key records its launches (``_cuda.capture``); the second
    compares them with the first: when the kernels, launch shapes, scalars and every
    frozen tensor argument (block lists, dummies: cached device tensors) are the same
    objects, it binds them (``_cuda.bind``), leaving only the per-call tensors' pointers
    to fill. Any difference (a cache evicted meanwhile) records again instead."""

    def __init__(self, maxsize: int = 1024):
        self.plans: dict = {}
        self.maxsize = maxsize

    def get(self, key):
        p = self.plans.get(key)
        return None if p is None else p[1]

    def learn(self, key, launches, dyn):
        seen = tuple((kern, grid, block, shmem,
                      tuple((i, a) for i, a in enumerate(args)
                            if not any(a is t for t in dyn)))
                     for kern, grid, block, shmem, args in launches)
        p = self.plans.get(key)
        if p is None:
            if len(self.plans) >= self.maxsize:
                self.plans.clear()
            self.plans[key] = [seen, None]
            return
        if not launches or not _same_launches(p[0], seen):
            p[0] = seen
            return
        bound = tuple(_cuda.bind(kern, grid, block, shmem, args, dyn)
                      for kern, grid, block, shmem, args in launches)
        if all(b is not None for b in bound):
            p[1] = bound


def _same_launches(a, b) -> bool:
    if len(a) != len(b):
        return False
    for (k1, g1, b1, s1, f1), (k2, g2, b2, s2, f2) in zip(a, b):
        if k1 is not k2 or g1 != g2 or b1 != b2 or s1 != s2 or len(f1) != len(f2):
            return False
        for (i, x), (j, y) in zip(f1, f2):
            if i != j or (x is not y if isinstance(x, torch.Tensor) else x != y):
                return False
    return True


_FWD_REPEATS = _Repeats()
_BWD_REPEATS = _Repeats()


def _dense_key(q, k, v, is_causal, scale, *more):
    # The aliasing pattern is part of the key: a bound launch writes q's pointer into
    # every slot q filled when it was bound.
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype,
            k.dtype, v.dtype, q.device, bool(is_causal), scale, q is k, k is v, q is v,
            *more)


def forward(q, k, v, attn_mask=None, is_causal=False, scale=None, tiling=None, flex=None):
    """out (dtype of q) and lse (float32, natural log, (B, Hq, Lq)); and max_scores
    (float32, (B, Hq, Lq)) third when ``flex.max_scores`` asks for them (the tensor-core
    forward only: max_scores_reasons).

    ``flex`` (attn's FlexAttention path): an object with ``block_mask`` (attn BlockMask
    or None = dense), ``mask_mod`` and ``score_mod`` (attn._modgen CompiledMods or
    None).

    A dense call (no mask, no flex) repeated with the same shapes, strides, dtypes,
    device, causality and scale costs two allocations and one bound cuLaunchKernel
    (``_Repeats``)."""
    if flex is not None and flex.max_scores:
        # (out, lse, max_scores): the two-plane lse of _forward, not the bound path
        return _forward(q, k, v, attn_mask, is_causal, scale, tiling, flex)
    band = None
    if flex is not None and attn_mask is None and tiling is None and not SIM:
        band = band_of(flex)
        if band is None or jagged_reasons(q.dtype, q.shape[3], v.shape[3], flex):
            band = None
    if band is None and (attn_mask is not None or flex is not None or tiling is not None
                         or SIM):
        return _forward(q, k, v, attn_mask, is_causal, scale, tiling, flex)
    # A jagged call's launch depends on its band (the item table, cached on it): the
    # key holds the band, so its identity stays unique while the entry lives.
    key = _dense_key(q, k, v, is_causal, scale, band)
    bound = _FWD_REPEATS.get(key)
    if bound is not None:
        out, lse = _outputs(q, v, band is not None)
        ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
        idx = q.device.index
        for b in bound:
            b(ptrs, idx)
        return out, lse
    with _cuda.capture() as launches:
        out, lse = _forward(q, k, v, None, is_causal, scale, None, flex)
    _FWD_REPEATS.learn(key, launches, (q, k, v, out, lse))
    return out, lse


def _outputs(q, v, flex: bool):
    """Empty out and lse of a forward. A flex call on packed (tokens, heads, D) queries
    viewed as (B, H, tokens, D) (varlen_attn, document masks) gets out in the same
    layout, so the packed result is a view and not a copy kernel per call; the kernels
    take out's strides."""
    B, Hq, Lq = q.shape[:3]
    Dv = v.shape[3]
    if flex and q.stride(1) < q.stride(2):
        out = torch.empty(B, Lq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    return out, torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)


# Packed jagged batches (attn.varlen_attn, attn.document_block_mask) whose mask carries
# a JaggedBand run the forward per sequence (gpu/_mma.py JAG) instead of over the block
# lists; ATTN_GPU_JAGGED=0 keeps the block-list path (the A/B switch of the benchmarks).
JAGGED = os.environ.get("ATTN_GPU_JAGGED", "1").strip() != "0"
# The backward of such calls per sequence too (gpu/_mma_bwd.py JAG, bench/NOTES.md
# G18); ATTN_GPU_JAGGED_BWD=0 keeps the transposed block lists (the A/B switch).
JAGGED_BWD = os.environ.get("ATTN_GPU_JAGGED_BWD", "1").strip() != "0"
# The item table's bound on dg / dl (an unbounded side; keeps r + dg inside int32).
_ITEM_BOUND = 1 << 30


def jagged_reasons(dtype, D, Dv, flex, attn_mask=None, tiling=None) -> list[str]:
    """Why a flex call with a jagged band does not run the per-sequence forward (empty
    when it does). Any batch: a band's mask is the same for every batch entry and head
    (the kernel's grid y is batch x head)."""
    r = [] if JAGGED else ["ATTN_GPU_JAGGED=0"]
    band = band_of(flex)
    if band is None:
        return ["no jagged band on the block mask"]
    if flex.score_mod is not None:
        r.append("a score_mod")
    if attn_mask is not None:
        r.append("an attn_mask")
    return r + mma_reasons(dtype, D, Dv, tiling)


def jagged_items(band, BM: int, BN: int, device) -> torch.Tensor:
    """The per-sequence forward's item table (int32, 8 per item, on ``device``; cached
    on the band): one item per BM-query tile of each sequence, [first row, the
    sequence's query end, the start of its first visible kv tile, kv tiles, its key end,
    dg (row r sees keys below r + dg), dl (and from r + dl on; left windows), 0],
    ordered by kv tiles ascending (the kernel runs the last item first, so the heaviest
    start first)."""
    key = ("gpu-items", BM, BN, str(device))
    hit = band._schedules.get(key)
    if hit is not None:
        return hit
    q0, q1, k0, k1 = band.q0, band.q1, band.k0, band.k1
    seq, t = seq_tiles((q1 - q0 + BM - 1) // BM)
    qa = q0[seq] + t * BM
    qz = torch.minimum(qa + BM, q1[seq]) - 1
    ks, ke = k0[seq], k1[seq]
    dg, dl = _edges(band, seq)
    hi = torch.minimum(ke, qz + dg)  # one past the tile's last visible key
    lo = torch.maximum(ks, qa + dl)  # the tile's first visible key
    n0 = ks + torch.div(lo - ks, BN, rounding_mode="floor") * BN
    nt = torch.where(hi > lo, (hi - n0 + BN - 1) // BN, 0)
    return _store_items(band, key, [qa, q1[seq], n0, nt, ke, dg, dl], nt, device)


def _edges(band, seq):
    """dg, dl of each item's sequence ``seq``: row r sees keys r + dl <= j < r + dg,
    unbounded sides clamped to _ITEM_BOUND."""
    L, R = band.sides()
    c = band.diag[seq]
    return (torch.clamp(c + R + 1, max=_ITEM_BOUND), torch.clamp(c - L, min=-_ITEM_BOUND))


def _store_items(band, key, cols, work, device):
    """The item table of ``cols`` (8 int32 per item, the last 0), ordered by ``work``
    ascending (the kernels run the last item first, so the heaviest start first), on
    ``device`` and cached on the band under ``key``."""
    tab = torch.stack([*cols, torch.zeros_like(cols[0])], 1)
    tab = tab[torch.sort(work, stable=True).indices].to(torch.int32).contiguous()
    hit = band._schedules[key] = tab.to(device)
    return hit


def jagged_bwd_items(band, BM: int, BN: int, device) -> torch.Tensor:
    """The per-sequence backward's item table (int32, 8 per item, on ``device``; cached
    on the band): one item per BN-key tile of each sequence, [its first key, the
    sequence's key end, the first row of its first q tile, q tiles, the sequence's query
    end, dg, dl, 0] (the forward's dg / dl: row r sees keys r + dl <= j < r + dg), the
    q tiles those of the sequence's BM-row tiling that hold a row seeing a key of the
    tile; ordered by q tiles ascending (the kernel runs the last item first)."""
    key = ("gpu-bwd-items", BM, BN, str(device))
    hit = band._schedules.get(key)
    if hit is not None:
        return hit
    q0, q1, k0, k1 = band.q0, band.q1, band.k0, band.k1
    seq, t = seq_tiles((k1 - k0 + BN - 1) // BN)
    n0 = k0[seq] + t * BN
    nz = torch.minimum(n0 + BN, k1[seq]) - 1  # the tile's last key
    qa, qe = q0[seq], q1[seq]
    dg, dl = _edges(band, seq)
    lo = torch.maximum(qa, n0 - dg + 1)  # first row that sees a key of the tile
    hi = torch.minimum(qe - 1, nz - dl)  # last one
    mj = qa + torch.div(lo - qa, BM, rounding_mode="floor") * BM
    nq = torch.where(hi >= lo, (hi + 1 - mj + BM - 1) // BM, 0)
    return _store_items(band, key, [n0, k1[seq], mj, nq, qe, dg, dl], nq, device)


def _keys_covered(band, Lk: int) -> bool:
    """Whether the band's sequences hold every key 0..Lk-1 (the jagged backward stores
    dK/dV only inside them; otherwise the rest must be zeroed first)."""
    key = ("keys-covered", Lk)
    hit = band._schedules.get(key)
    if hit is None:
        k0, k1 = band.k0, band.k1
        hit = bool(k0.numel() and int(k0[0]) == 0 and int(k1[-1]) == Lk
                   and torch.equal(k0[1:], k1[:-1]))
        band._schedules[key] = hit
    return hit


def _jagged_forward(q, k, v, out, lse, band, scale, maxs=False):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    kind = _KIND[q.dtype]
    jag = 2 if band.left >= 0 else 1
    # Left window edges (JAG 2) on the small tiles: at D = 128 the two-tile variant
    # spilled 56 bytes (Numba's resource query on the H200, bench/NOTES.md G23); the
    # small tiles are the one-tile kernel that served these calls before G23.
    small = jag == 2
    BM, BN = _mma.tile(D, Dv, kind, small)
    items = jagged_items(band, BM, BN, q.device)
    if items.shape[0] == 0:
        # No query tile in any sequence: every row sees no key (the kernel contract's
        # out 0, lse -inf), which no launch would write.
        out.zero_()
        lse.fill_(float("-inf"))
        return
    d = _dummy(q.device)
    marr, ms = _mask_args(None, q.device)
    args = (
        q, k, v,
        out, lse, marr,
        *_strides4(q), *_strides4(k), *_strides4(v), *out.stride(), *ms,
        Hq, Hq // Hkv, Lq, Lk, scale,
        items, d, d, d, 0, 0, 0, d, d, d, d,
    )
    launch(_mma.forward_kernel(kind, D, Dv, False, False, None, jag, maxs, small),
           (items.shape[0], B * Hq), _mma.threads(D, Dv, kind, small), args,
           q.device.index, _mma.shared_bytes(D, Dv, False, kind, small))


def _forward(q, k, v, attn_mask=None, is_causal=False, scale=None, tiling=None, flex=None):
    _check(q, k, v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = _outputs(q, v, flex is not None)
    maxs = bool(flex is not None and flex.max_scores)
    if maxs:
        # lse and max_scores as the two planes of one buffer (gpu/_mma.py MAXS);
        # max_scores goes out as a copy, since the outputs of a custom op (attn's flex op
        # under torch.compile) may not share storage with each other
        planes = torch.empty(2, B, Hq, Lq, dtype=torch.float32, device=q.device)
        lse = planes
    if out.numel() == 0 and lse.numel() == 0:
        return (out, lse[0], lse[1].clone()) if maxs else (out, lse)
    if flex is not None and not jagged_reasons(q.dtype, D, Dv, flex, attn_mask, tiling):
        _jagged_forward(q, k, v, out, lse, band_of(flex), scale, maxs)
        return (out, lse[0], lse[1].clone()) if maxs else (out, lse)
    m = _mask(attn_mask, B, Hq, Lq, Lk, q.device)
    mods, bufs = _flex_args(flex, q.device)
    bs = None if flex is None or flex.block_mask is None else flex.block_mask.BLOCK_SIZE
    kern, grid, threads, shmem, lists, rows, cols = _fwd_plan(
        q.dtype, D, Dv, B, Hq, Lq, Lk, bool(is_causal), m is not None, q.device, tiling,
        mods, bs, maxs)
    lb = lh = 0
    if bs is not None:
        lists, _, (lb, lh), _ = _flex_lists(flex, rows, cols, q.device)
    marr, ms = _mask_args(m, q.device)
    args = (
        q, k, v,
        out, lse, marr,
        *_strides4(q), *_strides4(k), *_strides4(v), *out.stride(), *ms,
        Hq, Hq // Hkv, Lq, Lk, scale,
        *lists, lb, lh, *bufs,
    )
    launch(kern, grid, threads, args, q.device.index, shmem)
    return (out, lse[0], lse[1].clone()) if maxs else (out, lse)


def _divides(block_size, tile) -> bool:
    """Whether a (rows, cols) tile divides a block mask's BLOCK_SIZE."""
    return block_size[0] % tile[0] == 0 and block_size[1] % tile[1] == 0


def _tensor_core_reasons(mod, label, dtype, D, Dv, tiling, block_size, extra=()):
    """The reasons of a tensor-core kernel module (``mod``: gpu/_mma.py or
    gpu/_mma_bwd.py, named ``label`` in the messages) not to serve a call: its own, then
    ``extra``, then an explicit SIMT tiling and a BLOCK_SIZE that neither its default nor
    its small tiles divide (_small_tiles takes the small ones where the default ones do
    not)."""
    r = mod.reasons(_KIND[dtype], D, Dv) + list(extra)
    if tiling is not None:
        r.append("an explicit SIMT tiling was asked for")
    if block_size is not None:
        kind = _KIND[dtype]
        tiles = dict.fromkeys([mod.tile(D, Dv, kind), mod.tile(D, Dv, kind, True)])
        if not any(_divides(block_size, t) for t in tiles):
            shown = " or ".join(f"{BM}x{BN}" for BM, BN in tiles)
            r.append(f"BLOCK_SIZE {tuple(block_size)} is not a multiple of the "
                     f"tensor-core {label}'s {shown} tiles")
    return r


# float32 forwards on tensor cores with the 3xTF32 split (gpu/_mma.py, kind "f32"):
# float32-accurate, so it does not depend on torch.backends.cuda.matmul.allow_tf32.
# ATTN_GPU_TF32X3=0 keeps the SIMT forward for float32.
TF32X3 = os.environ.get("ATTN_GPU_TF32X3", "1").strip() != "0"


def mma_reasons(dtype, D, Dv, tiling=None, block_size=None) -> list[str]:
    """Why a forward runs the SIMT kernel instead of the tensor-core one (gpu/_mma.py:
    float16/bfloat16, and float32 by 3xTF32): empty when the tensor-core kernel
    serves it."""
    extra = []
    if dtype == torch.float32 and not TF32X3:
        extra.append("ATTN_GPU_TF32X3=0 (attn.gpu.TF32X3 is off): float32 uses the "
                     "SIMT forward")
    return _tensor_core_reasons(_mma, "kernel", dtype, D, Dv, tiling, block_size, extra)


def _small_tiles(mod, kind, D, Dv, masked, block_size) -> bool:
    """Whether a tensor-core kernel (``mod``: gpu/_mma.py or gpu/_mma_bwd.py) takes its
    small tiles (``mod.config``): with an attn_mask, or a block mask whose BLOCK_SIZE the
    larger tiles do not divide."""
    if masked:
        return True
    return block_size is not None and not _divides(block_size, mod.tile(D, Dv, kind))


@lru_cache(maxsize=1024)
def _fwd_plan(dtype, D, Dv, B, Hq, Lq, Lk, causal, masked, device, tiling, mods=None,
              block_size=None, maxs=False):
    """Everything about a forward launch that depends only on the shapes: the compiled
    kernel, grid, block, shared memory, the kv-block lists (on the device) and the
    kernel's (rows, cols) tile. Cached, so a repeated call costs one dictionary lookup
    here. The tensor-core kernel runs where mma_reasons allows (float16/bfloat16, and
    float32 by 3xTF32 unless TF32X3 is off)."""
    if not mma_reasons(dtype, D, Dv, tiling, block_size):
        kind = _KIND[dtype]
        small = _small_tiles(_mma, kind, D, Dv, masked, block_size)
        rows, cols = _mma.tile(D, Dv, kind, small)
        kern = _mma.forward_kernel(kind, D, Dv, causal, masked, mods, 0, maxs, small)
        threads = _mma.threads(D, Dv, kind, small)
        shmem = _mma.shared_bytes(D, Dv, masked or mods is not None, kind, small)
    else:
        if maxs:
            raise ValueError("max_scores: " + "; ".join(max_scores_reasons(
                dtype, D, Dv, tiling, block_size)))
        t = tiling or tilings(D, Dv)["fwd"]
        rows, cols = t.rows, t.cols
        kern = _kernels.forward_kernel(_KIND[dtype], D, Dv, t, causal, masked, mods)
        threads, shmem = t.threads, _shmem("fwd", t, D, Dv)
    (kvf_n, kvf_i, kvp_n, kvp_i, ncols), _ = _dense_lists(
        Lq, Lk, rows, cols, causal, masked, device)
    return (kern, (-(-Lq // rows), B * Hq), threads, shmem,
            (kvf_n, kvf_i, kvp_n, kvp_i, ncols), rows, cols)


# FlexAttention's max_scores (AuxRequest(max_scores=True)) from the tensor-core forward
# (gpu/_mma.py MAXS): on since its GPU tests passed on an H200 (2026-12-04, bench/NOTES.md
# G22); ATTN_GPU_MAX_SCORES=0 switches it off, and the backend choice then sends those
# calls to a backend that computes them.
MAX_SCORES = os.environ.get("ATTN_GPU_MAX_SCORES", "1").strip() != "0"


def max_scores_reasons(dtype, D, Dv, tiling=None, block_size=None) -> list[str]:
    """Why the GPU forward cannot return max_scores for this call (empty if it can)."""
    if not MAX_SCORES:
        return ["max_scores (AuxRequest) from the GPU kernels is switched off "
                "(ATTN_GPU_MAX_SCORES=0)"]
    r = mma_reasons(dtype, D, Dv, tiling, block_size)
    return [f"max_scores only from the tensor-core forward, which cannot run: {x}"
            for x in r]


# The tensor-core backward (gpu/_mma_bwd.py) for float16/bfloat16 when dQ may be
# accumulated by atomics: ATTN_GPU_MMA_BWD=0 keeps the SIMT dK/dV kernel (the switch
# exists so a failing device check can turn the default off in one place).
MMA_BACKWARD = os.environ.get("ATTN_GPU_MMA_BWD", "1").strip() != "0"
# float32 backward on tensor cores with the 3xTF32 split (gpu/_mma_bwd.py, kind "f32"):
# on by default since 2026-12-02. Without the dK/dV flushes (bench/NOTES.md G11) its dK
# missed the float64-oracle bound in two float32 GPU tests; with the totals flushed every
# 128 queries (G13, G14) the float32 GPU matrix passes (test_gpu.py, varlen, flex) and
# forward+backward runs at 0.85-1.07x PyTorch EFFICIENT on an H200 (SIMT: 0.4-0.6x).
# ATTN_GPU_TF32X3_BWD=0 keeps the SIMT dK/dV kernel.
TF32X3_BACKWARD = os.environ.get("ATTN_GPU_TF32X3_BWD", "1").strip() not in ("", "0")


def mma_bwd_reasons(dtype, D, Dv, tiling=None, block_size=None, atomic=True) -> list[str]:
    """Why a backward runs the SIMT dK/dV kernel instead of the tensor-core one
    (gpu/_mma_bwd.py: float16/bfloat16, and float32 by 3xTF32 unless TF32X3_BACKWARD is
    switched off): empty when the tensor-core kernel serves it."""
    extra = []
    if not MMA_BACKWARD:
        extra.append("ATTN_GPU_MMA_BWD=0 (attn.gpu.MMA_BACKWARD is off)")
    if dtype == torch.float32 and not TF32X3_BACKWARD:
        extra.append("float32 tensor-core backward switched off (ATTN_GPU_TF32X3_BWD=0, "
                     "attn.gpu.TF32X3_BACKWARD is False)")
    if not atomic:
        extra.append("dQ must be deterministic (no atomics): the split SIMT backward runs")
    return _tensor_core_reasons(_mma_bwd, "backward", dtype, D, Dv, tiling, block_size,
                                extra)


def backward(q, k, v, out, lse, grad_out, grad_lse=None, attn_mask=None,
             is_causal=False, scale=None, tiling=None, flex=None):
    """dq, dk, dv in the input dtypes. grad_lse (optional) is the gradient reaching lse.

    Repeated dense calls bind their two launches as forward() does (``_Repeats``)."""
    _check(q, k, v)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    # The 3xTF32 dK/dV kernel adds its per-q-block totals into dk, dv (gpu/_mma_bwd.py,
    # FLUSH_QUERIES): zeroed wherever it may run. Here, not in _backward where the kernel
    # is chosen, because repeated dense calls replay bound launches without _backward.
    new = torch.zeros_like if (q.dtype == torch.float32 and TF32X3_BACKWARD
                               and _mma_bwd.FLUSH_QUERIES > 0) else torch.empty_like
    dk = new(k, memory_format=torch.contiguous_format)
    dv = new(v, memory_format=torch.contiguous_format)
    if Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # delta_i = rowsum(dO_i * O_i) - dlse_i: d(lse_i)/d(s_ij) = P_ij, so a gradient on lse
    # enters the softmax backward exactly like -delta. O(L*D) work, done by PyTorch.
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    # dQ by float32 atomics from the dK/dV kernel (one launch, 5 tile products per block
    # pair) unless PyTorch's deterministic mode asks for bitwise-reproducible results:
    # then the separate dQ kernel (7 products, no atomics). ATTN_GPU_BWD overrides.
    atomic = _atomic_dq()
    dqa = None
    if atomic:
        dqa = dq.zero_() if q.dtype == torch.float32 else torch.zeros(
            q.shape, dtype=torch.float32, device=q.device)
    if attn_mask is not None or flex is not None or tiling is not None or SIM:
        _backward(q, k, v, lse, delta, grad_out, dq, dk, dv, attn_mask, is_causal, scale,
                  tiling, flex, dqa)
    else:
        key = _dense_key(q, k, v, is_causal, scale, grad_out.shape, grad_out.stride(),
                         grad_out is q, grad_out is k, grad_out is v, atomic)
        bound = _BWD_REPEATS.get(key)
        dyn = (q, k, v, grad_out, lse, delta, dq, dk, dv, dqa if dqa is not None else dq)
        if bound is not None:
            ptrs = tuple(t.data_ptr() for t in dyn)
            idx = q.device.index
            for b in bound:
                b(ptrs, idx)
        else:
            with _cuda.capture() as launches:
                _backward(q, k, v, lse, delta, grad_out, dq, dk, dv, None, is_causal,
                          scale, None, None, dqa)
            _BWD_REPEATS.learn(key, launches, dyn)
    if dqa is not None and dqa is not dq:
        dq.copy_(dqa)
    return dq, dk, dv


_BWD_MODES = ("auto", "atomic", "split")


def _atomic_dq() -> bool:
    mode = os.environ.get("ATTN_GPU_BWD", "auto").strip().lower() or "auto"
    if mode not in _BWD_MODES:
        raise ValueError(f"ATTN_GPU_BWD={mode!r}: expected one of {list(_BWD_MODES)}")
    if mode == "auto":
        return not torch.are_deterministic_algorithms_enabled()
    return mode == "atomic"


def _backward(q, k, v, lse, delta, grad_out, dq, dk, dv, attn_mask, is_causal, scale,
              tiling, flex, dqa=None):
    """The launches of the backward into dq, dk, dv, given the float32 lse and delta:
    dK/dV over kv blocks, then dQ over q blocks; or, with ``dqa`` (a zeroed float32
    accumulator), dK/dV with dQ added into dqa by atomics, one launch."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    m = _mask(attn_mask, B, Hq, Lq, Lk, q.device)
    kind = _KIND[q.dtype]
    ts = tiling or tilings(D, Dv)
    marr, ms = _mask_args(m, q.device)
    common = (
        q, k, v,
        grad_out, lse, delta, marr,
    )
    strides = (*_strides4(q), *_strides4(k), *_strides4(v), *_strides4(grad_out), *ms)
    causal = bool(is_causal)

    mods, bufs = _flex_args(flex, q.device)
    sparse = flex is not None and flex.block_mask is not None

    t = ts["dkdv"]
    BN, BM = t.rows, t.cols  # rows of this kernel's tiles are keys
    bsz = flex.block_mask.BLOCK_SIZE if sparse else None
    tc = not mma_bwd_reasons(q.dtype, D, Dv, tiling, bsz, dqa is not None)
    small = tc and _small_tiles(_mma_bwd, kind, D, Dv, m is not None, bsz)
    if tc:
        BM, BN = _mma_bwd.tile(D, Dv, kind, small)
    band = band_of(flex) if tc and dqa is not None and JAGGED_BWD else None
    if band is not None and not jagged_reasons(q.dtype, D, Dv, flex, attn_mask, tiling):
        # Per sequence, as the forward (kernel JAG): kv tiles from each sequence's first
        # key, column limits, no mod, no block lists; so the large tiles whatever the
        # BLOCK_SIZE (the kernel below is built with them).
        BM, BN = _mma_bwd.tile(D, Dv, kind)
        items = jagged_bwd_items(band, BM, BN, q.device)
        if not _keys_covered(band, Lk):
            dk.zero_()
            dv.zero_()
        if items.shape[0]:
            d = _dummy(q.device)
            launch(_mma_bwd.dkdv_kernel(kind, D, Dv, False, False, None, True),
                   (items.shape[0], B * Hkv), _mma_bwd.threads(D, Dv, kind), (
                       *common, dk, dv, dqa, *strides, *dk.stride(), *dv.stride(),
                       Hq, Hkv, Hq // Hkv, Lq, Lk, scale,
                       items, d, d, d, 0, 0, 0, d, d, d, d,
                   ), q.device.index, _mma_bwd.shared_bytes(D, Dv, False, kind))
        return
    lb = lh = 0
    if sparse:
        _, (qf_n, qf_i, qp_n, qp_i, ncols), _, (lb, lh) = _flex_lists(flex, BM, BN,
                                                                      q.device)
    else:
        _, (qf_n, qf_i, qp_n, qp_i, ncols) = _dense_lists(Lq, Lk, BM, BN, causal,
                                                          m is not None, q.device)
    if tc:
        kern = _mma_bwd.dkdv_kernel(kind, D, Dv, causal, m is not None, mods, False,
                                    small)
        nth = _mma_bwd.threads(D, Dv, kind, small)
        shmem = _mma_bwd.shared_bytes(D, Dv, m is not None or mods is not None, kind,
                                      small)
    else:
        kern = _kernels.dkdv_kernel(kind, D, Dv, t, causal, m is not None, mods,
                                    dqa is not None)
        nth, shmem = t.threads, _shmem("dkdv", t, D, Dv)
    launch(kern, (-(-Lk // BN), B * Hkv), nth, (
        *common, dk, dv, dqa if dqa is not None else _dummy(q.device), *strides,
        *dk.stride(), *dv.stride(), Hq, Hkv, Hq // Hkv, Lq, Lk, scale,
        qf_n, qf_i,
        qp_n, qp_i, ncols, lb, lh, *bufs,
    ), q.device.index, shmem)
    if dqa is not None:
        return

    t = ts["dq"]
    BM, BN = t.rows, t.cols
    lb = lh = 0
    if sparse:
        (kf_n, kf_i, kp_n, kp_i, ncols), _, (lb, lh), _ = _flex_lists(flex, BM, BN,
                                                                      q.device)
    else:
        (kf_n, kf_i, kp_n, kp_i, ncols), _ = _dense_lists(Lq, Lk, BM, BN, causal,
                                                          m is not None, q.device)
    kern = _kernels.dq_kernel(kind, D, Dv, t, causal, m is not None, mods)
    launch(kern, (-(-Lq // BM), B * Hq), t.threads, (
        *common, dq, *strides, *dq.stride(),
        Hq, Hq // Hkv, Lq, Lk, scale,
        kf_n, kf_i,
        kp_n, kp_i, ncols, lb, lh, *bufs,
    ), q.device.index, _shmem("dq", t, D, Dv))
