"""Quantization levels and how ALQ / AMQ learn them (SPEC section 4).

Everything here works on the distribution f of *normalised* coordinates
r = x / ||bucket|| in [-1, 1]. The objective is the variance of unbiased
stochastic rounding between adjacent levels,

    V(levels) = sum_j  int_{l_j}^{l_j+1} (r - l_j)(l_j+1 - r) f(r) dr,

which only needs three partial moments of f: F(x) = int f, M(x) = int r f and
S(x) = int r^2 f from -1 to x. For truncated normals these have closed forms,
so V and the ALQ step are exact (no histogram) and cheap enough to refit on
rank 0 while the other ranks wait.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import optimize, special
from scipy.stats import truncnorm

from ..errors import BadInput

LO, HI = -1.0, 1.0
MIN_SIGMA = 1e-9  # a constant bucket is a point mass; keep the formulas finite


# ---------------------------------------------------------------- level sets

def num_levels(bits: int) -> int:
    return 1 << bits


def uniform_levels(bits: int) -> np.ndarray:
    """QSGD: 2^b evenly spaced levels including both ends."""
    return np.linspace(LO, HI, num_levels(bits))


def exponential_levels(bits: int, p: float = 0.5) -> np.ndarray:
    """NUQSGD (p = 0.5) and AMQ (p learned): +-p^j, j = 0 .. 2^(b-1)-1."""
    if not 0.0 < p < 1.0:
        raise BadInput(f"exponential levels need 0 < p < 1, got {p}")
    half = p ** np.arange(num_levels(bits) // 2)[::-1]
    return np.concatenate([-half[::-1], half])


def ternary_levels() -> np.ndarray:
    return np.array([-1.0, 0.0, 1.0])


def check_levels(levels) -> np.ndarray:
    """Levels must be strictly increasing and span exactly [-1, 1]: rounding
    picks the bracketing pair, so a gap at either end would lose coordinates."""
    lv = np.asarray(levels, dtype=np.float64)
    if lv.ndim != 1 or lv.size < 2:
        raise BadInput(f"need at least two levels, got {lv.tolist()}")
    if lv[0] != LO or lv[-1] != HI:
        raise BadInput(f"levels must start at -1 and end at 1, got {lv[0]} .. {lv[-1]}")
    if np.any(np.diff(lv) <= 0):
        raise BadInput(f"levels must be strictly increasing, got {lv.tolist()}")
    return lv


# ------------------------------------------------------------ distributions

@dataclass
class BucketStats:
    """Per-bucket statistics of normalised coordinates: mean, std and the
    bucket's norm (the norm weights the bucket in the mixture)."""

    means: np.ndarray
    stds: np.ndarray
    norms: np.ndarray
    #: the normalised coordinates of each bucket, kept only for the
    #: `distribution: empirical` option
    samples: Optional[list] = None

    def __len__(self) -> int:
        return len(self.norms)

    @staticmethod
    def concat(parts: Sequence["BucketStats"]) -> "BucketStats":
        parts = [p for p in parts if len(p)]
        if not parts:
            return BucketStats(np.zeros(0), np.zeros(0), np.zeros(0))
        samples = None
        if all(p.samples is not None for p in parts):
            samples = [s for p in parts for s in p.samples]
        return BucketStats(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("means", "stds", "norms")),
                           samples=samples)

    def select(self, keep) -> "BucketStats":
        samples = None if self.samples is None else [self.samples[i] for i in keep]
        return BucketStats(self.means[keep], self.stds[keep], self.norms[keep], samples)

    def top(self, k: int) -> "BucketStats":
        """The k buckets with the largest norms: they carry most of the variance."""
        return self.select(np.argsort(-self.norms, kind="stable")[:k])

    def pooled(self) -> Tuple[float, float]:
        """Mean and std of all coordinates of the kept buckets taken together
        (equal-sized buckets assumed), for the norm-less ALQ-N / AMQ-N."""
        mean = float(np.mean(self.means))
        var = float(np.mean(self.stds ** 2 + self.means ** 2) - mean ** 2)
        return mean, float(np.sqrt(max(var, 0.0)))


