/* CPU fast path of the activation packers (fxcompress/kernels/fixed_width.py,
 * bitmask.py, mixed_width.py, mixed_zvc.py, window_index.py): the same quantizer and
 * bit layout as the torch reference (which stays the oracle), as one loop
 * over memory instead of a chain of whole-tensor ops. Compiled once with the
 * system C compiler and loaded with ctypes (see actpack_cpu.py); built
 * with -ffp-contract=off so x*k + r rounds exactly as torch's separate
 * multiply and add do, which keeps this path bitwise equal to the reference.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "counter_hash.h"
/* AutoQuant's width rule (fxc_auto_bits), for fxc_auto_plan below: the same
 * source as kernels/autobits.py's own library, compiled into this one too */
#include "autobits_cpu.c"
#ifdef __AVX2__
#include <immintrin.h>
/* expand LUT: for a mask byte, lane q takes code number popcount(bits below q) */
static int32_t exp_idx[256][8];
static int32_t exp_msk[256][8];
static int32_t cmp_idx[256][8]; /* compress: the set lanes first, in order */
static int exp_ready = 0;
static void exp_init(void) {
    for (int m = 0; m < 256; ++m) {
        int t = 0;
        for (int q = 0; q < 8; ++q) cmp_idx[m][q] = 0;
        for (int q = 0; q < 8; ++q)
            if ((m >> q) & 1) cmp_idx[m][t++] = q;
        t = 0;
        for (int q = 0; q < 8; ++q) {
            exp_idx[m][q] = (m >> q) & 1 ? t : 0;
            exp_msk[m][q] = (m >> q) & 1 ? -1 : 0;
            t += (m >> q) & 1;
        }
    }
    /* release: a thread that reads exp_ready == 1 (acquire) sees the tables;
     * the pieces of one call may race to fill them, with the same values */
    __atomic_store_n(&exp_ready, 1, __ATOMIC_RELEASE);
}
#endif

/* u in [0, 1) of element i: counter_hash's finaliser of (i + key) mod 2^32 */
static inline float u01(int64_t i, uint32_t key) {
    return fxc_u24(fxc_mix32((uint32_t)((uint64_t)(i + (int64_t)key) & 0xFFFFFFFFu)));
}

/* rounding.py's grid; is_signed is its grid kind: 0 unsigned, 1 signed
 * with 0 on the grid (L = 2^(b-1) - 1 a side, 1/2 at 1 bit), 2 signed with
 * all 2^b codes (L = (2^b - 1)/2, a half-integer, exact). off = the offset
 * that makes codes non-negative (L signed, 0 unsigned), hi = the top code
 * (2L signed, 2^b - 1 unsigned) */
static inline void grid(int bits, int is_signed, float *off, float *hi) {
    if (!is_signed) {
        *off = 0.0f;
        *hi = (float)((1 << bits) - 1);
    } else {
        const float half = is_signed == 2 ? 0.5f * (float)((1 << bits) - 1)
                                          : (bits > 1 ? (float)((1 << (bits - 1)) - 1) : 0.5f);
        *off = half;
        *hi = 2.0f * half;
    }
}

/* the offset alone, for the decoders */
static inline float grid_offset(int bits, int is_signed) {
    float off, hi;
    grid(bits, is_signed, &off, &hi);
    return off;
}

/* A decoder's step to the next element: position pos in its row of B
 * elements, row c of C (rows cycle); returns the scale kinv[c] of the
 * element it moved to (kv, unchanged, inside a row). */
static inline float next_element(const float *kinv, int64_t B, int64_t C, int64_t *pos, int64_t *c, float kv) {
    if (++*pos == B) {
        *pos = 0;
        if (++*c == C) *c = 0;
        return kinv[*c];
    }
    return kv;
}

/* Quantize x (n floats, scale row c = (i / B) % C) and pack the slice
 * (code >> shift) & (2^width - 1), 8/width codes per byte, low bits first.
 * code = (int) clamp(x*k + r + off, 0, hi): adding the offset
 * before clamping makes truncation equal floor, so the loop needs no floorf
 * and vectorises. Codes go through a small buffer, in runs of constant k. */
#define CHUNK 4096


/* ---- threads. One mechanism: OpenMP, built against the libgomp torch
 * itself loads (the same soname, so the process has one OpenMP runtime and
 * one pool, shared with torch's intra-op work rather than competing with
 * it); the count is torch.get_num_threads(), set by actpack_cpu.py before
 * calls. Work is cut into pieces at multiples of CHUNK elements (so every
 * piece starts on a byte of every slice width), and every element's result
 * depends only on its own index (the random stream is counter-based), so
 * the output is the same bytes at any thread count. Tensors below SMALL
 * elements run on one thread: a parallel region costs a few microseconds. */
static int fxc_threads = 1;
void fxc_set_threads(int n) { fxc_threads = n > 0 ? n : 1; }
#define SMALL (1 << 16)
static inline int npieces(int64_t n) {
    int64_t p = n / SMALL;
    if (p < 1) p = 1;
    return p < fxc_threads ? (int)p : fxc_threads;
}
/* start of piece t of T over n elements (piece T: n) */
static inline int64_t piece(int64_t n, int t, int T) {
    return t >= T ? n : (n / CHUNK * t / T) * CHUNK;
}
/* run STMT (which sees i0, i1) on every piece of [0, N), in parallel */
#define PIECES(N, STMT)                                                         \
    do {                                                                        \
        const int64_t n_ = (N);                                                 \
        const int T_ = npieces(n_);                                             \
        _Pragma("omp parallel for num_threads(T_) schedule(static, 1)")         \
        for (int t_ = 0; t_ < T_; ++t_) {                                       \
            const int64_t i0 = piece(n_, t_, T_), i1 = piece(n_, t_ + 1, T_);   \
            if (i1 > i0) { STMT; }                                              \
        }                                                                       \
    } while (0)

/* One run of codes at a constant scale kc: code = (int) clamp(x*kc + r + off,
 * 0, hi), r the stochastic draw of element i0+u or 0.5 for nearest. Each
 * branch is its own loop so the compiler vectorises it after inlining. */
static inline void quant_codes(const float *xs, float kc, int64_t run, int64_t i0, uint32_t key, int stoch,
                               float off, float hi, uint16_t *bs) {
    if (stoch) {
        for (int64_t u = 0; u < run; ++u) {
            float v = xs[u] * kc;
            v = v + u01(i0 + u, key);
            v = v + off;
            v = v < 0.0f ? 0.0f : v;
            v = v > hi ? hi : v;
            bs[u] = (uint16_t)(int32_t)v;
        }
    } else {
        for (int64_t u = 0; u < run; ++u) {
            float v = xs[u] * kc;
            v = v + 0.5f;
            v = v + off;
            v = v < 0.0f ? 0.0f : v;
            v = v > hi ? hi : v;
            bs[u] = (uint16_t)(int32_t)v;
        }
    }
}

/* Pack codes buf[0..m) as (code >> shift) & (2^width - 1), 8/width per byte,
 * low bits first; a ragged last byte is zero-padded. */
static inline void pack_buf(const uint16_t *buf, int64_t m, int width, int shift, uint8_t *o) {
    const int per = 8 / width;
    const uint32_t mask = (1u << width) - 1u;
    const int64_t full = m / per;
    int64_t b0 = 0; /* bytes already written by the AVX2 loops */
#ifdef __AVX2__
    /* 1- and 2-bit slices (what the compiler leaves scalar): the same bytes */
    const __m128i shv = _mm_cvtsi32_si128(shift);
    if (per == 8) {
        /* 32 codes: slice bits to bytes (packus; the permute restores the
         * order), bit 0 of each byte to its sign, movemask: 4 bytes */
        const __m256i one = _mm256_set1_epi16(1);
        for (; b0 + 4 <= full; b0 += 4) {
            const __m256i a = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(buf + 8 * b0)), shv), one);
            const __m256i c = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(buf + 8 * b0 + 16)), shv), one);
            const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, c), 0xD8);
            const uint32_t r = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(p, 7));
            memcpy(o + b0, &r, 4);
        }
    } else if (per == 4) {
        /* 16 codes: c0 | c1 << 2 in each 32-bit lane, then | (c2 | c3 << 2) << 4
         * in the low byte of each 64-bit lane; those 4 bytes gathered */
        const __m256i three = _mm256_set1_epi16(3);
        const __m256i pick = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                              0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        for (; b0 + 4 <= full; b0 += 4) {
            __m256i v = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(buf + 4 * b0)), shv), three);
            v = _mm256_or_si256(v, _mm256_srli_epi32(v, 14));
            v = _mm256_or_si256(v, _mm256_srli_epi64(v, 28));
            v = _mm256_shuffle_epi8(v, pick);
            const uint32_t r = (uint32_t)(uint16_t)_mm256_extract_epi16(v, 0) | (uint32_t)(uint16_t)_mm256_extract_epi16(v, 8) << 16;
            memcpy(o + b0, &r, 4);
        }
    }
