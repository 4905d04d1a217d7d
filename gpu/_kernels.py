"""Numba CUDA kernels: tiled online-softmax attention forward and backward (FA-2).

Every kernel is built by a factory for one specialisation (element kind, head dims,
block sizes, causal, mask) so shapes of shared/local arrays and the branches on causal
and mask are compile-time constants; the factories are lru-cached, so each
specialisation compiles once per process.

Work decomposition (SIMT, float32 accumulation):

* forward: one CTA per (q block of BM rows, batch*head), one thread per query row. The
  thread keeps its scaled q row and the output accumulator ``acc`` in registers; the CTA
  stages K and V tiles of BN keys in shared memory, which every thread then reads at the
  same address (a broadcast, no bank conflicts). The kv blocks come from per-q-block
  lists, full blocks first, then partial ones: only partial blocks evaluate the causal
  rule and read attn_mask, so block masks and jagged offsets plug in as other lists.
* backward (split schedule, no atomics, deterministic): ``dkdv`` gives one thread per key
  and walks the transposed (q-block) lists for every query head of its kv group, so GQA
  needs no reduction afterwards; ``dq`` gives one thread per query and walks the kv-block
  lists. Both recompute P from the saved lse. delta = rowsum(dO*O) - dlse is prepared
  by the launcher.

Tensors arrive as flat 1-D arrays plus element strides (any layout, broadcast strides 0
included); bfloat16 arrives as int16 bits and is converted here.

The inner products are plain loops over shared-memory tiles; a tensor-core path
replaces exactly the two loops marked "S = Q K^T" and "acc += P V" (and their backward
counterparts) with mma fragments later.
"""
from __future__ import annotations

import math
from functools import lru_cache

from ._cuda import SIM, cuda, float32, float_as_int, int32, int_as_float

NEG_INF = float("-inf")
POS_INF = float("inf")


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
def _stager(kind: str, ROWS: int, W: int, NT: int):
    """Device function copying rows r0..r0+ROWS of one (batch, head) slice, W columns,
    from global memory into a shared (ROWS, W) float32 tile, NT threads striding over
    the elements; rows at or past L are zero-filled. Every tile a kernel stages (K and
    V in the forward and dQ kernels, Q and dO in dK/dV) goes through it."""
    ld = _loader(kind)

    @cuda.jit(device=True, inline=True)
    def stage(tile, a, base, r0, s_l, s_d, L, tid):
        for e in range(tid, ROWS * W, NT):
            r = e // W
            d = e - r * W
            rr = r0 + r
            tile[r, d] = ld(a, base + rr * s_l + d * s_d) if rr < L else float32(0.0)

    return stage


@cuda.jit(device=True, inline=True)
def _block_at(it, nf, row, ncols, full_idx, part_idx):
    """The it-th block of a row's list: its nf full blocks first, then the partial ones."""
    if it >= nf:
        return part_idx[row * ncols + it - nf]
    return full_idx[row * ncols + it]


# ------------------------------------------------------------------------ forward --
@lru_cache(maxsize=None)
def forward_kernel(kind: str, D: int, Dv: int, BM: int, BN: int, CAUSAL: bool,
                   MASK: bool):
    ld = _loader(kind)
    st = _storer(kind)
    stage_k = _stager(kind, BN, D, BM)
    stage_v = _stager(kind, BN, Dv, BM)

    @cuda.jit(fastmath=True)
    def fwd(q, k, v, o, lse, mask,
            qs_b, qs_h, qs_l, qs_d, ks_b, ks_h, ks_l, ks_d,
            vs_b, vs_h, vs_l, vs_d, os_b, os_h, os_l, os_d,
            ms_b, ms_h, ms_q, ms_k,
            Hq, G, Lq, Lk, scale,
            kvf_num, kvf_idx, kvp_num, kvp_idx, ncols):
        qb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // Hq
        h = bh - b * Hq
        hk = h // G
        tid = cuda.threadIdx.x
        row = qb * BM + tid
        valid = row < Lq

        Ks = cuda.shared.array((BN, D), float32)
        Vs = cuda.shared.array((BN, Dv), float32)
        qr = cuda.local.array(D, float32)
        acc = cuda.local.array(Dv, float32)
        sc = cuda.local.array(BN, float32)

        qbase = b * qs_b + h * qs_h + row * qs_l
        for d in range(D):
            # The softmax scale is folded into q once: S = (scale*q) . k
            qr[d] = ld(q, qbase + d * qs_d) * scale if valid else float32(0.0)
        for d in range(Dv):
            acc[d] = 0.0
        m_i = float32(NEG_INF)
        l_i = float32(0.0)
        kbase = b * ks_b + hk * ks_h
        vbase = b * vs_b + hk * vs_h
        mbase = b * ms_b + h * ms_h + row * ms_q

        nf = kvf_num[qb]
        nt = nf + kvp_num[qb]
        for it in range(nt):
            partial = it >= nf
            n0 = _block_at(it, nf, qb, ncols, kvf_idx, kvp_idx) * BN
            # Barrier: every thread has finished reading the previous tile.
            cuda.syncthreads()
            stage_k(Ks, k, kbase, n0, ks_l, ks_d, Lk, tid)
            stage_v(Vs, v, vbase, n0, vs_l, vs_d, Lk, tid)
            # Barrier: the tile is complete before anyone reads it.
            cuda.syncthreads()

            # S = Q K^T for this thread's row, and the tile's row max.
            mt = float32(NEG_INF)
            for n in range(BN):
                s = float32(0.0)
                for d in range(D):
                    s += qr[d] * Ks[n, d]
                kn = n0 + n
                ok = kn < Lk
                if partial:
                    if CAUSAL:
                        ok = ok and kn <= row
                    if MASK:
                        if ok and valid:
                            s += mask[mbase + kn * ms_k]
                sc[n] = s if ok else float32(NEG_INF)
                mt = max(mt, sc[n])
            m_new = max(m_i, mt)
            # A row that has seen only masked keys keeps m = -inf and skips the update
            # (exp(-inf - -inf) would be NaN).
            if m_new > NEG_INF:
                alpha = math.exp(m_i - m_new)
                l_i *= alpha
                for d in range(Dv):
                    acc[d] *= alpha
                # acc += P V
                for n in range(BN):
                    p = math.exp(sc[n] - m_new)
                    l_i += p
                    for d in range(Dv):
                        acc[d] += p * Vs[n, d]
                m_i = m_new

        if valid:
            obase = b * os_b + h * os_h + row * os_l
            if l_i > 0.0:
                inv = 1.0 / l_i
                for d in range(Dv):
                    st(o, obase + d * os_d, acc[d] * inv)
                lse[bh * Lq + row] = m_i + math.log(l_i)
            else:
                for d in range(Dv):
                    st(o, obase + d * os_d, float32(0.0))
                lse[bh * Lq + row] = NEG_INF

    return fwd