class _Distribution:
    """A density f on [-1, 1] given by its partial moments: subclasses define
    `moments(x) -> (F, M, S)` and `_inverse(u)` for 0 < u < 1."""

    def cdf(self, x):
        return self.moments(x)[0]

    def ppf(self, u: float) -> float:
        if u <= 0.0:
            return LO
        if u >= 1.0:
            return HI
        return self._inverse(u)


class TruncNormMixture(_Distribution):
    """Weighted mixture of normals truncated to [-1, 1], with exact partial moments."""

    def __init__(self, means, stds, weights=None):
        self.mu = np.atleast_1d(np.asarray(means, dtype=np.float64))
        self.sigma = np.maximum(np.atleast_1d(np.asarray(stds, dtype=np.float64)), MIN_SIGMA)
        w = np.ones_like(self.mu) if weights is None else np.atleast_1d(np.asarray(weights, dtype=np.float64))
        if self.mu.size == 0 or w.sum() <= 0 or not np.all(np.isfinite(w)):
            raise BadInput("cannot fit levels: no gradient buckets with a non-zero norm")
        self.w = w / w.sum()
        self.alpha = (LO - self.mu) / self.sigma
        self.beta = (HI - self.mu) / self.sigma
        self._phi_a = _std_pdf(self.alpha)
        self._Phi_a = special.ndtr(self.alpha)
        self._Z = np.maximum(special.ndtr(self.beta) - self._Phi_a, 1e-300)

    def moments(self, x) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """F, M, S at each x: mass, first and second moment of f on [-1, x]."""
        x = np.clip(np.asarray(x, dtype=np.float64), LO, HI)[..., None]
        z = (x - self.mu) / self.sigma
        F = (special.ndtr(z) - self._Phi_a) / self._Z
        g_a, g_x = self._phi_a / self._Z, _std_pdf(z) / self._Z
        t1 = g_a - g_x                        # int_alpha^z t phi(t) dt / Z
        t2 = F + self.alpha * g_a - z * g_x   # int_alpha^z t^2 phi(t) dt / Z
        M = self.mu * F + self.sigma * t1
        S = self.mu ** 2 * F + 2 * self.mu * self.sigma * t1 + self.sigma ** 2 * t2
        return F @ self.w, M @ self.w, S @ self.w

    def _inverse(self, u: float) -> float:
        """Inverse CDF by root finding (a mixture has no closed-form inverse)."""
        return float(optimize.brentq(lambda t: float(self.cdf(t)) - u, LO, HI, xtol=1e-14))


def _std_pdf(z):
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def mixture_from_stats(stats: BucketStats, num_top: int = 50) -> TruncNormMixture:
    """ALQ / AMQ: norm-weighted mixture of the top buckets' truncated normals."""
    s = _nonzero(stats).top(num_top)
    return TruncNormMixture(s.means, s.stds, s.norms)


def pooled_from_stats(stats: BucketStats, num_top: int = 50) -> TruncNormMixture:
    """ALQ-N / AMQ-N: one truncated normal of the pooled mean and variance."""
    mean, std = _nonzero(stats).top(num_top).pooled()
    return TruncNormMixture([mean], [std])


def _nonzero(stats: BucketStats) -> BucketStats:
    return stats.select(np.flatnonzero(stats.norms > 0))


class EmpiricalDistribution(_Distribution):
    """f as the (weighted) normalised coordinates themselves; an option beside
    the SPEC's truncated normals, for gradients whose buckets are far from
    normal (heavy tails). Partial moments are cumulative sums over the sorted
    sample, so V and the ALQ step stay exact for this f."""

    def __init__(self, samples, weights):
        r = np.asarray(samples, dtype=np.float64)
        w = np.asarray(weights, dtype=np.float64)
        if r.size == 0 or w.sum() <= 0:
            raise BadInput("cannot fit levels: no gradient buckets with a non-zero norm")
        order = np.argsort(r, kind="stable")
        self.r, w = np.clip(r[order], LO, HI), w[order] / w.sum()
        zero = np.zeros(1)
        self.cF = np.concatenate([zero, np.cumsum(w)])
        self.cM = np.concatenate([zero, np.cumsum(w * self.r)])
        self.cS = np.concatenate([zero, np.cumsum(w * self.r ** 2)])

    def moments(self, x):
        i = np.searchsorted(self.r, np.clip(np.asarray(x, dtype=np.float64), LO, HI), side="right")
        return self.cF[i], self.cM[i], self.cS[i]

    def _inverse(self, u: float) -> float:
        return float(self.r[min(len(self.r) - 1, np.searchsorted(self.cF, u, side="left") - 1)])


