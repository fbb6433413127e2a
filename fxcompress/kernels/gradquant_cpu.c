/* CPU fast path of fxcompress/kernels/gradquant.py (ALQ/AMQ gradient
 * quantization): stochastic rounding of x / (norm + eps) to a level index
 * and the wire format's packing (8 codes of `bits` bits fill `bits` bytes,
 * distributed/wire.py), and the decode's mean over ranks. The same float32
 * operations in the same order as encode_reference / decode_reference
 * (built with -ffp-contract=off), the same counter-based stream
 * (counter_hash.h): bitwise equal to them. The bucket norms are a
 * reduction whose order is torch's, so torch computes them and passes them
 * in. Threads: OpenMP on torch's libgomp and torch's thread count, work cut
 * at whole groups of 8 codes; every code depends only on its own index, so
 * the bytes do not depend on the split (as in actpack_cpu.c). */
#include <stdint.h>
#include <string.h>
#include "counter_hash.h"

static int gq_threads = 1;
void fxc_gq_set_threads(int n) { gq_threads = n > 0 ? n : 1; }

#define GQ_SMALL (1 << 15) /* groups of 8 codes below which one thread runs */

static inline int gq_pieces(int64_t groups) {
    int64_t p = groups / GQ_SMALL;
    if (p < 1) p = 1;
    return p < gq_threads ? (int)p : gq_threads;
}

/* level index of r in [-1, 1]: the number of interior levels <= r (numpy's
 * searchsorted(levels[1:-1], r, side="right")), by bisection */
static inline int32_t level_below(const float *levels, int L, float r) {
    int32_t lo = 0, hi = L - 2; /* answer in [0, L-2] */
    while (lo < hi) {
        const int32_t mid = (lo + hi + 1) >> 1; /* is levels[mid] <= r ? */
        if (levels[mid] <= r) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* the code of coordinate i (x its value, d its bucket's norm + eps) */
static inline uint32_t code_of(float xv, float d, int64_t i, const float *levels, int L, uint32_t k1, uint32_t k2) {
    float r = xv / d;
    r = r < -1.0f ? -1.0f : (r > 1.0f ? 1.0f : r);
    int32_t k;
    if (L <= 16) { /* few levels: a branchless count vectorises, bisection mispredicts */
        k = 0;
        for (int j = 1; j < L - 1; ++j) k += levels[j] <= r;
    } else {
        k = level_below(levels, L, r);
    }
    const float lo = levels[k], hi = levels[k + 1];
    const float p = (r - lo) / (hi - lo);
    const uint32_t h = fxc_mix32(fxc_mix32((uint32_t)((uint64_t)(i + (int64_t)k1) & 0xFFFFFFFFu)) ^ k2);
    return (uint32_t)k + (fxc_u24(h) < p);
}

static void encode_groups(const float *x, int64_t numel, int64_t bucket, const float *norms, const float *levels,
                          int L, int bits, uint32_t k1, uint32_t k2, float eps, uint8_t *out, int64_t g0,
                          int64_t g1) {
    /* a bucket is a whole number of groups (bucket_size % 8 == 0), so one
     * norm serves a group */
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t i0 = 8 * g;
        const float d = norms[i0 / bucket] + eps;
        uint32_t c[8];
        if (i0 + 8 <= numel) {
            for (int q = 0; q < 8; ++q) c[q] = code_of(x[i0 + q], d, i0 + q, levels, L, k1, k2);
        } else {
            for (int q = 0; q < 8; ++q) c[q] = i0 + q < numel ? code_of(x[i0 + q], d, i0 + q, levels, L, k1, k2) : 0u;
        }
        uint64_t word = 0;
        for (int q = 0; q < 8; ++q) word |= (uint64_t)c[q] << (bits * q);
        uint8_t *o = out + g * bits;
        for (int b = 0; b < bits; ++b) o[b] = (uint8_t)(word >> (8 * b));
    }
}

/* codes of x (numel floats) into out (num_groups * bits bytes) */
void fxc_gq_encode(const float *x, int64_t numel, int64_t bucket, const float *norms, const float *levels, int L,
                   int bits, uint32_t k1, uint32_t k2, float eps, uint8_t *out) {
    const int64_t groups = (numel + 7) / 8;
    const int T = gq_pieces(groups);
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t)
        encode_groups(x, numel, bucket, norms, levels, L, bits, k1, k2, eps, out, groups * t / T,
                      groups * (t + 1) / T);
}

static void decode_groups(const uint8_t *msgs, int64_t world, int64_t stride, int64_t code_off, int64_t numel,
                          int64_t bucket, const float *levels, int bits, float *out, int64_t g0, int64_t g1) {
    const uint64_t mask = (1u << bits) - 1u;
    const float fw = (float)world;
    for (int64_t g = g0; g < g1; ++g) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int64_t n = numel - 8 * g < 8 ? numel - 8 * g : 8;
        for (int64_t w = 0; w < world; ++w) { /* ranks in order, as the reference sums them */
            const uint8_t *row = msgs + w * stride;
            const uint8_t *c = row + code_off + g * bits;
            uint64_t word = 0;
            for (int b = 0; b < bits; ++b) word |= (uint64_t)c[b] << (8 * b);
            float nrm; /* one bucket per group */
            memcpy(&nrm, row + 4 * ((8 * g) / bucket), 4);
            for (int q = 0; q < 8; ++q) {
                const float t = levels[(word >> (bits * q)) & mask] * nrm;
                acc[q] = acc[q] + t;
            }
        }
        for (int64_t q = 0; q < n; ++q) out[8 * g + q] = acc[q] / fw;
    }
}

/* mean over `world` messages (rows `stride` bytes apart: norms, then codes
 * at code_off) -> out (numel floats) */
void fxc_gq_decode(const uint8_t *msgs, int64_t world, int64_t stride, int64_t code_off, int64_t numel, int64_t bucket,
                   const float *levels, int bits, float *out) {
    const int64_t groups = (numel + 7) / 8;
    const int T = gq_pieces(groups);
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t)
        decode_groups(msgs, world, stride, code_off, numel, bucket, levels, bits, out, groups * t / T,
                      groups * (t + 1) / T);
}
