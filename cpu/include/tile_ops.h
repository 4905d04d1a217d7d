/*
 * Tile operations for the attn CPU kernels: a register-blocked GEMM micro-kernel
 * and the vectorised exp2 / softmax steps that the Cython loops in _kernels.pyx call
 * once per tile.
 *
 * Written with GCC/Clang vector extensions rather than intrinsics so that one source
 * compiles for every ISA: setup.py builds _kernels.pyx several times with different
 * -march flags (generic x86-64, x86-64-v3, x86-64-v4, optionally native) and
 * attn.cpu picks the best variant the running CPU supports. The vector width and the
 * register block follow the ISA the translation unit is compiled for.
 *
 * Every GEMM here is "broadcast A, vector B": C[m, n] += sum_k A[m, k] * B[k, n] with
 * B rows contiguous and N padded to a multiple of the vector width. The attention
 * kernels arrange their products so that this one form serves S = Q K^T, O += P V,
 * dV += P^T dO, dK += dS^T Q and dQ += dS K without transposing a tile per pair.
 */
#ifndef ATTN_TILE_OPS_H
#define ATTN_TILE_OPS_H

#include <math.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define ATTN_VBYTES 64
/* 32 zmm registers: 6 x 4 accumulators + 4 B vectors + 1 broadcast. */
#define ATTN_MR 6
#define ATTN_NV 4
#elif defined(__AVX__)
#define ATTN_VBYTES 32
/* 16 ymm registers: 6 x 2 accumulators + 2 B vectors + 1 broadcast. 16 columns per
 * block divide the 64-wide tiles (BLOCK_M, D = 64) exactly; the earlier 4 x 3 (24
 * columns) left a third of every 64-wide product to a 4 x 1 kernel with more loads
 * than FMAs. */
#define ATTN_MR 6
#define ATTN_NV 2
#else
#define ATTN_VBYTES 16
#define ATTN_MR 4
#define ATTN_NV 3
#endif

