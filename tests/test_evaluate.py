"""Held-out evaluation: the split never leaks, the baselines are fair, and the command reports."""

import json

import matplotlib.pyplot as plt
import pytest
import torch

from attnrl_core.__main__ import main
from attnrl_core.config import TrainConfig
from attnrl_core.corpus import is_heldout, iter_wikipedia_articles
from attnrl_core.data import heldout_articles
from attnrl_core.evaluate import METHODS, compare_methods, heldout_batch, power_note, rescore, rollout_method
from attnrl_core.model import head_geometry
from attnrl_core.rollout import rollout
from attnrl_core.files import read_jsonl

from .conftest import SEP, make_batch, tiny_config


def test_split_is_deterministic_and_disjoint():
    cfg = TrainConfig.from_preset("embedded")
    train = {a["id"] for a in iter_wikipedia_articles(cfg, split="train", passes=1)}
    held = {a["id"] for a in iter_wikipedia_articles(cfg, split="eval", passes=1)}
    every = {a["id"] for a in iter_wikipedia_articles(cfg, split="all", passes=1)}
    assert train and held and not train & held and train | held == every
    assert all(is_heldout(i, cfg.eval_fraction) for i in held)
    assert is_heldout("12", 0.5) == is_heldout("12", 0.5) and not is_heldout("12", 0.0)


def test_heldout_set_does_not_depend_on_the_training_seed(smol_tokenizer):
    """Runs trained with seeds 0 and 1 are scored on the same held-out units, in the same order (training
    reshuffles a local corpus by seed; the held-out order is the hash of the id)."""
    cfg = TrainConfig.from_preset("embedded", num_kv_pairs=16)
    units = {}
    for seed in (0, 1):
        batch = heldout_batch(cfg.replace(seed=seed), smol_tokenizer, lambda keys: torch.zeros(keys.shape[0], 2),
                              num_articles=4, seed=7, windows_per_article=2, samples=1)
        units[seed] = batch.article_ids
    assert units[0] == units[1] and len({u.split("#")[0] for u in units[0]}) == 4
    every = [a["id"] for a, _ in heldout_articles(cfg, smol_tokenizer, 0)]
    assert len(every) == len(set(every)) > 4 and [a["id"] for a, _ in heldout_articles(cfg.replace(seed=5),
                                                                                        smol_tokenizer, 0)] == every
    assert all(is_heldout(i, cfg.eval_fraction) for i in every)


def test_every_method_consumes_the_same_draws(policy):
    """Common random numbers: after rolling out the same rows, every method's generator is in the same state,
    natural order included (it draws the selection's exponentials too), so step t's query draws line up."""
    cfg = tiny_config(num_kv_pairs=8, subset_fraction=0.5)
    batch = make_batch(policy, cfg)
    states = {}
    for method in METHODS:
        generator = torch.Generator().manual_seed(3)
        rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=3, generator=generator,
                selector={"trained": "attention", "untrained": "attention"}.get(method, method))
        states[method] = generator.get_state()
    assert all(torch.equal(states["trained"], s) for s in states.values())


def test_random_baseline_uses_each_pool_pair_once(policy):
    cfg = tiny_config(num_kv_pairs=8, subset_fraction=0.5)
    batch = make_batch(policy, cfg)
    torch.manual_seed(0)
    traj = rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=3, selector="random")
    chosen = traj.choices
    for b in range(batch.batch_size):
        assert sorted(chosen[b].tolist()) == sorted(batch.pool[b].tolist())
    first = traj.probabilities[:, 0]
    assert torch.allclose(first[first > 0], torch.full_like(first[first > 0], 1 / 4))


def test_natural_order_reference_takes_pairs_in_article_order(policy):
    cfg = tiny_config(num_kv_pairs=8, subset_fraction=0.5)
    batch = make_batch(policy, cfg)
    traj = rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=3, selector="natural")
    chosen = traj.choices
    assert torch.equal(chosen, batch.pool.sort(dim=1).values)