def empirical_from_stats(stats: BucketStats, num_top: int = 50, pooled: bool = False) -> EmpiricalDistribution:
    """Samples of the top buckets, each coordinate weighted by its bucket's
    norm^2: that is how it enters E||Q(g) - g||^2, so V on this f is the
    sampled gradient's actual expected error (up to a constant). Pooled (-N
    methods): every coordinate the same weight."""
    s = _nonzero(stats).top(num_top)
    if s.samples is None:
        raise BadInput("the empirical distribution needs the buckets' samples (Quantizer.stats keeps them "
                       "when distribution is 'empirical')")
    weights = [np.full(len(x), 1.0 if pooled else n * n) for x, n in zip(s.samples, s.norms)]
    return EmpiricalDistribution(np.concatenate(s.samples), np.concatenate(weights))


# ---------------------------------------------------------------- objective

def interval_variances(levels, dist: TruncNormMixture) -> np.ndarray:
    lv = np.asarray(levels, dtype=np.float64)
    F, M, S = dist.moments(lv)
    a, b = lv[:-1], lv[1:]
    dF, dM, dS = np.diff(F), np.diff(M), np.diff(S)
    # (r - a)(b - r) = -r^2 + (a + b) r - a b, integrated against f on [a, b]
    return -dS + (a + b) * dM - a * b * dF


def variance(levels, dist: TruncNormMixture) -> float:
    """V(levels): expected squared rounding error of one normalised coordinate."""
    return float(np.sum(interval_variances(levels, dist)))


def variance_gradient(levels, dist: TruncNormMixture) -> np.ndarray:
    """dV/dl_j for every level (0 at the fixed ends):
    int_{l_j-1}^{l_j} (r - l_j-1) f  -  int_{l_j}^{l_j+1} (l_j+1 - r) f."""
    lv = np.asarray(levels, dtype=np.float64)
    F, M, _ = dist.moments(lv)
    dF, dM = np.diff(F), np.diff(M)
    a, b = lv[:-1], lv[1:]
    left = dM - a * dF    # int_a^b (r - a) f, per interval
    right = b * dF - dM   # int_a^b (b - r) f, per interval
    grad = np.zeros_like(lv)
    grad[1:-1] = left[:-1] - right[1:]
    return grad


# ---------------------------------------------------------------------- ALQ

def quantile_levels(bits: int, dist: TruncNormMixture) -> np.ndarray:
    """Equal-mass levels: a start that already follows the data's shape."""
    n = num_levels(bits)
    lv = np.array([dist.ppf(u) for u in np.linspace(0, 1, n)])
    lv[0], lv[-1] = LO, HI
    return _make_increasing(lv)


def _make_increasing(lv: np.ndarray) -> np.ndarray:
    # quantiles of a narrow distribution can coincide in float64; spread ties
    # so the rounding intervals stay non-empty
    for i in range(1, len(lv) - 1):
        if lv[i] <= lv[i - 1]:
            lv[i] = np.nextafter(lv[i - 1], HI)
    if len(lv) > 2 and lv[-2] >= HI:
        lv[1:-1] = np.linspace(LO, HI, len(lv))[1:-1]
    return lv


def alq_step(a: float, b: float, dist: TruncNormMixture) -> float:
    """The closed-form minimiser of V over one level between fixed neighbours
    a < x < b:  x = F^-1( F(b) - int_a^b (r - a) f dr / (b - a) )."""
    F, M, _ = dist.moments(np.array([a, b]))
    mass = F[1] - F[0]
    if mass <= 1e-15:
        return 0.5 * (a + b)  # no data between the neighbours: V does not depend on x
    target = F[1] - ((M[1] - M[0]) - a * mass) / (b - a)
    # the target lies in [F(a), F(b)] by construction; solve inside the bracket
    g = lambda t: float(dist.cdf(t)) - target  # noqa: E731
    ga, gb = g(a), g(b)
    if ga >= 0:
        return float(np.nextafter(a, b))
    if gb <= 0:
        return float(np.nextafter(b, a))
    return float(optimize.brentq(g, a, b, xtol=1e-15, rtol=4 * np.finfo(float).eps))