typedef float vf32 __attribute__((vector_size(ATTN_VBYTES)));
typedef double vf64 __attribute__((vector_size(ATTN_VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(ATTN_VBYTES)));
typedef int64_t vi64 __attribute__((vector_size(ATTN_VBYTES)));

#define ATTN_VW32 ((int)(ATTN_VBYTES / 4))
#define ATTN_VW64 ((int)(ATTN_VBYTES / 8))

/* Scratch rows are padded to this many elements so every row starts on a vector
 * boundary for both float and double. */
#define ATTN_PAD 16

#define ATTN_INLINE static inline __attribute__((always_inline))

#define ATTN_LOG2E_F 1.44269504088896341f

#ifdef _OPENMP
#define ATTN_OPENMP 1
#else
#define ATTN_OPENMP 0
#endif

/* Unaligned vector load/store: memcpy compiles to a single vmovups. */
#define ATTN_DEFINE_LDST(T, V)                                                     \
    ATTN_INLINE V ld_##V(const T *p) { V x; memcpy(&x, p, sizeof(V)); return x; }   \
    ATTN_INLINE void st_##V(T *p, V x) { memcpy(p, &x, sizeof(V)); }
ATTN_DEFINE_LDST(float, vf32)
ATTN_DEFINE_LDST(double, vf64)

/*
 * Micro-kernel: an mr x (nv vectors) block of C held in registers for the whole
 * k loop. Called with literal mr/nv so that, once inlined, the loops are fully
 * unrolled and the accumulator array lives in registers.
 *
 * The broadcast of A is written `a - 0`, not `0 + a`: x - (+0) == x for every x
 * (also -0), so the compiler emits a bare vbroadcastss; `0 + a` is not an identity
 * for a = -0 and costs a scalar add in the dependency chain of every broadcast
 * (Zen 3, AVX2, a 128x64x64 tile: 46 -> 65 GF/s; 84 with the 6 x 2 block below).
 *
 * rscale (optional, with accumulate): C row i is multiplied by rscale[i] when it is
 * loaded, which folds the online softmax's rescale of the accumulator (acc *= alpha)
 * into the P V product; the values are those of a separate pass followed by the
 * product (the same multiply, then the same FMAs).
 */
#define ATTN_DEFINE_UKERNEL(T, V, VW)                                               \
    ATTN_INLINE void ukernel_##T(int mr, int nv, int K, const T *A, long a_rs,       \
                                 long a_cs, const T *B, long ldb, T *C, long ldc,    \
                                 int accumulate, const T *rscale)                   \
    {                                                                              \
        V c[ATTN_MR][ATTN_NV];                                                     \
        for (int i = 0; i < mr; i++)                                               \
            for (int j = 0; j < nv; j++) {                                         \
                c[i][j] = accumulate ? ld_##V(C + i * ldc + j * VW) : (V){0};      \
                if (rscale) c[i][j] *= rscale[i];                                  \
            }                                                                      \
        for (int k = 0; k < K; k++) {                                              \
            const T *brow = B + (long)k * ldb;                                     \
            V b[ATTN_NV];                                                          \
            for (int j = 0; j < nv; j++) b[j] = ld_##V(brow + j * VW);             \
            const T *acol = A + (long)k * a_cs;                                    \
            for (int i = 0; i < mr; i++) {                                         \
                V a = acol[i * a_rs] - (V){0};                                     \
                for (int j = 0; j < nv; j++) c[i][j] += a * b[j];                  \
            }                                                                      \
        }                                                                          \
        for (int i = 0; i < mr; i++)                                               \
            for (int j = 0; j < nv; j++) st_##V(C + i * ldc + j * VW, c[i][j]);    \
    }                                                                              \
                                                                                   \
    /* C[M x N] (+)= A[M x K] B[K x N]; N a multiple of the vector width, B and C  \
     * rows contiguous with leading dimensions ldb/ldc; A addressed through        \
     * (a_rs, a_cs) so it may be a transposed view of a scratch tile. */           \
    ATTN_INLINE void gemm_impl_##T(int M, int N, int K, const T *A, long a_rs,      \
                                   long a_cs, const T *B, long ldb, T *C, long ldc, \
                                   int accumulate, const T *rscale)                 \
    {                                                                              \
        const int vw = VW, NR = ATTN_NV * VW;                                      \
        int m = 0;                                                                 \
        for (; m + ATTN_MR <= M; m += ATTN_MR) {                                   \
            const T *a = A + m * a_rs;                                             \
            T *cp = C + (long)m * ldc;                                             \
            const T *rs = rscale ? rscale + m : NULL;                              \
            int n = 0;                                                             \
            for (; n + NR <= N; n += NR)                                           \
                ukernel_##T(ATTN_MR, ATTN_NV, K, a, a_rs, a_cs, B + n, ldb, cp + n,  \
                            ldc, accumulate, rs);                                  \
            for (; n < N; n += VW)                                                 \
                ukernel_##T(ATTN_MR, 1, K, a, a_rs, a_cs, B + n, ldb, cp + n, ldc,  \
                            accumulate, rs);                                       \
        }                                                                          \
        if (m < M) {                                                               \
            /* Leftover rows: one literal-size kernel per count, so they too keep   \
             * their accumulators in registers. */                                 \
            const T *a = A + m * a_rs;                                             \
            T *cp = C + (long)m * ldc;                                             \
            const T *rs = rscale ? rscale + m : NULL;                              \
            switch (M - m) {                                                       \
            ATTN_TAIL_CASE(T, 1) ATTN_TAIL_CASE(T, 2) ATTN_TAIL_CASE(T, 3)         \
            ATTN_TAIL_CASE(T, 4) ATTN_TAIL_CASE(T, 5) ATTN_TAIL_CASE(T, 6)         \
            ATTN_TAIL_CASE(T, 7)                                                   \
            default: break;                                                        \
            }                                                                      \
        }                                                                          \
    }                                                                              \
    /* Every row block of the column block B, C .. + nv vectors (nv literal once    \
     * inlined). */                                                                \
    ATTN_INLINE void gemm_colblock_##T(int nv, int M, int K, const T *A, long a_rs, \
                                       long a_cs, const T *B, long ldb, T *C,       \
                                       long ldc, int accumulate, const T *rscale)   \
    {                                                                              \
        int m = 0;                                                                 \
        for (; m + ATTN_MR <= M; m += ATTN_MR)                                     \
            ukernel_##T(ATTN_MR, nv, K, A + m * a_rs, a_rs, a_cs, B, ldb,           \
                        C + (long)m * ldc, ldc, accumulate,                        \
                        rscale ? rscale + m : NULL);                               \
        const T *a = A + m * a_rs;                                                 \
        T *cp = C + (long)m * ldc;                                                 \
        const T *rs = rscale ? rscale + m : NULL;                                  \
        switch (M - m) {                                                           \
        ATTN_TAIL_COL(T, 1) ATTN_TAIL_COL(T, 2) ATTN_TAIL_COL(T, 3)                \
        ATTN_TAIL_COL(T, 4) ATTN_TAIL_COL(T, 5) ATTN_TAIL_COL(T, 6)                \
        ATTN_TAIL_COL(T, 7)                                                        \
        default: break;                                                            \
        }                                                                          \
    }                                                                              \
    static void gemm_##T(int M, int N, int K, const T *A, long a_rs, long a_cs,     \
                         const T *B, long ldb, T *C, long ldc, int accumulate)      \
    {                                                                              \
        gemm_impl_##T(M, N, K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate, NULL);    \
    }                                                                              \
    /* C = diag(rscale) C + A B: the forward's acc = alpha * acc + P V. Column      \
     * blocks outside, row blocks inside (gemm_impl nests them the other way): a    \
     * column strip of B (V, BLOCK_N rows of one cache line each) then stays in L1   \
     * while every row block passes over it, and A (the S^T tile read transposed) is \
     * re-read per strip instead: fewer L2 reads when B has more rows than A has     \
     * columns' lines (bench/NOTES.md C1). Each element of C gets the same products \
     * in the same order either way. */                                            \
    static void gemm_rs_##T(int M, int N, int K, const T *A, long a_rs, long a_cs,  \
                            const T *B, long ldb, T *C, long ldc, const T *rscale)  \
    {                                                                              \
        const int NR = ATTN_NV * VW;                                               \
        int n = 0;                                                                 \
        for (; n + NR <= N; n += NR)                                               \
            gemm_colblock_##T(ATTN_NV, M, K, A, a_rs, a_cs, B + n, ldb, C + n, ldc, \
                              1, rscale);                                          \
        for (; n < N; n += VW)                                                     \
            gemm_colblock_##T(1, M, K, A, a_rs, a_cs, B + n, ldb, C + n, ldc, 1,    \
                              rscale);                                             \
    }

