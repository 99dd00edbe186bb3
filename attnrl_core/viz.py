"""Figures for runs and notebooks. Each `plot_*` draws on matplotlib axes and returns the figure;
`save_run_figures` writes a run's standard figures to `run_dir/figures/`. Reads run-directory files;
imports attnrl_core.files only.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .files import read_jsonl


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
    """Loss, policy loss, KL, gradient norm, filter fraction, throughput, the reward's adapter and query parts
    and the selection diagnostics per episode."""
    keys = ["loss", "policy_loss", "kl", "grad_norm", "filter_fraction", "tokens_per_second", "adapter_reward",
            "query_reward", "selection_entropy", "selection_top_ratio", "key_cosine", "query_distinct"]
    fig, axes = plt.subplots(2, 6, figsize=(20, 5.5))
    for ax, key in zip(axes.flat, keys):
        ep, val = _series(metrics, key)
        ax.plot(ep, val, "o-", ms=3, lw=1)
        ax.set(title=key, xlabel="episode")
        if not len(ep):
            ax.text(0.5, 0.5, "no value yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return fig


def plot_similarity_distribution(trajectories: list[dict]):
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
    a.hist(uniform, bins=bins, alpha=0.5, label="uniform over the pairs left (1 at the last step)")
    a.set(xlabel="probability", ylabel="steps", title="Selection probabilities")
    a.legend(fontsize=8)
    heat = np.stack([np.mean(rows[s], axis=0) for s in sorted(rows)])  # [steps, N]
    im = b.imshow(heat, aspect="auto", cmap="viridis")
    b.set(xlabel="pair position in article", ylabel="step", title="Mean selection probability")
    b.set_xticks(range(heat.shape[1]))
    b.set_yticks(range(heat.shape[0]))
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


# -- notebook figures ---------------------------------------------------------------------------------
def plot_length_histogram(lengths: list[int], thresholds: dict[str, int]):
    """Article lengths in tokens with the minimum-token filter of a few settings as vertical lines."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=30, color="tab:blue", alpha=0.7)
    for (label, t), color in zip(thresholds.items(), plt.cm.autumn(np.linspace(0, 0.8, len(thresholds)))):
        ax.axvline(t, color=color, ls="--", label=f"{label}: {sum(n >= t for n in lengths)}/{len(lengths)} pass")
    ax.set(xlabel="tokens per article", ylabel="articles", title="Article length and the token filter")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_selected_vs_rejected(trajectories: list[dict]):
    """Reward distributions of trajectories the filter selected and rejected."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sel = [t["reward"] for t in trajectories if t["selected"]]
    rej = [t["reward"] for t in trajectories if not t["selected"]]
    bins = np.linspace(min(sel + rej), max(sel + rej), 25) if sel + rej else 10
    ax.hist(rej, bins=bins, alpha=0.6, label=f"rejected ({len(rej)})")
    ax.hist(sel, bins=bins, alpha=0.8, label=f"selected ({len(sel)})")
    ax.set(xlabel="trajectory reward", ylabel="trajectories", title="Selected vs rejected")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_position_step_heatmap(trajectories: list[dict], num_kv_pairs: int, episodes: tuple[int, int] | None = None):
    """How often each pair position (article order) is chosen at each step: what the policy picks first."""
    rows = [t for t in trajectories if episodes is None or episodes[0] <= t["episode"] <= episodes[1]]
    steps = max((len(t["steps"]) for t in rows), default=1)
    counts = np.zeros((steps, num_kv_pairs))
    for t in rows:
        for s in t["steps"]:
            counts[s["step"], s["pair"]] += 1
    freq = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 0.5 * steps + 2))
    im = ax.imshow(freq, aspect="auto", cmap="viridis")
    ax.set(xlabel="pair position in article", ylabel="step",
           title="Chosen position per step" + (f" (episodes {episodes[0]}-{episodes[1]})" if episodes else ""))
    ax.set_xticks(range(num_kv_pairs))
    ax.set_yticks(range(steps))
    fig.colorbar(im, ax=ax, label="fraction of trajectories")
    fig.tight_layout()
    return fig


def plot_selection_diagnostics(metrics: list[dict]):
    """The four selection diagnostics per episode, each against the value that means "no steering"."""
    panels = (("selection_entropy", 1.0, "1 = uniform"), ("selection_top_ratio", 1.0, "1 = uniform"),
              ("key_cosine", None, ""), ("query_distinct", None, ""))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    for ax, (key, reference, label) in zip(axes, panels):
        ep, val = _series(metrics, key)
        ax.plot(ep, val, "o-", ms=3, lw=1)
        if reference is not None:
            ax.axhline(reference, color="grey", ls="--", lw=1, label=label)
            ax.legend(fontsize=8)
        ax.set(title=key, xlabel="episode")
    fig.tight_layout()
    return fig


def plot_chosen_position_histogram(trajectories: list[dict], num_kv_pairs: int):
    """For each step, how often each pair position (article order) was chosen over the whole run: a policy
    that steers shows peaks; one that does not, the pool's flat spread."""
    steps = max((len(t["steps"]) for t in trajectories), default=1)
    counts = np.zeros((steps, num_kv_pairs))
    for t in trajectories:
        for s in t["steps"]:
            counts[s["step"], s["pair"]] += 1
    fig, axes = plt.subplots(1, steps, figsize=(3.2 * steps, 3), sharey=True, squeeze=False)
    for step, ax in enumerate(axes[0]):
        ax.bar(range(num_kv_pairs), counts[step], color="tab:blue")
        ax.set(title=f"step {step}", xlabel="pair position")
        ax.set_xticks(range(num_kv_pairs))
    axes[0][0].set_ylabel("times chosen")
    fig.tight_layout()
    return fig


