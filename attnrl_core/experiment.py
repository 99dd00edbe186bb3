"""A multi-seed experiment: arms x seeds of training runs, each final checkpoint evaluated, then aggregated.

An experiment file (YAML) names the settings every run shares (`base`), the arms (each a set of
TrainConfig fields on top of it), the seeds and the evaluation's sizes:

  base: {preset: embedded, num_kv_pairs: 16, num_episodes: 30, num_threads: 1}
  arms: {spec: {}, levers: {learning_rate: 1.0e-3, kl_reference: base}}
  seeds: [0, 1, 2]
  evaluate: {num_articles: 16, samples_per_article: 2}

`run_experiment` trains every (arm, seed) as its own `python -m attnrl_core train` process, up to
`parallel` at once (each with its share of the cores, `num_threads`), resumes a run cut short, skips one
already finished, evaluates each final checkpoint once (`evaluate --json`), and writes `summary.json`
and figures. Runs are subprocesses so one failing, or being killed, never takes the others down.
Imports attnrl_core.config, .diagnostics, .files and .rundir.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import yaml
from tqdm.auto import tqdm

from .config import TrainConfig
from .diagnostics import learning_figure
from .files import atomic_write_text, read_jsonl
from .rundir import load_run

FINAL_WINDOW = 10  # episodes averaged for a run's "final reward"


def load_experiment(path: str | Path) -> dict:
    """The experiment file, checked: every arm's config must be valid before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"experiment file {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("arms"), dict) or not spec.get("seeds"):
        raise ValueError(f"{path} needs `arms` (a mapping of name to fields) and `seeds` (a list)")
    spec.setdefault("base", {})
    spec.setdefault("evaluate", {})
    for arm in spec["arms"]:
        run_config(spec, arm, spec["seeds"][0], Path("unused"))  # raises on an invalid field
    return spec


def run_config(spec: dict, arm: str, seed: int, out: Path) -> TrainConfig:
    fields = {**spec["base"], **(spec["arms"][arm] or {}), "seed": seed, "output_dir": str(out)}
    return TrainConfig.from_preset(fields.pop("preset", "embedded"), **fields)


def _finished(run_dir: Path, cfg: TrainConfig) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and len(read_jsonl(metrics)) >= cfg.num_episodes and \
        (run_dir / "checkpoints" / f"episode-{cfg.num_episodes}").is_dir()


def _train(run_dir: Path, cfg: TrainConfig) -> str:
    """Train (or resume, or skip) one run in its own process; returns what was done."""
    if _finished(run_dir, cfg):
        return "skipped (finished)"
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if resume:
        args = ["train", "--resume", "--output_dir", str(run_dir)]
    else:
        if run_dir.exists():  # started but killed before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        config_file = run_dir.parent / f".{run_dir.name}.json"
        atomic_write_text(config_file, json.dumps(cfg.to_dict()))
        args = ["train", "--config", str(config_file)]
    _cli(run_dir, [*args, "--no_progress"], "training")
    return "resumed" if resume else "trained"


