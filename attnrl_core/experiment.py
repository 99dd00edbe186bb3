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
and figures. The statistics are computed here, not by hand, from the per-unit values every report keeps. Every
seed is scored on the same held-out units with common random numbers, so seeds share most of their sampling
error and are not independent replicates: per arm each held-out figure averages the seeds per unit and takes a
cluster-robust t over the articles (`diagnostics.paired_difference` / `oracle_fraction`), with a joint
bootstrap over seeds and articles beside it as the conservative check; arm pairs are the same on the per-unit
difference of the arms' seed averages (the oracle fractions' difference by `fraction_difference`), and trained -
random's power is given per run, per arm and per pair. Only the figures without units (final training reward, held-out
selection entropy) keep a t over seeds. Each interval says what it rests on; `format_summary(...,
markdown=True)` prints EXPERIMENTS.md's tables. Runs are subprocesses so one failing, or being killed, never takes the others down.
Imports attnrl_core.config, .diagnostics and .files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import yaml
from scipy import stats
from tqdm.auto import tqdm

from .config import TrainConfig
from .diagnostics import _cluster_weights, _percentile_ci, fraction_difference, learning_figure, oracle_fraction, \
    paired_difference, power_analysis
from .files import atomic_write_text, read_jsonl

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
    """Trained to the end: every episode's metrics and the final checkpoint, or (a kept run, slimmed to what its
    tables need) every episode's metrics and the final checkpoint's evaluation report."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and len(read_jsonl(metrics)) >= cfg.num_episodes and (
        (run_dir / "checkpoints" / f"episode-{cfg.num_episodes}").is_dir()
        or (run_dir / "eval" / f"episode-{cfg.num_episodes}.json").is_file())


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
    if not _finished(run_dir, cfg):
        # `train` stopped by SIGINT/SIGTERM checkpoints and exits 0; without this the final checkpoint's
        # evaluation would fail with a missing-checkpoint error that hides why.
        raise RuntimeError(f"training {run_dir} stopped before episode {cfg.num_episodes} (a signal sent to it): "
                           "run the experiment again to resume it")
    return "resumed" if resume else "trained"


def _cli(run_dir: Path, args: list[str], doing: str) -> None:
    """`python -m attnrl_core ARGS` in its own process, its output appended to the run's log."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "a") as sink:
        code = subprocess.call([sys.executable, "-m", "attnrl_core", *args], stdout=sink, stderr=sink)
    if code != 0:
        raise RuntimeError(f"{doing} {run_dir} failed (exit {code}): see {log}")


def _stale(report_file: Path, options: dict) -> bool:
    """A report to redo: missing, written before per-unit values and article-level intervals existed, or made
    with other evaluation options than the experiment's (its seeds and arms must share their units)."""
    if not report_file.is_file():
        return True
    report = json.loads(report_file.read_text())
    return "per_unit" not in report or any(key in report and report[key] != value for key, value in options.items())


def _evaluate(run_dir: Path, cfg: TrainConfig, options: dict) -> dict:
    report_file = run_dir / "eval" / f"episode-{cfg.num_episodes}.json"
    if _stale(report_file, options):
        args = ["evaluate", "--run_dir", str(run_dir), "--checkpoint", str(cfg.num_episodes), "--json",
                "--no_progress"]
        for key, value in options.items():
            args += [f"--{key}", str(value)]
        _cli(run_dir, args, "evaluating")
    return json.loads(report_file.read_text())


def experiment_dir(path: str | Path, out: str | Path | None = None) -> Path:
    """Where an experiment file's runs go: `out`, or runs/experiments/NAME."""
    return Path(out or Path("runs") / "experiments" / Path(path).stem)


def run_experiment(path: str | Path, out: str | Path | None = None, parallel: int = 2) -> dict:
    """Every (arm, seed) trained and evaluated (skipping what is done), then `summarize`d into OUT/summary.json,
    its figure OUT/experiment.png."""
    spec = load_experiment(path)
    out = experiment_dir(path, out)
    # Seed by seed, every arm of a seed before the next seed: a cut experiment then leaves whole seeds, which
    # are what the paired-by-seed comparisons need.
    jobs = [(arm, seed) for seed in spec["seeds"] for arm in spec["arms"]]
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
    save_figure(summary, out / "experiment.png")
    return summary


