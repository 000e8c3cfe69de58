/* Fused per-row loops of nacrith's hot path, bit-identical to the numpy code they replace.
 *
 * Each function does in one or two passes over a row what the numpy reference does in
 * several (the numpy code in nacrith/predictors/llm.py and ensemble.py is the reference and
 * the fallback; tests/test_units.py checks that both agree bit for bit). Every operation is
 * one IEEE operation of the same type and in the same order as there; the build turns off
 * floating-point contraction (no FMA) and never uses fast-math, so the results are the
 * same bits on every machine. The GIL is released while a function runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* The row loops are also compiled for AVX-512 (avx512f) and AVX2 and picked at load time
 * by what the CPU has (GCC's target_clones, on x86-64 with glibc, whose ifunc does the
 * dispatch). Wider vectors do the same IEEE operations on each element in the same order
 * (the build allows no reassociation and no FMA contraction), so the results are the same
 * bits either way. The AVX-512 clone cut the fused ensemble step's time by 8-14% on an
 * AVX-512 CPU (bench/experiments/kernel_ab.py, bench/experiments/FINDINGS.md). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define WIDE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WIDE
#endif

#define STEPS_PER_BIT 64
#define LIMIT (1000 * STEPS_PER_BIT)
#define ONE ((int64_t)1023 << 52)

/* numpy's max: NaN if the row holds one, else the largest value. Max is exact, so lanes
 * may take it in any order (SSE2 where the compiler targets it). A probe sum of v * 0 turns
 * NaN only if the row holds a NaN or an infinity, and only then is the row searched for a
 * NaN. */
static float row_max(const float *restrict row, long n) {
    float best = row[0], probe = 0.0f;
    long i = 0;
#ifdef __SSE2__
    __m128 best4[2] = {_mm_set1_ps(row[0]), _mm_set1_ps(row[0])};
    __m128 probe4[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
    const __m128 zero = _mm_setzero_ps();
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 2; k++) {
            __m128 v = _mm_loadu_ps(row + i + 4 * k);
            best4[k] = _mm_max_ps(v, best4[k]);  /* v > best ? v : best, lane by lane */
            probe4[k] = _mm_add_ps(probe4[k], _mm_mul_ps(v, zero));
        }
    float lanes[8];
    _mm_storeu_ps(lanes, _mm_max_ps(best4[0], best4[1]));
    for (int k = 0; k < 4; k++)
        best = lanes[k] > best ? lanes[k] : best;
    _mm_storeu_ps(lanes, _mm_add_ps(probe4[0], probe4[1]));
    for (int k = 0; k < 4; k++)
        probe += lanes[k];
#endif
    for (; i < n; i++) {
        best = row[i] > best ? row[i] : best;
        probe += row[i] * 0.0f;
    }
    if (probe != probe)  /* a NaN or an infinity somewhere: is there a NaN? */
        for (i = 0; i < n; i++)
            if (row[i] != row[i])
                return NAN;
    return best;
}

#define BLOCK 1024

/* The levels j = min(trunc((best - x) * scale), LIMIT) of count values of a row. */
static inline void row_levels(const float *restrict row, long count, float best, float scale, uint32_t *restrict levels) {
    for (long i = 0; i < count; i++) {
        float distance = best - row[i];
        distance = distance * scale;
        /* !(distance < LIMIT) catches NaN and overflow too, as numpy's clamp does */
        uint32_t level = distance < (float)LIMIT ? (uint32_t)(int32_t)distance : (uint32_t)LIMIT;
        levels[i] = level < (uint32_t)LIMIT ? level : (uint32_t)LIMIT;  /* a negative distance (cannot occur) too */
    }
}

/* One row: see exp2_rows; returns the row's maximum logit. Levels go through a small int32
 * buffer so that both loops work on lanes of one width (which SSE2 alone can vectorise). */
WIDE static float exp2_row(const float *restrict row, int64_t *restrict dest, long n, float scale) {
    float best = row_max(row, n);
    uint32_t levels[BLOCK];
    for (long start = 0; start < n; start += BLOCK) {
        long count = n - start < BLOCK ? n - start : BLOCK;
        row_levels(row + start, count, best, scale, levels);
        for (long i = 0; i < count; i++)
            dest[start + i] = ONE - (int64_t)((uint64_t)levels[i] << 46);
    }
    return best;  /* finite: the row's largest value is 1.0 (level 0), else every value is 2^-1000 */
}

/* exp2_rows(logits, out, cols, scale): out[r, i] = 2^(-j/64) (Schraudolph) with
 * j = min(trunc((max(row r) - logits[r, i]) * scale), LIMIT); NaN and overflow give LIMIT.
 * logits: float32, rows x cols; out: float64, rows x cols. */
static PyObject *exp2_rows(PyObject *self, PyObject *args) {
    Py_buffer logits, out;
    Py_ssize_t cols;
    float scale;
    if (!PyArg_ParseTuple(args, "y*w*nf", &logits, &out, &cols, &scale))
        return NULL;
    Py_ssize_t n = logits.len / (Py_ssize_t)sizeof(float);
    if (cols <= 0 || n % cols || out.len != n * (Py_ssize_t)sizeof(int64_t)) {
        PyBuffer_Release(&logits);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "exp2_rows: buffer sizes do not match");
        return NULL;
    }
    const float *in = (const float *)logits.buf;
    int64_t *bits = (int64_t *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t start = 0; start < n; start += cols)
        exp2_row(in + start, bits + start, (long)cols, scale);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&logits);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* Optional bias tables: a 2-D float32 table (None or empty: none) and, per row, which of its rows. */
typedef struct {
    Py_buffer table, rows;
    Py_ssize_t n_rows;
} Bias;

static int bias_open(PyObject *table, PyObject *rows, Py_ssize_t cols, Py_ssize_t n_index, Bias *bias) {
    memset(bias, 0, sizeof *bias);  /* released buffers with no object are a no-op */
    if (table == Py_None)
        return 0;
    if (PyObject_GetBuffer(table, &bias->table, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
        return -1;
    if (PyObject_GetBuffer(rows, &bias->rows, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&bias->table);
        return -1;
    }
    bias->n_rows = bias->table.len / (Py_ssize_t)sizeof(float) / cols;
    if (bias->table.len % (cols * (Py_ssize_t)sizeof(float)) || (bias->n_rows && bias->rows.len < n_index * (Py_ssize_t)sizeof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "bias table or row index of the wrong size");
        PyBuffer_Release(&bias->table);
        PyBuffer_Release(&bias->rows);
        return -1;
    }
    const int64_t *index = (const int64_t *)bias->rows.buf;
    for (Py_ssize_t r = 0; bias->n_rows && r < n_index; r++)
        if (index[r] < 0 || index[r] >= bias->n_rows) {
            PyErr_SetString(PyExc_IndexError, "bias row out of range");
            PyBuffer_Release(&bias->table);
            PyBuffer_Release(&bias->rows);
            return -1;
        }
    return 0;
}

static void bias_close(Bias *bias) {
    PyBuffer_Release(&bias->table);
    PyBuffer_Release(&bias->rows);
}

/* Both optional tables of a call; on failure neither is left open. */
static int biases_open(PyObject *table_a, PyObject *rows_a, PyObject *table_b, PyObject *rows_b, Py_ssize_t cols, Py_ssize_t n_index,
                       Bias *a, Bias *b) {
    if (bias_open(table_a, rows_a, cols, n_index, a) < 0)
        return -1;
    if (bias_open(table_b, rows_b, cols, n_index, b) < 0) {
        bias_close(a);
        return -1;
    }
    return 0;
}

static void biases_close(Bias *a, Bias *b) {
    bias_close(a);
    bias_close(b);
}

static float *bias_row(const Bias *bias, Py_ssize_t r, Py_ssize_t cols) {
    return bias->n_rows ? (float *)bias->table.buf + ((const int64_t *)bias->rows.buf)[r] * cols : NULL;
}

/* scores[i] = ((row[i] * temperature) + a[i]) + b[i], each step rounded to float32; a or b
 * NULL adds nothing. One loop per case, so that each vectorises. */
WIDE static void scale_and_add(const float *restrict row, const float *restrict a, const float *restrict b, float temperature,
                          float *restrict scores, Py_ssize_t n) {
    if (a && b)
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = row[i] * temperature;
            x = x + a[i];
            scores[i] = x + b[i];
        }
    else if (a || b) {
        const float *c = a ? a : b;
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = row[i] * temperature;
            scores[i] = x + c[i];
        }
    } else
        for (Py_ssize_t i = 0; i < n; i++)
            scores[i] = row[i] * temperature;
}

/* numpy's pairwise sum (numpy/_core/src/umath/loops_utils.h.src, unchanged since numpy
 * 1.9), which row.sum() and rows.sum(axis=1) use on contiguous float64 rows: eight running
 * sums per block of up to 128 values, blocks halved at multiples of eight. The same
 * additions in the same order, so the same bits; ELEMENT(i) gives value i (a row entry, or
 * a float64 product computed as numpy's multiply would). */
#define PAIRWISE_SUM(name, ARGS, ELEMENT, CALL_ARGS_LEFT, CALL_ARGS_RIGHT)                              \
    WIDE static double name ARGS {                                                                         \
        if (n < 8) {                                                                                  \
            double sum = -0.0;                                                                        \
            for (long i = 0; i < n; i++)                                                              \
                sum += ELEMENT(i);                                                                    \
            return sum;                                                                               \
        }                                                                                             \
        if (n <= 128) {                                                                               \
            double r[8];                                                                              \
            long i;                                                                                   \
            for (int k = 0; k < 8; k++)                                                               \
                r[k] = ELEMENT(k);                                                                    \
            for (i = 8; i < n - (n % 8); i += 8)                                                      \
                for (int k = 0; k < 8; k++)                                                           \
                    r[k] += ELEMENT(i + k);                                                           \
            double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));           \
            for (; i < n; i++)                                                                        \
                sum += ELEMENT(i);                                                                    \
            return sum;                                                                               \
        }                                                                                             \
        long half = n / 2;                                                                            \
        half -= half % 8;                                                                             \
        return name CALL_ARGS_LEFT + name CALL_ARGS_RIGHT;                                            \
    }

