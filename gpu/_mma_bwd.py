"""Tensor-core (mma.sync m16n8k16) FlashAttention-2 backward for float16/bfloat16 inputs.

The dK/dV kernel with dQ by float32 atomics (gpu/_kernels.py, ``dkdv_kernel`` with
ATOMIC_DQ) on tensor cores: the same argument list, the same transposed block lists
(one CTA per (kv block, batch * kv head), looping over the query heads of the GQA
group and the q blocks that see the kv block: full blocks first, then partial ones,
which alone evaluate causal, attn_mask and mask_mod), the same outputs (dk, dv in the
input dtype through any output strides, dQ added into the zeroed float32 (B, Hq, Lq, D)
accumulator ``dqa``). Built from gpu/_ptx.py's fragment operations and gpu/_mma.py's
tile loaders.

CTA: NW warps, BLOCK_N = 16*NW keys (warp w owns keys 16w..16w+15), BLOCK_M queries
per q block. Per q block, per warp (rows: its 16 keys, columns: the block's queries):

* S^T = K Q^T and dP^T = V dO^T: A fragments of the warp's K and V rows (kept in
  registers at D <= 64, re-read by ldmatrix otherwise), B fragments by ldmatrix of
  the row-major Q and dO tiles (a row-major (query, dim) tile is the column-major B).
* P^T = exp2(S^T * scale*log2(e) - lse*log2(e)), dS^T = P^T (dP^T - delta): lse and
  delta per query column from shared memory; a query whose lse is -inf (it saw no key)
  and queries past Lq get lse = +inf there, so P = 0, never NaN; keys past Lk get a
  -inf row bias.
* dV += P^T dO and dK += dS^T Q: the C fragments of two adjacent m16n8 tiles, packed to
  bf16/f16 pairs, are the A fragment of one m16k16 tile (as P in the forward); dO and Q
  as B operands by ldmatrix.trans of their row-major tiles.
* dQ += scale * dS K: dS^T goes to shared memory (the packed pairs, one 32-bit store
  each), then after a barrier the warps share the (16 queries x 16 dims) tiles of the
  q block's dQ: A = dS by ldmatrix.trans of the dS^T tile (the transposed load of a
  (key, query) tile is the (query, key) A fragment), B = K by ldmatrix.trans, float32
  C fragments added into ``dqa`` with atomics.

The softmax scale: K and Q are not pre-scaled (that would round them once more), so
S^T is scaled in the exponent, dK is scaled once at the end and each dQ tile before
its atomics (the SIMT kernel stages K times scale, which gives the same products).

Q, dO (and lse, delta) are double-buffered: the cp.async copies of the next q block
(of this head or the next head of the group) are issued before the current one is
computed. Two barriers per q block: after the copies land, and after dS^T is in
shared memory; the next block's copies (into the other buffer) and dS^T writes come
after the second barrier, when every warp is done with what they overwrite.

score_mod, and the masks of partial blocks: S and dP go to a per-lane shared copy, where the
per-element work (score_mod and its derivative, mask_mod, the additive mask) runs
rolled or not as the compiler likes, so the register fragments stay unrolled (the
forward's lesson, bench/NOTES.md G7).

float32 inputs (kind "f32") run the same kernel on ``mma.sync.m16n8k8`` tf32 with the
3xTF32 split of gpu/_mma.py's float32 forward (each operand x = big + small, three
products per mma3). On by default (``attn.gpu.TF32X3_BACKWARD``; ATTN_GPU_TF32X3_BWD=0
keeps the SIMT dK/dV kernel, and mma_bwd_reasons says so). Without the dK/dV totals
below its dK missed the float64-oracle bound in 2 of the float32 GPU tests (H200,
bench/NOTES.md G11); flushed every 128 queries (G13, G14) the float32 GPU matrix passes
at 0.85-1.07x PyTorch's EFFICIENT forward+backward. The differences from the 16-bit kinds, at the products (ldmatrix.trans
cannot transpose 32-bit elements) and the dK/dV totals:

* float32 tiles in shared memory, rows padded by 4 words; k-steps of 8; K, V A
  fragments and Q, dO B fragments of S^T, dP^T by ldmatrix (b16 moves 32-bit words
  intact), re-read and split each q block (KREG = 0).
* dV += P^T dO and dK += dS^T Q in 8-query steps with the query order permuted inside
  a step (A column t = query 2t, t+4 = query 2t+1), so P^T's and dS^T's accumulators
  are the A fragments as they are (a0..a3 = c0, c2, c1, c3); the head dims permuted
  inside 32-dim groups (n-tile q of group J holds dims 32J + 4n + q), so one 16-byte
  ld.shared.v4 of a dO (or Q) row gives b0 (or b1) of four n-tiles; dK and dV come out
  in that dim order and the epilogue maps them back. D and Dv must be multiples of 32.
* dQ += scale * dS K: dS^T goes to shared memory one word per element, columns XOR-
  swizzled per key row (_swz) so that the writers (key g, queries 2t, 2t+1) and the
  readers (keys 2t, 2t+1, query g) both hit 32 distinct banks; each warp takes units
  of 16 queries x 32 dims, A = dS by scalar loads (the key order permuted as above),
  B = K by 16-byte loads of key rows 2t, 2t+1 (dims permuted as above), float32
  atomics into ``dqa``.
* dK/dV totals (FLUSH_QUERIES, G13): the tensor core rounds each mma's sum into the
  accumulator one-sidedly (truncation), and the dK/dV accumulators live over all G*Lq
  queries of the kv block, so that error grows with Lq (G11's two misses, at L 517 and
  a long varlen). Every FLUSH = max(FLUSH_QUERIES // BM, 1) q blocks (128 queries by
  default) except after the last, each lane adds its fragments into
  float32 totals by RED (round to nearest) and restarts them from zero; the epilogue
  adds the rest by RED, reads the totals back into the fragments and copies out as
  before (dK scaled once, there). The totals live in the CTA's own rows of the dk/dv
  outputs (one CTA per (kv block, batch, kv head), looping over the G query heads
  itself: no other CTA touches them), which gpu.backward allocates zeroed for this
  kernel; each lane's slots are its own (_totals), so no barrier orders them; a CTA
  with <= FLUSH q blocks never flushes (its kv block may see none: dK = dV = 0 as
  before). No second register set (D = 128 was at 254 registers); the 16-bit kinds
  compile to the same code (FLUSH = 0: pruned).
"""
from __future__ import annotations

import os
from collections import namedtuple
from functools import lru_cache

import numpy as np

from ._cuda import cuda, float32, int32
from ._kernels import _block_at, _hooks
from ._mma import (LOG2E, MASK_REGS, MAX_D, NEG_INF, ONE, ZERO, _JIT, Tiles, Variants,
                   _loader, head_dim_reasons, mask_bits, vec_ok)
from ._ptx import SCRATCH_WORDS, ops, red_add2

__all__ = ["dkdv_kernel", "shared_bytes", "reasons", "tile", "threads", "config"]

POS_INF = np.float32(np.inf)

