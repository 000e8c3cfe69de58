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
#include <time.h>
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

/* Loops that the compiler vectorises get a clone per instruction set (GCC's target_clones,
 * dispatched at load time where glibc's ifunc exists); integer results are the same in each. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define VEC __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VEC
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

/* the largest |v_i| */
VEC static uint64_t max_abs64(const int64_t *v, int64_t n) {
    uint64_t largest = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t a = (uint64_t)(v[i] < 0 ? -v[i] : v[i]);
        largest = a > largest ? a : largest;
    }
    return largest;
}

/* reference.quantize of one vector: q ~ v / 2^t with |q| <= 2^bits - 1; returns t */
static int64_t quant_shift(const int64_t *v, int64_t n, int64_t bits) {
    uint64_t largest = max_abs64(v, n);
    return largest ? bitlen(largest) - bits : 0;
}

static inline int64_t quant_one(int64_t v, int64_t t, int64_t bits) {
    int64_t limit = ((int64_t)1 << bits) - 1;
    return clamp64(rnd64(v, t), -limit, limit);
}

/* v = quant_one(v, t, bits) for t = quant_shift(v, n, bits): with t <= 0 a plain shift
 * (the largest value then stays below 2^bits) */
VEC static void quantize_in_place(int64_t *v, int64_t n, int64_t t, int64_t bits) {
    int64_t limit = ((int64_t)1 << bits) - 1;
    if (t > 0) {
        int64_t s = t > 63 ? 63 : t;
        for (int64_t i = 0; i < n; i++) {
            int64_t r = (v[i] >> s) + ((v[i] >> (s - 1)) & 1);
            v[i] = r < -limit ? -limit : (r > limit ? limit : r);
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            v[i] = (int64_t)((uint64_t)v[i] << -t);
    }
}

/* reference.rms_scale: the row's inverse RMS as c * 2^k, c in (2^14, 2^15] */
VEC static uint64_t max_abs32(const int32_t *x, int64_t n) {
    uint64_t largest = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t a = (uint64_t)(x[i] < 0 ? -(int64_t)x[i] : x[i]);
        largest = a > largest ? a : largest;
    }
    return largest;
}

VEC static int64_t sum_squares(const int32_t *x, int64_t n, int64_t sh) {
    int64_t s = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t xs = (int64_t)x[i] >> sh;
        s += xs * xs;
    }
    return s;
}

static void rms_scale(const int32_t *x, int64_t n, int64_t eps_m, int64_t eps_e, int64_t *c, int64_t *k) {
    int64_t sh = bitlen(max_abs32(x, n)) - 24;
    sh = sh > 0 ? sh : 0;
    int64_t s = sum_squares(x, n, sh);
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
 * vectors, interleaved: step q of vector s is 8 bytes at act + q * astride + 8 s (4 lo
 * bytes, then 4 hi bytes): out_lo[s][r] = sum_k W[r][k] * lo[s][k] and out_hi likewise,
 * where W is the stored byte (VNNI and scalar: unsigned w + 128) or the signed weight
 * (AVX2, whose hi is hi + 64). The epilogues turn them into exact sums. */

typedef void (*tile_fn)(const uint8_t *w, int64_t k4, int64_t kstride, int64_t S, const int8_t *act, int64_t astride,
                        int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]);