#endif
    /* constant strides per width, so the compiler can vectorise each case */
#define S(j) ((((uint32_t)buf[b * per + (j)]) >> shift) & mask)
    switch (per) {
    case 1: for (int64_t b = b0; b < full; ++b) o[b] = (uint8_t)S(0); break;
    case 2: for (int64_t b = b0; b < full; ++b) o[b] = (uint8_t)(S(0) | S(1) << 4); break;
    case 4: for (int64_t b = b0; b < full; ++b) o[b] = (uint8_t)(S(0) | S(1) << 2 | S(2) << 4 | S(3) << 6); break;
    default:
        for (int64_t b = b0; b < full; ++b)
            o[b] = (uint8_t)(S(0) | S(1) << 1 | S(2) << 2 | S(3) << 3 | S(4) << 4 | S(5) << 5 | S(6) << 6 | S(7) << 7);
    }
#undef S
    if (full * per < m) {
        uint32_t acc = 0;
        for (int64_t j = 0; full * per + j < m; ++j)
            acc |= (((uint32_t)buf[full * per + j] >> shift) & mask) << (j * width);
        o[full] = (uint8_t)acc;
    }
}

/* buf[0..fill) into every slice q (width w[q], shift sh[q]) at op[q], which
 * then moves past what was written (fill is CHUNK, a multiple of 8, except
 * at the end of a stream). */
static inline void pack_slices(const uint16_t *buf, int64_t fill, int nparts, const int *w, const int *sh,
                               uint8_t **op) {
    for (int q = 0; q < nparts; ++q) {
        pack_buf(buf, fill, w[q], sh[q], op[q]);
        op[q] += fill / (8 / w[q]);
    }
}

static void quant_pack_range(const float *x, const float *k, int64_t n0, int64_t n, int64_t C, int64_t B,
                             int bits, int width, int shift, int is_signed, int stoch, uint32_t key, uint8_t *out) {
    const int per = 8 / width;
    float off, hi;
    grid(bits, is_signed, &off, &hi);
    uint16_t buf[CHUNK];
    int64_t c = (n0 / B) % C, pos = n0 % B;
    for (int64_t start = n0; start < n; start += CHUNK) {
        const int64_t m = (n - start) < CHUNK ? (n - start) : CHUNK;
        int64_t t = 0;
        while (t < m) {
            int64_t run = B - pos;
            if (run > m - t) run = m - t;
            const float kc = k[c];
            const float *xs = x + start + t;
            uint16_t *bs = buf + t;
            quant_codes(xs, kc, run, start + t, key, stoch, off, hi, bs);
            t += run;
            pos += run;
            if (pos == B) {
                pos = 0;
                if (++c == C) c = 0;
            }
        }
        /* CHUNK is a multiple of 8, so only the last chunk has a ragged byte */
        pack_buf(buf, m, width, shift, out + start / per);
    }
}

void fxc_quant_pack(const float *x, const float *k, int64_t n, int64_t C, int64_t B, int bits, int width,
                    int shift, int is_signed, int stoch, uint32_t key, uint8_t *out) {
    PIECES(n, quant_pack_range(x, k, i0, i1, C, B, bits, width, shift, is_signed, stoch, key, out));
}

/* Pack integer codes (int32, already < 2^bits) as one slice. */
static void fxc_pack_codes_run(const int32_t *codes, int64_t n, int width, int shift, uint8_t *out) {
    const int per = 8 / width;
    const uint32_t mask = (1u << width) - 1u;
    const int64_t nbytes = (n + per - 1) / per;
    int64_t i = 0;
    for (int64_t byte = 0; byte < nbytes; ++byte) {
        uint32_t acc = 0;
        for (int j = 0; j < per && i < n; ++j, ++i)
            acc |= (((uint32_t)codes[i] >> shift) & mask) << (j * width);
        out[byte] = (uint8_t)acc;
    }
}

void fxc_pack_codes(const int32_t *codes, int64_t n, int width, int shift, uint8_t *out) {
    const int per = 8 / width;
    PIECES(n, fxc_pack_codes_run(codes + i0, i1 - i0, width, shift, out + i0 / per));
}

/* Add one slice into int32 codes (first: overwrite); one byte at a time. */
static void fxc_unpack_codes_run(const uint8_t *in, int64_t n, int width, int shift, int first, int32_t *codes) {
    const int per = 8 / width;
    const uint32_t mask = (1u << width) - 1u;
    const int64_t full = n / per;
    for (int64_t b = 0; b < full; ++b) {
        const uint32_t v = in[b];
        int32_t *p = codes + b * per;
        if (first)
            for (int j = 0; j < per; ++j) p[j] = (int32_t)(((v >> (j * width)) & mask) << shift);
        else
            for (int j = 0; j < per; ++j) p[j] |= (int32_t)(((v >> (j * width)) & mask) << shift);
    }
    for (int64_t i = full * per; i < n; ++i) {
        uint32_t s = ((uint32_t)in[i / per] >> ((i % per) * width)) & mask;
        codes[i] = first ? (int32_t)(s << shift) : (codes[i] | (int32_t)(s << shift));
    }
}

void fxc_unpack_codes(const uint8_t *in, int64_t n, int width, int shift, int first, int32_t *codes) {
    const int per = 8 / width;
    PIECES(n, fxc_unpack_codes_run(in + i0 / per, i1 - i0, width, shift, first, codes + i0));
}

/* Single-slice unpack and dequantize straight to float: x = (code - off) * kinv[c].
 * In runs of one scale (a row of B elements): whole bytes through a table of
 * the byte's `per` values (code - off), times the row's scale, which the
 * compiler vectorises; the same two float operations per element as one
 * code at a time (short rows), so the same bits. */
static void unpack_dequant_run(const uint8_t *in, const float *kinv, int64_t n, int64_t C, int64_t B, int bits,
                               int is_signed, float *out, int64_t c, int64_t pos) {
    const int width = bits;
    const int per = 8 / width;
    const uint32_t mask = (1u << width) - 1u;
    const float off = grid_offset(bits, is_signed);
    if (B < 64) { /* short rows: a run costs more than it saves */
        int64_t i = 0;
        float kv = kinv[c];
        const int64_t nbytes = (n + per - 1) / per;
        for (int64_t byte = 0; byte < nbytes; ++byte) {
            uint32_t b = in[byte];
            for (int j = 0; j < per && i < n; ++j, ++i) {
                float code = (float)((b >> (j * width)) & mask);
                out[i] = (code - off) * kv;
                kv = next_element(kinv, B, C, &pos, &c, kv);
            }
        }
        return;
    }
    float lut[256 * 8];
    for (int v = 0; v < 256; ++v)
        for (int j = 0; j < per; ++j) lut[v * per + j] = (float)((v >> (j * width)) & mask) - off;
    int64_t i = 0;
    while (i < n) {
        int64_t run = B - pos;
        if (run > n - i) run = n - i;
        const float kv = kinv[c];
        int64_t u = i, e = i + run;
        for (; u < e && u % per; ++u) out[u] = lut[in[u / per] * per + u % per] * kv;
        const int64_t b0 = u / per, b1 = e / per;
        float *o = out + b0 * per;
#define DQ(P)                                                                              \
    for (int64_t b = b0; b < b1; ++b, o += P) {                                            \
        const float *l = lut + in[b] * P;                                                  \
        for (int j = 0; j < P; ++j) o[j] = l[j] * kv;                                      \
    }
        switch (per) {
        case 1: DQ(1); break;
        case 2: DQ(2); break;
        case 4: DQ(4); break;
        default: DQ(8);
        }
#undef DQ
        for (u = b1 * per > u ? b1 * per : u; u < e; ++u) out[u] = lut[in[u / per] * per + u % per] * kv;
        i = e;
        pos += run;
        if (pos == B) {
            pos = 0;
            if (++c == C) c = 0;
        }
    }
}

void fxc_unpack_dequant(const uint8_t *in, const float *kinv, int64_t n, int64_t C, int64_t B, int bits,
                        int is_signed, float *out) {
    const int per = 8 / bits;
    PIECES(n, unpack_dequant_run(in + i0 / per, kinv, i1 - i0, C, B, bits, is_signed, out + i0, (i0 / B) % C, i0 % B));
}

/* Multi-slice: codes already assembled in int32. */
static void dequant_codes_run(const int32_t *codes, const float *kinv, int64_t n, int64_t C, int64_t B, int bits,
                              int is_signed, float *out, int64_t c, int64_t pos) {
    const float off = grid_offset(bits, is_signed);
    float kv = kinv[c];
    for (int64_t i = 0; i < n; ++i) {
        out[i] = ((float)codes[i] - off) * kv;
        kv = next_element(kinv, B, C, &pos, &c, kv);
    }
}