/* Rows left over after the MR-row blocks (case count < ATTN_MR, never more than 7). */
#define ATTN_TAIL_CASE(T, R)                                                       \
    case R:                                                                        \
        if (R < ATTN_MR) {                                                         \
            int n = 0;                                                             \
            for (; n + NR <= N; n += NR)                                           \
                ukernel_##T(R < ATTN_MR ? R : 1, ATTN_NV, K, a, a_rs, a_cs, B + n,  \
                            ldb, cp + n, ldc, accumulate, rs);                     \
            for (; n < N; n += vw)                                                 \
                ukernel_##T(R < ATTN_MR ? R : 1, 1, K, a, a_rs, a_cs, B + n, ldb,   \
                            cp + n, ldc, accumulate, rs);                          \
        }                                                                          \
        break;

/* The same for one column block (gemm_colblock: nv vectors wide). */
#define ATTN_TAIL_COL(T, R)                                                        \
    case R:                                                                        \
        if (R < ATTN_MR)                                                           \
            ukernel_##T(R < ATTN_MR ? R : 1, nv, K, a, a_rs, a_cs, B, ldb, cp, ldc, \
                        accumulate, rs);                                           \
        break;

ATTN_DEFINE_UKERNEL(float, vf32, ATTN_VW32)
ATTN_DEFINE_UKERNEL(double, vf64, ATTN_VW64)

/*
 * exp2 for a vector of floats: 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2, and
 * 2^f from its degree-6 Taylor series in f*ln2 (truncation error < 2e-7 relative,
 * about one float ulp). Inputs below -126 (including -inf) give exactly 0, which the
 * online softmax relies on for masked scores. Inputs are <= 0 in every caller
 * (scores minus their running maximum), so overflow needs no handling.
 */