# (warps, queries per q block, K/V fragments in registers). BLOCK_N = 16 * warps keys.
# ptxas (sm_90, bench/NOTES.md G8): D = 64 with K/V fragments in registers needs all
# 255 registers and spills 16 bytes in some variants; re-read from shared memory per
# q block (8 ldmatrix per 128 mma) it takes 173-188 registers, no spill. D = 128 with
# 4 warps x 64-query blocks spills (the dK/dV accumulators alone are 128 registers beside 64 of
# S^T/dP^T); 32-query blocks take 251 registers, no spill. Measured on the H200 (G19):
# D = 128 with 8 warps (128 keys) x 64 queries ran the dense backward at 185 TFLOP/s
# against 157 with 4 warps x 32 queries (G19); its causal and jagged variants spilled
# (48-80 byte stack) until their partial blocks took bit sets (BITS, G20): now only the
# attn_mask variant spills there (56 bytes), so it keeps 4 x 32 (_SMALL_TILES, also
# for block masks with a BLOCK_SIZE of 64 queries). D = 64 with 8 warps 155 against
# 152 (kept at 4). The simulator runs every
# thread as a Python thread: 2 warps (32 keys) and 16-query blocks give several kv and
# q blocks at L = 33.
# Tuning knobs for the device scripts: ATTN_GPU_MMA_BWD_CONFIG="64:4,64,1;128:4,64,0",
# ATTN_GPU_MMA_BWD_SMALL_CONFIG (the small tiles: attn_mask, BLOCK_SIZE), same format.
Config = namedtuple("Config", "NW BM KREG")
_TILES = Tiles(Config, {64: Config(4, 64, False), 128: Config(8, 64, False)},
               Config(2, 16, True), "ATTN_GPU_MMA_BWD_CONFIG")
_SMALL_TILES = Tiles(Config, {64: Config(4, 64, False), 128: Config(4, 32, False)},
                    Config(2, 16, True), "ATTN_GPU_MMA_BWD_SMALL_CONFIG")
# float32 (3xTF32, module docstring): float32 tiles take twice the shared memory of
# 16-bit ones, so the q blocks are halved: D <= 64 32 queries (77 KiB: two CTAs per
# SM), D = 128 16 queries (104 KiB: two CTAs per SM; 32 queries would take 141 KiB, one
# CTA). K/V fragments are always re-read (KREG must be 0: a split fragment is two
# registers). bench/NOTES.md (G11) has the ptxas evidence. Tuning knob:
# ATTN_GPU_TF32_BWD_CONFIG, same format.
_TF32_TILES = Tiles(Config, {64: Config(4, 32, False), 128: Config(4, 16, False)},
                    Config(2, 16, False), "ATTN_GPU_TF32_BWD_CONFIG")
# float32 (3xTF32): queries per flush of the dK/dV register accumulators into their
# float32 totals (module docstring, bench/NOTES.md G13/G14): every max(FLUSH_QUERIES //
# BM, 1) q blocks. Measured on an H200 (G14), forward+backward at L 4096 against
# PyTorch EFFICIENT: no flush 1.0-1.25x but two float32 tests over the accuracy bound;
# every 32 queries 0.67-0.78x (the RED traffic: 34% slower than no flush at D = 64);
# every 64 0.80-0.96x; every 128 0.85-1.07x — and the float32 GPU tests pass at 32 and
# at 128 alike (the chains into one accumulator stay 8x shorter than the G11 misses'
# ~1000 queries). 0 turns the flushes off (as before G13). Read when a kernel is built;
# tuning knob for the device scripts: ATTN_GPU_TF32_BWD_FLUSH=queries.
FLUSH_QUERIES = int(os.environ.get("ATTN_GPU_TF32_BWD_FLUSH", "128") or 0)


_VARIANTS = Variants(_TILES, _SMALL_TILES, _TF32_TILES)
config, threads = _VARIANTS.config, _VARIANTS.threads


def tile(D: int, Dv: int, kind: str = "bf16", small: bool = False) -> tuple[int, int]:
    """(queries per q block, keys per kv block) of the kernel for head dims D, Dv: the
    tile of its transposed block lists."""
    c = config(D, Dv, kind, small)
    return c.BM, 16 * c.NW


def reasons(kind: str, D: int, Dv: int) -> list[str]:
    """Why the tensor-core backward cannot run these head dims / dtype (empty if it
    can); the launcher then uses the SIMT dK/dV kernel."""
    if kind == "f32":
        r = []
        if D % 32 or Dv % 32:
            r.append(f"head dims {D}/{Dv}: the 3xTF32 backward needs D and Dv multiples "
                     "of 32 (the dim groups of its dK, dV and dQ B fragments)")
        if max(D, Dv) > MAX_D:
            r.append(f"head dims above {MAX_D} would not keep the dK/dV accumulators "
                     "in registers")
        return r
    return head_dim_reasons(kind, D, Dv, "backward", "the dK/dV accumulators")