void fxc_dequant_codes(const int32_t *codes, const float *kinv, int64_t n, int64_t C, int64_t B, int bits,
                       int is_signed, float *out) {
    PIECES(n, dequant_codes_run(codes + i0, kinv, i1 - i0, C, B, bits, is_signed, out + i0, (i0 / B) % C, i0 % B));
}

/* Booleans (one byte each, 0 or 1) to 1 bit each, and back. */
static void fxc_pack_mask_run(const uint8_t *m, int64_t n, uint8_t *out) {
    const int64_t full = n / 8;
    for (int64_t b = 0; b < full; ++b) {
        const uint8_t *p = m + 8 * b;
        out[b] = (uint8_t)((p[0] & 1) | (p[1] & 1) << 1 | (p[2] & 1) << 2 | (p[3] & 1) << 3 | (p[4] & 1) << 4 |
                           (p[5] & 1) << 5 | (p[6] & 1) << 6 | (p[7] & 1) << 7);
    }
    if (full * 8 < n) {
        uint32_t acc = 0;
        for (int64_t j = 0; full * 8 + j < n; ++j) acc |= (uint32_t)(m[full * 8 + j] & 1) << j;
        out[full] = (uint8_t)acc;
    }
}

void fxc_pack_mask(const uint8_t *m, int64_t n, uint8_t *out) {
    PIECES(n, fxc_pack_mask_run(m + i0, i1 - i0, out + i0 / 8));
}

static void fxc_unpack_mask_run(const uint8_t *in, int64_t n, uint8_t *out) {
    const int64_t full = n / 8;
    for (int64_t b = 0; b < full; ++b) {
        const uint32_t v = in[b];
        uint8_t *p = out + 8 * b;
        for (int j = 0; j < 8; ++j) p[j] = (uint8_t)((v >> j) & 1);
    }
    for (int64_t i = full * 8; i < n; ++i) out[i] = (uint8_t)((in[i / 8] >> (i % 8)) & 1);
}

void fxc_unpack_mask(const uint8_t *in, int64_t n, uint8_t *out) {
    PIECES(n, fxc_unpack_mask_run(in + i0 / 8, i1 - i0, out + i0));
}

/* Rows r0..r1 of x (row r has B elements, scale row r % C): max|x| into
 * amax, count of x > 0 into nnz (when given), minimum into *minv; the
 * accumulators start as the caller set them. NaN is skipped (it fails
 * every comparison here). With AVX2, 8 lanes of max/min/count per row
 * (the compiler will not reorder a float max reduction itself), merged
 * after: max and counts do not depend on the order, and the minimum only
 * in the sign of a zero (its value, all the callers read, does not). */
static void stats_rows(const float *x, int64_t r0, int64_t r1, int64_t C, int64_t B, float *amax, float *minv,
                       int64_t *nnz) {
    float mn = *minv;
    int64_t c = r0 % C;
#ifdef __AVX2__
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), zero = _mm256_setzero_ps();
#endif
    for (int64_t r = r0; r < r1; ++r) {
        const float *xs = x + r * B;
        float a = amax[c], m = mn;
        int64_t z = 0, u = 0;
#ifdef __AVX2__
        if (B >= 16) {
            /* a NaN in the first operand of max/min gives the second: skipped */
            __m256 va = _mm256_set1_ps(a), vm = _mm256_set1_ps(m);
            __m256i vz = _mm256_setzero_si256();
            if (nnz) {
                for (; u + 8 <= B; u += 8) {
                    const __m256 v = _mm256_loadu_ps(xs + u);
                    va = _mm256_max_ps(_mm256_and_ps(v, absm), va);
                    vm = _mm256_min_ps(v, vm);
                    vz = _mm256_sub_epi32(vz, _mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)));
                }
            } else {
                for (; u + 8 <= B; u += 8) {
                    const __m256 v = _mm256_loadu_ps(xs + u);
                    va = _mm256_max_ps(_mm256_and_ps(v, absm), va);
                    vm = _mm256_min_ps(v, vm);
                }
            }
            float la[8], lm[8];
            int32_t lz[8];
            _mm256_storeu_ps(la, va);
            _mm256_storeu_ps(lm, vm);
            _mm256_storeu_si256((__m256i *)lz, vz);
            for (int q = 0; q < 8; ++q) {
                a = la[q] > a ? la[q] : a;
                m = lm[q] < m ? lm[q] : m;
                z += lz[q];
            }
        }
#endif
        if (nnz) {
            for (; u < B; ++u) {
                const float v = xs[u];
                const float av = fabsf(v);
                a = av > a ? av : a;
                m = v < m ? v : m;
                z += v > 0.0f;
            }
            nnz[c] += z;
        } else {
            for (; u < B; ++u) {
                const float v = xs[u];
                const float av = fabsf(v);
                a = av > a ? av : a;
                m = v < m ? v : m;
            }
        }
        amax[c] = a;
        mn = m;
        if (++c == C) c = 0;
    }
    *minv = mn;
}

/* Per-row max|x| (rows c = (i / B) % C, amax has C entries), the global
 * minimum and, with nnz, the per-row count of x > 0, in one read of x. The
 * rows are cut into one range per thread, each with its own accumulators,
 * merged after: max, min and integer counts do not depend on the order. */
static int stats_all(const float *x, int64_t n, int64_t C, int64_t B, float *amax, float *minv, int64_t *nnz) {
    const int64_t rows = n / B;
    int T = npieces(n);
    if (T > rows) T = (int)rows;
    if (T < 1) T = 1;
    float *ta = (float *)malloc((size_t)T * (size_t)C * sizeof(float));
    float *tm = (float *)malloc((size_t)T * sizeof(float));
    int64_t *tz = nnz ? (int64_t *)calloc((size_t)T * (size_t)C, sizeof(int64_t)) : NULL;
    if (!ta || !tm || (nnz && !tz)) {
        free(ta); free(tm); free(tz);
        return -1;
    }
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) {
        for (int64_t c = 0; c < C; ++c) ta[t * C + c] = 0.0f;
        tm[t] = INFINITY;
        stats_rows(x, rows * t / T, rows * (t + 1) / T, C, B, ta + t * C, tm + t, tz ? tz + t * C : NULL);
    }
    float mn = INFINITY;
    for (int64_t c = 0; c < C; ++c) {
        float a = 0.0f;
        int64_t z = 0;
        for (int t = 0; t < T; ++t) {
            a = ta[t * C + c] > a ? ta[t * C + c] : a;
            if (tz) z += tz[t * C + c];
        }
        amax[c] = a;
        if (nnz) nnz[c] = z;
    }
    for (int t = 0; t < T; ++t) mn = tm[t] < mn ? tm[t] : mn;
    *minv = mn;
    free(ta); free(tm); free(tz);
    return 0;
}

int fxc_stats(const float *x, int64_t n, int64_t C, int64_t B, float *amax, float *minv) {
    return stats_all(x, n, C, B, amax, minv, NULL);
}

/* 1-bit mask to values: out[i] = bit ? on : off (what a ReLU backward reads). */
static void fxc_unpack_mask_values_run(const uint8_t *in, int64_t n, float on, float off, float *out) {
    const int64_t full = n / 8;
    int64_t b = 0;
#ifdef __AVX2__
    /* lane j of byte b: bit j set selects on, else off (the same values as below) */
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 von = _mm256_set1_ps(on), voff = _mm256_set1_ps(off);
    for (; b < full; ++b) {
        const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(in[b]), sel);
        const __m256 set = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, sel));
        _mm256_storeu_ps(out + 8 * b, _mm256_blendv_ps(voff, von, set));
    }
#endif
    for (; b < full; ++b) {
        const uint32_t v = in[b];
        float *p = out + 8 * b;
        for (int j = 0; j < 8; ++j) p[j] = ((v >> j) & 1) ? on : off;
    }
    for (int64_t i = full * 8; i < n; ++i) out[i] = ((in[i / 8] >> (i % 8)) & 1) ? on : off;
}

void fxc_unpack_mask_values(const uint8_t *in, int64_t n, float on, float off, float *out) {
    PIECES(n, fxc_unpack_mask_values_run(in + i0 / 8, i1 - i0, on, off, out + i0));
}