#define ROW_ENTRY(i) (p[i])
#define ROW_PRODUCT(i) (p[i] * (double)x[i])
PAIRWISE_SUM(pairwise_sum, (const double *restrict p, long n), ROW_ENTRY, (p, half), (p + half, n - half))
PAIRWISE_SUM(pairwise_dot, (const double *restrict p, const float *restrict x, long n), ROW_PRODUCT, (p, x, half),
             (p + half, x + half, n - half))

/* One model row: exp2 of the scores ((x * temperature) + a) + b (scale_and_add) into p, via
 * the float32 scratch; its sum (total not NULL) and its dot with x (dot not NULL) in numpy's
 * pairwise order, taken while the row is in the cache. Returns the scores' maximum (exp2_row). */
static float model_row(const float *x, const float *a, const float *b, float temperature, float scale, float *scores, double *p,
                       Py_ssize_t cols, double *total, double *dot) {
    scale_and_add(x, a, b, temperature, scores, cols);
    float best = exp2_row(scores, (int64_t *)p, (long)cols, scale);
    if (total)
        *total = pairwise_sum(p, (long)cols);
    if (dot)
        *dot = pairwise_dot(p, x, (long)cols);
    return best;
}

/* scores_exp2_rows(logits, out, scratch, cols, scale, temperature, table_a, rows_a, table_b, rows_b):
 * exp2_rows of the scores ((logits[r] * temperature) + table_a[rows_a[r]]) + table_b[rows_b[r]],
 * each operation rounded to float32 in that order (a table of None adds nothing). scratch:
 * float32 of at least cols values. The ensemble's _model_scores followed by the table.
 * Optional totals and dots (float64, one per row; None: not computed): each row's sum and
 * the sum of its products with the logits, as rows.sum(axis=1) and (rows * logits).sum(axis=1)
 * give them, taken while the row is still in the cache. */
static PyObject *scores_exp2_rows(PyObject *self, PyObject *args) {
    Py_buffer logits, out, scratch;
    Py_ssize_t cols;
    float scale, temperature;
    PyObject *table_a, *rows_a, *table_b, *rows_b, *totals_object = Py_None, *dots_object = Py_None;
    Py_buffer totals = {0}, dots = {0};
    if (!PyArg_ParseTuple(args, "y*w*w*nffOOOO|OO", &logits, &out, &scratch, &cols, &scale, &temperature, &table_a, &rows_a, &table_b,
                          &rows_b, &totals_object, &dots_object))
        return NULL;
    Py_ssize_t n = logits.len / (Py_ssize_t)sizeof(float);
    Bias a, b;
    int ok = cols > 0 && n % cols == 0 && out.len == n * (Py_ssize_t)sizeof(int64_t) && scratch.len >= cols * (Py_ssize_t)sizeof(float);
    if (ok && totals_object != Py_None)
        ok = PyObject_GetBuffer(totals_object, &totals, PyBUF_WRITABLE) == 0 && totals.len == n / cols * (Py_ssize_t)sizeof(double);
    if (ok && dots_object != Py_None)
        ok = PyObject_GetBuffer(dots_object, &dots, PyBUF_WRITABLE) == 0 && dots.len == n / cols * (Py_ssize_t)sizeof(double);
    if (!ok && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "scores_exp2_rows: buffer sizes do not match");
    if (ok && biases_open(table_a, rows_a, table_b, rows_b, cols, n / cols, &a, &b) < 0)
        ok = 0;
    if (ok) {
        const float *in = (const float *)logits.buf;
        int64_t *bits = (int64_t *)out.buf;
        float *scores = (float *)scratch.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < n / cols; r++) {
            model_row(in + r * cols, bias_row(&a, r, cols), bias_row(&b, r, cols), temperature, scale, scores, (double *)(bits + r * cols), cols,
                      totals.obj ? (double *)totals.buf + r : NULL, dots.obj ? (double *)dots.buf + r : NULL);
        }
        Py_END_ALLOW_THREADS
        biases_close(&a, &b);
    }
    PyBuffer_Release(&logits);
    PyBuffer_Release(&out);
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&totals);  /* no-op when never opened */
    PyBuffer_Release(&dots);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* table[i] -= float32(row[i] * factor): one bias table's learning step. */
WIDE static void subtract_step(float *restrict table, const double *restrict row, double factor, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        table[i] = table[i] - (float)(row[i] * factor);
}

/* One AdaGrad step of a table row: g = (float)(row[i] * inverse) (minus 1 at the token),
 * squares[i] += g * g, table[i] -= (lr * g) / sqrtf(eps + squares[i]), each operation
 * rounded to float32 (sqrtf and the division are exactly rounded by IEEE 754). The loop
 * takes g without the 1 everywhere, then redoes the token's entry from its saved values. */
WIDE static void adagrad_step(float *restrict table, float *restrict squares, const double *restrict row, double inverse, float lr,
                              float eps, Py_ssize_t n, Py_ssize_t token) {
    float table_token = table[token], squares_token = squares[token];
    for (Py_ssize_t i = 0; i < n; i++) {
        float g = (float)(row[i] * inverse);
        float sum = squares[i] + g * g;
        squares[i] = sum;
        table[i] = table[i] - (lr * g) / sqrtf(eps + sum);
    }
    float g = (float)(row[token] * inverse) - 1.0f;
    float sum = squares_token + g * g;
    squares[token] = sum;
    table[token] = table_token - (lr * g) / sqrtf(eps + sum);
}

/* The writable float32 buffer of an AdaGrad squares table shaped like its bias table (0),
 * none when the object is None or the table is absent (0, buffer->obj NULL), else -1. */
static int squares_open(PyObject *object, const Bias *table, Py_buffer *buffer) {
    buffer->obj = NULL;
    if (object == Py_None || !table->n_rows)
        return 0;
    if (PyObject_GetBuffer(object, buffer, PyBUF_WRITABLE) < 0)
        return -1;
    if (buffer->len != table->table.len) {
        PyBuffer_Release(buffer);
        buffer->obj = NULL;
        PyErr_SetString(PyExc_ValueError, "learn_bias: a squares table differs from its bias table");
        return -1;
    }
    return 0;
}

/* Stream s's learning step on its row of one bias table (none if the table is absent):
 * adagrad when the table's squares are given, else sgd. */
static void learn_row(const Bias *bias, const Py_buffer *squares, Py_ssize_t s, const double *row, double total, double lr, float eps,
                      Py_ssize_t cols, Py_ssize_t token) {
    float *table = bias_row(bias, s, cols);
    if (!table)
        return;
    if (squares->obj) {
        float *sums = (float *)squares->buf + ((const int64_t *)bias->rows.buf)[s] * cols;
        adagrad_step(table, sums, row, 1.0 / total, (float)lr, eps, cols, token);
        return;
    }
    subtract_step(table, row, lr / total, cols);
    table[token] = table[token] + (float)lr;
}

/* learn_bias(probabilities, cols, streams, totals, symbols, lr, table_a, rows_a, table_b, rows_b
 *            [, lr_b, eps, squares_a, squares_b]):
 * for each stream s of `streams` in order, one gradient step of the code length on its row
 * of table_a (rate lr) and then of table_b (rate lr_b, default lr); a table of None is
 * skipped. sgd (no squares): with step = float32(probabilities[s] * (lr / totals[s])),
 * table -= step, then its symbols[s] entry += float32(lr). adagrad (squares_a/b: float32
 * tables shaped like their bias tables, the sums of squared gradients): adagrad_step with
 * eps. probabilities: float64 rows; totals: float64 and symbols: int64, one per row. The
 * ensemble's _learn_bias, one pass per stream and table. */
static PyObject *learn_bias(PyObject *self, PyObject *args) {
    Py_buffer probabilities, streams, totals, symbols;
    Py_ssize_t cols;
    double lr, lr_b = NAN, eps = 1.0;
    PyObject *table_a, *rows_a, *table_b, *rows_b, *squares_a = Py_None, *squares_b = Py_None;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*dOOOO|ddOO", &probabilities, &cols, &streams, &totals, &symbols, &lr, &table_a, &rows_a,
                          &table_b, &rows_b, &lr_b, &eps, &squares_a, &squares_b))
        return NULL;
    if (lr_b != lr_b)
        lr_b = lr;
    Py_ssize_t n_rows = cols > 0 ? probabilities.len / (Py_ssize_t)sizeof(double) / cols : 0;
    Py_ssize_t n_learn = streams.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *learn = (const int64_t *)streams.buf, *symbol = (const int64_t *)symbols.buf;
    int ok = cols > 0 && probabilities.len == n_rows * cols * (Py_ssize_t)sizeof(double) && totals.len >= n_rows * (Py_ssize_t)sizeof(double) && symbols.len >= n_rows * (Py_ssize_t)sizeof(int64_t);
    for (Py_ssize_t k = 0; ok && k < n_learn; k++)
        ok = learn[k] >= 0 && learn[k] < n_rows && symbol[learn[k]] >= 0 && symbol[learn[k]] < cols;
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "learn_bias: buffer sizes or indices do not match");
    Bias a, b;
    Py_buffer sq_a = {0}, sq_b = {0};
    if (ok && biases_open(table_a, rows_a, table_b, rows_b, cols, n_rows, &a, &b) < 0)
        ok = 0;
    else if (ok && (squares_open(squares_a, &a, &sq_a) < 0 || squares_open(squares_b, &b, &sq_b) < 0)) {
        ok = 0;
        biases_close(&a, &b);
    }
    if (ok) {
        const double *p = (const double *)probabilities.buf, *total = (const double *)totals.buf;
        float eps32 = (float)eps;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < n_learn; k++) {
            Py_ssize_t s = learn[k];
            learn_row(&a, &sq_a, s, p + s * cols, total[s], lr, eps32, cols, symbol[s]);
            learn_row(&b, &sq_b, s, p + s * cols, total[s], lr_b, eps32, cols, symbol[s]);
        }
        Py_END_ALLOW_THREADS
        biases_close(&a, &b);
    }
    PyBuffer_Release(&sq_a);
    PyBuffer_Release(&sq_b);
    PyBuffer_Release(&probabilities);
    PyBuffer_Release(&streams);
    PyBuffer_Release(&totals);
    PyBuffer_Release(&symbols);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- nacrith's 24-bit range coder ("int24", see nacrith/coder.py for the definition) ---- */