def plot_logprob_per_step(trajectories: list[dict]):
    """Mean value log-prob per step: the policy after its query vs the base model after its counterfactual."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for t in trajectories:
        for s in t["steps"]:
            by_step.setdefault(s["step"], []).append((s["policy_logprob"], s["base_logprob"]))
    steps = sorted(by_step)
    pol = [np.mean([p for p, _ in by_step[s]]) for s in steps]
    base = [np.mean([b for _, b in by_step[s]]) for s in steps]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, pol, "o-", label="policy (its query)")
    ax.plot(steps, base, "s--", label="base (counterfactual query)")
    ax.set(xlabel="step", ylabel="mean value log-prob", title="Policy vs counterfactual per step")
    ax.set_xticks(steps)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_evaluation(report: dict):
    """Held-out comparison: paired differences trained - baseline (reward and value log-prob, 95% CIs over
    articles), the per-step oracle fraction with its CI, and the value log-prob per step of every method."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    paired = report.get("paired", {})
    names = list(paired)
    for offset, (key, color) in enumerate((("reward", "tab:green"), ("logprob", "tab:blue"))):
        means = np.array([paired[n]["mean"] if key == "reward" else paired[n]["logprob"]["mean"] for n in names])
        cis = np.array([paired[n]["ci"] if key == "reward" else paired[n]["logprob"]["ci"] for n in names]).reshape(-1, 2)
        y = np.arange(len(names)) + (offset - 0.5) * 0.3
        axes[0].errorbar(means, y, xerr=[means - cis[:, 0], cis[:, 1] - means], fmt="o", color=color, capsize=4,
                         label="reward" if key == "reward" else "value log-prob")
    axes[0].axvline(0, color="black", lw=0.5)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set(title="paired difference (95% CI over articles)", xlabel="trained - baseline")
    axes[0].legend(fontsize=8)
    if "oracle" in report:
        o = report["oracle"]
        axes[1].bar(["random choice", "chosen", "best of\neach step"], [o["mean"], o["chosen"], o["best"]],
                    color=["tab:grey", "tab:green", "tab:purple"])
        axes[1].axhline(0, color="black", lw=0.5)
        lo, hi = o["ci"]
        axes[1].set(title=f"per-step oracle fraction {o['fraction']:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                    ylabel="mean reward per step")
    for m, r in report["methods"].items():
        steps = r["logprob_per_step"]
        axes[2].plot(range(len(steps)), steps, "o-", label=m)
    axes[2].set(title="value log-prob per step", xlabel="step")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{report['checkpoint']} on {report['units']} held-out units of {report['articles']} articles x "
                 f"{report['samples_per_article']} samples")
    fig.tight_layout()
    return fig