# ----------------------------------------------------------------------- backward --
@lru_cache(maxsize=None)
def dkdv_kernel(kind: str, D: int, Dv: int, BM: int, BN: int, CAUSAL: bool, MASK: bool):
    """One thread per key (BN per CTA); loops over query heads of the kv group and the
    q blocks that see this kv block. dK = scale * sum_i dS_ij q_i, dV = sum_i P_ij dO_i."""
    ld = _loader(kind)
    st = _storer(kind)
    stage_q = _stager(kind, BM, D, BN)
    stage_do = _stager(kind, BM, Dv, BN)

    @cuda.jit(fastmath=True)
    def dkdv(q, k, v, do, lse, delta, mask, dk, dv,
             qs_b, qs_h, qs_l, qs_d, ks_b, ks_h, ks_l, ks_d,
             vs_b, vs_h, vs_l, vs_d, gs_b, gs_h, gs_l, gs_d,
             ms_b, ms_h, ms_q, ms_k,
             dks_b, dks_h, dks_l, dks_d, dvs_b, dvs_h, dvs_l, dvs_d,
             Hq, Hkv, G, Lq, Lk, scale,
             qf_num, qf_idx, qp_num, qp_idx, ncols):
        kb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // Hkv
        hk = bh - b * Hkv
        tid = cuda.threadIdx.x
        col = kb * BN + tid
        valid = col < Lk

        Qs = cuda.shared.array((BM, D), float32)
        dOs = cuda.shared.array((BM, Dv), float32)
        Ls = cuda.shared.array(BM, float32)
        Ds = cuda.shared.array(BM, float32)
        kr = cuda.local.array(D, float32)
        vr = cuda.local.array(Dv, float32)
        dkr = cuda.local.array(D, float32)
        dvr = cuda.local.array(Dv, float32)

        kbase = b * ks_b + hk * ks_h + col * ks_l
        vbase = b * vs_b + hk * vs_h + col * vs_l
        for d in range(D):
            kr[d] = ld(k, kbase + d * ks_d) * scale if valid else float32(0.0)
            dkr[d] = 0.0
        for d in range(Dv):
            vr[d] = ld(v, vbase + d * vs_d) if valid else float32(0.0)
            dvr[d] = 0.0

        nf = qf_num[kb]
        nt = nf + qp_num[kb]
        for g in range(G):
            h = hk * G + g
            qbase = b * qs_b + h * qs_h
            gbase = b * gs_b + h * gs_h
            mbase = b * ms_b + h * ms_h + col * ms_k
            rbase = (b * Hq + h) * Lq
            for it in range(nt):
                partial = it >= nf
                m0 = _block_at(it, nf, kb, ncols, qf_idx, qp_idx) * BM
                cuda.syncthreads()  # previous tile fully read
                stage_q(Qs, q, qbase, m0, qs_l, qs_d, Lq, tid)
                stage_do(dOs, do, gbase, m0, gs_l, gs_d, Lq, tid)
                for m in range(tid, BM, BN):
                    qm = m0 + m
                    if qm < Lq:
                        lv = lse[rbase + qm]
                        # A fully masked row has lse = -inf and P = 0 everywhere: +inf
                        # makes exp(s - lse) = 0 instead of NaN.
                        Ls[m] = lv if lv > NEG_INF else float32(POS_INF)
                        Ds[m] = delta[rbase + qm]
                    else:
                        Ls[m] = POS_INF
                        Ds[m] = 0.0
                cuda.syncthreads()  # tile complete
                for m in range(BM):
                    qm = m0 + m
                    s = float32(0.0)
                    for d in range(D):
                        s += kr[d] * Qs[m, d]
                    ok = valid
                    if partial:
                        if CAUSAL:
                            ok = ok and col <= qm
                        if MASK:
                            if ok and qm < Lq:
                                s += mask[mbase + qm * ms_q]
                    if ok:
                        p = math.exp(s - Ls[m])
                        dp = float32(0.0)
                        for d in range(Dv):
                            dvr[d] += p * dOs[m, d]
                            dp += dOs[m, d] * vr[d]
                        ds = p * (dp - Ds[m])
                        for d in range(D):
                            dkr[d] += ds * Qs[m, d]
        if valid:
            base = b * dks_b + hk * dks_h + col * dks_l
            for d in range(D):
                st(dk, base + d * dks_d, dkr[d] * scale)
            base = b * dvs_b + hk * dvs_h + col * dvs_l
            for d in range(Dv):
                st(dv, base + d * dvs_d, dvr[d])

    return dkdv


