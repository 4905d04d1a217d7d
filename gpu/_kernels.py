"""Numba CUDA kernels: tiled online-softmax attention forward and backward (FA-2), SIMT.

Every kernel is built by a factory for one specialisation (element kind, head dims,
tiling, causal, mask), so tile shapes, shared-memory offsets and the branches on causal
and mask are compile-time constants; the factories are lru-cached (compile once per
process) and the kernels are cached on disk by Numba (``cache=True``).

Register micro-tiles
--------------------
A CTA is a TY x TX grid of threads. Each tile product ``C[a, b] = sum_k A[a, k] B[k, b]``
gives thread (ty, tx) an RA x RB micro-tile of C held in registers: rows
``a_i = ty + TY*i`` and columns ``b_j = tx + TX*j`` (strided, so the lanes of a warp read
consecutive or odd-strided shared addresses: no bank conflicts). Per step of k a thread
loads RA + RB values from shared memory for RA*RB fused multiply-adds; with 8x8 or 8x4
micro-tiles the FMA units, not shared-memory bandwidth, set the pace. All shared tiles
are row-major with an odd leading dimension (width rounded up to TX, plus 1), so both
"along a row" and "down a column" reads are conflict-free. The products:

* forward: S = Q K^T (rows: queries, cols: keys), then O += P V (cols: head dim);
* dK/dV: S^T = K Q^T and dP^T = V dO^T (rows: keys, cols: queries), then dV += P^T dO,
  dK += dS^T Q;
* dQ: S = Q K^T and dP = dO V^T, then dQ += dS K.

``_mm_nt`` and ``_mm_nn`` are the only inner products: a tensor-core path replaces these
two device functions with mma fragments.

Softmax statistics: each row of S is spread over the TX threads of a row group; the
row max is combined through a small shared array (no warp shuffles, so the simulator
runs the same code), the row sum stays per thread until the end.

Work decomposition: forward and dQ give one CTA per (q block, batch*head) and walk the
q block's kv-block list (full blocks first, then partial ones: only partial blocks
evaluate the causal rule and read attn_mask, so block masks and jagged offsets are
other lists). dK/dV gives one CTA per (kv block, batch*kv head) and walks the
transposed lists for every query head of its group (GQA without a reduction). No
atomics: the backward is deterministic. Shared memory is dynamic (one flat float32
array per CTA, carved at compile-time offsets) because the tiles exceed the 48 KiB a
CTA gets statically; the launcher raises the per-kernel limit.

Tensors arrive as flat 1-D arrays plus element strides (any layout, broadcast strides 0
included); bfloat16 arrives as int16 bits and is converted here. Every shared-memory
index goes through ``U`` (unsigned): Numba wraps negative signed indices with a
compare-and-select per load, which unsigned indices skip.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ._cuda import (SIM, cuda, fast_exp, float32, float_as_int, int32, int_as_float, ld4,
                    uint64)

# float32 constants: a Python float is float64 in Numba, and comparing or mixing it with
# float32 values puts double-precision conversions into the inner loops.
NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)
U = uint64
# ATTN_GPU_LINEINFO=1 (python -m attn.profile --lineinfo) compiles the kernels with
# source line info for Nsight Compute's source view. Numba's disk-cache key does not
# include the option, so those builds bypass the cache (in both directions).
LINEINFO = os.environ.get("ATTN_GPU_LINEINFO", "0").strip() == "1" and not SIM
_JIT = dict(cache=not SIM and not LINEINFO, **({"lineinfo": True} if LINEINFO else {}))


@dataclass(frozen=True)
class Tiling:
    """A CTA of TY x TX threads; each thread holds RM rows by RN columns of the score
    tile, so the fixed block has TY*RM rows and the streamed block TX*RN."""

    TX: int
    TY: int
    RM: int
    RN: int
    V: int = 1  # 4: each thread's rows/columns come in runs of 4 read by 128-bit loads

    @property
    def rows(self) -> int:
        return self.TY * self.RM

    @property
    def cols(self) -> int:
        return self.TX * self.RN

    @property
    def threads(self) -> int:
        return self.TX * self.TY

    def width(self, W: int) -> int:
        """Columns of a W-wide output per thread (the head dim split over TX)."""
        return -(-W // (self.TX * self.V)) * self.V

    def ld(self, W: int) -> int:
        """Leading dimension of a shared tile of width W: rounded up to TX (so the
        micro-tile columns stay inside the row) plus one (odd: conflict-free)."""
        return self.width(W) * self.TX + 1


# ------------------------------------------------------------------ element access --
def _loader(kind: str):
    if kind == "bf16":
        @cuda.jit(device=True, inline=True)
        def ld(a, i):
            # bfloat16 is the top half of a float32: shift the 16 bits into place.
            return int_as_float((int32(a[i]) & 0xFFFF) << 16)
    else:
        @cuda.jit(device=True, inline=True)
        def ld(a, i):
            return float32(a[i])
    return ld


def _storer(kind: str):
    if kind == "bf16":
        @cuda.jit(device=True, inline=True)
        def st(a, i, x):
            # Round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate.
            b = float_as_int(x)
            b = b + 0x7FFF + ((b >> 16) & 1)
            a[i] = b >> 16
    else:
        @cuda.jit(device=True, inline=True)
        def st(a, i, x):
            a[i] = x
    return st


@lru_cache(maxsize=None)
def _stager(kind: str, ROWS: int, W: int, LD: int, NT: int, WP: int = 0):
    """Device function copying rows r0..r0+ROWS of one (batch, head) slice, W columns,
    times ``mul``, into the shared tile at ``off`` (row-major, leading dimension LD);
    rows at or past L and the padding columns W..LD-2 are zero-filled. NT threads
    stride over the elements, consecutive threads on consecutive columns (coalesced
    global reads, conflict-free shared writes)."""
    ld = _loader(kind)
    WP = WP or LD - 1

    # Thread tid starts at element tid of the row-major (ROWS, WP) tile and strides by
    # NT: its (row, column) advance by constant steps, so no division in the loop.
    RS = NT // WP
    DS = NT - RS * WP

    @cuda.jit(device=True, inline=True)
    def stage(sm, off, a, base, r0, s_l, s_d, L, mul, tid):
        r = tid // WP
        d = tid - r * WP
        while r < ROWS:
            rr = r0 + r
            x = ZERO
            if rr < L and d < W:
                x = ld(a, base + rr * s_l + d * s_d) * mul
            sm[U(off + r * LD + d)] = x
            r += RS
            d += DS
            if d >= WP:
                d -= WP
                r += 1

    return stage


def _mm(RA: int, RB: int, K: int, SA: int, SB: int, KA: int, KB: int):
    """acc[i, j] += sum_k A(i, k) * B(j, k) over one shared-memory tile, where thread's
    operands sit at ``pa + i*SA + k*KA`` and ``pb + j*SB + k*KB`` (compile-time strides).

    Software-pipelined by hand: the loads for step k+1 are issued before the FMAs of
    step k, two register sets alternating (a 2x unrolled loop, so no register copies),
    which hides shared-memory latency with few warps per SM."""

    @cuda.jit(device=True, inline=True)
    def mm(acc, sm, pa, pb):
        a0 = cuda.local.array(RA, float32)
        b0 = cuda.local.array(RB, float32)
        a1 = cuda.local.array(RA, float32)
        b1 = cuda.local.array(RB, float32)
        for i in range(RA):
            a0[i] = sm[U(pa + i * SA)]
        for j in range(RB):
            b0[j] = sm[U(pb + j * SB)]
        for k2 in range(K // 2):
            k = 2 * k2 + 1
            for i in range(RA):
                a1[i] = sm[U(pa + i * SA + k * KA)]
            for j in range(RB):
                b1[j] = sm[U(pb + j * SB + k * KB)]
            for i in range(RA):
                for j in range(RB):
                    acc[i, j] += a0[i] * b0[j]
            if k + 1 < K:
                for i in range(RA):
                    a0[i] = sm[U(pa + i * SA + (k + 1) * KA)]
                for j in range(RB):
                    b0[j] = sm[U(pb + j * SB + (k + 1) * KB)]
            for i in range(RA):
                for j in range(RB):
                    acc[i, j] += a1[i] * b1[j]
        if K % 2 == 1:
            for i in range(RA):
                for j in range(RB):
                    acc[i, j] += a0[i] * b0[j]

    return mm


@lru_cache(maxsize=None)
def _mm_nt(RA: int, RB: int, TA: int, TB: int, K: int, LDA: int, LDB: int):
    """acc[i, j] += sum_k A[a_i, k] * B[b_j, k]: both operands row-major in shared
    memory (A at a0 with leading dimension LDA, B at b0 with LDB), a_i = ta + TA*i,
    b_j = tb + TB*j."""
    inner = _mm(RA, RB, K, TA * LDA, TB * LDB, 1, 1)

    @cuda.jit(device=True, inline=True)
    def mm(acc, sm, a0, ta, b0, tb):
        inner(acc, sm, a0 + ta * LDA, b0 + tb * LDB)

    return mm


@lru_cache(maxsize=None)
def _mm_nn(RA: int, RB: int, TA: int, TB: int, K: int, LDA: int, LDB: int):
    """acc[i, j] += sum_k A[a_i, k] * B[k, b_j]: A row-major at a0 (LDA), B row-major at
    b0 (LDB) read along its rows, a_i = ta + TA*i, b_j = tb + TB*j."""
    inner = _mm(RA, RB, K, TA * LDA, TB, 1, LDB)

    @cuda.jit(device=True, inline=True)
    def mm(acc, sm, a0, ta, b0, tb):
        inner(acc, sm, a0 + ta * LDA, b0 + tb)

    return mm


@lru_cache(maxsize=None)
def _zero(R: int, C: int):
    @cuda.jit(device=True, inline=True)
    def zero(a):
        for i in range(R):
            for j in range(C):
                a[i, j] = ZERO

    return zero


@cuda.jit(device=True, inline=True)
def _no_mask(b, h, q, kv, x0, x1, x2, x3):
    return True


@cuda.jit(device=True, inline=True)
def _no_score(s, b, h, q, kv, x0, x1, x2, x3):
    return s, ONE


def _hooks(mods):
    """(mask_fn, score_fn, MASKMOD, SCORE) for a kernel factory: the FlexAttention
    mods as device functions taking the four buffer arguments x0..x3, or stand-ins
    that the compile-time flags keep out of the code. ``mods`` is gpu.GpuMods (hashable
    by its generated source) or None."""
    if mods is None:
        return _no_mask, _no_score, False, False
    return (mods.mask or _no_mask, mods.score or _no_score, mods.mask is not None,
            mods.score is not None)


@cuda.jit(device=True, inline=True)
def _block_at(it, nf, row, ncols, full_idx, part_idx):
    """The it-th block of a row's list: its nf full blocks first, then the partial ones."""
    if it >= nf:
        return part_idx[row * ncols + it - nf]
    return full_idx[row * ncols + it]