def alq_descent(start, dist: TruncNormMixture, sweeps: int = 30) -> np.ndarray:
    """Coordinate descent: each sweep sets every interior level to its exact
    minimiser given its neighbours, so V never increases."""
    lv = check_levels(start).copy()
    for _ in range(sweeps):
        for j in range(1, len(lv) - 1):
            lv[j] = alq_step(lv[j - 1], lv[j + 1], dist)
    return lv


def fit_alq(bits: int, dist: TruncNormMixture, sweeps: int = 30) -> np.ndarray:
    """ALQ: descend from quantile, uniform and exponential levels; keep the best
    (V is not convex in the levels, so one start can stall in a poor basin)."""
    starts = [quantile_levels(bits, dist), uniform_levels(bits), exponential_levels(bits, 0.5)]
    fits = [alq_descent(s, dist, sweeps) for s in starts]
    return min(fits, key=lambda lv: variance(lv, dist))


# ---------------------------------------------------------------------- AMQ

P_MIN, P_MAX = 1e-3, 0.999  # keep +-p^j strictly increasing and inside [-1, 1]


def amq_gradient(p: float, bits: int, dist: TruncNormMixture) -> float:
    """dV/dp by the chain rule through l = +-p^j (dl/dp = +-j p^(j-1))."""
    lv = exponential_levels(bits, p)
    half = num_levels(bits) // 2
    j = np.concatenate([np.arange(half), np.arange(half)[::-1]])  # exponents, left to right
    sign = np.concatenate([-np.ones(half), np.ones(half)])
    dl_dp = sign * j * p ** np.maximum(j - 1, 0)
    return float(variance_gradient(lv, dist) @ dl_dp)


def fit_amq(bits: int, dist: TruncNormMixture, lr: float = 0.7, epochs: int = 40,
            previous: Optional[float] = None) -> Tuple[float, np.ndarray]:
    """AMQ: gradient descent on the single multiplier p from several starts
    (and the previous best, so a refit never does worse than keeping it)."""
    starts = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    if previous is not None:
        starts.append(float(previous))
    best_p, best_v = None, np.inf
    for p in starts:
        # a fixed step can overshoot a narrow valley; keep the best iterate seen
        for _ in range(epochs + 1):
            v = variance(exponential_levels(bits, p), dist)
            if v < best_v:
                best_p, best_v = p, v
            p = float(np.clip(p - lr * amq_gradient(p, bits, dist), P_MIN, P_MAX))
    return best_p, exponential_levels(bits, best_p)


def initial_levels(method: str, bits: int) -> np.ndarray:
    """Levels used before the first fit (and for the fixed-level methods)."""
    if method in ("qsgd", "qsgdinf"):
        return uniform_levels(bits)
    if method == "terngrad":
        return ternary_levels()
    # NUQSGD, and the adaptive methods' starting point until their first refit
    return exponential_levels(bits, 0.5)


def fit_levels(method: str, bits: int, stats: BucketStats, num_top: int = 50, sweeps: int = 30,
               amq_lr: float = 0.7, amq_epochs: int = 40, previous_p: Optional[float] = None,
               distribution: str = "truncnorm"):
    """Fit `method`'s levels to the statistics. Returns (levels, p or None)."""
    if method not in ("alq", "alqn", "amq", "amqn"):
        raise BadInput(f"method {method!r} has fixed levels; only alq, alqn, amq, amqn are fit")
    pooled = method.endswith("n")
    if distribution == "empirical":
        dist = empirical_from_stats(stats, num_top, pooled)
    elif distribution == "truncnorm":
        dist = pooled_from_stats(stats, num_top) if pooled else mixture_from_stats(stats, num_top)
    else:
        raise BadInput(f"distribution must be truncnorm or empirical, got {distribution!r}")
    if method.startswith("alq"):
        return fit_alq(bits, dist, sweeps), None
    p, lv = fit_amq(bits, dist, amq_lr, amq_epochs, previous_p)
    return lv, p


def truncnorm_reference(mean: float, std: float):
    """scipy's frozen truncated normal on [-1, 1], the ground truth the tests
    check the closed-form moments against."""
    return truncnorm((LO - mean) / std, (HI - mean) / std, loc=mean, scale=std)