static void tile_scalar(const uint8_t *w, int64_t k4, int64_t kstride, int64_t S, const int8_t *act, int64_t astride,
                        int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {
    for (int64_t s = 0; s < S; s++) {
        int32_t al[TILE] = {0}, ah[TILE] = {0};
        for (int64_t q = 0; q < k4; q++) {
            const uint8_t *t = w + q * kstride;
            const int8_t *l = act + q * astride + 8 * s, *h = l + 4;
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

/* Accumulators in named variables (an array of them made GCC copy registers around each
 * vpdpbusd); the activation bytes are broadcast straight from memory. */
#define VNNI_ZERO(i) __m512i l##i = _mm512_setzero_si512(), h##i = l##i;
#define VNNI_STEP(i)                                                                                                           \
    l##i = _mm512_dpbusd_epi32(l##i, t, _mm512_set1_epi32(x[2 * (i)]));                                                        \
    h##i = _mm512_dpbusd_epi32(h##i, t, _mm512_set1_epi32(x[2 * (i) + 1]));
#define VNNI_STORE(i)                                                                                                          \
    _mm512_storeu_si512((void *)out_lo[i], l##i);                                                                              \
    _mm512_storeu_si512((void *)out_hi[i], h##i);
#define VNNI_TILE(S_, ZEROS, STEPS, STORES)                                                                                    \
    VNNI_TARGET static void tile_vnni_##S_(const uint8_t *w, int64_t k4, int64_t kstride, const int8_t *act, int64_t astride,  \
                                            int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {                                \
        ZEROS                                                                                                                  \
        for (int64_t q = 0; q < k4; q++) {                                                                                     \
            _mm_prefetch((const char *)(w + (q + 8) * kstride), _MM_HINT_T0); /* weights stream from memory */               \
            __m512i t = _mm512_loadu_si512((const void *)(w + q * kstride));                                                   \
            const int32_t *x = (const int32_t *)(act + q * astride);                                                           \
            STEPS                                                                                                              \
        }                                                                                                                      \
        STORES                                                                                                                 \
    }
#define R1(M) M(0)
#define R2(M) R1(M) M(1)
#define R3(M) R2(M) M(2)
#define R4(M) R3(M) M(3)
#define R5(M) R4(M) M(4)
#define R6(M) R5(M) M(5)
#define R7(M) R6(M) M(6)
#define R8(M) R7(M) M(7)
VNNI_TILE(1, R1(VNNI_ZERO), R1(VNNI_STEP), R1(VNNI_STORE))
VNNI_TILE(2, R2(VNNI_ZERO), R2(VNNI_STEP), R2(VNNI_STORE))
VNNI_TILE(3, R3(VNNI_ZERO), R3(VNNI_STEP), R3(VNNI_STORE))
VNNI_TILE(4, R4(VNNI_ZERO), R4(VNNI_STEP), R4(VNNI_STORE))
VNNI_TILE(5, R5(VNNI_ZERO), R5(VNNI_STEP), R5(VNNI_STORE))
VNNI_TILE(6, R6(VNNI_ZERO), R6(VNNI_STEP), R6(VNNI_STORE))
VNNI_TILE(7, R7(VNNI_ZERO), R7(VNNI_STEP), R7(VNNI_STORE))
VNNI_TILE(8, R8(VNNI_ZERO), R8(VNNI_STEP), R8(VNNI_STORE))

static void tile_vnni(const uint8_t *w, int64_t k4, int64_t kstride, int64_t S, const int8_t *act, int64_t astride,
                      int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {
    static void (*const by_count[])(const uint8_t *, int64_t, int64_t, const int8_t *, int64_t, int32_t (*)[TILE], int32_t (*)[TILE]) = {
        0, tile_vnni_1, tile_vnni_2, tile_vnni_3, tile_vnni_4, tile_vnni_5, tile_vnni_6, tile_vnni_7, tile_vnni_8};
    for (int64_t s = 0; s < S; s += 8) {
        int64_t count = S - s < 8 ? S - s : 8;
        by_count[count](w, k4, kstride, act + 8 * s, astride, out_lo + s, out_hi + s);
    }
}

#define AVX2_ZERO(i) __m256i a##i = _mm256_setzero_si256(), b##i = a##i, c##i = a##i, d##i = a##i;
#define AVX2_STEP(i)                                                                                                           \
    {                                                                                                                          \
        __m256i vl = _mm256_set1_epi32(x[2 * (i)]), vh = _mm256_set1_epi32(x[2 * (i) + 1]);                                    \
        a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(_mm256_maddubs_epi16(vl, t0), ones));                                  \
        b##i = _mm256_add_epi32(b##i, _mm256_madd_epi16(_mm256_maddubs_epi16(vl, t1), ones));                                  \
        c##i = _mm256_add_epi32(c##i, _mm256_madd_epi16(_mm256_maddubs_epi16(vh, t0), ones));                                  \
        d##i = _mm256_add_epi32(d##i, _mm256_madd_epi16(_mm256_maddubs_epi16(vh, t1), ones));                                  \
    }
#define AVX2_STORE(i)                                                                                                          \
    _mm256_storeu_si256((__m256i *)out_lo[i], a##i);                                                                           \
    _mm256_storeu_si256((__m256i *)(out_lo[i] + 8), b##i);                                                                     \
    _mm256_storeu_si256((__m256i *)out_hi[i], c##i);                                                                           \
    _mm256_storeu_si256((__m256i *)(out_hi[i] + 8), d##i);
#define AVX2_TILE(S_, ZEROS, STEPS, STORES)                                                                                    \
    AVX2_TARGET static void tile_avx2_##S_(const uint8_t *w, int64_t k4, int64_t kstride, const int8_t *act, int64_t astride,  \
                                            int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {                                \
        const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);                                         \
        ZEROS                                                                                                                  \
        for (int64_t q = 0; q < k4; q++) {                                                                                     \
            __m256i t0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + q * kstride)), flip);                       \
            __m256i t1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + q * kstride + 32)), flip);                  \
            const int32_t *x = (const int32_t *)(act + q * astride);                                                           \
            STEPS                                                                                                              \
        }                                                                                                                      \
        STORES                                                                                                                 \
    }
AVX2_TILE(1, R1(AVX2_ZERO), R1(AVX2_STEP), R1(AVX2_STORE))
AVX2_TILE(2, R2(AVX2_ZERO), R2(AVX2_STEP), R2(AVX2_STORE))
AVX2_TILE(3, R3(AVX2_ZERO), R3(AVX2_STEP), R3(AVX2_STORE))

static void tile_avx2(const uint8_t *w, int64_t k4, int64_t kstride, int64_t S, const int8_t *act, int64_t astride,
                      int32_t (*out_lo)[TILE], int32_t (*out_hi)[TILE]) {
    static void (*const by_count[])(const uint8_t *, int64_t, int64_t, const int8_t *, int64_t, int32_t (*)[TILE], int32_t (*)[TILE]) = {
        0, tile_avx2_1, tile_avx2_2, tile_avx2_3};
    for (int64_t s = 0; s < S; s += 3) {
        int64_t count = S - s < 3 ? S - s : 3;
        by_count[count](w, k4, kstride, act + 8 * s, astride, out_lo + s, out_hi + s);
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

/* Store the quantised vector q (n values, |q| <= 8191) interleaved for the tile product:
 * group g (values 4g..4g+3) at base + g * stride: 4 lo bytes, then 4 hi bytes (hi + 64 for
 * AVX2 when the values may be negative); groups up to n_pad / 4 are zero. Returns sum(q). */
VEC static int64_t store_act(int simd, const int64_t *q, int64_t n, int64_t n_pad, int8_t *base, int64_t stride, int signed_values) {
    int64_t sum = 0, offset = (simd == SIMD_AVX2 && signed_values) ? 64 : 0;
    for (int64_t i = 0; i < n; i++)
        sum += q[i];
    for (int64_t g = 0; g < n_pad / 4; g++) {
        uint32_t lo = 0, hi = 0;
        for (int j = 0; j < 4; j++) {
            int64_t v = 4 * g + j < n ? q[4 * g + j] : 0;
            lo |= (uint32_t)(v & 127) << (8 * j);
            hi |= (uint32_t)(uint8_t)((v >> 7) + offset) << (8 * j);
        }
        memcpy(base + g * stride, &lo, 4);
        memcpy(base + g * stride + 4, &hi, 4);
    }
    return sum;
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
    int8_t *act;         /* activation rows interleaved: group g of row r at (g * act_rows + r) * 8 */
    int64_t act_rows;    /* 2 * n_streams: the streams, then the rows of the streams that want logits */
    int64_t *act_sum, *act_k;
    int64_t k_pad;       /* values per activation row (a multiple of 64) */
    int64_t y_stride;
    /* per thread attention scratch */
    int64_t *scores;     /* [threads][MAX_GROUP][ctx_pad] */
    int8_t *wact;        /* [threads][ctx_pad / 4][MAX_GROUP][8]: attention weights, interleaved */
    int64_t *qbuf;       /* [threads][MAX_GROUP][head_dim] */
    int8_t *qact;        /* [threads][head_dim / 4][MAX_GROUP][8]: queries, interleaved */
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

#define SPIN_NS 30000 /* a waiting thread spins this long, then sleeps */

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

/* Every thread waits here until all have come; short waits spin (SPIN_NS at most), long
 * ones sleep on a futex, so that on a busy machine a thread whose partner lost its core
 * gives the core away instead of spinning through its time slice. */
static void barrier_wait(barrier_t *b) {
    int generation = atomic_load(&b->generation);
    if (atomic_fetch_add(&b->count, 1) == b->n - 1) {
        atomic_store(&b->count, 0);
        atomic_fetch_add(&b->generation, 1);
        if (atomic_load(&b->sleepers))
            futex_wake_all(&b->generation);
        return;
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 1;; i++) {
        if (atomic_load(&b->generation) != generation)
            return;
        cpu_relax();
        if (i % 32 == 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) > SPIN_NS)
                break;
        }
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
static int8_t *act_row(xctx *c, int64_t r) { return c->act + r * 8; }

/* --- matrix products --------------------------------------------------------------------- */

/* y[r] = sat32(rnd(acc * m_r, e_r - k - F)) for 16 rows of one activation row */
static void rescale_rows(const int32_t *lo, const int32_t *hi, int simd, int64_t xsum, int64_t k, const int64_t *rowsum, const int64_t *m,
                         const int64_t *e, int32_t *out) {
    for (int r = 0; r < TILE; r++) {
        int64_t acc = exact_sum(simd, lo[r], hi[r], xsum, rowsum[r], 64);
        out[r] = (int32_t)sat32(rnd64(acc * m[r], e[r] - k - F));
    }
}

#if X86
/* rnd64 of 8 lanes whose shifts all lie in 1..63 */
VNNI_TARGET static inline __m512i rnd_lanes(__m512i v, __m512i shift) {
    __m512i one = _mm512_set1_epi64(1);
    return _mm512_add_epi64(_mm512_srav_epi64(v, shift), _mm512_and_si512(_mm512_srav_epi64(v, _mm512_sub_epi64(shift, one)), one));
}

VNNI_TARGET static inline __m512i sat32_lanes(__m512i v) {
    return _mm512_min_epi64(_mm512_max_epi64(v, _mm512_set1_epi64(-INT32_MAX_)), _mm512_set1_epi64(INT32_MAX_));
}

/* rescale_rows for the VNNI encoding, 8 lanes at a time (scalar where a shift is outside 1..63) */
VNNI_TARGET static void rescale_rows_vnni(const int32_t *lo, const int32_t *hi, int64_t xsum, int64_t k, const int64_t *m, const int64_t *e,
                                          int32_t *out) {
    for (int half = 0; half < 2; half++) {
        __m512i l = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(lo + 8 * half)));
        __m512i h = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(hi + 8 * half)));
        __m512i acc = _mm512_sub_epi64(_mm512_add_epi64(_mm512_slli_epi64(h, 7), l), _mm512_set1_epi64(128 * xsum));
        __m512i shift = _mm512_sub_epi64(_mm512_loadu_si512((const void *)(e + 8 * half)), _mm512_set1_epi64(k + F));
        __mmask8 odd = _mm512_cmplt_epi64_mask(shift, _mm512_set1_epi64(1)) | _mm512_cmpgt_epi64_mask(shift, _mm512_set1_epi64(63));
        __m512i product = _mm512_mullo_epi64(acc, _mm512_loadu_si512((const void *)(m + 8 * half)));
        if (odd) {
            int64_t p[8], sh[8];
            _mm512_storeu_si512((void *)p, product);
            _mm512_storeu_si512((void *)sh, shift);
            for (int i = 0; i < 8; i++)
                out[8 * half + i] = (int32_t)sat32(rnd64(p[i], sh[i]));
            continue;
        }
        _mm256_storeu_si256((__m256i *)(out + 8 * half), _mm512_cvtepi64_epi32(sat32_lanes(rnd_lanes(product, shift))));
    }
}
#endif

/* y[s][r] = sat32(rnd(acc * m_r, e_r - k_s - F)) for rows r in this thread's share and the
 * first n activation rows (act rows `first + s`), written at y + s * stride. */
static void matmul_part(xctx *c, const xmat *W, int64_t n, int64_t first, int32_t *y, int64_t stride, int64_t tid) {
    int64_t blocks = W->n_out / TILE, b0, b1;
    split(blocks, tid, c->threads, &b0, &b1);
    int64_t k4 = W->n_in / 4, astride = 8 * c->act_rows;
    int32_t out_lo[8][TILE], out_hi[8][TILE];
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *w = W->w + (size_t)b * k4 * 64;
        for (int64_t s0 = 0; s0 < n; s0 += 8) {
            int64_t S = n - s0 < 8 ? n - s0 : 8;
            c->tile(w, k4, 64, S, act_row(c, first + s0), astride, out_lo, out_hi);
            for (int64_t s = 0; s < S; s++) {
                int64_t row = first + s0 + s;
                int32_t *out = y + (s0 + s) * stride + b * TILE;
#if X86
                if (c->simd == SIMD_VNNI) {
                    rescale_rows_vnni(out_lo[s], out_hi[s], c->act_sum[row], c->act_k[row], W->m + b * TILE, W->e + b * TILE, out);
                    continue;
                }
#endif
                rescale_rows(out_lo[s], out_hi[s], (int)c->simd, c->act_sum[row], c->act_k[row], W->rowsum + b * TILE, W->m + b * TILE,
                             W->e + b * TILE, out);
            }
        }
    }
}

/* --- per-stream operations -------------------------------------------------------------------- */

VEC static void scale_gains(int64_t *v, const int32_t *x, const int64_t *gain, int64_t c, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        v[i] = (int64_t)x[i] * gain[i] * c;
}

/* activation row `row` = the RMS-normalised x times the gains, quantised; s picks the scratch */
static void norm_quantize(xctx *c, int64_t s, const int32_t *x, const int64_t *gain, int64_t gain_bits, int64_t row) {
    const xmodel *M = c->M;
    int64_t n = M->n_embd, cn, kn;
    rms_scale(x, n, M->eps_m, M->eps_e, &cn, &kn);
    int64_t *v = c->wide + s * c->k_pad;
    scale_gains(v, x, gain, cn, n);
    int64_t t = quant_shift(v, n, ACT_BITS);
    quantize_in_place(v, n, t, ACT_BITS);
    c->act_sum[row] = store_act((int)c->simd, v, n, c->k_pad, act_row(c, row), 8 * c->act_rows, 1);
    c->act_k[row] = t - F - gain_bits + kn;
}

/* activation row s = the int values v (at `fraction` bits), quantised */
static void plain_quantize(xctx *c, int64_t s, int64_t *v, int64_t n, int64_t fraction) {
    int64_t t = quant_shift(v, n, ACT_BITS);
    quantize_in_place(v, n, t, ACT_BITS);
    c->act_sum[s] = store_act((int)c->simd, v, n, c->k_pad, act_row(c, s), 8 * c->act_rows, 1);
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
    matmul_part(c, &c->M->layers[c->layer].qkv, c->n, 0, c->y, c->y_stride, tid);
}

/* scores of 16 cells (from cell j0, `count` of them valid) for one query head */
static void scores_block(const int32_t *lo, const int32_t *hi, int simd, int64_t q_sum, int64_t q_exp, const int32_t *k_exp,
                         const uint8_t *key_tile, int64_t hd, int64_t kq, int64_t count, int64_t *out) {
    for (int64_t r = 0; r < count; r++) {
        int64_t rowsum = 0;
        if (simd == SIMD_AVX2) /* the AVX2 sum needs the key's weight sum: from its bytes */
            for (int64_t d4 = 0; d4 < hd / 4; d4++)
                for (int i = 0; i < 4; i++)
                    rowsum += (int64_t)key_tile[d4 * 64 + r * 4 + i] - 128;
        int64_t dot = exact_sum(simd, lo[r], hi[r], q_sum, rowsum, 64);
        out[r] = clamp64(rnd64(dot * kq, 30 - SCORE_BITS - q_exp - k_exp[r]), -SCORE_LIMIT, SCORE_LIMIT);
    }
}

/* e^(-distance) at 2^30 for a score distance at 2^-16 (reference.exp2_neg) */
static inline int64_t exp_term(int64_t distance, const int64_t *exp2) {
    distance = distance < INT32_MAX_ ? distance : INT32_MAX_;
    int64_t z = distance * LOG2E, shift = z >> 46;
    return shift > 63 ? 0 : exp2[(z >> 36) & 1023] >> shift;
}

/* cell j's attention weight from its exponential: stored (lo, hi) at wact; returns it */
static inline int64_t store_weight(int8_t *wact, int64_t wstride, int64_t j, int64_t e, int64_t inverse, int64_t top, const int32_t *v_exp) {
    int64_t p = (e * inverse) >> (58 - PROB_BITS);
    p = p < PROB_MAX ? p : PROB_MAX;
    int64_t shift = top - v_exp[j];
    int64_t w = p >> (shift < 63 ? shift : 63);
    int8_t *group = wact + (j / 4) * wstride;
    group[j % 4] = (int8_t)(w & 127);
    group[4 + j % 4] = (int8_t)(w >> 7);
    return w;
}

/* zero weights for the cells from j to the end of their group of 4 */
static inline void clear_weights(int8_t *wact, int64_t wstride, int64_t j, int64_t length) {
    for (; j < (length + 3) / 4 * 4; j++) {
        int8_t *group = wact + (j / 4) * wstride;
        group[j % 4] = group[4 + j % 4] = 0;
    }
}

/* softmax of one head's scores into attention weights w_j = P_j >> (top - v_exp_j), stored
 * interleaved (lo, hi bytes) at wact (cell group g at wact + g * wstride); returns sum(w) */
static int64_t softmax_weights(int64_t *sc, int64_t length, const int32_t *v_exp, int64_t top, const int64_t *exp2, int8_t *wact,
                               int64_t wstride) {
    int64_t best = INT64_MIN;
    for (int64_t j = 0; j < length; j++)
        best = sc[j] > best ? sc[j] : best;
    int64_t total = 0;
    for (int64_t j = 0; j < length; j++) {
        sc[j] = exp_term(best - sc[j], exp2);
        total += sc[j];
    }
    int64_t inverse = ((int64_t)1 << 58) / total, sum = 0;
    for (int64_t j = 0; j < length; j++)
        sum += store_weight(wact, wstride, j, sc[j], inverse, top, v_exp);
    clear_weights(wact, wstride, length, length);
    return sum;
}

#if X86
VNNI_TARGET static void scores_block_vnni(const int32_t *lo, const int32_t *hi, int64_t q_sum, int64_t q_exp, const int32_t *k_exp,
                                          int64_t kq, int64_t count, int64_t *out) {
    int64_t base = 30 - SCORE_BITS - q_exp;
    for (int half = 0; half < 2 && 8 * half < count; half++) {
        __m512i l = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(lo + 8 * half)));
        __m512i h = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(hi + 8 * half)));
        __m512i dot = _mm512_sub_epi64(_mm512_add_epi64(_mm512_slli_epi64(h, 7), l), _mm512_set1_epi64(128 * q_sum));
        __m512i product = _mm512_mullo_epi64(dot, _mm512_set1_epi64(kq));
        __m512i shift = _mm512_sub_epi64(_mm512_set1_epi64(base), _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(k_exp + 8 * half))));
        __mmask8 odd = _mm512_cmplt_epi64_mask(shift, _mm512_set1_epi64(1)) | _mm512_cmpgt_epi64_mask(shift, _mm512_set1_epi64(63));
        int64_t lanes = count - 8 * half < 8 ? count - 8 * half : 8;
        if (odd) {
            int64_t p[8], sh[8];
            _mm512_storeu_si512((void *)p, product);
            _mm512_storeu_si512((void *)sh, shift);
            for (int64_t i = 0; i < lanes; i++)
                out[8 * half + i] = clamp64(rnd64(p[i], sh[i]), -SCORE_LIMIT, SCORE_LIMIT);
            continue;
        }
        __m512i v = rnd_lanes(product, shift);
        v = _mm512_min_epi64(_mm512_max_epi64(v, _mm512_set1_epi64(-SCORE_LIMIT)), _mm512_set1_epi64(SCORE_LIMIT));
        _mm512_mask_storeu_epi64(out + 8 * half, (__mmask8)((1u << lanes) - 1), v);
    }
}

