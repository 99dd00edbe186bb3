"""Tests for attnrl_core.diagnostics: selection diagnostics and paired statistics."""

import itertools
import math

import numpy as np
import pytest
import torch

from attnrl_core.diagnostics import (
    bootstrap_ci,
    key_cosine,
    learning_figure,
    oracle_fraction,
    paired_difference,
    query_distinct,
    selection_entropy,
    selection_top_ratio,
    trend_hac,
)

# Available counts below N on purpose: normalising by log N instead of log(available)
# would then give values different from 1 / available.
AVAILABLE = torch.tensor([[2, 3, 5], [4, 6, 2]])
N_KEYS = 8


def _uniform(available: torch.Tensor) -> torch.Tensor:
    probs = torch.zeros(*available.shape, N_KEYS)
    for b, t in itertools.product(range(available.shape[0]), range(available.shape[1])):
        k = int(available[b, t])
        probs[b, t, :k] = 1.0 / k
    return probs


def _one_hot(available: torch.Tensor) -> torch.Tensor:
    probs = torch.zeros(*available.shape, N_KEYS)
    probs[..., 0] = 1.0
    return probs


def test_uniform_gives_entropy_one():
    assert selection_entropy(_uniform(AVAILABLE), AVAILABLE) == pytest.approx(1.0)


def test_uniform_gives_top_ratio_one():
    assert selection_top_ratio(_uniform(AVAILABLE), AVAILABLE) == pytest.approx(1.0)


def test_one_hot_gives_entropy_zero():
    assert selection_entropy(_one_hot(AVAILABLE), AVAILABLE) == pytest.approx(0.0, abs=1e-12)


def test_one_hot_gives_top_ratio_equal_to_available():
    expected = AVAILABLE.double().mean().item()
    assert selection_top_ratio(_one_hot(AVAILABLE), AVAILABLE) == pytest.approx(expected)


def test_forced_steps_are_excluded():
    # Unforced steps are one-hot over 4 keys; the forced step (one key) would pull the
    # top ratio below 4 and make the entropy nan if it were counted.
    available = torch.tensor([[4, 1, 4]])
    probs = _one_hot(available)
    assert selection_top_ratio(probs, available) == pytest.approx(4.0)
    assert selection_entropy(probs, available) == pytest.approx(0.0, abs=1e-12)


def test_all_forced_steps_give_nan():
    available = torch.ones(2, 3, dtype=torch.long)
    probs = _one_hot(available)
    assert math.isnan(selection_entropy(probs, available))
    assert math.isnan(selection_top_ratio(probs, available))


def test_selection_rejects_mismatched_available():
    with pytest.raises(ValueError):
        selection_entropy(_uniform(AVAILABLE), AVAILABLE[:, :2])


def test_key_cosine_identical_embeddings_is_one():
    key_emb = torch.randn(1, 1, 5).expand(3, 6, 5).contiguous()
    pool = torch.tensor([[0, 2, 4], [1, 3, 5], [0, 1, 2]])
    assert key_cosine(key_emb, pool) == pytest.approx(1.0)


def test_key_cosine_orthogonal_embeddings_is_zero():
    key_emb = torch.eye(6).expand(2, 6, 6).contiguous()
    pool = torch.tensor([[0, 2, 4, 5], [1, 3, 5, 0]])
    assert key_cosine(key_emb, pool) == pytest.approx(0.0, abs=1e-12)


def test_key_cosine_matches_loop_reference():
    gen = torch.Generator().manual_seed(0)
    key_emb = torch.randn(3, 7, 4, generator=gen)
    pool = torch.stack([torch.randperm(7, generator=gen)[:4] for _ in range(3)])
    row_means = []
    for b in range(3):
        sims = [torch.nn.functional.cosine_similarity(key_emb[b, pool[b, i]],
                                                      key_emb[b, pool[b, j]], dim=0).item()
                for i, j in itertools.combinations(range(4), 2)]
        row_means.append(sum(sims) / len(sims))
    assert key_cosine(key_emb, pool) == pytest.approx(sum(row_means) / 3, abs=1e-6)


def test_key_cosine_single_entry_pool_is_nan():
    assert math.isnan(key_cosine(torch.randn(2, 3, 4), torch.tensor([[0], [1]])))


def test_query_distinct_identical_queries():
    # Bigrams of one query: (1,2) (2,1) (1,2) (2,3) -> 3 distinct out of 4.
    query = torch.tensor([1, 2, 1, 2, 3])
    tokens = query.expand(2, 3, 5)
    assert query_distinct(tokens) == pytest.approx(3 / (4 * 2 * 3))


