"""The experiment command: arms x seeds trained as processes, evaluated, aggregated; a rerun skips them."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from attnrl_core.experiment import format_summary, load_experiment, run_experiment, save_figure, summarize, t_interval

TINY = {"preset": "embedded", "generation_batch_size": 4, "training_batch_size": 2, "num_kv_pairs": 3,
        "tokens_per_key": 8, "tokens_per_value": 8, "tokens_per_query": 6, "warmup_trajectories": 2,
        "filter_num_sd": 0.0, "num_episodes": 4, "checkpoint_every": 2, "num_threads": 1}


@pytest.mark.slow
def test_experiment_trains_evaluates_and_skips_what_is_done(tmp_path):
    spec = {"base": TINY, "arms": {"spec": {}, "loo": {"reward_baseline": "leave_one_out",
                                                       "trajectories_per_article": 2}},
            "seeds": [0], "evaluate": {"num_articles": 2, "samples_per_article": 1, "windows_per_article": 1}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the first arm is the reference
    out = tmp_path / "runs"
    summary = run_experiment(path, out, parallel=2)
    assert set(summary["arms"]) == {"spec", "loo"}
    for arm in ("spec", "loo"):
        run = summary["arms"][arm]["runs"][0]
        assert len(run["reward"]) == 4 and run["oracle"]["fraction"] is not None
        assert set(run["paired"]) == {"trained-untrained", "trained-random", "trained-natural"}
    assert summary["pairs"]["loo-spec"]["final_reward"]["values"][0] == pytest.approx(
        summary["arms"]["loo"]["runs"][0]["final_reward"] - summary["arms"]["spec"]["runs"][0]["final_reward"])
    assert summary["arms"]["spec"]["over_seeds"]["trained-random"]["mean"] == pytest.approx(
        summary["arms"]["spec"]["runs"][0]["paired"]["trained-random"]["mean"])
    # one seed: its held-out figures still have an interval over the articles, the final reward none over seeds
    pooled = summary["arms"]["spec"]["over_seeds"]
    assert pooled["trained-random"]["articles"] == 2 and pooled["trained-random"]["df"] == 1
    assert pooled["final_reward"]["ci"] is None and "1 seeds averaged per unit" in pooled["trained-random"]["rests_on"]
    assert "Per arm: held-out figures with the seeds averaged per unit" in format_summary(summary)
    markdown = format_summary(summary, markdown=True)
    assert "| arm | seed |" in markdown and "| loo-spec | 1 |" in markdown
    assert (out / "experiment.png").is_file()
    stamp = (out / "spec-s0" / "metrics.jsonl").stat().st_mtime_ns
    again = run_experiment(path, out, parallel=1)  # everything is done: nothing reruns, the same numbers
    assert (out / "spec-s0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert json.dumps(again) == json.dumps(summary)
    # an experiment under way (`--markdown`): the runs trained and evaluated so far, arms paired over shared seeds
    (out / "loo-s0" / "eval" / "episode-4.json").rename(tmp_path / "held.json")
    partial = summarize(out, load_experiment(path), partial=True)
    assert len(partial["arms"]["spec"]["runs"]) == 1 and partial["arms"]["loo"]["runs"] == []
    assert partial["pairs"]["loo-spec"]["final_reward"]["n"] == 0
    assert "| spec | 0 |" in format_summary(partial, markdown=True)
    save_figure(partial, tmp_path / "partial.png")  # an arm with no run done has no curve, not an error
    assert (tmp_path / "partial.png").stat().st_size > 0


def test_an_invalid_arm_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": TINY, "arms": {"x": {"kl_reference": "nope"}}, "seeds": [0]}))
    with pytest.raises(ValueError, match="kl_reference"):
        load_experiment(path)
    assert not (tmp_path / "runs").exists()


def test_over_seed_interval_is_a_t_interval_over_seeds():
    x = t_interval([1.0, 2.0, 3.0, None])  # a missing seed is left out, not counted
    assert x["n"] == 3 and x["mean"] == pytest.approx(2.0)
    half = 4.302652729911275 / 3 ** 0.5  # t(0.975, 2 df) * SD 1 / sqrt(3)
    assert x["ci"] == pytest.approx([2.0 - half, 2.0 + half])


def test_seeds_are_averaged_per_unit_and_intervalled_over_articles(tmp_path):
    """Seeds scored on the same units share their sampling error: the pooled interval is a t over the articles of
    the seeds' per-unit average, not a t over seeds (which would be far too narrow when the seeds agree)."""
    from attnrl_core.diagnostics import paired_difference
    from attnrl_core.experiment import pooled

    rng = np.random.default_rng(0)
    articles = [f"a{i}" for i in range(10) for _ in range(3)]
    shared = np.repeat(rng.normal(size=10), 3) * 0.05  # the units' own variation, common to every seed
    seeds = [{"trained-random": shared + 0.001 * rng.normal(size=30), "trained-untrained": shared,
              "trained-natural": shared, "oracle_chosen": np.ones(30), "oracle_mean": np.zeros(30),
              "oracle_best": np.full(30, 2.0)} for _ in range(3)]
    result = pooled(seeds, articles)["trained-random"]
    expected = paired_difference(np.mean([s["trained-random"] for s in seeds], axis=0), np.zeros(30), clusters=articles)
    assert result["ci"] == pytest.approx(expected["ci"]) and result["df"] == 9 and result["n"] == 3
    over_seeds = t_interval([s["trained-random"].mean() for s in seeds])
    assert np.diff(over_seeds["ci"])[0] < np.diff(result["ci"])[0] / 5  # the old t over seeds was this narrow
    assert result["joint_bootstrap_ci"][0] <= result["mean"] <= result["joint_bootstrap_ci"][1]