#define PRECISION 24
#define TOTAL ((uint64_t)1 << PRECISION)
#define WORD_BITS 32
#define LOW_LIMIT ((uint64_t)1 << (64 - WORD_BITS))  /* range never drops below this between symbols */

/* A row's quantisation: w_i = weight(p_i), S = sum w_i, scale = (2^24 - n) / S. */
typedef struct {
    const double *p;    /* the row as float64 probabilities, or NULL: */
    const uint32_t *w;  /* the row as its weights w_i, already computed (exp2_weight_rows) */
    double factor, factor2, scale;  /* see weight_factors */
} Quant;

/* The weight rule for a row whose largest value is best: w = trunc((p * factor) * factor2)
 * with factor * factor2 = 2^(31 - e), best = f * 2^e (0.5 <= f < 1), so the largest w is in
 * [2^30, 2^31); the power of two is split in two because 2^k alone could overflow for tiny
 * rows, and factor2 is 1 unless the row's maximum is below 2^-969. */
static void weight_factors(double best, double *factor, double *factor2) {
    int e;
    frexp(best, &e);
    int k = 31 - e, k1 = k < 1000 ? k : 1000;
    *factor = ldexp(1.0, k1);
    *factor2 = ldexp(1.0, k - k1);
}

static inline uint32_t weight(double p, double factor, double factor2) {
    return (uint32_t)(int32_t)((p * factor) * factor2);
}

/* sum of w_i for i in [from, to). The w_i lie in [0, 2^31), so SSE2 converts two at a time
 * to int32 (truncating, as a C cast does) and adds them, zero-extended, to int64 lanes;
 * integer sums are exact in any order. */
static uint64_t sum_w(const double *restrict p, long from, long to, double factor, double factor2) {
    uint64_t total = 0;
    long i = from;
    if (factor2 != 1.0) {  /* rows whose maximum is below 2^-969: two exact-order multiplications */
        for (; i < to; i++)
            total += weight(p[i], factor, factor2);
        return total;
    }
#ifdef __SSE2__
    const __m128d f = _mm_set1_pd(factor);
    const __m128i zero = _mm_setzero_si128();
    __m128i acc[2] = {zero, zero};
    for (; i + 4 <= to; i += 4)
        for (int k = 0; k < 2; k++) {
            __m128i w = _mm_cvttpd_epi32(_mm_mul_pd(_mm_loadu_pd(p + i + 2 * k), f));
            acc[k] = _mm_add_epi64(acc[k], _mm_unpacklo_epi32(w, zero));
        }
    uint64_t lanes[2];
    _mm_storeu_si128((__m128i *)lanes, _mm_add_epi64(acc[0], acc[1]));
    total = lanes[0] + lanes[1];
#endif
    for (; i < to; i++)
        total += (uint64_t)(int32_t)(p[i] * factor);
    return total;
}

/* 0 on success; -1 if the row is not a valid distribution (NaN, negative, infinite, all
 * zero, or n outside [2, 2^24 - 1)). */
static int quant_row(const double *restrict p, long n, Quant *q) {
    if (n < 2 || (uint64_t)n >= TOTAL - 1)
        return -1;
    q->p = p;
    q->w = NULL;
    double best = p[0], least = p[0], probe = 0.0;
    long i = 0;
#ifdef __SSE2__
    __m128d best2 = _mm_set1_pd(p[0]), least2 = best2, probe2 = _mm_setzero_pd();
    const __m128d zero = _mm_setzero_pd();
    for (; i + 2 <= n; i += 2) {
        __m128d v = _mm_loadu_pd(p + i);
        best2 = _mm_max_pd(v, best2);
        least2 = _mm_min_pd(v, least2);
        probe2 = _mm_add_pd(probe2, _mm_mul_pd(v, zero));  /* NaN if a NaN or an infinity */
    }
    double lanes[2];
    _mm_storeu_pd(lanes, best2);
    best = lanes[0] > lanes[1] ? lanes[0] : lanes[1];
    _mm_storeu_pd(lanes, least2);
    least = lanes[0] < lanes[1] ? lanes[0] : lanes[1];
    _mm_storeu_pd(lanes, probe2);
    probe = lanes[0] + lanes[1];
#endif
    for (; i < n; i++) {
        best = p[i] > best ? p[i] : best;
        least = p[i] < least ? p[i] : least;
        probe += p[i] * 0.0;
    }
    if (probe != 0.0 || !(least >= 0.0) || !(best > 0.0))
        return -1;
    weight_factors(best, &q->factor, &q->factor2);
    q->scale = (double)(TOTAL - (uint64_t)n) / (double)sum_w(p, 0, n, q->factor, q->factor2);
    return 0;
}

/* The same for a row given as weights and their total. */
static int quant_weights(const uint32_t *w, uint64_t total, long n, Quant *q) {
    if (n < 2 || (uint64_t)n >= TOTAL - 1 || total == 0)
        return -1;
    q->p = NULL;
    q->w = w;
    q->scale = (double)(TOTAL - (uint64_t)n) / (double)total;
    return 0;
}

/* sum of w_i for i in [from, to) of either kind of row */
static uint64_t row_sum(const Quant *q, long from, long to) {
    if (q->p)
        return sum_w(q->p, from, to, q->factor, q->factor2);
    uint64_t total = 0;
    for (long i = from; i < to; i++)
        total += q->w[i];
    return total;
}

/* left(s) = trunc(C_s * scale) + s with C_s = w_0 + ... + w_(s-1), for s < n (left(n) = 2^24). */
static uint64_t left_of(uint64_t prefix, long s, const Quant *q) {
    return (uint64_t)((double)prefix * q->scale) + (uint64_t)s;
}

#define SKIP 64  /* the decoder's search skips whole runs of this many symbols while it can */

/* The end of a coder call: release its five buffers (one not taken, obj NULL, is skipped by
 * PyBuffer_Release); the result, or NULL with a ValueError. */
static PyObject *end_call(Py_buffer *buffers[5], const char *error, Py_ssize_t result) {
    for (int i = 0; i < 5; i++)
        PyBuffer_Release(buffers[i]);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    return PyLong_FromSsize_t(result);
}

/* The rows of a coder call: float64 probabilities (totals None), or uint32 weights with
 * their uint64 totals. Returns the number of rows, or -1 if the sizes do not match. */
