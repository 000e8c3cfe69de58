/* The exact engine's C kernel: the integers of nacrith/exact/reference.py, faster.
 *
 * docs/exact-engine.md is the specification; reference.py is its numpy form. Every value
 * here is an integer and every operation exact integer arithmetic, so the results do not
 * depend on the compiler, the CPU's vector instructions or the thread count: three paths
 * (scalar C, AVX2, AVX-512 VNNI, chosen at run time) compute the same integers, and threads
 * only split rows, streams and heads between them.
 *
 * Matrix products. A matrix's weights are stored as bytes w + 128 (0..255), packed by
 * tiles of 16 rows and 4 columns: tile (b, k4) holds rows 16b..16b+15, columns 4k4..4k4+3,
 * row by row (64 bytes). An activation x (|x| <= 8191) is split into lo = x & 127 (0..127)
 * and hi = x >> 7 (-64..63), so that x = 128 hi + lo. The VNNI path multiplies the weight
 * bytes (unsigned) by lo and hi (signed) with vpdpbusd and subtracts 128 * sum(x); the AVX2
 * path multiplies lo and hi + 64 (unsigned) by the weights (signed, w + 128 xor 128) with
 * vpmaddubsw (no pair exceeds 2 * 127 * 127, so nothing saturates) and subtracts
 * 8192 * sum(w). Both give sum_i w_i x_i exactly. Attention reuses the same tile product:
 * keys are "rows" and a head's query the activation; for values, dimensions are the rows,
 * cells the columns and the attention weights the activation.
 *
 * The functions are called through ctypes (which releases the GIL); the module's Python
 * init function exists only so that the build can treat this file as an extension.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

#define F 14
#define ACT_BITS 13
#define KV_BITS 7
#define PROB_BITS 14
#define SCORE_BITS 16
#define PROB_MAX ((1 << PROB_BITS) - 1)
#define SCORE_LIMIT ((int64_t)1 << 47)
#define LOG2E 1549082005LL
#define INT32_MAX_ ((int64_t)2147483647)
#define SIGMOID_RANGE 16384
#define TILE 16 /* rows per packed tile */
#define MAX_GROUP 16 /* query heads per key-value head handled in one pass */

enum { SIMD_SCALAR = 0, SIMD_AVX2 = 1, SIMD_VNNI = 2 };

typedef struct {
    int64_t n_in, n_out;   /* n_in: a multiple of 4 (zero columns); n_out: a multiple of 16 (zero rows) */
    const uint8_t *w;      /* packed, + 128 */
    const int64_t *rowsum; /* sum of each row's weights */
    const int64_t *m, *e;  /* row scale m * 2^-e */
} xmat;

typedef struct {
    xmat qkv, o, gateup, down;
    const int64_t *attn_gain, *ffn_gain;
    int64_t attn_bits, ffn_bits;
} xlayer;

typedef struct {
    int64_t n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, n_rot, n_vocab;
    int64_t eps_m, eps_e, kq;
    const xlayer *layers;
    const int8_t *embd_q;
    const int64_t *embd_m, *embd_e;
    xmat output;
    const int64_t *out_gain;
    int64_t out_bits;
    const int64_t *exp2, *sigmoid;
} xmodel;

/* --- integer primitives (reference.py's) --------------------------------------------- */

static inline int64_t rnd64(int64_t v, int64_t s) {
    if (s > 0) {
        if (s > 63) s = 63;
        return (v >> s) + ((v >> (s - 1)) & 1);
    }
    int64_t l = -s > 62 ? 62 : -s;
    int64_t limit = (int64_t)1 << (62 - l);
    if (v >= limit) return (int64_t)1 << 62;
    if (v < -limit) return -((int64_t)1 << 62);
    return (int64_t)((uint64_t)v << l);
}

static inline int64_t sat32(int64_t v) { return v > INT32_MAX_ ? INT32_MAX_ : (v < -INT32_MAX_ ? -INT32_MAX_ : v); }
static inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
static inline int64_t bitlen(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

static int64_t isqrt64(int64_t v) {
    int64_t r = (int64_t)sqrt((double)v);  /* an estimate; the corrections make it exact */
    while (r > 0 && r * r > v) r--;
    while ((r + 1) * (r + 1) <= v) r++;
    return r;
}

/* reference.quantize of one vector: q ~ v / 2^t with |q| <= 2^bits - 1; returns t */
static int64_t quant_shift(const int64_t *v, int64_t n, int64_t bits) {
    uint64_t largest = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t a = (uint64_t)(v[i] < 0 ? -v[i] : v[i]);
        largest = a > largest ? a : largest;
    }
    return largest ? bitlen(largest) - bits : 0;
}

static inline int64_t quant_one(int64_t v, int64_t t, int64_t bits) {
    int64_t limit = ((int64_t)1 << bits) - 1;
    return clamp64(rnd64(v, t), -limit, limit);
}

/* reference.rms_scale: the row's inverse RMS as c * 2^k, c in (2^14, 2^15] */
static void rms_scale(const int32_t *x, int64_t n, int64_t eps_m, int64_t eps_e, int64_t *c, int64_t *k) {
    uint64_t largest = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t a = (uint64_t)(x[i] < 0 ? -(int64_t)x[i] : x[i]);
        largest = a > largest ? a : largest;
    }
    int64_t sh = bitlen(largest) - 24;
    sh = sh > 0 ? sh : 0;
    int64_t s = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t xs = (int64_t)x[i] >> sh;
        s += xs * xs;
    }
    int64_t d = s + rnd64(eps_m * n, -(eps_e + 2 * F) + 2 * sh);
    if (d == 0) {
        *c = 0;
        *k = 0;
        return;
    }
    int64_t u = (62 - bitlen((uint64_t)d)) / 2;
    int64_t j = (d << (2 * u)) / n;
    int64_t r = isqrt64(j);
    int64_t b = bitlen((uint64_t)r);
    *c = ((int64_t)1 << (14 + b)) / r;
    *k = u + F - sh - 14 - b;
}