def save_figure(summary: dict, path: str | Path) -> None:
    """`plot_experiment(summary)` written to `path` (PNG)."""
    fig = plot_experiment(summary)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)  # else a notebook that draws the summary itself shows this figure a second time


# Held-out figures from the per-unit values of a report: name -> (method, baseline) of a paired difference.
PAIRED = {"trained-random": ("trained", "random"), "trained-untrained": ("trained", "untrained"),
          "trained-natural": ("trained", "natural")}
# Figures without units, one value per run: name -> how to read it from a run's summary entry (a t over seeds).
PER_RUN = {"final_reward": lambda r: r["final_reward"],
           "heldout_selection_entropy": lambda r: r["eval_selection_entropy"]["trained"]}
FIGURES = ("final_reward", *PAIRED, "oracle_fraction", "heldout_selection_entropy")
POWER_TARGETS = (0.01, 0.02)


def t_interval(values, level: float = 0.95) -> dict:
    """Mean of per-seed values with a Student t interval over seeds (n - 1 degrees of freedom), for the figures that
    have no units (a run's final training reward). The interval is None with fewer than 2 finite values."""
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    x = x[np.isfinite(x)]
    out = {"mean": float(x.mean()) if x.size else None, "ci": None, "n": int(x.size), "values": x.tolist(),
           "rests_on": f"t over {x.size} seeds"}
    if x.size >= 2:
        half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
        out.update(ci=[out["mean"] - half, out["mean"] + half], sd=float(x.std(ddof=1)))
    return out


def _unit_values(report: dict) -> dict:
    """[U] arrays of a report's per-unit values: each paired figure's difference and the oracle's three sums."""
    units = report["per_unit"]
    out = {name: np.asarray(units[a]["reward"]) - np.asarray(units[b]["reward"]) for name, (a, b) in PAIRED.items()}
    out.update({f"oracle_{k}": np.asarray(units["oracle"][k]) for k in ("chosen", "mean", "best")})
    return out


def joint_bootstrap(per_seed: np.ndarray, articles: list[str], num_samples: int = 2000, seed: int = 0) -> list[float]:
    """The conservative check: a percentile interval of the mean of per_seed [S, U] resampling seeds and articles
    together (seeds and articles each drawn with replacement, every unit of a drawn article with it)."""
    S, U = per_seed.shape
    unit_w = _cluster_weights(articles, U, num_samples, seed)  # [R, U]
    seed_w = np.zeros((num_samples, S))
    draws = np.random.default_rng(seed + 1).integers(0, S, (num_samples, S))
    np.add.at(seed_w, (np.arange(num_samples)[:, None], draws), 1.0)
    replicates = np.einsum("rs,su,ru->r", seed_w, per_seed, unit_w) / (seed_w.sum(1) * unit_w.sum(1))
    return list(_percentile_ci(replicates, 0.95))


def _pooled_difference(per_seed: np.ndarray, articles: list[str], what: str) -> dict:
    """per_seed [S, U]: the seeds' per-unit average with its cluster-robust t over articles and the joint bootstrap."""
    S = per_seed.shape[0]
    d = paired_difference(per_seed.mean(0), np.zeros(per_seed.shape[1]), clusters=articles)
    return {**d, "n": S, "values": per_seed.mean(1).tolist(),
            "joint_bootstrap_ci": joint_bootstrap(per_seed, articles) if S >= 2 else None,
            "rests_on": f"{S} seeds averaged per unit{what}; t over {d['articles']} articles ({d['units']} units)"}


