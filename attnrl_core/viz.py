"""Figures for runs and notebooks. Each `plot_*` draws on matplotlib axes and returns the figure;
`save_run_figures` writes a run's standard figures to `run_dir/figures/`. Reads run-directory files;
imports attnrl_core.run only for `read_jsonl`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def _series(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(episodes, values) for the episodes where `key` is not null."""
    rows = [(m["episode"], m[key]) for m in metrics if m.get(key) is not None]
    if not rows:
        return np.array([]), np.array([])
    ep, val = zip(*rows)
    return np.asarray(ep), np.asarray(val, dtype=float)


def plot_reward_curve(metrics: list[dict], ax=None):
    """Batch-mean reward per episode, running mean ± 1 SD band, and the selection threshold."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4))
    ep, reward = _series(metrics, "reward")
    _, std = _series(metrics, "reward_std")
    _, mean = _series(metrics, "running_mean")
    _, sd = _series(metrics, "running_std")
    ax.fill_between(ep, mean - sd, mean + sd, color="tab:blue", alpha=0.15, label="running mean ± SD")
    ax.plot(ep, mean, color="tab:blue", lw=1)
    ax.errorbar(ep, reward, yerr=std, fmt="o-", ms=3, lw=1, color="tab:orange", alpha=0.9,
                label="batch reward (± batch SD)")
    t_ep, thr = _series(metrics, "threshold")
    if len(t_ep):
        ax.plot(t_ep, thr, "--", color="tab:red", lw=1, label="selection threshold")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="episode", ylabel="reward (Δ mean value log-prob)", title="Reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training_panels(metrics: list[dict]):
    """Loss, policy loss, KL, gradient norm and filter fraction per episode."""
    keys = ["loss", "policy_loss", "kl", "grad_norm", "filter_fraction", "tokens_per_second"]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    for ax, key in zip(axes.flat, keys):
        ep, val = _series(metrics, key)
        ax.plot(ep, val, "o-", ms=3, lw=1)
        ax.set(title=key, xlabel="episode")
        if not len(ep):
            ax.text(0.5, 0.5, "no update yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return fig


def plot_similarity_distribution(trajectories: list[dict], num_kv_pairs: int | None = None):
    """Left: probability of the chosen pair against a uniform choice. Right: mean probability per
    pair position (article order) at each step, over all logged trajectories."""
    chosen, uniform, rows = [], [], {}
    for traj in trajectories:
        for step in traj["steps"]:
            probs = np.asarray(step["probs"])
            chosen.append(step["prob"])
            uniform.append(1.0 / max(int((probs > 0).sum()), 1))
            rows.setdefault(step["step"], []).append(probs)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if not chosen:
        a.text(0.5, 0.5, "no trajectories", ha="center", transform=a.transAxes)
        return fig
    bins = np.linspace(0, 1, 26)
    a.hist(chosen, bins=bins, alpha=0.7, label="chosen pair")
    a.hist(uniform, bins=bins, alpha=0.5, label="uniform over pool")
    a.set(xlabel="probability", ylabel="steps", title="Selection probabilities")
    a.legend(fontsize=8)
    heat = np.stack([np.mean(rows[s], axis=0) for s in sorted(rows)])  # [steps, N]
    im = b.imshow(heat, aspect="auto", cmap="viridis")
    b.set(xlabel="pair position in article", ylabel="step", title="Mean selection probability")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    return fig


def plot_head_heatmap(head_probs: np.ndarray, key_labels: list[str] | None = None, title: str = ""):
    """Per-head distributions [Hq, K] over keys with their mean (the selection distribution) below."""
    head_probs = np.asarray(head_probs)
    grid = np.vstack([head_probs, head_probs.mean(axis=0, keepdims=True)])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * grid.shape[1] + 2), 0.35 * grid.shape[0] + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_yticks(range(grid.shape[0]), [f"head {h}" for h in range(head_probs.shape[0])] + ["mean"])
    ax.axhline(head_probs.shape[0] - 0.5, color="white", lw=2)
    if key_labels is not None:
        ax.set_xticks(range(len(key_labels)), key_labels, rotation=60, ha="right", fontsize=7)
    ax.set(xlabel="key", title=title or "Query-key probabilities per head")
    fig.colorbar(im, ax=ax, label="probability")
    fig.tight_layout()
    return fig


def save_run_figures(run_dir: str | Path) -> list[Path]:
    """Write reward_curve.png, training_panels.png and similarity_distribution.png into run_dir/figures/."""
    from .run import read_jsonl

    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    trajectories = read_jsonl(run_dir / "trajectories.jsonl")
    written = []
    for name, fig in (("reward_curve", plot_reward_curve(metrics)), ("training_panels", plot_training_panels(metrics)),
                      ("similarity_distribution", plot_similarity_distribution(trajectories))):
        path = fig_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
