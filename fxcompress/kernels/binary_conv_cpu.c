/* CPU fast path of fxcompress/kernels/binary_conv.py: the convolution of
 * CAMP's 1-bit path in inference, on bits. Its inputs are DoReFa 1-bit
 * activations (every value 0 or 1) and 1-bit weights (every value +s or -s),
 * so one output is s * (number of ones under non-negative weights minus the
 * number under negative ones) = s * (2 * popcount(x & w) - popcount(x)) over
 * the receptive field's bits: a few AND/POPCNT per 64 multiply-adds instead
 * of 64 float multiply-adds, which is what makes the 1-bit path cheaper than
 * the 4-bit one on a CPU at all (in fp32 both cost the same).
 *
 * Bit order of a receptive field ("row"): r = (ky * KW + kx) * C + c, the
 * same for the weights' rows; taps outside the image are 0 bits (zero
 * padding). The count is an exact integer; the only rounding is the final
 * multiply by s (a float conv rounds every partial sum instead).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static int bconv_threads = 1;

/* receptive fields up to 144 words: 9216 bits, 3x3 over 1024 channels (a wider one: torch.conv2d) */
#define RW_MAX 144

void fxc_bconv_set_threads(int n) { bconv_threads = n > 0 ? n : 1; }

/* dst[bitoff .. bitoff + nbits) |= src's first nbits bits (dst zeroed
 * before; src's bits past nbits are 0) */
static inline void or_bits(uint64_t* dst, int64_t bitoff, const uint64_t* src, int64_t nbits) {
    int64_t w = bitoff >> 6;
    int s = (int)(bitoff & 63);
    if (nbits <= 64) { /* one word of channels: the common case (C <= 64) */
        uint64_t v = src[0];
        dst[w] |= v << s;
        if (s && s + nbits > 64) dst[w + 1] |= v >> (64 - s);
        return;
    }
    int64_t nw = (nbits + 63) >> 6;
    if (!s) {
        for (int64_t j = 0; j < nw; ++j) dst[w + j] |= src[j];
        return;
    }
    int64_t last = (bitoff + nbits - 1) >> 6; /* the last word the bits reach */
    for (int64_t j = 0; j < nw; ++j) {
        uint64_t v = src[j];
        dst[w + j] |= v << s;
        if (w + j + 1 <= last) dst[w + j + 1] |= v >> (64 - s);
    }
}

#ifdef __AVX2__
/* per-byte bit counts of v (a nibble table; AVX2 has no vector popcount) */
static inline __m256i popcnt_bytes(__m256i v) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

/* four outputs: s * (2 * popcount(row_t & w) - cnt_t) for the rows of
 * pixels t..t+3, stored transposed (word j of pixel t at rows[j * TILE + t]) */
static inline void four_outputs(const uint64_t* rows, int tile, const uint64_t* w, int64_t RW, const int* cnt,
                                float s, float* out) {
    __m256i total = _mm256_setzero_si256();
    int64_t j = 0;
    while (j < RW) {
        /* bytes count at most 8 a word: 31 words fit in a byte before the sum */
        int64_t end = RW - j > 31 ? j + 31 : RW;
        __m256i bytes = _mm256_setzero_si256();
        for (; j < end; ++j) {
            __m256i r = _mm256_loadu_si256((const __m256i*)(rows + j * tile));
            bytes = _mm256_add_epi8(bytes, popcnt_bytes(_mm256_and_si256(r, _mm256_set1_epi64x((long long)w[j]))));
        }
        total = _mm256_add_epi64(total, _mm256_sad_epu8(bytes, _mm256_setzero_si256()));
    }
    /* the four 64-bit counts (< 2^31) as int32, then 2 * acc - cnt, then one rounding by s */
    __m128i acc = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(total, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0)));
    __m128i v = _mm_sub_epi32(_mm_add_epi32(acc, acc), _mm_loadu_si128((const __m128i*)cnt));
    _mm_storeu_ps(out, _mm_mul_ps(_mm_set1_ps(s), _mm_cvtepi32_ps(v)));
}
#endif

/* x: [N, C, H, W] float (nonzero = 1); wsign: [CO, C, KH, KW] float (> 0 =
 * the +s sign); out: [N, CO, OH, OW] float. Returns 0; -1 when out of
 * memory, -2 for a receptive field over RW_MAX words (the caller then takes
 * torch.conv2d).
 *
 * Per sample (the threads split the batch): its bits per pixel (a buffer that
 * stays in cache), then for every input row and output column the KW taps'
 * bits side by side ("tap rows", KW * C bits), then each receptive field as
 * KH tap rows side by side: KH shifted copies per output instead of KH * KW. */