static Py_ssize_t open_rows(Py_buffer *probs, PyObject *totals_object, Py_buffer *totals, Py_ssize_t cols) {
    totals->obj = NULL;
    if (cols <= 0)
        return -1;
    if (totals_object == Py_None) {
        Py_ssize_t rows = probs->len / (Py_ssize_t)sizeof(double) / cols;
        return probs->len == rows * cols * (Py_ssize_t)sizeof(double) ? rows : -1;
    }
    if (PyObject_GetBuffer(totals_object, totals, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        totals->obj = NULL;
        return -1;
    }
    Py_ssize_t rows = totals->len / (Py_ssize_t)sizeof(uint64_t);
    return totals->len == rows * (Py_ssize_t)sizeof(uint64_t) && probs->len == rows * cols * (Py_ssize_t)sizeof(uint32_t) ? rows : -1;
}

/* Row r of a coder call, quantised; 0 on success. */
static int open_row(const Py_buffer *probs, const Py_buffer *totals, Py_ssize_t r, Py_ssize_t cols, Quant *q) {
    if (totals->obj)
        return quant_weights((const uint32_t *)probs->buf + r * cols, ((const uint64_t *)totals->buf)[r], (long)cols, q);
    return quant_row((const double *)probs->buf + r * cols, (long)cols, q);
}

/* The encoder's state between symbols: constriction 0.5's queue range coder
 * (stream/queue.rs), 64-bit state, 32-bit words. */
typedef struct {
    uint64_t lower, range, inverted;
    uint32_t first_inverted;
    uint32_t *words;     /* room for one word per symbol plus the inverted words at the start */
    Py_ssize_t written;
} Encoder;

/* Code the interval [left, right) of 2^24 (0 <= left < right <= 2^24). */
static void encode_interval(Encoder *e, uint64_t left, uint64_t right) {
    uint64_t scale = e->range >> PRECISION;
    e->range = scale * (right - left);
    uint64_t new_lower = e->lower + scale * left;
    if (e->inverted && new_lower + e->range > new_lower) {  /* the carry is settled: flush */
        uint32_t first = new_lower < e->lower ? e->first_inverted + 1 : e->first_inverted;
        uint32_t next = new_lower < e->lower ? 0 : 0xFFFFFFFFu;
        e->words[e->written++] = first;
        for (uint64_t k = 1; k < e->inverted; k++)
            e->words[e->written++] = next;
        e->inverted = 0;
    }
    e->lower = new_lower;
    if (e->range < LOW_LIMIT) {
        e->range <<= WORD_BITS;
        uint32_t word = (uint32_t)(e->lower >> (64 - WORD_BITS));
        e->lower <<= WORD_BITS;
        if (e->inverted)
            e->inverted++;
        else if (e->lower + e->range > e->lower)
            e->words[e->written++] = word;
        else {
            e->inverted = 1;
            e->first_inverted = word;
        }
    }
}

/* Code symbol s of a quantised row of cols entries. */
static void encode_symbol(Encoder *e, const Quant *q, long s, long cols) {
    uint64_t prefix = row_sum(q, 0, s);
    uint64_t left = left_of(prefix, s, q);
    uint64_t right = s == cols - 1 ? TOTAL : left_of(prefix + row_sum(q, s, s + 1), s + 1, q);
    encode_interval(e, left, right);
}

/* An encoder from the state array a Python coder keeps (lower, range, inverted words,
 * first inverted word), writing into words; encoder_save puts its state back. */
static Encoder encoder_open(const uint64_t *state, uint32_t *words) {
    return (Encoder){state[0], state[1], state[2], (uint32_t)state[3], words, 0};
}

static void encoder_save(const Encoder *e, uint64_t *state) {
    state[0] = e->lower, state[1] = e->range, state[2] = e->inverted, state[3] = e->first_inverted;
}

/* The decoder's state between symbols. */
typedef struct {
    uint64_t lower, range, point, next, n_words;
    const uint32_t *words;
} Decoder;

/* A decoder from its state array (lower, range, point, next word) over n_words coded words;
 * decoder_save puts its state back. */
static Decoder decoder_open(const uint64_t *state, const uint32_t *words, uint64_t n_words) {
    return (Decoder){state[0], state[1], state[2], state[3], n_words, words};
}

static void decoder_save(const Decoder *d, uint64_t *state) {
    state[0] = d->lower, state[1] = d->range, state[2] = d->point, state[3] = d->next;
}

/* The next symbol, coded with a quantised row of cols entries; -1 on invalid data. */
static long decode_symbol(Decoder *d, const Quant *q, long cols) {
    uint64_t scale = d->range >> PRECISION;
    uint64_t quantile = (d->point - d->lower) / scale;
    if (quantile >= TOTAL)
        return -1;
    /* the symbol s with left(s) <= quantile < left(s + 1) */
    uint64_t prefix = 0, right = TOTAL;
    long s = 0;
    /* left is increasing: skip runs of SKIP symbols that end at or below the quantile */
    while (s + SKIP < cols) {
        uint64_t after = prefix + row_sum(q, s, s + SKIP);
        if (left_of(after, s + SKIP, q) > quantile)
            break;
        prefix = after;
        s += SKIP;
    }
    uint64_t left = left_of(prefix, s, q);
    for (; s < cols - 1; s++) {
        uint64_t after = prefix + row_sum(q, s, s + 1);
        right = left_of(after, s + 1, q);
        if (right > quantile)
            break;
        prefix = after;
        left = right;
    }
    if (s == cols - 1)
        right = TOTAL;
    d->lower += scale * left;
    d->range = scale * (right - left);
    if (d->range < LOW_LIMIT) {
        d->lower <<= WORD_BITS;
        d->range <<= WORD_BITS;
        d->point <<= WORD_BITS;
        if (d->next < d->n_words)
            d->point |= d->words[d->next++];
    }
    return s;
}

/* int24_encode(rows, totals, symbols, state, out, cols) -> words written. rows: float64
 * probabilities (totals None) or uint32 weights (totals: uint64 per row), rows x cols;
 * symbols: int32 per row; state: uint64[4] (lower, range, inverted words, first inverted
 * word), updated; out: uint32 buffer with room for rows + state[2] words. */
static PyObject *int24_encode(PyObject *self, PyObject *args) {
    Py_buffer probs, totals, symbols, state, out;
    PyObject *totals_object;
    Py_ssize_t cols;
    if (!PyArg_ParseTuple(args, "y*Oy*w*w*n", &probs, &totals_object, &symbols, &state, &out, &cols))
        return NULL;
    Py_ssize_t rows = open_rows(&probs, totals_object, &totals, cols);
    const char *error = NULL;
    Py_ssize_t written = 0;
    if (rows < 0 || symbols.len != rows * (Py_ssize_t)sizeof(int32_t) ||
        state.len != 4 * (Py_ssize_t)sizeof(uint64_t) || out.len < (rows + (Py_ssize_t)((uint64_t *)state.buf)[2]) * (Py_ssize_t)sizeof(uint32_t)) {
        error = "int24_encode: buffer sizes do not match";
        goto done;
    }
    const int32_t *sym = (const int32_t *)symbols.buf;
    uint64_t *st = (uint64_t *)state.buf;
    Encoder e = encoder_open(st, (uint32_t *)out.buf);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        long s = sym[r];
        Quant q;
        if (s < 0 || s >= cols) {
            error = "int24_encode: symbol out of range";
            break;
        }
        if (open_row(&probs, &totals, r, cols, &q)) {
            error = "int24_encode: probabilities are not a valid distribution";
            break;
        }
        encode_symbol(&e, &q, s, (long)cols);
    }
    encoder_save(&e, st);
    written = e.written;
    Py_END_ALLOW_THREADS
done:
    return end_call((Py_buffer *[]){&probs, &totals, &symbols, &state, &out}, error, written);
}

/* int24_encode_intervals(lefts, rights, state, out) -> words written: code the intervals
 * [lefts[i], rights[i]) of 2^24 (int64 each, already quantised, e.g. on a GPU) in order;
 * state and out as for int24_encode. */
static PyObject *int24_encode_intervals(PyObject *self, PyObject *args) {
    Py_buffer lefts, rights, state, out;
    if (!PyArg_ParseTuple(args, "y*y*w*w*", &lefts, &rights, &state, &out))
        return NULL;
    const char *error = NULL;
    Py_ssize_t written = 0, rows = lefts.len / (Py_ssize_t)sizeof(int64_t);
    if (lefts.len != rows * (Py_ssize_t)sizeof(int64_t) || rights.len != lefts.len || state.len != 4 * (Py_ssize_t)sizeof(uint64_t) ||
        out.len < (rows + (Py_ssize_t)((uint64_t *)state.buf)[2]) * (Py_ssize_t)sizeof(uint32_t)) {
        error = "int24_encode_intervals: buffer sizes do not match";
        goto done;
    }
    const int64_t *l = (const int64_t *)lefts.buf, *r = (const int64_t *)rights.buf;
    uint64_t *st = (uint64_t *)state.buf;
    Encoder e = encoder_open(st, (uint32_t *)out.buf);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (l[i] < 0 || r[i] <= l[i] || (uint64_t)r[i] > TOTAL) {
            error = "int24_encode_intervals: an interval is empty or outside [0, 2^24)";
            break;
        }
        encode_interval(&e, (uint64_t)l[i], (uint64_t)r[i]);
    }
    encoder_save(&e, st);
    written = e.written;
    Py_END_ALLOW_THREADS
done:
    return end_call((Py_buffer *[]){&lefts, &rights, &state, &out, &(Py_buffer){0}}, error, written);
}

/* int24_decode(rows, totals, state, words, out, cols) -> symbols decoded (fewer than the
 * rows: invalid data). rows and totals as for int24_encode; state: uint64[4] (lower,
 * range, point, next word), updated; out: int32 per row. */
static PyObject *int24_decode(PyObject *self, PyObject *args) {
    Py_buffer probs, totals, state, data, out;
    PyObject *totals_object;
    Py_ssize_t cols;
    if (!PyArg_ParseTuple(args, "y*Ow*y*w*n", &probs, &totals_object, &state, &data, &out, &cols))
        return NULL;
    Py_ssize_t rows = open_rows(&probs, totals_object, &totals, cols);
    const char *error = NULL;
    Py_ssize_t decoded = 0;
    if (rows < 0 || out.len != rows * (Py_ssize_t)sizeof(int32_t) ||
        state.len != 4 * (Py_ssize_t)sizeof(uint64_t) || data.len % (Py_ssize_t)sizeof(uint32_t)) {
        error = "int24_decode: buffer sizes do not match";
        goto done;
    }
    uint64_t *st = (uint64_t *)state.buf;
    int32_t *sym = (int32_t *)out.buf;
    Decoder d = decoder_open(st, (const uint32_t *)data.buf, (uint64_t)(data.len / (Py_ssize_t)sizeof(uint32_t)));
    Py_BEGIN_ALLOW_THREADS
    for (; decoded < rows; decoded++) {
        Quant q;
        if (open_row(&probs, &totals, decoded, cols, &q)) {
            error = "int24_decode: probabilities are not a valid distribution";
            break;
        }
        long s = decode_symbol(&d, &q, (long)cols);
        if (s < 0)
            break;  /* invalid data */
        sym[decoded] = (int32_t)s;
    }
    decoder_save(&d, st);
    Py_END_ALLOW_THREADS
done:
    return end_call((Py_buffer *[]){&probs, &totals, &state, &data, &out}, error, decoded);
}

/* ---- the model's rows straight to int24 weights (nacrith.predictors.llm, nacrith.coder) ---- */

