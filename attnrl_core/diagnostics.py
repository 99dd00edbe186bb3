"""Selection diagnostics and paired statistics for evaluation: pure functions of tensors/arrays.

The selection diagnostics summarise how peaked the policy's distribution over keys is, how
similar the keys in a pool are and how varied the generated queries are; the paired
statistics give intervals for per-unit comparisons between two methods over *clusters* (a unit's article:
units of one article are not independent): by default a cluster-robust t (CR1, articles - 1 degrees of
freedom; the oracle fraction, a ratio of sums, by its linearisation), which covers at the 13-45 articles we
have, and as a named option the percentile cluster bootstrap, which under-covers there (`tests/
test_coverage.py` simulates both); `power` gives the smallest effect detectable at 80% and the articles 80%
power needs. The learning check's figures compare a run's first and last episodes and test its trend by a t
on the slope of block means, which holds its size on autocorrelated episodes. This
module imports nothing from attnrl_core, so it can be used on saved tensors or arrays
without loading a model or a configuration.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import Tensor


def _require(condition: bool, message: str) -> None:
    # ValueError rather than assert: these checks guard user input and must survive `python -O`.
    if not condition:
        raise ValueError(message)


def _check_selection(probs: Tensor, available: Tensor) -> tuple[Tensor, Tensor]:
    _require(probs.dim() == 3, f"probs must be [B, P, N], got shape {tuple(probs.shape)}")
    _require(probs.numel() > 0, "probs is empty")
    _require(tuple(available.shape) == tuple(probs.shape[:2]),
             f"available must be [B, P] = {tuple(probs.shape[:2])}, got {tuple(available.shape)}")
    _require(not available.is_floating_point(), "available must be an integer tensor")
    _require(bool((available >= 1).all()) and bool((available <= probs.shape[2]).all()),
             "available must lie in [1, N]")
    # Steps with one available key are forced: any distribution is "deterministic" there,
    # so counting them would drag both diagnostics towards their extreme values.
    return probs.detach().to(torch.float64), available.detach().to(torch.float64)


def selection_entropy(probs: Tensor, available: Tensor) -> float:
    """Mean normalised entropy of probs [B, P, N] over unforced steps (available [B, P] > 1).

    1 = uniform over the available keys, 0 = deterministic; nan if every step is forced.
    """
    p, avail = _check_selection(probs, available)
    free = avail > 1
    if not bool(free.any()):
        return float("nan")
    # Unavailable keys carry exact zeros; 0 * log 0 is taken as 0 instead of nan.
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))),
                        torch.zeros_like(p))
    entropy = -plogp.sum(dim=-1)
    return float((entropy[free] / torch.log(avail[free])).mean())


def selection_top_ratio(probs: Tensor, available: Tensor) -> float:
    """Mean of max_k probs[b, t, k] * available[b, t] over unforced steps; probs [B, P, N].

    1 = uniform over the available keys, larger = more peaked; nan if every step is forced.
    """
    p, avail = _check_selection(probs, available)
    free = avail > 1
    if not bool(free.any()):
        return float("nan")
    return float((p.max(dim=-1).values[free] * avail[free]).mean())


def key_cosine(key_emb: Tensor, pool: Tensor) -> float:
    """Mean over rows of the mean pairwise cosine of the pool's key embeddings.

    key_emb [B, N, E]; pool [B, P] long indices into N. nan if P < 2 (no pairs).
    """
    _require(key_emb.dim() == 3, f"key_emb must be [B, N, E], got shape {tuple(key_emb.shape)}")
    _require(pool.dim() == 2 and pool.shape[0] == key_emb.shape[0],
             f"pool must be [B, P] with B = {key_emb.shape[0]}, got {tuple(pool.shape)}")
    _require(key_emb.shape[0] > 0, "key_emb is empty")
    _require(not pool.is_floating_point(), "pool must be an integer tensor")
    _require(bool((pool >= 0).all()) and bool((pool < key_emb.shape[1]).all()),
             "pool indices must lie in [0, N)")
    num_pool = pool.shape[1]
    if num_pool < 2:
        return float("nan")
    rows = torch.arange(pool.shape[0], device=pool.device).unsqueeze(1)
    emb = key_emb.detach().to(torch.float64)[rows, pool.long()]  # [B, P, E]
    # Clamp the norm so a zero embedding counts as cosine 0 rather than nan.
    unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gram = unit @ unit.transpose(1, 2)  # [B, P, P]
    i, j = torch.triu_indices(num_pool, num_pool, offset=1, device=gram.device)
    return float(gram[:, i, j].mean())


def query_distinct(query_tokens: Tensor) -> float:
    """Distinct token bigrams / all bigrams over the batch; query_tokens [B, P, Tq], Tq >= 2."""
    _require(query_tokens.dim() == 3,
             f"query_tokens must be [B, P, Tq], got shape {tuple(query_tokens.shape)}")
    _require(query_tokens.shape[2] >= 2, "query_tokens needs Tq >= 2 to form bigrams")
    _require(query_tokens.numel() > 0, "query_tokens is empty")
    _require(not query_tokens.is_floating_point(), "query_tokens must be an integer tensor")
    tokens = query_tokens.detach().long()
    _require(bool((tokens >= 0).all()), "query_tokens must be non-negative")
    # One int64 code per bigram; vocabularies up to ~3e9 stay below the int64 limit.
    vocab = int(tokens.max()) + 1
    codes = tokens[..., :-1] * vocab + tokens[..., 1:]
    return torch.unique(codes).numel() / codes.numel()


def _resample_indices(units: int, num_samples: int, seed: int) -> np.ndarray:
    _require(units > 0, "need at least one unit")
    _require(num_samples >= 1, "num_samples must be >= 1")
    return np.random.default_rng(seed).integers(0, units, size=(num_samples, units))


def _cluster_weights(clusters, units: int, num_samples: int, seed: int) -> np.ndarray:
    """[num_samples, units] how often each unit enters a bootstrap replicate that resamples *clusters*
    (every unit of a drawn cluster comes with it). `clusters` [U] labels each unit (e.g. its article);
    None = every unit its own cluster, which is the plain unit bootstrap with the same draws."""
    labels = np.arange(units) if clusters is None else np.asarray(clusters)
    _require(labels.shape == (units,), f"clusters must label each of the {units} units, got shape {labels.shape}")
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    # clusters numbered in order of first appearance: with one unit each, cluster k is unit k, so the
    # draws (and the interval) are exactly the unit bootstrap's
    order = np.empty(first.shape[0], dtype=np.int64)
    order[np.argsort(first)] = np.arange(first.shape[0])
    cluster_of = order[inverse.reshape(-1)]  # [U] in 0..C-1
    num_clusters = first.shape[0]
    draws = _resample_indices(num_clusters, num_samples, seed)  # [S, C] cluster indices
    counts = np.zeros((num_samples, num_clusters))
    np.add.at(counts, (np.arange(num_samples)[:, None], draws), 1.0)
    return counts[:, cluster_of]  # [S, U]


def _percentile_ci(replicates: np.ndarray, level: float) -> tuple[float, float]:
    _require(0.0 < level < 1.0, f"level must be in (0, 1), got {level}")
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(replicates, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values: np.ndarray, num_samples: int = 2000, seed: int = 0, level: float = 0.95,
                 clusters=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of values [U] or [U, ...] over units.

    With `clusters` [U] (each unit's article), whole clusters are resampled with all their units: windows
    of one article are not independent draws, and resampling them as if they were understates the
    interval's width. Without it, or with one unit per cluster, it is the unit bootstrap."""
    arr = np.asarray(values, dtype=np.float64)
    _require(arr.ndim >= 1 and arr.shape[0] > 0, "values is empty")
    # Every unit has the same number of trailing entries, so averaging each unit first gives the same means.
    per_unit = arr.reshape(arr.shape[0], -1).mean(axis=1)
    weights = _cluster_weights(clusters, per_unit.shape[0], num_samples, seed)  # [S, U]
    return _percentile_ci(weights @ per_unit / weights.sum(axis=1), level)