def test_query_distinct_matches_set_reference():
    gen = torch.Generator().manual_seed(0)
    # A small vocabulary makes repeated bigrams (within and across rows) common.
    tokens = torch.randint(0, 4, (3, 2, 6), generator=gen)
    bigrams = [(int(q[i]), int(q[i + 1])) for q in tokens.reshape(-1, 6) for i in range(5)]
    assert query_distinct(tokens) == pytest.approx(len(set(bigrams)) / len(bigrams))


def test_query_distinct_rejects_single_token_queries():
    with pytest.raises(ValueError):
        query_distinct(torch.zeros(2, 3, 1, dtype=torch.long))


def test_bootstrap_ci_contains_mean():
    values = np.random.default_rng(1).normal(2.0, 1.0, size=50)
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi


def test_bootstrap_ci_narrows_with_more_units():
    rng = np.random.default_rng(2)
    lo_small, hi_small = bootstrap_ci(rng.normal(size=20))
    lo_large, hi_large = bootstrap_ci(rng.normal(size=2000))
    assert hi_large - lo_large < (hi_small - lo_small) / 3


def test_bootstrap_ci_rejects_empty():
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))


def test_paired_difference_with_itself_is_zero():
    a = np.random.default_rng(3).normal(size=30)
    result = paired_difference(a, a)
    assert result == {"mean": 0.0, "ci": [0.0, 0.0], "units": 30, "articles": 30, "method": "t", "se": 0.0, "df": 29}


def test_paired_difference_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        paired_difference(np.zeros(3), np.zeros(4))


def test_oracle_fraction_is_one_when_chosen_is_best():
    rng = np.random.default_rng(4)
    mean = rng.normal(size=20)
    best = mean + rng.uniform(0.1, 1.0, size=20)
    result = oracle_fraction(best, mean, best)
    assert result["fraction"] == pytest.approx(1.0)
    assert result["ci"] == pytest.approx([1.0, 1.0])


def test_oracle_fraction_is_zero_when_chosen_is_mean():
    rng = np.random.default_rng(5)
    mean = rng.normal(size=20)
    best = mean + rng.uniform(0.1, 1.0, size=20)
    result = oracle_fraction(mean, mean, best)
    assert result["fraction"] == pytest.approx(0.0, abs=1e-12)
    assert result["ci"] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_oracle_fraction_is_ratio_of_sums():
    # Per-unit ratios are 1 and 0 (mean 0.5); the ratio of sums is (1 + 0) / (1 + 10).
    chosen, mean, best = np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([1.0, 10.0])
    result = oracle_fraction(chosen, mean, best)
    assert result["fraction"] == pytest.approx(1 / 11)
    assert result["best"] == pytest.approx(5.5)
    assert result["mean"] == pytest.approx(0.0)
    assert result["chosen"] == pytest.approx(0.5)


def test_oracle_fraction_zero_spread_is_nan():
    flat = np.ones(4)
    result = oracle_fraction(flat, flat, flat)
    assert math.isnan(result["fraction"])
    assert all(math.isnan(x) for x in result["ci"])


def test_oracle_fraction_drops_zero_denominator_resamples():
    # Resamples holding only unit 0 have a zero denominator; every other resample's
    # ratio is exactly 0.5, so the CI must be [0.5, 0.5] rather than nan.
    result = oracle_fraction(np.array([0.0, 0.5]), np.zeros(2), np.array([0.0, 1.0]), method="bootstrap")
    assert result["fraction"] == pytest.approx(0.5)
    assert result["ci"] == pytest.approx([0.5, 0.5])