def test_the_kept_experiment_is_finished_from_its_metrics_and_reports(tmp_path):
    """A kept run holds config, metrics and evaluation reports only: `experiment` must not retrain it, and the
    summary needs nothing else."""
    from attnrl_core.experiment import _finished, run_config

    spec = load_experiment("experiments/second.yaml")
    kept = Path("experiments/kept/second")
    for arm in spec["arms"]:
        for seed in spec["seeds"]:
            run_dir = kept / f"{arm}-s{seed}"
            assert not (run_dir / "checkpoints").exists() and _finished(run_dir, run_config(spec, arm, seed, run_dir))
    summary = summarize(kept, spec)
    assert summary["arms"]["choice"]["over_seeds"]["trained-random"]["ci"][0] < 0  # the interval includes 0
    assert summary["arms"]["choice"]["over_seeds"]["power"]["minimum_detectable_effect"] > 0.01
    pair = summary["pairs"]["choice-spec"]  # arm pairs: the power of the difference and the fractions' interval
    assert pair["power"]["minimum_detectable_effect"] > 0.01 and pair["power"]["articles"] == 13
    lo, hi = pair["oracle_fraction"]["ci"]
    assert lo < pair["oracle_fraction"]["mean"] < hi and "paired by unit" in pair["oracle_fraction"]["rests_on"]


def test_a_run_stopped_by_a_signal_is_reported_as_stopped_not_evaluated(tmp_path, monkeypatch):
    """`train` sent SIGTERM checkpoints and exits 0: the experiment must say the run stopped and how to resume,
    not go on to evaluate a final checkpoint that was never written."""
    from attnrl_core import experiment

    spec = {"base": TINY, "arms": {"spec": {}}, "seeds": [0]}
    run_dir = tmp_path / "spec-s0"
    cfg = experiment.run_config(spec, "spec", 0, run_dir)

    def stopped_after_two_episodes(run_dir, args, doing):  # what a SIGTERMed `train` leaves behind
        (run_dir / "checkpoints" / "episode-2").mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"episode": e}) + "\n" for e in (1, 2)))

    monkeypatch.setattr(experiment, "_cli", stopped_after_two_episodes)
    with pytest.raises(RuntimeError, match="stopped before episode 4.*run the experiment again"):
        experiment._train(run_dir, cfg)
    monkeypatch.setattr(experiment, "_cli", lambda *a: None)  # resumed from episode-2, and again stopped at once
    with pytest.raises(RuntimeError, match="stopped before episode 4"):
        experiment._train(run_dir, cfg)