VNNI_TARGET static int64_t softmax_weights_vnni(int64_t *sc, int64_t length, const int32_t *v_exp, int64_t top, const int64_t *exp2,
                                                int8_t *wact, int64_t wstride) {
    __m512i best = _mm512_set1_epi64(INT64_MIN);
    int64_t j;
    for (j = 0; j + 8 <= length; j += 8)
        best = _mm512_max_epi64(best, _mm512_loadu_si512((const void *)(sc + j)));
    int64_t top_score = _mm512_reduce_max_epi64(best);
    for (; j < length; j++)
        top_score = sc[j] > top_score ? sc[j] : top_score;
    const __m512i limit = _mm512_set1_epi64(INT32_MAX_), log2e = _mm512_set1_epi64(LOG2E), mask10 = _mm512_set1_epi64(1023);
    const __m512i best8 = _mm512_set1_epi64(top_score), sixty3 = _mm512_set1_epi64(63);
    __m512i total8 = _mm512_setzero_si512();
    for (j = 0; j + 8 <= length; j += 8) {
        __m512i d = _mm512_min_epi64(_mm512_sub_epi64(best8, _mm512_loadu_si512((const void *)(sc + j))), limit);
        __m512i z = _mm512_mullo_epi64(d, log2e);
        __m512i shift = _mm512_srai_epi64(z, 46);
        __m512i index = _mm512_and_si512(_mm512_srai_epi64(z, 36), mask10);
        __m512i e = _mm512_i64gather_epi64(index, (const void *)exp2, 8);
        e = _mm512_maskz_srav_epi64(_mm512_cmple_epi64_mask(shift, sixty3), e, _mm512_min_epi64(shift, sixty3));
        _mm512_storeu_si512((void *)(sc + j), e);
        total8 = _mm512_add_epi64(total8, e);
    }
    int64_t total = _mm512_reduce_add_epi64(total8);
    for (; j < length; j++) {
        sc[j] = exp_term(top_score - sc[j], exp2);
        total += sc[j];
    }
    int64_t inverse = ((int64_t)1 << 58) / total;
    const __m512i inverse8 = _mm512_set1_epi64(inverse), pmax = _mm512_set1_epi64(PROB_MAX), top8 = _mm512_set1_epi64(top);
    const __m512i low7 = _mm512_set1_epi64(127);
    __m512i sum8 = _mm512_setzero_si512();
    for (j = 0; j + 8 <= length; j += 8) {
        __m512i p = _mm512_min_epi64(_mm512_srai_epi64(_mm512_mullo_epi64(_mm512_loadu_si512((const void *)(sc + j)), inverse8), 58 - PROB_BITS), pmax);
        __m512i shift = _mm512_min_epi64(_mm512_sub_epi64(top8, _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(v_exp + j)))), sixty3);
        __m512i w = _mm512_srav_epi64(p, shift);
        sum8 = _mm512_add_epi64(sum8, w);
        __m128i lo = _mm512_cvtepi64_epi8(_mm512_and_si512(w, low7)), hi = _mm512_cvtepi64_epi8(_mm512_srai_epi64(w, 7));
        int8_t *g0 = wact + (j / 4) * wstride, *g1 = g0 + wstride;
        uint32_t bytes[4];
        _mm_storel_epi64((__m128i *)bytes, lo);
        _mm_storel_epi64((__m128i *)(bytes + 2), hi);
        memcpy(g0, &bytes[0], 4);
        memcpy(g0 + 4, &bytes[2], 4);
        memcpy(g1, &bytes[1], 4);
        memcpy(g1 + 4, &bytes[3], 4);
    }
    int64_t sum = _mm512_reduce_add_epi64(sum8);
    for (; j < length; j++)
        sum += store_weight(wact, wstride, j, sc[j], inverse, top, v_exp);
    clear_weights(wact, wstride, length, length);
    return sum;
}
#endif

