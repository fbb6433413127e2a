/* CPU fast path of AutoQuant's width choice (runtime/activations.py:
 * SaveSpec.auto_bits, spend_slack, _bn_dx2_np, which stay the reference).
 * Those run once per saved tensor per step on a few dozen to a few thousand
 * channels, where numpy's per-call overhead (~30 small calls per tensor)
 * was ~35 ms of a resnet50 step. The same float64 operations in the same
 * order: numpy's pairwise summation is reproduced (pairwise_sum), the sort
 * is stable like np.argsort(kind="stable"), so the widths are the
 * reference's. Built with -ffp-contract=off by kernels/cbuild.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* numpy's pairwise sum of a contiguous float64 array (umath loops): blocks
 * of 128 with eight partial sums, halves above that. */
static double pairwise_sum(const double* a, int64_t n) {
    if (n < 8) {
        double res = 0.0;
        for (int64_t i = 0; i < n; ++i) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        for (int k = 0; k < 8; ++k) r[k] = a[k];
        int64_t i;
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; ++k) r[k] += a[i + k];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* Stable sort of the n values v by their keys k (the bit patterns of
 * float64 keys >= 0 or NaN: these order as unsigned integers as numpy
 * orders the floats): an LSD radix sort of (key, value) pairs, a byte a
 * pass, the eight histograms taken in one read and a pass skipped when
 * every key shares that byte; with kt, vt as the other buffers. Returns
 * the buffer holding the sorted values. Stable, so it gives
 * np.argsort(kind="stable")'s order. */
static int64_t *radix_sort(uint64_t *k, int64_t *v, uint64_t *kt, int64_t *vt, int64_t n) {
    int64_t cnt[8][256];
    memset(cnt, 0, sizeof cnt);
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t u = k[i];
        for (int p = 0; p < 8; ++p) ++cnt[p][(u >> (8 * p)) & 255u];
    }
    for (int p = 0; p < 8; ++p) {
        const int sh = 8 * p;
        int same = 0;
        for (int b = 0; b < 256; ++b) same |= cnt[p][b] == n;
        if (same) continue;
        int64_t pos = 0;
        for (int b = 0; b < 256; ++b) {
            const int64_t c = cnt[p][b];
            cnt[p][b] = pos;
            pos += c;
        }
        for (int64_t i = 0; i < n; ++i) {
            const int64_t j = cnt[p][(k[i] >> sh) & 255u]++;
            kt[j] = k[i];
            vt[j] = v[i];
        }
        uint64_t *tk = k;
        k = kt;
        kt = tk;
        int64_t *tv = v;
        v = vt;
        vt = tv;
    }
    return v;
}

/* BatchNorm's per-channel budget (_bn_dx2_np): all arrays per channel. */
static double bn_dx2(double amax, double inv2, double nnz2, double gz2max, double ggamma2, double gamma2,
                     double K, double numer) {
    double h = amax / 2;
    double g2 = inv2 * nnz2 * gz2max * (h * h) + ggamma2;
    double denom = K * gamma2 * (inv2 * inv2) * g2;
    /* np.maximum keeps a NaN, hence the second test */
    double dx2 = numer / ((denom > 1e-30 || denom != denom) ? denom : 1e-30);
    double floor_ = 1.52587890625e-05; /* 2^-16 */
    return (dx2 > floor_ || dx2 != dx2) ? dx2 : floor_;
}

/* Per-channel widths for C channels with max|x_c| = amax[c] (float32).
 * bn: NULL for a conv/linear input (budget dx2_scalar for every channel),
 * else 6 arrays of C float64 (inv_std2, nnz2, gz2_max, ggamma2, gamma2,
 * unused) and K, numer. counts: NULL, or elements carrying error per
 * channel (then spend_slack runs `rounds` rounds). work: 6*C doubles and
 * 2*C int64 of scratch. */
void fxc_auto_bits(int64_t C, const float* amax, double eps, const double* const* bn, double K, double numer,
                   double dx2_scalar, const double* counts, int is_signed, int max_bits, int rounds,
                   double* work, int64_t* iwork, int64_t* bits) {
    double* a = work;
    double* d = work + C;
    double* r = work + 2 * C;
    double* tmp = work + 3 * C;
    double* cost = work + 4 * C;
    uint64_t* ukey = (uint64_t*)(work + 5 * C);
    uint64_t* utmp = (uint64_t*)tmp; /* free once the slack is summed */
    int64_t* order = iwork;
    int64_t* otmp = iwork + C;
    double d0 = (dx2_scalar > 1e-30 || dx2_scalar != dx2_scalar) ? dx2_scalar : 1e-30;
    double l0 = -0.5 * log2(d0); /* one budget for all channels: its log once */
    for (int64_t c = 0; c < C; ++c) {
        a[c] = (double)amax[c] + eps;
        double dx2 = d0, ld = l0;
        if (bn) {
            dx2 = bn_dx2(a[c] - eps, bn[0][c], bn[1][c], bn[2][c], bn[3][c], bn[4][c], K, numer);
            dx2 = (dx2 > 1e-30 || dx2 != dx2) ? dx2 : 1e-30;
            ld = -0.5 * log2(dx2);
        }
        d[c] = dx2;
        double f = ld + log2(a[c]) - 1.0;
        double t = trunc(f);
        t = t < 1.0 ? 1.0 : (t > 15.0 ? 15.0 : t);
        t += is_signed ? 2.0 : 1.0;
        t = t < 1.0 ? 1.0 : (t > (double)max_bits ? (double)max_bits : t);
        bits[c] = (int64_t)t;
    }
    if (!counts) return;
    /* spend_slack */
    double budget = pairwise_sum(counts, C);
    int64_t lo = is_signed ? 2 : 1;
    int sh = is_signed ? 0 : 1;
    for (int round = 0; round < rounds; ++round) {
        int any_ok = 0;
        for (int64_t c = 0; c < C; ++c) {
            /* half a grid step: a / max(2^(b+sh) - 2, 1), exact, as numpy's
             * exp2 of a whole number gives it (b + sh <= 17: the shift is
             * exact, and unlike ldexp it lets the loop vectorise) */
            const double den = (double)((int64_t)1 << (bits[c] + sh)) - 2.0;
            double q = a[c] / (den > 1.0 ? den : 1.0);
            r[c] = q * q / d[c];
            tmp[c] = counts[c] * r[c];
        }
        double slack = budget - pairwise_sum(tmp, C);
        /* the channels that may lose a bit, cheapest first (the rest, key
         * +inf in numpy's sort, come after them with cost 0: never taken,
         * and adding their 0 leaves the running sum as it is) */
        int64_t m = 0;
        for (int64_t c = 0; c < C; ++c) {
            if (bits[c] > lo && counts[c] > 0) {
                cost[c] = 3.0 * counts[c] * r[c];
                memcpy(&ukey[m], &r[c], sizeof(double));
                order[m++] = c;
            }
        }
        any_ok = m > 0;
        if (slack <= 0 || !any_ok) break;
        const int64_t *sorted = radix_sort(ukey, order, utmp, otmp, m);
        /* costs are >= 0, so the running sum only grows: once past the
         * slack (or NaN) no later channel is taken */
        double cum = 0.0;
        int64_t taken = 0;
        for (int64_t i = 0; i < m; ++i) {
            const int64_t c = sorted[i];
            cum += cost[c];
            if (!(cum <= slack)) break;
            bits[c] -= 1;
            ++taken;
        }
        if (!taken) break;
    }
}