static double exp2_value(uint32_t level) {
    int64_t bits = ONE - (int64_t)((uint64_t)level << 46);
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* The int24 weights of one row's exp2 values and their total: what quant_row gives for the
 * float64 row exp2_row would write. A row with a finite maximum has a level-0 entry (the
 * maximum itself), so its largest value is 1.0 and its factor 2^30: one fused pass. Other
 * rows (NaN or infinite logits) take quant_row's general rule from their levels. */
WIDE static uint64_t exp2_weight_row(const float *restrict row, uint32_t *restrict w, long n, float scale, uint32_t *restrict levels) {
    float best = row_max(row, n);
    uint64_t total = 0;
    if (best - best == 0.0f) {  /* finite */
        /* trunc(2^(-j/64) * 2^30) for Schraudolph's 2^x is (128 - j % 64) * 2^(23 - j / 64),
         * exact in float32 too: built from float32 bits, with j capped at 32 * 64 (weight 0
         * from 31 * 64 on), every lane 32 bits wide, so SSE2 vectorises the loop */
        for (long i = 0; i < n; i++) {
            float distance = best - row[i];
            distance = distance * scale;
            uint32_t level = distance < (float)LIMIT ? (uint32_t)(int32_t)distance : (uint32_t)LIMIT;
            level = level < (uint32_t)LIMIT ? level : (uint32_t)LIMIT;
            level = level < 2048u ? level : 2048u;
            uint32_t bits = (157u << 23) - (level << 17);
            float value;
            memcpy(&value, &bits, sizeof value);
            w[i] = (uint32_t)(int32_t)value;
        }
        for (long i = 0; i < n; i++)
            total += w[i];
        return total;
    }
    row_levels(row, n, best, scale, levels);
    uint32_t least = LIMIT;
    for (long i = 0; i < n; i++)
        least = levels[i] < least ? levels[i] : least;
    double factor, factor2;
    weight_factors(exp2_value(least), &factor, &factor2);
    for (long i = 0; i < n; i++) {
        w[i] = weight(exp2_value(levels[i]), factor, factor2);
        total += w[i];
    }
    return total;
}

/* exp2_weight_rows(logits, weights, totals, cols, scale): the int24 weights (uint32, rows x
 * cols) and their totals (uint64 per row) of the exp2 rows exp2_rows would give, without
 * the float64 rows in between: the coder's input in half the memory. */
static PyObject *exp2_weight_rows(PyObject *self, PyObject *args) {
    Py_buffer logits, weights, totals;
    Py_ssize_t cols;
    float scale;
    if (!PyArg_ParseTuple(args, "y*w*w*nf", &logits, &weights, &totals, &cols, &scale))
        return NULL;
    Py_ssize_t n = logits.len / (Py_ssize_t)sizeof(float);
    Py_ssize_t rows = cols > 0 ? n / cols : 0;
    if (cols <= 0 || n % cols || weights.len != n * (Py_ssize_t)sizeof(uint32_t) || totals.len != rows * (Py_ssize_t)sizeof(uint64_t)) {
        PyBuffer_Release(&logits);
        PyBuffer_Release(&weights);
        PyBuffer_Release(&totals);
        PyErr_SetString(PyExc_ValueError, "exp2_weight_rows: buffer sizes do not match");
        return NULL;
    }
    const float *in = (const float *)logits.buf;
    uint32_t *w = (uint32_t *)weights.buf;
    uint64_t *total = (uint64_t *)totals.buf;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    uint32_t *levels = (uint32_t *)malloc((size_t)cols * sizeof(uint32_t));
    for (Py_ssize_t r = 0; levels && r < rows; r++)
        total[r] = exp2_weight_row(in + r * cols, w + r * cols, (long)cols, scale, levels);
    failed = levels == NULL;
    free(levels);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&logits);
    PyBuffer_Release(&weights);
    PyBuffer_Release(&totals);
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* scale_add_sum(row, factor, candidates, additions) -> total: row *= factor, then
 * row[candidates[k]] += additions[k] in order, then the row's sum in numpy's pairwise order
 * (taken while the row is still in the cache). row: float64; candidates: int64, distinct and
 * in range; additions: float64. The ensemble's linear mix of one row and rows.sum(axis=1). */
/* p[i] *= factor. */
WIDE static void scale_row(double *restrict p, double factor, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        p[i] *= factor;
}

/* The linear mix of one row: p *= factor, p[index[j]] += add[j] in order, then p's pairwise sum. */
static double mix_row(double *p, Py_ssize_t n, double factor, const int64_t *index, const double *add, Py_ssize_t k) {
    scale_row(p, factor, n);
    for (Py_ssize_t j = 0; j < k; j++)
        p[index[j]] += add[j];
    return pairwise_sum(p, (long)n);
}

static PyObject *scale_add_sum(PyObject *self, PyObject *args) {
    Py_buffer row, candidates, additions;
    double factor, total = 0.0;
    if (!PyArg_ParseTuple(args, "w*dy*y*", &row, &factor, &candidates, &additions))
        return NULL;
    Py_ssize_t n = row.len / (Py_ssize_t)sizeof(double), k = candidates.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *index = (const int64_t *)candidates.buf;
    int ok = additions.len == k * (Py_ssize_t)sizeof(double);
    for (Py_ssize_t j = 0; ok && j < k; j++)
        ok = index[j] >= 0 && index[j] < n;
    if (ok) {
        double *p = (double *)row.buf;
        const double *add = (const double *)additions.buf;
        Py_BEGIN_ALLOW_THREADS
        total = mix_row(p, n, factor, index, add, k);
        Py_END_ALLOW_THREADS
    } else
        PyErr_SetString(PyExc_ValueError, "scale_add_sum: bad candidates or sizes");
    PyBuffer_Release(&row);
    PyBuffer_Release(&candidates);
    PyBuffer_Release(&additions);
    return ok ? PyFloat_FromDouble(total) : NULL;
}

/* ---- the ensemble's whole step, stream by stream (nacrith.predictors.ensemble) ---- */

/* A buffer of a fused call: taken whole, with at least `items` items of `size` bytes, or
 * (object None and optional) none; NULL with an exception set when it does not fit. */
typedef struct {
    Py_buffer held[12];
    int n;
} Buffers;

static void *take(Buffers *all, PyObject *object, int writable, Py_ssize_t size, Py_ssize_t items, int optional, int *failed) {
    if (*failed || (optional && object == Py_None))
        return NULL;
    Py_buffer *buffer = &all->held[all->n];
    if (PyObject_GetBuffer(object, buffer, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        *failed = 1;
        return NULL;
    }
    all->n++;
    if (buffer->len < size * items || buffer->len % size) {
        PyErr_SetString(PyExc_ValueError, "ensemble_int24: buffer sizes do not match");
        *failed = 1;
        return NULL;
    }
    return buffer->buf;
}

static void release_all(Buffers *all) {
    while (all->n)
        PyBuffer_Release(&all->held[--all->n]);
}

/* The rows of one bias table that several model-fed streams of a step read: each stream
 * must see the table as it was when the step began, but the streams before it have already
 * learned. Rows read by one stream only are read before that stream learns, in place. */
typedef struct {
    float *copies;   /* the shared rows as the step began, one after another */
    int64_t *slot;   /* per table row: its copy, or -1 (read in place) */
} Snapshot;

static int snapshot_open(const Bias *bias, const int64_t *wanted, Py_ssize_t n_wanted, Py_ssize_t cols, Snapshot *snap) {
    snap->copies = NULL;
    snap->slot = NULL;
    if (!bias->n_rows)
        return 0;
    const int64_t *rows = (const int64_t *)bias->rows.buf;
    snap->slot = (int64_t *)calloc((size_t)bias->n_rows, sizeof(int64_t));  /* first the use counts */
    if (!snap->slot)
        return -1;
    for (Py_ssize_t j = 0; j < n_wanted; j++)
        snap->slot[rows[wanted[j]]]++;
    Py_ssize_t shared = 0;
    for (Py_ssize_t r = 0; r < bias->n_rows; r++)
        snap->slot[r] = snap->slot[r] > 1 ? shared++ : -1;
    if (shared) {
        snap->copies = (float *)malloc((size_t)(shared * cols) * sizeof(float));
        if (!snap->copies)
            return -1;
    }
    for (Py_ssize_t r = 0; r < bias->n_rows; r++)
        if (snap->slot[r] >= 0)
            memcpy(snap->copies + snap->slot[r] * cols, (const float *)bias->table.buf + r * cols, (size_t)cols * sizeof(float));
    return 0;
}

/* Stream s's row of the table as the step began (NULL: no table). */
static const float *snapshot_row(const Bias *bias, const Snapshot *snap, Py_ssize_t s, Py_ssize_t cols) {
    if (!bias->n_rows)
        return NULL;
    int64_t row = ((const int64_t *)bias->rows.buf)[s];
    return snap->slot[row] >= 0 ? snap->copies + snap->slot[row] * cols : (const float *)bias->table.buf + row * cols;
}

static void snapshot_close(Snapshot *snap) {
    free(snap->copies);
    free(snap->slot);
}

/* quant_row of a mixed row without its scan of the row: the row is an exp2 row whose largest
 * value was model_max, each value times factor (rounded as scale_row rounds it), then
 * additions added at distinct candidates. Where factor and the additions are finite and
 * non-negative, every value is too, and since rounding is monotonic the largest is the
 * larger of model_max * factor and the candidates' new values: the weights follow from that
 * alone. Anything else (NaN, infinities, an all-zero row) goes through quant_row, which
 * checks the row value by value, so the result is quant_row's in every case. */
static int quant_mixed_row(const double *p, long n, double model_max, double factor, const int64_t *candidates, const double *additions,
                           int64_t count, Quant *q) {
    if (!(factor > 0.0) || factor - factor != 0.0)
        return quant_row(p, n, q);
    double best = model_max * factor;
    for (int64_t c = 0; c < count; c++) {
        if (!(additions[c] >= 0.0) || additions[c] - additions[c] != 0.0)
            return quant_row(p, n, q);
        best = p[candidates[c]] > best ? p[candidates[c]] : best;
    }
    if (!(best > 0.0) || best - best != 0.0)
        return quant_row(p, n, q);
    q->p = p;
    q->w = NULL;
    weight_factors(best, &q->factor, &q->factor2);
    q->scale = (double)(TOTAL - (uint64_t)n) / (double)sum_w(p, 0, n, q->factor, q->factor2);
    return 0;
}

/* ensemble_int24(encode, logits, wanted, skip_rows, symbols, cols, scale, temperature,
 *                (table_a, rows_a, squares_a, lr_a, table_b, rows_b, squares_b, lr_b, eps),
 *                (weight0, offsets, candidates, additions),
 *                (model_totals, dots, mixed_totals, p_token), state, words) -> int
 *
 * One lockstep step of the ensemble's linear mix and the int24 coder, stream by stream
 * while each stream's row is in the cache; the same bits as scores_exp2_rows (with totals
 * and dots), scale_add_sum, int24_encode or int24_decode, and learn_bias called in turn
 * over the whole step. Streams 0..len(symbols)-1 run; those listed in `wanted` (int64,
 * increasing) have a model row (logits: float32, one row each, in that order), the others
 * a ready float64 row in skip_rows (in stream order), which is coded as it is and learns
 * nothing. A model-fed stream's row is exp2 of its scores ((logits * temperature) +
 * table_b[rows_b[s]]) + table_a[rows_a[s]] (the ensemble adds the context table first,
 * and learns on the class table first), with the tables as they were when the step began; its sum and (dots not None) its pairwise dot with the logits go to model_totals
 * and dots; it is then scaled by weight0 / sum, the additions of its candidates
 * (candidates[offsets[j]:offsets[j+1]]) are added, and its new sum goes to mixed_totals.
 * After the stream's symbol is coded (encode: symbols, int32, given; else decoded into
 * symbols), p_token gets the mixed row's entry at the symbol and the stream takes its
 * learn_bias step on both tables (None: none; squares None: sgd). state and words are the
 * int24 encoder's (lower, range, inverted, first inverted; words: room for len(symbols) +
 * state[2]) or decoder's (lower, range, point, next word; words: the coded words).
 * Returns the words written (encode), or the streams decoded, fewer than len(symbols) on
 * invalid data. */
static PyObject *ensemble_int24(PyObject *self, PyObject *args) {
    int encode;
    Py_ssize_t cols;
    float scale, temperature;
    double lr_a, lr_b, eps;
    PyObject *logits_o, *wanted_o, *skip_o, *symbols_o, *table_a, *rows_a, *squares_a, *table_b, *rows_b, *squares_b;
    PyObject *weight0_o, *offsets_o, *candidates_o, *additions_o, *model_totals_o, *dots_o, *mixed_o, *p_token_o, *state_o, *words_o;
    if (!PyArg_ParseTuple(args, "pOOOOnff(OOOdOOOdd)(OOOO)(OOOO)OO", &encode, &logits_o, &wanted_o, &skip_o, &symbols_o, &cols, &scale,
                          &temperature, &table_a, &rows_a, &squares_a, &lr_a, &table_b, &rows_b, &squares_b, &lr_b, &eps, &weight0_o,
                          &offsets_o, &candidates_o, &additions_o, &model_totals_o, &dots_o, &mixed_o, &p_token_o, &state_o, &words_o))
        return NULL;
    if (cols < 2 || (uint64_t)cols >= TOTAL - 1) {
        PyErr_SetString(PyExc_ValueError, "ensemble_int24: bad row length");
        return NULL;
    }
    Buffers held = {.n = 0};
    int failed = 0;
    Py_buffer probe;  /* lengths first: the item counts that size the rest */
    Py_ssize_t n_wanted = 0, running = 0, n_candidates = 0;
    PyObject *counted[3] = {wanted_o, symbols_o, candidates_o};
    Py_ssize_t *counts[3] = {&n_wanted, &running, &n_candidates};
    Py_ssize_t sizes[3] = {sizeof(int64_t), sizeof(int32_t), sizeof(int64_t)};
    for (int k = 0; k < 3; k++) {
        if (PyObject_GetBuffer(counted[k], &probe, PyBUF_SIMPLE) < 0)
            return NULL;
        *counts[k] = probe.len / sizes[k];
        PyBuffer_Release(&probe);
    }
    Py_ssize_t n_skip = running - n_wanted;
    const float *logits = take(&held, logits_o, 0, sizeof(float), n_wanted * cols, 0, &failed);
    const int64_t *wanted = take(&held, wanted_o, 0, sizeof(int64_t), n_wanted, 0, &failed);
    const double *skip_rows = take(&held, skip_o, 0, sizeof(double), n_skip * cols, 0, &failed);
    int32_t *symbols = take(&held, symbols_o, !encode, sizeof(int32_t), running, 0, &failed);
    const double *weight0 = take(&held, weight0_o, 0, sizeof(double), n_wanted, 0, &failed);
    const int64_t *offsets = take(&held, offsets_o, 0, sizeof(int64_t), n_wanted + 1, 0, &failed);
    const int64_t *candidates = take(&held, candidates_o, 0, sizeof(int64_t), n_candidates, 0, &failed);
    const double *additions = take(&held, additions_o, 0, sizeof(double), n_candidates, 0, &failed);
    double *model_totals = take(&held, model_totals_o, 1, sizeof(double), n_wanted, 0, &failed);
    double *dots = take(&held, dots_o, 1, sizeof(double), n_wanted, 1, &failed);
    double *mixed_totals = take(&held, mixed_o, 1, sizeof(double), n_wanted, 0, &failed);
    double *p_token = take(&held, p_token_o, 1, sizeof(double), n_wanted, 0, &failed);
    if (failed) {
        release_all(&held);
        return NULL;
    }
    /* the rest of the checks: the counts fit together, every index is in range */
    int ok = n_skip >= 0 && offsets[0] == 0 && offsets[n_wanted] == n_candidates;
    for (Py_ssize_t j = 0; ok && j < n_wanted; j++)
        ok = wanted[j] >= (j ? wanted[j - 1] + 1 : 0) && wanted[j] < running && offsets[j + 1] >= offsets[j];
    for (Py_ssize_t c = 0; ok && c < n_candidates; c++)
        ok = candidates[c] >= 0 && candidates[c] < cols;
    for (Py_ssize_t s = 0; ok && encode && s < running; s++)
        ok = symbols[s] >= 0 && symbols[s] < cols;
    if (!ok) {
        release_all(&held);
        PyErr_SetString(PyExc_ValueError, "ensemble_int24: counts or indices do not match");
        return NULL;
    }
    Py_buffer state, words, sq_a = {0}, sq_b = {0};
    if (PyObject_GetBuffer(state_o, &state, PyBUF_WRITABLE) < 0) {
        release_all(&held);
        return NULL;
    }
    if (PyObject_GetBuffer(words_o, &words, encode ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&state);
        release_all(&held);
        return NULL;
    }
    uint64_t *st = (uint64_t *)state.buf;
    ok = state.len == 4 * (Py_ssize_t)sizeof(uint64_t) && words.len % (Py_ssize_t)sizeof(uint32_t) == 0 &&
         (!encode || words.len >= (running + (Py_ssize_t)st[2]) * (Py_ssize_t)sizeof(uint32_t));
    Bias a, b;
    int biases = 0;
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "ensemble_int24: coder state or words of the wrong size");
    else if (biases_open(table_a, rows_a, table_b, rows_b, cols, running, &a, &b) < 0)
        ok = 0;
    else if (squares_open(squares_a, &a, &sq_a) < 0 || squares_open(squares_b, &b, &sq_b) < 0) {
        ok = 0;
        biases_close(&a, &b);
    } else
        biases = 1;
    const char *error = NULL;
    Py_ssize_t result = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        Encoder e = encoder_open(st, (uint32_t *)words.buf);
        Decoder d = decoder_open(st, (const uint32_t *)words.buf, (uint64_t)(words.len / (Py_ssize_t)sizeof(uint32_t)));
        Snapshot snap_a, snap_b;
        float *scores = (float *)malloc((size_t)cols * sizeof(float));
        double *row = (double *)malloc((size_t)cols * sizeof(double));
        int opened_a = snapshot_open(&a, wanted, n_wanted, cols, &snap_a) == 0;
        int opened_b = snapshot_open(&b, wanted, n_wanted, cols, &snap_b) == 0;
        if (!scores || !row || !opened_a || !opened_b)
            error = "ensemble_int24: out of memory";
        float eps32 = (float)eps;
        Py_ssize_t j = 0, k = 0, s = 0;
        for (; !error && s < running; s++) {
            int fed = j < n_wanted && wanted[j] == s;
            const double *p = fed ? row : skip_rows + k++ * cols;
            Quant q;
            int invalid;
            if (fed) {
                float best_logit = model_row(logits + j * cols, snapshot_row(&b, &snap_b, s, cols), snapshot_row(&a, &snap_a, s, cols),
                                             temperature, scale, scores, row, cols, model_totals + j, dots ? dots + j : NULL);
                double model_max = best_logit - best_logit == 0.0f ? 1.0 : exp2_value(LIMIT);
                double factor = weight0[j] / model_totals[j];
                const int64_t *mixed = candidates + offsets[j];
                Py_ssize_t n_mixed = offsets[j + 1] - offsets[j];
                mixed_totals[j] = mix_row(row, cols, factor, mixed, additions + offsets[j], n_mixed);
                invalid = quant_mixed_row(row, (long)cols, model_max, factor, mixed, additions + offsets[j], n_mixed, &q);
            } else
                invalid = quant_row(p, (long)cols, &q);
            if (invalid) {
                error = "ensemble_int24: probabilities are not a valid distribution";
                break;
            }
            long symbol;
            if (encode)
                encode_symbol(&e, &q, symbol = symbols[s], (long)cols);
            else if ((symbol = decode_symbol(&d, &q, (long)cols)) < 0)
                break;  /* invalid data */
            else
                symbols[s] = (int32_t)symbol;
            if (fed) {
                p_token[j] = row[symbol];
                learn_row(&a, &sq_a, s, row, mixed_totals[j], lr_a, eps32, cols, symbol);
                learn_row(&b, &sq_b, s, row, mixed_totals[j], lr_b, eps32, cols, symbol);
                j++;
            }
        }
        if (encode)
            encoder_save(&e, st), result = e.written;
        else
            decoder_save(&d, st), result = s;
        if (opened_a)
            snapshot_close(&snap_a);
        if (opened_b)
            snapshot_close(&snap_b);
        free(scores);
        free(row);
        Py_END_ALLOW_THREADS
    }
    if (biases)
        biases_close(&a, &b);
    PyBuffer_Release(&sq_a);
    PyBuffer_Release(&sq_b);
    PyBuffer_Release(&state);
    PyBuffer_Release(&words);
    release_all(&held);
    if (!ok)
        return NULL;
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    return PyLong_FromSsize_t(result);
}

