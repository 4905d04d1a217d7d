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
Dense and causal attention are lists the launcher builds; block masks plug into the
same loops. The dK/dV pass walks the transposed lists.

Jagged batches (packed variable-length sequences) have a second schedule (Problem.jagged):
q tiles start at each sequence's first query and kv tiles at its first key, so no tile
straddles two sequences; every item finds its tiles from the per-sequence offsets and
band (query t sees key j when t + diag - left <= j <= t + diag + right), full tiles
need no mask and partial ones get the band's edges filled. The per-pair work (fwd_step,
kv_pair, q_pair) is shared by both schedules.
"""
from cython.parallel cimport prange, threadid
from libc.stdlib cimport free
from libc.string cimport memcpy, memset
from libc.math cimport INFINITY, log

cdef extern from "tile_ops.h" nogil:
    void gemm_float(int M, int N, int K, const float *A, long a_rs, long a_cs,
                    const float *B, long ldb, float *C, long ldc, int accumulate)
    void gemm_double(int M, int N, int K, const double *A, long a_rs, long a_cs,
                     const double *B, long ldb, double *C, long ldc, int accumulate)
    void gemm_rs_float(int M, int N, int K, const float *A, long a_rs, long a_cs,
                       const float *B, long ldb, float *C, long ldc, const float *rscale)
    void gemm_rs_double(int M, int N, int K, const double *A, long a_rs, long a_cs,
                        const double *B, long ldb, double *C, long ldc,
                        const double *rscale)
    void softmax_cols_f32(int nrows, int ncols, float *S, long lds, float *m,
                          float *l, float *alpha)
    void softmax_cols_f64(int nrows, int ncols, double *S, long lds, double *m,
                          double *l, double *alpha)
    void mask_rows_float(int nrows, int nq, const float *M, long ld, int *lo, int *hi)
    void mask_rows_double(int nrows, int nq, const double *M, long ld, int *lo, int *hi)
    void mask_cols_float(int nrows, int ncols, const float *M, long ld, int *lo, int *hi)
    void mask_cols_double(int nrows, int ncols, const double *M, long ld, int *lo,
                          int *hi)
    void mask_select_float(int nrows, int ncols, float *S, long lds, const float *M,
                           long ldm)
    void mask_select_double(int nrows, int ncols, double *S, long lds, const double *M,
                            long ldm)
    void bwd_rows_f32(int nrows, int ncols, float *S, long lds, float *dP, long ldp,
                      const float *lse, const float *delta)
    void bwd_rows_f64(int nrows, int ncols, double *S, long lds, double *dP, long ldp,
                      const double *lse, const double *delta)
    void bwd_cols_f32(int nrows, int ncols, float *S, long lds, float *dP, long ldp,
                      const float *lse, const float *delta)
    void bwd_cols_f64(int nrows, int ncols, double *S, long lds, double *dP, long ldp,
                      const double *lse, const double *delta)
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


cdef struct Jagged:
    # Packed variable-length sequences (attn.varlen_attn, document_block_mask): per
    # sequence s its queries q0[s]..q1[s]-1 and used keys k0[s]..k1[s]-1 (global token
    # indices), and its band: query t sees key j when
    # t + diag[s] - left <= j <= t + diag[s] + right (left/right huge when unbounded).
    int nseq
    const long long *q0
    const long long *q1
    const long long *k0
    const long long *k1
    const long long *diag
    long long left, right
    const int *items                 # (n_items, 2): (sequence, q tile), costliest first
    long n_items
    const int *kv_items              # (n_kv, 2): (sequence, kv tile)
    long n_kv
    const int *seq_items             # (n_seq_items,): sequences, costliest first (fused)
    long n_seq_items


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
    int fwd_group                    # q tiles per forward item (1..FWD_GROUP_MAX)
    int jagged                       # 1: tiles per sequence from jg, not block lists
    Jagged jg


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

    Returns the tensor's own memory when its rows are already that (adjacent rows,
    width a multiple of ATTN_PAD: the common case, no copy); otherwise copies the rows
    into scratch, zero-filling the padding columns. Rows further apart (varlen's packed
    (tokens, heads, D), a transposed view) are copied too: a GEMM that streams them as
    its B operand would otherwise read rows 1 KiB apart, which share a sixteenth of
    L1's sets (bench/NOTES.md C1)."""
    cdef real *src = row_ptr(dummy, t, b, h, l0)
    cdef int r, c
    if t.s[3] == 1 and width == width_p and t.s[2] == width_p:
        ld[0] = t.s[2]
        return src
    for r in range(n):
        if t.s[3] == 1:
            memcpy(scratch + <size_t>r * width_p, src + r * t.s[2],
                   <size_t>width * sizeof(real))
        else:
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


cdef inline void gemm_rs(int M, int N, int K, const real *A, long a_rs, long a_cs,
                         const real *Bm, long ldb, real *C, long ldc,
                         const real *rscale) noexcept nogil:
    if real is float:
        gemm_rs_float(M, N, K, A, a_rs, a_cs, Bm, ldb, C, ldc, rscale)
    else:
        gemm_rs_double(M, N, K, A, a_rs, a_cs, Bm, ldb, C, ldc, rscale)


cdef inline long long clampll(long long x, long long lo, long long hi) noexcept nogil:
    return lo if x < lo else (hi if x > hi else x)


cdef inline void apply_window(real *S, long ld, int q_major, long long q0, int nq,
                              long long k0, int nk, long long diag, long long left,
                              long long right) noexcept nogil:
    """The band of a jagged sequence on a partial tile: query t sees key j when
    t + diag - left <= j <= t + diag + right (left/right huge when unbounded). Both
    edges are contiguous runs per row in either layout, so they are filled, not tested
    per element. q_major: S[r, c] is (query q0 + r, key k0 + c); else (key k0 + r,
    query q0 + c)."""
    cdef int r, lo, hi
    if q_major:
        for r in range(nq):
            lo = <int>clampll(q0 + r + diag - left - k0, 0, nk)
            hi = <int>clampll(q0 + r + diag + right - k0 + 1, lo, nk)
            fill_ninf(S + r * ld, lo)
            fill_ninf(S + r * ld + hi, nk - hi)
    else:
        for r in range(nk):
            lo = <int>clampll(k0 + r - diag - right - q0, 0, nq)
            hi = <int>clampll(k0 + r - diag + left - q0 + 1, lo, nq)
            fill_ninf(S + r * ld, lo)
            fill_ninf(S + r * ld + hi, nq - hi)


