/*
 * sarloc._scan: fused float16 x float32 inner products for the map-pack scan.
 *
 *   dot_f16(E, Q, out, n, d, nq[, level]) -> None   (level: -1 best, 0 portable C, 1 AVX2, 2 AVX-512)
 *   topk(scores, n, k, out) -> m
 *   search_f16(E, q, n, d, k, out_scores, out_idx[, level]) -> m   (one query: scan and top-k in one pass)
 *
 * E is an (n, d) C-contiguous float16 matrix (raw IEEE half bits, e.g. a float16 memmap block), Q an (nq, d)
 * float32 matrix and out an (nq, n) float32 matrix that receives out[j, i] = sum_k E[i, k] * Q[j, k].
 *
 * Each stored value is read once from memory and converted in registers (F16C + FMA on x86-64 when the CPU has
 * them, chosen at run time; a portable C loop otherwise), so the scan reads half the bytes of a float32 scan and
 * is bound by memory bandwidth, not by a separate conversion pass. The GIL is released while it runs.
 *
 * topk selects the k best of n float32 scores with a k-sized heap in one pass (numpy's argpartition costs about
 * 10 ns per score here, more than the scan itself on small maps).
 *
 * The Python wrapper (sarloc.mappack.search.BlockScorer) checks shapes, dtypes and contiguity; this module checks
 * buffer sizes again so that a wrong call raises instead of reading out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define SARLOC_X86 1
#include <immintrin.h>
#endif

/* IEEE half -> float, exact for every input (normals, subnormals, zeros, inf, NaN). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while ((man & 0x400u) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void dot_generic(const uint16_t *E, const float *Q, float *out, Py_ssize_t n, Py_ssize_t d, Py_ssize_t nq,
                        float *row) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint16_t *e = E + i * d;
        for (Py_ssize_t k = 0; k < d; k++) row[k] = half_to_float(e[k]);
        for (Py_ssize_t j = 0; j < nq; j++) {
            const float *q = Q + j * d;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            Py_ssize_t k = 0;
            for (; k + 8 <= d; k += 8)
                for (int t = 0; t < 8; t++) acc[t] += row[k + t] * q[k + t];
            float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (; k < d; k++) s += row[k] * q[k];
            out[j * n + i] = s;
        }
    }
}

#ifdef SARLOC_X86
__attribute__((target("avx2,fma,f16c"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) static inline __m256 load8h(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* One query: four independent accumulators over 32 values per step hide the FMA latency. */
__attribute__((target("avx2,fma,f16c"))) static void dot_avx2_q1(const uint16_t *E, const float *q, float *out,
                                                                   Py_ssize_t n, Py_ssize_t d) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint16_t *e = E + i * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        Py_ssize_t k = 0;
        for (; k + 32 <= d; k += 32) {
            a0 = _mm256_fmadd_ps(load8h(e + k), _mm256_loadu_ps(q + k), a0);
            a1 = _mm256_fmadd_ps(load8h(e + k + 8), _mm256_loadu_ps(q + k + 8), a1);
            a2 = _mm256_fmadd_ps(load8h(e + k + 16), _mm256_loadu_ps(q + k + 16), a2);
            a3 = _mm256_fmadd_ps(load8h(e + k + 24), _mm256_loadu_ps(q + k + 24), a3);
        }
        for (; k + 8 <= d; k += 8) a0 = _mm256_fmadd_ps(load8h(e + k), _mm256_loadu_ps(q + k), a0);
        float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < d; k++) s += half_to_float(e[k]) * q[k];
        out[i] = s;
    }
}