def _lds(BM: int, kind: str) -> int:
    # dS^T's leading dimension: 16-bit rows padded by 8 elements (ldmatrix.trans rows on
    # distinct banks); float32 rows a multiple of 32 words, conflict-free by the XOR
    # swizzle of _swz instead of padding.
    return 32 * -(-BM // 32) if kind == "f32" else BM + 8


def _layout(D: int, Dv: int, kind: str = "bf16", small: bool = False):
    """Offsets of the shared tiles in elements (K, V, two Q and two dO buffers, dS^T:
    2-byte elements, rows padded by 8 so ldmatrix rows hit distinct banks; float32
    elements, rows padded by 4) and in float32 words (two lse and two delta buffers,
    the mods' scratch)."""
    NW, BM, _ = config(D, Dv, kind, small)
    BN = 16 * NW
    TF32 = kind == "f32"
    PAD = 4 if TF32 else 8
    LDK, LDV, LDS = D + PAD, Dv + PAD, _lds(BM, kind)
    lay = {"k": 0, "v": BN * LDK}
    lay["q"] = lay["v"] + BN * LDV
    lay["qsz"] = BM * LDK
    lay["o"] = lay["q"] + 2 * lay["qsz"]
    lay["osz"] = BM * LDV
    lay["s"] = lay["o"] + 2 * lay["osz"]
    end = lay["s"] + BN * LDS  # even: every leading dimension is
    lay["l"] = end if TF32 else end // 2
    lay["d"] = lay["l"] + 2 * BM
    lay["mf"] = lay["d"] + 2 * BM
    return lay


def shared_bytes(D: int, Dv: int, mods: bool = False, kind: str = "bf16",
                 small: bool = False) -> int:
    """Dynamic shared memory of a CTA (plus the float32 copies of S^T and dP^T per lane
    for calls with mods or attn_mask)."""
    NW, BM, _ = config(D, Dv, kind, small)
    n = 4 * _layout(D, Dv, kind, small)["mf"]
    return n + (4 * 2 * (BM // 2) * 32 * NW if mods else 0)


@cuda.jit(device=True, inline=True)
def _advance(gi, it, G, hk, b, lb, lh, kb, qf_num, qp_num):
    """The work item after (query head gi of the group, q block it): the next q block
    of the same head, else the first q block of the next head with any; gi = G when
    there is none."""
    it += 1
    while gi < G:
        lr = b * lb + (hk * G + gi) * lh + kb
        if it < qf_num[lr] + qp_num[lr]:
            break
        gi += 1
        it = 0
    return gi, it


@cuda.jit(device=True, inline=True)
def _next_jag(gi, it, G, nqt):
    """JAG's work item after (gi, it): the item's nqt q tiles of every head of the
    group in turn; gi = G when there is none."""
    if nqt == 0:
        return G, 0
    it += 1
    if it >= nqt:
        gi += 1
        it = 0
    return gi, it


# The warp's tile products and the dK/dV copy-out, one factory per shape. They are
# inlined device functions: their loops unroll inside the kernel exactly as when written
# there (the generated code is the same), so the accumulators stay in registers.
@lru_cache(maxsize=None)
def _rows_product(KD: int, NTS: int, LD: int, REG: bool, frag_a, frag_b2, mma):
    """acc += A B^T for one warp: A its 16 rows (the warp's keys) at ``offa`` of a tile
    with leading dimension LD, KD k-steps of 16 (fragments from ``af`` when REG, else by
    ldmatrix), B^T the row-major (query, dim) tile at ``offb``, acc the 16 x 8*NTS
    float32 C fragments: S^T = K Q^T, dP^T = V dO^T."""

    @cuda.jit(device=True, inline=True)
    def product(scr, sm, offa, af, offb, acc):
        for kk in range(KD):
            if REG:
                a0, a1, a2, a3 = af[4 * kk], af[4 * kk + 1], af[4 * kk + 2], \
                    af[4 * kk + 3]
            else:
                a0, a1, a2, a3 = frag_a(sm, offa + 16 * kk, LD)
            for jp in range(NTS // 2):
                b0, b1, b2, b3 = frag_b2(sm, offb + 16 * jp * LD + 16 * kk, LD)
                i = 8 * jp
                acc[i], acc[i + 1], acc[i + 2], acc[i + 3] = mma(
                    scr, a0, a1, a2, a3, b0, b1, acc[i], acc[i + 1], acc[i + 2],
                    acc[i + 3])
                acc[i + 4], acc[i + 5], acc[i + 6], acc[i + 7] = mma(
                    scr, a0, a1, a2, a3, b2, b3, acc[i + 4], acc[i + 5], acc[i + 6],
                    acc[i + 7])

    return product


@lru_cache(maxsize=None)
def _pa_product(KQ: int, NJ: int, LD: int, frag_bt2, mma):
    """acc += A B for one warp: A the packed 16 x 16*KQ fragments ``pa`` (P^T or dS^T),
    B the row-major (query, dim) tile at ``off`` (16*KQ rows, leading dimension LD) by
    ldmatrix.trans, acc the 16 x 16*NJ float32 C fragments: dV += P^T dO, dK += dS^T Q."""

    @cuda.jit(device=True, inline=True)
    def product(scr, sm, off, pa, acc):
        for kk in range(KQ):
            for jp in range(NJ):
                b0, b1, b2, b3 = frag_bt2(sm, off + 16 * kk * LD + 16 * jp, LD)
                c = 8 * jp
                a = 4 * kk
                acc[c], acc[c + 1], acc[c + 2], acc[c + 3] = mma(
                    scr, pa[a], pa[a + 1], pa[a + 2], pa[a + 3], b0, b1,
                    acc[c], acc[c + 1], acc[c + 2], acc[c + 3])
                acc[c + 4], acc[c + 5], acc[c + 6], acc[c + 7] = mma(
                    scr, pa[a], pa[a + 1], pa[a + 2], pa[a + 3], b2, b3,
                    acc[c + 4], acc[c + 5], acc[c + 6], acc[c + 7])

    return product


@lru_cache(maxsize=None)
def _rows_product_tf32(KD: int, NTS: int, LD: int, frag_a, frag_b2, split, mma3):
    """3xTF32 _rows_product: KD k-steps of 8 (each fragment split once into tf32 big
    and small, then three mma per product), A always by ldmatrix."""

    @cuda.jit(device=True, inline=True)
    def product(scr, sm, offa, af, offb, acc):
        for kk in range(KD):
            a0, a1, a2, a3 = frag_a(sm, offa + 8 * kk, LD)
            ab0, as0 = split(a0)
            ab1, as1 = split(a1)
            ab2, as2 = split(a2)
            ab3, as3 = split(a3)
            for jp in range(NTS // 2):
                b0, b1, b2, b3 = frag_b2(sm, offb + 16 * jp * LD + 8 * kk, LD)
                bb0, bs0 = split(b0)
                bb1, bs1 = split(b1)
                bb2, bs2 = split(b2)
                bb3, bs3 = split(b3)
                i = 8 * jp
                acc[i], acc[i + 1], acc[i + 2], acc[i + 3] = mma3(
                    scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, bb0, bb1, bs0, bs1,
                    acc[i], acc[i + 1], acc[i + 2], acc[i + 3])
                acc[i + 4], acc[i + 5], acc[i + 6], acc[i + 7] = mma3(
                    scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, bb2, bb3, bs2, bs3,
                    acc[i + 4], acc[i + 5], acc[i + 6], acc[i + 7])

    return product


@lru_cache(maxsize=None)
def _pa_product_tf32(KQ8: int, NG: int, LD: int, lds4, split, mma3):
    """3xTF32 acc += A B for one warp: A the 16 x 8*KQ8 float32 C fragments ``x`` of
    S^T's layout (P^T or dS^T) read as A fragments in 8-query steps with the query
    order permuted inside a step (A column t = query 2t, t+4 = query 2t+1: a0..a3 =
    c0, c2, c1, c3), B the row-major (query, dim) tile at ``off`` by 16-byte loads of
    rows 2t and 2t+1 with the dims permuted inside 32-dim groups (n-tile q of group J
    holds dims 32J + 4n + q), acc the 16 x 32*NG C fragments in that dim order:
    dV += P^T dO, dK += dS^T Q (the forward's P.V, module docstring of gpu/_mma.py)."""

    @cuda.jit(device=True, inline=True)
    def product(scr, sm, off, x, acc):
        lane = cuda.threadIdx.x & 31
        g = lane >> 2
        t = lane & 3
        for kk in range(KQ8):
            i = 4 * kk
            pb0, ps0 = split(x[i])
            pb1, ps1 = split(x[i + 2])
            pb2, ps2 = split(x[i + 1])
            pb3, ps3 = split(x[i + 3])
            vr = off + (8 * kk + 2 * t) * LD + 4 * g
            for J in range(NG):
                v0, v1, v2, v3 = lds4(sm, vr + 32 * J)
                w0, w1, w2, w3 = lds4(sm, vr + LD + 32 * J)
                vb0, vs0 = split(v0)
                vb1, vs1 = split(v1)
                vb2, vs2 = split(v2)
                vb3, vs3 = split(v3)
                wb0, ws0 = split(w0)
                wb1, ws1 = split(w1)
                wb2, ws2 = split(w2)
                wb3, ws3 = split(w3)
                c = 16 * J
                acc[c], acc[c + 1], acc[c + 2], acc[c + 3] = mma3(
                    scr, pb0, pb1, pb2, pb3, ps0, ps1, ps2, ps3, vb0, wb0, vs0, ws0,
                    acc[c], acc[c + 1], acc[c + 2], acc[c + 3])
                acc[c + 4], acc[c + 5], acc[c + 6], acc[c + 7] = mma3(
                    scr, pb0, pb1, pb2, pb3, ps0, ps1, ps2, ps3, vb1, wb1, vs1, ws1,
                    acc[c + 4], acc[c + 5], acc[c + 6], acc[c + 7])
                acc[c + 8], acc[c + 9], acc[c + 10], acc[c + 11] = mma3(
                    scr, pb0, pb1, pb2, pb3, ps0, ps1, ps2, ps3, vb2, wb2, vs2, ws2,
                    acc[c + 8], acc[c + 9], acc[c + 10], acc[c + 11])
                acc[c + 12], acc[c + 13], acc[c + 14], acc[c + 15] = mma3(
                    scr, pb0, pb1, pb2, pb3, ps0, ps1, ps2, ps3, vb3, wb3, vs3, ws3,
                    acc[c + 12], acc[c + 13], acc[c + 14], acc[c + 15])

    return product


@cuda.jit(device=True, inline=True)
def _swz(key):
    """The XOR swizzle of the float32 dS^T tile's columns in key row ``key``: bit 0 of
    the key into column bit 0, key bits 1-2 into column bits 3-4. The writers (lane g,
    t: key g, queries 2t+e) and the dQ readers (lane g, t: keys 2t, 2t+1, query g) then
    both hit 32 distinct banks with rows of a multiple of 32 words."""
    return (key & 1) | (((key >> 1) & 3) << 3)


@lru_cache(maxsize=None)
def _row_store(ROWS: int, W: int, LD: int, NTH: int):
    """Copy the shared tile at ``off`` (ROWS rows of W elements, leading dimension LD) to
    rows n0.. of the (batch, head) slice at ``base`` of ``out`` (strides s_l, s_d); rows
    at or past L are not written. Consecutive threads take consecutive elements."""

    @cuda.jit(device=True, inline=True)
    def store(out, base, s_l, s_d, sm, off, n0, L, tid):
        for e in range(tid, ROWS * W, NTH):
            r = e // W
            d = e - r * W
            if n0 + r < L:
                out[base + (n0 + r) * s_l + d * s_d] = sm[off + r * LD + d]

    return store


@lru_cache(maxsize=None)
def _totals(N: int):
    """The float32 totals of a lane's N dK (or dV) accumulators ``acc`` (3xTF32, FLUSH):
    slots in the CTA's own rows of the output ``out`` ((batch, head) slice at ``base``,
    strides s_l, s_d), which no other CTA touches. Register idx (key row r0 + 8*((idx
    >> 1) & 1), n-tile idx >> 2, column 2t + (idx & 1)) has the slot at that key row,
    column 4k + t, k = 2*(idx >> 2) + (idx & 1): a bijection onto the row's columns, the
    four lanes of a row on four adjacent words (the epilogue's copy-out writes the real
    layout over them). Rows at or past L are not touched (their accumulators stay zero:
    keys past Lk have P = dS = 0).

    The slots start at zero: gpu.backward allocates dk, dv zeroed when this kernel may
    run (float32, TF32X3_BACKWARD, FLUSH_QUERIES > 0). ``flush``: the totals += acc by
    float32 RED (cuda.atomic.add with the result unused: round to nearest even, and no
    load, so no registers beyond acc), then acc = 0 if ``zero``. ``load``: acc = the
    totals. Every access to a slot is by its own lane, so program order orders them.
    ptxas at D = 128 (254 registers before; sm_90, 2026-12-02): a load-add-store flush
    made it batch the loads and spill 1.5-2 KB; a store for the first flush and RED for
    the rest (two unrolled copies in the loop) 1.5 KB; zeroing the slots in the kernel's
    prologue 144 bytes; RED alone into zeroed slots 48 bytes (the slot addresses,
    reloaded at the flushes, a few LDL per q block).
    """
    H = N // 2  # the lane's registers per key row

    # Loops per key row with the row test outside and the slot addresses a + k*s4:
    # small unrolled bodies, so acc stays in registers (a per-register row test and
    # address in one 64-register loop stayed rolled at D = 128: acc in local memory).
    @cuda.jit(device=True, inline=True)
    def flush(out, base, s_l, s_d, r0, L, t, acc, zero):
        s4 = 4 * s_d
        for hi in range(2):
            if r0 + 8 * hi < L:
                a = base + (r0 + 8 * hi) * s_l + t * s_d
                for k in range(H):
                    cuda.atomic.add(out, a + k * s4, acc[4 * (k >> 1) + 2 * hi + (k & 1)])
        if zero:
            for idx in range(N):
                acc[idx] = ZERO

    @cuda.jit(device=True, inline=True)
    def load(out, base, s_l, s_d, r0, L, t, acc):
        s4 = 4 * s_d
        for hi in range(2):
            if r0 + 8 * hi < L:
                a = base + (r0 + 8 * hi) * s_l + t * s_d
                for k in range(H):
                    acc[4 * (k >> 1) + 2 * hi + (k & 1)] = out[a + k * s4]

    return flush, load


@lru_cache(maxsize=None)
def dkdv_kernel(kind: str, D: int, Dv: int, CAUSAL: bool, MASK: bool, mods=None,
                JAG: bool = False, SMALL: bool = False):
    """The tensor-core dK/dV(+dQ atomics) kernel for one specialisation; same arguments
    as _kernels.dkdv_kernel's kernels.

    ``JAG``: packed variable-length sequences (a JaggedBand), scheduled per sequence as
    the forward's JAG: CTA x reads item ``qf_num[8 * x : 8 * x + 7]`` of a table
    (gpu.jagged_bwd_items) = the first key n0 of a BN-key tile of a sequence, the
    sequence's key end, the first row of its first q tile, the number of BM-row q
    tiles, the sequence's query end, dg, dl (row r sees keys r + dl <= j < r + dg).
    Rows past the query end get lse +inf (P = 0), keys past the key end a -inf bias,
    and dK/dV rows are stored only below the key end (the next sequence's tile is
    another CTA's); only tiles cut by the limits test them per element. Needs dQ by
    atomics; no causal flag, attn_mask or mods.

    ``SMALL``: the small tiles (config); an attn_mask (MASK) takes them anyway."""
    if reasons(kind, D, Dv):
        raise ValueError("; ".join(reasons(kind, D, Dv)))
    if JAG and (CAUSAL or MASK or mods is not None):
        raise ValueError("the jagged backward takes its limits from the item table: no "
                         "causal flag, attn_mask or mods")
    mask_fn, score_fn, MASKMOD, SCORE = _hooks(mods)
    o_ = ops(kind)
    frag_a, frag_b2, frag_bt2, mma = o_.frag_a, o_.frag_b2, o_.frag_bt2, o_.mma
    pack, exp2, commit, wait_all, wait_one = (o_.pack, o_.exp2, o_.commit, o_.wait_all,
                                              o_.wait_one)
    split, lds4, mma3 = o_.split, o_.lds4, o_.mma3
    from numba.core import types

    TF32 = kind == "f32"  # 3xTF32 products (module docstring)
    ELT = float32 if TF32 else types.float16 if kind == "f16" else types.int16

    NW, BM, KREG = config(D, Dv, kind, MASK or SMALL)
    if TF32 and KREG:
        raise ValueError("the 3xTF32 backward re-reads K/V fragments (KREG = 0)")
    # 3xTF32: flush the dK/dV accumulators into their float32 totals every FLUSH q
    # blocks (FLUSH_QUERIES; 0 = never). The 16-bit kinds never do (FLUSH = 0: the
    # branches below are pruned at compile time).
    FLUSH = max(FLUSH_QUERIES // BM, 1) if TF32 and FLUSH_QUERIES > 0 else 0
    FLUSHING = FLUSH > 0
    BN = 16 * NW
    NTH = 32 * NW
    KSTEP = 8 if TF32 else 16    # the mma's k
    PAD = 4 if TF32 else 8       # 16 bytes of padding per shared row
    LDK, LDV, LDS = D + PAD, Dv + PAD, _lds(BM, kind)
    KD, KDV = D // KSTEP, Dv // KSTEP  # k-steps of S^T (over D) and dP^T (over Dv)
    NTS = BM // 8                # m16n8 tiles of S^T per warp
    NS = 4 * NTS                 # S^T (and dP^T) registers per lane
    KQ = BM // 16                # k-steps of dV, dK (over the q block's queries)
    NPA = 4 * KQ                 # packed P^T / dS^T A fragment registers
    NK, NV = 4 * (D // 8), 4 * (Dv // 8)  # dK, dV registers per lane
    NKF = 4 * KD if KREG else 4
    NVF = 4 * KDV if KREG else 4
    # dQ: warp w takes the 16 queries mq = w % KQ of the q block (its dS fragments
    # are loaded once) and the 16-dim tiles jp = w // KQ + JPW * i.
    if NW % KQ and not TF32:
        raise ValueError(f"{config(D, Dv, kind, MASK or SMALL)}: the warps must be a "
                         f"multiple of the q block's {KQ} 16-query tiles")
    JPW = max(NW // KQ, 1)       # warps per 16-query tile
    NJP = D // 16                # 16-dim tiles of dQ
    QIT = -(-NJP // JPW)         # ... per warp
    KN = BN // 16                # k-steps of dQ (over the kv block's keys)
    NDA = 4 * KN                 # dS A fragment registers of the dQ tiles
    # 3xTF32 dQ: units of 16 queries x 32 dims (four n-tiles, the permuted dim groups),
    # u = mq + KQ * J, spread over the warps (u = w + NW * i); 8-key k-steps.
    NU = KQ * (D // 32)
    UIT = -(-NU // NW)
    lay = _layout(D, Dv, kind, MASK or SMALL)
    OK, OV, OQ0, QSZ, OO0, OSZ, OS = (lay[n] for n in ("k", "v", "q", "qsz", "o", "osz",
                                                        "s"))
    OL0, OD0, OMF = lay["l"], lay["d"], lay["mf"]
    SCR = SCRATCH_WORDS(NW)
    # Full blocks of a mask-only call need no per-element work (FlexAttention's
    # full/partial split): only score_mod, or a partial block's attn_mask (or mask_mod
    # when MASKREG is off), take the shared-memory path; the rest the register path.
    MASKS = MASK or MASKMOD
    # mask_mod alone on a partial block: as in the forward (gpu/_mma.py MASKREG), a
    # rolled loop per key row of the lane evaluates the mask into a bit set of its NCB
    # query columns, and the unrolled P^T/dS^T loop applies the bits with a select.
    NCB = NS // 2
    MASKREG = MASK_REGS and MASKMOD and not SCORE and not MASK and NCB <= 32

    # causal or jagged (no mask_mod, score_mod or attn_mask) partial blocks through bit
    # sets of the band qm + dl <= kn < qm + dg (BITS; causal: dg = 1, no lower edge): the
    # per-element comparisons in the unrolled P^T/dS^T loop kept more values live and
    # spilled at D = 128 with 64-query blocks (bench/NOTES.md G20).
    BITS = MASK_REGS and (CAUSAL or JAG) and not MASKS and not SCORE and NCB <= 32
    key_bits = mask_bits(mask_fn, CAUSAL, NCB, False)

    @cuda.jit(device=True, inline=True)
    def band_bits(kn, c0, dg, dl):
        # The jagged limits of key kn against the lane's query columns c0 + 8*(j >> 1)
        # + (j & 1): visible where qm + dl <= kn < qm + dg.
        bits = 0
        for j in range(NCB):
            qm = c0 + 8 * (j >> 1) + (j & 1)
            bits |= int32((kn < qm + dg) & (kn >= qm + dl)) << j
        return int32(bits)
    load_k = _loader(BN, D, LDK, NTH, kind, o_.cp16)
    load_v = _loader(BN, Dv, LDV, NTH, kind, o_.cp16)
    load_q = _loader(BM, D, LDK, NTH, kind, o_.cp16)
    load_o = _loader(BM, Dv, LDV, NTH, kind, o_.cp16)
    store_k = _row_store(BN, D, LDK, NTH)
    store_v = _row_store(BN, Dv, LDV, NTH)
    flush_k, total_k = _totals(NK)
    flush_v, total_v = _totals(NV)
    if TF32:
        kq = _rows_product_tf32(KD, NTS, LDK, frag_a, frag_b2, split, mma3)
        vo = _rows_product_tf32(KDV, NTS, LDV, frag_a, frag_b2, split, mma3)
        pdo = _pa_product_tf32(BM // 8, Dv // 32, LDV, lds4, split, mma3)
        dsq = _pa_product_tf32(BM // 8, D // 32, LDK, lds4, split, mma3)
    else:
        kq = _rows_product(KD, NTS, LDK, KREG, frag_a, frag_b2, mma)
        vo = _rows_product(KDV, NTS, LDV, KREG, frag_a, frag_b2, mma)
        pdo = _pa_product(KQ, Dv // 16, LDV, frag_bt2, mma)
        dsq = _pa_product(KQ, D // 16, LDK, frag_bt2, mma)

    @cuda.jit(device=True, inline=True)
    def _next(gi, it, G, hk, b, lb, lh, kb, qf_num, qp_num, nqt):
        if JAG:
            return _next_jag(gi, it, G, nqt)
        return _advance(gi, it, G, hk, b, lb, lh, kb, qf_num, qp_num)

    @cuda.jit(device=True, inline=True)
    def q_row(gi, it, hk, G, b, lb, lh, kb, qf_num, qf_idx, qp_idx, ncols, mj):
        # First row of work item (gi, it): from the block lists, or (JAG) the item's
        # first q tile mj plus it tiles.
        if JAG:
            return mj + it * BM
        lr = b * lb + (hk * G + gi) * lh + kb
        return _block_at(it, qf_num[lr], lr, ncols, qf_idx, qp_idx) * BM

    @cuda.jit(device=True, inline=True)
    def stage(sm, smf, nb, m0, h, q, do, lse, delta, qs_b, qs_h, qs_l, qs_d,
              gs_b, gs_h, gs_l, gs_d, b, Hq, Lq, qlim, tid):
        # Q, dO of the q block at row m0 of head h into buffer nb (asynchronous where
        # the layout allows), lse*log2(e) and delta beside them (plain loads: BM
        # values). Rows at or past qlim (another sequence, JAG) stage as a query that
        # saw no key.
        qbase = b * qs_b + h * qs_h
        gbase = b * gs_b + h * gs_h
        load_q(sm, OQ0 + nb * QSZ, q, qbase, m0, qs_l, qs_d, Lq, tid,
               vec_ok(q, qbase, qs_l, qs_d))
        load_o(sm, OO0 + nb * OSZ, do, gbase, m0, gs_l, gs_d, Lq, tid,
               vec_ok(do, gbase, gs_l, gs_d))
        if tid < BM:
            qm = m0 + tid
            lv = POS_INF
            dl = ZERO
            if qm < qlim:
                r = (b * Hq + h) * Lq + qm
                lv = lse[r]
                # A query that saw no key (lse -inf) has P = 0 everywhere: +inf makes
                # exp2(s - lse) = 0 instead of NaN.
                lv = lv * LOG2E if lv > NEG_INF else POS_INF
                dl = delta[r]
            smf[OL0 + nb * BM + tid] = lv
            smf[OD0 + nb * BM + tid] = dl

    @cuda.jit(**_JIT)
    def dkdv(q, k, v, do, lse, delta, mask, dk, dv, dqa,
             qs_b, qs_h, qs_l, qs_d, ks_b, ks_h, ks_l, ks_d,
             vs_b, vs_h, vs_l, vs_d, gs_b, gs_h, gs_l, gs_d,
             ms_b, ms_h, ms_q, ms_k,
             dks_b, dks_h, dks_l, dks_d, dvs_b, dvs_h, dvs_l, dvs_d,
             Hq, Hkv, G, Lq, Lk, scale,
             qf_num, qf_idx, qp_num, qp_idx, ncols, lb, lh, x0, x1, x2, x3):
        kb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // Hkv
        hk = bh - b * Hkv
        tid = cuda.threadIdx.x
        w = tid >> 5
        lane = tid & 31
        g = lane >> 2
        t = lane & 3
        if JAG:
            e = 8 * (cuda.gridDim.x - 1 - kb)  # items lightest first: heaviest start
            n0 = qf_num[e]
            klim = qf_num[e + 1]   # keys at or past it: another sequence
            mj = qf_num[e + 2]
            nqt = qf_num[e + 3]
            qlim = qf_num[e + 4]   # rows at or past it: another sequence
            dg = qf_num[e + 5]
            dl = qf_num[e + 6]
        else:
            n0 = kb * BN
            klim = Lk
            qlim = Lq
            mj = nqt = 0
            dg = 1                # causal (BITS): keys kn <= qm
            dl = -(1 << 30)

        sm = cuda.shared.array(0, ELT)
        smf = cuda.shared.array(0, float32)  # the same dynamic shared memory
        smi = cuda.shared.array(0, int32)    # ... as packed element pairs
        scr = cuda.shared.array(SCR, float32)
        kf = cuda.local.array(NKF, int32)
        vf = cuda.local.array(NVF, int32)
        s = cuda.local.array(NS, float32)
        dp = cuda.local.array(NS, float32)
        kbits = cuda.local.array(2, int32)
        pa = cuda.local.array(NPA, int32)
        dka = cuda.local.array(NK, float32)
        dva = cuda.local.array(NV, float32)
        dqc = cuda.local.array(16 if TF32 else 8, float32)
        da = cuda.local.array(NDA, int32)

        sl2 = float32(scale) * LOG2E
        sc = float32(scale)
        kbase = b * ks_b + hk * ks_h
        vbase = b * vs_b + hk * vs_h
        OKW = OK + 16 * w * LDK  # this warp's key rows
        OVW = OV + 16 * w * LDV
        kr0 = n0 + 16 * w + g    # the lane's key rows: kr0, kr0 + 8
        # Keys past Lk: a -inf bias on their rows makes P = dS = 0 there.
        rb0 = ZERO if kr0 < klim else NEG_INF
        rb1 = ZERO if kr0 + 8 < klim else NEG_INF

        load_k(sm, OK, k, kbase, n0, ks_l, ks_d, Lk, tid, vec_ok(k, kbase, ks_l, ks_d))
        load_v(sm, OV, v, vbase, n0, vs_l, vs_d, Lk, tid, vec_ok(v, vbase, vs_l, vs_d))
        commit()
        gi, it = _next(0, -1, G, hk, b, lb, lh, kb, qf_num, qp_num, nqt)
        if gi < G:
            stage(sm, smf, 0,
                  q_row(gi, it, hk, G, b, lb, lh, kb, qf_num, qf_idx, qp_idx, ncols, mj),
                  hk * G + gi, q, do, lse, delta, qs_b, qs_h, qs_l, qs_d,
                  gs_b, gs_h, gs_l, gs_d, b, Hq, Lq, qlim, tid)
        commit()
        wait_one()  # K and V have landed (groups complete in order)
        cuda.syncthreads()
        if KREG:
            for kk in range(KD):
                kf[4 * kk], kf[4 * kk + 1], kf[4 * kk + 2], kf[4 * kk + 3] = frag_a(
                    sm, OKW + 16 * kk, LDK)
            for kk in range(KDV):
                vf[4 * kk], vf[4 * kk + 1], vf[4 * kk + 2], vf[4 * kk + 3] = frag_a(
                    sm, OVW + 16 * kk, LDV)
        for j in range(NK):
            dka[j] = ZERO
        for j in range(NV):
            dva[j] = ZERO

        buf = 0
        nq = 0  # q blocks done (FLUSH)
        while gi < G:
            h = hk * G + gi
            m0 = q_row(gi, it, hk, G, b, lb, lh, kb, qf_num, qf_idx, qp_idx, ncols, mj)
            if JAG:
                # Cut by a limit: a key at or past the first row's upper edge, or one
                # below the last row's lower edge.
                partial = n0 + BN > m0 + dg or n0 < m0 + BM - 1 + dl
            else:
                partial = it >= qf_num[b * lb + h * lh + kb]
            ngi, nit = _next(gi, it, G, hk, b, lb, lh, kb, qf_num, qp_num, nqt)
            if ngi < G:
                # The next q block into the other buffer: free since the second
                # barrier of the previous iteration.
                stage(sm, smf, 1 - buf,
                      q_row(ngi, nit, hk, G, b, lb, lh, kb, qf_num, qf_idx, qp_idx, ncols,
                            mj),
                      hk * G + ngi, q, do, lse, delta, qs_b, qs_h, qs_l, qs_d,
                      gs_b, gs_h, gs_l, gs_d, b, Hq, Lq, qlim, tid)
                commit()
                wait_one()
            else:
                wait_all()
            # Barrier: every thread's copies of this q block are visible.
            cuda.syncthreads()
            oq = OQ0 + buf * QSZ
            oo = OO0 + buf * OSZ
            ol = OL0 + buf * BM
            od = OD0 + buf * BM

            # S^T = K Q^T, dP^T = V dO^T (16 keys x BM queries per warp).
            for j in range(NS):
                s[j] = ZERO
                dp[j] = ZERO
            kq(scr, sm, OKW, kf, oq, s)
            vo(scr, sm, OVW, vf, oo, dp)

            # P^T and dS^T. Register idx of S^T belongs to key row kr0 + 8*((idx >> 1)
            # & 1) and query column 8*(idx >> 2) + 2t + (idx & 1) of the block.
            if (MASKREG or BITS) and partial:
                if BITS:
                    # Causal is the band dg = 1 with no lower edge (dl set so).
                    kbits[0] = band_bits(kr0, m0 + 2 * t, dg, dl)
                    kbits[1] = band_bits(kr0 + 8, m0 + 2 * t, dg, dl)
                else:
                    kbits[0] = key_bits(b, h, kr0, m0 + 2 * t, Lq, Lk, x0, x1, x2, x3)
                    kbits[1] = key_bits(b, h, kr0 + 8, m0 + 2 * t, Lq, Lk, x0, x1, x2,
                                        x3)
                for idx in range(NS):
                    col = 8 * (idx >> 2) + 2 * t + (idx & 1)
                    hi = (idx >> 1) & 1
                    x = s[idx] * sl2 + (rb1 if hi else rb0) - smf[ol + col]
                    bit = (kbits[hi] >> (2 * (idx >> 2) + (idx & 1))) & 1
                    # A select, not a branch (a branch leaves the loop rolled); a
                    # hidden element's exponent may overflow, the select drops it.
                    p = exp2(x)
                    p = p if bit != 0 else ZERO
                    s[idx] = p
                    dp[idx] = p * (dp[idx] - smf[od + col])
            elif SCORE or (MASKS and partial):
                for idx in range(NS):
                    smf[OMF + idx * NTH + tid] = s[idx] * sc
                    smf[OMF + (NS + idx) * NTH + tid] = dp[idx]
                for idx in range(NS):
                    col = 8 * (idx >> 2) + 2 * t + (idx & 1)
                    qm = m0 + col
                    kn = kr0 + 8 * ((idx >> 1) & 1)
                    x = smf[OMF + idx * NTH + tid]
                    ok = kn < Lk
                    gd = ONE
                    if SCORE:
                        if ok and qm < Lq:
                            x, gd = score_fn(x, b, h, qm, kn, x0, x1, x2, x3)
                    if partial:
                        if CAUSAL:
                            ok = ok and kn <= qm
                        if MASK:
                            if ok and qm < Lq:
                                x += mask[b * ms_b + h * ms_h + qm * ms_q + kn * ms_k]
                        if MASKMOD:
                            if ok and qm < Lq:
                                ok = mask_fn(b, h, qm, kn, x0, x1, x2, x3)
                    p = ZERO
                    if ok:
                        p = exp2(float32(x) * LOG2E - smf[ol + col])
                    ds = p * (smf[OMF + (NS + idx) * NTH + tid] - smf[od + col])
                    if SCORE:
                        # Chain rule through score_mod, only where P > 0 (a hidden
                        # element's derivative, maybe inf, never enters).
                        if ds != ZERO:
                            ds = ds * float32(gd)
                    smf[OMF + idx * NTH + tid] = p
                    smf[OMF + (NS + idx) * NTH + tid] = ds
                for idx in range(NS):
                    s[idx] = smf[OMF + idx * NTH + tid]
                    dp[idx] = smf[OMF + (NS + idx) * NTH + tid]
            elif CAUSAL and partial:
                # (BITS off: ATTN_GPU_MASK_REGS=0) per-element tests; so the jagged one
                for idx in range(NS):
                    col = 8 * (idx >> 2) + 2 * t + (idx & 1)
                    hi = (idx >> 1) & 1
                    x = s[idx] * sl2 + (rb1 if hi else rb0) - smf[ol + col]
                    p = exp2(x) if kr0 + 8 * hi <= m0 + col else ZERO
                    s[idx] = p
                    dp[idx] = p * (dp[idx] - smf[od + col])
            elif JAG and partial:
                for idx in range(NS):
                    col = 8 * (idx >> 2) + 2 * t + (idx & 1)
                    hi = (idx >> 1) & 1
                    kn = kr0 + 8 * hi
                    qm = m0 + col
                    x = s[idx] * sl2 + (rb1 if hi else rb0) - smf[ol + col]
                    p = exp2(x) if kn < qm + dg and kn >= qm + dl else ZERO
                    s[idx] = p
                    dp[idx] = p * (dp[idx] - smf[od + col])
            else:
                for idx in range(NS):
                    col = 8 * (idx >> 2) + 2 * t + (idx & 1)
                    x = s[idx] * sl2 + (rb1 if (idx >> 1) & 1 else rb0) - smf[ol + col]
                    p = exp2(x)
                    s[idx] = p
                    dp[idx] = p * (dp[idx] - smf[od + col])

            if TF32:
                # 3xTF32: P^T's and dS^T's accumulators are the A fragments as they are
                # (permuted query order, _pa_product_tf32); dS^T to shared memory for
                # dQ, one word per element at (key, query ^ _swz(key)): key row
                # 16w + g + 8*((idx >> 1) & 1), query 8*(idx >> 2) + 2t + (idx & 1).
                pdo(scr, sm, oo, s, dva)
                sw = OS + (16 * w + g) * LDS
                zg = _swz(g)  # the swizzle of rows g and g + 8 (16w + 8h: bits >= 3)
                for idx in range(NS):
                    smf[sw + 8 * ((idx >> 1) & 1) * LDS
                        + ((8 * (idx >> 2) + 2 * t + (idx & 1)) ^ zg)] = dp[idx]
                dsq(scr, sm, oq, dp, dka)
            else:
                # dV += P^T dO: P^T's accumulators, packed, are the A fragments.
                for kk in range(KQ):
                    for e in range(4):
                        pa[4 * kk + e] = pack(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1])
                pdo(scr, sm, oo, pa, dva)
                # dS^T packed: dK's A fragments, and to shared memory for dQ (pair e of
                # k-step kk sits at key row 8*(e & 1) + g, query 16kk + 8*(e >> 1) + 2t).
                for kk in range(KQ):
                    for e in range(4):
                        w2 = pack(dp[8 * kk + 2 * e], dp[8 * kk + 2 * e + 1])
                        pa[4 * kk + e] = w2
                        smi[(OS + (16 * w + g + 8 * (e & 1)) * LDS + 16 * kk + 8 * (e >> 1)
                             + 2 * t) >> 1] = w2
                # dK += dS^T Q
                dsq(scr, sm, oq, pa, dka)
            # Barrier: dS^T of every warp is in shared memory (and every warp is done
            # with this Q/dO buffer and its lse/delta, which the next iteration's
            # copies may overwrite).
            cuda.syncthreads()

            rbase = (b * Hq + h) * Lq
            if TF32:
                # dQ += scale * dS K, 3xTF32: unit u = (16 queries mq, 32 dims J) per
                # warp and pass, 8-key k-steps with the key order permuted inside a step
                # (A column t = key 2t, t+4 = key 2t+1) so that K's B fragments are
                # 16-byte loads of rows 2t, 2t+1 (dims 32J + 4g.., as in dK/dV); A = dS
                # by scalar loads of the swizzled dS^T tile (key rows 2t, 2t+1: swizzle
                # 8t and 8t + 1).
                for ii in range(UIT):
                    u = w + NW * ii
                    valid = NU % NW == 0 or u < NU
                    if not valid:
                        u = 0  # same mma count in every warp (the simulator's barriers)
                    J = u // KQ
                    qc = 16 * (u - J * KQ) + g
                    for e in range(16):
                        dqc[e] = ZERO
                    for kk in range(BN // 8):
                        ra = OS + (8 * kk + 2 * t) * LDS
                        a0, a2 = smf[ra + (qc ^ (8 * t))], smf[ra + LDS + (qc ^ (8 * t + 1))]
                        a1 = smf[ra + ((qc + 8) ^ (8 * t))]
                        a3 = smf[ra + LDS + ((qc + 8) ^ (8 * t + 1))]
                        ab0, as0 = split(a0)
                        ab1, as1 = split(a1)
                        ab2, as2 = split(a2)
                        ab3, as3 = split(a3)
                        kr = OK + (8 * kk + 2 * t) * LDK + 32 * J + 4 * g
                        v0, v1, v2, v3 = lds4(sm, kr)
                        w0, w1, w2, w3 = lds4(sm, kr + LDK)
                        vb0, vs0 = split(v0)
                        vb1, vs1 = split(v1)
                        vb2, vs2 = split(v2)
                        vb3, vs3 = split(v3)
                        wb0, ws0 = split(w0)
                        wb1, ws1 = split(w1)
                        wb2, ws2 = split(w2)
                        wb3, ws3 = split(w3)
                        dqc[0], dqc[1], dqc[2], dqc[3] = mma3(
                            scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, vb0, wb0, vs0, ws0,
                            dqc[0], dqc[1], dqc[2], dqc[3])
                        dqc[4], dqc[5], dqc[6], dqc[7] = mma3(
                            scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, vb1, wb1, vs1, ws1,
                            dqc[4], dqc[5], dqc[6], dqc[7])
                        dqc[8], dqc[9], dqc[10], dqc[11] = mma3(
                            scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, vb2, wb2, vs2, ws2,
                            dqc[8], dqc[9], dqc[10], dqc[11])
                        dqc[12], dqc[13], dqc[14], dqc[15] = mma3(
                            scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, vb3, wb3, vs3, ws3,
                            dqc[12], dqc[13], dqc[14], dqc[15])
                    if valid:
                        # register e: n-tile e >> 2 (dims 32J + 4n + (e >> 2)), column
                        # n = 2t + (e & 1), query row g + 8*((e >> 1) & 1)
                        for e in range(16):
                            qm = m0 + qc + 8 * ((e >> 1) & 1)
                            if qm < qlim:  # past it dS is 0 (JAG)
                                d = 32 * J + 8 * t + 4 * (e & 1) + (e >> 2)
                                cuda.atomic.add(dqa, (rbase + qm) * D + d, dqc[e] * sc)
            else:
                # dQ += scale * dS K: 16x16 tiles (query tile mq, dims 16jp..) over warps.
                # A = dS (queries x keys) from the transposed (key, query) tile: frag_bt2's
                # matrices in the order 0, 2, 1, 3.
                mq = w % KQ
                for kk in range(KN):
                    da[4 * kk], da[4 * kk + 2], da[4 * kk + 1], da[4 * kk + 3] = frag_bt2(
                        sm, OS + 16 * kk * LDS + 16 * mq, LDS)
                for ii in range(QIT):
                    jp = w // KQ + JPW * ii
                    valid = NJP % JPW == 0 or jp < NJP
                    if not valid:
                        jp = 0  # same mma count in every warp (the simulator's barriers)
                    for e in range(8):
                        dqc[e] = ZERO
                    for kk in range(KN):
                        a = 4 * kk
                        b0, b1, b2, b3 = frag_bt2(sm, OK + 16 * kk * LDK + 16 * jp, LDK)
                        dqc[0], dqc[1], dqc[2], dqc[3] = mma(
                            scr, da[a], da[a + 1], da[a + 2], da[a + 3], b0, b1,
                            dqc[0], dqc[1], dqc[2], dqc[3])
                        dqc[4], dqc[5], dqc[6], dqc[7] = mma(
                            scr, da[a], da[a + 1], da[a + 2], da[a + 3], b2, b3,
                            dqc[4], dqc[5], dqc[6], dqc[7])
                    if valid:
                        # Registers 4n + 2hi, +1: query row g + 8hi, dims 16jp + 8n + 2t,
                        # +1 (adjacent: one 8-byte reduction each, NOTES G19).
                        for hi in range(2):
                            qm = m0 + 16 * mq + g + 8 * hi
                            if qm < qlim:  # past it dS is 0 (JAG)
                                r = (rbase + qm) * D + 16 * jp + 2 * t
                                red_add2(dqa, r, dqc[2 * hi] * sc, dqc[2 * hi + 1] * sc)
                                red_add2(dqa, r + 8, dqc[4 + 2 * hi] * sc,
                                         dqc[5 + 2 * hi] * sc)
            if FLUSHING:
                # 3xTF32: every FLUSH q blocks (not after the last: the epilogue adds
                # what is left), dK/dV's mma sums into their float32 totals by RED
                # (round to nearest), and the accumulators restart from zero. The
                # tensor core's accumulation rounds one-sidedly (bench/NOTES.md G13):
                # over the whole q loop (G*Lq queries) that error grows with Lq.
                nq += 1
                if nq % FLUSH == 0 and ngi < G:
                    flush_k(dk, b * dks_b + hk * dks_h, dks_l, dks_d, kr0, klim, t, dka,
                            True)
                    flush_v(dv, b * dvs_b + hk * dvs_h, dvs_l, dvs_d, kr0, klim, t, dva,
                            True)
            gi = ngi
            it = nit
            buf = 1 - buf

        # Epilogue through shared memory: each lane writes its dK (times scale) and dV
        # registers as packed pairs (rounded to nearest even, as the storers do) into
        # the K and V tiles, then the CTA copies the rows out with consecutive threads
        # on consecutive elements (any output strides). Small register-indexing loop
        # bodies, so dka/dva stay in registers. Register pair idx, idx+1: key row
        # 16w + g + 8*((idx >> 1) & 1), dims 8*(idx >> 2) + 2t, +1.
        if FLUSHING:
            if nq > FLUSH:
                # Flushed at least once (the first flush is after q block FLUSH when
                # another follows): the rest into the totals, then the totals back into
                # the accumulators for the copy-out below (dK scaled there, once),
                # before the barrier after which the copy-out overwrites the slots.
                dkb = b * dks_b + hk * dks_h
                dvb = b * dvs_b + hk * dvs_h
                flush_k(dk, dkb, dks_l, dks_d, kr0, klim, t, dka, False)
                flush_v(dv, dvb, dvs_l, dvs_d, kr0, klim, t, dva, False)
                total_k(dk, dkb, dks_l, dks_d, kr0, klim, t, dka)
                total_v(dv, dvb, dvs_l, dvs_d, kr0, klim, t, dva)
        cuda.syncthreads()  # every warp is done reading K (dQ of the last q block)
        if TF32:
            # One word per register: key row 16w + g + 8*((idx >> 1) & 1), n-tile
            # j = idx >> 2, column n = 2t + (idx & 1): dim 32(j >> 2) + 4n + (j & 3).
            for idx in range(NK):
                j = idx >> 2
                sm[OKW + (g + 8 * ((idx >> 1) & 1)) * LDK + 32 * (j >> 2) + 8 * t
                   + 4 * (idx & 1) + (j & 3)] = dka[idx] * sc
            for idx in range(NV):
                j = idx >> 2
                sm[OVW + (g + 8 * ((idx >> 1) & 1)) * LDV + 32 * (j >> 2) + 8 * t
                   + 4 * (idx & 1) + (j & 3)] = dva[idx]
        else:
            for idx in range(0, NK, 2):
                smi[(OKW + (g + 8 * ((idx >> 1) & 1)) * LDK + 8 * (idx >> 2) + 2 * t) >> 1] = \
                    pack(dka[idx] * sc, dka[idx + 1] * sc)
            for idx in range(0, NV, 2):
                smi[(OVW + (g + 8 * ((idx >> 1) & 1)) * LDV + 8 * (idx >> 2) + 2 * t) >> 1] = \
                    pack(dva[idx], dva[idx + 1])
        cuda.syncthreads()
        # Rows below klim only: past it is the next sequence's tile (JAG; else Lk).
        store_k(dk, b * dks_b + hk * dks_h, dks_l, dks_d, sm, OK, n0, klim, tid)
        store_v(dv, b * dvs_b + hk * dvs_h, dvs_l, dvs_d, sm, OV, n0, klim, tid)

    return dkdv