# How a (q tile, kv tile) pair is masked: nothing (a full block), by the block-list
# problem's rules (causal, attention mask, mask_mod: a partial block), or by the band
# of its jagged sequence.
cdef enum:
    PAIR_FULL = 0
    PAIR_PARTIAL = 1
    PAIR_BAND = 2


cdef inline void mask_pair(real *dummy, Problem *p, real *S, long ld, int q_major, long b,
                           long h, int q0, int nq, int k0, int nk, int mode,
                           long long diag) noexcept nogil:
    if mode == PAIR_PARTIAL:
        apply_mask(dummy, p, S, ld, q_major, b, h, q0, nq, k0, nk)
    elif mode == PAIR_BAND:
        apply_window(S, ld, q_major, q0, nq, k0, nk, diag, p.jg.left, p.jg.right)


cdef inline int visible_keys(real *dummy, Problem *p, long b, long h, int q0, int mq,
                             int k0, int nk, int mode, long long diag, real *Mt,
                             int *lo, int *hi) noexcept nogil:
    """Rows lo..hi-1 of a kv tile (keys k0 + r) that some query of the q tile may see;
    the other rows are masked for every query, so a tile computed without them gives
    the same result bitwise (their P is exactly 0: no term of the softmax sums or of the
    products, and acc, l, m unchanged). Returns 1 when Mt holds the tile's mask_mod
    (0 visible, -inf hidden; S^T layout), which the caller then applies."""
    lo[0] = 0
    hi[0] = nk
    if mode == PAIR_BAND:
        # The union of consecutive queries' bands is one interval (widths >= 1).
        lo[0] = <int>clampll(<long long>q0 + diag - p.jg.left - k0, 0, nk)
        hi[0] = <int>clampll(<long long>q0 + mq + diag + p.jg.right - k0, lo[0], nk)
        return 0
    if mode != PAIR_PARTIAL or p.mask_kind != MASK_NONE:
        return 0
    if p.mod_mask == NULL:
        if p.causal:
            # Top-left causal: keys past the last query are hidden.
            hi[0] = max(0, min(nk, q0 + mq - k0))
        return 0
    if p.causal:
        return 0
    # A mask_mod: evaluate it once on a tile of zeros, then trim its hidden key rows.
    memset(Mt, 0, <size_t>nk * p.BMp * sizeof(real))
    if real is float:
        (<tile_f32>p.mod_mask)(b, h, q0, mq, k0, nk, Mt, p.BMp, 0, p.mask_bufs)
    else:
        (<tile_f64>p.mod_mask)(b, h, q0, mq, k0, nk, Mt, p.BMp, 0, p.mask_bufs)
    if real is float:
        mask_rows_float(nk, mq, Mt, p.BMp, lo, hi)
    else:
        mask_rows_double(nk, mq, Mt, p.BMp, lo, hi)
    return 1


cdef inline void scores_rows(real *dummy, Problem *p, long b, long h, int q0, int mq,
                             int k0, int nk, int mode, long long diag, const real *Qt,
                             real *St, long lds, int nc, const real *Kr, long ldk,
                             real *G, const real *Msel) noexcept nogil:
    """S^T (keys x queries, leading dimension lds; G likewise) of the nk keys from k0,
    whose rows (padded to Dp) are Kr / ldk, against a q block whose Q^T, times the
    softmax scale, is Qt; the first nc (a multiple of ATTN_PAD, >= mq) query columns;
    score_mod, then the mask: Msel (the evaluated mask_mod rows of these keys, leading
    dimension BMp) when given, else as `mode` says."""
    # Broadcast K, vectors of Q^T.
    gemm(nk, nc, p.D, Kr, ldk, 1, Qt, p.BMp, St, lds, 0)
    if p.mod_score != NULL:
        apply_score_mod(dummy, p, St, G, lds, 0, b, h, q0, mq, k0, nk)
    if Msel != NULL:
        # The mask as evaluated: hidden elements become -inf, whatever score_mod gave.
        if real is float:
            mask_select_float(nk, nc, St, lds, Msel, p.BMp)
        else:
            mask_select_double(nk, nc, St, lds, Msel, p.BMp)
    else:
        mask_pair(dummy, p, St, lds, 0, b, h, q0, mq, k0, nk, mode, diag)


cdef inline int scores_t(real *dummy, Problem *p, long b, long h, long hk, int q0,
                         int mq, int *k0, int nk, int mode, long long diag,
                         const real *Qt, real *St, real *Ks, const real **Kr, long *ldk,
                         real *G, real *Mt) noexcept nogil:
    """The dQ pass's scores: S^T of the nk keys from k0[0] (scores_rows). Key rows that
    no query of the block sees are left out (visible_keys): k0[0] moves to the first
    kept key and the kept count is returned (0: nothing to do). The forward keeps the
    same rows and makes the same products (fwd_step), so the dQ pass reproduces its
    scores bitwise. Leaves the K rows (padded to Dp, for a later dS K) in Kr / ldk."""
    cdef int lo, hi
    cdef int pre = visible_keys(dummy, p, b, h, q0, mq, k0[0], nk, mode, diag, Mt, &lo,
                                &hi)
    if hi <= lo:
        return 0
    k0[0] += lo
    nk = hi - lo
    Kr[0] = rows_or_pack(dummy, &p.k, b, hk, k0[0], nk, p.D, p.Dp, Ks, ldk)
    scores_rows(dummy, p, b, h, q0, mq, k0[0], nk, mode, diag, Qt, St, p.BMp, p.BMp,
                Kr[0], ldk[0], G, Mt + <size_t>lo * p.BMp if pre else NULL)
    return nk


# ----------------------------------------------------------------- jagged tile ranges
# A jagged problem's q tiles start at their sequence's first query and its kv tiles
# at the sequence's first key, so no tile straddles two sequences; each item finds
# the tiles it meets from the offsets and the band (no block lists).