/* Several queries: each 8-value slice of a row is converted once and used by up to four queries. */
__attribute__((target("avx2,fma,f16c"))) static void dot_avx2_qn(const uint16_t *E, const float *Q, float *out,
                                                                   Py_ssize_t n, Py_ssize_t d, Py_ssize_t nq) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint16_t *e = E + i * d;
        for (Py_ssize_t j0 = 0; j0 < nq; j0 += 4) {
            Py_ssize_t m = nq - j0 < 4 ? nq - j0 : 4;
            const float *q0 = Q + j0 * d;
            const float *q1 = Q + (j0 + (m > 1 ? 1 : 0)) * d;
            const float *q2 = Q + (j0 + (m > 2 ? 2 : 0)) * d;
            const float *q3 = Q + (j0 + (m > 3 ? 3 : 0)) * d;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            Py_ssize_t k = 0;
            for (; k + 8 <= d; k += 8) {
                __m256 x = load8h(e + k);
                a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q0 + k), a0);
                a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q1 + k), a1);
                a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q2 + k), a2);
                a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q3 + k), a3);
            }
            float s[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
            for (; k < d; k++) {
                float x = half_to_float(e[k]);
                s[0] += x * q0[k];
                s[1] += x * q1[k];
                s[2] += x * q2[k];
                s[3] += x * q3[k];
            }
            for (Py_ssize_t t = 0; t < m; t++) out[(j0 + t) * n + i] = s[t];
        }
    }
}


/* AVX-512F: 16 values per conversion; used for one query when the CPU has it (twice the work per instruction
 * keeps the four FMA chains busy when the data is in cache). */