def shared_floats(kernel: str, t: Tiling, D: int, Dv: int) -> int:
    """float32 words of dynamic shared memory a kernel's CTA needs."""
    return _layout(kernel, t, D, Dv)["total"]


def _layout(kernel: str, t: Tiling, D: int, Dv: int) -> dict:
    """Offsets (in float32 words) of the shared tiles of each kernel."""
    if kernel == "fwd" and t.V == 4:
        return _layout_fwd4(t, D, Dv)
    LDQ, LDV = t.ld(D), t.ld(Dv)
    R, C = t.rows, t.cols
    lay = {}
    if kernel == "fwd":
        # Q (R rows) stays; K (C rows) is dead once S is formed, so P (R x C) reuses it.
        lay["q"] = 0
        lay["k"] = lay["p"] = R * LDQ
        lay["v"] = lay["k"] + max(C * LDQ, R * (C + 1))
        lay["red"] = lay["v"] + C * LDV
        lay["total"] = lay["red"] + R * t.TX
    elif kernel == "dkdv":
        # K, V (R key rows) stay; Q, dO (C query rows) stream with their lse and delta.
        lay["k"] = 0
        lay["v"] = R * LDQ
        lay["q"] = lay["v"] + R * LDV
        lay["do"] = lay["q"] + C * LDQ
        lay["p"] = lay["do"] + C * LDV
        lay["ds"] = lay["p"] + R * (C + 1)
        lay["l"] = lay["ds"] + R * (C + 1)
        lay["d"] = lay["l"] + C
        lay["total"] = lay["d"] + C
    else:  # dq
        # Q, dO (R query rows) stay; K, V (C key rows) stream.
        lay["q"] = 0
        lay["do"] = R * LDQ
        lay["k"] = lay["do"] + R * LDV
        lay["v"] = lay["k"] + C * LDQ
        lay["ds"] = lay["v"] + C * LDV
        lay["total"] = lay["ds"] + R * (C + 1)
    return lay


