"""Selection diagnostics and paired statistics for evaluation: pure functions of tensors/arrays.

The selection diagnostics summarise how peaked the policy's distribution over keys is, how
similar the keys in a pool are and how varied the generated queries are; the paired
statistics give bootstrap intervals for per-unit comparisons between two methods. This
module imports nothing from attnrl_core, so it can be used on saved tensors or arrays
without loading a model or a configuration.
"""

from __future__ import annotations

import math

import numpy as np
import torch
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


def bootstrap_ci(values: np.ndarray, num_samples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of values [U] or [U, ...], resampling units."""
    arr = np.asarray(values, dtype=np.float64)
    _require(arr.ndim >= 1 and arr.shape[0] > 0, "values is empty")
    _require(0.0 < level < 1.0, f"level must be in (0, 1), got {level}")
    # Every unit has the same number of trailing entries, so averaging each unit first gives
    # the same resampled means while keeping memory at [num_samples, U].
    per_unit = arr.reshape(arr.shape[0], -1).mean(axis=1)
    means = per_unit[_resample_indices(per_unit.shape[0], num_samples, seed)].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired_difference(a: np.ndarray, b: np.ndarray, num_samples: int = 2000,
                      seed: int = 0) -> dict:
    """Mean of a - b with a bootstrap CI over units; a, b [U] with the same shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _require(a.shape == b.shape, f"a and b must have the same shape, got {a.shape} and {b.shape}")
    _require(a.ndim >= 1 and a.shape[0] > 0, "a and b are empty")
    diff = a - b
    lo, hi = bootstrap_ci(diff, num_samples=num_samples, seed=seed)
    return {"mean": float(diff.mean()), "ci": [lo, hi], "units": int(diff.shape[0])}


def oracle_fraction(chosen: np.ndarray, mean: np.ndarray, best: np.ndarray,
                    num_samples: int = 2000, seed: int = 0) -> dict:
    """Σ(chosen - mean) / Σ(best - mean) over units [U], with a bootstrap CI over units.

    0 = no better than a uniformly random choice, 1 = the oracle; nan if Σ(best - mean) = 0.
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
    idx = _resample_indices(gain.shape[0], num_samples, seed)
    num, den = gain[idx].sum(axis=1), spread[idx].sum(axis=1)
    keep = den != 0
    if keep.any():
        lo, hi = np.percentile(num[keep] / den[keep], [2.5, 97.5])
        ci = [float(lo), float(hi)]
    else:
        ci = [math.nan, math.nan]
    return {"fraction": fraction, "ci": ci, "best": float(best_a.mean()),
            "mean": float(mean_a.mean()), "chosen": float(chosen_a.mean())}


def learning_figure(rewards, window: int = 20) -> dict:
    """The overfit check's figure: mean batch reward of the last `window` episodes minus that of the first,
    its standard error (episodes as independent draws) and z = difference / SE. `rewards` [E] per episode,
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
            "z": diff / se if se > 0 else math.nan}