METHODS = ("t", "bootstrap")


def _cluster_index(clusters, units: int) -> tuple[np.ndarray, int]:
    """[U] each unit's cluster as 0..C-1, and C (None: every unit its own cluster)."""
    labels = np.arange(units) if clusters is None else np.asarray(clusters)
    _require(labels.shape == (units,), f"clusters must label each of the {units} units, got shape {labels.shape}")
    _, index = np.unique(labels, return_inverse=True)
    return index.reshape(-1), int(index.max()) + 1


def cluster_t(scores: np.ndarray, clusters, denominator: float, level: float = 0.95) -> dict:
    """A cluster-robust (CR1) standard error of an estimate whose influence on each unit is `scores` [U] (they
    sum to 0) divided by `denominator`: SE = sqrt(C / (C - 1) * sum_c (sum of cluster c's scores)^2) / denominator,
    with a t quantile on C - 1 degrees of freedom (C clusters). For a mean over U units, scores = x - mean and
    denominator = U; with one unit per cluster it is the ordinary t interval's SE."""
    index, C = _cluster_index(clusters, scores.shape[0])
    _require(C >= 2, "need at least 2 clusters (articles) for an interval")
    totals = np.bincount(index, weights=scores, minlength=C)
    se = math.sqrt(C / (C - 1) * float(totals @ totals)) / abs(denominator)
    return {"se": se, "df": C - 1, "t": float(stats.t.ppf(0.5 + level / 2, C - 1))}


