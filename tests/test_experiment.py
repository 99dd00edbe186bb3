"""The experiment command: arms x seeds trained as processes, evaluated, aggregated; a rerun skips them."""

import json

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
    assert summary["arms"]["spec"]["over_seeds"]["trained-random"]["ci"] is None  # one seed: no interval
    assert "Per arm: mean over seeds" in format_summary(summary)
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