# ------------------------------------------------------------------------ forward --
@lru_cache(maxsize=None)
def forward_kernel(kind: str, D: int, Dv: int, t: Tiling, CAUSAL: bool, MASK: bool,
                   mods=None):
    if t.V == 4:
        return _forward_kernel_v4(kind, D, Dv, t, CAUSAL, MASK, mods)
    mask_fn, score_fn, MASKMOD, SCORE = _hooks(mods)
    st = _storer(kind)
    TX, TY, RM, RN = t.TX, t.TY, t.RM, t.RN
    BM, BN, NT = t.rows, t.cols, t.threads
    RD = t.width(Dv)
    LDQ, LDV, LDP = t.ld(D), t.ld(Dv), BN + 1
    lay = _layout("fwd", t, D, Dv)
    OQ, OK, OP, OV, OR = lay["q"], lay["k"], lay["p"], lay["v"], lay["red"]
    stage_q = _stager(kind, BM, D, LDQ, NT)
    stage_k = _stager(kind, BN, D, LDQ, NT)
    stage_v = _stager(kind, BN, Dv, LDV, NT)
    qk = _mm_nt(RM, RN, TY, TX, D, LDQ, LDQ)
    pv = _mm_nn(RM, RD, TY, TX, BN, LDP, LDV)
    zero_s = _zero(RM, RN)
    zero_o = _zero(RM, RD)

    @cuda.jit(**_JIT)
    def fwd(q, k, v, o, lse, mask,
            qs_b, qs_h, qs_l, qs_d, ks_b, ks_h, ks_l, ks_d,
            vs_b, vs_h, vs_l, vs_d, os_b, os_h, os_l, os_d,
            ms_b, ms_h, ms_q, ms_k,
            Hq, G, Lq, Lk, scale,
            kvf_num, kvf_idx, kvp_num, kvp_idx, ncols, lb, lh, x0, x1, x2, x3):
        qb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // Hq
        h = bh - b * Hq
        hk = h // G
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        m0 = qb * BM

        sm = cuda.shared.array(0, float32)
        s = cuda.local.array((RM, RN), float32)
        acc = cuda.local.array((RM, RD), float32)
        m_i = cuda.local.array(RM, float32)
        l_i = cuda.local.array(RM, float32)

        # The softmax scale is folded into Q once: S = (scale*Q) K^T.
        stage_q(sm, OQ, q, b * qs_b + h * qs_h, m0, qs_l, qs_d, Lq, float32(scale), tid)
        zero_o(acc)
        for i in range(RM):
            m_i[i] = NEG_INF
            l_i[i] = ZERO
        kbase = b * ks_b + hk * ks_h
        vbase = b * vs_b + hk * vs_h
        mbase = b * ms_b + h * ms_h

        # The block lists may differ per batch and head (block masks): lb, lh are their
        # row strides, 0 where a dimension broadcasts.
        lr = b * lb + h * lh + qb
        nf = kvf_num[lr]
        nt = nf + kvp_num[lr]
        for it in range(nt):
            partial = it >= nf
            n0 = _block_at(it, nf, lr, ncols, kvf_idx, kvp_idx) * BN
            # Barrier: every thread is done with the previous K/P and V tiles.
            cuda.syncthreads()
            stage_k(sm, OK, k, kbase, n0, ks_l, ks_d, Lk, ONE, tid)
            stage_v(sm, OV, v, vbase, n0, vs_l, vs_d, Lk, ONE, tid)
            cuda.syncthreads()

            zero_s(s)
            qk(s, sm, OQ, ty, OK, tx)
            for i in range(RM):
                row = m0 + ty + TY * i
                mx = NEG_INF
                for j in range(RN):
                    col = n0 + tx + TX * j
                    x = s[i, j]
                    ok = col < Lk
                    if SCORE:
                        if ok and row < Lq:
                            x = float32(score_fn(x, b, h, row, col, x0, x1, x2, x3)[0])
                    if partial:
                        if CAUSAL:
                            ok = ok and col <= row
                        if MASK:
                            if ok and row < Lq:
                                x += mask[mbase + row * ms_q + col * ms_k]
                        if MASKMOD:
                            if ok and row < Lq:
                                ok = mask_fn(b, h, row, col, x0, x1, x2, x3)
                    if not ok:
                        x = NEG_INF
                    s[i, j] = x
                    mx = max(mx, x)
                sm[U(OR + (ty + TY * i) * TX + tx)] = mx
            # Barrier: the row-group maxima are published (and K is no longer read,
            # so P may overwrite it).
            cuda.syncthreads()
            for i in range(RM):
                r = ty + TY * i
                mx = m_i[i]
                for u in range(TX):
                    mx = max(mx, sm[U(OR + r * TX + u)])
                # A row that has seen only masked keys keeps m = -inf: P = 0 and no
                # rescale (exp(-inf - -inf) would be NaN).
                alpha = ONE
                if mx > NEG_INF:
                    alpha = fast_exp(m_i[i] - mx)
                m_i[i] = mx
                ls = ZERO
                for j in range(RN):
                    p = ZERO
                    if mx > NEG_INF:
                        p = fast_exp(s[i, j] - mx)
                    ls += p
                    sm[U(OP + r * LDP + tx + TX * j)] = p
                l_i[i] = l_i[i] * alpha + ls
                for j in range(RD):
                    acc[i, j] *= alpha
            # Barrier: P is complete.
            cuda.syncthreads()
            pv(acc, sm, OP, ty, OV, tx)

        # Each thread holds part of each row's sum: combine them through shared memory.
        cuda.syncthreads()
        for i in range(RM):
            sm[U(OR + (ty + TY * i) * TX + tx)] = l_i[i]
        cuda.syncthreads()
        for i in range(RM):
            r = ty + TY * i
            row = m0 + r
            if row < Lq:
                lsum = ZERO
                for u in range(TX):
                    lsum += sm[U(OR + r * TX + u)]
                obase = b * os_b + h * os_h + row * os_l
                inv = ZERO
                if lsum > ZERO:
                    inv = ONE / lsum
                for j in range(RD):
                    d = tx + TX * j
                    if d < Dv:
                        st(o, obase + d * os_d, acc[i, j] * inv)
                if tx == 0:
                    lv = NEG_INF
                    if lsum > ZERO:
                        lv = m_i[i] + math.log(lsum)
                    lse[bh * Lq + row] = lv

    return fwd


