/* Fused per-row loops of nacrith's hot path, bit-identical to the numpy code they replace.
 *
 * Each function does in one or two passes over a row what the numpy reference does in
 * several (see nacrith/kernels.py for the reference and the contract). Every operation is
 * one IEEE operation of the same type and in the same order as there; the build turns off
 * floating-point contraction (no FMA) and never uses fast-math, so the results are the
 * same bits on every machine. The GIL is released while a function runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
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

/* One row: see exp2_rows. Levels go through a small int32 buffer so that both loops
 * work on lanes of one width (which SSE2 alone can vectorise). */
static void exp2_row(const float *restrict row, int64_t *restrict dest, long n, float scale) {
    float best = row_max(row, n);
    uint32_t levels[BLOCK];
    for (long start = 0; start < n; start += BLOCK) {
        long count = n - start < BLOCK ? n - start : BLOCK;
        for (long i = 0; i < count; i++) {
            float distance = best - row[start + i];
            distance = distance * scale;
            /* !(distance < LIMIT) catches NaN and overflow too, as numpy's clamp does */
            levels[i] = distance < (float)LIMIT ? (uint32_t)(int32_t)distance : (uint32_t)LIMIT;
        }
        for (long i = 0; i < count; i++)
            dest[start + i] = ONE - (int64_t)((uint64_t)levels[i] << 46);
    }
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

static PyMethodDef methods[] = {
    {"exp2_rows", exp2_rows, METH_VARARGS, "Logit rows to unnormalised exp2 probability rows (see nacrith.kernels)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "nacrith._kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