/* attention of one stream's query heads of one key-value head */
static void attend(xctx *c, int64_t s, int64_t kv, int64_t tid) {
    const xmodel *M = c->M;
    int64_t hd = M->head_dim, group = M->n_head / M->n_head_kv, layer = c->layer;
    int64_t pos = c->positions[s], length = pos + 1;
    int simd = (int)c->simd;
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
    /* the queries, interleaved head by head */
    int8_t *qact = c->qact + tid * (hd / 4) * MAX_GROUP * 8;
    int64_t q_exp[MAX_GROUP], q_sum[MAX_GROUP];
    for (int64_t h = 0; h < group; h++) {
        int64_t *q = qv + h * hd;
        for (int64_t d = 0; d < hd; d++)
            q[d] = y[(kv * group + h) * hd + d];
        rope(q, cos, sin, M->n_rot);
        int64_t tq = quant_shift(q, hd, ACT_BITS);
        for (int64_t d = 0; d < hd; d++)
            q[d] = quant_one(q[d], tq, ACT_BITS);
        q_sum[h] = store_act(simd, q, hd, hd, qact + 8 * h, 8 * group, 1);
        q_exp[h] = tq - F;
    }
    /* scores: keys are the rows of a tile product with the queries */
    int64_t *scores = c->scores + tid * MAX_GROUP * c->ctx_pad;
    int32_t out_lo[MAX_GROUP][TILE], out_hi[MAX_GROUP][TILE];
    int64_t blocks = (length + TILE - 1) / TILE;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *key_tile = keys + (size_t)b * (hd / 4) * 64;
        int64_t count = length - b * TILE < TILE ? length - b * TILE : TILE;
        c->tile(key_tile, hd / 4, 64, group, qact, 8 * group, out_lo, out_hi);
        for (int64_t h = 0; h < group; h++) {
#if X86
            if (simd == SIMD_VNNI) {
                scores_block_vnni(out_lo[h], out_hi[h], q_sum[h], q_exp[h], k_exp + b * TILE, M->kq, count, scores + h * c->ctx_pad + b * TILE);
                continue;
            }
#endif
            scores_block(out_lo[h], out_hi[h], simd, q_sum[h], q_exp[h], k_exp + b * TILE, key_tile, hd, M->kq, count,
                         scores + h * c->ctx_pad + b * TILE);
        }
    }
    /* softmax weights, shifted to the largest value exponent */
    int64_t top = INT64_MIN;
    for (int64_t j = 0; j < length; j++)
        top = v_exp[j] > top ? v_exp[j] : top;
    int8_t *wact = c->wact + tid * (c->ctx_pad / 4) * MAX_GROUP * 8;
    int64_t w_sum[MAX_GROUP];
    int64_t padded = (length + 3) / 4 * 4;
    for (int64_t h = 0; h < group; h++) {
#if X86
        if (simd == SIMD_VNNI) {
            w_sum[h] = softmax_weights_vnni(scores + h * c->ctx_pad, length, v_exp, top, M->exp2, wact + 8 * h, 8 * group);
            continue;
        }
#endif
        w_sum[h] = softmax_weights(scores + h * c->ctx_pad, length, v_exp, top, M->exp2, wact + 8 * h, 8 * group);
    }
    /* values: dimensions are the rows, cells the columns */
    int32_t *out = c->attn + s * M->n_embd + kv * group * hd;
    for (int64_t d0 = 0; d0 < hd; d0 += TILE) {
        c->tile(values + d0 * 4, padded / 4, hd * 4, group, wact, 8 * group, out_lo, out_hi);
        for (int64_t h = 0; h < group; h++)
            for (int r = 0; r < TILE; r++) {
                int64_t o = exact_sum(simd, out_lo[h][r], out_hi[h][r], w_sum[h], 0, 0);
                out[h * hd + d0 + r] = (int32_t)sat32(rnd64(o, PROB_BITS - F - top));
            }
    }
}