static void quant_pack_sel_range(const float *x, const float *k, int64_t C, int64_t B, const int64_t *idx,
                                 int64_t Csub, int bits, int nparts, const int *w, const int *sh, int is_signed,
                                 int stoch, uint32_t key, uint8_t *const *outs, int64_t e0, int64_t e1) {
    uint8_t *op[5];
    for (int q = 0; q < nparts; ++q) op[q] = outs[q] + e0 / (8 / w[q]);
    float off, hi;
    grid(bits, is_signed, &off, &hi);
    uint16_t buf[CHUNK];
    int64_t fill = 0, e = e0, row = e0 / B, pos = e0 % B; /* row = a * Csub + j */
    while (e < e1) {
        const int64_t a = row / Csub, j = row % Csub;
        int64_t run = B - pos;
        if (run > CHUNK - fill) run = CHUNK - fill;
        if (run > e1 - e) run = e1 - e;
        quant_codes(x + (a * C + idx[j]) * B + pos, k[j], run, e, key, stoch, off, hi, buf + fill);
        fill += run;
        e += run;
        pos += run;
        if (pos == B) { pos = 0; ++row; }
        if (fill == CHUNK) {
            pack_slices(buf, fill, nparts, w, sh, op);
            fill = 0;
        }
    }
    if (fill) pack_slices(buf, fill, nparts, w, sh, op);
}

/* Decode codes [start, start + m) of a sliced code stream into buf (start a
 * multiple of 8, so every slice begins on a byte); one loop per slice with
 * a constant number of codes per byte, so each vectorises. */
static void decode_stream(const uint8_t *const *parts, const int *w, const int *s, int nparts, int64_t start,
                          int64_t m, uint16_t *buf) {
    for (int k = 0; k < nparts; ++k) {
        const int width = w[k], per = 8 / width, sh = s[k];
        const uint32_t mask = (1u << width) - 1u;
        const uint8_t *in = parts[k] + start / per;
        const int64_t full = m / per;
        if (k == 0) {
            switch (per) {
            case 1: for (int64_t b = 0; b < full; ++b) buf[b] = (uint16_t)((uint32_t)in[b] << sh); break;
            case 2: for (int64_t b = 0; b < full; ++b) for (int j = 0; j < 2; ++j)
                        buf[2 * b + j] = (uint16_t)((((uint32_t)in[b] >> (4 * j)) & 15u) << sh); break;
            case 4: for (int64_t b = 0; b < full; ++b) for (int j = 0; j < 4; ++j)
                        buf[4 * b + j] = (uint16_t)((((uint32_t)in[b] >> (2 * j)) & 3u) << sh); break;
            default: for (int64_t b = 0; b < full; ++b) for (int j = 0; j < 8; ++j)
                        buf[8 * b + j] = (uint16_t)((((uint32_t)in[b] >> j) & 1u) << sh);
            }
        } else {
            switch (per) {
            case 1: for (int64_t b = 0; b < full; ++b) buf[b] |= (uint16_t)((uint32_t)in[b] << sh); break;
            case 2: for (int64_t b = 0; b < full; ++b) for (int j = 0; j < 2; ++j)
                        buf[2 * b + j] |= (uint16_t)((((uint32_t)in[b] >> (4 * j)) & 15u) << sh); break;
            case 4: for (int64_t b = 0; b < full; ++b) for (int j = 0; j < 4; ++j)
                        buf[4 * b + j] |= (uint16_t)((((uint32_t)in[b] >> (2 * j)) & 3u) << sh); break;
            default: for (int64_t b = 0; b < full; ++b) for (int j = 0; j < 8; ++j)
                        buf[8 * b + j] |= (uint16_t)((((uint32_t)in[b] >> j) & 1u) << sh);
            }
        }
        for (int64_t i = full * per; i < m; ++i) {
            const uint16_t v = (uint16_t)((((uint32_t)in[i / per] >> ((i % per) * width)) & mask) << sh);
            buf[i] = k == 0 ? v : (uint16_t)(buf[i] | v);
        }
    }
}

/* All slices of a channel subset at once, chunked: the code stream is decoded CHUNK codes at a
 * time into a buffer (vectorised per slice), then dequantized row by row
 * into the channels' places. */
static void unpack_scatter_range(const uint8_t *const *parts, const int *w, const int *s, int nparts,
                                 const float *kinv, int64_t Csub, int64_t B, const int64_t *idx, int64_t C, float off,
                                 float *out, int64_t e0, int64_t e1) {
    uint16_t buf[CHUNK];
    int64_t row = e0 / B, pos = e0 % B; /* row = a * Csub + j, pos inside the row */
    for (int64_t start = e0; start < e1; start += CHUNK) {
        const int64_t m = (e1 - start) < CHUNK ? (e1 - start) : CHUNK;
        decode_stream(parts, w, s, nparts, start, m, buf);
        int64_t t = 0;
        while (t < m) {
            int64_t run = B - pos;
            if (run > m - t) run = m - t;
            const int64_t a = row / Csub, j = row % Csub;
            float *dst = out + (a * C + idx[j]) * B + pos;
            const float kv = kinv[j];
            const uint16_t *bs = buf + t;
            for (int64_t u = 0; u < run; ++u) dst[u] = ((float)bs[u] - off) * kv;
            t += run;
            pos += run;
            if (pos == B) { pos = 0; ++row; }
        }
    }
}

int fxc_stats_nnz(const float *x, int64_t n, int64_t C, int64_t B, float *amax, float *minv, int64_t *nnz) {
    return stats_all(x, n, C, B, amax, minv, nnz);
}

/* ---- zero-value streams on every thread. A zvc stream holds the codes of
 * a channel subset's non-zero elements in the subset's flat order (row
 * a * Csub + j is channel idx[j] of sample a, B elements), so where a
 * piece of the subset starts in the stream is the count of non-zeros
 * before it: the 1-bit mask (x > 0, the ReLU's, 1 bit per element of the
 * full tensor) gives that by popcount at 1/32 of the bytes of x. Each
 * piece's start is then moved forward to the first element with a
 * multiple of 8 codes before it, so every piece begins on a byte of every
 * slice and the pieces' bytes do not overlap: each thread packs or decodes
 * its piece exactly as the one-thread loop does that part of the stream
 * (the random draw is indexed by element, not by thread), so the bytes are
 * the same at any thread count. */

/* set bits of mask in bit positions [b, b + n) */
static int64_t count_bits(const uint8_t *mask, int64_t b, int64_t n) {
    int64_t c = 0;
    for (; n > 0 && (b & 7); ++b, --n) c += (mask[b >> 3] >> (b & 7)) & 1;
    const uint8_t *p = mask + (b >> 3);
    const int64_t nb = n >> 3;
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) {
        uint64_t v = 0;
        for (int q = 0; q < 8; ++q) v |= (uint64_t)p[i + q] << (8 * q);
        c += __builtin_popcountll(v);
    }
    for (; i < nb; ++i) c += __builtin_popcount(p[i]);
    b += nb * 8;
    n -= nb * 8;
    for (; n > 0; ++b, --n) c += (mask[b >> 3] >> (b & 7)) & 1;
    return c;
}

/* full-tensor position of subset element e */
static inline int64_t sel_pos(int64_t C, int64_t B, const int64_t *idx, int64_t Csub, int64_t e) {
    const int64_t row = e / B;
    return ((row / Csub) * C + idx[row % Csub]) * B + e % B;
}

/* set bits of the subset's elements [e0, e1) */
static int64_t count_sel(const uint8_t *mask, int64_t C, int64_t B, const int64_t *idx, int64_t Csub, int64_t e0,
                         int64_t e1) {
    int64_t c = 0;
    while (e0 < e1) {
        int64_t run = B - e0 % B;
        if (run > e1 - e0) run = e1 - e0;
        c += count_bits(mask, sel_pos(C, B, idx, Csub, e0), run);
        e0 += run;
    }
    return c;
}

/* Zero-value packing of a channel subset of an unsigned x (A, C, B): only
 * the elements x > 0 are quantized and packed (one slice), in the subset's
 * flat order; the stochastic hash index is the element's position in the
 * subset (zeros included), as in the reference. Which elements are non-zero
 * is the mask stored elsewhere (the ReLU's); this piece covers subset
 * elements [e0, e1), whose codes start at c0 in the stream. */