# ------------------------------------------------------- forward, 128-bit loads --
@lru_cache(maxsize=None)
def _stager_t(kind: str, ROWS: int, W: int, LD: int, NT: int):
    """Like _stager, but stores the tile transposed (column d of the source at shared row
    d, leading dimension LD), so a thread's run of 4 rows is 4 consecutive words. Lanes
    take 8 consecutive columns of 4 rows (coalesced 32-byte global reads; with LD a
    multiple of 4 but not of 32 the 32 shared writes land in 32 banks)."""
    ld = _loader(kind)
    W8 = -(-W // 8) * 8
    NE = ROWS * W8

    @cuda.jit(device=True, inline=True)
    def stage(sm, off, a, base, r0, s_l, s_d, L, mul, tid):
        for e in range(tid, NE, NT):
            dl = e % 8
            rest = e // 8
            r = rest % ROWS
            d = (rest // ROWS) * 8 + dl
            if d < W:
                rr = r0 + r
                x = ZERO
                if rr < L:
                    x = ld(a, base + rr * s_l + d * s_d) * mul
                sm[U(off + d * LD + r)] = x

    return stage


@lru_cache(maxsize=None)
def _runs4(G: int, S: int):
    """buf[4g..4g+3] = sm[p + g*S .. +3] for g < G: G 128-bit loads."""

    @cuda.jit(device=True, inline=True)
    def load(buf, sm, p):
        for g in range(G):
            x0, x1, x2, x3 = ld4(sm, U(p + g * S))
            buf[4 * g] = x0
            buf[4 * g + 1] = x1
            buf[4 * g + 2] = x2
            buf[4 * g + 3] = x3

    return load


@lru_cache(maxsize=None)
def _mm4(GA: int, GB: int, K: int, LA: int, LB: int, SA: int, SB: int):
    """acc[i, j] += sum_k A(i, k) B(j, k) with both operands k-major in shared memory:
    the thread's rows are runs of 4 at pa + k*LA + g*SA (g < GA) and its columns runs of
    4 at pb + k*LB + g*SB (g < GB), each run one 128-bit load. Pipelined like _mm."""
    RA, RB = 4 * GA, 4 * GB
    load_a = _runs4(GA, SA)
    load_b = _runs4(GB, SB)

    @cuda.jit(device=True, inline=True)
    def mm(acc, sm, pa, pb):
        a0 = cuda.local.array(RA, float32)
        b0 = cuda.local.array(RB, float32)
        a1 = cuda.local.array(RA, float32)
        b1 = cuda.local.array(RB, float32)
        load_a(a0, sm, pa)
        load_b(b0, sm, pb)
        for k2 in range(K // 2):
            k = 2 * k2 + 1
            load_a(a1, sm, pa + k * LA)
            load_b(b1, sm, pb + k * LB)
            for i in range(RA):
                for j in range(RB):
                    acc[i, j] += a0[i] * b0[j]
            if k + 1 < K:
                load_a(a0, sm, pa + (k + 1) * LA)
                load_b(b0, sm, pb + (k + 1) * LB)
            for i in range(RA):
                for j in range(RB):
                    acc[i, j] += a1[i] * b1[j]
        if K % 2 == 1:
            for i in range(RA):
                for j in range(RB):
                    acc[i, j] += a0[i] * b0[j]

    return mm


def _layout_fwd4(t: Tiling, D: int, Dv: int) -> dict:
    BM, BN = t.rows, t.cols
    LQ, LK, LV = BM + 4, BN + 4, t.TX * t.width(Dv) + 4
    lay = {"LQ": LQ, "LK": LK, "LV": LV, "q": 0}
    lay["k"] = lay["p"] = D * LQ
    lay["v"] = lay["k"] + max(D * LK, BN * LQ)
    lay["red"] = lay["v"] + BN * LV
    lay["total"] = lay["red"] + BM * t.TX
    return lay


@lru_cache(maxsize=None)
def _forward_kernel_v4(kind: str, D: int, Dv: int, t: Tiling, CAUSAL: bool, MASK: bool,
                       mods=None):
    mask_fn, score_fn, MASKMOD, SCORE = _hooks(mods)
    """The forward with 128-bit shared loads: Q, K and P are kept transposed (k-major)
    so every operand run is 4 consecutive words; a thread's rows are
    r(i) = (i//4)*4*TY + 4*ty + i%4 and its columns c(j) = (j//4)*4*TX + 4*tx + j%4."""
    st = _storer(kind)
    TX, TY, RM, RN = t.TX, t.TY, t.RM, t.RN
    BM, BN, NT = t.rows, t.cols, t.threads
    RD = t.width(Dv)
    lay = _layout_fwd4(t, D, Dv)
    LQ, LK, LV = lay["LQ"], lay["LK"], lay["LV"]
    OQ, OK, OP, OV, OR = lay["q"], lay["k"], lay["p"], lay["v"], lay["red"]
    SY, SX = 4 * TY, 4 * TX
    stage_q = _stager_t(kind, BM, D, LQ, NT)
    stage_k = _stager_t(kind, BN, D, LK, NT)
    stage_v = _stager(kind, BN, Dv, LV, NT, TX * RD)
    qk = _mm4(RM // 4, RN // 4, D, LQ, LK, SY, SX)
    pv = _mm4(RM // 4, RD // 4, BN, LQ, LV, SY, SX)
    zero_s = _zero(RM, RN)
    zero_o = _zero(RM, RD)

    @cuda.jit(**_JIT)
    def fwd(q, k, v, o, lse, mask,
            qs_b, qs_h, qs_l, qs_d, ks_b, ks_h, ks_l, ks_d,
            vs_b, vs_h, vs_l, vs_d, os_b, os_h, os_l, os_d,
            ms_b, ms_h, ms_q, ms_k,
            Hq, G, Lq, Lk, scale,
            kvf_num, kvf_idx, kvp_num, kvp_idx, ncols, lb, lh, x0, x1, x2, x3):
        qb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // Hq
        h = bh - b * Hq
        hk = h // G
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        m0 = qb * BM

        sm = cuda.shared.array(0, float32)
        s = cuda.local.array((RM, RN), float32)
        acc = cuda.local.array((RM, RD), float32)
        m_i = cuda.local.array(RM, float32)
        l_i = cuda.local.array(RM, float32)

        stage_q(sm, OQ, q, b * qs_b + h * qs_h, m0, qs_l, qs_d, Lq, float32(scale), tid)
        zero_o(acc)
        for i in range(RM):
            m_i[i] = NEG_INF
            l_i[i] = ZERO
        kbase = b * ks_b + hk * ks_h
        vbase = b * vs_b + hk * vs_h
        mbase = b * ms_b + h * ms_h

        # The block lists may differ per batch and head (block masks): lb, lh are their
        # row strides, 0 where a dimension broadcasts.
        lr = b * lb + h * lh + qb
        nf = kvf_num[lr]
        nt = nf + kvp_num[lr]
        for it in range(nt):
            partial = it >= nf
            n0 = _block_at(it, nf, lr, ncols, kvf_idx, kvp_idx) * BN
            cuda.syncthreads()
            stage_k(sm, OK, k, kbase, n0, ks_l, ks_d, Lk, ONE, tid)
            stage_v(sm, OV, v, vbase, n0, vs_l, vs_d, Lk, ONE, tid)
            cuda.syncthreads()

            zero_s(s)
            qk(s, sm, OQ + 4 * ty, OK + 4 * tx)
            for i in range(RM):
                r = (i // 4) * SY + 4 * ty + i % 4
                row = m0 + r
                mx = NEG_INF
                for j in range(RN):
                    col = n0 + (j // 4) * SX + 4 * tx + j % 4
                    x = s[i, j]
                    ok = col < Lk
                    if SCORE:
                        if ok and row < Lq:
                            x = float32(score_fn(x, b, h, row, col, x0, x1, x2, x3)[0])
                    if partial:
                        if CAUSAL:
                            ok = ok and col <= row
                        if MASK:
                            if ok and row < Lq:
                                x += mask[mbase + row * ms_q + col * ms_k]
                        if MASKMOD:
                            if ok and row < Lq:
                                ok = mask_fn(b, h, row, col, x0, x1, x2, x3)
                    if not ok:
                        x = NEG_INF
                    s[i, j] = x
                    mx = max(mx, x)
                sm[U(OR + r * TX + tx)] = mx
            cuda.syncthreads()
            for i in range(RM):
                r = (i // 4) * SY + 4 * ty + i % 4
                mx = m_i[i]
                for u in range(TX):
                    mx = max(mx, sm[U(OR + r * TX + u)])
                alpha = ONE
                if mx > NEG_INF:
                    alpha = fast_exp(m_i[i] - mx)
                m_i[i] = mx
                ls = ZERO
                for j in range(RN):
                    c = (j // 4) * SX + 4 * tx + j % 4
                    p = ZERO
                    if mx > NEG_INF:
                        p = fast_exp(s[i, j] - mx)
                    ls += p
                    sm[U(OP + c * LQ + r)] = p
                l_i[i] = l_i[i] * alpha + ls
                for j in range(RD):
                    acc[i, j] *= alpha
            cuda.syncthreads()
            pv(acc, sm, OP + 4 * ty, OV + 4 * tx)

        cuda.syncthreads()
        for i in range(RM):
            r = (i // 4) * SY + 4 * ty + i % 4
            sm[U(OR + r * TX + tx)] = l_i[i]
        cuda.syncthreads()
        for i in range(RM):
            r = (i // 4) * SY + 4 * ty + i % 4
            row = m0 + r
            if row < Lq:
                lsum = ZERO
                for u in range(TX):
                    lsum += sm[U(OR + r * TX + u)]
                obase = b * os_b + h * os_h + row * os_l
                inv = ZERO
                if lsum > ZERO:
                    inv = ONE / lsum
                for j in range(RD):
                    d = (j // 4) * SX + 4 * tx + j % 4
                    if d < Dv:
                        st(o, obase + d * os_d, acc[i, j] * inv)
                if tx == 0:
                    lv = NEG_INF
                    if lsum > ZERO:
                        lv = m_i[i] + math.log(lsum)
                    lse[bh * Lq + row] = lv

    return fwd


# ----------------------------------------------------------------------- backward --
@lru_cache(maxsize=None)
def dkdv_kernel(kind: str, D: int, Dv: int, t: Tiling, CAUSAL: bool, MASK: bool, mods=None,
                ATOMIC_DQ: bool = False):
    """One CTA per (kv block of t.rows keys, batch * kv head); loops over the query
    heads of the kv group and the q blocks (t.cols queries) that see this kv block.
    dV = sum_i P_ij dO_i, dK = scale * sum_i dS_ij q_i, dS = P * (dO.v - delta).

    ATOMIC_DQ: also dQ_i += scale * sum_j dS_ij k_j for the block pair, added into the
    float32 (B, Hq, Lq, D) accumulator ``dqa`` with atomics. dS is already in shared
    memory, so this costs one tile product where the separate dQ kernel recomputes S
    and dP (three): the backward does 5 tile products per block pair instead of 7. The
    order of the atomic additions varies between runs, so dQ is not bitwise
    reproducible; the launcher takes this path only when PyTorch's deterministic mode
    is off, as PyTorch does for its flash backward."""
    mask_fn, score_fn, MASKMOD, SCORE = _hooks(mods)
    st = _storer(kind)
    TX, TY, RM, RN = t.TX, t.TY, t.RM, t.RN
    BN, BM, NT = t.rows, t.cols, t.threads
    RDK, RDV = t.width(D), t.width(Dv)
    LDQ, LDV, LDP = t.ld(D), t.ld(Dv), BM + 1
    lay = _layout("dkdv", t, D, Dv)
    OK, OV, OQ, OO, OP, OS, OL, OD = (lay[n] for n in ("k", "v", "q", "do", "p", "ds",
                                                        "l", "d"))
    stage_k = _stager(kind, BN, D, LDQ, NT)
    stage_v = _stager(kind, BN, Dv, LDV, NT)
    stage_q = _stager(kind, BM, D, LDQ, NT)
    stage_o = _stager(kind, BM, Dv, LDV, NT)
    kq = _mm_nt(RM, RN, TY, TX, D, LDQ, LDQ)
    vo = _mm_nt(RM, RN, TY, TX, Dv, LDV, LDV)
    pdo = _mm_nn(RM, RDV, TY, TX, BM, LDP, LDV)
    dsq = _mm_nn(RM, RDK, TY, TX, BM, LDP, LDQ)
    # dQ tile (BM queries x D): thread (ty, tx) holds queries ty + TY*i and columns
    # tx + TX*j; A = dS^T read down its columns (k = key row), B = the K tile.
    if ATOMIC_DQ and BM % TY:
        raise ValueError(f"ATOMIC_DQ needs t.cols ({BM}) to be a multiple of TY ({TY})")
    RQ = max(BM // TY, 1)
    dsk = _mm(RQ, RDK, BN, TY, TX, LDP, LDQ)
    zero_s = _zero(RM, RN)
    zero_k = _zero(RM, RDK)
    zero_v = _zero(RM, RDV)
    zero_q = _zero(RQ, RDK)

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
        ty = tid // TX
        tx = tid - ty * TX
        n0 = kb * BN

        sm = cuda.shared.array(0, float32)
        s = cuda.local.array((RM, RN), float32)
        dp = cuda.local.array((RM, RN), float32)
        dka = cuda.local.array((RM, RDK), float32)
        dva = cuda.local.array((RM, RDV), float32)
        dqt = cuda.local.array((RQ, RDK), float32)

        # K carries the softmax scale: S^T = (scale*K) Q^T; dK is rescaled at the end.
        stage_k(sm, OK, k, b * ks_b + hk * ks_h, n0, ks_l, ks_d, Lk, float32(scale), tid)
        stage_v(sm, OV, v, b * vs_b + hk * vs_h, n0, vs_l, vs_d, Lk, ONE, tid)
        zero_k(dka)
        zero_v(dva)

        for g in range(G):
            h = hk * G + g
            lr = b * lb + h * lh + kb
            nf = qf_num[lr]
            nt = nf + qp_num[lr]
            qbase = b * qs_b + h * qs_h
            gbase = b * gs_b + h * gs_h
            mbase = b * ms_b + h * ms_h
            rbase = (b * Hq + h) * Lq
            for it in range(nt):
                partial = it >= nf
                m0 = _block_at(it, nf, lr, ncols, qf_idx, qp_idx) * BM
                cuda.syncthreads()  # previous Q, dO, P, dS fully read
                stage_q(sm, OQ, q, qbase, m0, qs_l, qs_d, Lq, ONE, tid)
                stage_o(sm, OO, do, gbase, m0, gs_l, gs_d, Lq, ONE, tid)
                for e in range(tid, BM, NT):
                    qm = m0 + e
                    lv = POS_INF
                    dl = ZERO
                    if qm < Lq:
                        lv = lse[rbase + qm]
                        # A fully masked row has lse = -inf and P = 0 everywhere: +inf
                        # makes exp(s - lse) = 0 instead of NaN.
                        if not lv > NEG_INF:
                            lv = POS_INF
                        dl = delta[rbase + qm]
                    sm[U(OL + e)] = lv
                    sm[U(OD + e)] = dl
                cuda.syncthreads()  # tiles complete

                zero_s(s)
                kq(s, sm, OK, ty, OQ, tx)
                zero_s(dp)
                vo(dp, sm, OV, ty, OO, tx)
                for i in range(RM):
                    r = ty + TY * i
                    kn = n0 + r
                    for j in range(RN):
                        c = tx + TX * j
                        qm = m0 + c
                        x = s[i, j]
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
                                    x += mask[mbase + qm * ms_q + kn * ms_k]
                            if MASKMOD:
                                if ok and qm < Lq:
                                    ok = mask_fn(b, h, qm, kn, x0, x1, x2, x3)
                        p = ZERO
                        if ok:
                            p = fast_exp(float32(x) - sm[U(OL + c)])
                        sm[U(OP + r * LDP + c)] = p
                        ds = p * (dp[i, j] - sm[U(OD + c)])
                        if SCORE:
                            # Chain rule through score_mod, only where P > 0: a hidden
                            # element's derivative (maybe inf) never enters.
                            if ds != ZERO:
                                ds = ds * float32(gd)
                        sm[U(OS + r * LDP + c)] = ds
                cuda.syncthreads()  # P and dS complete
                pdo(dva, sm, OP, ty, OO, tx)
                dsq(dka, sm, OS, ty, OQ, tx)
                if ATOMIC_DQ:
                    # K was staged times scale, so dS (scale K) is dQ's share.
                    zero_q(dqt)
                    dsk(dqt, sm, OS + ty, OK + tx)
                    for i in range(RQ):
                        qm = m0 + ty + TY * i
                        if qm < Lq:
                            base = (rbase + qm) * D
                            for j in range(RDK):
                                d = tx + TX * j
                                if d < D:
                                    cuda.atomic.add(dqa, base + d, dqt[i, j])

        for i in range(RM):
            kn = n0 + ty + TY * i
            if kn < Lk:
                base = b * dks_b + hk * dks_h + kn * dks_l
                for j in range(RDK):
                    d = tx + TX * j
                    if d < D:
                        st(dk, base + d * dks_d, dka[i, j] * float32(scale))
                base = b * dvs_b + hk * dvs_h + kn * dvs_l
                for j in range(RDV):
                    d = tx + TX * j
                    if d < Dv:
                        st(dv, base + d * dvs_d, dva[i, j])

    return dkdv


@lru_cache(maxsize=None)
def dq_kernel(kind: str, D: int, Dv: int, t: Tiling, CAUSAL: bool, MASK: bool, mods=None):
    mask_fn, score_fn, MASKMOD, SCORE = _hooks(mods)
    """One CTA per (q block of t.rows queries, batch * head); walks the kv-block lists
    like the forward. dQ = scale * sum_j dS_ij k_j, dS = P * (dO.v_j - delta)."""
    st = _storer(kind)
    TX, TY, RM, RN = t.TX, t.TY, t.RM, t.RN
    BM, BN, NT = t.rows, t.cols, t.threads
    RDK = t.width(D)
    LDQ, LDV, LDS = t.ld(D), t.ld(Dv), BN + 1
    lay = _layout("dq", t, D, Dv)
    OQ, OO, OK, OV, OS = (lay[n] for n in ("q", "do", "k", "v", "ds"))
    stage_q = _stager(kind, BM, D, LDQ, NT)
    stage_o = _stager(kind, BM, Dv, LDV, NT)
    stage_k = _stager(kind, BN, D, LDQ, NT)
    stage_v = _stager(kind, BN, Dv, LDV, NT)
    qk = _mm_nt(RM, RN, TY, TX, D, LDQ, LDQ)
    ov = _mm_nt(RM, RN, TY, TX, Dv, LDV, LDV)
    dsk = _mm_nn(RM, RDK, TY, TX, BN, LDS, LDQ)
    zero_s = _zero(RM, RN)
    zero_q = _zero(RM, RDK)

    @cuda.jit(**_JIT)
    def dq_k(q, k, v, do, lse, delta, mask, dq,
             qs_b, qs_h, qs_l, qs_d, ks_b, ks_h, ks_l, ks_d,
             vs_b, vs_h, vs_l, vs_d, gs_b, gs_h, gs_l, gs_d,
             ms_b, ms_h, ms_q, ms_k,
             dqs_b, dqs_h, dqs_l, dqs_d,
             Hq, G, Lq, Lk, scale,
             kvf_num, kvf_idx, kvp_num, kvp_idx, ncols, lb, lh, x0, x1, x2, x3):
        qb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // Hq
        h = bh - b * Hq
        hk = h // G
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        m0 = qb * BM

        sm = cuda.shared.array(0, float32)
        s = cuda.local.array((RM, RN), float32)
        dp = cuda.local.array((RM, RN), float32)
        dqa = cuda.local.array((RM, RDK), float32)
        lrow = cuda.local.array(RM, float32)
        drow = cuda.local.array(RM, float32)

        stage_q(sm, OQ, q, b * qs_b + h * qs_h, m0, qs_l, qs_d, Lq, float32(scale), tid)
        stage_o(sm, OO, do, b * gs_b + h * gs_h, m0, gs_l, gs_d, Lq, ONE, tid)
        zero_q(dqa)
        for i in range(RM):
            row = m0 + ty + TY * i
            lv = POS_INF
            dl = ZERO
            if row < Lq:
                lv = lse[bh * Lq + row]
                if not lv > NEG_INF:
                    lv = POS_INF
                dl = delta[bh * Lq + row]
            lrow[i] = lv
            drow[i] = dl
        kbase = b * ks_b + hk * ks_h
        vbase = b * vs_b + hk * vs_h
        mbase = b * ms_b + h * ms_h

        # The block lists may differ per batch and head (block masks): lb, lh are their
        # row strides, 0 where a dimension broadcasts.
        lr = b * lb + h * lh + qb
        nf = kvf_num[lr]
        nt = nf + kvp_num[lr]
        for it in range(nt):
            partial = it >= nf
            n0 = _block_at(it, nf, lr, ncols, kvf_idx, kvp_idx) * BN
            cuda.syncthreads()
            stage_k(sm, OK, k, kbase, n0, ks_l, ks_d, Lk, ONE, tid)
            stage_v(sm, OV, v, vbase, n0, vs_l, vs_d, Lk, ONE, tid)
            cuda.syncthreads()
            zero_s(s)
            qk(s, sm, OQ, ty, OK, tx)
            zero_s(dp)
            ov(dp, sm, OO, ty, OV, tx)
            for i in range(RM):
                r = ty + TY * i
                row = m0 + r
                for j in range(RN):
                    c = tx + TX * j
                    kn = n0 + c
                    x = s[i, j]
                    ok = kn < Lk
                    gd = ONE
                    if SCORE:
                        if ok and row < Lq:
                            x, gd = score_fn(x, b, h, row, kn, x0, x1, x2, x3)
                    if partial:
                        if CAUSAL:
                            ok = ok and kn <= row
                        if MASK:
                            if ok and row < Lq:
                                x += mask[mbase + row * ms_q + kn * ms_k]
                        if MASKMOD:
                            if ok and row < Lq:
                                ok = mask_fn(b, h, row, kn, x0, x1, x2, x3)
                    ds = ZERO
                    if ok:
                        ds = fast_exp(float32(x) - lrow[i]) * (dp[i, j] - drow[i])
                        if SCORE:
                            if ds != ZERO:
                                ds = ds * float32(gd)
                    sm[U(OS + r * LDS + c)] = ds
            cuda.syncthreads()  # dS complete
            dsk(dqa, sm, OS, ty, OK, tx)

        for i in range(RM):
            row = m0 + ty + TY * i
            if row < Lq:
                base = b * dqs_b + h * dqs_h + row * dqs_l
                for j in range(RDK):
                    d = tx + TX * j
                    if d < D:
                        st(dq, base + d * dqs_d, dqa[i, j] * float32(scale))

    return dq_k