def pooled(per_seed_units: list[dict], articles: list[str]) -> dict:
    """Each held-out figure over seeds scored on the same units: the seeds' per-unit values averaged, a
    cluster-robust t over articles, the joint seed-and-article bootstrap beside it, and trained - random's power."""
    S = len(per_seed_units)
    out = {name: _pooled_difference(np.stack([u[name] for u in per_seed_units]), articles, "") for name in PAIRED}
    o = oracle_fraction(*(np.mean([u[f"oracle_{k}"] for u in per_seed_units], axis=0) for k in ("chosen", "mean", "best")),
                        clusters=articles)
    out["oracle_fraction"] = {**o, "mean": o["fraction"], "n": S, "values": [
        oracle_fraction(u["oracle_chosen"], u["oracle_mean"], u["oracle_best"], clusters=articles)["fraction"]
        for u in per_seed_units], "rests_on": f"{S} seeds averaged per unit; linearised t over {o['articles']} articles"}
    out["power"] = power_analysis(out["trained-random"], POWER_TARGETS)
    return out


def _done(out: Path, spec: dict, arm: str, seed: int) -> bool:
    """Trained to the end and evaluated (what `summarize(partial=True)` reports)."""
    run_dir = out / f"{arm}-s{seed}"
    if not (run_dir / "config.json").is_file():
        return False
    cfg = run_config(spec, arm, seed, run_dir)
    return _finished(run_dir, cfg) and (run_dir / "eval" / f"episode-{cfg.num_episodes}.json").is_file()