static void zvc_pack_range(const float *x, const float *k, int64_t C, int64_t B, const int64_t *idx, int64_t Csub,
                           int bits, int nparts, const int *w, const int *sh, int stoch, uint32_t key,
                           uint8_t *const *outs, int64_t e0, int64_t e1, int64_t c0) {
    uint8_t *op[5];
    for (int q = 0; q < nparts; ++q) op[q] = outs[q] + c0 / (8 / w[q]);
    const float hi = (float)((1 << bits) - 1);
    uint16_t buf[CHUNK + 8];
    int64_t fill = 0, e = e0;
#ifdef __AVX2__
    if (!__atomic_load_n(&exp_ready, __ATOMIC_ACQUIRE)) exp_init();
#endif
    while (e < e1) {
        const int64_t row = e / B, pos = e % B;
        const float *src = x + ((row / Csub) * C + idx[row % Csub]) * B + pos;
        const float kc = k[row % Csub];
        int64_t rest = B - pos;
        if (rest > e1 - e) rest = e1 - e;
        int64_t done = 0;
        while (done < rest) {
            int64_t run = rest - done;
            if (run > CHUNK - fill) run = CHUNK - fill;
            const float *xs = src + done;
            /* branchless compaction: every code is written, the fill
             * index only moves past the ones of non-zero elements */
            if (stoch) {
                for (int64_t u = 0; u < run; ++u) {
                    const float xv = xs[u];
                    float v = xv * kc;
                    v = v + u01(e + done + u, key);
                    v = v > hi ? hi : v;
                    buf[fill] = (uint16_t)(int32_t)v;
                    fill += xv > 0.0f;
                }
            } else {
                int64_t u = 0;
#ifdef __AVX2__
                /* 8 at a time: the same float operations, then the codes
                 * of the elements > 0 moved to the front (LUT permute) and
                 * all 8 stored; fill moves by their count */
                const __m256 kv = _mm256_set1_ps(kc), half = _mm256_set1_ps(0.5f), hv = _mm256_set1_ps(hi);
                const __m256 zero = _mm256_setzero_ps();
                for (; u + 8 <= run; u += 8) {
                    const __m256 xv = _mm256_loadu_ps(xs + u);
                    __m256 v = _mm256_add_ps(_mm256_mul_ps(xv, kv), half);
                    v = _mm256_min_ps(v, hv);
                    const __m256i c = _mm256_cvttps_epi32(v);
                    const int mb = _mm256_movemask_ps(_mm256_cmp_ps(xv, zero, _CMP_GT_OQ));
                    const __m256i pc =
                        _mm256_permutevar8x32_epi32(c, _mm256_loadu_si256((const __m256i *)cmp_idx[mb]));
                    const __m128i p16 =
                        _mm_packus_epi32(_mm256_castsi256_si128(pc), _mm256_extracti128_si256(pc, 1));
                    _mm_storeu_si128((__m128i *)(buf + fill), p16);
                    fill += __builtin_popcount((unsigned)mb);
                }
#endif
                for (; u < run; ++u) {
                    const float xv = xs[u];
                    float v = xv * kc;
                    v = v + 0.5f;
                    v = v > hi ? hi : v;
                    buf[fill] = (uint16_t)(int32_t)v;
                    fill += xv > 0.0f;
                }
            }
            done += run;
            if (fill == CHUNK) {
                pack_slices(buf, fill, nparts, w, sh, op);
                fill = 0;
            }
        }
        e += rest;
    }
    /* a piece but the last holds a multiple of 8 codes: whole bytes */
    if (fill) pack_slices(buf, fill, nparts, w, sh, op);
}

/* Inverse of zvc_pack_range for all slices at once, on subset elements
 * [e0, e1) whose codes are [c0, c1) of the stream: elements whose bit is
 * set in `mask` take the next code, the others are 0. Codes are decoded
 * CHUNK at a time into a window; the mask is read 56 bits at a time, and
 * each element's code position is a popcount of the bits before it, so
 * rows of any length and alignment cost no per-element dependency chain. */
static void zvc_unpack_range(const uint8_t *const *parts, const int *w, const int *s, int nparts, const float *kinv,
                             int64_t Csub, int64_t B, const int64_t *idx, int64_t C, int64_t mbytes,
                             const uint8_t *mask, float *out, int64_t e0, int64_t e1, int64_t c0, int64_t c1) {
    uint16_t buf[CHUNK + 128];
    int64_t got = c0;     /* stream position decoded up to (c0 + a multiple of CHUNK until the end) */
    int64_t have = 0;     /* codes in buf[0..have) */
    int64_t used = 0;     /* consumed from buf */
    for (int i = 0; i < 64; ++i) buf[i] = 0;
#ifdef __AVX2__
    if (!__atomic_load_n(&exp_ready, __ATOMIC_ACQUIRE)) exp_init();
#endif
    int64_t e = e0;
#define ZVC_REFILL()                                                                           \
    if (have - used < 64 && got < c1) {                                                        \
        const int64_t keep = have - used;                                                      \
        for (int64_t i = 0; i < keep; ++i) buf[i] = buf[used + i];                             \
        const int64_t m = (c1 - got) < CHUNK ? (c1 - got) : CHUNK;                             \
        decode_stream(parts, w, s, nparts, got, m, buf + keep);                                \
        got += m;                                                                              \
        have = keep + m;                                                                       \
        used = 0;                                                                              \
        for (int64_t i = have; i < have + 64; ++i) buf[i] = 0; /* read past the last code, discarded */ \
    }
    if (B < 8) {
        /* short rows (a 2x2 feature map: 4 elements): the word and
         * popcount machinery below costs more than the row; element by
         * element, rows walked without divisions, the same products */
        int64_t row = e0 / B, pos = e0 % B, j = row % Csub, a = row / Csub;
        while (e < e1) {
            ZVC_REFILL(); /* a row needs at most B < 64 codes */
            const int64_t f0 = (a * C + idx[j]) * B + pos;
            const float kv = kinv[j];
            int64_t rest = B - pos;
            if (rest > e1 - e) rest = e1 - e;
            for (int64_t u = 0; u < rest; ++u) {
                const int64_t p = f0 + u;
                const int bit = (mask[p >> 3] >> (p & 7)) & 1;
                const float v = (float)buf[used] * kv;
                out[p] = bit ? v : 0.0f;
                used += bit;
            }
            e += rest;
            pos = 0;
            if (++j == Csub) {
                j = 0;
                ++a;
            }
        }
        return;
    }
    while (e < e1) {
        const int64_t row = e / B, pos = e % B, j = row % Csub;
        const int64_t f0 = ((row / Csub) * C + idx[j]) * B + pos; /* full-tensor position */
        float *dst = out + f0;
        const float kv = kinv[j];
        int64_t rest = B - pos;
        if (rest > e1 - e) rest = e1 - e;
        for (int64_t done = 0; done < rest; done += 56) {
            const int piece = (rest - done) < 56 ? (int)(rest - done) : 56;
            ZVC_REFILL();
            const int64_t fe = f0 + done;
            const int64_t byte = fe >> 3;
            uint64_t word = 0;
            if (byte + 8 <= mbytes) {
                for (int q = 0; q < 8; ++q) word |= (uint64_t)mask[byte + q] << (8 * q);
            } else {
                for (int q = 0; byte + q < mbytes; ++q) word |= (uint64_t)mask[byte + q] << (8 * q);
            }
            word = (word >> (fe & 7)) & ((1ull << piece) - 1ull);
            const uint16_t *bs = buf + used;
            float *d = dst + done;
            int q0 = 0;
#ifdef __AVX2__
            if ((fe & 7) == 0) {
                /* 8 elements per step: convert the next 8 codes, move each
                 * to its element (a permute from a LUT of the mask byte),
                 * zero the unset ones; same products as below */
                const __m256 kvv = _mm256_set1_ps(kv);
                int t = 0;
                for (; q0 + 8 <= piece; q0 += 8) {
                    const int mb = (int)((word >> q0) & 0xFFu);
                    const __m128i c16 = _mm_loadu_si128((const __m128i *)(bs + t));
                    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(c16)), kvv);
                    const __m256i ix = _mm256_loadu_si256((const __m256i *)exp_idx[mb]);
                    const __m256 mk = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)exp_msk[mb]));
                    _mm256_storeu_ps(d + q0, _mm256_and_ps(_mm256_permutevar8x32_ps(v, ix), mk));
                    t += __builtin_popcount((unsigned)mb);
                }
            }
#endif
            for (int q = q0; q < piece; ++q) {
                const int bit = (int)((word >> q) & 1u);
                const float v = (float)bs[__builtin_popcountll(word & ((1ull << q) - 1ull))] * kv;
                d[q] = bit ? v : 0.0f;
            }
            used += __builtin_popcountll(word);
        }
        e += rest;
    }
}

#undef ZVC_REFILL

/* 1-bit mask of x > thr straight from floats (a ReLU's saved result): one
 * pass, no intermediate bool tensor. Same bits as fxc_pack_mask(x > thr). */
static void fxc_pack_gt_run(const float *x, int64_t n, float thr, uint8_t *out) {
    const int64_t full = n / 8;
    int64_t b = 0;
#ifdef __AVX2__
    /* a byte is the sign mask of one 8-lane compare (NaN > thr: false, as below) */
    const __m256 tv = _mm256_set1_ps(thr);
    for (; b < full; ++b)
        out[b] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8 * b), tv, _CMP_GT_OQ));
#endif
    for (; b < full; ++b) {
        const float *p = x + 8 * b;
        uint32_t acc = 0;
        for (int j = 0; j < 8; ++j) acc |= (uint32_t)(p[j] > thr) << j;
        out[b] = (uint8_t)acc;
    }
    if (full * 8 < n) {
        uint32_t acc = 0;
        for (int64_t j = 0; full * 8 + j < n; ++j) acc |= (uint32_t)(x[full * 8 + j] > thr) << j;
        out[full] = (uint8_t)acc;
    }
}

