# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Tiled online-softmax attention (FlashAttention-2 forward and backward) for CPUs.

One source, compiled by setup.py once per ISA (the vector width comes from the -march
flags of each build); attn.cpu picks the variant at import. Callers pass raw pointers
and element strides, so any strided view (transposed, expanded) works without a copy;
the kernels pack a tile into per-thread scratch only when its rows are not contiguous.

Layouts: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), out like q with Dv,
lse (B, Hq, Lq). The compute type `real` is float (float32/float16/bfloat16 inputs,
which the launcher upcasts) or double.

Work is described as lists of kv blocks per q block, in FlexAttention's layout: for
every (batch, head, q block) a count and indices of *full* blocks (nothing masked) and
of *partial* blocks (the causal rule and the attention mask are evaluated per element).
Dense and causal attention are lists the launcher builds; block masks and jagged
batches plug into the same loops. The dK/dV pass walks the transposed lists.
"""
from cython.parallel cimport prange, threadid
from libc.stdlib cimport free
from libc.string cimport memset
from libc.math cimport INFINITY, log

cdef extern from "tile_ops.h" nogil:
    void gemm_float(int M, int N, int K, const float *A, long a_rs, long a_cs,
                    const float *B, long ldb, float *C, long ldc, int accumulate)
    void gemm_double(int M, int N, int K, const double *A, long a_rs, long a_cs,
                     const double *B, long ldb, double *C, long ldc, int accumulate)
    void softmax_cols_f32(int nrows, int ncols, float *S, long lds, float *m,
                          float *l, float *alpha)
    void softmax_cols_f64(int nrows, int ncols, double *S, long lds, double *m,
                          double *l, double *alpha)
    void bwd_rows_f32(int nrows, int ncols, float *S, long lds, float *dP, long ldp,
                      const float *lse, const float *delta)
    void bwd_rows_f64(int nrows, int ncols, double *S, long lds, double *dP, long ldp,
                      const double *lse, const double *delta)
    void bwd_cols_f32(int nrows, int ncols, float *S, long lds, float *dP, long ldp,
                      const float *lse, const float *delta)
    void bwd_cols_f64(int nrows, int ncols, double *S, long lds, double *dP, long ldp,
                      const double *lse, const double *delta)
    void scale_row_f32(float *x, int n, float a)
    void scale_row_f64(double *x, int n, double a)
    int ATTN_PAD
    int ATTN_VBYTES
    int ATTN_OPENMP

cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

ctypedef fused real:
    float
    double

# Tile callbacks compiled by Numba from the user's mask_mod / score_mod (attn._modgen):
# called once per tile, not per element, so the indirect call is amortised over the
# tile and the element loop inside is compiled and vectorised for the mod.
# Arguments: b, h (query head), q0, nq, k0, nk, S, ld, q_major, buffers; an element of S
# is S[i*ld + j] when q_major else S[j*ld + i] (query q0 + i, key k0 + j).
ctypedef void (*tile_f32)(long long, long long, long long, long long, long long,
                          long long, float *, long long, long long, void **) noexcept nogil
ctypedef void (*tile_f64)(long long, long long, long long, long long, long long,
                          long long, double *, long long, long long, void **) noexcept nogil
# score_mod and its derivative: S <- score_mod(S), G <- d score_mod / d S.
ctypedef void (*grad_tile_f32)(long long, long long, long long, long long, long long,
                               long long, float *, float *, long long, long long,
                               void **) noexcept nogil
ctypedef void (*grad_tile_f64)(long long, long long, long long, long long, long long,
                               long long, double *, double *, long long, long long,
                               void **) noexcept nogil


# Mask kinds (the attention mask, evaluated on partial blocks only).
cdef enum:
    MASK_NONE = 0
    MASK_BOOL = 1
    MASK_ADD = 2


cdef struct Tensor4:
    char *ptr          # base address
    long s[4]          # element strides (b, h, l, d)


cdef struct Blocks:
    # FlexAttention-style block lists: num[b, h, row], idx[b, h, row, col]; broadcast
    # dimensions have stride 0.
    const int *num
    const int *idx
    long sn[3]
    long si[4]


cdef struct Problem:
    int B, Hq, Hkv, Lq, Lk, D, Dv, group
    int BM, BN, nqb, nkb
    int Dp, Dvp, BMp, BNp            # widths padded to ATTN_PAD for scratch rows
    double scale                     # softmax scale, folded into the packed Q
    int causal
    int mask_kind
    Tensor4 q, k, v, o, do, mask
    char *lse                        # (B, Hq, Lq) contiguous, natural log
    char *delta                      # (B, Hq, Lq) contiguous: rowsum(dO * O) - dlse
    char *dq                         # (B, Hq, Lq, Dp) contiguous accumulator
    char *dk                         # (B, Hkv, Lk, Dp)
    char *dv                         # (B, Hkv, Lk, Dvp)
    Blocks kv_part, kv_full          # per q block
    Blocks q_part, q_full            # per kv block (transposes)
    void *mod_mask                   # mask_mod tile callback (partial blocks), or NULL
    void *mod_score                  # score_mod tile callback (every block), or NULL
    void *mod_score_grad             # score_mod with its derivative (backward), or NULL
    void **mask_bufs                 # data pointers of the tensors mask_mod reads
    void **score_bufs                # data pointers of the tensors score_mod reads
    char *mx                         # (B, Hq, Lq) row maxima of the scores, or NULL


cdef inline int pad(int n) noexcept nogil:
    return (n + ATTN_PAD - 1) // ATTN_PAD * ATTN_PAD


cdef inline real *row_ptr(real *dummy, Tensor4 *t, long b, long h, long l) noexcept nogil:
    return <real *>(t.ptr) + b * t.s[0] + h * t.s[1] + l * t.s[2]


cdef inline int blocks_count(Blocks *bl, long b, long h, long row) noexcept nogil:
    if bl.num == NULL:
        return 0
    return bl.num[b * bl.sn[0] + h * bl.sn[1] + row * bl.sn[2]]


cdef inline int blocks_at(Blocks *bl, long b, long h, long row, long t) noexcept nogil:
    return bl.idx[b * bl.si[0] + h * bl.si[1] + row * bl.si[2] + t * bl.si[3]]


cdef inline const real *rows_or_pack(real *dummy, Tensor4 *t, long b, long h, long l0,
                                     int n, int width, int width_p, real *scratch,
                                     long *ld) noexcept nogil:
    """Rows l0..l0+n of a (b, h) slice as a row-major matrix with padded width.

    Returns the tensor's own memory when its rows are contiguous and the width is
    already a multiple of ATTN_PAD (the common case: no copy); otherwise copies the
    rows into scratch, zero-filling the padding columns and the rows n..BLOCK so a
    GEMM that reads a full block sees zeros rather than stale data."""
    cdef real *src = row_ptr(dummy, t, b, h, l0)
    cdef int r, c
    if t.s[3] == 1 and width == width_p:
        ld[0] = t.s[2]
        return src
    for r in range(n):
        for c in range(width):
            scratch[r * width_p + c] = src[r * t.s[2] + c * t.s[3]]
        for c in range(width, width_p):
            scratch[r * width_p + c] = 0
    ld[0] = width_p
    return scratch


cdef inline void pack_transposed(real *dummy, Tensor4 *t, long b, long h, long l0, int n,
                                 int width, int n_p, real mult, real *out) noexcept nogil:
    """out[c, r] = mult * t[b, h, l0 + r, c] for r < n; columns n..n_p zero."""
    cdef real *src = row_ptr(dummy, t, b, h, l0)
    cdef int r, c
    for c in range(width):
        for r in range(n):
            out[c * n_p + r] = mult * src[r * t.s[2] + c * t.s[3]]
        for r in range(n, n_p):
            out[c * n_p + r] = 0


cdef inline void fill_ninf(real *x, int n) noexcept nogil:
    cdef int c
    for c in range(n):
        x[c] = -INFINITY


cdef inline void apply_mask(real *dummy, Problem *p, real *S, long ld, int q_major,
                            long b, long h, int q0, int nq, int k0, int nk) noexcept nogil:
    """Causal rule and attention mask on a partial tile of (scaled) scores.

    q_major: S[r, c] is (query q0 + r, key k0 + c); otherwise (key k0 + r, query q0 + c).
    The causal rule (key > query is hidden) is a contiguous run per row in either
    layout, so it is filled, not tested per element."""
    cdef int i, j, r, lim
    cdef long off
    cdef real *e
    if p.causal:
        if q_major:
            for r in range(nq):
                # keys k0 + c > q0 + r hidden: c from q0 + r - k0 + 1 on
                lim = max(0, min(nk, q0 + r - k0 + 1))
                fill_ninf(S + r * ld + lim, nk - lim)
        else:
            for r in range(nk):
                # queries q0 + c < k0 + r hidden: c below k0 + r - q0
                lim = max(0, min(nq, k0 + r - q0))
                fill_ninf(S + r * ld, lim)
    if p.mod_mask != NULL:
        if real is float:
            (<tile_f32>p.mod_mask)(b, h, q0, nq, k0, nk, S, ld, q_major, p.mask_bufs)
        else:
            (<tile_f64>p.mod_mask)(b, h, q0, nq, k0, nk, S, ld, q_major, p.mask_bufs)
    if p.mask_kind == MASK_NONE:
        return
    for i in range(nq):
        # Strides are in elements: the bool mask has 1-byte elements, the additive
        # mask has elements of the compute type.
        off = b * p.mask.s[0] + h * p.mask.s[1] + (q0 + i) * p.mask.s[2]
        for j in range(nk):
            if q_major:
                e = S + i * ld + j
            else:
                e = S + j * ld + i
            if p.mask_kind == MASK_BOOL:
                if not (<unsigned char *>p.mask.ptr)[off + (k0 + j) * p.mask.s[3]]:
                    e[0] = -INFINITY
            else:
                e[0] = e[0] + (<real *>p.mask.ptr)[off + (k0 + j) * p.mask.s[3]]


cdef inline void apply_score_mod(real *dummy, Problem *p, real *S, real *G, long ld,
                                 int q_major, long b, long h, int q0, int nq, int k0,
                                 int nk) noexcept nogil:
    """score_mod on the valid part of a tile of scaled scores (before any mask, as in
    FlexAttention); with G (the backward) also its derivative, same layout."""
    if G != NULL:
        if real is float:
            (<grad_tile_f32>p.mod_score_grad)(b, h, q0, nq, k0, nk, S, G, ld, q_major,
                                              p.score_bufs)
        else:
            (<grad_tile_f64>p.mod_score_grad)(b, h, q0, nq, k0, nk, S, G, ld, q_major,
                                              p.score_bufs)
    elif real is float:
        (<tile_f32>p.mod_score)(b, h, q0, nq, k0, nk, S, ld, q_major, p.score_bufs)
    else:
        (<tile_f64>p.mod_score)(b, h, q0, nq, k0, nk, S, ld, q_major, p.score_bufs)


cdef inline void chain_score_grad(real *dS, const real *G, long ld, int nrows,
                                  int ncols) noexcept nogil:
    """dS <- dS * G: the gradient reaching the modified score times d mod / d score.
    Only where dS is nonzero: a hidden element has P = 0, so dS = 0, and its derivative
    may be inf or NaN (a mod evaluated far outside its range) — 0 * inf must not leak."""
    cdef int r, c
    for r in range(nrows):
        for c in range(ncols):
            if dS[r * ld + c] != 0:
                dS[r * ld + c] = dS[r * ld + c] * G[r * ld + c]


cdef inline real lse_for_bwd(real x) noexcept nogil:
    """A row that saw no key (lse = -inf) gets +inf, which makes its P exactly 0."""
    return INFINITY if x == -INFINITY else x


cdef inline void pack_rows(real *dummy, Tensor4 *t, long b, long h, long l0, int n,
                           int width, real mult, real *out) noexcept nogil:
    """out[r, c] = mult * t[b, h, l0 + r, c]: the backward's Q scaled like the forward's,
    so its scores are bitwise the forward's (same products, same order, same FMAs)."""
    cdef real *src = row_ptr(dummy, t, b, h, l0)
    cdef int r, c
    for r in range(n):
        for c in range(width):
            out[r * width + c] = mult * src[r * t.s[2] + c * t.s[3]]