def paired_difference(a: np.ndarray, b: np.ndarray, num_samples: int = 2000, seed: int = 0,
                      clusters=None, method: str = "t") -> dict:
    """Mean of a - b over units [U] with a 95% interval over `clusters` (each unit's article; None: units):
    method "t", the cluster-robust t (`cluster_t`, articles - 1 df), or "bootstrap", the percentile cluster
    bootstrap of `bootstrap_ci` (it under-covers at a dozen articles: kept to compare)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _require(a.shape == b.shape, f"a and b must have the same shape, got {a.shape} and {b.shape}")
    _require(a.ndim >= 1 and a.shape[0] > 0, "a and b are empty")
    _require(method in METHODS, f"method {method!r} is unknown: use t or bootstrap")
    diff = (a - b).reshape(a.shape[0], -1).mean(axis=1)
    mean = float(diff.mean())
    articles = int(diff.shape[0] if clusters is None else len(set(np.asarray(clusters).tolist())))
    out = {"mean": mean, "units": int(diff.shape[0]), "articles": articles, "method": method}
    if method == "bootstrap":
        return {**out, "ci": list(bootstrap_ci(diff, num_samples=num_samples, seed=seed, clusters=clusters))}
    if articles < 2:
        return {**out, "ci": [math.nan, math.nan], "se": math.nan, "df": 0}
    t = cluster_t(diff - mean, clusters, diff.shape[0])
    half = t["t"] * t["se"]
    return {**out, "ci": [mean - half, mean + half], "se": t["se"], "df": t["df"]}


def oracle_fraction(chosen: np.ndarray, mean: np.ndarray, best: np.ndarray,
                    num_samples: int = 2000, seed: int = 0, clusters=None, method: str = "t") -> dict:
    """Σ(chosen - mean) / Σ(best - mean) over units [U], with a 95% interval over `clusters` (None: units):
    method "t", the ratio's linearisation (each unit's influence gain - f * spread, `cluster_t` over articles), or
    "bootstrap", the percentile cluster bootstrap of the ratio.

    0 = no better than a uniformly random choice, 1 = the per-step oracle; nan if Σ(best - mean) = 0.
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (chosen, mean, best)]
    chosen_a, mean_a, best_a = arrays
    _require(chosen_a.ndim == 1 and chosen_a.shape[0] > 0, "chosen must be a non-empty [U] array")
    _require(mean_a.shape == chosen_a.shape and best_a.shape == chosen_a.shape,
             "chosen, mean and best must have the same shape")
    _require(method in METHODS, f"method {method!r} is unknown: use t or bootstrap")
    gain = chosen_a - mean_a
    spread = best_a - mean_a
    # A ratio of sums rather than a mean of ratios: a unit whose spread is near 0 would
    # otherwise dominate with an arbitrarily large per-unit ratio.
    total = spread.sum()
    fraction = float(gain.sum() / total) if total != 0 else float("nan")
    articles = int(gain.shape[0] if clusters is None else len(set(np.asarray(clusters).tolist())))
    out = {"fraction": fraction, "best": float(best_a.mean()), "mean": float(mean_a.mean()),
           "chosen": float(chosen_a.mean()), "units": int(gain.shape[0]), "articles": articles, "method": method}
    if method == "bootstrap":
        weights = _cluster_weights(clusters, gain.shape[0], num_samples, seed)  # [S, U]
        num, den = weights @ gain, weights @ spread
        keep = den != 0
        ci = list(_percentile_ci(num[keep] / den[keep], 0.95)) if keep.any() else [math.nan, math.nan]
        return {**out, "ci": ci}
    if total == 0 or articles < 2:
        return {**out, "ci": [math.nan, math.nan], "se": math.nan, "df": max(articles - 1, 0)}
    t = cluster_t(gain - fraction * spread, clusters, total)
    half = t["t"] * t["se"]
    return {**out, "ci": [fraction - half, fraction + half], "se": t["se"], "df": t["df"]}


