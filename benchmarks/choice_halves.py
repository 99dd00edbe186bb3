"""Issue 25's overfit-check table (EXPERIMENTS.md §6): for each run directory, the training batch's selection
entropy, per-step oracle fraction, choice KL and reward over its first 20 episodes against its last 20 (halves
when shorter), with a Welch t 95% interval over episodes of last - first.
Usage: python benchmarks/choice_halves.py RUN_DIR [RUN_DIR ...]"""
import json, sys, numpy as np
from scipy import stats
def ci(a, b):
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    d = b.mean() - a.mean(); se = np.sqrt(a.var(ddof=1)/len(a) + b.var(ddof=1)/len(b))
    df = se**4 / ((a.var(ddof=1)/len(a))**2/(len(a)-1) + (b.var(ddof=1)/len(b))**2/(len(b)-1))
    h = stats.t.ppf(0.975, df) * se
    return f"{a.mean():.3f} -> {b.mean():.3f}, last - first {d:+.3f} [{d-h:+.3f}, {d+h:+.3f}]"
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path + "/metrics.jsonl")]
    n = len(rows); half = min(20, n // 2)
    get = lambda k: np.array([np.nan if r.get(k) is None else r[k] for r in rows], dtype=float)
    print(f"{path} ({n} episodes; first {half} vs last {min(20, n - half)})")
    for k in ("selection_entropy", "oracle_fraction", "choice_kl", "reward"):
        v = get(k); print(f"  {k:18s} {ci(v[:half], v[max(half, n - 20):])}")