cdef inline void gemm(int M, int N, int K, const real *A, long a_rs, long a_cs,
                      const real *Bm, long ldb, real *C, long ldc, int acc) noexcept nogil:
    if real is float:
        gemm_float(M, N, K, A, a_rs, a_cs, Bm, ldb, C, ldc, acc)
    else:
        gemm_double(M, N, K, A, a_rs, a_cs, Bm, ldb, C, ldc, acc)


cdef inline int scores_t(real *dummy, Problem *p, long b, long h, long hk, int q0,
                         int mq, int j, bint partial, const real *Qt, real *St, real *Ks,
                         const real **Kr, long *ldk, real *G) noexcept nogil:
    """S^T (keys x queries) of kv block j against a q block whose Q^T, times the softmax
    scale, is Qt; the causal rule and the mask are applied on partial blocks. The
    forward and the dQ pass both compute their scores here, so the dQ pass reproduces
    the forward's bitwise. Returns the block's key count and leaves its K rows (padded
    to Dp, for a later dS K) in Kr / ldk."""
    cdef int k0 = j * p.BN
    cdef int nk = min(p.BN, p.Lk - k0)
    Kr[0] = rows_or_pack(dummy, &p.k, b, hk, k0, nk, p.D, p.Dp, Ks, ldk)
    # Broadcast K, vectors of Q^T.
    gemm(nk, p.BMp, p.D, Kr[0], ldk[0], 1, Qt, p.BMp, St, p.BMp, 0)
    if p.mod_score != NULL:
        apply_score_mod(dummy, p, St, G, p.BMp, 0, b, h, q0, mq, k0, nk)
    if partial:
        apply_mask(dummy, p, St, p.BMp, 0, b, h, q0, mq, k0, nk)
    return nk


