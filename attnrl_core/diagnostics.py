"""Selection diagnostics and paired statistics for evaluation: pure functions of tensors/arrays.

The selection diagnostics summarise how peaked the policy's distribution over keys is, how
similar the keys in a pool are and how varied the generated queries are; the paired
statistics give bootstrap intervals for per-unit comparisons between two methods, resampling
clusters (a unit's article) rather than units when units of one article are not independent;
the learning check's figures compare a run's first and last episodes and test its trend with an
autocorrelation-robust standard error. This
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


def paired_difference(a: np.ndarray, b: np.ndarray, num_samples: int = 2000, seed: int = 0,
                      clusters=None) -> dict:
    """Mean of a - b with a bootstrap CI (over `clusters` when given: see `bootstrap_ci`); a, b [U]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _require(a.shape == b.shape, f"a and b must have the same shape, got {a.shape} and {b.shape}")
    _require(a.ndim >= 1 and a.shape[0] > 0, "a and b are empty")
    diff = a - b
    lo, hi = bootstrap_ci(diff, num_samples=num_samples, seed=seed, clusters=clusters)
    return {"mean": float(diff.mean()), "ci": [lo, hi], "units": int(diff.shape[0]),
            "articles": int(diff.shape[0] if clusters is None else len(set(np.asarray(clusters).tolist())))}


def oracle_fraction(chosen: np.ndarray, mean: np.ndarray, best: np.ndarray,
                    num_samples: int = 2000, seed: int = 0, clusters=None) -> dict:
    """Σ(chosen - mean) / Σ(best - mean) over units [U], with a bootstrap CI (over `clusters` when given).

    0 = no better than a uniformly random choice, 1 = the per-step oracle; nan if Σ(best - mean) = 0.
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (chosen, mean, best)]
    chosen_a, mean_a, best_a = arrays
    _require(chosen_a.ndim == 1 and chosen_a.shape[0] > 0, "chosen must be a non-empty [U] array")
    _require(mean_a.shape == chosen_a.shape and best_a.shape == chosen_a.shape,
             "chosen, mean and best must have the same shape")
    gain = chosen_a - mean_a
    spread = best_a - mean_a
    # A ratio of sums rather than a mean of ratios: a unit whose spread is near 0 would
    # otherwise dominate with an arbitrarily large per-unit ratio.
    total = spread.sum()
    fraction = float(gain.sum() / total) if total != 0 else float("nan")
    weights = _cluster_weights(clusters, gain.shape[0], num_samples, seed)  # [S, U]
    num, den = weights @ gain, weights @ spread
    keep = den != 0
    ci = list(_percentile_ci(num[keep] / den[keep], 0.95)) if keep.any() else [math.nan, math.nan]
    return {"fraction": fraction, "ci": ci, "best": float(best_a.mean()),
            "mean": float(mean_a.mean()), "chosen": float(chosen_a.mean()), "units": int(gain.shape[0]),
            "articles": int(gain.shape[0] if clusters is None else len(set(np.asarray(clusters).tolist())))}


def articles_for_half_width(differences: np.ndarray, clusters, target: float = 0.01, level_z: float = 1.96) -> dict:
    """Power of a paired comparison: from per-unit differences [U] and their articles, the between-article
    SD of the per-article mean difference and how many articles (at the same windows and samples each) a
    95% half-width of `target` needs: n = (z * SD / target)^2. None when fewer than 2 articles."""
    d = np.asarray(differences, dtype=np.float64)
    labels = np.asarray(clusters)
    _require(d.ndim == 1 and labels.shape == d.shape, "differences and clusters must be [U] each")
    per_article = np.array([d[labels == c].mean() for c in np.unique(labels)])
    if per_article.size < 2:
        return {"between_article_sd": None, "articles_needed": None, "target_half_width": target}
    sd = float(per_article.std(ddof=1))
    return {"between_article_sd": sd, "articles_needed": max(2, int(math.ceil((level_z * sd / target) ** 2))),
            "target_half_width": target, "articles": int(per_article.size)}


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


def trend_hac(rewards) -> dict:
    """The reward's linear trend over episodes with an autocorrelation-robust standard error.

    A drifting policy makes neighbouring episodes' rewards correlated, so the first-vs-last z, which
    treats episodes as independent, is too large. This fits reward = a + slope * episode by least squares
    and estimates the slope's long-run variance with the equal-weighted cosine (EWC) estimator of Lazarus,
    Lewis, Stock and Watson (2018): B = ceil(0.4 n^(2/3)) cosine projections of the slope's score, whose
    t statistic is referred to a Student t distribution with B degrees of freedom. Its size is much nearer
    nominal than the independent-episodes z for persistent series, though still above it: in simulation at
    the 5% level it rejected 7-9% of uncorrelated and 9-12% of AR(1) (phi 0.6) runs of 60-100 episodes
    without trend, against 26-55% for |z| > 2 at phi 0.5-0.8. `rewards` [E] per episode, NaN where skipped (dropped). Returns the slope per
    episode, its SE, t_hac = slope / SE, the degrees of freedom and the two-sided p-value."""
    r = np.asarray([np.nan if x is None else x for x in rewards], dtype=np.float64)
    x = np.arange(r.shape[0], dtype=np.float64)[np.isfinite(r)]
    y = r[np.isfinite(r)]
    n = y.shape[0]
    _require(n >= 4, "fewer than 4 finite rewards: too few for a trend")
    xc = x - x.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (y - y.mean()) / sxx)
    score = xc * (y - y.mean() - slope * xc)  # [n] the slope's estimating-equation terms
    dof = min(n - 2, math.ceil(0.4 * n ** (2 / 3)))
    j = np.arange(1, dof + 1)[:, None]
    basis = math.sqrt(2.0 / n) * np.cos(math.pi * j * (np.arange(n)[None, :] + 0.5) / n)  # [B, n]
    long_run = float(((basis @ score) ** 2).mean())
    se = math.sqrt(n * long_run) / sxx
    t = slope / se if se > 0 else math.nan
    return {"slope": slope, "slope_se_hac": se, "t_hac": t, "hac_dof": int(dof),
            "p_hac": float(2 * stats.t.sf(abs(t), dof)) if t == t else math.nan}