ATTN_INLINE vf32 vexp2_f32(vf32 x)
{
    const vf32 lo = (vf32){0} - 126.0f;
    /* Lanes below -126 (or -inf, NaN) compute garbage (NaN for -inf) that the final
     * mask turns into exactly 0: no clamp of x is needed. */
    vi32 keep = x >= lo;
    const vf32 magic = (vf32){0} + 12582912.0f;       /* 1.5 * 2^23: round to nearest */
    vf32 t = x + magic;
    vf32 n = t - magic;
    vf32 f = x - n;
    /* t's bits are those of magic plus n (|n| < 2^22 where kept), and magic's low 9
     * bits are zero, so bits(t) << 23 is n << 23: no float-to-int conversion. */
    vi32 ni = (vi32)t;
    const float c1 = 0.693147180559945f, c2 = 0.240226506959101f,
                c3 = 0.0555041086648216f, c4 = 0.00961812910762848f,
                c5 = 0.00133335581464284f, c6 = 0.000154035303933816f;
    vf32 p = c6 * f + c5;
    p = p * f + c4;
    p = p * f + c3;
    p = p * f + c2;
    p = p * f + c1;
    p = p * f + 1.0f;
    vi32 bits = (vi32)p + ((ni) << 23);
    return (vf32)(bits & keep);
}

/* Scalar twin of vexp2_f32 for tails and per-row factors (same formula, same
 * rounding, so a value never depends on whether it fell in a vector or a tail). */
ATTN_INLINE float exp2_f32(float x)
{
    if (!(x >= -126.0f)) return 0.0f;
    float n = (x + 12582912.0f) - 12582912.0f;
    float f = x - n;
    int32_t ni = (int32_t)n;
    const float c1 = 0.693147180559945f, c2 = 0.240226506959101f,
                c3 = 0.0555041086648216f, c4 = 0.00961812910762848f,
                c5 = 0.00133335581464284f, c6 = 0.000154035303933816f;
    float p = c6 * f + c5;
    p = p * f + c4;
    p = p * f + c3;
    p = p * f + c2;
    p = p * f + c1;
    p = p * f + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += ni << 23;
    memcpy(&p, &bits, 4);
    return p;
}


/*
 * Row-wise exponentials used by the forward pass, whose score tile is stored kv-major
 * (S^T, one row per key, one column per query). For every column c:
 *     m_new[c] = max(m[c], max_r S[r, c])
 *     S[r, c]  = exp(S[r, c] - m_new[c])          (the probabilities P^T)
 *     alpha[c] = exp(m[c] - m_new[c])              (rescale of the old state)
 *     l[c]     = alpha[c] * l[c] + sum_r S[r, c]
 * Scores stay in natural-log units and exp(x) is computed as exp2(x * log2 e) on the
 * difference x, which is small where P matters: the rounding of that product is
 * relative to x, not to |S|. (Scaling the scores themselves by log2 e would make the
 * saved natural-log lse inexact in log2 units, an error of |S| * eps in every P of the
 * backward.)
 * A column whose maximum is still -inf (no visible key yet) subtracts 0 instead, so it
 * gets P = 0 and alpha = 1 rather than exp2(-inf - -inf) = NaN.
 * ncols is a multiple of the vector width (scratch is padded).
 */
ATTN_INLINE vf32 vmax_f32(vf32 a, vf32 b)
{
    /* a where a > b, else b (NaN or equal zeros give b): exactly the rule of the
     * x86 max instruction, which the compiler does not infer from the select. */
#if defined(__AVX512F__) && ATTN_VBYTES == 64
    return (vf32)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
    return (vf32)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE__)
    return (vf32)_mm_max_ps((__m128)a, (__m128)b);
#else
    vi32 gt = a > b;
    return (vf32)(((vi32)a & gt) | ((vi32)b & ~gt));
#endif
}

/* The columns c .. c + G vectors of softmax_cols_f32; G literal, so once inlined the
 * G running maxima and sums live in registers and the rows are walked in memory
 * order with G independent dependency chains (the exp pass is throughput-bound, not
 * latency-bound on one accumulator). */