/* --- the tile product -------------------------------------------------------------------
 * For 16 rows (a packed tile column at w, k4 steps of kstride bytes) and S activation
 * vectors (lo[s], hi[s], 4 * k4 bytes each): out_lo[s][r] = sum_k W[r][k] * lo[s][k] and
 * out_hi likewise, where W is the stored byte (VNNI and scalar: unsigned w + 128) or the
 * signed weight (AVX2, whose hi is hi + 64). The epilogues turn them into exact sums. */

typedef void (*tile_fn)(const uint8_t *w, int64_t k4, int64_t kstride, int64_t S, const int8_t *const *lo, const int8_t *const *hi,
                        int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]);

static void tile_scalar(const uint8_t *w, int64_t k4, int64_t kstride, int64_t S, const int8_t *const *lo, const int8_t *const *hi,
                        int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {
    for (int64_t s = 0; s < S; s++) {
        int32_t al[TILE] = {0}, ah[TILE] = {0};
        for (int64_t q = 0; q < k4; q++) {
            const uint8_t *t = w + q * kstride;
            const int8_t *l = lo[s] + 4 * q, *h = hi[s] + 4 * q;
            for (int r = 0; r < TILE; r++) {
                int32_t sl = 0, shh = 0;
                for (int j = 0; j < 4; j++) {
                    sl += (int32_t)t[4 * r + j] * l[j];
                    shh += (int32_t)t[4 * r + j] * h[j];
                }
                al[r] += sl;
                ah[r] += shh;
            }
        }
        memcpy(out_lo[s], al, sizeof al);
        memcpy(out_hi[s], ah, sizeof ah);
    }
}

#if X86
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define AVX2_TARGET __attribute__((target("avx2,fma")))

/* S accumulators pairs in registers: S is a constant in each instance below */
#define VNNI_TILE(S_)                                                                                                          \
    VNNI_TARGET static void tile_vnni_##S_(const uint8_t *w, int64_t k4, int64_t kstride, const int8_t *const *lo,             \
                                            const int8_t *const *hi, int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {       \
        __m512i al[S_], ah[S_];                                                                                                \
        for (int s = 0; s < S_; s++) al[s] = ah[s] = _mm512_setzero_si512();                                                   \
        for (int64_t q = 0; q < k4; q++) {                                                                                     \
            __m512i t = _mm512_loadu_si512((const void *)(w + q * kstride));                                                   \
            for (int s = 0; s < S_; s++) {                                                                                     \
                int32_t bl, bh;                                                                                                \
                memcpy(&bl, lo[s] + 4 * q, 4);                                                                                 \
                memcpy(&bh, hi[s] + 4 * q, 4);                                                                                 \
                al[s] = _mm512_dpbusd_epi32(al[s], t, _mm512_set1_epi32(bl));                                                  \
                ah[s] = _mm512_dpbusd_epi32(ah[s], t, _mm512_set1_epi32(bh));                                                  \
            }                                                                                                                  \
        }                                                                                                                      \
        for (int s = 0; s < S_; s++) {                                                                                         \
            _mm512_storeu_si512((void *)out_lo[s], al[s]);                                                                     \
            _mm512_storeu_si512((void *)out_hi[s], ah[s]);                                                                     \
        }                                                                                                                      \
    }
VNNI_TILE(1)
VNNI_TILE(2)
VNNI_TILE(3)
VNNI_TILE(4)
VNNI_TILE(5)
VNNI_TILE(6)
VNNI_TILE(7)
VNNI_TILE(8)

static void tile_vnni(const uint8_t *w, int64_t k4, int64_t kstride, int64_t S, const int8_t *const *lo, const int8_t *const *hi,
                      int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {
    static void (*const by_count[])(const uint8_t *, int64_t, int64_t, const int8_t *const *, const int8_t *const *, int32_t (*)[TILE],
                                    int32_t (*)[TILE]) = {0, tile_vnni_1, tile_vnni_2, tile_vnni_3, tile_vnni_4, tile_vnni_5, tile_vnni_6,
                                                          tile_vnni_7, tile_vnni_8};
    for (int64_t s = 0; s < S; s += 8) {
        int64_t count = S - s < 8 ? S - s : 8;
        by_count[count](w, k4, kstride, lo + s, hi + s, out_lo + s, out_hi + s);
    }
}

#define AVX2_TILE(S_)                                                                                                          \
    AVX2_TARGET static void tile_avx2_##S_(const uint8_t *w, int64_t k4, int64_t kstride, const int8_t *const *lo,             \
                                            const int8_t *const *hi, int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {       \
        __m256i al[S_][2], ah[S_][2];                                                                                          \
        const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);                                         \
        for (int s = 0; s < S_; s++) al[s][0] = al[s][1] = ah[s][0] = ah[s][1] = _mm256_setzero_si256();                       \
        for (int64_t q = 0; q < k4; q++) {                                                                                     \
            __m256i t0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + q * kstride)), flip);                       \
            __m256i t1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + q * kstride + 32)), flip);                  \
            for (int s = 0; s < S_; s++) {                                                                                     \
                int32_t bl, bh;                                                                                                \
                memcpy(&bl, lo[s] + 4 * q, 4);                                                                                 \
                memcpy(&bh, hi[s] + 4 * q, 4);                                                                                 \
                __m256i vl = _mm256_set1_epi32(bl), vh = _mm256_set1_epi32(bh);                                                \
                al[s][0] = _mm256_add_epi32(al[s][0], _mm256_madd_epi16(_mm256_maddubs_epi16(vl, t0), ones));                  \
                al[s][1] = _mm256_add_epi32(al[s][1], _mm256_madd_epi16(_mm256_maddubs_epi16(vl, t1), ones));                  \
                ah[s][0] = _mm256_add_epi32(ah[s][0], _mm256_madd_epi16(_mm256_maddubs_epi16(vh, t0), ones));                  \
                ah[s][1] = _mm256_add_epi32(ah[s][1], _mm256_madd_epi16(_mm256_maddubs_epi16(vh, t1), ones));                  \
            }                                                                                                                  \
        }                                                                                                                      \
        for (int s = 0; s < S_; s++) {                                                                                         \
            _mm256_storeu_si256((__m256i *)out_lo[s], al[s][0]);                                                               \
            _mm256_storeu_si256((__m256i *)(out_lo[s] + 8), al[s][1]);                                                         \
            _mm256_storeu_si256((__m256i *)out_hi[s], ah[s][0]);                                                               \
            _mm256_storeu_si256((__m256i *)(out_hi[s] + 8), ah[s][1]);                                                         \
        }                                                                                                                      \
    }