/* ---- preset v5: the integer ensemble's head (nacrith/predictors/integer.py is the reference) ----
 * Integers only: the same results on every machine, whatever the order of the sums. */

/* floor(v / 2^s) */
#if (-1 >> 1) == -1  /* >> of a negative value is arithmetic (floor) with this compiler, as with GCC, Clang and MSVC */
static inline int64_t floor_shift(int64_t v, int s) { return v >> s; }
#else
static inline int64_t floor_shift(int64_t v, int s) { return v >= 0 ? v >> s : ~((~v) >> s); }
#endif

/* floor(num / den) for 0 <= num < 2^53, den > 0, given inv = 1.0 / den: the double
 * quotient (relative error below 2^-52, so within 1), corrected to the exact integer (a
 * 64-bit division costs ten times as much) */
static inline int64_t div_by(int64_t num, int64_t den, double inv) {
    int64_t q = (int64_t)((double)num * inv);  /* within 1 of the quotient for num < 2^53 */
    q -= q * den > num;
    q += (q + 1) * den <= num;
    return q;
}

/* floor(sqrt(v)) for 0 <= v < 2^62: the double root, corrected to the exact integer */
static inline int64_t isqrt64(int64_t v) {
    int64_t r = (int64_t)sqrt((double)v);  /* within 1 of the root */
    r -= r * r > v;
    r += (r + 1) * (r + 1) <= v;
    return r;
}