def fraction_difference(first: tuple, second: tuple, clusters=None, level: float = 0.95) -> dict:
    """Second's oracle fraction minus first's, both scored on the same units: each a (chosen, mean, best) triple of
    [U] arrays. The interval is the linearised cluster-robust t of the difference of the two ratios, paired by unit
    (each unit's influence (g2 - f2 s2) / S2 - (g1 - f1 s1) / S1, `cluster_t` over articles). nan when either
    fraction's spread sums to 0 or there are fewer than 2 articles."""
    parts = []
    for chosen, mean, best in (first, second):
        gain = np.asarray(chosen, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
        spread = np.asarray(best, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
        _require(gain.ndim == 1 and gain.shape == spread.shape and gain.shape[0] > 0,
                 "chosen, mean and best must be non-empty [U] arrays of one shape")
        parts.append((gain, spread, float(spread.sum())))
    (g1, s1, S1), (g2, s2, S2) = parts
    _require(g1.shape == g2.shape, f"the two fractions must be scored on the same units, got {g1.shape} and {g2.shape}")
    articles = int(g1.shape[0] if clusters is None else len(set(np.asarray(clusters).tolist())))
    out = {"units": int(g1.shape[0]), "articles": articles, "method": "t"}
    if S1 == 0 or S2 == 0 or articles < 2:
        return {**out, "mean": math.nan, "ci": [math.nan, math.nan], "se": math.nan, "df": max(articles - 1, 0)}
    f1, f2 = float(g1.sum() / S1), float(g2.sum() / S2)
    t = cluster_t((g2 - f2 * s2) / S2 - (g1 - f1 * s1) / S1, clusters, 1.0, level)
    half = t["t"] * t["se"]
    return {**out, "mean": f2 - f1, "ci": [f2 - f1 - half, f2 - f1 + half], "se": t["se"], "df": t["df"]}


def articles_for_power(se: float, articles: int, effect: float, power: float = 0.8, level: float = 0.95) -> int | None:
    """Articles a two-sided test at 1 - `level` needs for `power` against `effect`, from an SE measured on
    `articles` articles (per-article SD = se * sqrt(articles), at the same windows and samples each): the smallest
    n with (t_{1-a/2, n-1} + t_{power, n-1}) * SD / sqrt(n) <= effect. None when it cannot be estimated."""
    if not (se > 0 and math.isfinite(se)) or articles < 2:
        return None
    sd = se * math.sqrt(articles)
    n = 2
    while (stats.t.ppf(0.5 + level / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n) > effect:
        n += 1
        if n > 1_000_000:
            return None
    return n


def power_analysis(diff: dict, targets: tuple[float, ...] = (0.01, 0.02), power: float = 0.8, level: float = 0.95) -> dict:
    """Power of a paired comparison from its `paired_difference(..., method="t")` result: the minimum detectable
    effect at `power` and a two-sided 1 - `level` test, (t_{1-a/2, df} + t_{power, df}) * SE, and the articles
    `articles_for_power` needs for each target effect. Nones when the SE is not defined (fewer than 2 articles,
    or no spread)."""
    se, df, n = diff.get("se", math.nan), diff.get("df", 0), diff["articles"]
    ok = df >= 1 and se == se and se > 0
    mde = float((stats.t.ppf(0.5 + level / 2, df) + stats.t.ppf(power, df)) * se) if ok else None
    return {"minimum_detectable_effect": mde, "power": power, "level": level, "articles": n, "se": se if ok else None,
            "between_article_sd": se * math.sqrt(n) if ok else None,
            "articles_needed": {f"{t:g}": articles_for_power(se, n, t, power, level) if ok else None for t in targets}}


def learning_figure(rewards, window: int = 20) -> dict:
    """The overfit check's figure: mean batch reward of the last `window` episodes minus that of the first,
    its standard error (episodes as independent draws) and z = difference / SE; beside it the trend's
    t_hac (`trend_hac`), which does not assume independent episodes. `rewards` [E] per episode,
    None or NaN where an episode had none (skipped). Rises "clearly" when z > 2."""
    r = np.asarray([np.nan if x is None else x for x in rewards], dtype=np.float64)
    _require(r.ndim == 1, "rewards must be a sequence of per-episode rewards")
    _require(window >= 2 and r.shape[0] >= 2 * window,
             f"{r.shape[0]} episodes are too few for two windows of {window}: train longer or lower --window")
    first, last = r[:window][np.isfinite(r[:window])], r[-window:][np.isfinite(r[-window:])]
    _require(first.size >= 2 and last.size >= 2, "fewer than 2 finite rewards in a window")
    se_first, se_last = first.std(ddof=1) / math.sqrt(first.size), last.std(ddof=1) / math.sqrt(last.size)
    se = math.hypot(se_first, se_last)
    diff = float(last.mean() - first.mean())
    return {"episodes": int(r.shape[0]), "window": window, "first_mean": float(first.mean()), "first_se": se_first,
            "last_mean": float(last.mean()), "last_se": se_last, "difference": diff, "se": se,
            "z": diff / se if se > 0 else math.nan, **trend_hac(r)}


def trend_hac(rewards, blocks: int | None = None) -> dict:
    """The reward's linear trend over episodes, tested so that autocorrelated episodes do not inflate it: the
    episodes are cut into B consecutive blocks (B = 4 below 50 episodes, else 5), and a least-squares
    line through the B block means (against each block's mean episode) gives the slope per episode, its
    classical SE and a t on B - 2 degrees of freedom. Averaging a block absorbs most of the serial correlation
    that makes the independent-episodes z (and the EWC long-run variance this replaced) reject a trend-free
    series too often; the simulated sizes are in EXPERIMENTS.md §1. `rewards` [E] per episode, NaN where
    skipped (dropped). The field names are kept from the EWC version (`slope_se_hac`, `t_hac`, `hac_dof`,
    `p_hac`); `trend_test` names the test."""
    r = np.asarray([np.nan if x is None else x for x in rewards], dtype=np.float64)
    x = np.arange(r.shape[0], dtype=np.float64)[np.isfinite(r)]
    y = r[np.isfinite(r)]
    n = y.shape[0]
    if n < 8:  # too few episodes for 4 blocks of 2: no trend to test (a short demo run)
        return {"slope": math.nan, "slope_se_hac": math.nan, "t_hac": math.nan, "hac_dof": 0, "p_hac": math.nan,
                "trend_test": f"none: {n} episodes are too few for a trend over blocks"}
    B = blocks or (4 if n < 50 else 5)  # more blocks give more df but raise the size at phi = 0.6 (EXPERIMENTS.md §1)
    _require(3 <= B <= n // 2, f"blocks={B} must be in 3..{n // 2}")
    xb = np.array([part.mean() for part in np.array_split(x, B)])
    yb = np.array([part.mean() for part in np.array_split(y, B)])
    xc = xb - xb.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (yb - yb.mean()) / sxx)
    resid = yb - yb.mean() - slope * xc
    dof = B - 2
    se = math.sqrt(float(resid @ resid) / dof / sxx)
    t = slope / se if se > 0 else math.nan
    return {"slope": slope, "slope_se_hac": se, "t_hac": t, "hac_dof": int(dof),
            "p_hac": float(2 * stats.t.sf(abs(t), dof)) if t == t else math.nan,
            "trend_test": f"t on the slope of {B} block means ({dof} df)"}