AVX2_TILE(1)
AVX2_TILE(2)
AVX2_TILE(3)
AVX2_TILE(4)

static void tile_avx2(const uint8_t *w, int64_t k4, int64_t kstride, int64_t S, const int8_t *const *lo, const int8_t *const *hi,
                      int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {
    static void (*const by_count[])(const uint8_t *, int64_t, int64_t, const int8_t *const *, const int8_t *const *, int32_t (*)[TILE],
                                    int32_t (*)[TILE]) = {0, tile_avx2_1, tile_avx2_2, tile_avx2_3, tile_avx2_4};
    for (int64_t s = 0; s < S; s += 4) {
        int64_t count = S - s < 4 ? S - s : 4;
        by_count[count](w, k4, kstride, lo + s, hi + s, out_lo + s, out_hi + s);
    }
}
#endif

static tile_fn tile_for(int simd) {
#if X86
    if (simd == SIMD_VNNI) return tile_vnni;
    if (simd == SIMD_AVX2) return tile_avx2;
#endif
    (void)simd;
    return tile_scalar;
}

/* The exact sum of a tile entry: 128 hi + lo minus what the encoding added. For the VNNI
 * and scalar encodings (stored byte w + 128 times signed lo/hi): 128 * xsum; for AVX2
 * (signed w times lo and hi + hi_offset): 128 * hi_offset * rowsum. */
static inline int64_t exact_sum(int simd, int32_t lo, int32_t hi, int64_t xsum, int64_t rowsum, int64_t hi_offset) {
    int64_t value = 128 * (int64_t)hi + lo;
    return simd == SIMD_AVX2 ? value - 128 * hi_offset * rowsum : value - 128 * xsum;
}

/* --- activations ------------------------------------------------------------------------ */

/* One quantised activation vector: lo/hi bytes (hi + 64 for AVX2 when signed), its sum,
 * and its exponent. */
typedef struct {
    int8_t *lo, *hi;
    int64_t sum, k;
} act_t;

static void split_store(int simd, const int64_t *q, int64_t n, int64_t n_pad, act_t *a, int signed_values) {
    int64_t sum = 0, offset = (simd == SIMD_AVX2 && signed_values) ? 64 : 0;
    for (int64_t i = 0; i < n; i++) {
        sum += q[i];
        a->lo[i] = (int8_t)(q[i] & 127);
        a->hi[i] = (int8_t)((q[i] >> 7) + offset);
    }
    for (int64_t i = n; i < n_pad; i++) {
        a->lo[i] = 0;
        a->hi[i] = (int8_t)offset;
    }
    a->sum = sum;
}

/* --- the context ------------------------------------------------------------------------- */

typedef struct xctx xctx;
typedef void (*phase_fn)(xctx *, int64_t tid);

typedef struct {
    atomic_int count, generation, sleepers;
    int n;
} barrier_t;

struct xctx {
    const xmodel *M;
    int64_t n_streams, ctx, ctx_pad, threads, simd;
    const int64_t *cos, *sin; /* [ctx][n_rot / 2] */
    tile_fn tile;
    /* KV cache, per (stream, layer, kv head): keys packed like a matrix (cells are rows,
     * + 128), values [cell / 4][head_dim][4] (+ 128), and their exponents */
    uint8_t *keys, *values;
    int32_t *k_exp, *v_exp;
    /* per stream */
    int32_t *x, *y, *attn;
    int64_t *wide;       /* int64 scratch per stream: max(n_embd, n_ff) */
    int8_t *act_lo, *act_hi;
    int64_t *act_sum, *act_k;
    int64_t k_pad;       /* bytes per activation row */
    int64_t y_stride;
    /* per thread attention scratch */
    int64_t *scores;     /* [threads][MAX_GROUP][ctx_pad] */
    int8_t *wlo, *whi;   /* [threads][MAX_GROUP][ctx_pad] */
    int64_t *qbuf;       /* [threads][MAX_GROUP][head_dim] */
    int8_t *qlo, *qhi;   /* [threads][MAX_GROUP][head_dim] */
    /* the step being run */
    int64_t n, n_want, layer;
    const int32_t *tokens, *positions;
    const uint8_t *want;
    int32_t *logits;
    int64_t *want_index; /* stream -> row of logits, -1 */
    phase_fn phase;
    /* threads */
    pthread_t *workers;
    barrier_t barrier;
    atomic_int stop;
};

#define SPIN 4000

static void futex_wait(atomic_int *address, int value) {
#if defined(__linux__)
    syscall(SYS_futex, (int *)address, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
#else
    (void)address;
    (void)value;
    sched_yield();
#endif
}

static void futex_wake_all(atomic_int *address) {
#if defined(__linux__)
    syscall(SYS_futex, (int *)address, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
#else
    (void)address;
#endif
}

static inline void cpu_relax(void) {
#if X86
    _mm_pause();
#endif
}

/* Every thread waits here until all have come; short waits spin, long ones sleep (so
 * that a busy machine does not lose its cores to spinning). */
static void barrier_wait(barrier_t *b) {
    int generation = atomic_load(&b->generation);
    if (atomic_fetch_add(&b->count, 1) == b->n - 1) {
        atomic_store(&b->count, 0);
        atomic_fetch_add(&b->generation, 1);
        if (atomic_load(&b->sleepers))
            futex_wake_all(&b->generation);
        return;
    }
    for (int i = 0; i < SPIN; i++) {
        if (atomic_load(&b->generation) != generation)
            return;
        cpu_relax();
    }
    atomic_fetch_add(&b->sleepers, 1);
    while (atomic_load(&b->generation) == generation)
        futex_wait(&b->generation, generation);
    atomic_fetch_sub(&b->sleepers, 1);
}

static void split(int64_t total, int64_t tid, int64_t threads, int64_t *begin, int64_t *end) {
    *begin = total * tid / threads;
    *end = total * (tid + 1) / threads;
}

static size_t cache_cells(const xctx *c) { return (size_t)c->ctx_pad * (size_t)c->M->head_dim; }
static size_t cache_index(const xctx *c, int64_t s, int64_t layer, int64_t head) {
    return ((size_t)s * c->M->n_layer + layer) * c->M->n_head_kv + head;
}
static int8_t *row_lo(xctx *c, int64_t s) { return c->act_lo + s * c->k_pad; }
static int8_t *row_hi(xctx *c, int64_t s) { return c->act_hi + s * c->k_pad; }

/* --- matrix products --------------------------------------------------------------------- */

/* y[s][r] = sat32(rnd(acc * m_r, e_r - k_s - F)) for rows r in this thread's share and the
 * first n activation rows (rows of act: rowmap[s], or s), written at y + s * stride. */
static void matmul_part(xctx *c, const xmat *W, int64_t n, const int64_t *rowmap, int32_t *y, int64_t stride, int64_t tid) {
    int64_t blocks = W->n_out / TILE, b0, b1;
    split(blocks, tid, c->threads, &b0, &b1);
    int64_t k4 = W->n_in / 4;
    const int8_t *lo[8], *hi[8];
    int32_t out_lo[8][TILE], out_hi[8][TILE];
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *w = W->w + (size_t)b * k4 * 64;
        for (int64_t s0 = 0; s0 < n; s0 += 8) {
            int64_t S = n - s0 < 8 ? n - s0 : 8;
            for (int64_t s = 0; s < S; s++) {
                int64_t row = rowmap ? rowmap[s0 + s] : s0 + s;
                lo[s] = row_lo(c, row);
                hi[s] = row_hi(c, row);
            }
            c->tile(w, k4, 64, S, lo, hi, out_lo, out_hi);
            for (int64_t s = 0; s < S; s++) {
                int64_t row = rowmap ? rowmap[s0 + s] : s0 + s;
                int64_t xsum = c->act_sum[row], k = c->act_k[row];
                int32_t *out = y + (s0 + s) * stride + b * TILE;
                for (int r = 0; r < TILE; r++) {
                    int64_t i = b * TILE + r;
                    int64_t acc = exact_sum((int)c->simd, out_lo[s][r], out_hi[s][r], xsum, W->rowsum[i], 64);
                    out[r] = (int32_t)sat32(rnd64(acc * W->m[i], W->e[i] - k - F));
                }
            }
        }
    }
}

/* --- per-stream operations -------------------------------------------------------------------- */

/* act row s = the RMS-normalised x[s] times the gains, quantised */
static void norm_quantize(xctx *c, int64_t s, const int32_t *x, const int64_t *gain, int64_t gain_bits, int64_t act_row) {
    const xmodel *M = c->M;
    int64_t n = M->n_embd, cn, kn;
    rms_scale(x, n, M->eps_m, M->eps_e, &cn, &kn);
    int64_t *v = c->wide + s * c->k_pad;
    for (int64_t i = 0; i < n; i++)
        v[i] = (int64_t)x[i] * gain[i] * cn;
    int64_t t = quant_shift(v, n, ACT_BITS);
    for (int64_t i = 0; i < n; i++)
        v[i] = quant_one(v[i], t, ACT_BITS);
    act_t a = {row_lo(c, act_row), row_hi(c, act_row), 0, 0};
    split_store((int)c->simd, v, n, c->k_pad, &a, 1);
    c->act_sum[act_row] = a.sum;
    c->act_k[act_row] = t - F - gain_bits + kn;
}

/* act row s = the int values v (at `fraction` bits), quantised */
static void plain_quantize(xctx *c, int64_t s, int64_t *v, int64_t n, int64_t fraction) {
    int64_t t = quant_shift(v, n, ACT_BITS);
    for (int64_t i = 0; i < n; i++)
        v[i] = quant_one(v[i], t, ACT_BITS);
    act_t a = {row_lo(c, s), row_hi(c, s), 0, 0};
    split_store((int)c->simd, v, n, c->k_pad, &a, 1);
    c->act_sum[s] = a.sum;
    c->act_k[s] = t - fraction;
}

static void rope(int64_t *v, const int64_t *cos, const int64_t *sin, int64_t n_rot) {
    for (int64_t j = 0; j < n_rot / 2; j++) {
        int64_t a = v[2 * j], b = v[2 * j + 1];
        v[2 * j] = rnd64(a * cos[j] - b * sin[j], 30);
        v[2 * j + 1] = rnd64(a * sin[j] + b * cos[j], 30);
    }
}

/* --- the phases of a step ------------------------------------------------------------------ */

static void phase_embed_norm(xctx *c, int64_t tid) {
    const xmodel *M = c->M;
    int64_t s0, s1;
    split(c->n, tid, c->threads, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        int64_t token = c->tokens[s];
        int32_t *x = c->x + s * M->n_embd;
        const int8_t *q = M->embd_q + token * M->n_embd;
        for (int64_t i = 0; i < M->n_embd; i++)
            x[i] = (int32_t)sat32(rnd64((int64_t)q[i] * M->embd_m[token], M->embd_e[token] - F));
        norm_quantize(c, s, x, M->layers[0].attn_gain, M->layers[0].attn_bits, s);
    }
}

static void phase_qkv(xctx *c, int64_t tid) {
    matmul_part(c, &c->M->layers[c->layer].qkv, c->n, NULL, c->y, c->y_stride, tid);
}

/* attention of one stream's query heads of one key-value head */
static void attend(xctx *c, int64_t s, int64_t kv, int64_t tid) {
    const xmodel *M = c->M;
    int64_t hd = M->head_dim, group = M->n_head / M->n_head_kv, layer = c->layer;
    int64_t pos = c->positions[s], length = pos + 1;
    const int32_t *y = c->y + s * c->y_stride;
    size_t base = cache_index(c, s, layer, kv);
    uint8_t *keys = c->keys + base * cache_cells(c), *values = c->values + base * cache_cells(c);
    int32_t *k_exp = c->k_exp + base * c->ctx_pad, *v_exp = c->v_exp + base * c->ctx_pad;
    const int64_t *cos = c->cos + pos * (M->n_rot / 2), *sin = c->sin + pos * (M->n_rot / 2);
    int64_t *qv = c->qbuf + tid * MAX_GROUP * hd;
    /* the new key and value into the cache */
    int64_t *kv_buf = qv; /* (used before the queries) */
    for (int64_t d = 0; d < hd; d++)
        kv_buf[d] = y[M->n_embd + kv * hd + d];
    rope(kv_buf, cos, sin, M->n_rot);
    int64_t t = quant_shift(kv_buf, hd, KV_BITS);
    uint8_t *tile = keys + (size_t)(pos / TILE) * (hd / 4) * 64 + (pos % TILE) * 4;
    for (int64_t d = 0; d < hd; d++)
        tile[(d / 4) * 64 + d % 4] = (uint8_t)(quant_one(kv_buf[d], t, KV_BITS) + 128);
    k_exp[pos] = (int32_t)(t - F);
    for (int64_t d = 0; d < hd; d++)
        kv_buf[d] = y[M->n_embd + M->n_head_kv * hd + kv * hd + d];
    t = quant_shift(kv_buf, hd, KV_BITS);
    uint8_t *group4 = values + (size_t)(pos / 4) * hd * 4 + pos % 4;
    for (int64_t d = 0; d < hd; d++)
        group4[d * 4] = (uint8_t)(quant_one(kv_buf[d], t, KV_BITS) + 128);
    v_exp[pos] = (int32_t)(t - F);
    /* the queries */
    int8_t *qlo = c->qlo + tid * MAX_GROUP * hd, *qhi = c->qhi + tid * MAX_GROUP * hd;
    int64_t q_exp[MAX_GROUP], q_sum[MAX_GROUP];
    const int8_t *lo_rows[MAX_GROUP], *hi_rows[MAX_GROUP];
    for (int64_t h = 0; h < group; h++) {
        int64_t *q = qv + h * hd;
        for (int64_t d = 0; d < hd; d++)
            q[d] = y[(kv * group + h) * hd + d];
        rope(q, cos, sin, M->n_rot);
        int64_t tq = quant_shift(q, hd, ACT_BITS);
        for (int64_t d = 0; d < hd; d++)
            q[d] = quant_one(q[d], tq, ACT_BITS);
        act_t a = {qlo + h * hd, qhi + h * hd, 0, 0};
        split_store((int)c->simd, q, hd, hd, &a, 1);
        q_sum[h] = a.sum;
        q_exp[h] = tq - F;
        lo_rows[h] = a.lo;
        hi_rows[h] = a.hi;
    }
    /* scores: keys are the rows of a tile product with the queries */
    int64_t *scores = c->scores + tid * MAX_GROUP * c->ctx_pad;
    int32_t out_lo[MAX_GROUP][TILE], out_hi[MAX_GROUP][TILE];
    int64_t blocks = (length + TILE - 1) / TILE;
    for (int64_t b = 0; b < blocks; b++) {
        c->tile(keys + (size_t)b * (hd / 4) * 64, hd / 4, 64, group, lo_rows, hi_rows, out_lo, out_hi);
        for (int64_t h = 0; h < group; h++)
            for (int r = 0; r < TILE; r++) {
                int64_t j = b * TILE + r;
                if (j >= length) break;
                /* the AVX2 sum needs the key's weight sum: recomputed from its bytes */
                int64_t rowsum = 0;
                if (c->simd == SIMD_AVX2) {
                    const uint8_t *kt = keys + (size_t)b * (hd / 4) * 64 + r * 4;
                    for (int64_t d4 = 0; d4 < hd / 4; d4++)
                        for (int i = 0; i < 4; i++)
                            rowsum += (int64_t)kt[d4 * 64 + i] - 128;
                }
                int64_t dot = exact_sum((int)c->simd, out_lo[h][r], out_hi[h][r], q_sum[h], rowsum, 64);
                scores[h * c->ctx_pad + j] = clamp64(rnd64(dot * M->kq, 30 - SCORE_BITS - q_exp[h] - k_exp[j]), -SCORE_LIMIT, SCORE_LIMIT);
            }
    }
    /* softmax weights, shifted to the largest value exponent */
    int64_t top = INT64_MIN;
    for (int64_t j = 0; j < length; j++)
        top = v_exp[j] > top ? v_exp[j] : top;
    int8_t *wlo = c->wlo + tid * MAX_GROUP * c->ctx_pad, *whi = c->whi + tid * MAX_GROUP * c->ctx_pad;
    int64_t w_sum[MAX_GROUP];
    int64_t padded = (length + 3) / 4 * 4;
    for (int64_t h = 0; h < group; h++) {
        int64_t *sc = scores + h * c->ctx_pad;
        int64_t best = INT64_MIN;
        for (int64_t j = 0; j < length; j++)
            best = sc[j] > best ? sc[j] : best;
        int64_t total = 0;
        for (int64_t j = 0; j < length; j++) {
            int64_t distance = best - sc[j];
            distance = distance < INT32_MAX_ ? distance : INT32_MAX_;
            int64_t yv = distance * LOG2E, shift = yv >> 46;
            int64_t e = shift > 63 ? 0 : M->exp2[(yv >> 36) & 1023] >> shift;
            sc[j] = e;
            total += e;
        }
        int64_t inverse = ((int64_t)1 << 58) / total, sum = 0;
        int8_t *lo = wlo + h * c->ctx_pad, *hi = whi + h * c->ctx_pad;
        for (int64_t j = 0; j < length; j++) {
            int64_t p = (sc[j] * inverse) >> (58 - PROB_BITS);
            p = p < PROB_MAX ? p : PROB_MAX;
            int64_t shift = top - v_exp[j];
            int64_t w = p >> (shift < 63 ? shift : 63);
            sum += w;
            lo[j] = (int8_t)(w & 127);
            hi[j] = (int8_t)(w >> 7);
        }
        for (int64_t j = length; j < padded; j++)
            lo[j] = hi[j] = 0;
        w_sum[h] = sum;
        lo_rows[h] = lo;
        hi_rows[h] = hi;
    }
    /* values: dimensions are the rows, cells the columns */
    int32_t *out = c->attn + s * M->n_embd + kv * group * hd;
    for (int64_t d0 = 0; d0 < hd; d0 += TILE) {
        c->tile(values + d0 * 4, padded / 4, hd * 4, group, lo_rows, hi_rows, out_lo, out_hi);
        for (int64_t h = 0; h < group; h++)
            for (int r = 0; r < TILE; r++) {
                int64_t o = exact_sum((int)c->simd, out_lo[h][r], out_hi[h][r], w_sum[h], 0, 0);
                out[h * hd + d0 + r] = (int32_t)sat32(rnd64(o, PROB_BITS - F - top));
            }
    }
}

static void phase_attention(xctx *c, int64_t tid) {
    int64_t units = c->n * c->M->n_head_kv, u0, u1;
    split(units, tid, c->threads, &u0, &u1);
    for (int64_t u = u0; u < u1; u++)
        attend(c, u / c->M->n_head_kv, u % c->M->n_head_kv, tid);
}

static void phase_attn_quant(xctx *c, int64_t tid) {
    int64_t s0, s1, n = c->M->n_embd;
    split(c->n, tid, c->threads, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        int64_t *v = c->wide + s * c->k_pad;
        for (int64_t i = 0; i < n; i++)
            v[i] = c->attn[s * n + i];
        plain_quantize(c, s, v, n, F);
    }
}

static void phase_o(xctx *c, int64_t tid) {
    matmul_part(c, &c->M->layers[c->layer].o, c->n, NULL, c->y, c->y_stride, tid);
}

static void add_residual(xctx *c, int64_t s) {
    int32_t *x = c->x + s * c->M->n_embd;
    const int32_t *y = c->y + s * c->y_stride;
    for (int64_t i = 0; i < c->M->n_embd; i++)
        x[i] = (int32_t)sat32((int64_t)x[i] + y[i]);
}

static void phase_ffn_norm(xctx *c, int64_t tid) {
    const xlayer *L = &c->M->layers[c->layer];
    int64_t s0, s1;
    split(c->n, tid, c->threads, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        add_residual(c, s);
        norm_quantize(c, s, c->x + s * c->M->n_embd, L->ffn_gain, L->ffn_bits, s);
    }
}

static void phase_gateup(xctx *c, int64_t tid) {
    matmul_part(c, &c->M->layers[c->layer].gateup, c->n, NULL, c->y, c->y_stride, tid);
}

static void phase_silu(xctx *c, int64_t tid) {
    const xmodel *M = c->M;
    int64_t s0, s1, n = M->n_ff;
    split(c->n, tid, c->threads, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        const int32_t *gate = c->y + s * c->y_stride, *up = gate + n;
        int64_t *v = c->wide + s * c->k_pad;
        for (int64_t i = 0; i < n; i++) {
            int64_t g = gate[i];
            int64_t index = clamp64(rnd64(g, F - 10), -SIGMOID_RANGE, SIGMOID_RANGE);
            int64_t silu = rnd64(g * M->sigmoid[index + SIGMOID_RANGE], 30);
            v[i] = silu * up[i];
        }
        plain_quantize(c, s, v, n, 2 * F);
    }
}

static void phase_down(xctx *c, int64_t tid) {
    matmul_part(c, &c->M->layers[c->layer].down, c->n, NULL, c->y, c->y_stride, tid);
}

/* the residual, then the next layer's attention norm, or the output norm for the streams
 * that want logits (their activation rows numbered by want_index) */
static void phase_next_norm(xctx *c, int64_t tid) {
    const xmodel *M = c->M;
    int64_t s0, s1;
    split(c->n, tid, c->threads, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        add_residual(c, s);
        int32_t *x = c->x + s * M->n_embd;
        if (c->layer + 1 < M->n_layer)
            norm_quantize(c, s, x, M->layers[c->layer + 1].attn_gain, M->layers[c->layer + 1].attn_bits, s);
        else if (c->want_index[s] >= 0)
            norm_quantize(c, s, x, M->out_gain, M->out_bits, c->n_streams + c->want_index[s]);
    }
}

static void phase_output(xctx *c, int64_t tid) {
    int64_t rows[4096];
    int64_t n = c->n_want < 4096 ? c->n_want : 4096;
    for (int64_t i = 0; i < n; i++)
        rows[i] = c->n_streams + i;
    matmul_part(c, &c->M->output, n, rows, c->logits, c->M->output.n_out, tid);
}

/* --- threads ---------------------------------------------------------------------------------- */

static void run_phase(xctx *c, phase_fn phase) {
    c->phase = phase;
    barrier_wait(&c->barrier); /* the workers start it */
    phase(c, 0);
    barrier_wait(&c->barrier); /* and all have finished */
}

static void *worker_main(void *argument) {
    void **pair = (void **)argument;
    xctx *c = pair[0];
    int64_t tid = (int64_t)(intptr_t)pair[1];
    free(pair);
    for (;;) {
        barrier_wait(&c->barrier);
        if (atomic_load(&c->stop))
            return NULL;
        c->phase(c, tid);
        barrier_wait(&c->barrier);
    }
}

/* --- the API (ctypes) ------------------------------------------------------------------------- */

int64_t nx_simd_available(void) {
#if X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return SIMD_VNNI;
    if (__builtin_cpu_supports("avx2"))
        return SIMD_AVX2;
#endif
    return SIMD_SCALAR;
}

void nx_context_free(xctx *c);

xctx *nx_context_new(const xmodel *M, int64_t n_streams, int64_t ctx, const int64_t *cos, const int64_t *sin, int64_t threads, int64_t simd) {
    if (simd > nx_simd_available() || n_streams < 1 || ctx < 1 || threads < 1 || M->n_head / M->n_head_kv > MAX_GROUP || M->head_dim % TILE)
        return NULL;
    xctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->M = M;
    c->n_streams = n_streams;
    c->ctx = ctx;
    c->ctx_pad = (ctx + TILE - 1) / TILE * TILE;
    c->threads = threads;
    c->simd = simd;
    c->cos = cos;
    c->sin = sin;
    c->tile = tile_for((int)simd);
    int64_t widest = M->n_ff > M->n_embd ? M->n_ff : M->n_embd;
    c->k_pad = (widest + 63) / 64 * 64;
    int64_t kv = M->n_head_kv * M->head_dim;
    int64_t ys = M->n_embd + 2 * kv;
    ys = 2 * M->n_ff > ys ? 2 * M->n_ff : ys;
    c->y_stride = ys;
    size_t caches = (size_t)n_streams * M->n_layer * M->n_head_kv;
    int64_t act_rows = 2 * n_streams;
    c->keys = calloc(caches * cache_cells(c), 1);
    c->values = calloc(caches * cache_cells(c), 1);
    c->k_exp = calloc(caches * c->ctx_pad, sizeof(int32_t));
    c->v_exp = calloc(caches * c->ctx_pad, sizeof(int32_t));
    c->x = calloc((size_t)n_streams * M->n_embd, sizeof(int32_t));
    c->y = calloc((size_t)n_streams * ys, sizeof(int32_t));
    c->attn = calloc((size_t)n_streams * M->n_embd, sizeof(int32_t));
    c->wide = calloc((size_t)n_streams * c->k_pad, sizeof(int64_t));
    c->act_lo = calloc((size_t)act_rows * c->k_pad, 1);
    c->act_hi = calloc((size_t)act_rows * c->k_pad, 1);
    c->act_sum = calloc(act_rows, sizeof(int64_t));
    c->act_k = calloc(act_rows, sizeof(int64_t));
    c->scores = calloc((size_t)threads * MAX_GROUP * c->ctx_pad, sizeof(int64_t));
    c->wlo = calloc((size_t)threads * MAX_GROUP * c->ctx_pad, 1);
    c->whi = calloc((size_t)threads * MAX_GROUP * c->ctx_pad, 1);
    c->qbuf = calloc((size_t)threads * MAX_GROUP * M->head_dim, sizeof(int64_t));
    c->qlo = calloc((size_t)threads * MAX_GROUP * M->head_dim, 1);
    c->qhi = calloc((size_t)threads * MAX_GROUP * M->head_dim, 1);
    c->want_index = calloc(n_streams, sizeof(int64_t));
    c->barrier.n = (int)threads;
    if (!c->keys || !c->values || !c->k_exp || !c->v_exp || !c->x || !c->y || !c->attn || !c->wide || !c->act_lo || !c->act_hi ||
        !c->act_sum || !c->act_k || !c->scores || !c->wlo || !c->whi || !c->qbuf || !c->qlo || !c->qhi || !c->want_index) {
        nx_context_free(c);
        return NULL;
    }
    c->workers = calloc(threads, sizeof(pthread_t));
    for (int64_t t = 1; t < threads; t++) {
        void **pair = malloc(2 * sizeof(void *));
        pair[0] = c;
        pair[1] = (void *)(intptr_t)t;
        if (pthread_create(&c->workers[t], NULL, worker_main, pair) != 0) {
            free(pair);
            c->threads = t; /* the ones started stop at free */
            c->barrier.n = (int)t;
            nx_context_free(c);
            return NULL;
        }
    }
    return c;
}

void nx_context_free(xctx *c) {
    if (!c) return;
    if (c->workers && c->threads > 1) {
        atomic_store(&c->stop, 1);
        barrier_wait(&c->barrier);
        for (int64_t t = 1; t < c->threads; t++)
            pthread_join(c->workers[t], NULL);
    }
    free(c->workers);
    free(c->keys); free(c->values); free(c->k_exp); free(c->v_exp); free(c->x); free(c->y); free(c->attn); free(c->wide);
    free(c->act_lo); free(c->act_hi); free(c->act_sum); free(c->act_k); free(c->scores); free(c->wlo); free(c->whi);
    free(c->qbuf); free(c->qlo); free(c->qhi); free(c->want_index);
    free(c);
}

void nx_reset(xctx *c) {
    size_t caches = (size_t)c->n_streams * c->M->n_layer * c->M->n_head_kv;
    memset(c->k_exp, 0, caches * c->ctx_pad * sizeof(int32_t));
    memset(c->v_exp, 0, caches * c->ctx_pad * sizeof(int32_t));
}

/* Feed tokens[s] at cell positions[s] of stream s for s < n; the logits (int32 at F) of the
 * streams with want[s] go to consecutive rows of `logits`. Returns 0, or -1 for bad input. */
int64_t nx_step(xctx *c, int64_t n, const int32_t *tokens, const int32_t *positions, const uint8_t *want, int32_t *logits) {
    const xmodel *M = c->M;
    if (n < 1 || n > c->n_streams) return -1;
    int64_t n_want = 0;
    for (int64_t s = 0; s < n; s++) {
        if (tokens[s] < 0 || tokens[s] >= M->n_vocab || positions[s] < 0 || positions[s] >= c->ctx) return -1;
        c->want_index[s] = want[s] ? n_want++ : -1;
    }
    if (n_want > 4096) return -1;
    c->n = n;
    c->n_want = n_want;
    c->tokens = tokens;
    c->positions = positions;
    c->want = want;
    c->logits = logits;
    c->layer = 0;
    run_phase(c, phase_embed_norm);
    for (int64_t layer = 0; layer < M->n_layer; layer++) {
        c->layer = layer;
        run_phase(c, phase_qkv);
        run_phase(c, phase_attention);
        run_phase(c, phase_attn_quant);
        run_phase(c, phase_o);
        run_phase(c, phase_ffn_norm);
        run_phase(c, phase_gateup);
        run_phase(c, phase_silu);
        run_phase(c, phase_down);
        run_phase(c, phase_next_norm);
    }
    if (n_want)
        run_phase(c, phase_output);
    return 0;
}

/* Drop cells keep .. keep + drop - 1 of `stream` (of `length` filled), move the later ones
 * down and rotate their keys back by `drop` positions (reference.ReferenceContext.slide). */
int64_t nx_slide(xctx *c, int64_t stream, int64_t keep, int64_t drop, int64_t length) {
    const xmodel *M = c->M;
    int64_t hd = M->head_dim;
    if (stream < 0 || stream >= c->n_streams || keep < 0 || drop < 1 || keep + drop > length || length > c->ctx) return -1;
    const int64_t *cos = c->cos + drop * (M->n_rot / 2), *sin = c->sin + drop * (M->n_rot / 2);
    int64_t nsin[64 * 4];
    for (int64_t j = 0; j < M->n_rot / 2; j++)
        nsin[j] = -sin[j];
    int64_t v[1024];
    for (int64_t layer = 0; layer < M->n_layer; layer++)
        for (int64_t kv = 0; kv < M->n_head_kv; kv++) {
            size_t base = cache_index(c, stream, layer, kv);
            uint8_t *keys = c->keys + base * cache_cells(c), *values = c->values + base * cache_cells(c);
            int32_t *k_exp = c->k_exp + base * c->ctx_pad, *v_exp = c->v_exp + base * c->ctx_pad;
            for (int64_t to = keep; to < length - drop; to++) {
                int64_t from = to + drop;
                uint8_t *kf = keys + (size_t)(from / TILE) * (hd / 4) * 64 + (from % TILE) * 4;
                uint8_t *kt = keys + (size_t)(to / TILE) * (hd / 4) * 64 + (to % TILE) * 4;
                for (int64_t d = 0; d < hd; d++)
                    v[d] = ((int64_t)kf[(d / 4) * 64 + d % 4] - 128) << 16;
                rope(v, cos, nsin, M->n_rot);
                int64_t t = quant_shift(v, hd, KV_BITS);
                for (int64_t d = 0; d < hd; d++)
                    kt[(d / 4) * 64 + d % 4] = (uint8_t)(quant_one(v[d], t, KV_BITS) + 128);
                k_exp[to] = (int32_t)(k_exp[from] + t - 16);
                uint8_t *vf = values + (size_t)(from / 4) * hd * 4 + from % 4;
                uint8_t *vt = values + (size_t)(to / 4) * hd * 4 + to % 4;
                for (int64_t d = 0; d < hd; d++)
                    vt[d * 4] = vf[d * 4];
                v_exp[to] = v_exp[from];
            }
        }
    return 0;
}

/* A nacrith.exact._exact module, so that setuptools builds this file as an extension; the
 * functions above are reached through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_exact", "The exact engine's C kernel (used through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__exact(void) { return PyModule_Create(&module); }