/* An optional int64 buffer argument (None: buf NULL, len 0). 0 on success. */
static int optional_buffer(PyObject *object, Py_buffer *view, int writable) {
    memset(view, 0, sizeof(*view));
    if (object == Py_None)
        return 0;
    return PyObject_GetBuffer(object, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE);
}

static int rows_in_range(const Py_buffer *indices, Py_ssize_t count, Py_ssize_t limit) {
    if (indices->len != count * (Py_ssize_t)sizeof(int64_t))
        return 0;
    const int64_t *index = (const int64_t *)indices->buf;
    for (Py_ssize_t k = 0; k < count; k++)
        if (index[k] < 0 || index[k] >= limit)
            return 0;
    return 1;
}

/* The scores of one row into W (step 1); returns their maximum. */
WIDE static int64_t integer_scores(const int64_t *restrict L, const int64_t *restrict B1, const int64_t *restrict B2, int64_t tau,
                                   int64_t *restrict W, Py_ssize_t cols) {
    int64_t best = INT64_MIN;
    for (Py_ssize_t i = 0; i < cols; i++) {
        int64_t score = floor_shift(L[i] * tau, 16);
        if (B1)
            score += floor_shift(B1[i], 8);
        if (B2)
            score += floor_shift(B2[i], 8);
        W[i] = score;
        best = score > best ? score : best;
    }
    return best;
}

/* Scores in W to weights (step 2); returns their sum. */
WIDE static int64_t integer_weights(int64_t *restrict W, int64_t best, Py_ssize_t cols) {
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < cols; i++) {
        int64_t distance = best - W[i];
        distance = distance < ((int64_t)1 << 36) ? distance : ((int64_t)1 << 36);
        int64_t level = (distance * 24204406) >> 32;
        level = level < LIMIT ? level : LIMIT;
        int64_t shift = level >> 6;
        W[i] = ((128 - (level & 63)) << 23) >> (shift < 31 ? shift : 31);
        total += W[i];
    }
    return total;
}

/* Steps 1-4 of one fed stream's row. */
static void integer_row(const int64_t *L, const int64_t *B1, const int64_t *B2, int64_t tau, int64_t weight, int64_t *W, int64_t *P,
                        int64_t *R, Py_ssize_t cols) {
    int64_t total = integer_weights(W, integer_scores(L, B1, B2, tau, W, cols), cols);
    double inv = 1.0 / (double)total;
    for (Py_ssize_t i = 0; i < cols; i++) {
        P[i] = W[i] ? div_by(W[i] << 30, total, inv) : 0;
        R[i] += (P[i] * weight) >> 16;
    }
}

/* integer_rows(logits, cols, tau, b1, r1, b2, r2, a, wanted, w, p, rows): steps 1-4 for the
 * m fed streams. logits, w, p: int64 m x cols; b1, b2: int64 tables x cols or None, r1, r2
 * their rows per fed stream (int64 m); a: int64 m; wanted: each fed stream's row of rows
 * (int64 running x cols, holding c0, to which (p * a) >> 16 is added). */
static PyObject *integer_rows(PyObject *self, PyObject *args) {
    Py_buffer logits, a, wanted, w, p, rows, b1, r1, b2, r2;
    Py_ssize_t cols;
    long long tau;
    PyObject *o_b1, *o_r1, *o_b2, *o_r2;
    if (!PyArg_ParseTuple(args, "y*nLOOOOy*y*w*w*w*", &logits, &cols, &tau, &o_b1, &o_r1, &o_b2, &o_r2, &a, &wanted, &w, &p, &rows))
        return NULL;
    int got = optional_buffer(o_b1, &b1, 0) == 0;
    got = got && optional_buffer(o_r1, &r1, 0) == 0;
    got = got && optional_buffer(o_b2, &b2, 0) == 0;
    got = got && optional_buffer(o_r2, &r2, 0) == 0;
    Py_ssize_t m = cols > 0 ? logits.len / (Py_ssize_t)sizeof(int64_t) / cols : 0;
    Py_ssize_t running = cols > 0 ? rows.len / (Py_ssize_t)sizeof(int64_t) / cols : 0;
    Py_ssize_t size = m * cols * (Py_ssize_t)sizeof(int64_t);
    int ok = got && cols > 0 && logits.len == size && w.len == size && p.len == size && a.len == m * (Py_ssize_t)sizeof(int64_t)
             && rows.len == running * cols * (Py_ssize_t)sizeof(int64_t) && rows_in_range(&wanted, m, running)
             && (b1.buf == NULL || (b1.len % (cols * (Py_ssize_t)sizeof(int64_t)) == 0 && rows_in_range(&r1, m, b1.len / (cols * (Py_ssize_t)sizeof(int64_t)))))
             && (b2.buf == NULL || (b2.len % (cols * (Py_ssize_t)sizeof(int64_t)) == 0 && rows_in_range(&r2, m, b2.len / (cols * (Py_ssize_t)sizeof(int64_t)))));
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < m; j++) {
            const int64_t *L = (const int64_t *)logits.buf + j * cols;
            const int64_t *B1 = b1.buf ? (const int64_t *)b1.buf + ((const int64_t *)r1.buf)[j] * cols : NULL;
            const int64_t *B2 = b2.buf ? (const int64_t *)b2.buf + ((const int64_t *)r2.buf)[j] * cols : NULL;
            int64_t *W = (int64_t *)w.buf + j * cols, *P = (int64_t *)p.buf + j * cols;
            int64_t *R = (int64_t *)rows.buf + ((const int64_t *)wanted.buf)[j] * cols;
            integer_row(L, B1, B2, (int64_t)tau, ((const int64_t *)a.buf)[j], W, P, R, cols);
        }
        Py_END_ALLOW_THREADS
    }
    Py_buffer *all[] = {&logits, &a, &wanted, &w, &p, &rows, &b1, &r1, &b2, &r2};
    for (int k = 0; k < 10; k++)
        if (all[k]->obj)
            PyBuffer_Release(all[k]);
    if (!got)
        return NULL;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "integer_rows: buffer sizes or indices do not match");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* floor(a / b) for b > 0 and |a| < 2^52, given inv = 1.0 / b: the double quotient, corrected */
static inline int64_t floor_div_by(int64_t a, int64_t b, double inv) {
    int64_t q = (int64_t)((double)a * inv);  /* truncated: within 2 of the floor for |a| < 2^52 */
    q -= q * b > a;
    q -= q * b > a;
    q += (q + 1) * b <= a;
    return q;
}

/* Whether any of 16 entries is at least ``least`` (branch-free, so the compiler vectorises it). */
static inline int any_at_least(const int64_t *R, int64_t least) {
    int any = 0;
    for (int k = 0; k < 16; k++)
        any |= R[k] >= least;
    return any;
}

/* integer_learn(rows, totals, cols, wanted, symbols, table, sums, table_rows, lr): steps 5-6
 * on one table. rows: the step's R (int64 running x cols), totals: T (int64 running);
 * wanted, symbols, table_rows: per fed stream (int64 m); table, sums: int64 k x cols.
 * g is 0 where R << 20 < T (but at the token), and those entries change in no pass: each
 * stream's other entries and their g are listed once, in the first pass. */