def _clustered_units(windows: list[int], article_sd: float, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Per-unit values with a shared effect per article (windows of one article are alike) and their labels."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(0.0, article_sd) + rng.normal(0.0, 0.1, size=w) for w in windows])
    return values, [f"a{i}" for i, w in enumerate(windows) for _ in range(w)]


def test_article_intervals_are_wider_than_unit_intervals_under_an_article_effect():
    values, articles = _clustered_units([4, 2, 4, 4, 4, 3, 4, 3], article_sd=1.0)
    unit_lo, unit_hi = bootstrap_ci(values)
    art_lo, art_hi = bootstrap_ci(values, clusters=articles)
    assert art_hi - art_lo > 1.4 * (unit_hi - unit_lo)  # sqrt(28 / 8) = 1.9 for a pure article effect
    boot = paired_difference(values, np.zeros_like(values), clusters=articles, method="bootstrap")
    assert boot["units"] == 28 and boot["articles"] == 8 and boot["ci"] == [art_lo, art_hi]
    paired, unit = (paired_difference(values, np.zeros_like(values), clusters=c) for c in (articles, None))
    assert paired["df"] == 7 and unit["df"] == 27 and np.diff(paired["ci"])[0] > 1.4 * np.diff(unit["ci"])[0]
    fraction = oracle_fraction(values, np.zeros_like(values), np.abs(values) + 1.0, clusters=articles)
    unit_fraction = oracle_fraction(values, np.zeros_like(values), np.abs(values) + 1.0)
    assert fraction["articles"] == 8 and np.diff(fraction["ci"])[0] > np.diff(unit_fraction["ci"])[0]


def test_article_intervals_are_the_unit_intervals_with_one_window_per_article():
    values, articles = _clustered_units([1] * 12, article_sd=1.0)
    assert bootstrap_ci(values, clusters=articles[::-1]) == bootstrap_ci(values)
    for method in ("t", "bootstrap"):
        assert oracle_fraction(values, np.zeros(12), np.abs(values) + 1, clusters=articles, method=method)["ci"] == \
            pytest.approx(oracle_fraction(values, np.zeros(12), np.abs(values) + 1, method=method)["ci"])
    # and the cluster-robust t of a mean is then the ordinary t interval
    t = paired_difference(values, np.zeros(12), clusters=articles)
    half = 2.2010 * values.std(ddof=1) / math.sqrt(12)
    assert t["ci"] == pytest.approx([values.mean() - half, values.mean() + half], rel=1e-4)


def _ar1(n: int, phi: float, rng) -> np.ndarray:
    y, e = np.zeros(n), rng.normal(size=n)
    for t in range(n):
        y[t] = (phi * y[t - 1] if t else 0.0) + e[t]
    return y


def test_trend_test_keeps_its_size_when_episodes_are_correlated():
    """A drifting policy makes neighbouring episodes' rewards correlated (AR(1), phi 0.6, no trend): the
    first-vs-last z, which assumes independent episodes, then passes 2 far more often than 5% of the time;
    the block-means trend test stays near its nominal size (tests/test_coverage.py holds it to 7.5%), and
    still finds a real trend."""
    rng = np.random.default_rng(0)
    series = [_ar1(100, 0.6, rng) for _ in range(300)]
    naive = np.mean([abs(learning_figure(y, 20)["z"]) > 2 for y in series])
    robust = np.mean([trend_hac(y)["p_hac"] < 0.05 for y in series])
    assert naive > 0.25 and robust < 0.1
    rising = [trend_hac(_ar1(100, 0.6, rng) + 0.03 * np.arange(100)) for _ in range(50)]
    assert np.mean([r["p_hac"] < 0.05 and r["t_hac"] > 0 for r in rising]) > 0.5  # 5 blocks: 3 df, less power


def test_fraction_difference_is_the_difference_of_the_fractions_with_the_paired_linearised_se():
    from attnrl_core.diagnostics import fraction_difference, oracle_fraction

    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(6), 3)
    a = (rng.normal(size=18), rng.normal(size=18) * 0.1, 1 + rng.random(18))
    b = (rng.normal(size=18), a[1], 1 + rng.random(18))
    d = fraction_difference(a, b, clusters=clusters)
    fa, fb = (oracle_fraction(*x, clusters=clusters)["fraction"] for x in (a, b))
    assert d["mean"] == pytest.approx(fb - fa) and d["df"] == 5 and d["articles"] == 6
    # by hand: each unit's influence on fb - fa, summed per article, CR1
    ga, sa = a[0] - a[1], a[2] - a[1]
    gb, sb = b[0] - b[1], b[2] - b[1]
    u = (gb - fb * sb) / sb.sum() - (ga - fa * sa) / sa.sum()
    totals = np.array([u[clusters == c].sum() for c in range(6)])
    se = np.sqrt(6 / 5 * (totals ** 2).sum())
    assert d["se"] == pytest.approx(se)
    assert d["ci"] == pytest.approx([d["mean"] - 2.5705818 * se, d["mean"] + 2.5705818 * se], rel=1e-6)
    with pytest.raises(ValueError, match="same units"):
        fraction_difference(a, tuple(x[:9] for x in b))
