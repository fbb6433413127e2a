"""Level sets, the variance objective and the ALQ / AMQ fits (SPEC section 4)."""
import numpy as np
import pytest
from scipy import integrate, optimize

from fxcompress.distributed import levels as L
from fxcompress.errors import BadInput

MIX = L.TruncNormMixture([0.001, -0.002, 0.05], [0.011, 0.02, 0.3], [1.0, 2.0, 0.5])


def test_level_sets_follow_the_spec():
    assert np.allclose(L.uniform_levels(2), [-1, -1 / 3, 1 / 3, 1])
    assert np.allclose(L.exponential_levels(3, 0.5), [-1, -.5, -.25, -.125, .125, .25, .5, 1])
    assert np.allclose(L.ternary_levels(), [-1, 0, 1])
    for bits in (1, 2, 3, 4, 8):
        assert len(L.uniform_levels(bits)) == len(L.exponential_levels(bits, 0.3)) == 2 ** bits


@pytest.mark.parametrize("levels, words", [
    ([-1, 0.5, 0.2, 1], "strictly increasing"),
    ([-0.9, 0, 1], "start at -1"),
    ([1], "at least two"),
])
def test_bad_levels_are_rejected(levels, words):
    with pytest.raises(BadInput, match=words):
        L.check_levels(levels)


def test_closed_form_moments_match_scipy_truncnorm():
    refs = [L.truncnorm_reference(m, s) for m, s in zip(MIX.mu, MIX.sigma)]
    for x in (-0.5, -0.01, 0.0, 0.013, 0.4, 1.0):
        F, M, S = (float(v) for v in MIX.moments(x))
        assert np.isclose(F, sum(w * r.cdf(x) for w, r in zip(MIX.w, refs)), atol=1e-12)
        assert np.isclose(M, sum(w * r.expect(lambda t: t, ub=x) for w, r in zip(MIX.w, refs)), atol=1e-10)
        assert np.isclose(S, sum(w * r.expect(lambda t: t * t, ub=x) for w, r in zip(MIX.w, refs)), atol=1e-10)


def test_ppf_inverts_cdf():
    for u in (0.01, 0.3, 0.5, 0.97):
        assert np.isclose(MIX.cdf(MIX.ppf(u)), u, atol=1e-10)


def _pdf(dist, r):
    refs = [L.truncnorm_reference(m, s) for m, s in zip(dist.mu, dist.sigma)]
    return sum(w * ref.pdf(r) for w, ref in zip(dist.w, refs))


def test_variance_equals_the_integral_in_the_spec():
    levels = L.exponential_levels(3, 0.4)
    want = sum(integrate.quad(lambda r: (r - a) * (b - r) * _pdf(MIX, r), a, b, limit=200, points=[0.0])[0]
               for a, b in zip(levels[:-1], levels[1:]))
    assert np.isclose(L.variance(levels, MIX), want, rtol=1e-6)


def test_alq_step_is_the_exact_minimiser_between_its_neighbours():
    lv = L.uniform_levels(3)
    a, b = lv[3], lv[5]

    def v(x):
        trial = lv.copy()
        trial[4] = x
        return L.variance(trial, MIX)

    best = optimize.minimize_scalar(v, bounds=(a, b), method="bounded", options={"xatol": 1e-10}).x
    x = L.alq_step(a, b, MIX)
    assert abs(x - best) < 1e-5
    assert v(x) <= v(best) + 1e-12