# ----------------------------------------------------------------------------- forward

cdef size_t fwd_scratch_elems(Problem *p) noexcept nogil:
    return (<size_t>p.D * p.BMp            # Qt
            + <size_t>p.BN * p.BMp         # S^T
            + <size_t>p.BN * p.Dp          # packed K rows
            + <size_t>p.BN * p.Dvp         # packed V rows
            + <size_t>p.BMp * p.Dvp        # acc
            + 3 * <size_t>p.BMp)           # m_i, l_i, alpha


cdef void fwd_item(real *dummy, Problem *p, long item, real *scratch) noexcept nogil:
    """One (batch, head, q block): out and lse for BLOCK_M queries."""
    cdef long i = item % p.nqb
    cdef long h = (item // p.nqb) % p.Hq
    cdef long b = item // (<long>p.nqb * p.Hq)
    cdef long hk = h // p.group
    cdef int q0 = i * p.BM
    cdef int mq = min(p.BM, p.Lq - q0)
    cdef int BMp = p.BMp
    cdef real *Qt = scratch
    cdef real *St = Qt + <size_t>p.D * BMp
    cdef real *Ks = St + <size_t>p.BN * BMp
    cdef real *Vs = Ks + <size_t>p.BN * p.Dp
    cdef real *acc = Vs + <size_t>p.BN * p.Dvp
    cdef real *m_i = acc + <size_t>BMp * p.Dvp
    cdef real *l_i = m_i + BMp
    cdef real *alpha = l_i + BMp
    cdef int c, r, t, n, which, j, k0, nk
    cdef long ldk, ldv
    cdef const real *Kr
    cdef const real *Vr
    cdef Blocks *bl
    cdef real *orow
    cdef real inv
    cdef real *lse = <real *>p.lse

    # Q^T scaled once per q block; every kv block reuses it.
    pack_transposed(dummy, &p.q, b, h, q0, mq, p.D, BMp, <real>p.scale, Qt)
    for c in range(BMp):
        m_i[c] = -INFINITY
        l_i[c] = 0
    memset(acc, 0, <size_t>BMp * p.Dvp * sizeof(real))

    # Full blocks first, then partial ones: a fixed order keeps results bitwise
    # reproducible whatever the thread count.
    for which in range(2):
        bl = &p.kv_full if which == 0 else &p.kv_part
        n = blocks_count(bl, b, h, i)
        for t in range(n):
            j = blocks_at(bl, b, h, i, t)
            k0 = j * p.BN
            nk = scores_t(dummy, p, b, h, hk, q0, mq, j, which == 1, Qt, St, Ks, &Kr, &ldk,
                          NULL)
            if real is float:
                softmax_cols_f32(nk, BMp, St, BMp, m_i, l_i, alpha)
            else:
                softmax_cols_f64(nk, BMp, St, BMp, m_i, l_i, alpha)
            for c in range(mq):
                if real is float:
                    scale_row_f32(acc + <size_t>c * p.Dvp, p.Dvp, alpha[c])
                else:
                    scale_row_f64(acc + <size_t>c * p.Dvp, p.Dvp, alpha[c])
            Vr = rows_or_pack(dummy, &p.v, b, hk, k0, nk, p.Dv, p.Dvp, Vs, &ldv)
            # acc (queries x Dv) += P V, P read as the transpose of the S^T tile.
            gemm(mq, p.Dvp, nk, St, 1, BMp, Vr, ldv, acc, p.Dvp, 1)

    for c in range(mq):
        orow = row_ptr(dummy, &p.o, b, h, q0 + c)
        if l_i[c] > 0:
            inv = 1 / l_i[c]
            for r in range(p.Dv):
                orow[r * p.o.s[3]] = acc[<size_t>c * p.Dvp + r] * inv
            # A peaked row (l = 1) stores lse = m exactly, so the backward's P is 1.
            lse[(b * p.Hq + h) * p.Lq + q0 + c] = m_i[c] + log(<double>l_i[c])
        else:
            # No visible key: output 0 and lse -inf (never 0/0).
            for r in range(p.Dv):
                orow[r * p.o.s[3]] = 0
            lse[(b * p.Hq + h) * p.Lq + q0 + c] = -INFINITY
        if p.mx != NULL:
            (<real *>p.mx)[(b * p.Hq + h) * p.Lq + q0 + c] = m_i[c]


cdef inline size_t round64(size_t n_elems, size_t itemsize) noexcept nogil:
    """Per-thread scratch stride in elements, rounded to a cache line so threads never
    share one."""
    return (n_elems * itemsize + 63) // 64 * 64 // itemsize


cdef void fwd_run(real *dummy, Problem *p, int nthreads, real *scratch) noexcept nogil:
    cdef long n_items = <long>p.B * p.Hq * p.nqb
    cdef size_t stride = round64(fwd_scratch_elems(p), sizeof(real))
    cdef long item
    for item in prange(n_items, schedule='dynamic', num_threads=nthreads):
        fwd_item(dummy, p, item, scratch + threadid() * stride)


# ---------------------------------------------------------------------------- backward

cdef size_t kv_scratch_elems(Problem *p) noexcept nogil:
    return (<size_t>p.D * p.BNp            # K^T
            + <size_t>p.Dv * p.BNp         # V^T
            + <size_t>p.BN * p.Dp          # packed K rows (for fused dQ)
            + <size_t>p.BMp * p.Dp         # packed Q rows
            + <size_t>p.BMp * p.D          # Q rows times the softmax scale
            + <size_t>p.BMp * p.Dvp        # packed dO rows
            + 3 * <size_t>p.BMp * p.BNp    # S / P, dP / dS and d score_mod / d S
            + 2 * <size_t>p.BMp)           # lse, delta of the q block


cdef void kv_item(real *dummy, Problem *p, long b, long hk, int j, int fuse_dq,
                  real *scratch) noexcept nogil:
    """dK and dV of one kv block (accumulated over the q heads of its GQA group and over
    the q blocks that see it); with fuse_dq also adds this block's share of dQ, which
    is only race-free when one item owns every kv block of its (batch, kv head)."""
    cdef int BNp = p.BNp
    cdef int k0 = j * p.BN
    cdef int nk = min(p.BN, p.Lk - k0)
    cdef real *Kt = scratch
    cdef real *Vt = Kt + <size_t>p.D * BNp
    cdef real *Ks = Vt + <size_t>p.Dv * BNp
    cdef real *Qs = Ks + <size_t>p.BN * p.Dp
    cdef real *Qsc = Qs + <size_t>p.BMp * p.Dp
    cdef real *dOs = Qsc + <size_t>p.BMp * p.D
    cdef real *S = dOs + <size_t>p.BMp * p.Dvp
    cdef real *dP = S + <size_t>p.BMp * BNp
    cdef real *G = dP + <size_t>p.BMp * BNp
    cdef real *lr = G + <size_t>p.BMp * BNp
    cdef real *dl = lr + p.BMp
    cdef real *dK = <real *>p.dk + ((b * p.Hkv + hk) * p.Lk + k0) * <long>p.Dp
    cdef real *dV = <real *>p.dv + ((b * p.Hkv + hk) * p.Lk + k0) * <long>p.Dvp
    cdef real *lse = <real *>p.lse
    cdef real *delta = <real *>p.delta
    cdef real *dQ
    cdef const real *Kr = NULL
    cdef const real *Qr
    cdef const real *dOr
    cdef long ldk = 0, ldq, ldo, row
    cdef int g, which, n, t, i, q0, mq, r
    cdef long h
    cdef Blocks *bl

    pack_transposed(dummy, &p.k, b, hk, k0, nk, p.D, BNp, 1, Kt)
    pack_transposed(dummy, &p.v, b, hk, k0, nk, p.Dv, BNp, 1, Vt)
    if fuse_dq:
        Kr = rows_or_pack(dummy, &p.k, b, hk, k0, nk, p.D, p.Dp, Ks, &ldk)
    memset(dK, 0, <size_t>nk * p.Dp * sizeof(real))
    memset(dV, 0, <size_t>nk * p.Dvp * sizeof(real))

    for g in range(p.group):
        h = hk * p.group + g
        for which in range(2):
            bl = &p.q_full if which == 0 else &p.q_part
            n = blocks_count(bl, b, h, j)
            for t in range(n):
                i = blocks_at(bl, b, h, j, t)
                q0 = i * p.BM
                mq = min(p.BM, p.Lq - q0)
                row = (b * p.Hq + h) * p.Lq + q0
                for r in range(mq):
                    lr[r] = lse_for_bwd(lse[row + r])
                    dl[r] = delta[row + r]
                Qr = rows_or_pack(dummy, &p.q, b, h, q0, mq, p.D, p.Dp, Qs, &ldq)
                pack_rows(dummy, &p.q, b, h, q0, mq, p.D, <real>p.scale, Qsc)
                dOr = rows_or_pack(dummy, &p.do, b, h, q0, mq, p.Dv, p.Dvp, dOs, &ldo)
                # S = Q K^T * scale (queries x keys), dP = dO V^T.
                gemm(mq, BNp, p.D, Qsc, p.D, 1, Kt, BNp, S, BNp, 0)
                if p.mod_score != NULL:
                    apply_score_mod(dummy, p, S, G, BNp, 1, b, h, q0, mq, k0, nk)
                if which == 1:
                    apply_mask(dummy, p, S, BNp, 1, b, h, q0, mq, k0, nk)
                gemm(mq, BNp, p.Dv, dOr, ldo, 1, Vt, BNp, dP, BNp, 0)
                if real is float:
                    bwd_rows_f32(mq, BNp, S, BNp, dP, BNp, lr, dl)
                else:
                    bwd_rows_f64(mq, BNp, S, BNp, dP, BNp, lr, dl)
                if p.mod_score != NULL:
                    chain_score_grad(dP, G, BNp, mq, nk)
                # dV += P^T dO and dK += dS^T Q (unscaled; the launcher applies scale).
                gemm(nk, p.Dvp, mq, S, 1, BNp, dOr, ldo, dV, p.Dvp, 1)
                gemm(nk, p.Dp, mq, dP, 1, BNp, Qr, ldq, dK, p.Dp, 1)
                if fuse_dq:
                    dQ = <real *>p.dq + row * <long>p.Dp
                    gemm(mq, p.Dp, nk, dP, BNp, 1, Kr, ldk, dQ, p.Dp, 1)


cdef size_t q_scratch_elems(Problem *p) noexcept nogil:
    return (<size_t>p.D * p.BMp            # Q^T
            + <size_t>p.Dv * p.BMp         # dO^T
            + <size_t>p.BN * p.Dp          # packed K rows
            + <size_t>p.BN * p.Dvp         # packed V rows
            + 3 * <size_t>p.BN * p.BMp     # S^T / P^T, dP^T / dS^T, d score_mod / d S
            + 2 * <size_t>p.BMp)           # lse, delta columns


cdef void q_item(real *dummy, Problem *p, long item, real *scratch) noexcept nogil:
    """dQ of one (batch, head, q block), recomputing P and dS from the saved lse."""
    cdef long i = item % p.nqb
    cdef long h = (item // p.nqb) % p.Hq
    cdef long b = item // (<long>p.nqb * p.Hq)
    cdef long hk = h // p.group
    cdef int BMp = p.BMp
    cdef int q0 = i * p.BM
    cdef int mq = min(p.BM, p.Lq - q0)
    cdef real *Qt = scratch
    cdef real *dOt = Qt + <size_t>p.D * BMp
    cdef real *Ks = dOt + <size_t>p.Dv * BMp
    cdef real *Vs = Ks + <size_t>p.BN * p.Dp
    cdef real *St = Vs + <size_t>p.BN * p.Dvp
    cdef real *dPt = St + <size_t>p.BN * BMp
    cdef real *Gt = dPt + <size_t>p.BN * BMp
    cdef real *lc = Gt + <size_t>p.BN * BMp
    cdef real *dl = lc + BMp
    cdef long row = (b * p.Hq + h) * p.Lq + q0
    cdef real *dQ = <real *>p.dq + row * <long>p.Dp
    cdef real *lse = <real *>p.lse
    cdef real *delta = <real *>p.delta
    cdef const real *Kr
    cdef const real *Vr
    cdef long ldk, ldv
    cdef int which, n, t, j, k0, nk, c
    cdef Blocks *bl

    # Q^T scaled exactly as the forward packs it: the scores below are bitwise the
    # forward's, so P is consistent with the saved lse.
    pack_transposed(dummy, &p.q, b, h, q0, mq, p.D, BMp, <real>p.scale, Qt)
    pack_transposed(dummy, &p.do, b, h, q0, mq, p.Dv, BMp, 1, dOt)
    for c in range(BMp):
        if c < mq:
            lc[c] = lse_for_bwd(lse[row + c])
            dl[c] = delta[row + c]
        else:
            lc[c] = INFINITY
            dl[c] = 0
    memset(dQ, 0, <size_t>mq * p.Dp * sizeof(real))

    for which in range(2):
        bl = &p.kv_full if which == 0 else &p.kv_part
        n = blocks_count(bl, b, h, i)
        for t in range(n):
            j = blocks_at(bl, b, h, i, t)
            k0 = j * p.BN
            nk = scores_t(dummy, p, b, h, hk, q0, mq, j, which == 1, Qt, St, Ks, &Kr, &ldk,
                          Gt)
            Vr = rows_or_pack(dummy, &p.v, b, hk, k0, nk, p.Dv, p.Dv, Vs, &ldv)
            # dP^T = V dO^T (keys x queries).
            gemm(nk, BMp, p.Dv, Vr, ldv, 1, dOt, BMp, dPt, BMp, 0)
            if real is float:
                bwd_cols_f32(nk, BMp, St, BMp, dPt, BMp, lc, dl)
            else:
                bwd_cols_f64(nk, BMp, St, BMp, dPt, BMp, lc, dl)
            if p.mod_score != NULL:
                chain_score_grad(dPt, Gt, BMp, nk, mq)
            # dQ (queries x D) += dS K, dS read as the transpose of dS^T.
            gemm(mq, p.Dp, nk, dPt, 1, BMp, Kr, ldk, dQ, p.Dp, 1)


cdef size_t bwd_scratch_elems(Problem *p) noexcept nogil:
    return max(kv_scratch_elems(p), q_scratch_elems(p))


cdef void bwd_run(real *dummy, Problem *p, int nthreads, int fused,
                  real *scratch) noexcept nogil:
    cdef long n_kv = <long>p.B * p.Hkv * p.nkb
    cdef long n_heads = <long>p.B * p.Hkv
    cdef long n_q = <long>p.B * p.Hq * p.nqb
    cdef size_t stride = round64(bwd_scratch_elems(p), sizeof(real))
    cdef long item
    cdef int j
    if fused:
        # One item per (batch, kv head) owns all its kv blocks, so it can add into dQ
        # without races and without recomputing P: used when the heads alone keep
        # every thread busy (attn.cpu chooses the schedule).
        for item in prange(n_heads, schedule='dynamic', num_threads=nthreads):
            for j in range(p.nkb):
                kv_item(dummy, p, item // p.Hkv, item % p.Hkv, j, 1,
                        scratch + threadid() * stride)
    else:
        # Two passes: dK/dV parallel over kv blocks, then dQ parallel over q blocks.
        for item in prange(n_kv, schedule='dynamic', num_threads=nthreads):
            kv_item(dummy, p, item // (<long>p.Hkv * p.nkb), (item // p.nkb) % p.Hkv,
                    item % p.nkb, 0, scratch + threadid() * stride)
        for item in prange(n_q, schedule='dynamic', num_threads=nthreads):
            q_item(dummy, p, item, scratch + threadid() * stride)


# ------------------------------------------------------------------------ Python entry

cdef void set_tensor(Tensor4 *t, size_t ptr, tuple strides):
    cdef int d
    t.ptr = <char *>ptr
    for d in range(4):
        t.s[d] = strides[d]


cdef void set_blocks(Blocks *bl, tuple spec):
    """spec: None or (num_ptr, num_strides(3), idx_ptr, idx_strides(4))."""
    cdef int d
    if spec is None:
        bl.num = NULL
        bl.idx = NULL
        return
    bl.num = <const int *><size_t>spec[0]
    bl.idx = <const int *><size_t>spec[2]
    for d in range(3):
        bl.sn[d] = spec[1][d]
    for d in range(4):
        bl.si[d] = spec[3][d]


cdef void set_problem(Problem *p, dict a) except *:
    p.B, p.Hq, p.Hkv, p.Lq, p.Lk, p.D, p.Dv = a["sizes"]
    p.group = p.Hq // p.Hkv
    p.BM, p.BN = a["blocks"]
    p.nqb = (p.Lq + p.BM - 1) // p.BM
    p.nkb = (p.Lk + p.BN - 1) // p.BN
    p.Dp, p.Dvp, p.BMp, p.BNp = pad(p.D), pad(p.Dv), pad(p.BM), pad(p.BN)
    p.scale = a["scale"]
    p.causal = a["causal"]
    p.mask_kind = a["mask_kind"]
    set_tensor(&p.q, a["q"][0], a["q"][1])
    set_tensor(&p.k, a["k"][0], a["k"][1])
    set_tensor(&p.v, a["v"][0], a["v"][1])
    if "o" in a:
        set_tensor(&p.o, a["o"][0], a["o"][1])
    if "do" in a:
        set_tensor(&p.do, a["do"][0], a["do"][1])
    if a["mask_kind"] != MASK_NONE:
        set_tensor(&p.mask, a["mask"][0], a["mask"][1])
    else:
        set_tensor(&p.mask, 0, (0, 0, 0, 0))
    p.lse = <char *><size_t>a["lse"]
    p.delta = <char *><size_t>a.get("delta", 0)
    p.dq = <char *><size_t>a.get("dq", 0)
    p.dk = <char *><size_t>a.get("dk", 0)
    p.dv = <char *><size_t>a.get("dv", 0)
    set_blocks(&p.kv_full, a["kv_full"])
    set_blocks(&p.kv_part, a["kv_part"])
    set_blocks(&p.q_full, a.get("q_full"))
    set_blocks(&p.q_part, a.get("q_part"))
    # mods: addresses of (mask_fn, mask buffer pointers, score_fn, score_grad_fn,
    # score buffer pointers); 0 = none.
    mods = a.get("mods") or (0, 0, 0, 0, 0)
    p.mod_mask = <void *><size_t>mods[0]
    p.mask_bufs = <void **><size_t>mods[1]
    p.mod_score = <void *><size_t>mods[2]
    p.mod_score_grad = <void *><size_t>mods[3]
    p.score_bufs = <void **><size_t>mods[4]
    p.mx = <char *><size_t>a.get("max_scores", 0)


cdef void *alloc_scratch(size_t per_thread_elems, size_t itemsize, int nthreads) except NULL:
    """Per-thread scratch, one cache-line-aligned slice per thread: O(threads x block^2)."""
    cdef size_t nbytes = round64(per_thread_elems, itemsize) * itemsize * nthreads
    cdef void *buf = aligned_alloc(64, max(nbytes, <size_t>64))
    if buf == NULL:
        raise MemoryError(f"attn.cpu: cannot allocate {nbytes} bytes of kernel scratch")
    return buf


def forward(dict args, bint double_precision, int nthreads):
    """Forward pass; args as built by attn.cpu (pointers and strides)."""
    cdef Problem p
    cdef void *scratch
    set_problem(&p, args)
    scratch = alloc_scratch(fwd_scratch_elems(&p),
                            sizeof(double) if double_precision else sizeof(float), nthreads)
    with nogil:
        if double_precision:
            fwd_run(<double *>NULL, &p, nthreads, <double *>scratch)
        else:
            fwd_run(<float *>NULL, &p, nthreads, <float *>scratch)
    free(scratch)


def backward(dict args, bint double_precision, int nthreads, bint fused):
    """Backward pass into the padded accumulators dq/dk/dv of args (unscaled)."""
    cdef Problem p
    cdef void *scratch
    set_problem(&p, args)
    scratch = alloc_scratch(bwd_scratch_elems(&p),
                            sizeof(double) if double_precision else sizeof(float), nthreads)
    with nogil:
        if double_precision:
            bwd_run(<double *>NULL, &p, nthreads, fused, <double *>scratch)
        else:
            bwd_run(<float *>NULL, &p, nthreads, fused, <float *>scratch)
    free(scratch)


def pad_width():
    """Scratch rows and the dq/dk/dv accumulators are padded to this many elements."""
    return ATTN_PAD


def openmp_enabled():
    """Whether this variant was compiled with OpenMP (prange runs serially without)."""
    return bool(ATTN_OPENMP)