@lru_cache(maxsize=None)
def dq_kernel(kind: str, D: int, Dv: int, BM: int, BN: int, CAUSAL: bool, MASK: bool):
    """One thread per query (BM per CTA); walks the kv-block lists like the forward.
    dQ = scale * sum_j dS_ij k_j, dS = P * (dO . v_j - delta)."""
    ld = _loader(kind)
    st = _storer(kind)
    stage_k = _stager(kind, BN, D, BM)
    stage_v = _stager(kind, BN, Dv, BM)

    @cuda.jit(fastmath=True)
    def dq_k(q, k, v, do, lse, delta, mask, dq,
             qs_b, qs_h, qs_l, qs_d, ks_b, ks_h, ks_l, ks_d,
             vs_b, vs_h, vs_l, vs_d, gs_b, gs_h, gs_l, gs_d,
             ms_b, ms_h, ms_q, ms_k,
             dqs_b, dqs_h, dqs_l, dqs_d,
             Hq, G, Lq, Lk, scale,
             kvf_num, kvf_idx, kvp_num, kvp_idx, ncols):
        qb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // Hq
        h = bh - b * Hq
        hk = h // G
        tid = cuda.threadIdx.x
        row = qb * BM + tid
        valid = row < Lq

        Ks = cuda.shared.array((BN, D), float32)
        Vs = cuda.shared.array((BN, Dv), float32)
        qr = cuda.local.array(D, float32)
        dor = cuda.local.array(Dv, float32)
        dqr = cuda.local.array(D, float32)

        qbase = b * qs_b + h * qs_h + row * qs_l
        gbase = b * gs_b + h * gs_h + row * gs_l
        for d in range(D):
            qr[d] = ld(q, qbase + d * qs_d) * scale if valid else float32(0.0)
            dqr[d] = 0.0
        for d in range(Dv):
            dor[d] = ld(do, gbase + d * gs_d) if valid else float32(0.0)
        lrow = float32(POS_INF)
        drow = float32(0.0)
        if valid:
            lv = lse[bh * Lq + row]
            lrow = lv if lv > NEG_INF else float32(POS_INF)
            drow = delta[bh * Lq + row]
        kbase = b * ks_b + hk * ks_h
        vbase = b * vs_b + hk * vs_h
        mbase = b * ms_b + h * ms_h + row * ms_q

        nf = kvf_num[qb]
        nt = nf + kvp_num[qb]
        for it in range(nt):
            partial = it >= nf
            n0 = _block_at(it, nf, qb, ncols, kvf_idx, kvp_idx) * BN
            cuda.syncthreads()
            stage_k(Ks, k, kbase, n0, ks_l, ks_d, Lk, tid)
            stage_v(Vs, v, vbase, n0, vs_l, vs_d, Lk, tid)
            cuda.syncthreads()
            for n in range(BN):
                kn = n0 + n
                s = float32(0.0)
                for d in range(D):
                    s += qr[d] * Ks[n, d]
                ok = valid and kn < Lk
                if partial:
                    if CAUSAL:
                        ok = ok and kn <= row
                    if MASK:
                        if ok:
                            s += mask[mbase + kn * ms_k]
                if ok:
                    p = math.exp(s - lrow)
                    dp = float32(0.0)
                    for d in range(Dv):
                        dp += dor[d] * Vs[n, d]
                    ds = p * (dp - drow)
                    for d in range(D):
                        dqr[d] += ds * Ks[n, d]
        if valid:
            base = b * dqs_b + h * dqs_h + row * dqs_l
            for d in range(D):
                st(dq, base + d * dqs_d, dqr[d] * scale)

    return dq_k