def test_paired_report_and_oracle_on_the_same_rows(policy):
    cfg = tiny_config(num_kv_pairs=8, subset_fraction=0.5)
    batch = make_batch(policy, cfg)  # 4 rows: 2 units x 2 samples
    res = compare_methods(policy, batch, SEP, head_geometry(policy), cfg, seed=3, samples=2, chunk=3)
    assert list(res["methods"]) == list(METHODS)
    assert set(res["paired"]) == {"trained-untrained", "trained-random", "trained-natural"}
    for diff in res["paired"].values():
        assert diff["units"] == 2 and diff["ci"][0] <= diff["mean"] <= diff["ci"][1]
    assert res["methods"]["trained"]["reward"] != res["methods"]["untrained"]["reward"]  # the adapter matters
    assert res["selection_entropy"]["random"] == pytest.approx(1.0) and res["selection_entropy"]["natural"] == 0.0
    oracle = res["oracle"]
    assert oracle["best"] >= oracle["chosen"] - 1e-6 and oracle["best"] >= oracle["mean"]
    # a report rescored from its own per-unit values keeps its intervals (what notebook 07 does to saved ones)
    again = rescore({**res, "seed": 3, "samples_per_article": 2})
    for name, diff in res["paired"].items():
        assert again["paired"][name]["ci"] == pytest.approx(diff["ci"], abs=1e-6)
    assert again["oracle"]["fraction"] == pytest.approx(oracle["fraction"], abs=1e-6)
    # the paired difference is the mean of per-unit differences of the methods' own rewards
    per_row = {m: torch.tensor(res["methods"][m]["reward"]) for m in METHODS}
    assert res["paired"]["trained-random"]["mean"] == pytest.approx(
        float(per_row["trained"] - per_row["random"]), abs=1e-5)