def summarize(out: Path, spec: dict, partial: bool = False) -> dict:
    """Per arm and seed: curves, the final reward, the overfit figures and the evaluation, its intervals recomputed
    from the kept per-unit values (cluster-robust t over articles, with trained - random's power); per arm the
    held-out figures pooled over seeds (`pooled`: seeds averaged per unit, t over articles) and the figures without
    units by a t over seeds (`over_seeds`); for every pair of arms the same on the per-unit difference of their seed
    averages (`pairs`, over the seeds both have). `partial`: the runs trained and evaluated so far only. Reads each
    run's config, metrics and final evaluation report only (a kept run needs nothing else)."""
    arms: dict = {}
    units_of: dict = {}  # arm -> {seed: per-unit values}
    reference: list | None = None  # the unit ids every run must share
    articles: list = []
    for arm in spec["arms"]:
        runs, units_of[arm] = [], {}
        for seed in spec["seeds"]:
            if partial and not _done(out, spec, arm, seed):
                continue
            run_dir = out / f"{arm}-s{seed}"
            cfg = TrainConfig.from_file(run_dir / "config.json")
            metrics = read_jsonl(run_dir / "metrics.jsonl")
            report = json.loads((run_dir / "eval" / f"episode-{cfg.num_episodes}.json").read_text())
            if reference is None:
                reference, articles = report["per_unit"]["unit_ids"], report["per_unit"]["articles"]
            elif report["per_unit"]["unit_ids"] != reference:
                raise ValueError(f"{run_dir} was scored on other held-out units than the experiment's other runs: "
                                 "evaluate every run with the experiment's `evaluate` options")
            units = units_of[arm][seed] = _unit_values(report)
            paired = {name: paired_difference(units[name], np.zeros(len(articles)), clusters=articles)
                      for name in PAIRED}
            oracle = oracle_fraction(units["oracle_chosen"], units["oracle_mean"], units["oracle_best"],
                                     clusters=articles)
            rewards = [m["reward"] for m in metrics]
            window = min(20, len(rewards) // 2)
            runs.append({"seed": seed, "reward": rewards,
                         **{k: [m.get(k) for m in metrics] for k in CURVES},
                         "final_reward": _mean(rewards[-FINAL_WINDOW:]),
                         "learning": learning_figure(rewards, window) if window >= 2 else None,
                         "paired": paired, "oracle": oracle,
                         "power": power_analysis(paired["trained-random"], POWER_TARGETS),
                         "units": report["units"], "articles": report["articles"],
                         "eval_selection_entropy": report["selection_entropy"]})
        arm_stats = {name: t_interval([get(r) for r in runs]) for name, get in PER_RUN.items()}
        if runs:
            arm_stats.update(pooled([units_of[arm][r["seed"]] for r in runs], articles))
        arms[arm] = {"fields": spec["arms"][arm] or {}, "runs": runs, "over_seeds": arm_stats}
    names = list(arms)
    pairs = {}
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            seeds = [s for s in spec["seeds"] if s in units_of[first] and s in units_of[second]]
            by_seed = {arm: {r["seed"]: r for r in arms[arm]["runs"]} for arm in (first, second)}
            pair = {}
            for name, get in PER_RUN.items():
                values = [(get(by_seed[second][s]), get(by_seed[first][s])) for s in seeds]
                pair[name] = t_interval([None if b is None or a is None else b - a for b, a in values])
                pair[name]["rests_on"] = f"paired by seed: t over {len(seeds)} seeds"
            if seeds:
                for name in PAIRED:
                    per_seed = np.stack([units_of[second][s][name] - units_of[first][s][name] for s in seeds])
                    pair[name] = _pooled_difference(per_seed, articles, ", paired by unit")
                pair["power"] = power_analysis(pair["trained-random"], POWER_TARGETS)
                # each arm's fraction from its seeds' per-unit averages (those seeds both arms have), paired by unit
                triples = [tuple(np.mean([units_of[a][s][f"oracle_{k}"] for s in seeds], axis=0)
                                 for k in ("chosen", "mean", "best")) for a in (first, second)]
                d = fraction_difference(*triples, clusters=articles)
                pair["oracle_fraction"] = {**d, "n": len(seeds), "values": [], "rests_on": (
                    f"{len(seeds)} seeds averaged per unit, the arms' fractions paired by unit; linearised t over "
                    f"{d['articles']} articles ({d['units']} units)")}
            pairs[f"{second}-{first}"] = pair
    return {"base": spec["base"], "seeds": spec["seeds"], "final_window": FINAL_WINDOW, "arms": arms, "pairs": pairs,
            "intervals": "held-out figures: seeds averaged per unit (every seed is scored on the same units), 95% "
                         "cluster-robust t over articles (articles - 1 df); joint_bootstrap_ci resamples seeds and "
                         "articles together (the conservative check); final reward and held-out selection entropy: "
                         "t over seeds"}


CURVES = ("selection_entropy", "adapter_reward", "query_reward", "oracle_fraction", "target_oracle_fraction")


def _mean(values: list) -> float:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else float("nan")


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def _ci(x: dict | None, fmt: str = "+.4f") -> str:
    if x is None or x.get("mean") is None or x["mean"] != x["mean"]:
        return "n/a"
    if x.get("ci") is None:
        return format(x["mean"], fmt)
    return f"{x['mean']:{fmt}} [{x['ci'][0]:{fmt}}, {x['ci'][1]:{fmt}}]"


def _trend(learning: dict) -> str:
    if learning.get("t_hac") is None or learning["t_hac"] != learning["t_hac"]:
        return "n/a"
    return f"{learning['t_hac']:+.2f} ({learning['hac_dof']}, {learning['p_hac']:.3f})"


def format_summary(summary: dict, markdown: bool = False) -> str:
    """The experiment's tables, computed from `summary.json`: per run (arm, seed) the final reward, the overfit
    figures and the held-out evaluation with article-level intervals and trained - random's minimum detectable
    effect; per arm the held-out figures pooled over seeds (seeds averaged per unit, t over articles; the joint
    seed-and-article bootstrap and the power beside them); every pair of arms the same, paired by unit.
    `markdown` gives EXPERIMENTS.md's tables."""
    def paired(p: dict, key: str) -> str:
        return _ci({"mean": p[key]["mean"], "ci": p[key]["ci"]})

    def mde(p: dict | None) -> str:
        return "n/a" if not p or p.get("minimum_detectable_effect") is None else f"{p['minimum_detectable_effect']:.4f}"

    runs_head = ["arm", "seed", "final reward (last 10)", "z (last - first)", "trend t (block dof, p)",
                 "trained - random [95% CI]", "trained - untrained [95% CI]", "trained - natural [95% CI]",
                 "per-step oracle fraction [95% CI]", "trained - random detectable at 80%",
                 "held-out selection entropy", "units / articles"]
    rows = []
    for arm, a in summary["arms"].items():
        for r in a["runs"]:
            lf = r["learning"] or {}
            o = r["oracle"]
            rows.append([arm, str(r["seed"]), f"{r['final_reward']:+.4f}", _num(lf.get("z"), "+.2f"),
                         _trend(lf), paired(r["paired"], "trained-random"),
                         paired(r["paired"], "trained-untrained"), paired(r["paired"], "trained-natural"),
                         _ci({"mean": o["fraction"], "ci": o["ci"]}, "+.3f"), mde(r.get("power")),
                         _num(r["eval_selection_entropy"]["trained"], ".3f"), f"{r['units']} / {r.get('articles', '?')}"])
    fmts = {"heldout_selection_entropy": ".3f", "oracle_fraction": "+.3f"}
    seeds_head = ["arm", "seeds"] + list(FIGURES)
    seed_rows = [[arm, str(a["over_seeds"]["final_reward"]["n"])] +
                 [_ci(a["over_seeds"].get(f), fmts.get(f, "+.4f")) for f in FIGURES] for arm, a in summary["arms"].items()]
    pair_rows = [[name, str(p["final_reward"]["n"])] + [_ci(p.get(f), fmts.get(f, "+.4f")) for f in FIGURES]
                 for name, p in summary.get("pairs", {}).items()]
    checks = []
    for name, x in [*((arm, a["over_seeds"]) for arm, a in summary["arms"].items()), *summary.get("pairs", {}).items()]:
        if "trained-random" not in x or "joint_bootstrap_ci" not in x["trained-random"]:
            continue
        tr, power = x["trained-random"], x.get("power") or {}
        need = power.get("articles_needed") or {}
        jb = tr["joint_bootstrap_ci"]
        checks.append([name, _ci(tr), "n/a" if jb is None else f"[{jb[0]:+.4f}, {jb[1]:+.4f}]", mde(power),
                       str(need.get("0.02", "n/a")), str(need.get("0.01", "n/a")), tr.get("rests_on", "")])
    tables = [("Per run: held-out intervals over articles (cluster-robust t)", runs_head, rows),
              ("Per arm: held-out figures with the seeds averaged per unit [95% t over articles]; final reward and "
               "selection entropy [95% t over seeds]", seeds_head, seed_rows)]
    if pair_rows:
        tables.append(("Arms paired: held-out figures on the per-unit difference of the arms' seed averages [95% t over "
                       "articles]; final reward and selection entropy paired by seed [95% t over seeds]",
                       ["pair", "seeds"] + list(FIGURES), pair_rows))
    if checks:
        tables.append(("trained - random: the conservative check and the power",
                       ["arm or pair", "t over articles", "joint seed-and-article bootstrap", "detectable at 80%",
                        "articles for 80% power at 0.02", "at 0.01", "rests on"], checks))
    out = []
    for title, head, body in tables:
        if markdown:
            out += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(row) + " |" for row in body]
        else:
            widths = [max(len(x) for x in col) for col in zip(head, *body)]
            out += [title] + ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in [head, *body]]
        out.append("")
    return "\n".join(out).rstrip()


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over `k` episodes (fewer at the start), NaN-aware."""
    out = np.full(x.shape, np.nan)
    for i in range(x.shape[-1]):
        window = x[..., max(0, i - k + 1):i + 1]
        out[..., i] = np.nanmean(window, axis=-1)
    return out


def plot_experiment(summary: dict, smooth: int = 10):
    """An experiment's curves, mean ± SD over seeds per arm (each a trailing mean over `smooth` episodes): the
    batch reward, its adapter and query parts, the selection entropy and, where logged, the training batch's
    per-step oracle fraction, on the reward and on the selection objective's own score; and, when the summary has
    them, the held-out figures per arm (mean over seeds with its t interval, each seed a dot). An arm with no run
    finished yet (an experiment under way) has no curve."""
    panels = [("reward", "batch reward (nats per value token)"), ("adapter_reward", "adapter part of the reward"),
              ("query_reward", "query part of the reward"), ("selection_entropy", "selection entropy (1 = uniform)")]
    runs_of = [r for a in summary["arms"].values() for r in a["runs"]]
    for key, title in (("oracle_fraction", "training per-step oracle fraction (reward)"),
                       ("target_oracle_fraction", "training oracle fraction (objective's score)")):
        if any(v is not None for r in runs_of for v in r.get(key, [])):
            panels.append((key, title))
    heldout = all("over_seeds" in a for a in summary["arms"].values())
    pairs = summary.get("pairs") or {}
    count = len(panels) + (2 if heldout else 0) + (1 if heldout and pairs else 0)
    cols = 3
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, (key, title) in zip(axes, panels):
        if all(v is None for r in runs_of for v in r[key]):
            _no_value(ax, "no value logged (e.g. every step\nhad a single pair left)")
        for arm, a in summary["arms"].items():
            if not a["runs"]:
                continue
            curves = np.array([[np.nan if v is None else v for v in r[key]] for r in a["runs"]], dtype=float)
            with warnings.catch_warnings():  # an episode with no value in any seed stays a gap, not a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                curves = _smooth(curves, smooth)
                mean, sd = np.nanmean(curves, axis=0), np.nanstd(curves, axis=0)
            episodes = np.arange(1, curves.shape[1] + 1)
            runs = len(a["runs"])
            ax.plot(episodes, mean, label=f"{arm} ({runs} seed{'s' if runs > 1 else ''})")
            if runs > 1:
                ax.fill_between(episodes, mean - sd, mean + sd, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("episode")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    if heldout:
        # arms with a run evaluated (an experiment under way may have none yet for an arm)
        groups = {arm: a["over_seeds"] for arm, a in summary["arms"].items() if "trained-random" in a["over_seeds"]}
        pairs = {name: p for name, p in pairs.items() if "trained-random" in p}
        _interval_panel(axes[len(panels)], groups, ["trained-random", "trained-untrained", "trained-natural"],
                        "held out: seeds averaged per unit, 95% t over articles", "reward difference (nats per value token)")
        _interval_panel(axes[len(panels) + 1], groups, ["oracle_fraction"],
                        "held out: per-step oracle fraction\n(seeds averaged per unit, linearised t over articles)",
                        "0 = random choice, 1 = best pair every step")
        if pairs:
            # the pairs get colours of their own: C0.. are the arms' in the other panels
            _interval_panel(axes[len(panels) + 2], pairs, ["final_reward", "trained-random", "trained-untrained"],
                            "arms paired: difference\n(final reward: t over seeds; held out: t over articles)",
                            "difference (nats per value token)", first_colour=len(summary["arms"]))
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _interval_panel(ax, groups: dict, figures: list[str], title: str, xlabel: str, first_colour: int = 0) -> None:
    """Each group's (arm's or pair's) pooled value of `figures` with its interval, each seed a dot; group k drawn in
    colour C(first_colour + k)."""
    labelled = False
    for k, (name, stats_of) in enumerate(groups.items(), start=first_colour):
        k_local = k - first_colour
        y = np.arange(len(figures)) + (k_local - (len(groups) - 1) / 2) * 0.2
        label = name  # on the group's first interval drawn (a figure without one, e.g. one seed's, has no bar)
        for yi, f in zip(y, figures):
            x = stats_of[f]
            if x["ci"] is not None and x["mean"] == x["mean"]:
                ax.errorbar(x["mean"], yi, xerr=[[x["mean"] - x["ci"][0]], [x["ci"][1] - x["mean"]]], fmt="o",
                            color=f"C{k}", capsize=3, label=label)
                labelled, label = True, None
            ax.plot(x["values"], [yi] * len(x["values"]), ".", color=f"C{k}", alpha=0.5)
    if not any(x["values"] for g in groups.values() for x in (g[f] for f in figures)):
        _no_value(ax, "not measured in these runs")
    ax.axvline(0, color="black", lw=0.5)
    ax.xaxis.set_major_locator(plt.MaxNLocator(4))  # five or more signed ticks ran into each other
    ax.set_yticks(range(len(figures)), figures)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if labelled:
        ax.legend(fontsize=7)


def _no_value(ax, why: str) -> None:
    """Say in an empty panel why it is empty."""
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="grey", fontsize=9)