int fxc_bconv2d(const float* x, const float* wsign, float* out, float s, int64_t N, int64_t C, int64_t H,
                int64_t W, int64_t CO, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                int64_t OH, int64_t OW) {
    const int64_t CW = (C + 63) >> 6;        /* words per pixel */
    const int64_t TB = KW * C;               /* bits per tap row */
    const int64_t TW = (TB + 63) >> 6;
    const int64_t RW = (KH * TB + 63) >> 6;  /* words per receptive field: row bit r = (ky * KW + kx) * C + c */
    const int T = bconv_threads;
    enum { TILE = 8 };
    if (RW > RW_MAX) return -2;
    uint64_t* wb = calloc((size_t)(CO * RW), sizeof(uint64_t));
    if (!wb) return -1;
    for (int64_t o = 0; o < CO; ++o)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t k = 0; k < KH * KW; ++k)
                if (wsign[(o * C + c) * KH * KW + k] > 0.0f) {
                    int64_t r = k * C + c;
                    wb[o * RW + (r >> 6)] |= (uint64_t)1 << (r & 63);
                }
    int failed = 0;
#pragma omp parallel num_threads(T)
    {
        uint64_t* px = malloc(sizeof(uint64_t) * (size_t)(H * W * CW));
        uint64_t* taps = malloc(sizeof(uint64_t) * (size_t)(H * OW * TW));
        uint64_t* rows = malloc(sizeof(uint64_t) * (size_t)(TILE * RW));
        if (!px || !taps || !rows) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            if (!px || !taps || !rows) continue;
            /* the sample's bits per pixel over channels, branch-free (the bits are as random as the data) */
            memset(px, 0, sizeof(uint64_t) * (size_t)(H * W * CW));
            for (int64_t c = 0; c < C; ++c) {
                const float* xc = x + (n * C + c) * H * W;
                const int b = (int)(c & 63);
                uint64_t* pc = px + (c >> 6);
                if (CW == 1) /* unit stride: the compiler vectorizes it */
                    for (int64_t p = 0; p < H * W; ++p) px[p] |= (uint64_t)(xc[p] != 0.0f) << b;
                else
                    for (int64_t p = 0; p < H * W; ++p) pc[p * CW] |= (uint64_t)(xc[p] != 0.0f) << b;
            }
            /* tap rows: pixels ox*sw - pw + kx of input row iy, side by side */
            memset(taps, 0, sizeof(uint64_t) * (size_t)(H * OW * TW));
            for (int64_t iy = 0; iy < H; ++iy)
                for (int64_t ox = 0; ox < OW; ++ox) {
                    uint64_t* tr = taps + (iy * OW + ox) * TW;
                    for (int64_t kx = 0; kx < KW; ++kx) {
                        int64_t ix = ox * sw - pw + kx;
                        if (ix >= 0 && ix < W) or_bits(tr, kx * C, px + (iy * W + ix) * CW, C);
                    }
                }
            float* on = out + n * CO * OH * OW;
            for (int64_t oy = 0; oy < OH; ++oy)
                for (int64_t ox0 = 0; ox0 < OW; ox0 += TILE) {
                    int t_n = (int)(OW - ox0 < TILE ? OW - ox0 : TILE);
                    int cnt[TILE];
                    memset(rows, 0, sizeof(uint64_t) * (size_t)(TILE * RW));
                    for (int t = 0; t < t_n; ++t) {
                        uint64_t row[RW_MAX];
                        memset(row, 0, sizeof(uint64_t) * (size_t)RW);
                        for (int64_t ky = 0; ky < KH; ++ky) {
                            int64_t iy = oy * sh - ph + ky;
                            if (iy >= 0 && iy < H) or_bits(row, ky * TB, taps + (iy * OW + ox0 + t) * TW, TB);
                        }
                        int c1 = 0;
                        for (int64_t j = 0; j < RW; ++j) {
                            c1 += __builtin_popcountll(row[j]);
                            rows[j * TILE + t] = row[j]; /* transposed: a vector holds four pixels' word j */
                        }
                        cnt[t] = c1;
                    }
                    for (int64_t o = 0; o < CO; ++o) {
                        const uint64_t* wo = wb + o * RW;
                        float* oo = on + (o * OH + oy) * OW + ox0;
                        int t = 0;
#ifdef __AVX2__
                        for (; t + 4 <= t_n; t += 4) four_outputs(rows + t, TILE, wo, RW, cnt + t, s, oo + t);
#endif
                        for (; t < t_n; ++t) {
                            int acc = 0;
                            for (int64_t j = 0; j < RW; ++j) acc += __builtin_popcountll(rows[j * TILE + t] & wo[j]);
                            oo[t] = s * (float)(2 * acc - cnt[t]);
                        }
                    }
                }
        }
        free(px);
        free(taps);
        free(rows);
    }
    free(wb);
    return failed ? -1 : 0;
}
