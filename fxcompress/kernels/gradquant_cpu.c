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
 * Speed: up to 4 bits on AVX2 CPUs, explicit 8-lane loops (one group of
 * codes per vector: level lookups as in-register permutes, the hash of all
 * lanes at once, packing by variable shifts); everything else runs plain
 * loops over blocks of GQ_BLK coordinates of one bucket with no branch per
 * coordinate (level brackets by compare-and-select over the few levels),
 * which the compiler vectorises (-O3 -march=native, cbuild.py). Both are
 * instantiated per bit width, so shifts and level counts are constants.
 * The callers reuse their output buffers: fresh pages cost more than this
 * work.
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

/* ---- AVX2: up to 4 bits (at most 16 levels), 8 coordinates (one group)
 * per vector. The plain loops above vectorise the arithmetic but not the
 * level lookups (a gather, or one select per level) nor the packing (a
 * horizontal step); here a lookup is one in-register permute (vpermps) and
 * a group packs with a variable shift and three ORs. The same float32
 * operations as the plain loops (IEEE division, no FMA), so the same bits;
 * fxc_gq_simd(0) switches back to the plain loops, which the tests compare. */
static int gq_simd = 1;
/* the workers' sum over world: a power-of-two world multiplies by its exact
   reciprocal (same bits as dividing, cheaper), any other divides */
static inline void store_mean(float *dst, const float *acc, int n, int64_t world) {
    const float fw = (float)world;
    if ((world & (world - 1)) == 0) {
        const float inv = 1.0f / fw;
        if (world == 1) memcpy(dst, acc, (size_t)n * sizeof(float));
        else for (int q = 0; q < n; ++q) dst[q] = acc[q] * inv;
    } else {
        for (int q = 0; q < n; ++q) dst[q] = acc[q] / fw;
    }
}

#ifdef __AVX2__
#include <immintrin.h>

/* tab[c] for codes c < 16 (t1 only read when BITS == 4) */
static inline __m256 lut(__m256 t0, __m256 t1, __m256i c, int BITS) {
    __m256 v = _mm256_permutevar8x32_ps(t0, c);
    if (BITS == 4) /* bit 3 of c, moved to the sign bit, picks the upper table */
        v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(t1, c), _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
    return v;
}

/* counter_hash.h's fxc_mix32 on 8 lanes */
static inline __m256i mix8(__m256i h) {
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7FEB352D));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x2C1B3C6D));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

typedef struct {
    __m256 t0, t1, d;
    __m256 inner[14]; /* the interior levels, broadcast */
    uint32_t k1, k2;
} gq_enc8;

/* the codes of the 8 coordinates xv, global index i of the first */
static inline __m256i codes8(const gq_enc8 *e, __m256 xv, int64_t i, int BITS, int NI) {
    const __m256 one = _mm256_set1_ps(1.0f), mone = _mm256_set1_ps(-1.0f);
    __m256 r = _mm256_div_ps(xv, e->d);
    r = _mm256_blendv_ps(r, mone, _mm256_cmp_ps(r, mone, _CMP_LT_OQ)); /* NaN compares false: passes */
    r = _mm256_blendv_ps(r, one, _mm256_cmp_ps(r, one, _CMP_GT_OQ));
    __m256i k = _mm256_setzero_si256();
    for (int j = 0; j < NI; ++j) /* !(r < l): true (-1) for NaN, as in level_below */
        k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(r, e->inner[j], _CMP_NLT_UQ)));
    const __m256 lo = lut(e->t0, e->t1, k, BITS);
    const __m256 hi = lut(e->t0, e->t1, _mm256_add_epi32(k, _mm256_set1_epi32(1)), BITS);
    const __m256 p = _mm256_div_ps(_mm256_sub_ps(r, lo), _mm256_sub_ps(hi, lo));
    const uint32_t ctr = (uint32_t)((uint64_t)i + (uint64_t)e->k1);
    __m256i h = _mm256_add_epi32(_mm256_set1_epi32((int32_t)ctr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    h = mix8(_mm256_xor_si256(mix8(h), _mm256_set1_epi32((int32_t)e->k2)));
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
    return _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(u, p, _CMP_LT_OQ)));
}

