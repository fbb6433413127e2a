/* CPU fast path of fxcompress/kernels/gradquant.py (ALQ/AMQ gradient
 * quantization): stochastic rounding of x / (norm + eps) to a level index
 * and the wire format's packing (8 codes of `bits` bits fill `bits` bytes,
 * distributed/wire.py), and the decode's mean over ranks. The same float32
 * operations in the same order as encode_reference / decode_reference
 * (built with -ffp-contract=off), the same counter-based stream
 * (counter_hash.h): bitwise equal to them. The bucket norms are a
 * reduction whose order is torch's, so torch computes them and passes them
 * in.
 *
 * Speed: the work runs in blocks of GQ_BLK coordinates of one bucket, each
 * step a plain loop over the block with no branch per coordinate (level
 * brackets by compare-and-select over the few levels, the hash for every
 * lane at once), which the compiler vectorises (-O3 -march=native,
 * cbuild.py); packing and unpacking are instantiated per bit width so their
 * shifts are constants.
 *
 * Threads: OpenMP on torch's libgomp and torch's thread count, work cut at
 * whole groups of 8 codes; every code depends only on its own index, so the
 * bytes do not depend on the split (as in actpack_cpu.c). */
#include <stdint.h>
#include <string.h>
#include "counter_hash.h"

static int gq_threads = 1;
void fxc_gq_set_threads(int n) { gq_threads = n > 0 ? n : 1; }

#define GQ_SMALL (1 << 15) /* groups of 8 codes below which one thread runs */
#define GQ_BLK 512         /* coordinates per block: a multiple of 8, small enough for L1 */
#define GQ_SELECT 16       /* up to this many levels, brackets by selects; more: bisection */