def test_evaluation_leaves_the_global_generators_alone(policy):
    """Every method draws from its own seeded generator: evaluating during training changes nothing in the
    training run, on the CPU and, where present, on CUDA."""
    cfg = tiny_config()
    batch = make_batch(policy, cfg)
    torch.manual_seed(11)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    first = compare_methods(policy, batch, SEP, head_geometry(policy), cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), cpu)
    assert all(torch.equal(a, b) for a, b in zip(cuda, torch.cuda.get_rng_state_all() if cuda else []))
    torch.manual_seed(999)  # another global state: the evaluation is the same (the time taken aside)
    again = compare_methods(policy, batch, SEP, head_geometry(policy), cfg, seed=5)
    for report in (first, again):
        for method in report["methods"].values():
            method.pop("seconds")
    assert again == first


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    assert main(["train", "--preset", "embedded", "--num_episodes", "2", "--generation_batch_size", "2",
                 "--training_batch_size", "1", "--num_kv_pairs", "4", "--tokens_per_key", "8", "--tokens_per_value",
                 "8", "--tokens_per_query", "6", "--warmup_trajectories", "2", "--filter_num_sd", "0",
                 "--eval_every", "1", "--eval_articles", "3", "--no_progress", "--output_dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_training_never_sees_heldout_articles_and_logs_eval(small_run):
    trajs = read_jsonl(small_run / "trajectories.jsonl")
    assert not any(is_heldout(t["article_id"], 0.1) for t in trajs)
    metrics = read_jsonl(small_run / "metrics.jsonl")
    assert all(isinstance(m["eval_reward"], float) for m in metrics)
    # SPEC's defaults: no selection objective, so no step of it and no candidates scored in training
    assert all(m["choice_kl"] is None and m["oracle_fraction"] is None for m in metrics)


@pytest.mark.slow
def test_evaluate_command_prints_the_table_and_the_json_report(small_run, capsys):
    assert main(["evaluate", "--run_dir", str(small_run), "--num_articles", "3", "--windows_per_article", "2",
                 "--samples_per_article", "2", "--json"]) == 0
    out = capsys.readouterr().out
    for m in METHODS:
        assert m in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report == json.loads((small_run / "eval" / "episode-2.json").read_text())
    assert set(report["methods"]) == set(METHODS) and report["samples_per_article"] == 2
    assert 3 < report["units"] <= 6 and report["articles"] == 3  # held-out articles are long: up to 2 windows each
    assert set(report["paired"]) == {"trained-untrained", "trained-random", "trained-natural"}
    assert {"fraction", "ci", "best", "mean", "chosen"} <= set(report["oracle"])
    assert set(report["selection_entropy"]) == set(METHODS)
    trained_articles = {t["article_id"] for t in read_jsonl(small_run / "trajectories.jsonl")}
    assert not {u.split("#")[0] for u in report["unit_ids"]} & trained_articles
    assert not plt.get_fignums()  # the saved figure is closed: a notebook that plots the report shows it once
    assert power_note(report).startswith("3 held-out articles") and "too few" in power_note(report)
    assert (small_run / "eval" / "episode-2.png").is_file()
    # article-level intervals with their counts, the per-unit values behind them, and the power line
    assert report["paired"]["trained-random"]["articles"] == 3 and report["oracle"]["articles"] == 3
    units = report["per_unit"]
    assert units["unit_ids"] == report["unit_ids"] and units["articles"] == [u.split("#")[0] for u in units["unit_ids"]]
    for m in METHODS:
        assert len(units[m]["reward"]) == report["units"]
    assert sum(units["trained"]["reward"]) / report["units"] - sum(units["random"]["reward"]) / report["units"] == \
        pytest.approx(report["paired"]["trained-random"]["mean"])
    assert set(units["oracle"]) == {"best", "mean", "chosen"} and "per step" in report["oracle"]["definition"]
    need = report["power"]["articles_needed"]  # None where trained and random chose alike (no spread)
    assert report["power"]["articles"] == 3 and set(need) == {"0.01", "0.02"}
    assert all(n is None or n >= 2 for n in need.values())
    assert report["paired"]["trained-random"]["method"] == "t" and report["oracle"]["method"] == "t"
    assert "power:" in out and "per-step oracle" in out and "by a cluster-robust t" in out


def test_a_kept_report_from_before_the_power_analysis_says_so():
    """The kept reports of experiments/second.yaml predate issue 37: their power is a half-width, not power."""
    from pathlib import Path

    from attnrl_core.evaluate import format_report

    report = json.loads(Path("experiments/kept/second/spec-s0/eval/episode-60.json").read_text())
    assert "predates the power analysis" in power_note(report) and "no spread" not in power_note(report)
    assert "percentile cluster bootstrap" in format_report(report)
    # notebook 07 shows it rescored: today's intervals and power from its own per-unit values
    again = rescore(report)
    assert again["paired"]["trained-random"]["method"] == "t" and "minimum_detectable_effect" in again["power"]
    assert "cluster-robust t (intervals and power recomputed" in format_report(again)
    assert again["paired"]["trained-random"]["mean"] == pytest.approx(report["paired"]["trained-random"]["mean"])
    assert "predates" not in power_note(again) and report["paired"]["trained-random"].get("method") != "t"


def test_saved_reports_load_in_episode_order_and_tabulate_their_intervals(tmp_path):
    import json

    from attnrl_core.rundir import load_reports, report_rows

    (tmp_path / "eval").mkdir()
    for episode, mean in ((10, 0.5), (2, -0.25)):  # episode-10 sorts before episode-2 as text
        report = {"articles": 3, "units": 6, "samples_per_article": 1,
                  "paired": {"trained-random": {"mean": mean, "ci": [mean - 0.1, mean + 0.1]}},
                  "oracle": {"fraction": 0.2, "ci": [-0.5, 0.9]}, "power": {"minimum_detectable_effect": 0.1}}
        (tmp_path / "eval" / f"episode-{episode}.json").write_text(json.dumps(report))
    reports = load_reports(tmp_path)
    assert list(reports) == ["episode-2", "episode-10"]
    rows = report_rows(reports)
    assert rows[0]["trained-random"] == "-0.2500 [-0.3500, -0.1500]" and rows[1]["oracle fraction"] == "+0.20 [-0.50, +0.90]"
    assert rows[1]["trained-random detectable at 80%"] == 0.1 and rows[0]["articles"] == 3
