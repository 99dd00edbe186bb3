"""The intervals and the trend test hold their nominal levels at the sample sizes we have (seeded simulations).

The kept reports' layout: 13 held-out articles with 4,4,4,4,2,4,4,4,4,1,4,3,3 units, intra-article correlation
0.3. The default interval must cover a true 0 at least 93% of the time; the percentile cluster bootstrap (an
option, kept to compare) covers less. The learning check's trend test must reject a trend-free AR(1) series at
most 7.5% of the time at the 5% level (phi up to 0.6; runs of 20 and 60 episodes).
"""

import numpy as np
import pytest

from attnrl_core.diagnostics import oracle_fraction, paired_difference, power_analysis, trend_hac

LAYOUT = np.repeat(np.arange(13), [4, 4, 4, 4, 2, 4, 4, 4, 4, 1, 4, 3, 3])


def _units(rng, reps: int, icc: float = 0.3) -> np.ndarray:
    """[reps, units]: an article effect (variance icc) plus a unit effect (variance 1 - icc), mean 0."""
    return (rng.normal(size=(reps, 13))[:, LAYOUT] * np.sqrt(icc)
            + rng.normal(size=(reps, LAYOUT.size)) * np.sqrt(1 - icc))


def _covers(result: dict, truth: float) -> bool:
    return result["ci"][0] <= truth <= result["ci"][1]


def test_the_default_paired_interval_covers_at_13_unbalanced_articles_and_the_bootstrap_does_not():
    rng = np.random.default_rng(0)
    draws = _units(rng, 2000)
    coverage = np.mean([_covers(paired_difference(x, np.zeros_like(x), clusters=LAYOUT), 0.0) for x in draws])
    boot = np.mean([_covers(paired_difference(x, np.zeros_like(x), clusters=LAYOUT, method="bootstrap",
                                              num_samples=1000, seed=i), 0.0) for i, x in enumerate(draws[:400])])
    assert coverage >= 0.93, coverage
    assert boot < coverage, (boot, coverage)


def test_the_oracle_fractions_linearised_interval_covers_at_13_unbalanced_articles():
    """A ratio of sums: gain = 0.2 x spread + article-correlated noise, so the true fraction is 0.2."""
    rng = np.random.default_rng(1)
    hits, boot = [], []
    for i in range(2000):
        spread = 1.0 + 0.25 * rng.normal(size=13)[LAYOUT] + 0.3 * rng.random(LAYOUT.size)
        gain = 0.2 * spread + 0.3 * _units(rng, 1)[0]
        hits.append(_covers(oracle_fraction(gain, np.zeros_like(gain), spread, clusters=LAYOUT), 0.2))
        if i < 400:
            boot.append(_covers(oracle_fraction(gain, np.zeros_like(gain), spread, clusters=LAYOUT, method="bootstrap",
                                                num_samples=1000, seed=i), 0.2))
    assert np.mean(hits) >= 0.93, np.mean(hits)
    assert np.mean(boot) < np.mean(hits)


def _ar1(rng, reps: int, n: int, phi: float) -> np.ndarray:
    """[reps, n] stationary AR(1) series with unit innovations and no trend."""
    e = rng.normal(size=(reps, n))
    y = np.zeros((reps, n))
    y[:, 0] = e[:, 0] / np.sqrt(1 - phi ** 2)
    for t in range(1, n):
        y[:, t] = phi * y[:, t - 1] + e[:, t]
    return y


@pytest.mark.parametrize("n", [20, 60])
def test_the_trend_test_holds_its_size_on_autocorrelated_episodes(n):
    rng = np.random.default_rng(2)
    for phi in (0.0, 0.3, 0.6):
        size = np.mean([trend_hac(y)["p_hac"] < 0.05 for y in _ar1(rng, 4000, n, phi)])
        assert size <= 0.075, (n, phi, size)
    # and it finds a real trend, a rise of 4 over the run (about 3 SDs of the series), though with few blocks'
    # degrees of freedom it finds it less often than the z did (the price of holding the size)
    rising = [trend_hac(y + 4.0 / n * np.arange(n)) for y in _ar1(rng, 200, n, 0.6)]
    assert np.mean([r["p_hac"] < 0.05 and r["t_hac"] > 0 for r in rising]) > (0.2 if n == 20 else 0.5)
    assert "block means" in rising[0]["trend_test"]


def test_power_is_the_minimum_detectable_effect_and_articles_for_80_percent():
    rng = np.random.default_rng(3)
    x = _units(rng, 1)[0] * 0.05
    diff = paired_difference(x, np.zeros_like(x), clusters=LAYOUT)
    p = power_analysis(diff)
    # (t_.975 + t_.80) x SE at 12 df, larger than the z-based precision half-width 1.96 x SE
    assert p["minimum_detectable_effect"] == pytest.approx((2.1788 + 0.8726) * diff["se"], rel=1e-3)
    need = p["articles_needed"]
    assert need["0.01"] > need["0.02"] >= 2
    sd = p["between_article_sd"]
    assert need["0.01"] >= (2.8 * sd / 0.01) ** 2 * 0.95  # about 2x the articles of a half-width target
    assert power_analysis(paired_difference(x[:1], np.zeros(1)))["minimum_detectable_effect"] is None


def test_two_arms_oracle_fraction_difference_paired_by_unit_covers():
    """Two arms scored on the same units (shared unit effects): the linearised t of f2 - f1, true value 0.1."""
    from attnrl_core.diagnostics import fraction_difference

    rng = np.random.default_rng(4)
    hits = []
    for _ in range(2000):
        spread = 1.0 + 0.25 * rng.normal(size=13)[LAYOUT] + 0.3 * rng.random(LAYOUT.size)
        shared = 0.3 * _units(rng, 1)[0]  # what both arms' gains share on a unit
        g1 = 0.2 * spread + shared + 0.15 * _units(rng, 1)[0]
        g2 = 0.3 * spread + shared + 0.15 * _units(rng, 1)[0]
        zero = np.zeros_like(spread)
        hits.append(_covers(fraction_difference((g1, zero, spread), (g2, zero, spread), clusters=LAYOUT), 0.1))
    assert np.mean(hits) >= 0.93, np.mean(hits)