/* 8 codes -> BITS bytes at o */
static inline void pack8(__m256i c, int BITS, uint8_t *o) {
    const __m256i sh = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(BITS));
    const __m256i w8 = _mm256_sllv_epi32(c, sh);
    __m128i a = _mm_or_si128(_mm256_castsi256_si128(w8), _mm256_extracti128_si256(w8, 1));
    a = _mm_or_si128(a, _mm_shuffle_epi32(a, _MM_SHUFFLE(1, 0, 3, 2)));
    a = _mm_or_si128(a, _mm_shuffle_epi32(a, _MM_SHUFFLE(2, 3, 0, 1)));
    const uint32_t w = (uint32_t)_mm_cvtsi128_si32(a);
    memcpy(o, &w, (size_t)BITS); /* little-endian: the group's BITS bytes */
}

/* NI: the number of interior levels, L - 2 (a constant where inlined) */
static inline void encode_simd(const float *x, int64_t numel, int64_t bucket, const float *norms, const float *levels,
                               int L, int NI, int BITS, uint32_t k1, uint32_t k2, float eps, uint8_t *out,
                               int64_t g0, int64_t g1) {
    gq_enc8 e;
    float tab[16];
    for (int j = 0; j < 16; ++j) tab[j] = levels[j < L ? j : L - 1];
    e.t0 = _mm256_loadu_ps(tab);
    e.t1 = _mm256_loadu_ps(tab + 8);
    for (int j = 0; j < L - 2; ++j) e.inner[j] = _mm256_set1_ps(levels[j + 1]);
    e.k1 = k1;
    e.k2 = k2;
    const int64_t end = min64(8 * g1, numel);
    for (int64_t i = 8 * g0; i < end;) {
        const int64_t b = i / bucket;
        const int64_t stop = min64((b + 1) * bucket, end);
        e.d = _mm256_set1_ps(norms[b] + eps);
        for (; i + 8 <= stop; i += 8)
            pack8(codes8(&e, _mm256_loadu_ps(x + i), i, BITS, NI), BITS, out + (i / 8) * BITS);
        if (i < stop) { /* the ragged last group: zeros in, and zero codes out past numel */
            float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            const int n = (int)(stop - i);
            memcpy(tail, x + i, (size_t)n * sizeof(float));
            const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            pack8(_mm256_and_si256(codes8(&e, _mm256_loadu_ps(tail), i, BITS, NI), keep), BITS, out + (i / 8) * BITS);
            i = stop;
        }
    }
}

/* decode for up to 4 bits: lv holds 2^BITS levels (NaN past the real ones) */
static inline void decode_simd(const uint8_t *msgs, int64_t world, int64_t stride, int64_t code_off, int64_t numel,
                               int64_t bucket, const float *lv, int BITS, float *out, int64_t g0, int64_t g1) {
    float tab[16], acc[GQ_BLK];
    for (int j = 0; j < 16; ++j) tab[j] = lv[j & ((1 << BITS) - 1)];
    const __m256 t0 = _mm256_loadu_ps(tab), t1 = _mm256_loadu_ps(tab + 8);
    const __m256i sh = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(BITS));
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    const int64_t end = min64(8 * g1, numel);
    for (int64_t i = 8 * g0; i < end;) {
        const int64_t b = i / bucket;
        const int64_t stop = min64(min64((b + 1) * bucket, end), i + GQ_BLK);
        const int n = (int)(stop - i), groups = (n + 7) / 8;
        for (int64_t w = 0; w < world; ++w) {
            const uint8_t *row = msgs + w * stride;
            const uint8_t *c = row + code_off + (i / 8) * BITS;
            float nrm;
            memcpy(&nrm, row + 4 * b, 4);
            const __m256 n8 = _mm256_set1_ps(nrm);
            for (int g = 0; g < groups; ++g) {
                uint32_t word = 0;
                memcpy(&word, c + g * BITS, (size_t)BITS);
                const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)word), sh), mask);
                const __m256 t = _mm256_mul_ps(lut(t0, t1, code, BITS), n8);
                const __m256 a = w == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + 8 * g);
                _mm256_storeu_ps(acc + 8 * g, _mm256_add_ps(a, t)); /* 0 + t first, as the reference */
            }
        }
        store_mean(out + i, acc, n, world);
        i = stop;
    }
}
#endif