/* attention by streams (fewer streams than threads: by heads, and the quantisation after) */
static void phase_attention(xctx *c, int64_t tid) {
    int64_t n = c->M->n_embd, heads = c->M->n_head_kv;
    if (c->n >= c->threads) {
        int64_t s0, s1;
        split(c->n, tid, c->threads, &s0, &s1);
        for (int64_t s = s0; s < s1; s++) {
            for (int64_t kv = 0; kv < heads; kv++)
                attend(c, s, kv, tid);
            int64_t *v = c->wide + s * c->k_pad;
            for (int64_t i = 0; i < n; i++)
                v[i] = c->attn[s * n + i];
            plain_quantize(c, s, v, n, F);
        }
        return;
    }
    int64_t u0, u1;
    split(c->n * heads, tid, c->threads, &u0, &u1);
    for (int64_t u = u0; u < u1; u++)
        attend(c, u / heads, u % heads, tid);
}

static void phase_attn_quant(xctx *c, int64_t tid) {
    int64_t s0, s1, n = c->M->n_embd;
    if (c->n >= c->threads)
        return; /* done in phase_attention */
    split(c->n, tid, c->threads, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        int64_t *v = c->wide + s * c->k_pad;
        for (int64_t i = 0; i < n; i++)
            v[i] = c->attn[s * n + i];
        plain_quantize(c, s, v, n, F);
    }
}

