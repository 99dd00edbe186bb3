"""Issue 25's overfit-check table (EXPERIMENTS.md §6): for each run directory, the training batch's selection
entropy, per-step oracle fraction (of the reward, and of the objective's own target), choice KL and reward over
its first 20 episodes against its last 20 (halves when shorter), with a Welch t 95% interval over episodes of
last - first; the hindsight NLL too where it was logged (issue 39), and the last window's oracle fraction with its t
95% interval over episodes (the overfit check's criterion: above 0 over the last 20 episodes); the batch reward's two parts
(adapter: policy - base after the policy's query; query: base after the policy's query - after the counterfactual),
the trajectories the filter selected and the optimizer steps. With several runs (seeds on different articles, so
no shared units), their last-20 oracle fractions pooled: a t over all those episodes, which treats them as
independent (so if anything too narrow), with the smallest effect it detects at 80% power.
Usage: python research/choice_halves.py RUN_DIR [RUN_DIR ...]"""
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from attnrl_core.diagnostics import power_analysis
from attnrl_core.experiment import t_interval
from attnrl_core.files import read_jsonl


def welch(first: np.ndarray, last: np.ndarray) -> str:
    """Both means and last - first with its Welch t 95% interval (NaN episodes left out)."""
    a, b = first[~np.isnan(first)], last[~np.isnan(last)]
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    d, h = b.mean() - a.mean(), stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    return f"{a.mean():.3f} -> {b.mean():.3f}, last - first {d:+.3f} [{d - h:+.3f}, {d + h:+.3f}]"


def series(rows: list[dict], key: str) -> np.ndarray:
    """One metric over a run's episodes, NaN where it was not logged."""
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def main(paths: list[str]) -> None:
    pooled = []
    for path in paths:
        rows = read_jsonl(Path(path) / "metrics.jsonl")
        n = len(rows)
        half = min(20, n // 2)
        print(f"{path} ({n} episodes; first {half} vs last {min(20, n - half)})")
        for key in ("selection_entropy", "oracle_fraction", "target_oracle_fraction", "choice_kl", "hindsight_nll",
                    "hindsight_nll_last", "reward", "adapter_reward", "query_reward", "selected", "optimizer_steps"):
            v = series(rows, key)
            if all(r.get(key) is None for r in rows):  # runs before target_oracle_fraction was logged
                continue
            print(f"  {key:22s} {welch(v[:half], v[max(half, n - 20):])}")
        last = t_interval([r.get("oracle_fraction") for r in rows[max(half, n - 20):]])
        if last["ci"] is not None:
            lo, hi = last["ci"]
            print(f"  oracle_fraction over the last {last['n']}: {last['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
                  f"detectable at 80% power {detectable(last):+.3f}; "
                  f"episodes the filter selected none: first {sum(r['selected'] == 0 for r in rows[:half])}, "
                  f"last {sum(r['selected'] == 0 for r in rows[max(half, n - 20):])}")
            pooled += last["values"]
    if len(paths) > 1:
        both = t_interval(pooled)
        lo, hi = both["ci"]
        print(f"pooled last-20 oracle_fraction of the {len(paths)} runs ({both['n']} episodes): {both['mean']:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}], SD {both['sd']:.3f}, detectable at 80% power {detectable(both):+.3f}")


def detectable(interval: dict) -> float:
    """The smallest mean a `t_interval` over n episodes detects at 80% power (`power_analysis`, n - 1 df)."""
    n = interval["n"]
    return power_analysis({"se": interval["sd"] / np.sqrt(n), "df": n - 1, "articles": n})["minimum_detectable_effect"]


if __name__ == "__main__":
    main(sys.argv[1:])