def _cli(run_dir: Path, args: list[str], doing: str) -> None:
    """`python -m attnrl_core ARGS` in its own process, its output appended to the run's log."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "a") as sink:
        code = subprocess.call([sys.executable, "-m", "attnrl_core", *args], stdout=sink, stderr=sink)
    if code != 0:
        raise RuntimeError(f"{doing} {run_dir} failed (exit {code}): see {log}")


def _evaluate(run_dir: Path, cfg: TrainConfig, options: dict) -> dict:
    report_file = run_dir / "eval" / f"episode-{cfg.num_episodes}.json"
    if not report_file.is_file():
        args = ["evaluate", "--run_dir", str(run_dir), "--checkpoint", str(cfg.num_episodes), "--json"]
        for key, value in options.items():
            args += [f"--{key}", str(value)]
        _cli(run_dir, args, "evaluating")
    return json.loads(report_file.read_text())


def run_experiment(path: str | Path, out: str | Path | None = None, parallel: int = 2) -> dict:
    """Every (arm, seed) trained and evaluated (skipping what is done), then `summarize`d into OUT/summary.json."""
    spec = load_experiment(path)
    out = Path(out or Path("runs") / "experiments" / Path(path).stem)
    jobs = [(arm, seed) for arm in spec["arms"] for seed in spec["seeds"]]
    bar = tqdm(total=len(jobs), desc=f"{Path(path).stem}: runs trained and evaluated")

    def one(job):
        arm, seed = job
        run_dir = out / f"{arm}-s{seed}"
        cfg = run_config(spec, arm, seed, run_dir)
        t0 = time.perf_counter()
        done = _train(run_dir, cfg)
        _evaluate(run_dir, cfg, spec["evaluate"])
        bar.write(f"{run_dir.name}: {done}, evaluated ({time.perf_counter() - t0:.0f}s)")
        bar.update()

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for _ in pool.map(one, jobs):
            pass
    bar.close()
    summary = summarize(out, spec)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    fig = plot_experiment(summary)
    fig.savefig(out / "experiment.png", dpi=120, bbox_inches="tight")
    return summary


def summarize(out: Path, spec: dict) -> dict:
    """Per arm and seed: curves, the final reward, the overfit figure and the evaluation; per arm the mean
    and SD over seeds; and the arms paired by seed (arm - first arm) on the final reward."""
    arms: dict = {}
    for arm in spec["arms"]:
        runs = []
        for seed in spec["seeds"]:
            cfg, metrics, _ = load_run(out / f"{arm}-s{seed}")
            report = json.loads((out / f"{arm}-s{seed}" / "eval" / f"episode-{cfg.num_episodes}.json").read_text())
            rewards = [m["reward"] for m in metrics]
            window = min(20, len(rewards) // 2)
            runs.append({"seed": seed, "reward": rewards,
                         "selection_entropy": [m["selection_entropy"] for m in metrics],
                         "adapter_reward": [m.get("adapter_reward") for m in metrics],
                         "query_reward": [m.get("query_reward") for m in metrics],
                         "final_reward": _mean(rewards[-FINAL_WINDOW:]),
                         "learning": learning_figure(rewards, window) if window >= 2 else None,
                         "paired": report["paired"], "oracle": report["oracle"], "units": report["units"],
                         "eval_selection_entropy": report["selection_entropy"]})
        finals = np.array([r["final_reward"] for r in runs])
        arms[arm] = {"fields": spec["arms"][arm] or {}, "runs": runs, "final_reward_mean": float(finals.mean()),
                     "final_reward_sd": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0}
    first = next(iter(arms))
    for arm, a in arms.items():
        if arm != first:
            diff = np.array([r["final_reward"] for r in a["runs"]]) - \
                np.array([r["final_reward"] for r in arms[first]["runs"]])
            a[f"vs_{first}"] = {"mean": float(diff.mean()), "per_seed": diff.tolist(),
                                "sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0}
    return {"base": spec["base"], "seeds": spec["seeds"], "final_window": FINAL_WINDOW, "arms": arms}


def _mean(values: list) -> float:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else float("nan")


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def format_summary(summary: dict) -> str:
    """The experiment's table: per arm and seed the final reward, the overfit z, the paired evaluation and the
    oracle fraction."""
    ci = "[{:+.3f}, {:+.3f}]".format
    lines = [f"{'arm':10s} {'seed':>4s} {'final reward':>12s} {'z (last-first)':>14s} {'trained-random':>26s} "
             f"{'trained-untrained':>26s} {'oracle fraction':>24s} {'entropy':>7s}"]
    for arm, a in summary["arms"].items():
        for r in a["runs"]:
            p, o = r["paired"], r["oracle"]
            z = "n/a" if r["learning"] is None else f"{r['learning']['z']:+.2f}"
            lines.append(f"{arm:10s} {r['seed']:4d} {r['final_reward']:+12.4f} {z:>14s} "
                         f"{p['trained-random']['mean']:+8.4f} {ci(*p['trained-random']['ci']):>17s} "
                         f"{p['trained-untrained']['mean']:+8.4f} {ci(*p['trained-untrained']['ci']):>17s} "
                         f"{_num(o['fraction'], '+7.3f')} {ci(*o['ci']):>16s} "
                         f"{_num(r['eval_selection_entropy']['trained'], '7.3f')}")
        extra = "".join(f"; {k} {v['mean']:+.4f} (per seed {', '.join(f'{x:+.4f}' for x in v['per_seed'])})"
                        for k, v in a.items() if k.startswith("vs_"))
        lines.append(f"{arm:10s} mean final reward {a['final_reward_mean']:+.4f} ± {a['final_reward_sd']:.4f} "
                     f"(SD over seeds){extra}")
    return "\n".join(lines)


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over `k` episodes (fewer at the start), NaN-aware."""
    out = np.full(x.shape, np.nan)
    for i in range(x.shape[-1]):
        window = x[..., max(0, i - k + 1):i + 1]
        out[..., i] = np.nanmean(window, axis=-1)
    return out


def plot_experiment(summary: dict, smooth: int = 10):
    """An experiment's curves, mean ± SD over seeds per arm: the batch reward, its split into the adapter's and
    the query's parts, and the selection entropy (each a trailing mean over `smooth` episodes)."""
    panels = [("reward", "batch reward"), ("adapter_reward", "adapter part of the reward"),
              ("query_reward", "query part of the reward"), ("selection_entropy", "selection entropy (1 = uniform)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3))
    for ax, (key, title) in zip(axes, panels):
        for arm, a in summary["arms"].items():
            curves = np.array([[np.nan if v is None else v for v in r[key]] for r in a["runs"]], dtype=float)
            curves = _smooth(curves, smooth)
            mean, sd = np.nanmean(curves, axis=0), np.nanstd(curves, axis=0)
            episodes = np.arange(1, curves.shape[1] + 1)
            runs = len(a["runs"])
            ax.plot(episodes, mean, label=f"{arm} ({runs} seed{'s' if runs > 1 else ''})")
            if runs > 1:
                ax.fill_between(episodes, mean - sd, mean + sd, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("episode")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
