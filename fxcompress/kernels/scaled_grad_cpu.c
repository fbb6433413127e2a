/* CPU fast path of fxcompress/kernels/scaled_grad.py: PSGD's per-step work on
 * every weight of a graph in one call each way, instead of a dozen small
 * torch ops per weight (on CPU each costs microseconds of dispatch whatever
 * the tensor's size, and a small model's whole step is a few milliseconds).
 * Loaded by kernels/cbuild.py, built with -ffp-contract=off so every
 * multiply and add rounds on its own as in torch's separate ops: the scale
 * is bitwise equal to scaled_grad_reference for the same delta.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* One weight: update its EMA range [-r_min, r_max] (both >= 0) and return
 * the grid step delta = max(range) / L, clamped to FLT_MIN.
 * new = (max(-min w, 0), max(max w, 0)); a range not yet initialized takes
 * it as is (the caller then marks it), else r + m * (new - r), fused. NaN in w
 * propagates into the range, as torch.aminmax does. */
static float range_one(const float* x, int64_t m, float* r, int initialized, float momentum, float levels) {
    float lo = 0.0f, hi = 0.0f; /* the range is clamped at 0 anyway */
    int nan = 0;
    int64_t i = 0;
#ifdef __AVX2__
    /* explicit vectors: the compiler will not reorder a min/max reduction */
    __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
    for (; i + 8 <= m; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float l8[8], h8[8];
    _mm256_storeu_ps(l8, vlo);
    _mm256_storeu_ps(h8, vhi);
    nan = _mm256_movemask_ps(vnan) != 0;
    for (int k = 0; k < 8; ++k) {
        lo = l8[k] < lo ? l8[k] : lo;
        hi = h8[k] > hi ? h8[k] : hi;
    }
#endif
    for (; i < m; ++i) {
        float v = x[i];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        nan |= v != v;
    }
    float a = lo < 0.0f ? -lo : 0.0f, b = hi;
    if (nan) a = b = NAN;
    if (initialized) {
        /* fused, as torch's CPU lerp computes it (fmadd), so the two paths
         * keep the same ranges on this build of torch */
        r[0] = fmaf(momentum, a - r[0], r[0]);
        r[1] = fmaf(momentum, b - r[1], r[1]);
    } else {
        r[0] = a;
        r[1] = b;
    }
    float mx = (r[0] != r[0] || r[1] != r[1]) ? NAN : (r[0] > r[1] ? r[0] : r[1]);
    float d = mx / levels;
    return d < FLT_MIN ? FLT_MIN : d;
}

/* One weight: o = g * (lambda * |w - Q(w)| (+ eps)), Q(w) = delta *
 * rint(clip(w / delta, -L, L)) (round half to even, as torch.round), or Q = 0
 * for the sparse grid. Same operations in the same order as
 * scaled_grad_reference. o may be g (scaled in place). */
static void scale_one(const float* gt, const float* x, float* o, int64_t m, float d, float L, float l, float e,
                      int zero_grid) {
    if (zero_grid) {
        if (e != 0.0f)
            for (int64_t i = 0; i < m; ++i) o[i] = (fabsf(x[i]) * l + e) * gt[i];
        else
            for (int64_t i = 0; i < m; ++i) o[i] = (fabsf(x[i]) * l) * gt[i];
        return;
    }
    for (int64_t i = 0; i < m; ++i) {
        float v = x[i] / d;
        v = v < -L ? -L : (v > L ? L : v);
        float q = rintf(v) * d;
        float s = fabsf(x[i] - q) * l;
        if (e != 0.0f) s = s + e;
        o[i] = s * gt[i];
    }
}

/* Threads: OpenMP on the libgomp torch has loaded (one runtime, one pool),
 * torch.get_num_threads() set by scaled_grad.py; the weights are shared out
 * among the threads (dynamic: sizes differ), and each weight's range, step
 * and scaled gradient are computed by one thread exactly as before, so the
 * results do not depend on the thread count. Small batches (below SMALL
 * elements in all) run on one thread. */
static int psgd_threads = 1;
void fxc_psgd_set_threads(int n) { psgd_threads = n > 0 ? n : 1; }
#define SMALL (1 << 16)
static int nthreads(int n, const int64_t* numel) {
    int64_t total = 0;
    for (int t = 0; t < n; ++t) total += numel[t];
    return total < SMALL || n < 2 ? 1 : (n < psgd_threads ? n : psgd_threads);
}

/* A fixed list of weights with their constants, built once by CpuBatch:
 * one pointer per call instead of a dozen converted arguments. */
typedef struct {
    int32_t n;
    float momentum;
    const float* const* w;
    float* const* range;
    const int64_t* numel;
    const float* levels;
    const float* lam;
    const float* eps;
    const uint8_t* zero_grid;
    float* delta; /* the grid steps of the last call */
} psgd_batch;

/* Every EMA range (forward-only callers, a single ScaledGrad). */
void fxc_psgd_ranges(const psgd_batch* b, const uint8_t* initialized) {
    const int T = nthreads(b->n, b->numel);
#pragma omp parallel for num_threads(T) schedule(dynamic, 1)
    for (int t = 0; t < b->n; ++t)
        b->delta[t] = range_one(b->w[t], b->numel[t], b->range[t], initialized[t], b->momentum, b->levels[t]);
}

/* One backward of the group node: each weight's range, then, for the active
 * ones, its gradient g[t] scaled in place; one call per step. */
void fxc_psgd_step(const psgd_batch* b, float* const* g, const uint8_t* initialized, const uint8_t* active) {
    const int T = nthreads(b->n, b->numel);
#pragma omp parallel for num_threads(T) schedule(dynamic, 1)
    for (int t = 0; t < b->n; ++t) {
        float d = range_one(b->w[t], b->numel[t], b->range[t], initialized[t], b->momentum, b->levels[t]);
        b->delta[t] = d;
        if (active[t])
            scale_one(g[t], b->w[t], g[t], b->numel[t], d, b->levels[t], b->lam[t], b->eps[t], b->zero_grid[t]);
    }
}

/* The scaled gradients of n weights for given grid steps, out of place (the
 * tests hold it against the torch reference for the same delta). */
void fxc_psgd_scale(int n, const float* const* g, const float* const* w, float* const* out,
                    const int64_t* numel, const float* delta, const float* levels, const float* lam,
                    const float* eps, const uint8_t* zero_grid) {
    const int T = nthreads(n, numel);
#pragma omp parallel for num_threads(T) schedule(dynamic, 1)
    for (int t = 0; t < n; ++t)
        scale_one(g[t], w[t], out[t], numel[t], delta[t], levels[t], lam[t], eps[t], zero_grid[t]);
}