def test_alq_descent_never_increases_variance():
    start = L.uniform_levels(3)
    values = [L.variance(L.alq_descent(start, MIX, sweeps=k), MIX) for k in range(0, 8)]
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))
    assert values[-1] < 0.2 * values[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_alq_beats_every_start_and_amq_beats_nuqsgd(bits):
    alq = L.variance(L.fit_alq(bits, MIX), MIX)
    for start in (L.uniform_levels(bits), L.exponential_levels(bits), L.quantile_levels(bits, MIX)):
        assert alq <= L.variance(start, MIX)
    p, amq_levels = L.fit_amq(bits, MIX)
    amq = L.variance(amq_levels, MIX)
    assert 0 < p < 1
    assert amq <= L.variance(L.exponential_levels(bits, 0.5), MIX)
    # ALQ's levels are a superset of AMQ's family
    assert alq <= amq * (1 + 1e-9)


def test_amq_gradient_matches_finite_differences():
    for bits, p in ((2, 0.3), (3, 0.45), (4, 0.7)):
        eps = 1e-6
        fd = (L.variance(L.exponential_levels(bits, p + eps), MIX)
              - L.variance(L.exponential_levels(bits, p - eps), MIX)) / (2 * eps)
        assert np.isclose(L.amq_gradient(p, bits, MIX), fd, rtol=1e-5, atol=1e-12)


def test_top_buckets_and_pooled_statistics():
    rng = np.random.default_rng(0)
    data = [rng.normal(m, s, 512) for m, s in ((0.0, 1.0), (0.5, 2.0), (-1.0, 0.5))]
    stats = L.BucketStats(np.array([d.mean() for d in data]), np.array([d.std() for d in data]),
                          np.array([3.0, 1.0, 2.0]))
    assert list(stats.top(2).norms) == [3.0, 2.0]
    everything = np.concatenate(data)
    mean, std = stats.pooled()
    assert np.isclose(mean, everything.mean()) and np.isclose(std, everything.std())


def test_fit_levels_dispatches_by_method_and_rejects_fixed_methods():
    stats = L.BucketStats(np.zeros(4), np.full(4, 0.02), np.array([1.0, 2.0, 0.0, 3.0]))
    lv, p = L.fit_levels("alqn", 3, stats)
    assert p is None and len(lv) == 8
    lv, p = L.fit_levels("amq", 3, stats)
    assert np.allclose(lv, L.exponential_levels(3, p))
    with pytest.raises(BadInput, match="fixed levels"):
        L.fit_levels("qsgd", 3, stats)
    with pytest.raises(BadInput, match="non-zero norm"):
        L.fit_levels("alq", 3, L.BucketStats(np.zeros(2), np.ones(2), np.zeros(2)))


def test_empirical_distribution_moments_are_weighted_sums():
    rng = np.random.default_rng(3)
    r, w = rng.standard_t(3, 2000) * 0.02, rng.random(2000)
    d = L.EmpiricalDistribution(r, w)
    wn = w / w.sum()
    for x in (-0.05, 0.0, 0.013, 1.0):
        F, M, S = d.moments(x)
        below = r <= x
        assert np.isclose(F, wn[below].sum()) and np.isclose(M, (wn * r)[below].sum())
        assert np.isclose(S, (wn * r * r)[below].sum())


def test_empirical_variance_is_the_exact_rounding_variance_of_the_sample():
    rng = np.random.default_rng(4)
    r = np.clip(rng.standard_t(3, 5000) * 0.05, -1, 1)
    d = L.EmpiricalDistribution(r, np.ones_like(r))
    lv = L.fit_alq(3, d)
    k = np.searchsorted(lv[1:-1], r, side="right")
    want = np.mean((r - lv[k]) * (lv[k + 1] - r))
    assert np.isclose(L.variance(lv, d), want, rtol=1e-9)
    # heavy tails: fitting the sample itself beats fitting a normal to it
    normal = L.TruncNormMixture([r.mean()], [r.std()])
    assert L.variance(lv, d) < L.variance(L.fit_alq(3, normal), d)


def test_empirical_fit_needs_samples():
    stats = L.BucketStats(np.zeros(2), np.full(2, 0.01), np.ones(2))
    with pytest.raises(BadInput, match="samples"):
        L.fit_levels("alq", 3, stats, distribution="empirical")
    with pytest.raises(BadInput, match="truncnorm or empirical"):
        L.fit_levels("alq", 3, stats, distribution="histogram")