static PyObject *integer_learn(PyObject *self, PyObject *args) {
    Py_buffer rows, totals, wanted, symbols, table, sums, table_rows;
    Py_ssize_t cols;
    long long lr;
    if (!PyArg_ParseTuple(args, "y*y*ny*y*w*w*y*L", &rows, &totals, &cols, &wanted, &symbols, &table, &sums, &table_rows, &lr))
        return NULL;
    Py_ssize_t running = cols > 0 ? rows.len / (Py_ssize_t)sizeof(int64_t) / cols : 0;
    Py_ssize_t m = wanted.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t k = cols > 0 ? table.len / (Py_ssize_t)sizeof(int64_t) / cols : 0;
    int ok = cols > 0 && rows.len == running * cols * (Py_ssize_t)sizeof(int64_t) && totals.len == running * (Py_ssize_t)sizeof(int64_t)
             && rows_in_range(&wanted, m, running) && rows_in_range(&symbols, m, cols) && rows_in_range(&table_rows, m, k)
             && table.len == k * cols * (Py_ssize_t)sizeof(int64_t) && sums.len == table.len;
    for (Py_ssize_t j = 0; ok && j < m; j++)
        ok = ((const int64_t *)totals.buf)[((const int64_t *)wanted.buf)[j]] > 0;
    int failed = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        const int64_t *fed = (const int64_t *)wanted.buf, *x = (const int64_t *)symbols.buf, *at = (const int64_t *)table_rows.buf;
        int64_t *B = (int64_t *)table.buf, *Q = (int64_t *)sums.buf;
        int32_t *index = (int32_t *)malloc((size_t)(m > 0 ? m : 1) * (size_t)cols * sizeof(int32_t));
        int32_t *gradient = (int32_t *)malloc((size_t)(m > 0 ? m : 1) * (size_t)cols * sizeof(int32_t));
        Py_ssize_t *count = (Py_ssize_t *)calloc((size_t)(m > 0 ? m : 1), sizeof(Py_ssize_t));
        failed = !index || !gradient || !count;
        for (Py_ssize_t j = 0; !failed && j < m; j++) {  /* the squares, and each stream's list */
            const int64_t *R = (const int64_t *)rows.buf + fed[j] * cols;
            int64_t T = ((const int64_t *)totals.buf)[fed[j]];
            double inv = 1.0 / (double)T;
            int64_t *q = Q + at[j] * cols;
            int32_t *list = index + j * cols, *gs = gradient + j * cols;
            Py_ssize_t c = 0;
            int64_t least = (T + ((int64_t)1 << 20) - 1) >> 20;  /* g != 0 where R >= ceil(T / 2^20), and at the token */
            for (Py_ssize_t i = 0; i < cols; i++) {
                if ((i & 15) == 0 && i + 16 <= cols && (x[j] < i || x[j] >= i + 16) && !any_at_least(R + i, least))
                    i += 15;  /* none of these 16 changes */
                if (R[i] < least && i != x[j])
                    continue;
                int64_t g = div_by(R[i] << 20, T, inv) - (i == x[j] ? ((int64_t)1 << 20) : 0);
                q[i] += (g * g) >> 20;
                list[c] = (int32_t)i;
                gs[c++] = (int32_t)g;
            }
            count[j] = c;
        }
        for (Py_ssize_t j = 0; !failed && j < m; j++) {  /* the steps, each entry's sum capped first (idempotent) */
            int64_t *b = B + at[j] * cols, *q = Q + at[j] * cols;
            const int32_t *list = index + j * cols, *gs = gradient + j * cols;
            for (Py_ssize_t c = 0; c < count[j]; c++) {
                int32_t i = list[c];
                q[i] = q[i] < ((int64_t)1 << 60) ? q[i] : ((int64_t)1 << 60);
                int64_t root = isqrt64(((int64_t)1 << 20) + q[i]);
                b[i] -= floor_div_by((int64_t)gs[c] * (int64_t)lr, root, 1.0 / (double)root);
            }
        }
        for (Py_ssize_t j = 0; !failed && j < m; j++) {  /* the tables' clamp, once every step is in */
            int64_t *b = B + at[j] * cols;
            const int32_t *list = index + j * cols;
            for (Py_ssize_t c = 0; c < count[j]; c++) {
                int32_t i = list[c];
                b[i] = b[i] < -((int64_t)1 << 30) ? -((int64_t)1 << 30) : b[i] > ((int64_t)1 << 30) ? ((int64_t)1 << 30) : b[i];
            }
        }
        free(index);
        free(gradient);
        free(count);
        Py_END_ALLOW_THREADS
    }
    Py_buffer *all[] = {&rows, &totals, &wanted, &symbols, &table, &sums, &table_rows};
    for (int j = 0; j < 7; j++)
        PyBuffer_Release(all[j]);
    if (failed)
        return PyErr_NoMemory();
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "integer_learn: buffer sizes or indices do not match");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* integer_logits(logits, out): float logits as integers at 2^-14, rint(x * 2^14) clamped to
 * [-2^40, 2^40], NaN as 0 (rounding half to even, as numpy's rint) */
static PyObject *integer_logits(PyObject *self, PyObject *args) {
    Py_buffer in, out;
    if (!PyArg_ParseTuple(args, "y*w*", &in, &out))
        return NULL;
    Py_ssize_t n = in.len / (Py_ssize_t)sizeof(float);
    int ok = in.len == n * (Py_ssize_t)sizeof(float) && out.len == n * (Py_ssize_t)sizeof(int64_t);
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        const float *x = (const float *)in.buf;
        int64_t *L = (int64_t *)out.buf;
        const double limit = 1099511627776.0;  /* 2^40 */
        for (Py_ssize_t i = 0; i < n; i++) {
            double v = (double)x[i] * 16384.0;
            v = v != v ? 0.0 : v < -limit ? -limit : v > limit ? limit : v;
            L[i] = (int64_t)((v + 6755399441055744.0) - 6755399441055744.0);  /* rint for |v| <= 2^51 (round to nearest even) */
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "integer_logits: buffer sizes do not match");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* sum((w >> 8) * D) and sum(w >> 8) of one row, D = min(best - L, 2^20); both factors fit 32 bits */
WIDE static void temperature_sums(const int64_t *restrict L, const int64_t *restrict W, int64_t best, Py_ssize_t cols, int64_t *dot, int64_t *mass) {
    int64_t d = 0, m = 0;
    for (Py_ssize_t i = 0; i < cols; i++) {
        int64_t distance = best - L[i];
        int32_t factor = (int32_t)(distance < ((int64_t)1 << 20) ? distance : ((int64_t)1 << 20));
        int32_t weight = (int32_t)(W[i] >> 8);
        d += (int64_t)weight * (int64_t)factor;
        m += weight;
    }
    *dot = d;
    *mass = m;
}

/* integer_temperature(logits, w, cols, symbols) -> sum over the m fed streams of
 * D[x] - sum((w >> 8) * D) // max(1, sum(w >> 8)), D = min(max(L) - L, 2^20): step 7's gradient. */
static PyObject *integer_temperature(PyObject *self, PyObject *args) {
    Py_buffer logits, w, symbols;
    Py_ssize_t cols;
    if (!PyArg_ParseTuple(args, "y*y*ny*", &logits, &w, &cols, &symbols))
        return NULL;
    Py_ssize_t m = cols > 0 ? logits.len / (Py_ssize_t)sizeof(int64_t) / cols : 0;
    int ok = cols > 0 && logits.len == m * cols * (Py_ssize_t)sizeof(int64_t) && w.len == logits.len && rows_in_range(&symbols, m, cols);
    int64_t grad = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < m; j++) {
            const int64_t *L = (const int64_t *)logits.buf + j * cols, *W = (const int64_t *)w.buf + j * cols;
            int64_t best = INT64_MIN, dot = 0, mass = 0;
            for (Py_ssize_t i = 0; i < cols; i++)
                best = L[i] > best ? L[i] : best;
            temperature_sums(L, W, best, cols, &dot, &mass);
            int64_t own = best - L[((const int64_t *)symbols.buf)[j]];
            own = own < ((int64_t)1 << 20) ? own : ((int64_t)1 << 20);
            grad += own - dot / (mass > 1 ? mass : 1);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&logits);
    PyBuffer_Release(&w);
    PyBuffer_Release(&symbols);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "integer_temperature: buffer sizes or indices do not match");
        return NULL;
    }
    return PyLong_FromLongLong(grad);
}

static PyMethodDef methods[] = {
    {"integer_rows", integer_rows, METH_VARARGS, "Preset v5's rows of the fed streams (see nacrith.predictors.integer)."},
    {"integer_learn", integer_learn, METH_VARARGS, "Preset v5's step on one bias table (see nacrith.predictors.integer)."},
    {"integer_logits", integer_logits, METH_VARARGS, "Float logits as preset v5's integers (see nacrith.predictors.integer)."},
    {"integer_temperature", integer_temperature, METH_VARARGS, "Preset v5's temperature gradient (see nacrith.predictors.integer)."},
    {"ensemble_int24", ensemble_int24, METH_VARARGS, "One ensemble step, mixed, range-coded and learned stream by stream (see nacrith.predictors.ensemble)."},
    {"exp2_weight_rows", exp2_weight_rows, METH_VARARGS, "Logit rows to int24 weight rows and totals (see nacrith.coder)."},
    {"int24_encode", int24_encode, METH_VARARGS, "Range-code one symbol per probability row (see nacrith.coder)."},
    {"int24_encode_intervals", int24_encode_intervals, METH_VARARGS, "Range-code quantised intervals of 2^24 (see nacrith.coder)."},
    {"int24_decode", int24_decode, METH_VARARGS, "Decode one symbol per probability row (see nacrith.coder)."},
    {"scores_exp2_rows", scores_exp2_rows, METH_VARARGS, "Biased, scaled logit rows to exp2 probability rows (see nacrith.predictors.ensemble)."},
    {"learn_bias", learn_bias, METH_VARARGS, "One gradient step of the bias tables per stream (see nacrith.predictors.ensemble)."},
    {"scale_add_sum", scale_add_sum, METH_VARARGS, "Scale a row, add to a few entries, return its pairwise sum (see nacrith.predictors.ensemble)."},
    {"exp2_rows", exp2_rows, METH_VARARGS, "Logit rows to unnormalised exp2 probability rows (see nacrith.predictors.llm)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "nacrith._kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