static void phase_o(xctx *c, int64_t tid) {
    matmul_part(c, &c->M->layers[c->layer].o, c->n, 0, c->y, c->y_stride, tid);
}

VEC static void add_saturated(int32_t *x, const int32_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        int64_t v = (int64_t)x[i] + y[i];
        x[i] = (int32_t)(v > INT32_MAX_ ? INT32_MAX_ : (v < -INT32_MAX_ ? -INT32_MAX_ : v));
    }
}

static void add_residual(xctx *c, int64_t s) {
    add_saturated(c->x + s * c->M->n_embd, c->y + s * c->y_stride, c->M->n_embd);
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
    matmul_part(c, &c->M->layers[c->layer].gateup, c->n, 0, c->y, c->y_stride, tid);
}

/* v = silu(gate) * up at 2F (reference.silu_times) */
VEC static void silu_times(int64_t *v, const int32_t *gate, const int32_t *up, const int64_t *sigmoid, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        int64_t g = gate[i];
        int64_t index = (g >> (F - 10)) + ((g >> (F - 11)) & 1);
        index = index < -SIGMOID_RANGE ? -SIGMOID_RANGE : (index > SIGMOID_RANGE ? SIGMOID_RANGE : index);
        int64_t product = g * sigmoid[index + SIGMOID_RANGE];
        v[i] = ((product >> 30) + ((product >> 29) & 1)) * up[i];
    }
}