static inline int gq_pieces(int64_t groups) {
    int64_t p = groups / GQ_SMALL;
    if (p < 1) p = 1;
    return p < gq_threads ? (int)p : gq_threads;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Level index of r: the number of interior levels l with !(r < l), which
 * is searchsorted(levels[1:-1], r, right=True) of the reference, NaN
 * included (it sorts last there and compares false here). By bisection. */
static inline int32_t level_below(const float *levels, int L, float r) {
    int32_t lo = 0, hi = L - 2; /* answer in [0, L-2] */
    while (lo < hi) {
        const int32_t mid = (lo + hi + 1) >> 1;
        if (!(r < levels[mid])) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* Codes of the n coordinates x[0..n) (global index s + i), all in one
 * bucket whose norm + eps is d. Levels are strictly increasing, so the
 * bracket [levels[k], levels[k+1]] of r is: lo the last level with
 * !(r < l), hi the first interior level with r < l (else the top level). */
static inline void codes_block(const float *x, int n, float d, int64_t s, const float *levels, int L, uint32_t k1,
                               uint32_t k2, int32_t *code) {
    float r[GQ_BLK], lo[GQ_BLK], hi[GQ_BLK];
    int32_t k[GQ_BLK];
    const float bottom = levels[0], top = levels[L - 1];
    for (int i = 0; i < n; ++i) {
        float v = x[i] / d;
        v = v < -1.0f ? -1.0f : v; /* clamp(-1, 1), NaN passing through as in torch */
        v = v > 1.0f ? 1.0f : v;
        r[i] = v;
    }
    if (L <= GQ_SELECT) {
        for (int i = 0; i < n; ++i) {
            k[i] = 0;
            lo[i] = bottom;
            hi[i] = top;
        }
        for (int j = 1; j < L - 1; ++j) {
            const float l = levels[j];
            for (int i = 0; i < n; ++i) {
                const int ge = !(r[i] < l);
                k[i] += ge;
                lo[i] = ge ? l : lo[i];
            }
        }
        for (int j = L - 2; j >= 1; --j) { /* downwards: the first level above r is written last */
            const float l = levels[j];
            for (int i = 0; i < n; ++i) hi[i] = r[i] < l ? l : hi[i];
        }
    } else {
        for (int i = 0; i < n; ++i) {
            k[i] = level_below(levels, L, r[i]);
            lo[i] = levels[k[i]];
            hi[i] = levels[k[i] + 1];
        }
    }
    /* the stream's counter is (index + k1) mod 2^32 */
    const uint32_t base = (uint32_t)((uint64_t)s + (uint64_t)k1);
    for (int i = 0; i < n; ++i) {
        const float p = (r[i] - lo[i]) / (hi[i] - lo[i]);
        const uint32_t h = fxc_mix32(fxc_mix32(base + (uint32_t)i) ^ k2);
        const float u = (float)(int32_t)(h >> 8) * (1.0f / 16777216.0f); /* fxc_u24, as a signed convert */
        code[i] = k[i] + (u < p);
    }
}

/* codes_block for exactly LC levels, LC a constant where it is inlined:
 * one pass per coordinate, the level loop unrolled into the vector loop.
 * Walking up the levels, each l_j with !(r < l_j) moves the bracket to
 * [l_j, l_{j+1}], so the last such j gives the reference's k (NaN: all of
 * them, k = L-2, as searchsorted puts NaN last). */
static inline void codes_fused(const float *x, int n, float d, int64_t s, const float *levels, int LC, uint32_t k1,
                               uint32_t k2, int32_t *code) {
    float lv[16];
    for (int j = 0; j < LC; ++j) lv[j] = levels[j];
    const uint32_t base = (uint32_t)((uint64_t)s + (uint64_t)k1);
    for (int i = 0; i < n; ++i) {
        float r = x[i] / d;
        r = r < -1.0f ? -1.0f : r;
        r = r > 1.0f ? 1.0f : r;
        int32_t k = 0;
        float lo = lv[0], hi = lv[1];
#pragma GCC unroll 16
        for (int j = 1; j < LC - 1; ++j) {
            const int ge = !(r < lv[j]);
            k += ge;
            lo = ge ? lv[j] : lo;
            hi = ge ? lv[j + 1] : hi;
        }
        const float p = (r - lo) / (hi - lo);
        const uint32_t h = fxc_mix32(fxc_mix32(base + (uint32_t)i) ^ k2);
        const float u = (float)(int32_t)(h >> 8) * (1.0f / 16777216.0f);
        code[i] = k + (u < p);
    }
}

/* 8 codes per group into BITS bytes, code q at bit BITS*q, little-endian;
 * a 32-bit word up to 4 bits (the compiler vectorises those, not 64-bit) */
static inline void pack_groups(const int32_t *code, int64_t groups, int BITS, uint8_t *o) {
    for (int64_t g = 0; g < groups; ++g) {
        if (BITS <= 4) {
            uint32_t w = 0;
            for (int q = 0; q < 8; ++q) w |= (uint32_t)code[8 * g + q] << (BITS * q);
            for (int b = 0; b < BITS; ++b) o[g * BITS + b] = (uint8_t)(w >> (8 * b));
        } else {
            uint64_t w = 0;
            for (int q = 0; q < 8; ++q) w |= (uint64_t)(uint32_t)code[8 * g + q] << (BITS * q);
            for (int b = 0; b < BITS; ++b) o[g * BITS + b] = (uint8_t)(w >> (8 * b));
        }
    }
}

static inline void unpack_groups(const uint8_t *c, int64_t groups, int BITS, int32_t *code) {
    for (int64_t g = 0; g < groups; ++g) {
        if (BITS <= 4) {
            uint32_t w = 0;
            for (int b = 0; b < BITS; ++b) w |= (uint32_t)c[g * BITS + b] << (8 * b);
            for (int q = 0; q < 8; ++q) code[8 * g + q] = (int32_t)((w >> (BITS * q)) & ((1u << BITS) - 1u));
        } else {
            uint64_t w = 0;
            for (int b = 0; b < BITS; ++b) w |= (uint64_t)c[g * BITS + b] << (8 * b);
            for (int q = 0; q < 8; ++q) code[8 * g + q] = (int32_t)((w >> (BITS * q)) & ((1u << BITS) - 1u));
        }
    }
}

/* Encode groups [g0, g1): blocks never cross a bucket (a bucket is a whole
 * number of groups, bucket_size % 8 == 0), so one norm serves a block. */
static inline void encode_groups(const float *x, int64_t numel, int64_t bucket, const float *norms,
                                 const float *levels, int L, int BITS, uint32_t k1, uint32_t k2, float eps,
                                 uint8_t *out, int64_t g0, int64_t g1) {
    int32_t code[GQ_BLK];
    const int64_t end = min64(8 * g1, numel);
    for (int64_t i = 8 * g0; i < end;) {
        const int64_t b = i / bucket;
        const int64_t stop = min64(min64((b + 1) * bucket, end), i + GQ_BLK);
        const int n = (int)(stop - i), n8 = (n + 7) & ~7;
        if (BITS <= 4 && L == (1 << BITS)) /* the usual case: all 2^bits levels in use */
            codes_fused(x + i, n, norms[b] + eps, i, levels, 1 << BITS, k1, k2, code);
        else
            codes_block(x + i, n, norms[b] + eps, i, levels, L, k1, k2, code);
        for (int q = n; q < n8; ++q) code[q] = 0; /* padding codes are zero, as in the reference */
        pack_groups(code, n8 / 8, BITS, out + (i / 8) * BITS);
        i = stop;
    }
}

/* Mean over `world` rows of groups [g0, g1) into out; lv holds 2^BITS
 * levels (NaN past the real ones). Ranks are added in order, as the
 * reference sums them; the mean divides by world, or multiplies by
 * 1/world when that is a power of two (the same correctly rounded value,
 * since 1/world is exact), which skips it for one rank. */
static inline void decode_groups(const uint8_t *msgs, int64_t world, int64_t stride, int64_t code_off, int64_t numel,
                                 int64_t bucket, const float *levels, int BITS, float *out, int64_t g0, int64_t g1) {
    int32_t code[GQ_BLK];
    float acc[GQ_BLK], val[GQ_BLK];
    float lv[256];
    for (int j = 0; j < (1 << BITS); ++j) lv[j] = levels[j];
    const float fw = (float)world;
    const int pow2 = (world & (world - 1)) == 0;
    const float inv = 1.0f / fw;
    const int64_t end = min64(8 * g1, numel);
    for (int64_t i = 8 * g0; i < end;) {
        const int64_t b = i / bucket;
        const int64_t stop = min64(min64((b + 1) * bucket, end), i + GQ_BLK);
        const int n = (int)(stop - i), n8 = (n + 7) & ~7;
        for (int q = 0; q < n8; ++q) acc[q] = 0.0f;
        for (int64_t w = 0; w < world; ++w) {
            const uint8_t *row = msgs + w * stride;
            float nrm;
            memcpy(&nrm, row + 4 * b, 4);
            unpack_groups(row + code_off + (i / 8) * BITS, n8 / 8, BITS, code);
            if (BITS <= 4) { /* few levels: selects, level by level, vectorise; a table lookup gathers */
                for (int q = 0; q < n8; ++q) val[q] = lv[0];
                for (int j = 1; j < (1 << BITS); ++j) {
                    const float l = lv[j];
                    for (int q = 0; q < n8; ++q) val[q] = code[q] == j ? l : val[q];
                }
            } else {
                for (int q = 0; q < n8; ++q) val[q] = lv[code[q]];
            }
            for (int q = 0; q < n8; ++q) {
                const float t = val[q] * nrm;
                acc[q] = acc[q] + t;
            }
        }
        if (pow2) {
            if (world == 1) memcpy(out + i, acc, (size_t)n * sizeof(float));
            else for (int q = 0; q < n; ++q) out[i + q] = acc[q] * inv;
        } else {
            for (int q = 0; q < n; ++q) out[i + q] = acc[q] / fw;
        }
        i = stop;
    }
}

/* one copy of each loop per bit width, so BITS is a constant in it */
#define GQ_WIDTHS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)
#define GQ_ENC(B)                                                                                               \
    static void encode_##B(const float *x, int64_t numel, int64_t bucket, const float *norms, const float *levels, \
                           int L, uint32_t k1, uint32_t k2, float eps, uint8_t *out, int64_t g0, int64_t g1) {    \
        encode_groups(x, numel, bucket, norms, levels, L, B, k1, k2, eps, out, g0, g1);                            \
    }
#define GQ_DEC(B)                                                                                                  \
    static void decode_##B(const uint8_t *msgs, int64_t world, int64_t stride, int64_t code_off, int64_t numel,     \
                           int64_t bucket, const float *lv, float *out, int64_t g0, int64_t g1) {                  \
        decode_groups(msgs, world, stride, code_off, numel, bucket, lv, B, out, g0, g1);                           \
    }
GQ_WIDTHS(GQ_ENC)
GQ_WIDTHS(GQ_DEC)

typedef void (*gq_enc_fn)(const float *, int64_t, int64_t, const float *, const float *, int, uint32_t, uint32_t,
                          float, uint8_t *, int64_t, int64_t);
typedef void (*gq_dec_fn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t, const float *, float *,
                          int64_t, int64_t);
#define GQ_NAME_ENC(B) encode_##B,
#define GQ_NAME_DEC(B) decode_##B,
static const gq_enc_fn gq_enc[9] = {0, GQ_WIDTHS(GQ_NAME_ENC)};
static const gq_dec_fn gq_dec[9] = {0, GQ_WIDTHS(GQ_NAME_DEC)};

/* codes of x (numel floats) into out (num_groups * bits bytes); bits in
 * 1..8, 2 <= L <= 2^bits strictly increasing levels (gradquant.py checks) */
void fxc_gq_encode(const float *x, int64_t numel, int64_t bucket, const float *norms, const float *levels, int L,
                   int bits, uint32_t k1, uint32_t k2, float eps, uint8_t *out) {
    const int64_t groups = (numel + 7) / 8;
    const int T = gq_pieces(groups);
    const gq_enc_fn f = gq_enc[bits];
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t)
        f(x, numel, bucket, norms, levels, L, k1, k2, eps, out, groups * t / T, groups * (t + 1) / T);
}

/* mean over `world` messages (rows `stride` bytes apart: norms, then codes
 * at code_off) -> out (numel floats) */
void fxc_gq_decode(const uint8_t *msgs, int64_t world, int64_t stride, int64_t code_off, int64_t numel, int64_t bucket,
                   const float *levels, int L, int bits, float *out) {
    float lv[256];
    const int n = 1 << bits;
    for (int j = 0; j < n; ++j) lv[j] = j < L ? levels[j] : __builtin_nanf(""); /* a code past the levels: NaN */
    const int64_t groups = (numel + 7) / 8;
    const int T = gq_pieces(groups);
    const gq_dec_fn f = gq_dec[bits];
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t)
        f(msgs, world, stride, code_off, numel, bucket, lv, out, groups * t / T, groups * (t + 1) / T);
}