cdef inline void jg_q_tile(Problem *p, int s, int t, int *q0, int *mq) noexcept nogil:
    q0[0] = <int>(p.jg.q0[s] + <long long>t * p.BM)
    mq[0] = <int>min(<long long>p.BM, p.jg.q1[s] - q0[0])


cdef inline void jg_kv_tile(Problem *p, int s, int u, int *k0, int *nk) noexcept nogil:
    k0[0] = <int>(p.jg.k0[s] + <long long>u * p.BN)
    nk[0] = <int>min(<long long>p.BN, p.jg.k1[s] - k0[0])


cdef inline int jg_kv_range(Problem *p, int s, int q0, int mq, int *u0,
                            int *u1) noexcept nogil:
    """kv tiles u0..u1-1 of sequence s that queries q0..q0+mq-1 see. Queries whose own
    key range is empty are dropped first; the ranges of the others shift by one per
    query and have width >= 1, so their union is one interval."""
    cdef long long c = p.jg.diag[s], k0 = p.jg.k0[s], k1 = p.jg.k1[s]
    cdef long long a = max(<long long>q0, k0 - c - p.jg.right)
    cdef long long z = min(<long long>q0 + mq - 1, k1 - 1 - c + p.jg.left)
    cdef long long lo, hi
    u0[0] = 0
    u1[0] = 0
    if a > z:
        return 0
    lo = max(k0, a + c - p.jg.left)
    hi = min(k1 - 1, z + c + p.jg.right)
    if lo > hi:
        return 0
    u0[0] = <int>((lo - k0) // p.BN)
    u1[0] = <int>((hi - k0) // p.BN + 1)
    return 1


cdef inline int jg_q_range(Problem *p, int s, int k0, int nk, int *t0,
                           int *t1) noexcept nogil:
    """q tiles t0..t1-1 of sequence s whose queries see some key of k0..k0+nk-1 (the
    union over those keys of the queries that see them is one interval, as above)."""
    cdef long long c = p.jg.diag[s], q0 = p.jg.q0[s], q1 = p.jg.q1[s]
    cdef long long lo = max(q0, <long long>k0 - c - p.jg.right)
    cdef long long hi = min(q1 - 1, <long long>k0 + nk - 1 - c + p.jg.left)
    t0[0] = 0
    t1[0] = 0
    if lo > hi:
        return 0
    t0[0] = <int>((lo - q0) // p.BM)
    t1[0] = <int>((hi - q0) // p.BM + 1)
    return 1


cdef inline int jg_pair_mode(Problem *p, int s, int q0, int mq, int k0,
                             int nk) noexcept nogil:
    """PAIR_FULL when every query of the tile sees every key of the tile."""
    cdef long long c = p.jg.diag[s]
    if (<long long>k0 >= <long long>q0 + mq - 1 + c - p.jg.left
            and <long long>k0 + nk - 1 <= <long long>q0 + c + p.jg.right):
        return PAIR_FULL
    return PAIR_BAND


# ----------------------------------------------------------------------------- forward
# A forward item is a group of up to FWD_GROUP_MAX q tiles of one (batch, head), run in
# lockstep: every kv tile is fetched once and met by each q tile of the group in turn,
# so it is read from L3 (and packed, when its rows are strided) once per group instead
# of once per q tile; the other q tiles find it in L1/L2. Each q tile still sees its
# own kv tiles in its own order (full, then partial, as listed; or ascending along its
# sequence), so its out and lse are bitwise those of a group of one.

cdef enum:
    FWD_GROUP_MAX = 4


cdef struct KVCache:
    # The K and V rows of the last two kv tiles an item used, packed row-major with
    # padded widths (only for a tensor whose rows are not already so: strided, as the
    # packed (tokens, heads, D) layout of varlen_attn, or of a width that is not a
    # multiple of ATTN_PAD). Two slots: the q tiles of a group whose lists are shifted
    # by one tile (a sliding window spanning two mask blocks) alternate between two.
    int k0[2]                        # first key of the tile in each slot (-1: empty)
    int have[2]                      # bit 1: K packed, bit 2: V packed
    int last                         # slot used most recently
    int pack_k, pack_v               # whether K / V rows are packed at all


cdef inline int rows_need_pack(Tensor4 *t, int width, int width_p) noexcept nogil:
    return not (t.s[3] == 1 and width == width_p and t.s[2] == width_p)


cdef inline int fwd_lds(Problem *p) noexcept nogil:
    """Leading dimension of the forward's S^T tile: one vector row more than BMp, so
    its rows are not a power of two apart (64 floats = 256 B): the P V product reads a
    column strip of S^T and of V per register block, and rows 256 B apart fall into a
    quarter of L1's sets, where the two strips evict each other (bench/NOTES.md C1)."""
    return p.BMp + ATTN_PAD


cdef inline size_t fwd_state_elems(Problem *p) noexcept nogil:
    # One q tile's state: Q^T (scaled), acc, m_i, l_i.
    return <size_t>p.D * p.BMp + <size_t>p.BMp * p.Dvp + 2 * <size_t>p.BMp


cdef size_t fwd_scratch_elems(Problem *p) noexcept nogil:
    return (<size_t>p.BN * fwd_lds(p)       # S^T
            + <size_t>p.BN * p.BMp          # mask_mod tile (visible_keys)
            + <size_t>p.BMp                 # alpha
            + 2 * <size_t>p.BN * p.Dp       # K slots
            + 2 * <size_t>p.BN * p.Dvp      # V slots
            + <size_t>p.fwd_group * fwd_state_elems(p))


cdef inline real *fwd_kslot(Problem *p, real *scratch, int s) noexcept nogil:
    return (scratch + <size_t>p.BN * (fwd_lds(p) + p.BMp) + p.BMp
            + <size_t>s * p.BN * p.Dp)


cdef inline real *fwd_vslot(Problem *p, real *scratch, int s) noexcept nogil:
    return fwd_kslot(p, scratch, 2) + <size_t>s * p.BN * p.Dvp


cdef inline real *fwd_state(Problem *p, real *scratch, int g) noexcept nogil:
    return fwd_vslot(p, scratch, 2) + <size_t>g * fwd_state_elems(p)


cdef inline void kv_cache_init(Problem *p, KVCache *c) noexcept nogil:
    c.k0[0] = -1
    c.k0[1] = -1
    c.have[0] = 0
    c.have[1] = 0
    c.last = 0
    c.pack_k = rows_need_pack(&p.k, p.D, p.Dp)
    c.pack_v = rows_need_pack(&p.v, p.Dv, p.Dvp)


cdef inline const real *fwd_kv(real *dummy, Problem *p, int is_v, long b, long hk, int k0,
                               int nk, KVCache *c, real *scratch, long *ld) noexcept nogil:
    """Rows k0..k0+nk-1 (a whole kv tile) of K (is_v = 0) or V: the tensor's own memory
    when its rows are already row-major with padded width, else a packed copy made
    once per item and tile (KVCache)."""
    cdef Tensor4 *t = &p.v if is_v else &p.k
    cdef int width = p.Dv if is_v else p.D
    cdef int width_p = p.Dvp if is_v else p.Dp
    cdef int bit = 2 if is_v else 1
    cdef int s, r, col
    cdef real *dst
    cdef real *src
    if not (c.pack_v if is_v else c.pack_k):
        ld[0] = t.s[2]
        return row_ptr(dummy, t, b, hk, k0)
    if c.k0[0] == k0:
        s = 0
    elif c.k0[1] == k0:
        s = 1
    else:
        s = 1 - c.last
        c.k0[s] = k0
        c.have[s] = 0
    c.last = s
    dst = fwd_vslot(p, scratch, s) if is_v else fwd_kslot(p, scratch, s)
    ld[0] = width_p
    if not (c.have[s] & bit):
        src = row_ptr(dummy, t, b, hk, k0)
        for r in range(nk):
            if t.s[3] == 1:
                memcpy(dst + <size_t>r * width_p, src + r * t.s[2],
                       <size_t>width * sizeof(real))
            else:
                for col in range(width):
                    dst[<size_t>r * width_p + col] = src[r * t.s[2] + col * t.s[3]]
            for col in range(width, width_p):
                dst[<size_t>r * width_p + col] = 0
        c.have[s] |= bit
    return dst


cdef inline void fwd_begin(real *dummy, Problem *p, long b, long h, int q0, int mq,
                           real *state) noexcept nogil:
    cdef int BMp = p.BMp
    cdef real *Qt = state
    cdef real *acc = Qt + <size_t>p.D * BMp
    cdef real *m_i = acc + <size_t>BMp * p.Dvp
    cdef real *l_i = m_i + BMp
    cdef int c
    # Q^T scaled once per q block; every kv block reuses it.
    pack_transposed(dummy, &p.q, b, h, q0, mq, p.D, BMp, <real>p.scale, Qt)
    for c in range(BMp):
        m_i[c] = -INFINITY
        l_i[c] = 0
    memset(acc, 0, <size_t>BMp * p.Dvp * sizeof(real))


cdef inline void fwd_step(real *dummy, Problem *p, long b, long h, long hk, int q0, int mq,
                          int k0, int nk, int mode, long long diag, real *state,
                          real *scratch, KVCache *c) noexcept nogil:
    """One kv tile (k0, nk) of one q tile's online softmax: scores of the keys some
    query of the tile sees (visible_keys; the dQ pass's scores_t keeps the same rows),
    new maxima and sums, acc rescaled and P V added. Only the first pad(mq) query
    columns are computed: a short last q tile (a sequence's, or L not a multiple of
    BLOCK_M) leaves the rest out, whose columns no output reads; every column is
    computed on its own, so the kept ones are bitwise unchanged."""
    cdef int BMp = p.BMp
    cdef int nc = pad(mq)
    cdef int lds = fwd_lds(p)
    cdef real *St = scratch
    cdef real *Mt = St + <size_t>p.BN * lds
    cdef real *alpha = Mt + <size_t>p.BN * BMp
    cdef real *Qt = state
    cdef real *acc = Qt + <size_t>p.D * BMp
    cdef real *m_i = acc + <size_t>BMp * p.Dvp
    cdef real *l_i = m_i + BMp
    cdef long ldk, ldv
    cdef const real *Kr
    cdef const real *Vr
    cdef int lo, hi, n
    cdef int pre = visible_keys(dummy, p, b, h, q0, mq, k0, nk, mode, diag, Mt, &lo, &hi)
    if hi <= lo:
        # Every score of the tile is hidden: P = 0, alpha = 1 (or 0 on a column that
        # has seen nothing, whose acc and l are 0): the state stays as it is.
        return
    n = hi - lo
    Kr = fwd_kv(dummy, p, 0, b, hk, k0, nk, c, scratch, &ldk)
    scores_rows(dummy, p, b, h, q0, mq, k0 + lo, n, mode, diag, Qt, St, lds, nc,
                Kr + lo * ldk, ldk, NULL, Mt + <size_t>lo * BMp if pre else NULL)
    if real is float:
        softmax_cols_f32(n, nc, St, lds, m_i, l_i, alpha)
    else:
        softmax_cols_f64(n, nc, St, lds, m_i, l_i, alpha)
    Vr = fwd_kv(dummy, p, 1, b, hk, k0, nk, c, scratch, &ldv)
    # acc (queries x Dv) = alpha * acc + P V, P read as the transpose of the S^T tile;
    # the rescale by alpha happens as the product loads acc.
    gemm_rs(mq, p.Dvp, n, St, 1, lds, Vr + lo * ldv, ldv, acc, p.Dvp, alpha)


cdef inline void fwd_end(real *dummy, Problem *p, long b, long h, int q0, int mq,
                         real *state) noexcept nogil:
    cdef int BMp = p.BMp
    cdef real *acc = state + <size_t>p.D * BMp
    cdef real *m_i = acc + <size_t>BMp * p.Dvp
    cdef real *l_i = m_i + BMp
    cdef real *lse = <real *>p.lse
    cdef real *orow
    cdef real inv
    cdef int c, r
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


cdef void fwd_item(real *dummy, Problem *p, long item, real *scratch) noexcept nogil:
    """q tiles i0..i0+ng-1 (a group) of one (batch, head) of a block-list problem: out
    and lse for their queries. The group walks its tiles' lists in lockstep: step t
    runs the t-th listed block of each tile (full blocks first, then partial ones: a
    fixed order per tile keeps results bitwise reproducible whatever the thread count
    and group size). q tiles of one mask block have the same lists, so each block is
    met by the whole group at one step."""
    cdef int G = p.fwd_group
    cdef long ngr = (p.nqb + G - 1) // G
    # Within a (batch, head) the last q tiles are handed out first: under a causal
    # mask they see the most keys, and the cheap first ones even out the threads' ends.
    cdef long r = ngr - 1 - item % ngr
    cdef long h = (item // ngr) % p.Hq
    cdef long b = item // (ngr * p.Hq)
    cdef long hk = h // p.group
    cdef int i0 = <int>(r * G)
    cdef int ng = min(G, p.nqb - i0)
    cdef int nf[4]
    cdef int nall[4]
    cdef int g, t, i, j, k0, q0, mode
    cdef int tmax = 0
    cdef KVCache c
    kv_cache_init(p, &c)
    for g in range(ng):
        i = i0 + g
        q0 = i * p.BM
        fwd_begin(dummy, p, b, h, q0, min(p.BM, p.Lq - q0), fwd_state(p, scratch, g))
        nf[g] = blocks_count(&p.kv_full, b, h, i)
        nall[g] = nf[g] + blocks_count(&p.kv_part, b, h, i)
        tmax = max(tmax, nall[g])
    for t in range(tmax):
        for g in range(ng):
            if t >= nall[g]:
                continue
            i = i0 + g
            if t < nf[g]:
                j = blocks_at(&p.kv_full, b, h, i, t)
                mode = PAIR_FULL
            else:
                j = blocks_at(&p.kv_part, b, h, i, t - nf[g])
                mode = PAIR_PARTIAL
            k0 = j * p.BN
            q0 = i * p.BM
            fwd_step(dummy, p, b, h, hk, q0, min(p.BM, p.Lq - q0), k0,
                     min(p.BN, p.Lk - k0), mode, 0, fwd_state(p, scratch, g), scratch, &c)
    for g in range(ng):
        q0 = (i0 + g) * p.BM
        fwd_end(dummy, p, b, h, q0, min(p.BM, p.Lq - q0), fwd_state(p, scratch, g))


cdef void fwd_item_jagged(real *dummy, Problem *p, long item, real *scratch) noexcept nogil:
    """One (batch, head, sequence, group of q tiles) of a jagged problem: the forward's
    item list is built at fwd_group * BLOCK_M queries per entry, each split here into
    BLOCK_M tiles starting at the sequence's first query (the same tiles as a group of
    one). The group walks its sequence's kv tiles in ascending order, each q tile taking
    those of its own range. The items of one (batch, head) run in the order of the
    launcher's list (by sequence, costliest first)."""
    cdef long bh = item // p.jg.n_items
    cdef long it = item % p.jg.n_items
    cdef long b = bh // p.Hq
    cdef long h = bh % p.Hq
    cdef long hk = h // p.group
    cdef int s = p.jg.items[2 * it]
    cdef int T = p.jg.items[2 * it + 1]
    cdef int q0s[4]
    cdef int mqs[4]
    cdef int u0s[4]
    cdef int u1s[4]
    cdef int g, ng, u, k0, nk
    cdef int umin = 0x7fffffff
    cdef int umax = 0
    cdef KVCache c
    kv_cache_init(p, &c)
    ng = 0
    for g in range(p.fwd_group):
        jg_q_tile(p, s, T * p.fwd_group + g, &q0s[g], &mqs[g])
        if mqs[g] <= 0:
            break
        fwd_begin(dummy, p, b, h, q0s[g], mqs[g], fwd_state(p, scratch, g))
        if not jg_kv_range(p, s, q0s[g], mqs[g], &u0s[g], &u1s[g]):
            u0s[g] = 0
            u1s[g] = 0
        elif u0s[g] < u1s[g]:
            umin = min(umin, u0s[g])
            umax = max(umax, u1s[g])
        ng += 1
    for u in range(umin, umax):
        jg_kv_tile(p, s, u, &k0, &nk)
        for g in range(ng):
            if u0s[g] <= u < u1s[g]:
                fwd_step(dummy, p, b, h, hk, q0s[g], mqs[g], k0, nk,
                         jg_pair_mode(p, s, q0s[g], mqs[g], k0, nk), p.jg.diag[s],
                         fwd_state(p, scratch, g), scratch, &c)
    for g in range(ng):
        fwd_end(dummy, p, b, h, q0s[g], mqs[g], fwd_state(p, scratch, g))


cdef inline size_t round64(size_t n_elems, size_t itemsize) noexcept nogil:
    """Per-thread scratch stride in elements, rounded to a cache line so threads never
    share one."""
    return (n_elems * itemsize + 63) // 64 * 64 // itemsize


cdef void fwd_run(real *dummy, Problem *p, int nthreads, real *scratch) noexcept nogil:
    cdef size_t stride = round64(fwd_scratch_elems(p), sizeof(real))
    cdef long n_items
    cdef long item
    if p.jagged:
        n_items = <long>p.B * p.Hq * p.jg.n_items
        for item in prange(n_items, schedule='dynamic', num_threads=nthreads):
            fwd_item_jagged(dummy, p, item, scratch + threadid() * stride)
    else:
        n_items = <long>p.B * p.Hq * ((p.nqb + p.fwd_group - 1) // p.fwd_group)
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
            + 2 * <size_t>p.BMp            # lse, delta of the q block
            + <size_t>p.BMp * p.BNp)       # mask_mod tile (visible_pairs)


cdef inline void kv_begin(real *dummy, Problem *p, long b, long hk, int k0, int nk,
                          int fuse_dq, real *scratch, const real **Kr,
                          long *ldk) noexcept nogil:
    """Packs K^T and V^T of the kv tile (and its K rows for a fused dQ) and zeroes its
    dK / dV rows."""
    cdef int BNp = p.BNp
    cdef real *Kt = scratch
    cdef real *Vt = Kt + <size_t>p.D * BNp
    cdef real *Ks = Vt + <size_t>p.Dv * BNp
    pack_transposed(dummy, &p.k, b, hk, k0, nk, p.D, BNp, 1, Kt)
    pack_transposed(dummy, &p.v, b, hk, k0, nk, p.Dv, BNp, 1, Vt)
    Kr[0] = NULL
    ldk[0] = 0
    if fuse_dq:
        Kr[0] = rows_or_pack(dummy, &p.k, b, hk, k0, nk, p.D, p.Dp, Ks, ldk)
    memset(<real *>p.dk + ((b * p.Hkv + hk) * p.Lk + k0) * <long>p.Dp, 0,
           <size_t>nk * p.Dp * sizeof(real))
    memset(<real *>p.dv + ((b * p.Hkv + hk) * p.Lk + k0) * <long>p.Dvp, 0,
           <size_t>nk * p.Dvp * sizeof(real))


cdef inline int visible_pairs(real *dummy, Problem *p, long b, long h, int q0, int mq,
                              int k0, int nk, int mode, long long diag, real *M,
                              int *i_lo, int *i_hi, int *j_lo, int *j_hi) noexcept nogil:
    """The kv pass's visible_keys: query rows i_lo..i_hi-1 and key columns
    j_lo..j_hi-1 of a (q tile, kv tile) pair that can hold a visible element; a row or
    column outside has P = 0 everywhere, so it adds exactly nothing to dV, dK or dQ.
    Returns 1 when M holds the tile's mask_mod (q-major, 0 visible, -inf hidden)."""
    cdef long long lo, hi
    i_lo[0] = 0
    i_hi[0] = mq
    j_lo[0] = 0
    j_hi[0] = nk
    if mode == PAIR_BAND:
        # Queries that see a key of the tile, keys that a query of the tile sees: each
        # a union of shifted bands of width >= 1, so one interval.
        lo = clampll(<long long>k0 - diag - p.jg.right - q0, 0, mq)
        hi = clampll(<long long>k0 + nk - 1 - diag + p.jg.left - q0 + 1, lo, mq)
        i_lo[0], i_hi[0] = <int>lo, <int>hi
        lo = clampll(<long long>q0 + diag - p.jg.left - k0, 0, nk)
        hi = clampll(<long long>q0 + mq + diag + p.jg.right - k0, lo, nk)
        j_lo[0], j_hi[0] = <int>lo, <int>hi
        return 0
    if mode != PAIR_PARTIAL or p.mask_kind != MASK_NONE:
        return 0
    if p.mod_mask == NULL:
        if p.causal:
            # Top-left causal: query q0 + r sees keys <= q0 + r.
            i_lo[0] = max(0, min(mq, k0 - q0))
            j_hi[0] = max(0, min(nk, q0 + mq - k0))
        return 0
    if p.causal:
        return 0
    memset(M, 0, <size_t>mq * p.BNp * sizeof(real))
    if real is float:
        (<tile_f32>p.mod_mask)(b, h, q0, mq, k0, nk, M, p.BNp, 1, p.mask_bufs)
        mask_rows_float(mq, nk, M, p.BNp, i_lo, i_hi)
        mask_cols_float(mq, p.BNp, M, p.BNp, j_lo, j_hi)
    else:
        (<tile_f64>p.mod_mask)(b, h, q0, mq, k0, nk, M, p.BNp, 1, p.mask_bufs)
        mask_rows_double(mq, nk, M, p.BNp, i_lo, i_hi)
        mask_cols_double(mq, p.BNp, M, p.BNp, j_lo, j_hi)
    # Columns past nk were not evaluated (their zeros are not "visible").
    j_hi[0] = min(j_hi[0], nk)
    j_lo[0] = min(j_lo[0], j_hi[0])
    return 1


cdef inline void kv_pair(real *dummy, Problem *p, long b, long h, long hk, int q0, int mq,
                         int k0, int nk, int mode, long long diag, int fuse_dq,
                         const real *Kr, long ldk, real *scratch) noexcept nogil:
    """One q tile's contribution to the dK / dV of a kv tile (kv_begin packed it), and
    with fuse_dq its share of dQ (race-free only when one item owns every kv tile its
    q tiles see). Only the rows and columns visible_pairs keeps are computed (the key
    columns from a multiple of ATTN_PAD, so the products keep whole vectors)."""
    cdef int BNp = p.BNp
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
    cdef real *M = dl + p.BMp
    cdef real *lse = <real *>p.lse
    cdef real *delta = <real *>p.delta
    cdef real *dK
    cdef real *dV
    cdef real *dQ
    cdef const real *Qr
    cdef const real *dOr
    cdef long ldq, ldo, row
    cdef int r, i0, i1, j0, j1, N
    cdef int pre = visible_pairs(dummy, p, b, h, q0, mq, k0, nk, mode, diag, M, &i0, &i1,
                                 &j0, &j1)
    if i1 <= i0 or j1 <= j0:
        return
    # Keep whole vectors: the key columns start on a multiple of ATTN_PAD; the extra
    # columns are hidden (masked below) or padding, as in an untrimmed tile.
    j0 = j0 // ATTN_PAD * ATTN_PAD
    N = pad(j1 - j0)
    q0 += i0
    mq = i1 - i0
    k0 += j0
    nk = min(nk - j0, N)
    row = (b * p.Hq + h) * p.Lq + q0
    dK = <real *>p.dk + ((b * p.Hkv + hk) * p.Lk + k0) * <long>p.Dp
    dV = <real *>p.dv + ((b * p.Hkv + hk) * p.Lk + k0) * <long>p.Dvp
    for r in range(mq):
        lr[r] = lse_for_bwd(lse[row + r])
        dl[r] = delta[row + r]
    Qr = rows_or_pack(dummy, &p.q, b, h, q0, mq, p.D, p.Dp, Qs, &ldq)
    pack_rows(dummy, &p.q, b, h, q0, mq, p.D, <real>p.scale, Qsc)
    dOr = rows_or_pack(dummy, &p.do, b, h, q0, mq, p.Dv, p.Dvp, dOs, &ldo)
    # S = Q K^T * scale (queries x keys), dP = dO V^T.
    gemm(mq, N, p.D, Qsc, p.D, 1, Kt + j0, BNp, S, BNp, 0)
    if p.mod_score != NULL:
        apply_score_mod(dummy, p, S, G, BNp, 1, b, h, q0, mq, k0, nk)
    if pre:
        if real is float:
            mask_select_float(mq, N, S, BNp, M + <size_t>i0 * BNp + j0, BNp)
        else:
            mask_select_double(mq, N, S, BNp, M + <size_t>i0 * BNp + j0, BNp)
    else:
        mask_pair(dummy, p, S, BNp, 1, b, h, q0, mq, k0, nk, mode, diag)
    gemm(mq, N, p.Dv, dOr, ldo, 1, Vt + j0, BNp, dP, BNp, 0)
    if real is float:
        bwd_rows_f32(mq, N, S, BNp, dP, BNp, lr, dl)
    else:
        bwd_rows_f64(mq, N, S, BNp, dP, BNp, lr, dl)
    if p.mod_score != NULL:
        chain_score_grad(dP, G, BNp, mq, nk)
    # dV += P^T dO and dK += dS^T Q (unscaled; the launcher applies scale).
    gemm(nk, p.Dvp, mq, S, 1, BNp, dOr, ldo, dV, p.Dvp, 1)
    gemm(nk, p.Dp, mq, dP, 1, BNp, Qr, ldq, dK, p.Dp, 1)
    if fuse_dq:
        dQ = <real *>p.dq + row * <long>p.Dp
        gemm(mq, p.Dp, nk, dP, BNp, 1, Kr + <size_t>j0 * ldk, ldk, dQ, p.Dp, 1)


cdef void kv_item(real *dummy, Problem *p, long b, long hk, int j, int fuse_dq,
                  real *scratch) noexcept nogil:
    """dK and dV of one kv block of a block-list problem (accumulated over the q heads
    of its GQA group and over the q blocks that see it)."""
    cdef int k0 = j * p.BN
    cdef int nk = min(p.BN, p.Lk - k0)
    cdef const real *Kr
    cdef long ldk
    cdef int g, which, n, t, i, q0
    cdef long h
    cdef Blocks *bl
    kv_begin(dummy, p, b, hk, k0, nk, fuse_dq, scratch, &Kr, &ldk)
    for g in range(p.group):
        h = hk * p.group + g
        for which in range(2):
            bl = &p.q_full if which == 0 else &p.q_part
            n = blocks_count(bl, b, h, j)
            for t in range(n):
                i = blocks_at(bl, b, h, j, t)
                q0 = i * p.BM
                kv_pair(dummy, p, b, h, hk, q0, min(p.BM, p.Lq - q0), k0, nk,
                        PAIR_PARTIAL if which == 1 else PAIR_FULL, 0, fuse_dq, Kr, ldk,
                        scratch)


cdef void kv_item_jagged(real *dummy, Problem *p, long b, long hk, int s, int u,
                         int fuse_dq, real *scratch) noexcept nogil:
    """dK and dV of kv tile u of jagged sequence s (q tiles of s only)."""
    cdef int k0, nk, q0, mq, g, t, t0, t1
    cdef const real *Kr
    cdef long ldk
    cdef long h
    jg_kv_tile(p, s, u, &k0, &nk)
    kv_begin(dummy, p, b, hk, k0, nk, fuse_dq, scratch, &Kr, &ldk)
    if not jg_q_range(p, s, k0, nk, &t0, &t1):
        return
    for g in range(p.group):
        h = hk * p.group + g
        for t in range(t0, t1):
            jg_q_tile(p, s, t, &q0, &mq)
            kv_pair(dummy, p, b, h, hk, q0, mq, k0, nk, jg_pair_mode(p, s, q0, mq, k0, nk),
                    p.jg.diag[s], fuse_dq, Kr, ldk, scratch)


cdef size_t q_scratch_elems(Problem *p) noexcept nogil:
    return (<size_t>p.D * p.BMp            # Q^T
            + <size_t>p.Dv * p.BMp         # dO^T
            + <size_t>p.BN * p.Dp          # packed K rows
            + <size_t>p.BN * p.Dvp         # packed V rows
            + 3 * <size_t>p.BN * p.BMp     # S^T / P^T, dP^T / dS^T, d score_mod / d S
            + 2 * <size_t>p.BMp            # lse, delta columns
            + <size_t>p.BN * p.BMp)        # mask_mod tile (visible_keys)


cdef inline void q_begin(real *dummy, Problem *p, long b, long h, int q0, int mq,
                         real *scratch) noexcept nogil:
    cdef int BMp = p.BMp
    cdef real *Qt = scratch
    cdef real *dOt = Qt + <size_t>p.D * BMp
    cdef real *lc = dOt + <size_t>p.Dv * BMp + <size_t>p.BN * (p.Dp + p.Dvp + 3 * BMp)
    cdef real *dl = lc + BMp
    cdef long row = (b * p.Hq + h) * p.Lq + q0
    cdef real *lse = <real *>p.lse
    cdef real *delta = <real *>p.delta
    cdef int c
    # Q^T scaled exactly as the forward packs it: the scores are bitwise the forward's,
    # so P is consistent with the saved lse.
    pack_transposed(dummy, &p.q, b, h, q0, mq, p.D, BMp, <real>p.scale, Qt)
    pack_transposed(dummy, &p.do, b, h, q0, mq, p.Dv, BMp, 1, dOt)
    for c in range(BMp):
        if c < mq:
            lc[c] = lse_for_bwd(lse[row + c])
            dl[c] = delta[row + c]
        else:
            lc[c] = INFINITY
            dl[c] = 0
    memset(<real *>p.dq + row * <long>p.Dp, 0, <size_t>mq * p.Dp * sizeof(real))


cdef inline void q_pair(real *dummy, Problem *p, long b, long h, long hk, int q0, int mq,
                        int k0, int nk, int mode, long long diag,
                        real *scratch) noexcept nogil:
    """dQ of a q tile (q_begin packed it) += dS K over one kv tile, recomputing P and
    dS from the saved lse."""
    cdef int BMp = p.BMp
    cdef real *Qt = scratch
    cdef real *dOt = Qt + <size_t>p.D * BMp
    cdef real *Ks = dOt + <size_t>p.Dv * BMp
    cdef real *Vs = Ks + <size_t>p.BN * p.Dp
    cdef real *St = Vs + <size_t>p.BN * p.Dvp
    cdef real *dPt = St + <size_t>p.BN * BMp
    cdef real *Gt = dPt + <size_t>p.BN * BMp
    cdef real *lc = Gt + <size_t>p.BN * BMp
    cdef real *dl = lc + BMp
    cdef real *Mt = dl + BMp
    cdef real *dQ = <real *>p.dq + ((b * p.Hq + h) * p.Lq + q0) * <long>p.Dp
    cdef const real *Kr
    cdef const real *Vr
    cdef long ldk, ldv
    nk = scores_t(dummy, p, b, h, hk, q0, mq, &k0, nk, mode, diag, Qt, St, Ks, &Kr, &ldk,
                  Gt, Mt)
    if nk == 0:
        return  # P = 0 on the whole tile: no share of dQ
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


cdef void q_item(real *dummy, Problem *p, long item, real *scratch) noexcept nogil:
    """dQ of one (batch, head, q block) of a block-list problem."""
    cdef long i = item % p.nqb
    cdef long h = (item // p.nqb) % p.Hq
    cdef long b = item // (<long>p.nqb * p.Hq)
    cdef long hk = h // p.group
    cdef int q0 = i * p.BM
    cdef int mq = min(p.BM, p.Lq - q0)
    cdef int which, n, t, j, k0
    cdef Blocks *bl
    q_begin(dummy, p, b, h, q0, mq, scratch)
    for which in range(2):
        bl = &p.kv_full if which == 0 else &p.kv_part
        n = blocks_count(bl, b, h, i)
        for t in range(n):
            j = blocks_at(bl, b, h, i, t)
            k0 = j * p.BN
            q_pair(dummy, p, b, h, hk, q0, mq, k0, min(p.BN, p.Lk - k0),
                   PAIR_PARTIAL if which == 1 else PAIR_FULL, 0, scratch)


cdef void q_item_jagged(real *dummy, Problem *p, long item, real *scratch) noexcept nogil:
    """dQ of one (batch, head, sequence, q tile) of a jagged problem."""
    cdef long bh = item // p.jg.n_items
    cdef long it = item % p.jg.n_items
    cdef long b = bh // p.Hq
    cdef long h = bh % p.Hq
    cdef long hk = h // p.group
    cdef int s = p.jg.items[2 * it]
    cdef int q0, mq, k0, nk, u, u0, u1
    jg_q_tile(p, s, p.jg.items[2 * it + 1], &q0, &mq)
    q_begin(dummy, p, b, h, q0, mq, scratch)
    if jg_kv_range(p, s, q0, mq, &u0, &u1):
        for u in range(u0, u1):
            jg_kv_tile(p, s, u, &k0, &nk)
            q_pair(dummy, p, b, h, hk, q0, mq, k0, nk, jg_pair_mode(p, s, q0, mq, k0, nk),
                   p.jg.diag[s], scratch)


cdef size_t bwd_scratch_elems(Problem *p) noexcept nogil:
    return max(kv_scratch_elems(p), q_scratch_elems(p))


cdef void bwd_run_jagged(real *dummy, Problem *p, int nthreads, int fused,
                         real *scratch) noexcept nogil:
    cdef size_t stride = round64(bwd_scratch_elems(p), sizeof(real))
    cdef long nbh = <long>p.B * p.Hkv
    cdef long item, it, bh
    cdef int s, u, u1
    if fused:
        # One item per (batch, kv head, sequence) owns every kv tile of its sequence,
        # and only that sequence's q tiles see them: dQ is added without races.
        for item in prange(nbh * p.jg.n_seq_items, schedule='dynamic',
                           num_threads=nthreads):
            it = item // nbh
            bh = item % nbh
            s = p.jg.seq_items[it]
            u1 = <int>((p.jg.k1[s] - p.jg.k0[s] + p.BN - 1) // p.BN)
            for u in range(u1):
                kv_item_jagged(dummy, p, bh // p.Hkv, bh % p.Hkv, s, u, 1,
                               scratch + threadid() * stride)
    else:
        for item in prange(nbh * p.jg.n_kv, schedule='dynamic', num_threads=nthreads):
            it = item % p.jg.n_kv
            bh = item // p.jg.n_kv
            kv_item_jagged(dummy, p, bh // p.Hkv, bh % p.Hkv, p.jg.kv_items[2 * it],
                           p.jg.kv_items[2 * it + 1], 0, scratch + threadid() * stride)
        for item in prange(<long>p.B * p.Hq * p.jg.n_items, schedule='dynamic',
                           num_threads=nthreads):
            q_item_jagged(dummy, p, item, scratch + threadid() * stride)


cdef void bwd_run(real *dummy, Problem *p, int nthreads, int fused,
                  real *scratch) noexcept nogil:
    cdef long n_kv = <long>p.B * p.Hkv * p.nkb
    cdef long n_heads = <long>p.B * p.Hkv
    cdef long n_q = <long>p.B * p.Hq * p.nqb
    cdef size_t stride = round64(bwd_scratch_elems(p), sizeof(real))
    cdef long item
    cdef int j
    if p.jagged:
        bwd_run_jagged(dummy, p, nthreads, fused, scratch)
    elif fused:
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
    p.fwd_group = min(max(<int>a.get("fwd_group", 1), 1), FWD_GROUP_MAX)
    # jagged: (nseq, (q0, q1, k0, k1, diag) int64 pointers, left, right,
    # (items ptr, n), (kv_items ptr, n), (seq_items ptr, n)); absent = block lists.
    jg = a.get("jagged")
    memset(&p.jg, 0, sizeof(Jagged))
    p.jagged = jg is not None
    if jg is not None:
        p.jg.nseq = jg[0]
        p.jg.q0 = <const long long *><size_t>jg[1][0]
        p.jg.q1 = <const long long *><size_t>jg[1][1]
        p.jg.k0 = <const long long *><size_t>jg[1][2]
        p.jg.k1 = <const long long *><size_t>jg[1][3]
        p.jg.diag = <const long long *><size_t>jg[1][4]
        p.jg.left, p.jg.right = jg[2], jg[3]
        p.jg.items = <const int *><size_t>jg[4][0]
        p.jg.n_items = jg[4][1]
        p.jg.kv_items = <const int *><size_t>jg[5][0]
        p.jg.n_kv = jg[5][1]
        p.jg.seq_items = <const int *><size_t>jg[6][0]
        p.jg.n_seq_items = jg[6][1]


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