void fxc_pack_gt(const float *x, int64_t n, float thr, uint8_t *out) {
    PIECES(n, fxc_pack_gt_run(x + i0, i1 - i0, thr, out + i0 / 8));
}

/* A ReLU's result, read once for both saves of it: the 1-bit mask x > 0
 * (what fxc_pack_gt writes) and the statistics the next op's quantized
 * save needs (fxc_stats_nnz: per-row max|x|, the minimum, per-row count of
 * x > 0). Rows r of B elements, scale row r % C. Each thread takes a run
 * of rows that starts on a mask byte (a multiple of 8 rows) with its own
 * accumulators, merged after (max, min and counts: any order gives the
 * same result), and walks it 8 rows at a time, the mask of a block written
 * while the block is still in cache. Returns -1 when out of memory. */
int fxc_pack_gt_stats(const float *x, int64_t n, int64_t C, int64_t B, uint8_t *mask, float *amax, float *minv,
                      int64_t *nnz) {
    const int64_t rows = n / B, blocks = (rows + 7) / 8;
    int T = npieces(n);
    if (T > blocks) T = (int)blocks;
    if (T < 1) T = 1;
    float *ta = (float *)malloc((size_t)T * (size_t)C * sizeof(float));
    float *tm = (float *)malloc((size_t)T * sizeof(float));
    int64_t *tz = (int64_t *)calloc((size_t)T * (size_t)C, sizeof(int64_t));
    if (!ta || !tm || !tz) {
        free(ta); free(tm); free(tz);
        return -1;
    }
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) {
        for (int64_t c = 0; c < C; ++c) ta[t * C + c] = 0.0f;
        tm[t] = INFINITY;
        for (int64_t b = blocks * t / T; b < blocks * (t + 1) / T; ++b) {
            const int64_t r0 = 8 * b, r1 = r0 + 8 < rows ? r0 + 8 : rows;
            stats_rows(x, r0, r1, C, B, ta + t * C, tm + t, tz + t * C);
            fxc_pack_gt_run(x + r0 * B, (r1 - r0) * B, 0.0f, mask + r0 * B / 8);
        }
    }
    float mn = INFINITY;
    for (int64_t c = 0; c < C; ++c) {
        float a = 0.0f;
        int64_t z = 0;
        for (int t = 0; t < T; ++t) {
            a = ta[t * C + c] > a ? ta[t * C + c] : a;
            z += tz[t * C + c];
        }
        amax[c] = a;
        nnz[c] = z;
    }
    for (int t = 0; t < T; ++t) mn = tm[t] < mn ? tm[t] : mn;
    *minv = mn;
    free(ta); free(tm); free(tz);
    return 0;
}

/* ---- whole tensors at per-channel widths: one call for all width groups.
 * Group g holds the channels order[start[g] .. start[g+1]) (int32, the order
 * stored with the packed tensor), at gbits[g] bits in gnp[g] slices with
 * widths w[5g..], shifts sh[5g..] and outputs outs[5g..]; per-channel
 * arrays (k, kinv) are in the same sorted order. Each group is exactly the
 * per-group call above (same bits), minus the per-group Python around it. */