__attribute__((target("avx512f"))) static inline __m512 load16h(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* One row against one query, four accumulators over 64 values per step. */
__attribute__((target("avx512f"))) static inline float row_avx512(const uint16_t *e, const float *q, Py_ssize_t d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    Py_ssize_t k = 0;
    for (; k + 64 <= d; k += 64) {
        a0 = _mm512_fmadd_ps(load16h(e + k), _mm512_loadu_ps(q + k), a0);
        a1 = _mm512_fmadd_ps(load16h(e + k + 16), _mm512_loadu_ps(q + k + 16), a1);
        a2 = _mm512_fmadd_ps(load16h(e + k + 32), _mm512_loadu_ps(q + k + 32), a2);
        a3 = _mm512_fmadd_ps(load16h(e + k + 48), _mm512_loadu_ps(q + k + 48), a3);
    }
    for (; k + 16 <= d; k += 16) a0 = _mm512_fmadd_ps(load16h(e + k), _mm512_loadu_ps(q + k), a0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < d; k++) s += half_to_float(e[k]) * q[k];
    return s;
}

/* 16 lanes -> 4 partial sums (512 -> 256 -> 128 bits). */
__attribute__((target("avx512f"))) static inline __m128 fold512(__m512 a) {
    __m256 lo = _mm512_castps512_ps256(a);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    __m256 h = _mm256_add_ps(lo, hi);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* AVX-512F, one query. Short rows (d < 256) go four at a time: one accumulator per row shares each query load,
 * and the four horizontal sums are folded together, so the per-row reduction does not dominate. */
__attribute__((target("avx512f"))) static void dot_avx512_q1(const uint16_t *E, const float *q, float *out,
                                                               Py_ssize_t n, Py_ssize_t d) {
    Py_ssize_t i = 0;
    if (d < 256 && d % 16 == 0) {
        for (; i + 4 <= n; i += 4) {
            const uint16_t *e0 = E + i * d, *e1 = e0 + d, *e2 = e1 + d, *e3 = e2 + d;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
                   a3 = _mm512_setzero_ps();
            for (Py_ssize_t k = 0; k < d; k += 16) {
                __m512 x = _mm512_loadu_ps(q + k);
                a0 = _mm512_fmadd_ps(load16h(e0 + k), x, a0);
                a1 = _mm512_fmadd_ps(load16h(e1 + k), x, a1);
                a2 = _mm512_fmadd_ps(load16h(e2 + k), x, a2);
                a3 = _mm512_fmadd_ps(load16h(e3 + k), x, a3);
            }
            /* 4 x 16 lanes -> 4 x 4 partial sums, then a 4x4 transpose-add gives the four row sums */
            __m128 g0 = fold512(a0), g1 = fold512(a1), g2 = fold512(a2), g3 = fold512(a3);
            _MM_TRANSPOSE4_PS(g0, g1, g2, g3);
            _mm_storeu_ps(out + i, _mm_add_ps(_mm_add_ps(g0, g1), _mm_add_ps(g2, g3)));
        }
    }
    for (; i < n; i++) out[i] = row_avx512(E + i * d, q, d);
}

static int have_avx512f(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

static int have_avx2_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
static int have_avx2_f16c(void) { return 0; }
static int have_avx512f(void) { return 0; }
#endif

/* kernel level: -1 unknown, 0 generic, 1 AVX2 + F16C + FMA, 2 that and AVX-512F */
static int g_simd = -1;

static int simd_level(void) {
    if (g_simd < 0) g_simd = have_avx2_f16c() ? (have_avx512f() ? 2 : 1) : 0;
    return g_simd;
}

static PyObject *scan_dot_f16(PyObject *self, PyObject *args) {
    Py_buffer eb, qb, ob;
    Py_ssize_t n, d, nq;
    int want = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*w*nnn|i", &eb, &qb, &ob, &n, &d, &nq, &want)) return NULL;
    PyObject *ret = NULL;
    if (n < 0 || d < 1 || nq < 0) {
        PyErr_Format(PyExc_ValueError, "dot_f16: bad sizes n=%zd d=%zd nq=%zd", n, d, nq);
        goto done;
    }
    if (eb.len < n * d * 2 || qb.len < nq * d * 4 || ob.len < nq * n * 4) {
        PyErr_Format(PyExc_ValueError,
                     "dot_f16: buffers too small for n=%zd d=%zd nq=%zd (E %zd bytes, Q %zd, out %zd)", n, d, nq,
                     eb.len, qb.len, ob.len);
        goto done;
    }
    const uint16_t *E = (const uint16_t *)eb.buf;
    const float *Q = (const float *)qb.buf;
    float *out = (float *)ob.buf;
    int level = simd_level();
    if (want >= 0 && want < level) level = want; /* tests force the lower kernels */
    if (level == 0) {
        float *row = (float *)PyMem_RawMalloc((size_t)d * sizeof(float));
        if (row == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        dot_generic(E, Q, out, n, d, nq, row);
        Py_END_ALLOW_THREADS
        PyMem_RawFree(row);
    } else {
#ifdef SARLOC_X86
        Py_BEGIN_ALLOW_THREADS
        if (nq == 1 && level == 2)
            dot_avx512_q1(E, Q, out, n, d);
        else if (nq == 1)
            dot_avx2_q1(E, Q, out, n, d);
        else
            dot_avx2_qn(E, Q, out, n, d, nq);
        Py_END_ALLOW_THREADS
#endif
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&eb);
    PyBuffer_Release(&qb);
    PyBuffer_Release(&ob);
    return ret;
}


/* Heap order for top-k: a is worse than b when its score is lower, or equal with a higher row (ties keep the
 * lower row). The heap's root is its worst element. */
static inline int worse(float sa, Py_ssize_t ia, float sb, Py_ssize_t ib) { return sa < sb || (sa == sb && ia > ib); }

static void sift_down(float *hs, Py_ssize_t *hi, Py_ssize_t m, Py_ssize_t p) {
    for (;;) {
        Py_ssize_t c = 2 * p + 1, w = p;
        if (c < m && worse(hs[c], hi[c], hs[w], hi[w])) w = c;
        if (c + 1 < m && worse(hs[c + 1], hi[c + 1], hs[w], hi[w])) w = c + 1;
        if (w == p) return;
        float ts = hs[p];
        Py_ssize_t ti = hi[p];
        hs[p] = hs[w];
        hi[p] = hi[w];
        hs[w] = ts;
        hi[w] = ti;
        p = w;
    }
}

static void sift_up(float *hs, Py_ssize_t *hi, Py_ssize_t p) {
    while (p > 0) {
        Py_ssize_t u = (p - 1) / 2;
        if (!worse(hs[p], hi[p], hs[u], hi[u])) return;
        float ts = hs[p];
        Py_ssize_t ti = hi[p];
        hs[p] = hs[u];
        hi[p] = hi[u];
        hs[u] = ts;
        hi[u] = ti;
        p = u;
    }
}

/* Feed n scores (indices base + i) into a heap of at most k held in hs/hi with *m entries (NaN as -inf). */
static void heap_feed(const float *s, Py_ssize_t n, Py_ssize_t base, Py_ssize_t k, float *hs, Py_ssize_t *hi,
                      Py_ssize_t *m) {
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = s[i];
        if (v != v) v = -INFINITY;
        if (*m < k) {
            hs[*m] = v;
            hi[*m] = base + i;
            sift_up(hs, hi, *m);
            (*m)++;
        } else if (v > hs[0]) { /* equal scores never win: the held one has the lower index */
            hs[0] = v;
            hi[0] = base + i;
            sift_down(hs, hi, *m, 0);
        }
    }
}

/* Empty the heap into out_i (and out_s when not NULL), best first. */
static void heap_drain(float *hs, Py_ssize_t *hi, Py_ssize_t m, int64_t *out_i, float *out_s) {
    for (Py_ssize_t r = m - 1; r >= 0; r--) { /* pop the worst into the back */
        out_i[r] = (int64_t)hi[0];
        if (out_s != NULL) out_s[r] = hs[0];
        hs[0] = hs[r];
        hi[0] = hi[r];
        sift_down(hs, hi, r, 0);
    }
}

/* The k best of n scores (NaN counts as -inf), best first, ties by lower index; returns how many (min(k, n)). */
static Py_ssize_t topk_f32(const float *s, Py_ssize_t n, Py_ssize_t k, float *hs, Py_ssize_t *hi, int64_t *out) {
    Py_ssize_t m = 0;
    heap_feed(s, n, 0, k, hs, hi, &m);
    heap_drain(hs, hi, m, out, NULL);
    return m;
}

static PyObject *scan_topk(PyObject *self, PyObject *args) {
    Py_buffer sb, ob;
    Py_ssize_t n, k;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnw*", &sb, &n, &k, &ob)) return NULL;
    PyObject *ret = NULL;
    float *hs = NULL;
    Py_ssize_t *hi = NULL;
    if (n < 0 || k < 1) {
        PyErr_Format(PyExc_ValueError, "topk: bad sizes n=%zd k=%zd", n, k);
        goto done;
    }
    if (sb.len < n * 4 || ob.len < (k < n ? k : n) * 8) {
        PyErr_Format(PyExc_ValueError, "topk: buffers too small for n=%zd k=%zd (scores %zd bytes, out %zd)", n, k,
                     sb.len, ob.len);
        goto done;
    }
    hs = (float *)PyMem_RawMalloc((size_t)k * sizeof(float));
    hi = (Py_ssize_t *)PyMem_RawMalloc((size_t)k * sizeof(Py_ssize_t));
    if (hs == NULL || hi == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t m;
    Py_BEGIN_ALLOW_THREADS
    m = topk_f32((const float *)sb.buf, n, k, hs, hi, (int64_t *)ob.buf);
    Py_END_ALLOW_THREADS
    ret = PyLong_FromSsize_t(m);
done:
    PyMem_RawFree(hs);
    PyMem_RawFree(hi);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    return ret;
}

/* Rows scored per chunk by search_f16 (the chunk's scores stay in L1/L2 until the heap has seen them). */
#define SEARCH_CHUNK 4096

static void dot_rows_q1(const uint16_t *E, const float *q, float *out, Py_ssize_t n, Py_ssize_t d, int level,
                        float *row) {
#ifdef SARLOC_X86
    if (level == 2) {
        dot_avx512_q1(E, q, out, n, d);
        return;
    }
    if (level == 1) {
        dot_avx2_q1(E, q, out, n, d);
        return;
    }
#endif
    (void)level;
    dot_generic(E, q, out, n, d, 1, row);
}

static PyObject *scan_search_f16(PyObject *self, PyObject *args) {
    Py_buffer eb, qb, sb, ib;
    Py_ssize_t n, d, k;
    int want = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nnnw*w*|i", &eb, &qb, &n, &d, &k, &sb, &ib, &want)) return NULL;
    PyObject *ret = NULL;
    float *hs = NULL, *buf = NULL, *row = NULL;
    Py_ssize_t *hi = NULL;
    Py_ssize_t kk = k < n ? k : n;
    if (n < 0 || d < 1 || k < 1) {
        PyErr_Format(PyExc_ValueError, "search_f16: bad sizes n=%zd d=%zd k=%zd", n, d, k);
        goto done;
    }
    if (eb.len < n * d * 2 || qb.len < d * 4 || sb.len < kk * 4 || ib.len < kk * 8) {
        PyErr_Format(PyExc_ValueError, "search_f16: buffers too small for n=%zd d=%zd k=%zd", n, d, k);
        goto done;
    }
    hs = (float *)PyMem_RawMalloc((size_t)k * sizeof(float));
    hi = (Py_ssize_t *)PyMem_RawMalloc((size_t)k * sizeof(Py_ssize_t));
    buf = (float *)PyMem_RawMalloc(SEARCH_CHUNK * sizeof(float));
    row = (float *)PyMem_RawMalloc((size_t)d * sizeof(float));
    if (hs == NULL || hi == NULL || buf == NULL || row == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int level = simd_level();
    if (want >= 0 && want < level) level = want;
    Py_ssize_t m = 0;
    const uint16_t *E = (const uint16_t *)eb.buf;
    const float *q = (const float *)qb.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s0 = 0; s0 < n; s0 += SEARCH_CHUNK) {
        Py_ssize_t c = n - s0 < SEARCH_CHUNK ? n - s0 : SEARCH_CHUNK;
        dot_rows_q1(E + s0 * d, q, buf, c, d, level, row);
        heap_feed(buf, c, s0, k, hs, hi, &m);
    }
    heap_drain(hs, hi, m, (int64_t *)ib.buf, (float *)sb.buf);
    Py_END_ALLOW_THREADS
    ret = PyLong_FromSsize_t(m);
done:
    PyMem_RawFree(hs);
    PyMem_RawFree(hi);
    PyMem_RawFree(buf);
    PyMem_RawFree(row);
    PyBuffer_Release(&eb);
    PyBuffer_Release(&qb);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ib);
    return ret;
}

static PyObject *scan_kernel(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    int level = simd_level();
    return PyUnicode_FromString(level == 2 ? "avx512f" : level == 1 ? "avx2+f16c+fma" : "generic");
}

static PyMethodDef scan_methods[] = {
    {"dot_f16", scan_dot_f16, METH_VARARGS,
     "dot_f16(E, Q, out, n, d, nq, level=-1): out[j, i] = E[i] . Q[j] for float16 E, float32 Q and out; level caps "
     "the kernel (0 portable C, 1 AVX2 + F16C + FMA, 2 AVX-512F; -1 the best this CPU has)."},
    {"topk", scan_topk, METH_VARARGS,
     "topk(scores, n, k, out) -> m: indices of the m = min(k, n) best float32 scores into the int64 buffer out, "
     "best first, ties by lower index, NaN as -inf."},
    {"search_f16", scan_search_f16, METH_VARARGS,
     "search_f16(E, q, n, d, k, out_scores, out_idx, level=-1) -> m: the m = min(k, n) best rows of the float16 "
     "(n, d) matrix E for one float32 query q, scanned once (dot products and heap in one pass), best first, ties "
     "by lower row."},
    {"kernel", scan_kernel, METH_NOARGS, "kernel() -> the kernel dot_f16 uses on this CPU."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef scan_module = {PyModuleDef_HEAD_INIT,
                                         "sarloc._scan",
                                         "Fused float16 x float32 inner products for the map-pack scan.",
                                         -1,
                                         scan_methods,
                                         NULL,
                                         NULL,
                                         NULL,
                                         NULL};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&scan_module); }
