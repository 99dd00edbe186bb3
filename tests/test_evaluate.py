"""Held-out evaluation: the split never leaks, the baselines are fair, and the command reports."""

import json

import pytest
import torch

from attnrl_core.__main__ import main
from attnrl_core.config import TrainConfig
from attnrl_core.data import is_heldout, iter_wikipedia_articles
from attnrl_core.evaluate import METHODS, bootstrap_ci, compare_methods
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


def test_methods_share_first_pair_and_pools(policy):
    cfg = tiny_config()
    batch = make_batch(policy, cfg)
    res = compare_methods(policy, batch, SEP, head_geometry(policy), cfg, seed=3)
    assert list(res) == list(METHODS)
    for m in METHODS[1:]:
        assert res[m]["context_start"] == res["trained"]["context_start"]
        assert res[m]["pool"] == res["trained"]["pool"]
    assert res["trained"]["reward"] != res["untrained"]["reward"]  # the adapter matters
    lo, hi = res["trained"]["reward_ci"]
    assert lo <= res["trained"]["reward"] <= hi


def test_bootstrap_interval_brackets_the_mean():
    values = torch.randn(50, generator=torch.Generator().manual_seed(0)).numpy()
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi and hi - lo < 1.0


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    assert main(["train", "--preset", "embedded", "--num_episodes", "2", "--generation_batch_size", "2",
                 "--training_batch_size", "1", "--num_kv_pairs", "4", "--tokens_per_key", "8", "--tokens_per_value",
                 "8", "--tokens_per_query", "6", "--warmup_trajectories", "2", "--filter_num_sd", "0",
                 "--eval_every", "1", "--eval_articles", "3", "--no_progress", "--output_dir", str(out)]) == 0
    return out


def test_training_never_sees_heldout_articles_and_logs_eval(small_run):
    trajs = read_jsonl(small_run / "trajectories.jsonl")
    assert not any(is_heldout(t["article_id"], 0.1) for t in trajs)
    metrics = read_jsonl(small_run / "metrics.jsonl")
    assert all(isinstance(m["eval_reward"], float) for m in metrics)


def test_evaluate_command_prints_the_table(small_run, capsys):
    assert main(["evaluate", "--run_dir", str(small_run), "--num_articles", "4"]) == 0
    out = capsys.readouterr().out
    for m in METHODS:
        assert m in out
    report = json.loads((small_run / "eval" / "episode-2.json").read_text())
    assert report["num_articles"] == 4 and set(report["methods"]) == set(METHODS)
    assert not set(report["article_ids"]) & {t["article_id"] for t in read_jsonl(small_run / "trajectories.jsonl")}
    assert (small_run / "eval" / "episode-2.png").is_file()
