/* CPU fast path of fxcompress/kernels/actpack.py: the same quantizer and
 * bit layout as the torch reference (which stays the oracle), as one loop
 * over memory instead of a chain of whole-tensor ops. Compiled once with the
 * system C compiler and loaded with ctypes (see actpack._cpu_lib); built
 * with -ffp-contract=off so x*k + r rounds exactly as torch's separate
 * multiply and add do, which keeps this path bitwise equal to the reference.
 */
#include <stdint.h>
#include <math.h>

#define M1 0x6C8E9CF5u
#define M2 0x2D2A5F3Bu

static inline float u01(int64_t i, uint32_t key) {
    uint32_t h = (uint32_t)((uint64_t)(i + (int64_t)key) & 0xFFFFFFFFu);
    h ^= h >> 16;
    h *= M1;
    h ^= h >> 15;
    h *= M2;
    h ^= h >> 16;
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

/* Quantize x (n floats, scale row c = (i / B) % C) and pack the slice
 * (code >> shift) & (2^width - 1), 8/width codes per byte, low bits first.
 * code = (int) clamp(x*k + r + off, 0, 2^bits - 1): adding the offset
 * before clamping makes truncation equal floor, so the loop needs no floorf
 * and vectorises. Codes go through a small buffer, in runs of constant k. */
#define CHUNK 4096
void fxc_quant_pack(const float *x, const float *k, int64_t n, int64_t C, int64_t B, int bits, int width,
                    int shift, int is_signed, int stoch, uint32_t key, uint8_t *out) {
    const int per = 8 / width;
    const uint32_t mask = (1u << width) - 1u;
    const float off = is_signed ? (float)(1 << (bits - 1)) : 0.0f;
    const float hi = (float)((1 << bits) - 1);
    uint16_t buf[CHUNK];
    int64_t c = 0, pos = 0;
    for (int64_t start = 0; start < n; start += CHUNK) {
        const int64_t m = (n - start) < CHUNK ? (n - start) : CHUNK;
        int64_t t = 0;
        while (t < m) {
            int64_t run = B - pos;
            if (run > m - t) run = m - t;
            const float kc = k[c];
            const float *xs = x + start + t;
            uint16_t *bs = buf + t;
            if (stoch) {
                const int64_t i0 = start + t;
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
            t += run;
            pos += run;
            if (pos == B) {
                pos = 0;
                if (++c == C) c = 0;
            }
        }
        /* CHUNK is a multiple of 8, so only the last chunk has a ragged byte */
        uint8_t *o = out + start / per;
        const int64_t full = m / per;
        /* constant strides per width, so the compiler can vectorise each case */
#define S(j) ((((uint32_t)buf[b * per + (j)]) >> shift) & mask)
        switch (per) {
        case 1: for (int64_t b = 0; b < full; ++b) o[b] = (uint8_t)S(0); break;
        case 2: for (int64_t b = 0; b < full; ++b) o[b] = (uint8_t)(S(0) | S(1) << 4); break;
        case 4: for (int64_t b = 0; b < full; ++b) o[b] = (uint8_t)(S(0) | S(1) << 2 | S(2) << 4 | S(3) << 6); break;
        default:
            for (int64_t b = 0; b < full; ++b)
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
}

/* Pack integer codes (int32, already < 2^bits) as one slice. */
void fxc_pack_codes(const int32_t *codes, int64_t n, int width, int shift, uint8_t *out) {
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

/* Add one slice into int32 codes (first: overwrite); one byte at a time. */
void fxc_unpack_codes(const uint8_t *in, int64_t n, int width, int shift, int first, int32_t *codes) {
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

/* Dequantize the codes of a channel subset straight into their places in
 * the full (A, C, B) output: channel j of the subset is channel idx[j]. */
void fxc_dequant_scatter(const int32_t *codes, const float *kinv, int64_t A, int64_t Csub, int64_t B,
                         const int64_t *idx, int64_t C, int bits, int is_signed, float *out) {
    const float off = is_signed ? (float)(1 << (bits - 1)) : 0.0f;
    for (int64_t a = 0; a < A; ++a)
        for (int64_t j = 0; j < Csub; ++j) {
            const int32_t *src = codes + (a * Csub + j) * B;
            float *dst = out + (a * C + idx[j]) * B;
            const float kv = kinv[j];
            for (int64_t u = 0; u < B; ++u) dst[u] = ((float)src[u] - off) * kv;
        }
}

/* Single-slice unpack and dequantize straight to float: x = (code - off) * kinv[c]. */
void fxc_unpack_dequant(const uint8_t *in, const float *kinv, int64_t n, int64_t C, int64_t B, int bits,
                        int is_signed, float *out) {
    const int width = bits;
    const int per = 8 / width;
    const uint32_t mask = (1u << width) - 1u;
    const float off = is_signed ? (float)(1 << (bits - 1)) : 0.0f;
    int64_t c = 0, pos = 0, i = 0;
    float kv = kinv[0];
    const int64_t nbytes = (n + per - 1) / per;
    for (int64_t byte = 0; byte < nbytes; ++byte) {
        uint32_t b = in[byte];
        for (int j = 0; j < per && i < n; ++j, ++i) {
            float code = (float)((b >> (j * width)) & mask);
            out[i] = (code - off) * kv;
            if (++pos == B) {
                pos = 0;
                if (++c == C) c = 0;
                kv = kinv[c];
            }
        }
    }
}

/* Multi-slice: codes already assembled in int32. */
void fxc_dequant_codes(const int32_t *codes, const float *kinv, int64_t n, int64_t C, int64_t B, int bits,
                       int is_signed, float *out) {
    const float off = is_signed ? (float)(1 << (bits - 1)) : 0.0f;
    int64_t c = 0, pos = 0;
    float kv = kinv[0];
    for (int64_t i = 0; i < n; ++i) {
        out[i] = ((float)codes[i] - off) * kv;
        if (++pos == B) {
            pos = 0;
            if (++c == C) c = 0;
            kv = kinv[c];
        }
    }
}

/* Booleans (one byte each, 0 or 1) to 1 bit each, and back. */
void fxc_pack_mask(const uint8_t *m, int64_t n, uint8_t *out) {
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

void fxc_unpack_mask(const uint8_t *in, int64_t n, uint8_t *out) {
    const int64_t full = n / 8;
    for (int64_t b = 0; b < full; ++b) {
        const uint32_t v = in[b];
        uint8_t *p = out + 8 * b;
        for (int j = 0; j < 8; ++j) p[j] = (uint8_t)((v >> j) & 1);
    }
    for (int64_t i = full * 8; i < n; ++i) out[i] = (uint8_t)((in[i / 8] >> (i % 8)) & 1);
}

/* Per-row max|x| (rows c = (i / B) % C, amax has C entries, zeroed here) and
 * the global minimum, in one read of x. */
void fxc_stats(const float *x, int64_t n, int64_t C, int64_t B, float *amax, float *minv) {
    for (int64_t c = 0; c < C; ++c) amax[c] = 0.0f;
    float mn = INFINITY;
    int64_t c = 0;
    for (int64_t start = 0; start < n; start += B) {
        const float *xs = x + start;
        float a = amax[c], m = mn;
        for (int64_t u = 0; u < B; ++u) {
            const float v = xs[u];
            const float av = fabsf(v);
            a = av > a ? av : a;
            m = v < m ? v : m;
        }
        amax[c] = a;
        mn = m;
        if (++c == C) c = 0;
    }
    *minv = mn;
}

/* 1-bit mask to values: out[i] = bit ? on : off (what a ReLU backward reads). */
void fxc_unpack_mask_values(const uint8_t *in, int64_t n, float on, float off, float *out) {
    const int64_t full = n / 8;
    for (int64_t b = 0; b < full; ++b) {
        const uint32_t v = in[b];
        float *p = out + 8 * b;
        for (int j = 0; j < 8; ++j) p[j] = ((v >> j) & 1) ? on : off;
    }
    for (int64_t i = full * 8; i < n; ++i) out[i] = ((in[i / 8] >> (i % 8)) & 1) ? on : off;
}

/* All slices of a channel subset at once: assemble each code from its
 * slices and dequantize it into its channel's place in the (A, C, B) output.
 * Slice k has width w[k] (8/w codes per byte) and shift s[k]. */
void fxc_unpack_scatter(const uint8_t *const *parts, const int *w, const int *s, int nparts, const float *kinv,
                        int64_t A, int64_t Csub, int64_t B, const int64_t *idx, int64_t C, int bits, int is_signed,
                        float *out) {
    const float off = is_signed ? (float)(1 << (bits - 1)) : 0.0f;
    int lp[5];
    uint32_t mk[5];
    for (int k = 0; k < nparts; ++k) {
        lp[k] = w[k] == 8 ? 0 : (w[k] == 4 ? 1 : (w[k] == 2 ? 2 : 3)); /* log2(8 / w) */
        mk[k] = (1u << w[k]) - 1u;
    }
    int64_t e = 0;
    for (int64_t a = 0; a < A; ++a)
        for (int64_t j = 0; j < Csub; ++j) {
            float *dst = out + (a * C + idx[j]) * B;
            const float kv = kinv[j];
            for (int64_t u = 0; u < B; ++u, ++e) {
                uint32_t code = 0;
                for (int k = 0; k < nparts; ++k) {
                    const int64_t byte = e >> lp[k];
                    const int sub = (int)(e & ((1 << lp[k]) - 1));
                    code |= (((uint32_t)parts[k][byte] >> (sub * w[k])) & mk[k]) << s[k];
                }
                dst[u] = ((float)code - off) * kv;
            }
        }
}

static void pack_buf(const uint16_t *buf, int64_t m, int width, int shift, uint8_t *o) {
    const int per = 8 / width;
    const uint32_t mask = (1u << width) - 1u;
    const int64_t full = m / per;
#define S(j) ((((uint32_t)buf[b * per + (j)]) >> shift) & mask)
    switch (per) {
    case 1: for (int64_t b = 0; b < full; ++b) o[b] = (uint8_t)S(0); break;
    case 2: for (int64_t b = 0; b < full; ++b) o[b] = (uint8_t)(S(0) | S(1) << 4); break;
    case 4: for (int64_t b = 0; b < full; ++b) o[b] = (uint8_t)(S(0) | S(1) << 2 | S(2) << 4 | S(3) << 6); break;
    default:
        for (int64_t b = 0; b < full; ++b)
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

/* fxc_quant_pack of the channel subset idx[0..Csub) of x (A, C, B), as if
 * x.index_select(1, idx) had been packed (k has Csub entries; the hash index
 * counts elements of the subset), without making that copy. */
void fxc_quant_pack_sel(const float *x, const float *k, int64_t A, int64_t C, int64_t B, const int64_t *idx,
                        int64_t Csub, int bits, int width, int shift, int is_signed, int stoch, uint32_t key,
                        uint8_t *out) {
    const int per = 8 / width;
    const float off = is_signed ? (float)(1 << (bits - 1)) : 0.0f;
    const float hi = (float)((1 << bits) - 1);
    uint16_t buf[CHUNK];
    int64_t fill = 0, e = 0;
    uint8_t *o = out;
    for (int64_t a = 0; a < A; ++a)
        for (int64_t j = 0; j < Csub; ++j) {
            const float *src = x + (a * C + idx[j]) * B;
            const float kc = k[j];
            int64_t done = 0;
            while (done < B) {
                int64_t run = B - done;
                if (run > CHUNK - fill) run = CHUNK - fill;
                const float *xs = src + done;
                uint16_t *bs = buf + fill;
                if (stoch) {
                    for (int64_t u = 0; u < run; ++u) {
                        float v = xs[u] * kc;
                        v = v + u01(e + u, key);
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
                fill += run;
                done += run;
                e += run;
                if (fill == CHUNK) {
                    pack_buf(buf, fill, width, shift, o);
                    o += CHUNK / per;
                    fill = 0;
                }
            }
        }
    if (fill) pack_buf(buf, fill, width, shift, o);
}
