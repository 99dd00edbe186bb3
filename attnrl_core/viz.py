"""Figures for runs and notebooks. Each `plot_*` draws on matplotlib axes and returns the figure;
`save_run_figures` writes a run's standard figures to `run_dir/figures/`. Reads run-directory files;
imports attnrl_core.files only.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.ticker import MaxNLocator

from .files import read_jsonl


def _series(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(episodes, values) for the episodes where `key` is not null."""
    rows = [(m["episode"], m[key]) for m in metrics if m.get(key) is not None]
    if not rows:
        return np.array([]), np.array([])
    ep, val = zip(*rows)
    return np.asarray(ep), np.asarray(val, dtype=float)


def _episode_axis(ax) -> None:
    """Episodes are whole numbers: no 1.25 or 1.5 ticks on a short run's axis."""
    ax.set_xlabel("episode")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _warmup_episodes(metrics: list[dict]) -> list[int]:
    """Episodes the filter spent in warm-up (no threshold yet: nothing could be selected)."""
    return [m["episode"] for m in metrics if m.get("threshold") is None]


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
    warm = _warmup_episodes(metrics)
    if warm:  # where "selected 0" means "not yet", not "nothing good enough"
        ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="grey", alpha=0.12, label="warm-up (nothing selected)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(ylabel="reward (nats per value token)", title="Reward: policy minus counterfactual value log-prob")
    _episode_axis(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# Every panel of the training figure: metric -> (title in words, unit).
TRAINING_PANELS = {
    "loss": ("Update loss", "per selected trajectory"),
    "policy_loss": ("REINFORCE term of the loss", "per selected trajectory"),
    "kl": ("KL penalty's divergence", "nats per trajectory"),
    "grad_norm": ("Gradient norm before clipping", "L2 norm"),
    "filter_fraction": ("Trajectories selected", "fraction of the batch"),
    "tokens_per_second": ("Throughput", "tokens / s"),
    "adapter_reward": ("Reward the adapter adds", "nats per value token"),
    "query_reward": ("Reward the query adds", "nats per value token"),
    "selection_entropy": ("Selection entropy", "entropy / log(pairs left)"),
    "selection_top_ratio": ("Most likely pair vs uniform", "probability x pairs left"),
    "key_cosine": ("Similarity of the pool's keys", "mean cosine"),
    "query_distinct": ("Variety of the queries", "distinct bigrams / all"),
}
UPDATE_METRICS = ("loss", "policy_loss", "kl", "grad_norm")


def plot_training_panels(metrics: list[dict], columns: int = 3):
    """Loss, policy loss, KL, gradient norm, filter fraction, throughput, the reward's adapter and query parts
    and the selection diagnostics per episode: `columns` panels a row, titles in words with their units, so
    the figure reads at page width."""
    rows = -(-len(TRAINING_PANELS) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
    in_warmup = bool(metrics) and all(m.get("threshold") is None for m in metrics)
    episodes = [m["episode"] for m in metrics]
    for ax, (key, (title, unit)) in zip(axes.flat, TRAINING_PANELS.items()):
        ep, val = _series(metrics, key)
        ax.plot(ep, val, "o-", ms=3, lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        _episode_axis(ax)
        if episodes:  # one episode axis for all: the update panels start after the warm-up, visibly
            ax.set_xlim(min(episodes) - 0.3, max(episodes) + 0.3)
        if not len(ep):
            why = "warm-up: nothing selected yet" if in_warmup and key in UPDATE_METRICS else "no value yet"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes.flat[len(TRAINING_PANELS):]:
        ax.axis("off")
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


# A fixed colour scale, so that two heat maps (two redraws, two queries) compare by eye; the square root
# spreads the small probabilities of many keys without hiding a peak.
PROBABILITY_NORM = dict(vmin=0.0, vmax=1.0, gamma=0.5)


def plot_head_heatmap(head_probs: np.ndarray, key_labels: list[str] | None = None, title: str = "",
                      heads: list[int] | None = None):
    """Per-head distributions [Hq, K] over keys with their mean (the selection distribution) below; `heads`
    picks the rows shown (labelled by their own numbers), the mean stays the mean over every head."""
    return plot_head_heatmaps([(head_probs, title)], key_labels, heads)


def plot_head_heatmaps(panels: list[tuple[np.ndarray, str]], key_labels: list[str] | None = None,
                       heads: list[int] | None = None):
    """Side by side, one panel per (head_probs [Hq, K], title) (e.g. two queries on one article), all on the
    same fixed colour scale (`PROBABILITY_NORM`)."""
    norm = PowerNorm(**PROBABILITY_NORM)
    first = np.asarray(panels[0][0])
    heads = list(range(first.shape[0])) if heads is None else list(heads)
    n_rows, n_keys = len(heads) + 1, first.shape[1]
    width = max(6.0, 0.45 * n_keys + 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(min(width * len(panels), 14), 0.35 * n_rows + 2.6),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, (probs, title) in zip(axes[0], panels):
        probs = np.asarray(probs)
        grid = np.vstack([probs[heads], probs.mean(axis=0, keepdims=True)])  # the mean is over all heads
        im = ax.imshow(grid, aspect="auto", cmap="magma", norm=norm)
        ax.set_yticks(range(n_rows), [f"head {h}" for h in heads] + ["mean of all"])
        ax.axhline(len(heads) - 0.5, color="white", lw=2)
        if key_labels is not None:
            ax.set_xticks(range(len(key_labels)), key_labels, rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("key (pair: first words)")
        ax.set_title(title or "Query-key probabilities per head", fontsize=9)
    bar = fig.colorbar(im, ax=axes[0].tolist(), label="probability (fixed 0-1, square-root scale)",
                       ticks=[0, 1 / n_keys, 0.25, 0.5, 1])
    bar.ax.set_yticklabels(["0", f"1/{n_keys} (uniform)", "0.25", "0.5", "1"])
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


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` to `path`, creating its folder (notebooks write into a run directory or an ignored folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# -- notebook figures ---------------------------------------------------------------------------------
def plot_length_histogram(lengths: list[int], thresholds: dict[str, int]):
    """Article lengths in tokens with the minimum-token filter of a few settings as vertical lines."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    # lengths span 10-20,000 tokens and the thresholds sit at a few hundred: on a linear axis they crowd at 0
    low = max(1, min(min(lengths), *thresholds.values()) / 1.5)
    ax.hist(lengths, bins=np.geomspace(low, max(max(lengths), *thresholds.values()) * 1.5, 30), color="tab:blue",
            alpha=0.7)
    ax.set_xscale("log")
    for (label, t), color in zip(thresholds.items(), plt.cm.autumn(np.linspace(0, 0.8, len(thresholds)))):
        ax.axvline(t, color=color, ls="--", label=f"{label} (≥ {t}): {sum(n >= t for n in lengths)}/{len(lengths)} pass")
    ax.set(xlabel="tokens per article (log scale)", ylabel="articles", title="Article length and the token filter")
    ax.legend(fontsize=8, loc="upper left")  # short articles are few: the left is where the bars are low
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
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for ax, (key, reference, label) in zip(axes.flat, panels):
        ep, val = _series(metrics, key)
        ax.plot(ep, val, "o-", ms=3, lw=1)
        if reference is not None:
            ax.axhline(reference, color="grey", ls="--", lw=1, label=label)
            ax.legend(fontsize=8)
        title, unit = TRAINING_PANELS[key]
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        _episode_axis(ax)
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


def plot_step_choice(record: dict, step: int):
    """The selection distribution over the pairs left at one step of a trajectory record, the chosen pair
    marked; beside it, when the run scored every pair (choice_target_weight > 0), the reward each would have
    earned."""
    s = record["steps"][step]
    probs = np.asarray(s["probs"], dtype=float)
    left = np.flatnonzero(probs > 0)
    candidates = s.get("candidate_rewards")
    fig, axes = plt.subplots(1, 2 if candidates else 1, figsize=(11 if candidates else 6, 3.4), squeeze=False)
    colors = ["tab:orange" if p == s["pair"] else "tab:blue" for p in left]
    labels = [str(p) for p in left]
    axes[0][0].bar(labels, probs[left], color=colors)
    axes[0][0].axhline(1 / len(left), color="grey", ls="--", lw=1, label="uniform")
    axes[0][0].set(xlabel="pair position (orange: chosen)", ylabel="selection probability",
                   title=f"step {step}: {len(left)} pair{'' if len(left) == 1 else 's'} left")
    axes[0][0].legend(fontsize=8)
    if candidates:
        rewards = [candidates[p] for p in left]
        axes[0][1].bar(labels, rewards, color=colors)
        axes[0][1].axhline(0, color="black", lw=0.5)
        axes[0][1].set(xlabel="pair position (orange: chosen)", ylabel="reward (nats per value token)",
                       title="reward each pair would have earned")
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


# one colour, marker and line per evaluation method in every panel (and a colour for the oracle's best pair, which
# is no method), so that a colour keeps its meaning across panels and equal curves stay visible side by side
METHOD_STYLE = {"trained": ("tab:blue", "o", "-"), "untrained": ("tab:orange", "s", "--"),
                "random": ("tab:grey", "^", ":"), "natural": ("tab:brown", "D", "-.")}
BEST_COLOR = "tab:purple"


def plot_evaluation(report: dict):
    """Held-out comparison: paired differences trained - baseline (reward and value log-prob, 95% CIs over
    articles; a baseline's colour, `METHOD_STYLE`), the per-step oracle fraction with its CI (random choice and
    chosen in the random and trained colours), and the value log-prob per step of every method (its own colour,
    marker and dash, offset sideways so that methods with equal values do not hide each other)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    paired = report.get("paired", {})
    names = list(paired)
    for offset, (key, marker) in enumerate((("reward", "o"), ("logprob", "s"))):
        means = np.array([paired[n]["mean"] if key == "reward" else paired[n]["logprob"]["mean"] for n in names])
        cis = np.array([paired[n]["ci"] if key == "reward" else paired[n]["logprob"]["ci"] for n in names]).reshape(-1, 2)
        y = np.arange(len(names)) + (offset - 0.5) * 0.3
        for k, n in enumerate(names):
            color = METHOD_STYLE.get(n.removeprefix("trained-"), ("black",))[0]
            axes[0].errorbar(means[k], y[k], xerr=[[means[k] - cis[k, 0]], [cis[k, 1] - means[k]]], fmt=marker,
                             color=color, mfc=color if key == "reward" else "white", capsize=4)
        axes[0].plot([], [], marker, color="black", mfc="black" if key == "reward" else "white", ls="none",
                     label="reward" if key == "reward" else "value log-prob")
    axes[0].axvline(0, color="black", lw=0.5)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set(title="paired difference (95% CI over articles)", xlabel="trained - baseline")
    axes[0].legend(fontsize=8)
    if "oracle" in report:
        o = report["oracle"]
        axes[1].bar(["random choice", "chosen (trained)", "best of\neach step"], [o["mean"], o["chosen"], o["best"]],
                    color=[METHOD_STYLE["random"][0], METHOD_STYLE["trained"][0], BEST_COLOR])
        axes[1].axhline(0, color="black", lw=0.5)
        lo, hi = o["ci"]
        axes[1].set(title=f"per-step oracle fraction {o['fraction']:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                    ylabel="mean reward per step")
    methods = report["methods"]
    for k, (m, r) in enumerate(methods.items()):
        steps = np.asarray(r["logprob_per_step"], dtype=float)
        color, marker, dash = METHOD_STYLE.get(m, ("black", "x", "-"))
        shift = (k - (len(methods) - 1) / 2) * 0.06
        axes[2].plot(np.arange(len(steps)) + shift, steps, marker=marker, ls=dash, color=color, mfc="none", label=m)
    axes[2].set(title="value log-prob per step", xlabel="step")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{report['checkpoint']} on {report['units']} held-out units of {report['articles']} articles x "
                 f"{report['samples_per_article']} samples")
    fig.tight_layout()
    return fig