static void phase_silu(xctx *c, int64_t tid) {
    const xmodel *M = c->M;
    int64_t s0, s1, n = M->n_ff;
    split(c->n, tid, c->threads, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        const int32_t *gate = c->y + s * c->y_stride, *up = gate + n;
        int64_t *v = c->wide + s * c->k_pad;
        silu_times(v, gate, up, M->sigmoid, n);
        plain_quantize(c, s, v, n, 2 * F);
    }
}

static void phase_down(xctx *c, int64_t tid) {
    matmul_part(c, &c->M->layers[c->layer].down, c->n, 0, c->y, c->y_stride, tid);
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
    matmul_part(c, &c->M->output, c->n_want, c->n_streams, c->logits, c->M->output.n_out, tid);
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
    c->act_rows = act_rows;
    c->act = calloc((size_t)act_rows * c->k_pad * 2, 1);
    c->act_sum = calloc(act_rows, sizeof(int64_t));
    c->act_k = calloc(act_rows, sizeof(int64_t));
    c->scores = calloc((size_t)threads * MAX_GROUP * c->ctx_pad, sizeof(int64_t));
    c->wact = calloc((size_t)threads * MAX_GROUP * c->ctx_pad * 2, 1);
    c->qbuf = calloc((size_t)threads * MAX_GROUP * M->head_dim, sizeof(int64_t));
    c->qact = calloc((size_t)threads * MAX_GROUP * M->head_dim * 2, 1);
    c->want_index = calloc(n_streams, sizeof(int64_t));
    c->barrier.n = (int)threads;
    if (!c->keys || !c->values || !c->k_exp || !c->v_exp || !c->x || !c->y || !c->attn || !c->wide || !c->act ||
        !c->act_sum || !c->act_k || !c->scores || !c->wact || !c->qbuf || !c->qact || !c->want_index) {
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
    free(c->act); free(c->act_sum); free(c->act_k); free(c->scores); free(c->wact);
    free(c->qbuf); free(c->qact); free(c->want_index);
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
        if (c->n < c->threads)
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