/* 1: the AVX2 loops where built and they apply (the default); 0: the plain
 * loops. Returns whether the AVX2 loops are built. */
int fxc_gq_simd(int on) {
    gq_simd = on;
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

/* Encode groups [g0, g1): blocks never cross a bucket (a bucket is a whole
 * number of groups, bucket_size % 8 == 0), so one norm serves a block. */
static inline void encode_groups(const float *x, int64_t numel, int64_t bucket, const float *norms,
                                 const float *levels, int L, int BITS, uint32_t k1, uint32_t k2, float eps,
                                 uint8_t *out, int64_t g0, int64_t g1) {
    int32_t code[GQ_BLK];
#ifdef __AVX2__
    if (gq_simd && BITS <= 4) {
        if (L == (1 << BITS)) /* the usual case, all 2^bits levels: the level loop unrolled */
            encode_simd(x, numel, bucket, norms, levels, L, (1 << BITS) - 2, BITS, k1, k2, eps, out, g0, g1);
        else
            encode_simd(x, numel, bucket, norms, levels, L, L - 2, BITS, k1, k2, eps, out, g0, g1);
        return;
    }
#endif
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
#ifdef __AVX2__
    if (gq_simd && BITS <= 4) {
        decode_simd(msgs, world, stride, code_off, numel, bucket, levels, BITS, out, g0, g1);
        return;
    }
#endif
    float lv[256];
    for (int j = 0; j < (1 << BITS); ++j) lv[j] = levels[j];
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
        store_mean(out + i, acc, n, world);
        i = stop;
    }
}

/* The linf norms: the largest |x| of each bucket, for every bucket; a max
 * is exact in any order, so these are torch's amax(abs(x)) without its
 * full-size |x| temporary. A NaN in a bucket makes its norm that NaN, as
 * amax propagates it. (The l2 norms are sums, whose order is torch's: torch
 * computes those.) */
void fxc_gq_linf_norms(const float *x, int64_t numel, int64_t bucket, float *norms) {
    const int64_t nb = (numel + bucket - 1) / bucket;
    const int T = gq_pieces((numel + 7) / 8);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t i0 = b * bucket, i1 = min64(i0 + bucket, numel);
        /* 8 running maxima, lane by lane, then theirs: every |x| >= +0, so
         * the order cannot matter */
        float mm[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int32_t nn[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = i0;
        for (; i + 8 <= i1; i += 8)
            for (int q = 0; q < 8; ++q) {
                const float a = __builtin_fabsf(x[i + q]);
                mm[q] = a > mm[q] ? a : mm[q];
                nn[q] |= a != a;
            }
        for (; i < i1; ++i) {
            const float a = __builtin_fabsf(x[i]);
            mm[0] = a > mm[0] ? a : mm[0];
            nn[0] |= a != a;
        }
        float m = 0.0f;
        int nan = 0;
        for (int q = 0; q < 8; ++q) {
            m = mm[q] > m ? mm[q] : m;
            nan |= nn[q];
        }
        if (nan)
            for (int64_t i = i0; i < i1; ++i)
                if (x[i] != x[i]) {
                    m = __builtin_fabsf(x[i]);
                    break;
                }
        norms[b] = m;
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