ATTN_INLINE void softmax_cols_group_f32(int G, int nrows, float *S, long lds, int c,
                                        float *m, float *l, float *alpha)
{
    const vf32 ninf = (vf32){0} - INFINITY;
    vf32 mx[4], base[4], sum[4];
    for (int g = 0; g < G; g++) mx[g] = ld_vf32(m + c + g * ATTN_VW32);
    for (int r = 0; r < nrows; r++)
        for (int g = 0; g < G; g++)
            mx[g] = vmax_f32(ld_vf32(S + r * lds + c + g * ATTN_VW32), mx[g]);
    for (int g = 0; g < G; g++) {
        vf32 mold = ld_vf32(m + c + g * ATTN_VW32);
        vi32 dead = mx[g] == ninf;
        base[g] = (vf32)((vi32)mx[g] & ~dead);
        st_vf32(alpha + c + g * ATTN_VW32, vexp2_f32((mold - base[g]) * ATTN_LOG2E_F));
        st_vf32(m + c + g * ATTN_VW32, mx[g]);
        sum[g] = (vf32){0};
    }
    for (int r = 0; r < nrows; r++)
        for (int g = 0; g < G; g++) {
            float *s = S + r * lds + c + g * ATTN_VW32;
            vf32 p = vexp2_f32((ld_vf32(s) - base[g]) * ATTN_LOG2E_F);
            st_vf32(s, p);
            sum[g] += p;
        }
    for (int g = 0; g < G; g++) {
        float *lp = l + c + g * ATTN_VW32;
        st_vf32(lp, ld_vf32(alpha + c + g * ATTN_VW32) * ld_vf32(lp) + sum[g]);
    }
}

static void softmax_cols_f32(int nrows, int ncols, float *S, long lds, float *m,
                             float *l, float *alpha)
{
    int c = 0;
    for (; c + 4 * ATTN_VW32 <= ncols; c += 4 * ATTN_VW32)
        softmax_cols_group_f32(4, nrows, S, lds, c, m, l, alpha);
    for (; c < ncols; c += ATTN_VW32)
        softmax_cols_group_f32(1, nrows, S, lds, c, m, l, alpha);
}

static void softmax_cols_f64(int nrows, int ncols, double *S, long lds, double *m,
                             double *l, double *alpha)
{
    for (int c = 0; c < ncols; c++) {
        double mx = m[c];
        for (int r = 0; r < nrows; r++)
            if (S[r * lds + c] > mx) mx = S[r * lds + c];
        double base = (mx == -INFINITY) ? 0.0 : mx;
        double a = exp(m[c] - base);
        double sum = 0.0;
        for (int r = 0; r < nrows; r++) {
            double p = exp(S[r * lds + c] - base);
            S[r * lds + c] = p;
            sum += p;
        }
        m[c] = mx;
        alpha[c] = a;
        l[c] = a * l[c] + sum;
    }
}

/*
 * Backward probabilities and score gradients for a tile laid out with one row per
 * query (the kv-block pass): with the scores S computed bitwise as the forward computed
 * them,
 *     P[r, c]  = exp(S[r, c] - lse[r])
 *     dS[r, c] = P[r, c] * (dP[r, c] - delta[r])
 * written in place (S becomes P, dP becomes dS). Where the forward's lse is exactly
 * its running maximum (a peaked row), P is exactly 1, as in PyTorch. A row whose lse
 * is -inf saw no key: the caller passes +inf, so P = 0.
 */
static void bwd_rows_f32(int nrows, int ncols, float *S, long lds, float *dP, long ldp,
                         const float *lse, const float *delta)
{
    for (int r = 0; r < nrows; r++) {
        vf32 L = (vf32){0} + lse[r];
        vf32 D = (vf32){0} + delta[r];
        float *s = S + r * lds, *dp = dP + r * ldp;
        for (int c = 0; c < ncols; c += ATTN_VW32) {
            vf32 p = vexp2_f32((ld_vf32(s + c) - L) * ATTN_LOG2E_F);
            st_vf32(s + c, p);
            st_vf32(dp + c, p * (ld_vf32(dp + c) - D));
        }
    }
}

static void bwd_rows_f64(int nrows, int ncols, double *S, long lds, double *dP, long ldp,
                         const double *lse, const double *delta)
{
    for (int r = 0; r < nrows; r++) {
        double *s = S + r * lds, *dp = dP + r * ldp;
        for (int c = 0; c < ncols; c++) {
            double p = exp(s[c] - lse[r]);
            s[c] = p;
            dp[c] = p * (dp[c] - delta[r]);
        }
    }
}