static int64_t *widen(const int32_t *idx, int64_t n) {
    int64_t *o = (int64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (o)
        for (int64_t i = 0; i < n; ++i) o[i] = idx[i];
    return o;
}

/* All groups of a tensor share one parallel region (not one per group:
 * AutoQuant makes ~3 groups a tensor, and a fork/join, or waking a sleeping
 * pool thread, costs more than a small group's work). Group g is cut into
 * gp[g] pieces (at most T, at CHUNK multiples, each at least a quarter
 * of SMALL elements), and piece j of group g runs on thread
 * (goff[g] + j) % T, goff rotating so that groups of one piece spread over
 * the threads. Any cut at CHUNK multiples gives the same bytes (see the
 * threads note above), so the result does not depend on T. */
static int group_plan(int G, const int64_t *start, int64_t A, int64_t B, int *gp, int *goff) {
    int64_t N = 0;
    for (int g = 0; g < G; ++g) N += A * (start[g + 1] - start[g]) * B;
    const int T = npieces(N);
    int off = 0;
    for (int g = 0; g < G; ++g) {
        /* the region is paid once per tensor, so a group is cut into
         * pieces of a quarter of SMALL, for balance between threads */
        const int64_t p = A * (start[g + 1] - start[g]) * B / (SMALL / 4);
        gp[g] = p < 1 ? 1 : (p < T ? (int)p : T);
        goff[g] = off;
        off = (off + gp[g]) % T;
    }
    return T;
}

/* the piece of group g that thread t runs, or -1 */
static inline int group_piece(int g, int t, int T, const int *gp, const int *goff) {
    const int j = ((t - goff[g]) % T + T) % T;
    return j < gp[g] ? j : -1;
}

/* Run the statement (which sees g, s = start[g], csub, idx (int64 channel
 * indices of group g), n = its element count, j and P = its piece and
 * piece count) for every group piece of thread t_. */
#define GROUP_PIECES_OF(t_, ...)                                                  \
    for (int g = 0; g < G; ++g) {                                                 \
        const int j = group_piece(g, t_, T_, gp_, goff_), P = gp_[g];             \
        if (j < 0) continue;                                                      \
        const int64_t s = start[g], csub = start[g + 1] - s, n = A * csub * B;    \
        const int64_t *idx = all_ + s;                                            \
        (void)n; (void)P; (void)idx;                                              \
        __VA_ARGS__;                                                              \
    }

/* ... for every piece, in one parallel region (none on one thread: not
 * even a one-thread team). Returns -1 when out of memory for the index
 * copy (nothing written). */
#define FOR_GROUP_PIECES(...)                                                     \
    do {                                                                          \
        int gp_[G > 0 ? G : 1], goff_[G > 0 ? G : 1];                             \
        const int T_ = group_plan(G, start, A, B, gp_, goff_);                    \
        int64_t *all_ = widen(order, start[G]);                                   \
        if (!all_) return -1;                                                     \
        if (T_ > 1) {                                                             \
            _Pragma("omp parallel for num_threads(T_) schedule(static, 1)")      \
            for (int t_ = 0; t_ < T_; ++t_) { GROUP_PIECES_OF(t_, __VA_ARGS__) }  \
        } else {                                                                  \
            GROUP_PIECES_OF(0, __VA_ARGS__)                                       \
        }                                                                         \
        free(all_);                                                               \
        return 0;                                                                 \
    } while (0)

int fxc_mixed_pack(const float *x, const float *k, int64_t A, int64_t C, int64_t B, const int32_t *order, int G,
                   const int64_t *start, const int *gbits, const int *gnp, const int *w, const int *sh,
                   int is_signed, int stoch, const uint32_t *keys, uint8_t *const *outs) {
    FOR_GROUP_PIECES({
        const int64_t i0 = piece(n, j, P), i1 = piece(n, j + 1, P);
        if (i1 > i0)
            quant_pack_sel_range(x, k + s, C, B, idx, csub, gbits[g], gnp[g], w + 5 * g, sh + 5 * g, is_signed,
                                 stoch, keys[g], outs + 5 * g, i0, i1);
    });
}

int fxc_mixed_unpack(const uint8_t *const *parts, const int *w, const int *sh, const int *gnp,
                     const float *const *kinv, int64_t A, int64_t C, int64_t B, const int32_t *order, int G,
                     const int64_t *start, const int *gbits, int is_signed, float *out) {
    FOR_GROUP_PIECES({
        const int64_t i0 = piece(n, j, P), i1 = piece(n, j + 1, P);
        float off, hi;
        grid(gbits[g], is_signed, &off, &hi);
        (void)hi;
        if (i1 > i0)
            unpack_scatter_range(parts + 5 * g, w + 5 * g, sh + 5 * g, gnp[g], kinv[g], csub, B, idx, C, off, out,
                                 i0, i1);
    });
}

/* Zero-value groups: the pieces' stream starts come from the mask
 * (the cut rule above), counted for all groups in one parallel region, fixed
 * up on the calling thread, then packed or decoded in a second region. A
 * group without a usable mask (NULL, or one that does not count the group's
 * nnz codes: not this tensor's x > 0) is one piece (one thread walks its whole stream). */
static void zvc_group_cuts(const uint8_t *mask, int64_t A, int64_t C, int64_t B, const int64_t *all, int G,
                           const int64_t *start, const int64_t *gnnz, int T, int *gp, const int *goff, int64_t *es,
                           int64_t *cs) {
    int64_t cnt[G * T > 0 ? G * T : 1];
    int cut = 0; /* any group in more than one piece (else no counting region) */
    for (int g = 0; g < G; ++g) {
        if (!mask) gp[g] = 1;
        cut |= gp[g] > 1;
    }
    if (cut) {
#pragma omp parallel for num_threads(T) schedule(static, 1)
        for (int t = 0; t < T; ++t)
            for (int g = 0; g < G; ++g) {
                const int j = group_piece(g, t, T, gp, goff), P = gp[g];
                if (j < 0 || P < 2) continue;
                const int64_t s = start[g], csub = start[g + 1] - s, n = A * csub * B;
                cnt[g * T + j] = count_sel(mask, C, B, all + s, csub, piece(n, j, P), piece(n, j + 1, P));
            }
    }
    for (int g = 0; g < G; ++g) {
        const int64_t s = start[g], csub = start[g + 1] - s, N = A * csub * B;
        const int P = gp[g];
        int64_t *e = es + g * (T + 1), *c = cs + g * (T + 1);
        e[0] = c[0] = 0;
        if (P < 2) {
            e[1] = N;
            c[1] = gnnz[g];
            continue;
        }
        int64_t before = 0; /* codes before the nominal start of piece t */
        for (int t = 1; t <= P; ++t) {
            before += cnt[g * T + t - 1];
            int64_t ee = piece(N, t, P), cc = before;
            if (ee < e[t - 1]) { /* the previous start moved past this one */
                ee = e[t - 1];
                cc = c[t - 1];
            }
            if (t < P) {
                while (ee < N && (cc & 7)) {
                    const int64_t p = sel_pos(C, B, all + s, csub, ee);
                    cc += (mask[p >> 3] >> (p & 7)) & 1;
                    ++ee;
                }
            }
            e[t] = ee;
            c[t] = cc;
        }
        if (c[P] != gnnz[g]) { /* not this tensor's mask: one piece */
            gp[g] = 1;
            e[1] = N;
            c[1] = gnnz[g];
        }
    }
}

#define ZVC_PIECES_OF(t_, ...)                                                    \
    for (int g = 0; g < G; ++g) {                                                 \
        const int j = group_piece(g, t_, T_, gp_, goff_);                         \
        if (j < 0) continue;                                                      \
        const int64_t s = start[g], csub = start[g + 1] - s;                      \
        const int64_t *idx = all_ + s;                                            \
        const int64_t e0 = es_[g * (T_ + 1) + j], e1 = es_[g * (T_ + 1) + j + 1]; \
        const int64_t c0 = cs_[g * (T_ + 1) + j], c1 = cs_[g * (T_ + 1) + j + 1]; \
        (void)c1;                                                                 \
        if (e1 > e0) { __VA_ARGS__; }                                             \
    }

#define FOR_ZVC_PIECES(...)                                                       \
    do {                                                                          \
        int gp_[G > 0 ? G : 1], goff_[G > 0 ? G : 1];                             \
        const int T_ = group_plan(G, start, A, B, gp_, goff_);                    \
        int64_t *all_ = widen(order, start[G]);                                   \
        if (!all_) return -1;                                                     \
        int64_t es_[G * (T_ + 1) > 0 ? G * (T_ + 1) : 1], cs_[G * (T_ + 1) > 0 ? G * (T_ + 1) : 1]; \
        zvc_group_cuts(mask, A, C, B, all_, G, start, gnnz, T_, gp_, goff_, es_, cs_); \
        if (T_ > 1) {                                                             \
            _Pragma("omp parallel for num_threads(T_) schedule(static, 1)")      \
            for (int t_ = 0; t_ < T_; ++t_) { ZVC_PIECES_OF(t_, __VA_ARGS__) }    \
        } else {                                                                  \
            ZVC_PIECES_OF(0, __VA_ARGS__)                                         \
        }                                                                         \
        free(all_);                                                               \
        return 0;                                                                 \
    } while (0)

int fxc_mixed_zvc_pack(const float *x, const float *k, int64_t A, int64_t C, int64_t B, const int32_t *order, int G,
                       const int64_t *start, const int64_t *gnnz, const int *gbits, const int *gnp, const int *w,
                       const int *sh, int stoch, const uint32_t *keys, const uint8_t *mask, uint8_t *const *outs) {
    FOR_ZVC_PIECES(if (gnnz[g]) zvc_pack_range(x, k + s, C, B, idx, csub, gbits[g], gnp[g], w + 5 * g, sh + 5 * g,
                                               stoch, keys[g], outs + 5 * g, e0, e1, c0));
}

int fxc_mixed_zvc_unpack(const uint8_t *const *parts, const int *w, const int *sh, const int *gnp,
                         const float *const *kinv, int64_t A, int64_t C, int64_t B, const int32_t *order, int G,
                         const int64_t *start, const int64_t *gnnz, const uint8_t *mask, float *out) {
    const int64_t mbytes = (A * C * B + 7) / 8;
    FOR_ZVC_PIECES(zvc_unpack_range(parts + 5 * g, w + 5 * g, sh + 5 * g, gnp[g], kinv[g], csub, B, idx, C, mbytes,
                                    mask, out, e0, e1, c0, c1));
}

/* ---- max-pool indices as window positions (runtime/activations.py,
 * _encode_window_index / _decode_window_index, whose torch code is the
 * reference). idx holds flat input positions ih * W + iw for `planes`
 * planes of OH x OW outputs; the window position of an output (oh, ow) is
 * ((ih - oh*sh + ph) / dh) * kw + (iw - ow*sw + pw) / dw (all terms >= 0). */
void fxc_window_local(const int64_t *idx, int64_t planes, int64_t OH, int64_t OW, int64_t W, int kw, int sh, int sw,
                      int ph, int pw, int dh, int dw, int32_t *local) {
    for (int64_t p = 0; p < planes; ++p)
        for (int64_t oh = 0; oh < OH; ++oh) {
            const int64_t *src = idx + (p * OH + oh) * OW;
            int32_t *dst = local + (p * OH + oh) * OW;
            for (int64_t ow = 0; ow < OW; ++ow) {
                const int64_t v = src[ow], ih = v / W, iw = v % W;
                dst[ow] = (int32_t)(((ih - oh * sh + ph) / dh) * kw + (iw - ow * sw + pw) / dw);
            }
        }
}

void fxc_window_global(const int32_t *local, int64_t planes, int64_t OH, int64_t OW, int64_t W, int kw, int sh,
                       int sw, int ph, int pw, int dh, int dw, int64_t *idx) {
    for (int64_t p = 0; p < planes; ++p)
        for (int64_t oh = 0; oh < OH; ++oh) {
            const int32_t *src = local + (p * OH + oh) * OW;
            int64_t *dst = idx + (p * OH + oh) * OW;
            for (int64_t ow = 0; ow < OW; ++ow) {
                const int64_t l = src[ow];
                dst[ow] = (oh * sh - ph + (l / kw) * dh) * W + (ow * sw - pw + (l % kw) * dw);
            }
        }
}

/* Channels grouped by width for the fxc_mixed_* calls: a stable counting
 * sort of bits[0..C) (clamped to 1..16) into order, group starts (G + 1 entries) and
 * widths, and per sorted channel k = (1 / (amax + eps)) * levels and 1/k,
 * the float32 operations of rounding.multipliers (L of rounding.grid);
 * with nnz, gnnz[g]
 * sums it over group g. Returns G. */
#define WIDTH(b) ((b) < 1 ? 1 : (b) > 16 ? 16 : (int)(b)) /* clamp(1, 16), as the per-group path */
int fxc_group_widths(int64_t C, const int64_t *bits, const float *amax, int is_signed, float eps, int32_t *order,
                     int64_t *start, int *widths, float *k, float *kinv, const int64_t *nnz, int64_t *gnnz) {
    int64_t cnt[17] = {0}, pos[17];
    for (int64_t c = 0; c < C; ++c) ++cnt[WIDTH(bits[c])];
    int G = 0;
    int64_t acc = 0;
    for (int b = 1; b <= 16; ++b) {
        pos[b] = acc;
        if (cnt[b]) {
            widths[G] = b;
            start[G++] = acc;
        }
        acc += cnt[b];
    }
    start[G] = acc;
    int gi[17] = {0}; /* width -> group number */
    for (int g = 0; g < G; ++g) {
        gi[widths[g]] = g;
        if (gnnz) gnnz[g] = 0;
    }
    for (int64_t c = 0; c < C; ++c) {
        const int b = WIDTH(bits[c]);
        const int64_t j = pos[b]++;
        if (gnnz) gnnz[gi[b]] += nnz[c];
        order[j] = (int32_t)c;
        float lev, hi;
        grid(b, is_signed, &lev, &hi); /* L = off when signed */
        if (!is_signed) lev = hi;
        const float kk = (1.0f / (amax[c] + eps)) * lev;
        k[j] = kk;
        kinv[j] = 1.0f / kk;
    }
    return G;
}

/* ---- AutoQuant, one saved tensor in two calls (kernels/auto_pack.py).
 * Per tensor the Python around the width rule, the grouping and the packing
 * (~20 calls, numpy and ctypes arrays, a Packed object per group) cost more
 * than their C. fxc_auto_plan runs the width rule (fxc_auto_bits) and the
 * grouping (fxc_group_widths) and returns the bytes the codes need; the
 * caller allocates them, once, and fxc_auto_pack packs every group with
 * fxc_mixed_pack / fxc_mixed_zvc_pack, so the bytes are theirs; fxc_auto_unpack
 * decodes with fxc_mixed_unpack / fxc_mixed_zvc_unpack. Layout: the code
 * buffer holds the groups in width order, per group its slices high first
 * (what mixed_width._alloc_parts makes); the meta block holds order (int32,
 * C), kinv (float32, C), then the header (int64): G, code bits, code
 * bytes, start[0..G], widths[0..G), codes per group[0..G) (the non-zeros
 * under zvc, else A * channels * B). k and the rule's scratch live per
 * thread between the plan and the pack of one tensor (the caller runs the
 * two back to back on one thread). */
#define AUTO_HDR 3

static _Thread_local double *auto_work;
static _Thread_local int64_t *auto_iwork;
static _Thread_local float *auto_k;
static _Thread_local int64_t auto_cap;

static int auto_scratch(int64_t C) {
    if (C <= auto_cap) return 0;
    double *w = (double *)realloc(auto_work, (size_t)C * 7 * sizeof(double));
    if (w) auto_work = w;
    int64_t *iw = (int64_t *)realloc(auto_iwork, (size_t)C * 3 * sizeof(int64_t));
    if (iw) auto_iwork = iw;
    float *k = (float *)realloc(auto_k, (size_t)C * sizeof(float));
    if (k) auto_k = k;
    if (!w || !iw || !k) return -1;
    auto_cap = C;
    return 0;
}

/* slices of a width, high first (rounding.slices): widths w, shifts sh */
static int auto_slices(int bits, int *w, int *sh) {
    static const int ws[5] = {8, 8, 4, 2, 1};
    int n = 0, rem = bits;
    for (int q = 0; q < 5; ++q)
        if (rem >= ws[q]) {
            rem -= ws[q];
            w[n] = ws[q];
            sh[n++] = rem;
        }
    return n;
}

/* per group its slices and their places in buf (NULL: only the size);
 * returns the bytes of all codes */
static int64_t auto_layout(const int64_t *hdr, uint8_t *buf, int *gbits, int *gnp, int *w, int *sh,
                           uint8_t **outs) {
    const int G = (int)hdr[0];
    const int64_t *widths = hdr + AUTO_HDR + G + 1, *gn = widths + G;
    int64_t off = 0;
    for (int g = 0; g < G; ++g) {
        gbits[g] = (int)widths[g];
        gnp[g] = auto_slices(gbits[g], w + 5 * g, sh + 5 * g);
        for (int q = 0; q < 5; ++q) {
            if (q >= gnp[g]) {
                outs[5 * g + q] = NULL;
                continue;
            }
            const int per = 8 / w[5 * g + q];
            outs[5 * g + q] = buf ? buf + off : NULL;
            off += (gn[g] + per - 1) / per;
        }
    }
    return off;
}

/* Widths and groups of a tensor viewed as (A, C, B) with max|x_c| = amax:
 * the rule's arguments are fxc_auto_bits' (dx2: the conv/linear budget, or
 * BatchNorm's per-channel one from bn5, NULL for none), its counts are nnz (zvc: the elements > 0 of each
 * channel, int64) or A*B; spread: multiply dx2 by numel / sum(nnz) (the
 * bound's total error over the non-zeros only, runtime/activations.py).
 * kind: the grid kind the codes use. Returns the code bytes, -1 when out
 * of memory. */
int64_t fxc_auto_plan(int64_t A, int64_t C, int64_t B, const float *amax, double eps, const double *bn5,
                      double K, double numer, double dx2, const int64_t *nnz, int spread, int is_signed, int kind,
                      int max_bits, int rounds, uint8_t *meta) {
    if (auto_scratch(C)) return -1;
    /* bn5: BatchNorm's terms as one block of 5 x C (fxc_auto_bits' order) */
    const double *bn[5] = {bn5, bn5 + C, bn5 + 2 * C, bn5 + 3 * C, bn5 + 4 * C};
    double *counts = auto_work + 6 * C;
    int64_t *bits = auto_iwork + 2 * C;
    int64_t tot = 0;
    for (int64_t c = 0; c < C; ++c) {
        counts[c] = nnz ? (double)nnz[c] : (double)(A * B);
        if (nnz) tot += nnz[c];
    }
    if (spread && nnz && tot) {
        const double scale = (double)(A * C * B) / (double)tot;
        dx2 = dx2 * scale;
    }
    fxc_auto_bits(C, amax, eps, bn5 ? bn : NULL, K, numer, dx2, counts, is_signed, max_bits, rounds, auto_work,
                  auto_iwork, bits);
    int32_t *order = (int32_t *)meta;
    float *kinv = (float *)(meta + 4 * C);
    int64_t *hdr = (int64_t *)(meta + 8 * C);
    int64_t *start = hdr + AUTO_HDR;
    int widths[16];
    int64_t gnnz[16];
    const int G = fxc_group_widths(C, bits, amax, kind, (float)eps, order, start, widths, auto_k, kinv, nnz,
                                   nnz ? gnnz : NULL);
    hdr[0] = G;
    int64_t code_bits = 0;
    for (int g = 0; g < G; ++g) {
        const int64_t n = nnz ? gnnz[g] : A * (start[g + 1] - start[g]) * B;
        hdr[AUTO_HDR + G + 1 + g] = widths[g];
        hdr[AUTO_HDR + 2 * G + 1 + g] = n;
        code_bits += widths[g] * n;
    }
    hdr[1] = code_bits;
    int gbits[16], gnp[16], w[80], sh[80];
    uint8_t *outs[80];
    hdr[2] = auto_layout(hdr, NULL, gbits, gnp, w, sh, outs);
    return hdr[2];
}

/* Pack x (A, C, B) as its plan says (the plan made on this thread just
 * before); seed: the tensor's draw, group g's key mix_seed(seed + g) as
 * rounding.mix_seed makes it. zvc: mask (x > 0, 1 bit per element, or NULL)
 * as fxc_mixed_zvc_pack takes it. Returns the code bits (the header's),
 * -1 when out of memory. */
int64_t fxc_auto_pack(const float *x, int64_t A, int64_t C, int64_t B, const uint8_t *meta, int zvc, int kind, int stoch,
                  int64_t seed, const uint8_t *mask, uint8_t *buf) {
    const int32_t *order = (const int32_t *)meta;
    const int64_t *hdr = (const int64_t *)(meta + 8 * C);
    const int G = (int)hdr[0];
    int gbits[16], gnp[16], w[80], sh[80];
    uint8_t *outs[80];
    uint32_t keys[16];
    auto_layout(hdr, buf, gbits, gnp, w, sh, outs);
    for (int g = 0; g < G; ++g)
        keys[g] = stoch ? fxc_mix32((uint32_t)((uint64_t)(seed + g) * 0x9E3779B1u + 0x7F4A7C15u)) : 0u;
    const int64_t *start = hdr + AUTO_HDR;
    const int rc = zvc ? fxc_mixed_zvc_pack(x, auto_k, A, C, B, order, G, start, hdr + AUTO_HDR + 2 * G + 1, gbits,
                                            gnp, w, sh, stoch, keys, mask, outs)
                       : fxc_mixed_pack(x, auto_k, A, C, B, order, G, start, gbits, gnp, w, sh, kind, stoch, keys,
                                        outs);
    return rc ? -1 : hdr[1];
}

int fxc_auto_unpack(const uint8_t *buf, const uint8_t *meta, int64_t A, int64_t C, int64_t B, int zvc, int kind,
                    const uint8_t *mask, float *out) {
    const int32_t *order = (const int32_t *)meta;
    const float *kinv = (const float *)(meta + 4 * C);
    const int64_t *hdr = (const int64_t *)(meta + 8 * C);
    const int G = (int)hdr[0];
    int gbits[16], gnp[16], w[80], sh[80];
    uint8_t *outs[80];
    const float *kg[16];
    auto_layout(hdr, (uint8_t *)buf, gbits, gnp, w, sh, outs);
    const int64_t *start = hdr + AUTO_HDR;
    for (int g = 0; g < G; ++g) kg[g] = kinv + start[g];
    if (zvc)
        return fxc_mixed_zvc_unpack((const uint8_t *const *)outs, w, sh, gnp, kg, A, C, B, order, G, start,
                                    hdr + AUTO_HDR + 2 * G + 1, mask, out);
    return fxc_mixed_unpack((const uint8_t *const *)outs, w, sh, gnp, kg, A, C, B, order, G, start, gbits, kind,
                            out);
}