/* The same for a tile with one column per query (the q-block pass computing dQ). */
static void bwd_cols_f32(int nrows, int ncols, float *S, long lds, float *dP, long ldp,
                         const float *lse, const float *delta)
{
    for (int r = 0; r < nrows; r++) {
        float *s = S + r * lds, *dp = dP + r * ldp;
        for (int c = 0; c < ncols; c += ATTN_VW32) {
            vf32 p = vexp2_f32((ld_vf32(s + c) - ld_vf32(lse + c)) * ATTN_LOG2E_F);
            st_vf32(s + c, p);
            st_vf32(dp + c, p * (ld_vf32(dp + c) - ld_vf32(delta + c)));
        }
    }
}

static void bwd_cols_f64(int nrows, int ncols, double *S, long lds, double *dP, long ldp,
                         const double *lse, const double *delta)
{
    for (int r = 0; r < nrows; r++) {
        double *s = S + r * lds, *dp = dP + r * ldp;
        for (int c = 0; c < ncols; c++) {
            double p = exp(s[c] - lse[c]);
            s[c] = p;
            dp[c] = p * (dp[c] - delta[c]);
        }
    }
}

/*
 * A mask_mod evaluated on a tile of zeros (0 visible, -inf hidden), rows = keys,
 * columns = queries (S^T layout). mask_rows: the first and one-past-last row with a
 * visible element among the first nq columns (lo == hi: none). mask_select: S becomes
 * -inf where M is hidden, unchanged elsewhere (a select, not an add, so a score_mod
 * value of inf or NaN at a hidden position cannot leak); ncols a multiple of the
 * vector width.
 */
#define ATTN_DEFINE_MASK_TILE(T, V, VI, VW)                                         \
    ATTN_INLINE int mask_row_seen_##T(const T *m, int nq)                          \
    {                                                                              \
        int c = 0;                                                                 \
        VI any = (VI){0};                                                          \
        for (; c + VW <= nq; c += VW) any |= (VI)(ld_##V(m + c) == (V){0});        \
        for (int i = 0; i < VW; i++)                                               \
            if (any[i]) return 1;                                                  \
        for (; c < nq; c++)                                                        \
            if (m[c] == 0) return 1;                                               \
        return 0;                                                                  \
    }                                                                              \
    static void mask_rows_##T(int nrows, int nq, const T *M, long ld, int *lo,      \
                              int *hi)                                             \
    {                                                                              \
        int a = 0, b = nrows;                                                      \
        while (a < b && !mask_row_seen_##T(M + (long)a * ld, nq)) a++;             \
        while (b > a && !mask_row_seen_##T(M + (long)(b - 1) * ld, nq)) b--;       \
        *lo = a;                                                                   \
        *hi = b;                                                                   \
    }                                                                              \
    /* The same for the columns of an nrows x ncols tile (ncols a multiple of the   \
     * vector width): first and one-past-last column visible in some row. */       \
    static void mask_cols_##T(int nrows, int ncols, const T *M, long ld, int *lo,   \
                              int *hi)                                             \
    {                                                                              \
        int a = ncols, b = 0;                                                      \
        for (int c = 0; c < ncols; c += VW) {                                      \
            VI any = (VI){0};                                                      \
            for (int r = 0; r < nrows; r++)                                        \
                any |= (VI)(ld_##V(M + (long)r * ld + c) == (V){0});               \
            for (int i = 0; i < VW; i++)                                           \
                if (any[i]) {                                                      \
                    if (c + i < a) a = c + i;                                      \
                    b = c + i + 1;                                                 \
                }                                                                  \
        }                                                                          \
        *lo = a < b ? a : 0;                                                       \
        *hi = a < b ? b : 0;                                                       \
    }                                                                              \
    static void mask_select_##T(int nrows, int ncols, T *S, long lds, const T *M,   \
                                long ldm)                                          \
    {                                                                              \
        for (int r = 0; r < nrows; r++)                                            \
            for (int c = 0; c < ncols; c += VW) {                                  \
                V m = ld_##V(M + r * ldm + c), s = ld_##V(S + r * lds + c);        \
                VI keep = (VI)(m == (V){0});                                       \
                st_##V(S + r * lds + c, (V)(((VI)s & keep) | ((VI)m & ~keep)));    \
            }                                                                      \
    }
ATTN_DEFINE_MASK_TILE(float, vf32, vi32, ATTN_VW32)
ATTN_DEFINE_MASK_TILE(double, vf64, vi64, ATTN_VW64)

#endif
